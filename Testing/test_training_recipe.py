"""The stage-1 training recipe v2 (issue 12): nnU-Net's foreground rule, nnU-Net's augmentation,
the inference side cut, the iteration-count lr schedule and whole-volume model selection.

Real torch, real phantoms and the shipped bundle; small cases only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ParotidOARLib import labels as L
from ParotidOARLib.augment import AugmentParams, _gamma, _gaussian_blur, sample_patch

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "Resources" / "Models" / "parotid-oar-research-v1"
OPENKBP = REPO.parent / "shared" / "data" / "openkbp"


# ------------------------------------------------------------------ foreground per batch
def test_forced_foreground_follows_nnunet():
    from ParotidOARLib.training import forced_foreground

    # nnU-Net get_do_oversample with oversample 0.33: batch 2 -> the second sample; batch 6 -> the last two
    assert [forced_foreground(i, 2, 0.33) for i in range(2)] == [False, True]
    assert [forced_foreground(i, 6, 0.33) for i in range(6)] == [False] * 4 + [True] * 2
    assert [forced_foreground(i, 1, 0.33) for i in range(1)] == [True]  # at least the last one


def _sparse_items():
    """Two items: one with a 2x2x2 foreground blob in a 40x40x40 volume, one with no foreground."""
    from ParotidOARLib import training

    items = []
    for with_fg in (True, False):
        ct = np.full((40, 40, 40), 40, np.int16)
        lab = np.zeros((40, 40, 40), np.uint8)
        if with_fg:
            lab[30:32, 30:32, 30:32] = 1
        g = {"spacing": [1.0, 1.0, 1.0]}
        items.append({"ct": ct, "label": lab, "meta": {"geometry": g}})
    return training.prepare(items, {"clip": [-100, 100], "mean": 0.0, "std": 50.0}, 1, (8, 8, 8))


def test_batch_mode_puts_foreground_in_every_batch_and_sample_mode_does_not():
    from ParotidOARLib.training import sample_batch

    items = _sparse_items()
    counts = {}
    for mode in ("batch", "sample"):
        rng = np.random.default_rng(0)
        without = 0
        for _ in range(60):
            _, y, _ = sample_batch(items, 2, (8, 8, 8), rng, 0.33, AugmentParams.none(), 2, fg_mode=mode)
            without += int(not (y > 0).any())
        counts[mode] = without
    assert counts["batch"] == 0
    assert counts["sample"] > 10  # the first recipe: many batches without any parotid voxel


# ------------------------------------------------------------------ nnU-Net augmentation
def test_nnunet_preset_matches_nnunet_probabilities():
    p = AugmentParams.nnunet()
    assert (p.p_rotation, p.p_scaling, p.p_elastic) == (0.2, 0.2, 0.0)
    assert (p.p_noise, p.p_blur, p.p_brightness, p.p_contrast, p.p_lowres) == (0.1, 0.2, 0.15, 0.15, 0.25)
    assert (p.p_gamma_inverted, p.p_gamma) == (0.1, 0.3)
    assert AugmentParams.preset("legacy") == AugmentParams()
    with pytest.raises(ValueError):
        AugmentParams.preset("heavy")


def test_nnunet_augmentation_keeps_labels_aligned_and_changes_intensities():
    rng = np.random.default_rng(3)
    img = torch.zeros(24, 32, 32)
    img[8:16, 10:22, 10:22] = 1.0
    lab = (img > 0.5).long()
    p = AugmentParams.nnunet(p_rotation=1.0, p_scaling=1.0, p_blur=0, p_lowres=0, p_noise=0, p_brightness=0,
                             p_contrast=0, p_gamma=0, p_gamma_inverted=0)
    for _ in range(5):
        x, y, _ = sample_patch(img, lab, (12, 16, 16), (16, 24, 24), (2.0, 1.0, 1.0), rng, p)
        assert ((x[0] > 0.5) == (y > 0)).float().mean() > 0.97
    # every intensity transform on: labels untouched, image changed, shape kept
    q = AugmentParams.nnunet(p_rotation=0, p_scaling=0, p_mirror=0, p_blur=1, p_brightness=1, p_contrast=1,
                             p_lowres=1, p_gamma=1, p_gamma_inverted=1, p_noise=0)
    x0, y0, _ = sample_patch(img, lab, (12, 16, 16), (16, 24, 24), (2.0, 1.0, 1.0), rng, AugmentParams.none())
    x1, y1, _ = sample_patch(img, lab, (12, 16, 16), (16, 24, 24), (2.0, 1.0, 1.0), rng, q)
    assert torch.equal(y0, y1) and x1.shape == x0.shape
    assert float((x1 - x0).abs().max()) > 0.05


def test_blur_and_gamma_behave():
    img = torch.zeros(1, 9, 9, 9)
    img[0, 4, 4, 4] = 1.0
    b = _gaussian_blur(img, [1.0, 1.0, 1.0])
    assert b.shape == img.shape and float(b.sum()) == pytest.approx(1.0, abs=1e-4)
    assert float(b.max()) < 0.1 and float(b[0, 4, 4, 4]) == float(b.max())
    only_x = _gaussian_blur(img, [0.0, 0.0, 1.0])
    assert float(only_x[0, 4, 4].sum()) == pytest.approx(1.0, abs=1e-4)  # blurred along x only
    x = torch.linspace(-1, 2, 1000).reshape(1, 10, 10, 10)
    for inv in (False, True):
        g = _gamma(x, 1.4, inv)
        assert float(g.mean()) == pytest.approx(float(x.mean()), abs=1e-4)
        assert float(g.std()) == pytest.approx(float(x.std()), abs=1e-4)
        assert not torch.allclose(g, x)


# ------------------------------------------------------------------ whole-volume selection
@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory):
    from ParotidOARLib import dataset, phantom

    root = tmp_path_factory.mktemp("phantoms")
    for i, side in enumerate(("left", "right")):
        phantom.write_case(phantom.generate_case(7 + i, side=side, size="small"), root / f"case{i}")
    samples, problems = dataset.discover(root, "seg")
    assert not problems
    return samples


def test_volume_validator_is_the_segment_path(phantom_dataset):
    """The validator, given the shipped stage-1 network and normalisation, scores exactly what
    `cascade.run` with the shipped bundle gives; an untrained network scores lower."""
    from ParotidOARLib import bundle, cascade, dataset, metrics, training
    from ParotidOARLib.network import build

    b = bundle.load_bundle(SHIPPED)
    man = b.manifest
    v = training.Stage1VolumeValidator(phantom_dataset, man.spacing("stage1"), man.patch_size("stage1"), threads=2,
                                       log=lambda m: None)
    net = b.model("stage1", "cpu")
    res = v(net, man.normalisation("stage1"))
    assert res["n"] == 2 and len(res["rows"]) == 2
    for s, row in zip(phantom_dataset, res["rows"]):
        ct, g, masks, side = dataset.load_sample(s)
        pred = cascade.run(ct, g, cascade.SegmentOptions(side=side, threads=2), bundle=b,
                           parotid_only=True).masks[L.PAROTID]
        assert row["dsc"] == pytest.approx(metrics.compare(pred, masks["Parotid"], g.spacing_zyx)["dsc"], abs=1e-3)
    assert res["mean_dsc"] > 0.4
    torch.manual_seed(0)
    untrained = build(man.architecture("stage1"))
    assert v(untrained, man.normalisation("stage1"))["mean_dsc"] < res["mean_dsc"]
    assert not getattr(net, "training", True)  # the caller's network is left as it was (copied, not patched)


def test_training_keeps_the_best_whole_volume_checkpoint(tmp_path):
    from ParotidOARLib import training

    items = _sparse_items()
    scores = iter([0.30, 0.55, 0.41])
    seen = []

    def validator(model, norm):
        seen.append(model.training)
        return {"mean_dsc": next(scores), "median_dsc": 0.5, "n": 3, "rows": []}

    net = {"base_features": 4, "max_features": 8, "strides": [[1, 1, 1], [2, 2, 2]], "num_classes": 2}
    cfg = training.TrainConfig(stage=1, run_dir=str(tmp_path / "run"), epochs=3, iterations_per_epoch=2,
                               patch=(8, 8, 8), spacing=(1, 1, 1), network=net, val_patches=2, device="cpu",
                               threads=1, progress=False, fg_mode="batch", augment_preset="nnunet",
                               lr_by_time=False, val_every=1)
    rec = training.train(cfg, items, items, {"clip": [-100, 100], "mean": 0.0, "std": 50.0}, log=lambda m: None,
                         volume_validator=validator)
    best = torch.load(tmp_path / "run" / "checkpoint_best_volume.pt", weights_only=False)
    assert best["state"]["iteration"] == 4 and best["volume_validation"]["mean_dsc"] == 0.55
    assert rec["best_volume_dsc"] == 0.55 and [r["iteration"] for r in rec["volume_validation"]] == [2, 4, 6]
    assert rec["recipe"]["fg_mode"] == "batch" and rec["recipe"]["augment"] == "nnunet"
    log = json.loads((tmp_path / "run" / "volume_log.json").read_text())
    assert [r["mean_dsc"] for r in log] == [0.30, 0.55, 0.41]
    assert (tmp_path / "run" / "volume_curve.png").stat().st_size > 1000
    assert seen == [True, True, True]  # the validator copies the model; training mode is restored by train()


def test_lr_follows_iterations_not_the_clock_in_v2():
    from ParotidOARLib import training

    cfg = training.TrainConfig(epochs=10, iterations_per_epoch=100, lr=1e-2, max_minutes=60.0, lr_by_time=True)
    # v1: half the wall-clock budget spent after 10 % of the iterations -> the lr of 50 %
    assert training.poly_lr(cfg, 100, 1800.0) == pytest.approx(1e-2 * 0.5 ** 0.9)
    assert training.poly_lr(cfg, 100, 3600.0) == 0.0
    cfg.lr_by_time = False  # v2: the budget only stops the run; the lr follows the iteration count
    assert training.poly_lr(cfg, 100, 1800.0) == pytest.approx(1e-2 * 0.9 ** 0.9)
    assert training.poly_lr(cfg, 100, 7200.0) == pytest.approx(1e-2 * 0.9 ** 0.9)
    assert training.poly_lr(cfg, 1000, 0.0) == 0.0


# ------------------------------------------------------------------ CLI recipe and side cut
def test_cli_recipe_defaults_and_overrides():
    from ParotidOARLib.commands import train as cmd

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    a = p.parse_args(["--stages1", "5", "--base-features", "32", "--patch1", "48", "64", "48"])
    r1, r2 = cmd.recipe(a, 1), cmd.recipe(a, 2)
    assert (r1["name"], r1["fg_mode"], r1["augment"], r1["side_cut"], r1["lr_by_time"]) == \
        ("v2", "batch", "nnunet", "ct", False)
    assert (r2["name"], r2["fg_mode"], r2["augment"]) == ("v1", "sample", "legacy")
    cfg = cmd._cfg(a, 1, "runs/x", (4, 4, 3), (32, 48, 40))
    assert cfg.network["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 4 and cfg.patch == (48, 64, 48)
    assert (cfg.fg_mode, cfg.augment_preset, cfg.lr_by_time) == ("batch", "nnunet", False)
    b = p.parse_args(["--recipe", "v1", "--augment", "nnunet", "--lr-schedule", "iterations"])
    r = cmd.recipe(b, 1)
    assert (r["fg_mode"], r["augment"], r["lr_by_time"], r["side_cut"]) == ("sample", "nnunet", False, "body")


@pytest.mark.skipif(not (OPENKBP / "validation" / "pt_201").is_dir(), reason="needs ../shared/data/openkbp")
def test_side_cut_from_the_ct_is_the_one_segment_uses():
    from ParotidOARLib import dataset, preprocess, training

    samples, _ = dataset.discover(OPENKBP / "validation", "openkbp", exclude=["pt_221"])
    s = next(x for x in samples if x.patient == "pt_201" and x.side == "left")
    ct, g, masks, _ = dataset.load_sample(s)
    mid_ct = preprocess.body_midline(ct, g)[0]
    it_ct = training.stage1_item(s, side_cut="ct")
    it_body = training.stage1_item(s, side_cut="body")
    lo_ct = it_ct["meta"]["geometry"]["origin"][0] - it_ct["meta"]["geometry"]["spacing"][0] / 2
    lo_body = it_body["meta"]["geometry"]["origin"][0] - it_body["meta"]["geometry"]["spacing"][0] / 2
    assert lo_ct == pytest.approx(mid_ct, abs=1e-3)  # the left crop starts at the CT's midline
    assert lo_body == pytest.approx(preprocess.body_midline(ct, g, masks["Body"])[0], abs=1e-3)
    with pytest.raises(ValueError):
        training.stage1_item(s, side_cut="dose")


@pytest.mark.skipif(not (OPENKBP / "validation" / "pt_201").is_dir(), reason="needs ../shared/data/openkbp")
def test_stage1_fine_tune_keeps_the_normalisation_of_its_weights(tmp_path):
    """`train --stage 1 --init-from BUNDLE` normalises with the bundle's stage-1 scheme, not one recomputed from
    the new mix (which moves every input the weights were trained on), and records it."""
    import os
    import subprocess
    import sys

    from ParotidOARLib import bundle as bundle_mod

    data = tmp_path / "openkbp"
    for split, pt in (("train", "pt_201"), ("validation", "pt_202")):
        (data / split).mkdir(parents=True)
        os.symlink(OPENKBP / "validation" / pt, data / split / pt)
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "ParotidOARLib", "train", "--stage", "1", "--format", "openkbp", "--data", str(data),
           "--work-dir", str(work), "--epochs", "1", "--iterations-per-epoch", "1", "--base-features", "32",
           "--init-from", str(SHIPPED), "--threads", "1", "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    shipped = bundle_mod.verify(SHIPPED).normalisation("stage1")
    rec = json.loads((work / "stage1" / "record.json").read_text())
    cfg = json.loads((work / "stage1" / "train_config.json").read_text())
    for got in (rec["normalisation"], cfg["normalisation"]):
        assert got["clip"] == pytest.approx(shipped["clip"]) and got["mean"] == pytest.approx(shipped["mean"])
        assert got["std"] == pytest.approx(shipped["std"])
