"""nnU-Net v2 models as cascade stages (ParotidOARLib/nnunet.py, docs/nnunet.md).

The parity tests build nnU-Net's real ``PlainConvUNet`` (``dynamic_network_architectures``,
installed with --no-deps by the test requirements) from a plans.json in nnU-Net's own format,
save checkpoints as nnUNetTrainer does, import them, and compare the bundle's network with
``PlainConvUNet`` on the same input.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import nnunet_utils as U
from ParotidOARLib import bundle, cascade, labels, nnunet
from ParotidOARLib.__main__ import main
from ParotidOARLib.errors import InputError, ModelError, OutputExistsError

pytest.importorskip("dynamic_network_architectures", reason="installed by requirements-test (make test)")

PAROTID_MAP = {"parotid_residual": "Parotid"}
OAR_NAMES = ["auricle", "condyle", "skin", "mastoid", "eac", "ramus"]
OAR_MAP = dict(zip(OAR_NAMES, labels.OARS))

# stage 1: anisotropic first stage, uneven convolutions per stage; 3d_lowres listed first on purpose
S1_KW = U.arch_kwargs([4, 8, 16, 16], [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                      [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], n_conv=[1, 2, 2, 3], n_conv_dec=[2, 1, 2])
S1_LOWRES_KW = U.arch_kwargs([2, 4], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]])
# stage 2: a transpose (nnU-Net puts the coarsest axis first) and non-cubic strides
S2_KW = U.arch_kwargs([4, 8, 12], [[3, 3, 3], [3, 3, 3], [3, 3, 1]], [[1, 1, 1], [2, 2, 1], [2, 2, 2]])
S2_TRANSPOSE = (2, 0, 1)


def _stage1_results(root, seed=1, folds=(0,), config_name="3d_fullres", **kw):
    cfgs = {"3d_lowres": U.configuration(S1_LOWRES_KW, [6.0, 6.0, 6.0], [16, 16, 16]),
            "3d_fullres": U.configuration(S1_KW, [3.0, 4.0, 4.0], [16, 32, 32])}
    plans = U.plans(cfgs, norm=(35.0, 120.0, -150.0, 300.0))
    ds = U.dataset_json(["parotid_residual"])
    nets = {f: U.randomise(U.build_plain_unet(S1_KW, 2), seed + i).eval() for i, f in enumerate(folds)}
    folder = root / "Dataset601_Parotid" / f"nnUNetTrainer__nnUNetPlans__{config_name}"
    return U.write_results(folder, plans, ds, nets, "3d_fullres", **kw), nets


def _stage2_results(root, seed=10, folds=(0, 1), mirror_axes=(0,)):
    # spacing / patch in nnU-Net's (transposed) order: array (z, y, x) = (2, 1, 1) mm, (16, 32, 24) voxels
    t = S2_TRANSPOSE
    spacing_arr, patch_arr = [2.0, 1.0, 1.0], [16, 32, 24]
    cfg = U.configuration(S2_KW, [spacing_arr[a] for a in t], [patch_arr[a] for a in t])
    plans = U.plans({"3d_fullres": cfg}, transpose=t, norm=(60.0, 200.0, -300.0, 900.0),
                    median_shape=[40, 100, 90], median_spacing=[1.0, 2.0, 1.0])
    ds = U.dataset_json(OAR_NAMES)
    nets = {f: U.randomise(U.build_plain_unet(S2_KW, 7), seed + i).eval() for i, f in enumerate(folds)}
    folder = root / "Dataset602_OARs" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    return U.write_results(folder, plans, ds, nets, "3d_fullres", mirror_axes=mirror_axes), nets


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- parity
def test_stage1_parity_with_plainconvunet(tmp_path, tiny_bundle):
    results, nets = _stage1_results(tmp_path)
    out, summary = nnunet.import_stage(results, 1, tmp_path / "imported", label_map=PAROTID_MAP, base=tiny_bundle)
    m = bundle.verify(out)
    spec = m.stage("stage1")
    # the 3d_fullres configuration (from the folder name), not the first 3D entry of plans.json
    assert spec["source"]["configuration"] == "3d_fullres"
    assert spec["patch_size"] == [16, 32, 32] and spec["spacing"] == [4.0, 4.0, 3.0]  # (x, y, z)
    assert spec["normalisation"]["clip"] == [-150.0, 300.0] and spec["normalisation"]["mean"] == 35.0
    assert spec["labels"] == ["background", "Parotid"] and spec["input_region"] == "side"
    assert spec["mirror_axes"] == [0, 1, 2] and spec["dtype"] == "float32"
    assert not m.clinical_use and "not for clinical use" in m.description.lower()
    b = bundle.load_bundle(out)
    net = b.model("stage1")
    x = torch.randn(2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        ref = nets[0](x)
        got = net(x)
    assert got.shape == ref.shape
    assert _max_diff(got, ref) <= 1e-4
    # the stored tensors are float32 and equal nnU-Net's exactly
    sd = torch.load(out / spec["file"], weights_only=True)
    assert all(v.dtype == torch.float32 for v in sd.values())
    w = nets[0].state_dict()["decoder.transpconvs.0.bias"]
    assert torch.equal(sd["up.0.bias"], w) and w.abs().sum() > 0
    # the other stage is the base bundle's, unchanged
    base = bundle.load_bundle(tiny_bundle)
    for k, v in base.state_dict("stage2").items():
        assert torch.equal(b.state_dict("stage2")[k], v)
    # float16 storage alone would move the logits by far more than the parity tolerance
    half = {k: v.half().float() for k, v in net.state_dict().items()}
    net16 = type(net)(net.config).eval()
    net16.load_state_dict(half)
    with torch.no_grad():
        assert _max_diff(net16(x), ref) > 1e-3


def test_stage2_parity_two_folds_transposed_added_to_existing_bundle(tmp_path, tiny_bundle):
    r1, _ = _stage1_results(tmp_path)
    out, _ = nnunet.import_stage(r1, 1, tmp_path / "pair", label_map=PAROTID_MAP, base=tiny_bundle)
    sha1 = bundle.read_manifest(out).stage("stage1")["sha256"]
    labelmap = tmp_path / "names.json"
    labelmap.write_text(json.dumps(OAR_MAP))
    r2, nets = _stage2_results(tmp_path)
    with pytest.raises(OutputExistsError):  # an existing bundle is replaced only with force
        nnunet.import_stage(r2, 2, out, label_map=str(labelmap))
    assert bundle.read_manifest(out).stage("stage1")["sha256"] == sha1
    out2, summary = nnunet.import_stage(r2, 2, out, label_map=str(labelmap), force=True)
    assert out2 == out and summary["replaced_in_existing_bundle"]
    m = bundle.verify(out)
    assert m.stage("stage1")["sha256"] == sha1  # stage 1 kept byte for byte
    spec = m.stage("stage2")
    assert spec["labels"] == ["background", *labels.OARS]
    assert spec["patch_size"] == [16, 32, 24] and spec["spacing"] == [1.0, 1.0, 2.0]
    assert spec["mirror_axes"] == [S2_TRANSPOSE[0]]  # nnU-Net's axis 0 is array axis 2 (x)
    assert spec["input_region"] == "roi" and spec["context_mm"] == 8.0
    assert spec["architecture"]["ensemble"] == 2 and spec["source"]["folds"] == ["0", "1"]
    net = bundle.load_bundle(out).model("stage2")
    x = torch.randn(1, 1, 16, 32, 24, generator=torch.Generator().manual_seed(1))
    xt = x.permute(0, 1, *[2 + a for a in S2_TRANSPOSE])  # what nnU-Net feeds its network
    inv = [S2_TRANSPOSE.index(a) for a in range(3)]
    with torch.no_grad():
        logits = [n(xt).permute(0, 1, *[2 + j for j in inv]) for n in nets.values()]
        ref = (logits[0] + logits[1]) / 2  # nnU-Net v2 averages the folds' logits
        got = net(x)
    assert _max_diff(got, ref) <= 1e-4
    assert _max_diff(logits[0], logits[1]) > 1e-2  # the two folds really differ
    # the divisor the cascade checks patches against is in array order
    assert bundle.read_manifest(out).architecture("stage2").divisor == (4, 2, 4)  # net (4, 4, 2) after (2, 0, 1)


def test_mirroring_tta_uses_the_checkpoint_axes():
    from ParotidOARLib.inference import _mirror_axes

    assert _mirror_axes(False, [0, 1, 2]) == [()]
    assert _mirror_axes(True) == [(), (4,)]
    assert _mirror_axes(True, [2]) == [(), (4,)]
    assert len(_mirror_axes(True, [0, 1, 2])) == 8  # as nnU-Net: identity + 7 combinations


# --------------------------------------------------------------------------- checkpoints
def test_numpy1_checkpoint_and_module_prefix_and_fold_all(tmp_path, tiny_bundle):
    results, nets = _stage1_results(tmp_path, folds=("all",), prefix="module.")
    ck = results / "fold_all" / "checkpoint_final.pth"
    U.as_numpy1_pickle(ck)
    loaded = nnunet.load_checkpoint(ck)
    assert float(loaded["logging"]["mean_fg_dice"][0]) == 0.41
    # no numbered fold: fold 'all' is used only when named
    with pytest.raises(ModelError, match="fold_N"):
        nnunet.find_checkpoints(results)
    out, _ = nnunet.import_stage(results, 1, tmp_path / "b", folds=["all"], label_map=PAROTID_MAP, base=tiny_bundle)
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        assert _max_diff(bundle.load_bundle(out).model("stage1")(x), nets["all"](x)) <= 1e-4


def test_numpy1_scalar_really_renamed(tmp_path):
    results, _ = _stage1_results(tmp_path)
    ck = results / "fold_0" / "checkpoint_final.pth"
    U.as_numpy1_pickle(ck)
    import zipfile

    z = zipfile.ZipFile(ck)
    pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"numpy.core.multiarray\nscalar" in pkl and b"numpy._core.multiarray\nscalar" not in pkl
    with pytest.raises(Exception):  # torch's default allow-list refuses it ...
        torch.load(ck, weights_only=True)
    assert nnunet.load_checkpoint(ck)["current_epoch"] == 2  # ... the importer's accepts it


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    p = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "x": _Evil()}, p)
    with pytest.raises(ModelError, match="safe loading refused"):
        nnunet.load_checkpoint(p)


def test_checkpoint_best_and_default_final(tmp_path, tiny_bundle):
    results, _ = _stage1_results(tmp_path)
    (results / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(ModelError, match="fold_N/checkpoint_final.pth"):
        nnunet.import_stage(results, 1, tmp_path / "b", label_map=PAROTID_MAP, base=tiny_bundle)
    out, _ = nnunet.import_stage(results, 1, tmp_path / "b", label_map=PAROTID_MAP, base=tiny_bundle,
                                 checkpoint="best")
    assert bundle.read_manifest(out).stage("stage1")["source"]["checkpoint"] == "checkpoint_best.pth"


# --------------------------------------------------------------------------- bad input
def test_bad_input_gives_one_clear_error(tmp_path, tiny_bundle, capsys):
    results, _ = _stage1_results(tmp_path)
    # a folder without plans.json (CLI: one line, exit 2, nothing written)
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["models", "import-nnunet", str(empty), "--stage", "1", "--out", str(tmp_path / "x"),
               "--base", str(tiny_bundle)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "plans.json" in err
    assert not (tmp_path / "x").exists()
    # labels that do not map
    with pytest.raises(InputError, match="do not map"):
        nnunet.import_stage(results, 1, tmp_path / "x", base=tiny_bundle)
    with pytest.raises(InputError, match="must output background \\+ Parotid"):
        nnunet.import_stage(results, 1, tmp_path / "x", base=tiny_bundle, label_map={"parotid_residual": "Skin"})
    # a checkpoint trained with another configuration
    other, _ = _stage1_results(tmp_path / "o", config_name="3d_lowres")
    with pytest.raises(ModelError, match="another configuration"):
        nnunet.import_stage(other, 1, tmp_path / "x", label_map=PAROTID_MAP, base=tiny_bundle)
    # a stage whose input region does not match
    with pytest.raises(InputError, match="sees side or whole"):
        nnunet.import_stage(results, 1, tmp_path / "x", label_map=PAROTID_MAP, base=tiny_bundle, input_region="roi")
    ds = json.loads((results / "dataset.json").read_text())
    ds[nnunet.EXPORT_KEY] = {"stage": 2, "input_region": "roi"}
    (results / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(ModelError, match="trained on ParotidOAR stage-2 crops"):
        nnunet.import_stage(results, 1, tmp_path / "x", label_map=PAROTID_MAP, base=tiny_bundle)
    assert not (tmp_path / "x").exists()
    # a whole-CT-sized model imported as stage 2
    r2, _ = _stage2_results(tmp_path / "w")
    plans = json.loads((r2 / "plans.json").read_text())
    plans["original_median_shape_after_transp"] = [150, 120, 512]  # transposed (x, z, y) order
    plans["original_median_spacing_after_transp"] = [0.98, 2.5, 0.98]
    (r2 / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="not ROI crops"):
        nnunet.import_stage(r2, 2, tmp_path / "x", label_map=OAR_MAP, base=tiny_bundle)
    # residual-encoder presets are refused
    plans = json.loads((results / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    (results / "plans.json").write_text(json.dumps(plans))
    ds.pop(nnunet.EXPORT_KEY)
    (results / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(ModelError, match="residual-encoder"):
        nnunet.import_stage(results, 1, tmp_path / "x", label_map=PAROTID_MAP, base=tiny_bundle)
    assert not (tmp_path / "x").exists()


def test_weights_that_do_not_fit_the_plans(tmp_path, tiny_bundle):
    results, _ = _stage1_results(tmp_path)
    plans = json.loads((results / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 16, 32]
    (results / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="do not fit"):
        nnunet.import_stage(results, 1, tmp_path / "x", label_map=PAROTID_MAP, base=tiny_bundle)


def test_cascade_refuses_a_stage_with_the_wrong_input_region(tmp_path, tiny_bundle):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["stages"]["stage2"]["input_region"] = "whole"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="input region 'whole'"):
        cascade.stage_input_region(bundle.read_manifest(b), "stage2")


# --------------------------------------------------------------------------- end to end
def _plain_from_unet3d(our_net, kw: dict, num_classes: int):
    plain = U.build_plain_unet(kw, num_classes).eval()
    plain.load_state_dict(U.unet3d_to_plain_state(our_net.state_dict(), plain.state_dict().keys()), strict=True)
    return plain


def _shipped_as_nnunet(root, shipped):
    """The shipped bundle's two networks written as nnU-Net results folders (PlainConvUNet checkpoints)."""
    folders = {}
    for st, names, ds_name in (("stage1", ["parotid_residual"], "Dataset701_P"),
                               ("stage2", OAR_NAMES, "Dataset702_OAR")):
        man = shipped.manifest
        cfg = man.architecture(st)
        n = len(cfg.strides)
        kw = U.arch_kwargs(cfg.features, cfg.kernels or [[3, 3, 3]] * n, cfg.strides)
        ours = shipped.model(st)
        plain = _plain_from_unet3d(ours, kw, len(names) + 1)
        x = torch.randn(1, 1, *man.patch_size(st))
        with torch.no_grad():  # the PlainConvUNet really is the shipped network
            assert _max_diff(plain(x), ours(x)) <= 1e-4
        norm = man.normalisation(st)
        plans = U.plans({"3d_fullres": U.configuration(kw, list(man.spacing(st))[::-1], man.patch_size(st))},
                        norm=(norm["mean"], norm["std"], *norm["clip"]), name=ds_name,
                        median_shape=[50, 100, 100], median_spacing=[2.0, 1.0, 1.0])
        folders[st] = U.write_results(root / ds_name / "nnUNetTrainer__nnUNetPlans__3d_fullres", plans,
                                      U.dataset_json(names), {0: plain}, "3d_fullres", mirror_axes=(2,))
    return folders


