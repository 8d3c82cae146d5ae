"""Training: losses, augmentation, a real smoke run (loss decreases, checkpoints, resume, bundle).

Everything is real: torch training on 2 small phantom cases with a tiny network (CPU, ~1 min).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ParotidOARLib import labels as L
from ParotidOARLib.augment import AugmentParams, sample_patch
from ParotidOARLib.imageio import write_image
from ParotidOARLib.losses import DeepSupervisionLoss, deep_supervision_weights, downsample_labels, soft_dice_loss

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ losses
def test_deep_supervision_weights_nnunet():
    w = deep_supervision_weights(4)
    assert w[-1] == 0.0 and abs(sum(w) - 1) < 1e-9
    assert w[0] == pytest.approx(1 / 1.75) and w[1] == pytest.approx(0.5 / 1.75) and w[2] == pytest.approx(0.25 / 1.75)
    assert deep_supervision_weights(1) == [1.0]


def test_perfect_prediction_gives_near_zero_loss_and_wrong_one_high():
    y = torch.zeros(2, 8, 16, 16, dtype=torch.long)
    y[:, 2:6, 4:12, 4:12] = 1
    y[:, 3:5, 6:10, 6:8] = 2
    perfect = torch.nn.functional.one_hot(y, 3).permute(0, 4, 1, 2, 3).float() * 50
    assert float(soft_dice_loss(perfect, y)) < 1e-3
    wrong = torch.roll(perfect, 1, dims=1)
    assert float(soft_dice_loss(wrong, y)) > 0.95
    # deep supervision: outputs at full, 1/2, 1/4; ground truth downsampled per output
    outs = [perfect, torch.nn.functional.interpolate(perfect, scale_factor=0.5),
            torch.nn.functional.interpolate(perfect, scale_factor=0.25)]
    loss = DeepSupervisionLoss(3)(outs, y)
    assert float(loss) < 0.02
    assert downsample_labels(y, (4, 8, 8)).shape == (2, 4, 8, 8)


def test_channel_mask_ignores_unlabelled_classes():
    y = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    y[:, 2:6, 2:6, 2:6] = 1
    logits = torch.nn.functional.one_hot(y, 3).permute(0, 4, 1, 2, 3).float() * 50
    logits[:, 2, :2] = 100  # class 2 predicted where it is unlabelled in this case
    full = float(soft_dice_loss(logits, y))
    masked = float(soft_dice_loss(logits, y, channel_mask=torch.tensor([[1.0, 1.0, 0.0]])))
    assert masked < 1e-3 < full


# ------------------------------------------------------------------ augmentation
def test_patch_without_augmentation_is_a_crop_and_mirror_is_left_right_only():
    rng = np.random.default_rng(0)
    img = torch.arange(10 * 12 * 14, dtype=torch.float32).reshape(10, 12, 14)
    lab = (img.long() % 7)
    centre = (4.5, 5.5, 6.5)  # patch (4, 6, 8) → voxels 3..6, 3..8, 3..10
    x, y, _ = sample_patch(img, lab, centre, (4, 6, 8), (3.0, 1.0, 1.0), rng, AugmentParams.none())
    assert torch.allclose(x[0], img[3:7, 3:9, 3:11], atol=1e-3)
    assert torch.equal(y, lab[3:7, 3:9, 3:11])
    p = AugmentParams.none()
    p.p_mirror = 1.0
    x, y, _ = sample_patch(img, lab, centre, (4, 6, 8), (3.0, 1.0, 1.0), rng, p)
    assert torch.allclose(x[0], torch.flip(img[3:7, 3:9, 3:11], dims=[2]), atol=1e-3)  # x only
    assert torch.equal(y, torch.flip(lab[3:7, 3:9, 3:11], dims=[2]))


def test_spatial_augmentation_keeps_image_and_labels_aligned():
    rng = np.random.default_rng(1)
    img = torch.zeros(24, 32, 32)
    img[8:16, 10:22, 10:22] = 1.0
    lab = (img > 0.5).long()
    p = AugmentParams(p_spatial=1, p_elastic=1, p_intensity=0, p_noise=0)
    for _ in range(5):
        x, y, _ = sample_patch(img, lab, (12, 16, 16), (16, 24, 24), (2.0, 1.0, 1.0), rng, p)
        agree = ((x[0] > 0.5) == (y > 0)).float().mean()
        assert agree > 0.97


# ------------------------------------------------------------------ smoke training
@pytest.fixture(scope="module")
def small_items():
    from ParotidOARLib import training

    s1, s2 = [], []
    for seed, side in ((100000, "left"), (100001, "right")):
        s1.append(training.phantom_stage1_item(seed, side=side, size="small"))
        s2.append(training.phantom_stage2_items(seed, side=side, size="small", one_step=False)[0])
    return s1, s2


def _tiny(stage):
    from ParotidOARLib import training

    c = training.default_config(stage)
    c.base_features, c.max_features = 4, 16
    return c.to_dict()


def _cfg(tmp_path, stage, epochs, name):
    from ParotidOARLib import training

    return training.TrainConfig(stage=stage, run_dir=str(tmp_path / name), epochs=epochs, iterations_per_epoch=6,
                                lr=1e-2, patch=(16, 32, 24) if stage == 1 else (16, 32, 32),
                                spacing=training.STAGE1_SPACING if stage == 1 else training.STAGE2_SPACING,
                                network=_tiny(stage), val_patches=4, device="cpu", threads=2, progress=False,
                                augment={"p_spatial": 0.3, "p_elastic": 0.0})


def test_smoke_training_resume_and_bundle(tmp_path, small_items):
    from ParotidOARLib import bundle, training

    s1, s2 = small_items
    norm1 = training.compute_normalisation(s1)
    assert norm1["clip"][0] < norm1["mean"] < norm1["clip"][1] and norm1["std"] > 0
    p1 = training.prepare(s1, norm1, 1, (16, 32, 24))
    # uninterrupted run: 3 epochs
    rec = training.train(_cfg(tmp_path, 1, 3, "s1_full"), p1, p1, norm1, log=lambda m: None)
    log = json.loads((tmp_path / "s1_full" / "log.json").read_text())
    assert [r["iteration"] for r in log] == [6, 12, 18] and rec["iterations"] == 18
    assert log[-1]["train_loss"] < log[0]["train_loss"], log  # the loss decreases
    for f in ("checkpoint_last.pt", "checkpoint_best_dice.pt", "checkpoint_best_loss.pt", "log.csv", "curve.png"):
        assert (tmp_path / "s1_full" / f).exists(), f

    # interrupted after 2 epochs, then resumed to 3: continues the counter, optimizer and RNG → same weights
    cfg = _cfg(tmp_path, 1, 3, "s1_resume")
    cfg.stop_after_epoch = 2  # an interruption after epoch 2
    training.train(cfg, p1, p1, norm1, log=lambda m: None)
    ck = torch.load(tmp_path / "s1_resume" / "checkpoint_last.pt", weights_only=False)
    assert ck["state"]["iteration"] == 12
    assert any("momentum_buffer" in v for v in ck["optimizer"]["state"].values())
    msgs = []
    training.train(_cfg(tmp_path, 1, 3, "s1_resume"), p1, p1, norm1, resume=True, log=msgs.append)
    assert any("resumed" in m and "iteration 12" in m for m in msgs)
    a = torch.load(tmp_path / "s1_full" / "checkpoint_last.pt", weights_only=False)
    b = torch.load(tmp_path / "s1_resume" / "checkpoint_last.pt", weights_only=False)
    assert b["state"]["iteration"] == 18 and len(b["state"]["log"]) == 3
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5), k

    # stage 2 (six OARs) on the ROI crops
    norm2 = training.compute_normalisation(s2)
    p2 = training.prepare(s2, norm2, 2, (16, 32, 32))
    training.train(_cfg(tmp_path, 2, 1, "s2"), p2, p2, norm2, log=lambda m: None)

    out = training.write_bundle(tmp_path / "bundle", tmp_path / "s1_full", tmp_path / "s2",
                                data_description={"description": "test", "sources": ["phantom"]},
                                training_record={"note": "smoke"})
    b = bundle.load_bundle(out, verify=True)
    m = b.manifest
    assert m.clinical_use is False
    assert m.labels("stage2") == ["background", *L.OARS] and m.labels("stage1") == ["background", L.PAROTID]
    assert m.training["stage1"]["iterations"] in (6, 12, 18) and m.training["git_commit"]
    for s in ("stage1", "stage2"):
        assert bundle.sha256_file(out / m.stage(s)["file"]) == m.stage(s)["sha256"]
        sd = torch.load(out / m.stage(s)["file"], weights_only=True)
        assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    net = b.model("stage1", "cpu")
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 16, 32, 24)).shape == (1, 2, 16, 32, 24)
    # tampering is detected
    with open(out / "stage2.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(Exception):
        bundle.load_bundle(out, verify=True)


def test_onednn_training_takes_the_same_steps(tmp_path, small_items):
    """--onednn (TrainConfig.onednn): every convolution through oneDNN, forward and backward. The gradients
    match PyTorch's default convolution, so two epochs from the same seed end at the same weights (up to float
    rounding), and the record says which path ran."""
    from ParotidOARLib import inference, training
    from ParotidOARLib.network import build

    torch.manual_seed(0)
    net_a, net_b = build(_tiny(1)), build(_tiny(1))
    net_b.load_state_dict(net_a.state_dict())
    inference.optimise_for_cpu(net_b)
    x = torch.randn(2, 1, 16, 32, 24)
    for net in (net_a, net_b):
        out = net(x)
        sum(o.float().square().mean() for o in (out if isinstance(out, list) else [out])).backward()
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        assert pa.grad is not None and torch.allclose(pa.grad, pb.grad, rtol=1e-3, atol=1e-5), name

    s1, _ = small_items
    norm1 = training.compute_normalisation(s1)
    p1 = training.prepare(s1, norm1, 1, (16, 32, 24))
    recs = {}
    for flag in (False, True):
        cfg = _cfg(tmp_path, 1, 2, f"onednn_{flag}")
        cfg.onednn = flag
        recs[flag] = training.train(cfg, p1, p1, norm1, log=lambda m: None)
    assert recs[True]["recipe"]["onednn"] is True and recs[False]["recipe"]["onednn"] is False
    a = torch.load(tmp_path / "onednn_False" / "checkpoint_last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "onednn_True" / "checkpoint_last.pt", weights_only=False)["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-2, atol=1e-3), k


def test_cli_train_on_seg_dataset(tmp_path):
    """`python -m ParotidOARLib train` end to end on the user's own .seg.nrrd cases (the phantom's files):
    both stages from the dataset alone, one case with only some OARs (partial labels, masked loss)."""
    from ParotidOARLib import dataset, phantom, segio, training

    data = tmp_path / "data"
    data.mkdir()
    for i, side in enumerate(("left", "right")):
        phantom.write_case(phantom.generate_case(100010 + i, side=side, size="small"), data / f"case{i}")
    part = phantom.generate_case(100012, side="left", size="small")
    (data / "case2").mkdir()
    write_image(data / "case2" / "ct.nrrd", part.ct, part.geometry)
    keep = ("Parotid", "Skin", "Mandibular ramus")
    segio.write_seg(data / "case2" / "labels.seg.nrrd", {n: part.labels_full[n] for n in keep}, part.geometry,
                    side="left")
    (data / "case2" / "case.json").write_text(json.dumps({"side": "left"}))
    samples, problems = dataset.discover(data, "seg")
    assert not problems and len(samples) == 3
    it = training.stage2_item(next(s for s in samples if s.patient == "case2"))
    assert it["channel_mask"].tolist() == [1, 0, 0, 1, 0, 0, 1]  # background, Skin and Ramus labelled
    assert set(np.unique(it["label"])) <= {0, 3, 6} and (it["label"] == 6).any() and it["roi"].any()

    cmd = [sys.executable, "-m", "ParotidOARLib", "train", "--data", str(data), "--stage", "both",
           "--work-dir", str(tmp_path / "work"), "--epochs", "1", "--iterations-per-epoch", "2",
           "--base-features", "4", "--patch1", "16", "32", "24", "--patch2", "16", "32", "32", "--threads", "2",
           "--no-progress", "--out", str(tmp_path / "bundle")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "not for clinical use" in r.stderr.lower()
    split = json.loads((tmp_path / "work" / "splits.json").read_text())
    assert sorted(split["train"] + split["validation"] + split["test"]) == ["case0", "case1", "case2"]
    rec2 = json.loads((tmp_path / "work" / "stage2" / "record.json").read_text())
    assert rec2["stage2_samples_train"] == len(split["train"]) and rec2["phantom_cases_train"] == 0
    man = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert man["clinical_use"] is False
    desc, sources = man["data"]["description"], " ".join(man["data"]["sources"])
    assert "dataset 'data'" in desc and "Stage 2 (six OARs)" in desc
    assert "OpenKBP" not in desc + sources and "phantom" not in desc  # the provenance is what was used
    assert man["training"]["command_line"].startswith("python -m ParotidOARLib train")
    # a broken dataset fails before training, listing the problem
    (data / "case1" / "reference-full.seg.nrrd").unlink()
    (data / "case1" / "reference.seg.nrrd").unlink()
    r = subprocess.run(cmd[:-1] + [str(tmp_path / "bundle2")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "case1" in r.stderr and "problem" in r.stderr


def test_torchrun_ddp_two_ranks_on_cpu(tmp_path):
    """`torchrun --nproc_per_node=2` (DistributedDataParallel, gloo on CPU): rank 0 builds the caches,
    both ranks train, they stop together on the wall-clock budget, rank 0 alone writes the record."""
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ParotidOARLib", "train", "--stage", "2", "--work-dir", str(work), "--epochs", "3",
           "--iterations-per-epoch", "2", "--max-minutes", "0.001", "--phantom-cases", "2",
           "--phantom-val-cases", "1", "--phantom-size", "small", "--base-features", "4",
           "--patch2", "16", "32", "32", "--threads", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    rec = json.loads((work / "stage2" / "record.json").read_text())
    assert rec["world_size"] == 2
    # the budget runs out in the first epoch: both ranks stop after it (no rank left waiting)
    assert rec["epochs_done"] == 1 and rec["iterations"] == 2
    assert (work / "stage2" / "checkpoint_last.pt").exists()
    rows = json.loads((work / "stage2" / "log.json").read_text())
    assert len(rows) == 1  # only rank 0 validates and logs
