"""The synthetic post-operative head-and-neck CT phantom (ParotidOARLib/phantom.py + the CLI).

Small cases (``size="small"``, ~160x160x60) keep this file fast; one full case checks
the mirror anatomy of the non-operated side.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from conftest import REPO
from ParotidOARLib import imageio, phantom, segio
from ParotidOARLib import labels as L
from ParotidOARLib.errors import InputError, OutputExistsError

OARS = L.OARS


@pytest.fixture(scope="module")
def left_case():
    return phantom.generate_case(11, side="left", size="small")


@pytest.fixture(scope="module")
def right_case():
    return phantom.generate_case(12, side="right", size="small")


@pytest.fixture(scope="module")
def cases(left_case, right_case):
    extra = [phantom.generate_case(seed, side=side, size="small")
             for seed, side in ((3, "left"), (4, "right"), (27, "left"), (28, "right"))]
    return [left_case, right_case] + extra


def _centroid_lps(case, mask):
    ijk = np.array(np.nonzero(mask))[::-1].T.mean(axis=0)  # numpy (k, j, i) -> (i, j, k)
    return case.geometry.index_to_lps(ijk)


def _patient_coords(case, mask):
    """Patient-frame (pose removed) coordinates of the voxels of ``mask``."""
    ijk = np.array(np.nonzero(mask))[::-1].T
    lps = case.geometry.index_to_lps(ijk)
    rot = np.asarray(case.params["rotation"]).reshape(3, 3)
    return (lps - np.asarray(case.params["head_centre_lps"])) @ rot


def _run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ParotidOARLib", "phantom", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _file_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- structure of a case ---------------------------------------------------------------------


def test_case_fields_and_geometry(left_case):
    c = left_case
    assert c.ct.dtype == np.int16 and c.ct.shape == c.geometry.shape
    assert c.geometry.size == (160, 160, 60)
    assert c.geometry.spacing == pytest.approx(phantom.DEFAULT_SPACING)
    assert np.allclose(c.geometry.direction_matrix, np.eye(3))
    assert not np.allclose(c.geometry.origin, 0)  # a real origin
    assert set(c.labels) == set(L.STRUCTURES) == set(c.labels_full)
    for name in L.STRUCTURES:
        assert c.labels[name].dtype == bool and c.labels[name].shape == c.ct.shape
    assert c.roi.dtype == bool and c.side == "left"
    json.dumps(c.params)  # JSON-able
    assert c.params["side"] == "left" and c.params["spacing"] == list(phantom.DEFAULT_SPACING)


def test_every_label_is_non_empty(cases):
    for c in cases:
        for name in L.STRUCTURES:
            assert c.labels_full[name].any(), f"seed {c.seed}: {name} empty"
            assert c.labels[name].any(), f"seed {c.seed}: {name} empty inside the ROI"


def test_parotid_volume_is_plausible(cases):
    for c in cases:
        cc = c.labels[L.PAROTID].sum() * c.geometry.voxel_volume_cc
        assert 2.0 < cc < 45.0, f"seed {c.seed}: residual parotid {cc:.1f} cc"


# --- ROI and clipping ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["left", "right"])
def test_roi_is_the_exact_17mm_expansion(which, left_case, right_case):
    c = left_case if which == "left" else right_case
    parotid = c.labels_full[L.PAROTID]
    brute = ndimage.distance_transform_edt(~parotid, sampling=c.geometry.spacing_zyx) <= 17.0
    assert np.array_equal(c.roi, brute)
    assert not np.any(parotid & ~c.roi)
    assert np.array_equal(c.labels[L.PAROTID], parotid)
    assert c.roi_name == L.ROI == "ROI (parotid + 17 mm)"


def test_oars_are_clipped_to_roi(cases):
    for c in cases:
        for name in OARS:
            assert np.array_equal(c.labels[name], c.labels_full[name] & c.roi), name
        # clipping really removes something (the skin rind extends far beyond 17 mm)
        assert c.labels_full[L.SKIN].sum() > c.labels[L.SKIN].sum()


# --- anatomy ---------------------------------------------------------------------------------


def test_anatomical_relations(cases):
    for c in cases:
        mid = c.params["head_centre_lps"][0]
        cen = {n: _centroid_lps(c, c.labels_full[n]) for n in L.STRUCTURES}
        lat = {n: abs(cen[n][0] - mid) for n in cen}  # LPS: lateral = further from the midline in x
        tag = f"seed {c.seed} ({c.side})"
        # condyle sits above the ramus (LPS +z superior)
        assert cen[L.CONDYLE][2] > cen[L.RAMUS][2] + 10, tag
        # the canal lies between the auricle (most lateral) and the mastoid (medial and posterior)
        assert lat[L.AURICULA] > lat[L.EAC] > lat[L.MASTOID], tag
        assert cen[L.MASTOID][1] > cen[L.EAC][1], tag  # LPS +y posterior
        assert cen[L.MASTOID][2] < cen[L.EAC][2], tag  # and below
        # the parotid is lateral and posterior to the ramus, below the canal
        assert lat[L.PAROTID] > lat[L.RAMUS], tag
        assert cen[L.PAROTID][1] > cen[L.RAMUS][1], tag
        assert cen[L.PAROTID][2] < cen[L.EAC][2], tag
        # the condyle is just in front of the canal
        assert cen[L.CONDYLE][1] < cen[L.EAC][1], tag
        assert np.linalg.norm(cen[L.CONDYLE] - cen[L.EAC]) < 35, tag


def test_auricle_reaches_into_the_roi(cases):
    """Issue #13: the parotid's upper pole lies just below the canal, in front of and below the
    auricle, so the 17 mm ROI takes in the concha / tragus / lobule region (>= 2 cc in 47 of 50
    held-out seeds, Testing/benchmarks/phantom_roi_volumes.py); the concha cups the canal opening."""
    for c in cases:
        vcc = c.geometry.voxel_volume_cc
        tag = f"seed {c.seed} ({c.side})"
        assert c.labels[L.AURICULA].sum() * vcc >= 1.5, tag
        # part of the auricle (the concha) lies lateral to the canal opening, at its level
        ear = _patient_coords(c, c.labels_full[L.AURICULA])
        eac = _patient_coords(c, c.labels_full[L.EAC])
        lateral = np.abs(ear[:, 0]) > np.abs(eac[:, 0]).max()
        near = lateral & (np.abs(ear[:, 1]) < 12) & (np.abs(ear[:, 2]) < 12)
        assert near.sum() * vcc > 0.5, tag


def test_structures_do_not_overlap(cases):
    for c in cases:
        names = list(L.STRUCTURES)
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                both = c.labels_full[names[a]] & c.labels_full[names[b]]
                assert not both.any(), f"{names[a]} overlaps {names[b]} (seed {c.seed})"


@pytest.mark.parametrize("which", ["left", "right"])
def test_only_the_operated_side_is_labelled(which, left_case, right_case):
    c = left_case if which == "left" else right_case
    sign = 1 if which == "left" else -1  # LPS +x = patient left
    for name in L.STRUCTURES:
        x = _patient_coords(c, c.labels_full[name])[:, 0]
        assert np.all(x * sign > 0), f"{name} crosses to the other side"


def test_both_sides_exist_in_a_full_case():
    c = phantom.generate_case(5, side="right", size="full", noise_sigma=10.0, metal=False)
    assert c.geometry.size == (512, 512, 100)
    rot = np.asarray(c.params["rotation"]).reshape(3, 3)
    centre = np.asarray(c.params["head_centre_lps"])

    def hu_at_mirror(mask):
        p = _patient_coords(c, mask)
        p[:, 0] *= -1  # mirror into the non-operated side
        ijk = np.rint(c.geometry.lps_to_index(p @ rot.T + centre)).astype(int)
        return float(np.median(c.ct[ijk[:, 2], ijk[:, 1], ijk[:, 0]]))

    ct = c.ct
    assert np.median(ct[c.labels_full[L.EAC]]) < -600
    assert hu_at_mirror(c.labels_full[L.EAC]) < -600  # the other canal is air too
    assert hu_at_mirror(c.labels_full[L.RAMUS]) > 300  # and the other ramus bone
    assert hu_at_mirror(c.labels_full[L.MASTOID]) > 200
    assert -60 < hu_at_mirror(c.labels_full[L.PAROTID]) < 60  # an intact gland (no label)
    # all labels on the operated (right, LPS -x) side only
    for name in L.STRUCTURES:
        assert np.all(_patient_coords(c, c.labels_full[name])[:, 0] < 0)


def test_hu_ranges_per_tissue(cases):
    for c in cases:
        hu = c.params["hu"]
        off = c.params["hu_offset"]
        ct = c.ct.astype(np.float32)
        med = {n: float(np.median(ct[c.labels_full[n]])) for n in L.STRUCTURES}
        tag = f"seed {c.seed}"
        assert -30 <= hu["parotid"] <= 30
        assert abs(med[L.PAROTID] - (hu["parotid"] + off)) < 12, tag
        assert -300 < med[L.SKIN] - off < 80, tag  # a 3 mm rind against air: partial volume pulls it down
        assert med[L.EAC] < -600, tag
        assert med[L.RAMUS] > 250 and med[L.CONDYLE] > 250, tag
        assert med[L.MASTOID] > 200, tag
        assert -250 < med[L.AURICULA] < 200, tag
        # air outside the body
        corner = ct[:, :6, -6:] if c.side == "left" else ct[:, :6, :6]
        assert abs(np.median(corner) - (-1000 + off)) < 10, tag
        # noise sigma from the upper half (the lower tail is clipped at -1024 HU, as scanners do)
        sigma = np.percentile(corner, 84.13) - np.median(corner)
        assert sigma == pytest.approx(c.params["noise_sigma"], rel=0.2), tag
        # cortical bone: the brightest labelled bone voxels reach 700-1500 HU
        assert 700 <= np.percentile(ct[c.labels_full[L.RAMUS]], 90) - off <= 1500 + 3 * c.params["noise_sigma"]


def test_fat_and_soft_tissue_layers():
    c = phantom.generate_case(21, side="left", size="small", fat_mm=6.0, skin_mm=3.0, noise_sigma=15.0)
    ct = c.ct.astype(np.float32)
    body = ndimage.binary_fill_holes(ct > -500)
    depth = ndimage.distance_transform_edt(body, sampling=c.geometry.spacing_zyx)
    off = c.params["hu_offset"]
    fat = (depth > 4.5) & (depth < 7.5) & (ct < 300)
    assert -130 < np.median(ct[fat]) - off < -60
    deep = (depth > 20) & (ct < 200) & (ct > -300)
    assert 15 < np.median(ct[deep]) - off < 60
    rind = (depth > 0.6) & (depth < 2.2)
    assert 20 < np.median(ct[rind]) - off < 75


def test_resection_and_surgical_fill():
    base = phantom.generate_case(8, side="left", size="small", resection={"fraction": 0.0})
    cut = phantom.generate_case(8, side="left", size="small", resection={"fraction": 0.45, "fill": "fibrosis"})
    v0 = base.labels[L.PAROTID].sum()
    v1 = cut.labels[L.PAROTID].sum()
    assert v1 == pytest.approx(0.55 * v0, rel=0.05)
    assert not np.any(cut.labels[L.PAROTID] & ~base.labels[L.PAROTID])  # residual is part of the gland


def test_pose_moves_anatomy_through_the_sampling_geometry():
    a = phantom.generate_case(9, side="left", size="small", pose_deg=[0, 0, 0])
    b = phantom.generate_case(9, side="left", size="small", pose_deg=[0, 0, 10])
    assert np.allclose(b.geometry.direction_matrix, np.eye(3))  # the grid stays axis-aligned
    assert b.params["pose_deg"] == [0, 0, 10] and np.allclose(np.asarray(a.params["rotation"]), np.eye(3).ravel())
    # patient-frame anatomy is identical up to voxelisation; world positions differ
    pa = _patient_coords(a, a.labels_full[L.EAC]).mean(axis=0)
    pb = _patient_coords(b, b.labels_full[L.EAC]).mean(axis=0)
    assert np.linalg.norm(pa - pb) < 1.5
    wa, wb = _centroid_lps(a, a.labels_full[L.EAC]), _centroid_lps(b, b.labels_full[L.EAC])
    assert np.linalg.norm(wa - wb) > 5


def test_spacing_is_respected_and_anatomy_is_physical():
    a = phantom.generate_case(14, side="right", size="small")
    b = phantom.generate_case(14, side="right", size="small", spacing=(0.7, 0.8, 3.0))
    assert b.geometry.spacing == pytest.approx((0.7, 0.8, 3.0))
    assert b.geometry.size == (224, 196, 40)  # the small extent (156.8 x 156.8 x 120 mm)
    va = a.labels_full[L.PAROTID].sum() * a.geometry.voxel_volume_cc
    vb = b.labels_full[L.PAROTID].sum() * b.geometry.voxel_volume_cc
    assert vb == pytest.approx(va, rel=0.12)
    ca, cb = _centroid_lps(a, a.labels_full[L.RAMUS]), _centroid_lps(b, b.labels_full[L.RAMUS])
    assert np.linalg.norm(ca - cb) < 2.0


def test_metal_adds_streaks():
    a = phantom.generate_case(15, side="left", size="full", metal=False)
    b = phantom.generate_case(15, side="left", size="full", metal=True)
    assert a.ct.max() < 3071 <= b.ct.max()
    assert np.array_equal(a.labels_full[L.PAROTID], b.labels_full[L.PAROTID])


def test_bad_arguments():
    with pytest.raises(InputError, match="Spacing"):
        phantom.generate_case(1, spacing=(1, 0, 2))
    with pytest.raises(InputError, match="Spacing"):
        phantom.generate_case(1, spacing=(1, 2))
    with pytest.raises(InputError, match="Side"):
        phantom.generate_case(1, side="middle")
    with pytest.raises(InputError, match="Size"):
        phantom.generate_case(1, size="huge")
    with pytest.raises(InputError, match="Unknown phantom parameter"):
        phantom.generate_case(1, size="small", not_a_parameter=3)
    with pytest.raises(InputError, match="cases"):
        phantom.generate("unused", cases=0)


# --- files, determinism, CLI -----------------------------------------------------------------


def test_determinism_and_files(tmp_path):
    a = phantom.generate(tmp_path / "a", cases=1, seed=4, side="random", size="small")
    b = phantom.generate(tmp_path / "b", cases=1, seed=4, side="random", size="small")
    c = phantom.generate(tmp_path / "c", cases=1, seed=5, side="random", size="small")
    assert [p.name for p in a] == ["phantom-s4-000"]
    fa, fb, fc = _file_bytes(a[0]), _file_bytes(b[0]), _file_bytes(c[0])
    assert sorted(fa) == ["case.json", "ct.nrrd", "reference-full.seg.nrrd", "reference.seg.nrrd"]
    assert fa == fb  # byte-identical
    assert fa["ct.nrrd"] != fc["ct.nrrd"]
    for data in fa.values():  # no wall-clock time anywhere
        assert b"2026-" not in data[:4096] and b"2025-" not in data[:4096]
    # what was written is what generate_case returns
    case = phantom.generate_case(phantom.case_seed(4, 0), side="random", size="small")
    ct, geom = imageio.read_image(a[0] / "ct.nrrd")
    assert np.array_equal(ct, case.ct) and geom.same_grid(case.geometry)
    masks, sgeom, segments = segio.read_seg(a[0] / "reference.seg.nrrd")
    assert [s["name"] for s in segments] == list(L.STRUCTURES) + [L.ROI]
    assert sgeom.same_grid(geom)
    for name in L.STRUCTURES:
        assert np.array_equal(masks[name], case.labels[name]), name
    assert np.array_equal(masks[L.ROI], case.roi)
    full, _, _ = segio.read_seg(a[0] / "reference-full.seg.nrrd")
    for name in L.STRUCTURES:
        assert np.array_equal(full[name], case.labels_full[name]), name
    info = json.loads((a[0] / "case.json").read_text())
    assert info["seed"] == phantom.case_seed(4, 0) and info["side"] == case.side
    assert info["spacing"] == list(phantom.DEFAULT_SPACING) and info["synthetic"] is True
    assert "hu" in info["params"] and "pose_deg" in info["params"]


def test_no_overwrite_without_force(tmp_path):
    out = tmp_path / "out"
    (case_dir,) = phantom.generate(out, cases=1, seed=2, side="left", size="small")
    before = _file_bytes(case_dir)
    with pytest.raises(OutputExistsError, match="--force"):
        phantom.generate(out, cases=1, seed=2, side="right", size="small")
    assert _file_bytes(case_dir) == before
    # a refused multi-case run writes nothing at all
    with pytest.raises(OutputExistsError):
        phantom.generate(out, cases=2, seed=2, side="left", size="small")
    assert sorted(p.name for p in out.iterdir()) == ["phantom-s2-000"]
    phantom.generate(out, cases=1, seed=2, side="right", size="small", force=True)
    assert json.loads((case_dir / "case.json").read_text())["side"] == "right"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_cli_writes_cases(tmp_path):
    r = _run_cli("--out", str(tmp_path), "--cases", "2", "--seed", "6", "--size", "small", "--side", "left",
                 "--spacing", "1.0,1.0,2.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Synthetic phantom data \u2013 research use only") == 1
    for i in range(2):
        ct, geom = imageio.read_image(tmp_path / f"phantom-s6-{i:03d}" / "ct.nrrd")
        assert geom.spacing == pytest.approx((1.0, 1.0, 2.5))
        assert json.loads((tmp_path / f"phantom-s6-{i:03d}" / "case.json").read_text())["side"] == "left"
    before = _file_bytes(tmp_path / "phantom-s6-000")
    r = _run_cli("--out", str(tmp_path), "--cases", "1", "--seed", "6", "--size", "small")
    assert r.returncode != 0 and "already exist" in r.stderr and "--force" in r.stderr
    assert _file_bytes(tmp_path / "phantom-s6-000") == before


@pytest.mark.parametrize("args, message", [
    (["--cases", "0"], "--cases must be at least 1"),
    (["--cases", "-3"], "--cases must be at least 1"),
    (["--spacing", "1,2"], "three positive numbers"),
    (["--spacing", "1,0,2"], "three positive numbers"),
    (["--spacing", "a,b,c"], "three positive numbers"),
    (["--side", "middle"], "invalid choice"),
])
def test_cli_bad_input(tmp_path, args, message):
    r = _run_cli("--out", str(tmp_path / "out"), "--size", "small", *args)
    assert r.returncode != 0
    assert message in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_unwritable_out(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = _run_cli("--out", str(blocker / "sub"), "--size", "small")
    assert r.returncode != 0 and "Choose a writable location" in r.stderr
    r = _run_cli("--out", str(blocker), "--size", "small")
    assert r.returncode != 0 and "not a folder" in r.stderr
    assert blocker.read_text() == "not a folder"


# --- make demo ---------------------------------------------------------------------------------


def _run_demo(out, models_root, *extra, timeout=300):
    import os

    env = dict(os.environ, PAROTIDOAR_MODELS=str(models_root))
    return subprocess.run([sys.executable, "-m", "ParotidOARLib", "demo", "--out", str(out), "--size", "small",
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_demo_without_a_model(tmp_path):
    from ParotidOARLib import bundle

    if (REPO / "Resources" / "Models" / bundle.DEFAULT_BUNDLE_NAME / bundle.MANIFEST).is_file():
        pytest.skip("a default model bundle ships with the repository")
    out = tmp_path / "demo-output"
    r = _run_demo(out, tmp_path / "no-models")
    assert r.returncode == 0, r.stderr
    case_dir = out / "phantom-demo-left-small"
    assert sorted(p.name for p in case_dir.iterdir()) == [
        "case.json", "ct.nrrd", "reference-full.seg.nrrd", "reference.seg.nrrd"]
    assert "No segmentation model is installed yet" in r.stdout
    assert "not for clinical use" in r.stdout
    assert f"Slicer {case_dir / 'ct.nrrd'} {case_dir / 'reference.seg.nrrd'}" in r.stdout
    first = _file_bytes(case_dir)
    (out / "keep-me.txt").write_text("user file")
    r = _run_demo(out, tmp_path / "no-models")  # refreshes its own case folder only
    assert r.returncode == 0, r.stderr
    assert _file_bytes(case_dir) == first and (out / "keep-me.txt").read_text() == "user file"


@pytest.mark.slow
def test_demo_with_a_model_segments_and_scores(tmp_path, tiny_bundle):
    import shutil

    from ParotidOARLib import bundle

    models = tmp_path / "models"
    shutil.copytree(tiny_bundle, models / bundle.DEFAULT_BUNDLE_NAME)
    out = tmp_path / "demo-output"
    r = _run_demo(out, models, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    case_dir = out / "phantom-demo-left-small"
    assert (case_dir / "segmentation.seg.nrrd").is_file()
    assert "DSC" in r.stdout and "Cascade finished in" in r.stdout
    for name in L.STRUCTURES:
        assert name in r.stdout
    masks, geom, _ = segio.read_seg(case_dir / "segmentation.seg.nrrd")
    _, ct_geom = imageio.read_image(case_dir / "ct.nrrd")
    assert geom.same_grid(ct_geom)
