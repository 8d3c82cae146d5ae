"""The two-stage cascade and the `segment` CLI, with a tiny random-weight bundle.

Random weights give arbitrary (but deterministic) segmentations, so these tests check
what must hold for *any* model: the output grid is exactly the input grid (rotated,
anisotropic), the ROI is exactly the output parotid + margin, nothing is labelled
outside the ROI, the side cut follows the body midline, every bad input fails with a
clear error and no output, and cancellation (SIGTERM) leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bundle_utils import make_tiny_bundle, rotation_direction, synthetic_ct
from conftest import REPO
from ParotidOARLib import cascade, labels, preprocess, roi, segio
from ParotidOARLib.__main__ import main
from ParotidOARLib.errors import EmptyStructureError, InputError, ModelError, OutputExistsError
from ParotidOARLib.imageio import Geometry, write_image

RESEARCH = "NOT FOR CLINICAL USE"


@pytest.fixture(scope="module")
def rotated_case(tmp_path_factory):
    """Synthetic head CT on a rotated, k-flipped, anisotropic grid; body off the image centre."""
    d = tmp_path_factory.mktemp("rot")
    ct, g = synthetic_ct(size=(70, 64, 26), spacing=(3.1, 3.6, 4.5), direction=rotation_direction(20, 0, True),
                         body_centre_lps=(15.0, 0.0, 0.0))
    path = write_image(d / "ct.nrrd", ct, g)
    return path, ct, g


def _no_leftovers(folder, allowed=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in allowed)


def test_segment_geometry_round_trip_and_roi(rotated_case, tiny_bundle, tmp_path, capsys):
    path, ct, g = rotated_case
    out = tmp_path / "out.seg.nrrd"
    rep = tmp_path / "report.json"
    rc = main(["segment", str(path), "--side", "left", "--out", str(out), "--model", str(tiny_bundle),
               "--device", "cpu", "--report", str(rep)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert RESEARCH in captured.err  # clinical_use false → one-line warning
    masks, g_out, segments = segio.read_seg(out)
    # exactly the input geometry (rotated, flipped, anisotropic)
    assert g_out.size == g.size
    assert np.allclose(g_out.spacing, g.spacing, atol=1e-6)
    assert np.allclose(g_out.origin, g.origin, atol=1e-4)
    assert np.allclose(g_out.direction, g.direction, atol=1e-6)
    roi_name = labels.roi_segment_name(17.0)
    assert list(masks) == list(labels.STRUCTURES) + [roi_name]
    parotid, roi_mask = masks[labels.PAROTID], masks[roi_name]
    assert parotid.any()
    # the ROI is exactly the output parotid + 17 mm (independent whole-grid EDT)
    from scipy import ndimage

    brute = ndimage.distance_transform_edt(~parotid, sampling=g.spacing_zyx) <= 17.0
    assert np.array_equal(roi_mask, brute)
    # nothing outside the ROI
    for name in labels.OARS:
        assert not (masks[name] & ~roi_mask).any(), name
    # the parotid lies on the patient's left of the body midline (LPS +x)
    mid = preprocess.body_midline_x(ct, g)
    assert mid == pytest.approx(15.0, abs=4.0)
    x = g.index_to_lps(np.argwhere(parotid)[:, ::-1])[:, 0]
    assert (x > mid).all()
    # the report
    r = json.loads(rep.read_text())
    for step in ("read", "preprocess", "stage1", "roi", "stage2", "resample", "write", "total"):
        assert r["timings"][step] >= 0
    assert r["side"] == "left" and r["device"] == "cpu"
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert r["model"]["sha256"]["stage1"] == manifest["stages"]["stage1"]["sha256"]
    assert r["model"]["id"] == "tiny-test@0.0.1"
    assert r["roi_volume_cc"] == pytest.approx(roi_mask.sum() * g.voxel_volume_cc, rel=1e-6)
    for name in labels.STRUCTURES:
        assert r["volumes_cc"][name] == pytest.approx(masks[name].sum() * g.voxel_volume_cc, rel=1e-6, abs=1e-3)
    assert r["peak_memory"]["rss_mb"] > 0
    lo, hi = np.asarray(r["crop_box_lps"]["min"]), np.asarray(r["crop_box_lps"]["max"])
    roi_pts = g.index_to_lps(np.argwhere(roi_mask)[:, ::-1])
    assert (roi_pts >= lo - 1e-6).all() and (roi_pts <= hi + 1e-6).all()  # the stage-2 crop holds the ROI
    assert r["notice"] and RESEARCH in r["notice"]
    assert _no_leftovers(tmp_path) == ["out.seg.nrrd", "report.json"]


def test_run_roi_margin_and_side_cut_follow_the_body(tiny_bundle):
    """Body centred 30 mm right of the image centre: each side keeps its own half of the body."""
    ct, g = synthetic_ct(size=(80, 72, 26), spacing=(3.0, 3.0, 4.0), body_centre_lps=(-30.0, 5.0, 0.0))
    bundle_all = make_tiny_bundle_cached(tiny_bundle.parent, "everywhere", stage1_bias=50.0)
    mid = preprocess.body_midline_x(ct, g)
    assert mid == pytest.approx(-30.0, abs=3.5)
    x = g.index_to_lps(np.argwhere(np.ones(g.shape, bool))[:, ::-1])[:, 0].reshape(g.shape)
    body = preprocess.body_mask(ct, g)
    for side in ("left", "right"):
        res = cascade.run(ct, g, cascade.SegmentOptions(side=side, model_dir=bundle_all, device="cpu",
                                                        roi_margin_mm=10.0))
        par = res.masks[labels.PAROTID]
        # a parotid-everywhere stage 1 → the parotid is that side's half (within the stage-1 grid)
        xs = x[par]
        if side == "left":
            assert (xs > mid).all() and xs.min() < mid + 6.0
        else:
            assert (xs < mid).all() and xs.max() > mid - 6.0
        own_half = body & ((x > mid + 6.0) if side == "left" else (x < mid - 6.0))
        assert (par[own_half]).mean() > 0.95
        assert res.roi_name == labels.roi_segment_name(10.0)
        assert np.array_equal(res.roi, roi.expand(par, g, 10.0))
        for name in labels.OARS:
            assert not (res.masks[name] & ~res.roi).any()
        assert res.report["midline"]["method"] == "body"


_BUNDLES = {}


def make_tiny_bundle_cached(root, name, **kw):
    if name not in _BUNDLES:
        _BUNDLES[name] = make_tiny_bundle(root / name, name=f"tiny-{name}", force=True, **kw)
    return _BUNDLES[name]


def test_phantom_case_round_trip(tiny_bundle, tmp_path):
    """The small phantom (cut at one side of the head): the midline falls back to the FOV edge."""
    phantom = pytest.importorskip("ParotidOARLib.phantom")
    case = phantom.generate_case(3, side="right", size="small")
    path = write_image(tmp_path / "ct.nrrd", case.ct, case.geometry)
    everywhere = make_tiny_bundle_cached(tiny_bundle.parent, "everywhere", stage1_bias=50.0)
    out = tmp_path / "seg.seg.nrrd"
    report = cascade.segment(path, out, cascade.SegmentOptions(side="right", model_dir=everywhere, device="cpu"))
    masks, g_out, _ = segio.read_seg(out)
    assert g_out.same_grid(case.geometry)
    assert report["midline"]["method"] in ("body", "fov-edge")
    assert masks[labels.PAROTID].any()
    with pytest.raises(InputError, match="left side is not in the image"):
        cascade.run(case.ct, case.geometry, cascade.SegmentOptions(side="left", model_dir=everywhere,
                                                                   device="cpu"))


# --------------------------------------------------------------------------- errors
def _write(tmp_path, name, array, geometry):
    return write_image(tmp_path / name, array, geometry)


def test_bad_inputs_fail_clearly_with_no_output(tiny_bundle, tmp_path, capsys):
    ct, g = synthetic_ct(size=(40, 40, 12), spacing=(3.0, 3.0, 5.0))
    cases = {}
    cases["non3d.nrrd"] = ("3D", None)
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(ct[5]), str(tmp_path / "non3d.nrrd"))
    cases["mr.nrrd"] = ("does not look like a CT", _write(tmp_path, "mr.nrrd", (ct.astype(np.int32) + 1024)
                                                           .clip(0, 1500).astype(np.int16), g))
    small, gs = synthetic_ct(size=(20, 20, 10), spacing=(2.0, 2.0, 2.0))
    cases["small.nrrd"] = ("too small", _write(tmp_path, "small.nrrd", small, gs))
    # zero spacing: written with pynrrd (SimpleITK refuses to write it)
    import nrrd

    nrrd.write(str(tmp_path / "zero.nrrd"), ct.transpose(2, 1, 0).copy(),
               {"space": "left-posterior-superior", "space directions": np.diag([3.0, 3.0, 0.0]),
                "space origin": np.zeros(3)})
    cases["zero.nrrd"] = ("spacing", None)
    for name, (message, _p) in cases.items():
        out = tmp_path / f"{name}.seg.nrrd"
        rc = main(["segment", str(tmp_path / name), "--side", "left", "--out", str(out), "--model",
                   str(tiny_bundle), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        assert "error:" in err and message.lower() in err.lower(), (name, err)
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_empty_parotid_stops_without_oars(rotated_case, tiny_bundle, tmp_path, capsys):
    path, ct, g = rotated_case
    nothing = make_tiny_bundle_cached(tiny_bundle.parent, "nothing", stage1_bias=-50.0)
    with pytest.raises(EmptyStructureError, match="no parotid"):
        cascade.run(ct, g, cascade.SegmentOptions(side="left", model_dir=nothing, device="cpu"))
    out = tmp_path / "o.seg.nrrd"
    rc = main(["segment", str(path), "--side", "left", "--out", str(out), "--model", str(nothing),
               "--device", "cpu", "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "No organs at risk were produced" in err
    assert _no_leftovers(tmp_path) == []


def test_model_errors(rotated_case, tiny_bundle, tmp_path, monkeypatch, capsys):
    import shutil

    path, _ct, _g = rotated_case
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    data = bytearray((bad / "stage1.pt").read_bytes())
    data[100] ^= 0xFF
    (bad / "stage1.pt").write_bytes(bytes(data))
    out = tmp_path / "o.seg.nrrd"
    rc = main(["segment", str(path), "--side", "left", "--out", str(out), "--model", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "stage1.pt" in err and "models verify" in err
    assert not out.exists()
    # no --model and no default bundle
    monkeypatch.setenv("PAROTIDOAR_MODELS", str(tmp_path / "empty-models"))
    monkeypatch.setattr("ParotidOARLib.bundle.REPO_ROOT", tmp_path / "no-repo")
    with pytest.raises(ModelError, match="(?s)No model bundle found.*train.*install"):
        cascade.segment(path, out, cascade.SegmentOptions(side="left"))
    assert not out.exists()


def test_overwrite_refused_and_force(rotated_case, tiny_bundle, tmp_path):
    path, _ct, _g = rotated_case
    out = tmp_path / "o.seg.nrrd"
    out.write_text("precious")
    opts = cascade.SegmentOptions(side="left", model_dir=tiny_bundle, device="cpu")
    with pytest.raises(OutputExistsError, match="--force"):
        cascade.segment(path, out, opts)
    assert out.read_text() == "precious"
    rep = tmp_path / "r.json"
    rep.write_text("{}")
    opts.force = True
    cascade.segment(path, out, opts, report_path=rep)
    assert segio.read_seg(out)[0]
    assert json.loads(rep.read_text())["side"] == "left"
    with pytest.raises(InputError, match="DICOM"):
        cascade.segment(path, tmp_path / "x.seg.nrrd", opts, rtstruct_path=tmp_path / "x.dcm")
    with pytest.raises(InputError, match=r"\.seg\.nrrd.*\.nii\.gz"):
        cascade.segment(path, tmp_path / "x.png", opts)


def test_device_errors():
    from ParotidOARLib import inference

    assert inference.select_device("cpu").type == "cpu"
    assert inference.select_device("auto").type in ("cpu", "cuda", "mps")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            inference.select_device("cuda")
    with pytest.raises(InputError):
        inference.select_device("tpu")


def test_bad_thread_counts_fail_clearly(rotated_case, tiny_bundle, tmp_path, capsys):
    """Issue #15 fault 6: `--threads -1` (or 0) is a one-line error before any work, not a traceback from
    torch.set_num_threads; `train --threads -1` too."""
    import torch

    from ParotidOARLib import inference

    path, _ct, _g = rotated_case
    before = torch.get_num_threads()
    for bad in ("-1", "0"):
        out = tmp_path / "o.seg.nrrd"
        rc = main(["segment", str(path), "--side", "left", "--out", str(out), "--model", str(tiny_bundle),
                   "--device", "cpu", "--threads", bad])
        err = capsys.readouterr().err
        assert rc == 2 and "--threads must be a whole number" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    rc = main(["train", "--threads", "-1", "--data", str(tmp_path), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "--threads must be a whole number" in err, err
    assert torch.get_num_threads() == before
    assert inference.check_threads(None) is None and inference.check_threads(3) == 3
    with pytest.raises(InputError):
        inference.check_threads(2.5)


def test_sliding_window_gaussian_and_optimised_conv():
    """Window accumulation reproduces a single pass for a pointwise net; oneDNN conv = native conv."""
    import torch

    from ParotidOARLib import inference
    from ParotidOARLib.network import build
    from bundle_utils import tiny_config

    starts = inference.window_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 68 and max(np.diff(starts)) <= 16  # ≥ 50 % overlap, full cover
    assert inference.window_starts(20, 32) == [0]
    w = inference.gaussian_weights((8, 16, 16))
    assert w.max() == pytest.approx(1.0) and w.min() > 0 and w[4, 8, 8] > w[0, 0, 0]

    class Pointwise(torch.nn.Module):  # logits depend on the voxel only → windows must agree exactly
        def forward(self, x):
            return torch.cat([x, -x], dim=1)

    img = np.random.default_rng(0).normal(size=(20, 40, 30)).astype(np.float32)
    p = inference.sliding_window(Pointwise(), img, (8, 16, 16), 2, torch.device("cpu"))
    ref = torch.softmax(torch.from_numpy(np.stack([img, -img])), 0).numpy()
    assert p.shape == (2, 20, 40, 30) and np.allclose(p, ref, atol=1e-5)
    p_tta = inference.sliding_window(Pointwise(), img, (8, 16, 16), 2, torch.device("cpu"), tta=True)
    assert np.allclose(p_tta, ref, atol=1e-5)
    torch.manual_seed(0)
    net = build(tiny_config(7)).eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.inference_mode():
        a = net(x)
        inference.optimise_for_cpu(net)
        b = net(x)
    assert torch.allclose(a, b, atol=1e-4)


def test_progress_lines_format(rotated_case, tiny_bundle, tmp_path):
    path, _ct, _g = rotated_case
    out = tmp_path / "o.seg.nrrd"
    proc = subprocess.run([sys.executable, "-m", "ParotidOARLib", "segment", str(path), "--side", "left",
                           "--out", str(out), "--model", str(tiny_bundle), "--device", "cpu",
                           "--progress-lines"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROGRESS ")]
    pcts = [int(ln.split()[1]) for ln in lines]
    steps = [ln.split()[2] for ln in lines]
    assert pcts == sorted(pcts) and pcts[-1] == 100 and all(0 <= p <= 100 for p in pcts)
    for step in ("read", "stage1", "roi", "stage2", "resample", "write"):
        assert step in steps
    assert RESEARCH in proc.stderr


def test_sigterm_mid_run_leaves_nothing(tmp_path, tiny_bundle):
    """SIGTERM once stage 1 reports progress: exit 130, no output, no temp file."""
    ct, g = synthetic_ct(size=(120, 110, 40), spacing=(2.0, 2.0, 3.0), body_centre_lps=(10.0, 0, 0))
    path = write_image(tmp_path / "ct.nrrd", ct, g)
    slow = make_tiny_bundle_cached(tiny_bundle.parent, "slow", stage1_patch=(16, 16, 16),
                                   stage1_spacing=(2.0, 2.0, 3.0))
    outdir = tmp_path / "out"
    outdir.mkdir()
    cmd = [sys.executable, "-m", "ParotidOARLib", "segment", str(path), "--side", "left", "--out",
           str(outdir / "o.seg.nrrd"), "--report", str(outdir / "r.json"), "--model", str(slow),
           "--device", "cpu", "--progress-lines", "--tta"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    seen = None
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("PROGRESS") and line.split()[2] == "stage1":
            seen = line
            proc.send_signal(signal.SIGTERM)
            break
        if time.time() > deadline:
            break
    rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert seen is not None, err
    assert rc == 130, err
    assert "cancelled" in err
    assert list(outdir.iterdir()) == []


def test_dicom_input_with_rtstruct_and_dicom_seg(tiny_bundle, tmp_path, capsys):
    """A DICOM CT folder in; .seg.nrrd + RTSTRUCT + DICOM SEG out, all on the CT's frame of reference."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    dicom_utils = pytest.importorskip("dicom_utils")
    for mod in ("dicomio", "rtstruct", "dicomseg"):
        pytest.importorskip(f"ParotidOARLib.{mod}")
    ct, g = synthetic_ct(size=(70, 64, 26), spacing=(3.1, 3.6, 4.5), body_centre_lps=(15.0, 0.0, 0.0))
    uids = dicom_utils.write_ct_series(tmp_path / "dcm", ct, g)
    out = tmp_path / "out"
    out.mkdir()
    everywhere = make_tiny_bundle_cached(tiny_bundle.parent, "everywhere", stage1_bias=50.0)
    rc = main(["segment", str(tmp_path / "dcm"), "--side", "left", "--out", str(out / "s.seg.nrrd"),
               "--model", str(everywhere), "--device", "cpu", "--rtstruct", str(out / "rs.dcm"),
               "--dicom-seg", str(out / "seg.dcm"), "--roi-margin-mm", "5"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["rs.dcm", "s.seg.nrrd", "seg.dcm"]
    masks, g_out, _ = segio.read_seg(out / "s.seg.nrrd")
    assert g_out.same_grid(g)
    rs = pydicom.dcmread(out / "rs.dcm")
    names = [r.ROIName for r in rs.StructureSetROISequence]
    assert labels.PAROTID in names
    ref_series = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].SeriesInstanceUID
    assert ref_series == uids["series_uid"]
    seg = pydicom.dcmread(out / "seg.dcm")
    assert seg.Modality == "SEG"


def test_keep_components_size_and_distance_rules():
    """Stage-1 post-processing: the largest blob always stays; others by size and by distance."""
    sp = (3.0, 2.0, 2.0)  # z, y, x mm
    m = np.zeros((40, 60, 60), bool)
    m[10:20, 10:30, 10:30] = True  # largest (48 cc)
    m[10:12, 10:15, 33:38] = True  # near: 8 mm (voxel centres) from the largest, 0.6 cc
    m[30:36, 45:58, 45:58] = True  # far (> 30 mm), 12 cc
    m[2:3, 55:57, 2:4] = True  # far and tiny
    largest = np.zeros_like(m)
    largest[10:20, 10:30, 10:30] = True
    near = np.zeros_like(m)
    near[10:12, 10:15, 33:38] = True
    far = np.zeros_like(m)
    far[30:36, 45:58, 45:58] = True

    def keep(min_cc, gap):
        return cascade.keep_components(m, sp, min_cc, gap)

    assert np.array_equal(keep(0.0, float("inf")), m)
    assert np.array_equal(keep(float("inf"), float("inf")), largest)
    assert np.array_equal(keep(2.0, float("inf")), largest | far)  # the v1 rule kept the far blob
    assert np.array_equal(keep(0.0, 10.0), largest | near)
    assert np.array_equal(keep(0.0, 5.0), largest)  # 8 mm gap > 5 mm
    assert np.array_equal(keep(1.0, 10.0), largest)  # near blob is only 0.6 cc
    # the shipped default drops far-away blobs whatever their size
    assert not (cascade.keep_components(m, sp) & far).any()
    one = np.zeros_like(m)
    one[5:8, 5:8, 5:8] = True
    assert np.array_equal(cascade.keep_components(one, sp), one)


def test_parotid_only_stops_after_stage_1(tiny_bundle):
    ct, g = synthetic_ct(size=(64, 60, 24), spacing=(3.0, 3.0, 4.0))
    bundle_all = make_tiny_bundle_cached(tiny_bundle.parent, "everywhere", stage1_bias=50.0)
    opts = cascade.SegmentOptions(side="left", model_dir=bundle_all, device="cpu", roi_margin_mm=10.0)
    full = cascade.run(ct, g, opts)
    only = cascade.run(ct, g, opts, parotid_only=True)
    assert only.masks[labels.PAROTID].any()
    assert np.array_equal(only.masks[labels.PAROTID], full.masks[labels.PAROTID])
    assert not only.roi.any() and all(not only.masks[n].any() for n in labels.OARS)
    assert "stage2" not in only.report["timings"] and "stage1" in only.report["timings"]


def test_given_parotid_replaces_stage_1(tiny_bundle, tmp_path, capsys):
    """A clinician's (or reference) parotid instead of stage 1: the ROI and OARs come from it, in the
    engine and through `segment --parotid` (a .seg.nrrd on another grid); bad contours fail clearly."""
    ct, g = synthetic_ct(size=(64, 60, 24), spacing=(3.0, 3.0, 4.0))
    bundle_all = make_tiny_bundle_cached(tiny_bundle.parent, "everywhere", stage1_bias=50.0)
    mid = preprocess.body_midline_x(ct, g)
    x = g.index_to_lps(np.argwhere(np.ones(g.shape, bool))[:, ::-1])[:, 0].reshape(g.shape)
    k, j, i = np.indices(g.shape)
    blob = ((k - 12) ** 2 / 9 + (j - 30) ** 2 / 36 + (i - 46) ** 2 / 36) <= 1
    given = blob & (x > mid + 10)  # on the patient's left side only
    assert given.sum() > 20
    opts = cascade.SegmentOptions(side="left", model_dir=bundle_all, device="cpu", roi_margin_mm=10.0)
    res = cascade.run(ct, g, opts, parotid=given, parotid_source="test")
    assert np.array_equal(res.masks[labels.PAROTID], given)  # not stage 1's parotid-everywhere
    assert np.array_equal(res.roi, roi.expand(given, g, 10.0))
    assert "stage1" not in res.report["timings"] and res.report["parotid_source"] == "given (test)"
    assert cascade.run(ct, g, opts).report["parotid_source"] == "stage 1"

    with pytest.raises(InputError, match="patient's left side .* but --side is right"):
        cascade.run(ct, g, cascade.SegmentOptions(side="right", model_dir=bundle_all, device="cpu"), parotid=given)
    with pytest.raises(EmptyStructureError, match="given parotid .* is empty"):
        cascade.run(ct, g, opts, parotid=np.zeros(g.shape, bool))
    with pytest.raises(InputError, match="must lie on the CT's grid"):
        cascade.run(ct, g, opts, parotid=given[:, :, 1:])

    # CLI: a .seg.nrrd with Parotid + another segment on a 2x finer grid (resampled to the CT grid)
    path = write_image(tmp_path / "ct.nrrd", ct, g)
    fine = Geometry(tuple(2 * v for v in g.size), tuple(v / 2 for v in g.spacing),
                    tuple(g.index_to_lps(np.array([-0.25, -0.25, -0.25]))), g.direction)
    up = given.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    seg = segio.write_seg(tmp_path / "edited.seg.nrrd", {labels.PAROTID: up, labels.SKIN: up[::-1]}, fine,
                          side="left")
    out = tmp_path / "out.seg.nrrd"
    rep = tmp_path / "rep.json"
    rc = main(["segment", str(path), "--side", "left", "--out", str(out), "--model", str(bundle_all),
               "--device", "cpu", "--roi-margin-mm", "10", "--parotid", str(seg), "--report", str(rep)])
    assert rc == 0, capsys.readouterr().err
    masks, _, _ = segio.read_seg(out)
    assert np.array_equal(masks[labels.PAROTID], given)
    assert json.loads(rep.read_text())["parotid_source"] == f"given ({seg})"
    # wrong side, and a file with several segments none of which is the parotid: clear error, no output
    two = segio.write_seg(tmp_path / "two.seg.nrrd", {"A": up, "B": up[::-1]}, fine, side="left")
    for side, par, msg in (("right", seg, "but --side is right"), ("left", two, "none named 'Parotid'")):
        out2 = tmp_path / "bad.seg.nrrd"
        rc = main(["segment", str(path), "--side", side, "--out", str(out2), "--model", str(bundle_all),
                   "--device", "cpu", "--parotid", str(par)])
        assert rc != 0 and msg in capsys.readouterr().err
        assert not out2.exists()


def test_parotid_contour_outside_the_ct_says_where(tmp_path):
    """Issue #15 fault 8b: a --parotid contour that lies outside the CT is not called 'empty'; the message
    says where the contour and the CT lie."""
    g = Geometry((40, 40, 20), (3.0, 3.0, 4.0), (0.0, 0.0, 0.0))
    k, j, i = np.indices(g.shape)
    blob = (abs(k - 10) < 4) & (abs(j - 20) < 5) & (abs(i - 20) < 5)
    far = Geometry(g.size, g.spacing, (500.0, 0.0, 0.0))
    seg = segio.write_seg(tmp_path / "far.seg.nrrd", {labels.PAROTID: blob}, far)
    with pytest.raises(InputError, match=r"does not lie on the CT.*do not overlap.*x 498\.5\.\.618\.5"):
        cascade.read_parotid(seg, g)
    wide = Geometry((80, 40, 20), g.spacing, (-120.0, 0.0, 0.0))  # overlaps the CT; the blob does not
    outside = np.concatenate([blob, np.zeros_like(blob)], axis=2)  # x -73.5..-46.5 mm
    seg = segio.write_seg(tmp_path / "wide.seg.nrrd", {labels.PAROTID: outside}, wide)
    with pytest.raises(InputError, match=r"lies outside the CT: 'parotid' \(.* cc\) lies at x -73\.5\.\.-46\.5"):
        cascade.read_parotid(seg, g)
    inside = np.roll(outside, 40, axis=2)  # the same blob moved onto the CT: accepted, on the CT's grid
    seg = segio.write_seg(tmp_path / "in.seg.nrrd", {labels.PAROTID: inside}, wide)
    assert cascade.read_parotid(seg, g).sum() == blob.sum()


def test_thick_slices_and_a_negative_header_spacing_are_warned(tiny_bundle, tmp_path, capsys):
    """Issue #15 faults 7c and 7d: 5 mm slices (the model was trained on at most 3 mm) and a negative spacing
    in a MetaImage header are segmented, but with a warning on stderr and in the report."""
    ct, g = synthetic_ct(size=(64, 60, 20), spacing=(3.0, 3.0, 5.0))
    path = write_image(tmp_path / "ct.mha", ct, g, compress=False)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"ElementSpacing = 3 3 5", b"ElementSpacing = -3 3 5", 1))
    out, rep = tmp_path / "o.seg.nrrd", tmp_path / "r.json"
    rc = main(["segment", str(path), "--side", "left", "--out", str(out), "--model", str(tiny_bundle),
               "--device", "cpu", "--report", str(rep)])
    err = capsys.readouterr().err
    assert rc == 0, err
    warnings = json.loads(rep.read_text())["warnings"]
    assert any("5 mm slices" in w and "at most 3 mm" in w for w in warnings), warnings
    assert any("negative value" in w for w in warnings), warnings
    assert all(f"warning: {w}" in err for w in warnings)