def _segment(ct, model, out):
    return cascade.segment(ct, out, cascade.SegmentOptions(side="left", model_dir=str(model), threads=1),
                           warn=False)


def test_end_to_end_imported_pair_segments_phantom_and_is_listed(tmp_path, monkeypatch, capsys):
    from ParotidOARLib import phantom, segio

    shipped_dir = bundle.default_bundle_dir()
    if shipped_dir is None:
        pytest.skip("no shipped bundle")
    shipped = bundle.load_bundle(shipped_dir)
    folders = _shipped_as_nnunet(tmp_path / "results", shipped)
    models = tmp_path / "models"
    out = models / "nnunet-roundtrip"
    rc = main(["models", "import-nnunet", str(folders["stage2"]), "--stage", "2", "--out", str(out),
               "--label-map", str(_write(tmp_path / "oars.json", OAR_MAP)), "--base", str(shipped_dir)])
    assert rc == 0
    rc = main(["models", "import-nnunet", str(folders["stage1"]), "--stage", "1", "--out", str(out),
               "--label-map", str(_write(tmp_path / "p.json", PAROTID_MAP))])
    assert rc == 2  # an existing bundle needs --force
    rc = main(["models", "import-nnunet", str(folders["stage1"]), "--stage", "1", "--out", str(out),
               "--label-map", str(_write(tmp_path / "p.json", PAROTID_MAP)), "--force"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "stage1 replaced in" in printed and "NOT FOR CLINICAL USE" in printed
    m = bundle.verify(out)
    assert all(m.stage(s)["source"]["format"] == "nnU-Net v2" for s in bundle.STAGES)

    case = phantom.generate_case(3, side="left", size="small")
    ct = tmp_path / "ct.nrrd"
    from ParotidOARLib.imageio import write_image

    write_image(ct, case.ct, case.geometry)
    rep_imp = _segment(ct, out, tmp_path / "imp.seg.nrrd")
    rep_ref = _segment(ct, shipped_dir, tmp_path / "ref.seg.nrrd")
    assert rep_imp["model"]["name"] == "nnunet-roundtrip" and rep_imp["notice"]
    a, _ = segio.read_seg(tmp_path / "imp.seg.nrrd")[:2]
    r, _ = segio.read_seg(tmp_path / "ref.seg.nrrd")[:2]
    for name in labels.STRUCTURES:
        x, y = a[name], r[name]
        assert x.any() == y.any(), name
        if y.any():
            dice = 2 * np.count_nonzero(x & y) / (np.count_nonzero(x) + np.count_nonzero(y))
            assert dice >= 0.99, (name, dice)
    assert a[labels.PAROTID].any()

    # the Slicer module's model list (ParotidOARLogic.listModels → bundle.list_bundles) shows it
    monkeypatch.setenv(bundle.MODELS_ENV, str(models))
    listed = bundle.list_bundles()
    assert [e["name"] for e in listed] == ["nnunet-roundtrip"] and listed[0]["ok"]
    assert main(["models", "list"]) == 0
    assert "nnunet-roundtrip 1.0.0  [ok; research only - not for clinical use]" in capsys.readouterr().out


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_end_to_end_openkbp_ct(tmp_path, shared_data):
    ct = shared_data / "openkbp" / "validation" / "pt_201" / "ct.nrrd"
    if not ct.exists():
        pytest.skip(f"{ct} not present")
    shipped_dir = bundle.default_bundle_dir()
    if shipped_dir is None:
        pytest.skip("no shipped bundle")
    shipped = bundle.load_bundle(shipped_dir)
    folders = _shipped_as_nnunet(tmp_path / "results", shipped)
    out = tmp_path / "pair"
    nnunet.import_stage(folders["stage2"], 2, out, label_map=OAR_MAP, base=shipped_dir)
    nnunet.import_stage(folders["stage1"], 1, out, label_map=PAROTID_MAP, force=True)
    rep = _segment(ct, out, tmp_path / "kbp.seg.nrrd")
    ref = _segment(ct, shipped_dir, tmp_path / "ref.seg.nrrd")
    v, w = rep["volumes_cc"], ref["volumes_cc"]
    assert v[labels.PAROTID] > 1.0
    for name in labels.STRUCTURES:
        assert abs(v[name] - w[name]) <= 0.02 * max(w[name], 1.0), (name, v[name], w[name])


# --------------------------------------------------------------------------- export
def test_export_nnunet_datasets(tmp_path):
    import SimpleITK as sitk

    out = tmp_path / "raw"
    rc = main(["train", "--export-nnunet", str(out), "--work-dir", str(tmp_path / "work"), "--phantom-size", "small",
               "--stage1-phantom-cases", "1", "--phantom-cases", "1", "--phantom-val-cases", "0", "--no-progress"])
    assert rc == 0
    d1, d2 = out / "Dataset501_ParotidOARStage1", out / "Dataset502_ParotidOARStage2"
    for d, stage, names in ((d1, 1, [labels.PAROTID]), (d2, 2, list(labels.OARS))):
        ds = json.loads((d / "dataset.json").read_text())
        assert ds["channel_names"] == {"0": "CT"} and ds["file_ending"] == ".nii.gz" and ds["numTraining"] == 1
        assert ds["labels"] == {"background": 0, **{n: i for i, n in enumerate(names, 1)}}
        assert ds[nnunet.EXPORT_KEY]["stage"] == stage
        (img,) = sorted((d / "imagesTr").iterdir())
        (lab,) = sorted((d / "labelsTr").iterdir())
        assert img.name.endswith("_0000.nii.gz") and lab.name == img.name.replace("_0000.nii.gz", ".nii.gz")
        im, lb = sitk.ReadImage(str(img)), sitk.ReadImage(str(lab))
        assert im.GetSize() == lb.GetSize() and np.allclose(im.GetDirection(), np.eye(3).ravel())
        a, la = sitk.GetArrayFromImage(im), sitk.GetArrayFromImage(lb)
        assert a.min() < -500 and a.max() > 300  # HU
        assert set(np.unique(la)) <= set(range(len(names) + 1)) and la.max() >= 1
    assert json.loads((d2 / "dataset.json").read_text())[nnunet.EXPORT_KEY]["context_mm"] == 8.0
    assert sitk.ReadImage(str(next((d2 / "imagesTr").iterdir()))).GetSpacing() == (1.0, 1.0, 2.0)
    # no overwrite without --force
    rc = main(["train", "--export-nnunet", str(out), "--work-dir", str(tmp_path / "work"), "--phantom-size", "small",
               "--stage", "1", "--stage1-phantom-cases", "1", "--no-progress"])
    assert rc == 2


def test_stage1_trained_on_whole_ct_sees_the_whole_body_and_keeps_the_operated_side(tmp_path, monkeypatch):
    from bundle_utils import make_tiny_bundle, synthetic_ct

    from ParotidOARLib import inference, preprocess

    seen = []
    real = inference.sliding_window

    def spy(net, image, *a, **kw):
        seen.append(image.shape)
        return real(net, image, *a, **kw)

    monkeypatch.setattr(inference, "sliding_window", spy)
    b = make_tiny_bundle(tmp_path / "b", stage1_bias=50.0)  # "parotid" everywhere
    ct, geometry = synthetic_ct()  # a whole head section, 240 mm wide
    opts = cascade.SegmentOptions(side="right", threads=1, side_check=False)  # one stage-1 pass per run
    side = cascade.run(ct, geometry, opts, bundle=bundle.load_bundle(b), parotid_only=True)
    m = json.loads((b / "manifest.json").read_text())
    m["stages"]["stage1"]["input_region"] = "whole"
    (b / "manifest.json").write_text(json.dumps(m))
    whole = cascade.run(ct, geometry, opts, bundle=bundle.load_bundle(b), parotid_only=True)
    assert len(seen) == 2 and seen[1][2] >= 1.8 * seen[0][2]  # x: the whole body, not the side half
    mid = preprocess.body_midline_x(ct, geometry)
    on_side = preprocess.side_halfspace_mask(geometry, "right", mid)
    for r in (side, whole):
        p = r.masks[labels.PAROTID]
        assert p.any() and not (p & ~on_side).any()  # only the operated side, in both modes
