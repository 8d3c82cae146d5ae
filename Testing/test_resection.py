"""Simulated parotidectomy (``resection``): a stage-1 augmentation on real CT.

Real numpy/scipy/torch; a real OpenKBP side (skipped without ../shared/data/openkbp) and a
synthetic gland whose geometry is known exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ParotidOARLib import resection, training
from ParotidOARLib.augment import AugmentParams

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
OPENKBP = REPO.parent / "shared" / "data" / "openkbp"

NORM = {"clip": [-274.0, 318.0], "mean": -0.9, "std": 57.3}


def _to_norm(hu):
    return float(training.normalise(np.array([hu]), NORM)[0])


def _gland_case(seed=0):
    """An ellipsoid fatty 'gland' (-40 HU) in 'fat' (-100 HU) with CT-like noise, on a 4x4x3 mm grid."""
    rng = np.random.default_rng(seed)
    shape = (40, 48, 40)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    gland = ((z - 20) / 9.0) ** 2 + ((y - 24) / 8.0) ** 2 + ((x - 20) / 5.0) ** 2 <= 1
    hu = np.where(gland, -40.0, -100.0) + rng.normal(0, 15, shape)
    return training.normalise(hu, NORM), gland.astype(np.uint8)


def test_the_cap_is_never_upward_and_mostly_lateral():
    rng = np.random.default_rng(1)
    for side, lateral in (("left", 1.0), ("right", -1.0)):
        normals = np.array([resection.draw_normal(rng, side) for _ in range(2000)])  # (z, y, x)
        assert np.allclose(np.linalg.norm(normals, axis=1), 1.0)
        assert normals[:, 0].max() <= 0.2 + 1e-9  # superior (+z in LPS) never dominates
        lat = normals[:, 2] * lateral
        assert (lat > 0).mean() > 0.7  # half forced lateral, half random
        assert (lat < 0).mean() > 0.1  # but not always: a random cap happens too


def test_resection_removes_a_cap_paints_it_and_touches_nothing_else():
    img, gland = _gland_case()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        out, lab, info = resection.simulate(img, gland, (3.0, 4.0, 4.0), rng, _to_norm, side="left")
        removed = (gland > 0) & (lab == 0)
        assert not ((lab > 0) & (gland == 0)).any()  # the residual is part of the gland
        assert 0.15 - 0.02 <= info["resected"] <= 0.5 + 0.02
        assert info["resected"] == pytest.approx(removed.sum() / gland.sum())
        # the removed voxels are one side of a plane: the cap is convex-ish, the residual connected
        from scipy import ndimage
        assert ndimage.label(lab)[1] == 1
        # painted: removed voxels now hold a post-operative tissue (fat -100, seroma/fibrosis 5-25,
        # soft tissue 40 HU), none of them the gland's -40 HU
        change_hu = np.abs(out[removed] - img[removed]) * NORM["std"]
        assert np.median(change_hu) > 30.0
        # nothing changes more than ~2 voxels away from the removed cap
        far = ~ndimage.binary_dilation(removed, iterations=3)
        assert np.array_equal(out[far], img[far])
        # inputs untouched
        assert gland.sum() == _gland_case()[1].sum()


def test_texture_is_kept_so_the_edit_is_not_a_flat_patch():
    img, gland = _gland_case(3)
    out, lab, info = resection.simulate(img, gland, (3.0, 4.0, 4.0), np.random.default_rng(5), _to_norm)
    removed = (gland > 0) & (lab == 0)
    fill_value = np.median(out[removed])
    within = removed & (np.abs(out - fill_value) < 2.0)  # the fill of one kind (seroma, fibrosis, ...)
    assert within.sum() > 20
    assert out[within].std() * NORM["std"] > 5.0  # noise kept (a flat fill would have SD 0)


def test_no_gland_means_no_change():
    img, gland = _gland_case()
    empty = np.zeros_like(gland)
    out, lab, info = resection.simulate(img, empty, (3.0, 4.0, 4.0), np.random.default_rng(0), _to_norm)
    assert info["resected"] == 0.0 and not lab.any() and np.array_equal(out, img.astype(np.float32))


def _real_item():
    from ParotidOARLib import dataset

    if not (OPENKBP / "validation" / "pt_201").is_dir():
        pytest.skip("needs ../shared/data/openkbp")
    samples, _ = dataset.discover(OPENKBP / "validation", "openkbp", exclude=["pt_221"])
    s = next(x for x in samples if x.patient == "pt_201")
    return training.stage1_item(s)


def test_sample_batch_resects_only_real_items_and_keeps_the_residual_label():
    it = _real_item()
    norm = training.compute_normalisation([it])
    real = training.prepare([it], norm, 1, (32, 48, 40))[0]
    assert real["real"]
    phantom_like = {**real, "real": False}
    rng = np.random.default_rng(0)
    resected = [training._resected(real, rng) for _ in range(5)]
    for r in resected:
        assert r["label"].sum() < real["label"].sum()
        assert not bool(((r["label"] > 0) & (real["label"] == 0)).any())
        assert r["fg"] and all(r["label"][tuple(c)] == 1 for c in r["fg"][1][:50])
    assert real["label"].sum() == int(training.prepare([it], norm, 1, (32, 48, 40))[0]["label"].sum())

    # through sample_batch: resect_p=1 changes the foreground of a real item; a phantom item never
    a = training.sample_batch([real], 2, (32, 48, 40), np.random.default_rng(1), 1.0, AugmentParams.none(), 2,
                              "batch", resect_p=0.0)
    b = training.sample_batch([real], 2, (32, 48, 40), np.random.default_rng(1), 1.0, AugmentParams.none(), 2,
                              "batch", resect_p=1.0)
    c = training.sample_batch([phantom_like], 2, (32, 48, 40), np.random.default_rng(1), 1.0,
                              AugmentParams.none(), 2, "batch", resect_p=1.0)
    assert not torch.equal(a[0], b[0])
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


def test_cli_rejects_a_bad_probability(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ParotidOARLib", "train", "--stage", "1", "--data", str(tmp_path),
                        "--resect", "1.5", "--work-dir", str(tmp_path / "w")], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode != 0
    assert "--resect" in (r.stdout + r.stderr) and "Traceback" not in r.stderr