def test_wrong_side_warning_compares_both_sides_stage1_volumes(tiny_bundle):
    """Issue #15 fault 7e: stage 1 also runs on the other side and a chosen side whose parotid is more than
    twice the other's is flagged. The 'parotid everywhere' bundle makes stage 1's volume the side's search
    box; a slab of tissue that reaches the image's left border in a few slices (it does not move the
    midline) makes the left box more than twice as wide as the right one."""
    bundle_all = make_tiny_bundle_cached(tiny_bundle.parent, "everywhere", stage1_bias=50.0)
    ct, g = synthetic_ct(size=(70, 60, 24), spacing=(3.0, 3.0, 4.0), semi_axes_mm=(35.0, 60.0))
    x = g.index_to_lps(np.stack(np.meshgrid(np.arange(70), [0], [0], indexing="ij"), -1).reshape(-1, 3))[:, 0]
    ct[2:5, 20:40, x > 0] = 40
    mid = preprocess.body_midline_x(ct, g)
    assert abs(mid) < 3
    warned = cascade.run(ct, g, cascade.SegmentOptions(side="left", model_dir=bundle_all, device="cpu"),
                         parotid_only=True).report
    check = warned["side_check"]
    assert check["other_cc"] < 0.5 * check["chosen_cc"], check
    assert "looks intact" in check["warning"] and "Is the operated side right?" in check["warning"]
    assert any("looks resected" in w for w in warned["warnings"])
    fine = cascade.run(ct, g, cascade.SegmentOptions(side="right", model_dir=bundle_all, device="cpu"),
                       parotid_only=True).report
    assert fine["side_check"]["other_cc"] > fine["side_check"]["chosen_cc"] and fine["side_check"]["warning"] is None
    assert not any("looks resected" in w for w in fine["warnings"])
    off = cascade.run(ct, g, cascade.SegmentOptions(side="left", model_dir=bundle_all, device="cpu",
                                                    side_check=False), parotid_only=True).report
    assert off["side_check"] is None and "side_check" not in off["timings"]


def test_roi_threshold_widens_the_roi_seed_never_the_parotid(tiny_bundle, tmp_path):
    """A ROI threshold below 0.5 (option or the bundle's stage1.roi_threshold) seeds the ROI with the parotid plus
    the stage-1 voxels of at least that probability connected to it: the parotid contour is unchanged, the ROI
    grows and still holds every OAR, and 0.5 (the default) is the parotid + margin exactly."""
    import shutil

    from ParotidOARLib import bundle as bundle_mod

    mixed = make_tiny_bundle_cached(tiny_bundle.parent, "mixed", stage1_bias=0.0, seed=3)
    ct, g = synthetic_ct(size=(70, 60, 24), spacing=(3.0, 3.0, 4.0))
    runs = {t: cascade.run(ct, g, cascade.SegmentOptions(side="left", model_dir=mixed, device="cpu",
                                                         roi_margin_mm=10.0, roi_threshold=t))
            for t in (None, 0.5, 0.3)}
    par = runs[None].masks[labels.PAROTID]
    assert par.any()
    assert np.array_equal(runs[None].roi, roi.expand(par, g, 10.0))
    assert np.array_equal(runs[0.5].roi, runs[None].roi)
    assert runs[None].report["roi_seed"] == {"threshold": 0.5}
    low = runs[0.3]
    assert np.array_equal(low.masks[labels.PAROTID], par)
    assert (low.roi >= runs[None].roi).all() and low.roi.sum() > runs[None].roi.sum()
    assert low.report["roi_seed"]["threshold"] == 0.3 and low.report["roi_seed"]["added_cc"] > 0
    for name in labels.OARS:
        assert not (low.masks[name] & ~low.roi).any()
    # the same threshold from the bundle's manifest
    b2 = tmp_path / "b2"
    shutil.copytree(mixed, b2)
    man = json.loads((b2 / bundle_mod.MANIFEST).read_text())
    man["stages"]["stage1"]["roi_threshold"] = 0.3
    (b2 / bundle_mod.MANIFEST).write_text(json.dumps(man))
    from_manifest = cascade.run(ct, g, cascade.SegmentOptions(side="left", model_dir=b2, device="cpu",
                                                              roi_margin_mm=10.0))
    assert np.array_equal(from_manifest.roi, low.roi)
    man["stages"]["stage1"]["roi_threshold"] = 0.7
    (b2 / bundle_mod.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ModelError, match="roi_threshold"):
        cascade.run(ct, g, cascade.SegmentOptions(side="left", model_dir=b2, device="cpu"))
    for bad in (0.0, 0.6, float("nan")):
        with pytest.raises(InputError, match="--roi-threshold"):
            cascade.run(ct, g, cascade.SegmentOptions(side="left", model_dir=mixed, device="cpu", roi_threshold=bad))
