"""Metrics: surfel table, analytic shapes, DeepMind reference, real expert masks, cohort stats, CLIs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA, REPO
from ParotidOARLib import metrics
from ParotidOARLib.errors import GeometryError, InputError
from ParotidOARLib.imageio import Geometry, read_image, write_image

TCIA = DATA / "tcia-hn-masks"
SPACING = (2.5, 0.7, 0.9)  # numpy (z, y, x) order, deliberately anisotropic


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "ParotidOARLib", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


# --------------------------------------------------------------------------------------------- surfel table

def test_surfel_table_matches_vtk_marching_cubes():
    pytest.importorskip("vtk")
    fresh = metrics.build_surfel_table_vtk()
    assert np.array_equal(np.rint(fresh * 8), np.rint(metrics.surfel_vectors() * 8))


def test_surfel_areas_analytic():
    s0, s1, s2 = SPACING
    areas = metrics.surfel_area_table(SPACING)
    assert areas[0] == 0 and areas[255] == 0
    # one inside corner: triangle through the three half-edge points
    corner = 0.5 * math.sqrt((s1 * s2 / 4) ** 2 + (s0 * s2 / 4) ** 2 + (s0 * s1 / 4) ** 2)
    for bit in range(8):
        assert areas[1 << bit] == pytest.approx(corner, rel=1e-12)
    # the four corners with a0 = 0 inside: a flat square of one voxel face normal to axis 0
    face0 = sum(1 << (2 * a1 + a2) for a1 in (0, 1) for a2 in (0, 1))
    assert areas[face0] == pytest.approx(s1 * s2, rel=1e-12)
    face2 = sum(1 << (4 * a0 + 2 * a1) for a0 in (0, 1) for a1 in (0, 1))
    assert areas[face2] == pytest.approx(s0 * s1, rel=1e-12)
    # complement symmetry: the surface between in and out does not depend on which side is "in"
    assert np.allclose(areas, areas[255 - np.arange(256)])


# --------------------------------------------------------------------------------------------- analytic shapes

@pytest.mark.parametrize("axis,voxels", [(2, 5), (1, 3), (0, 1)])
def test_offset_boxes_anisotropic(axis, voxels):
    shape = (16, 50, 50)
    lo, hi = np.array([4, 10, 12]), np.array([12, 40, 37])  # 8 x 30 x 25 voxels = 20 x 21 x 22.5 mm
    a = box(shape, lo, hi)
    shift = np.zeros(3, int)
    shift[axis] = voxels
    b = box(shape, lo + shift, hi + shift)
    delta = voxels * SPACING[axis]
    length = (hi - lo)[axis]
    r = metrics.compare(b, a, SPACING, tolerance_mm=delta)
    frac = (length - voxels) / length
    assert r["dsc"] == pytest.approx(frac)
    assert r["jaccard"] == pytest.approx((length - voxels) / (length + voxels))
    assert r["precision"] == pytest.approx(frac) and r["recall"] == pytest.approx(frac)
    vol = 8 * 30 * 25 * np.prod(SPACING) / 1000
    assert r["volume_pred_cc"] == pytest.approx(vol) and r["volume_ref_cc"] == pytest.approx(vol)
    assert r["volume_diff_cc"] == pytest.approx(0, abs=1e-12)
    # the far faces are exactly delta apart and hold far more than 5 % of the surface area
    assert r["hd_max_mm"] == pytest.approx(delta)
    assert r["hd95_mm"] == pytest.approx(delta)
    # translation symmetry: both directed mean distances are equal
    assert r["msd_pred_to_ref_mm"] == pytest.approx(r["msd_ref_to_pred_mm"], rel=1e-9)
    assert 0 < r["msd_pred_to_ref_mm"] < delta
    assert r["surface_dsc"] == pytest.approx(1.0)
    below = metrics.compare(b, a, SPACING, tolerance_mm=delta * 0.99)["surface_dsc"]
    assert 0.3 < below < 1.0
    assert r["flags"] == []


def _ball(shape, spacing, centre_mm, radius_mm):
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return (z - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (x - centre_mm[2]) ** 2 <= radius_mm ** 2


def test_spheres_against_analytic_values():
    spacing = (1.0, 0.8, 0.8)
    shape = (40, 50, 50)
    R, d = 12.0, 3.0
    c = np.array([20.0, 20.0, 20.0])
    a = _ball(shape, spacing, c, R)
    b = _ball(shape, spacing, c + [0, 0, d], R)
    r = metrics.compare(b, a, spacing, 1.0)
    overlap = math.pi * (4 * R + d) * (2 * R - d) ** 2 / 12  # lens volume of two spheres
    volume = 4 / 3 * math.pi * R ** 3
    assert r["dsc"] == pytest.approx(overlap / volume, abs=0.01)
    assert r["volume_ref_cc"] == pytest.approx(volume / 1000, rel=0.01)
    # marching cubes on a binary raster over-estimates a sphere's area by a few percent, never less
    assert 1.0 < r["surface_area_ref_mm2"] / (4 * math.pi * R ** 2) < 1.15
    assert r["hd_max_mm"] == pytest.approx(d, abs=0.8)
    # concentric spheres 2 mm apart: every distance is about 2 mm
    outer = _ball(shape, spacing, c, R + 2)
    r = metrics.compare(outer, a, spacing, 1.0)
    assert 1.5 <= r["hd95_mm"] <= 2.8
    assert r["msd_pred_to_ref_mm"] == pytest.approx(2.0, abs=0.5)
    assert r["msd_ref_to_pred_mm"] == pytest.approx(2.0, abs=0.5)
    assert r["surface_dsc"] < 0.1  # tolerance 1 mm < 2 mm gap
    assert metrics.compare(outer, a, spacing, 3.0)["surface_dsc"] == pytest.approx(1.0)


def test_identical_masks_and_crop_invariance():
    rng = np.random.default_rng(3)
    from scipy import ndimage

    blob = ndimage.gaussian_filter(rng.random((20, 24, 22)), 2) > 0.5
    other = ndimage.binary_dilation(blob, iterations=1)
    same = metrics.compare(blob, blob, SPACING)
    assert same["dsc"] == 1 and same["hd95_mm"] == 0 and same["surface_dsc"] == 1 and same["hd_max_mm"] == 0
    small = metrics.compare(other, blob, SPACING)
    # the same pair placed in a big grid, and touching the grid border, gives identical numbers
    for offset in [(30, 40, 50), (0, 0, 0)]:
        big_a = np.zeros((60, 90, 100), np.uint8)
        big_b = np.zeros((60, 90, 100), np.uint8)
        sl = tuple(slice(o, o + n) for o, n in zip(offset, blob.shape))
        big_a[sl] = blob
        big_b[sl] = other
        big = metrics.compare(big_b, big_a, SPACING)
        for k in metrics.METRIC_KEYS:
            assert big[k] == pytest.approx(small[k], rel=1e-12), k


def test_distances_equal_an_edt_of_the_other_surface():
    from scipy import ndimage

    rng = np.random.default_rng(9)
    ref = ndimage.gaussian_filter(rng.random((18, 30, 26)), 2.5) > 0.5
    pred = ndimage.gaussian_filter(rng.random((18, 30, 26)), 2.5) > 0.5
    sd = metrics.surface_distances(pred, ref, SPACING)
    # independent route: corner codes on the full grid padded by one voxel, scipy EDT of each border
    codes = {}
    for key, m in (("p", pred), ("r", ref)):
        c = metrics.neighbour_codes(np.pad(m.astype(np.uint8), 1))
        codes[key] = c, (c != 0) & (c != 255)
    edt_to_r = ndimage.distance_transform_edt(~codes["r"][1], sampling=SPACING)
    edt_to_p = ndimage.distance_transform_edt(~codes["p"][1], sampling=SPACING)
    assert np.allclose(sd.pred_to_ref, np.sort(edt_to_r[codes["p"][1]]), atol=1e-9)
    assert np.allclose(sd.ref_to_pred, np.sort(edt_to_p[codes["r"][1]]), atol=1e-9)
    areas = metrics.surfel_area_table(SPACING)
    assert sd.area_pred.sum() == pytest.approx(areas[codes["p"][0][codes["p"][1]]].sum(), rel=1e-12)


def test_empty_masks_conventions():
    shape = (10, 12, 14)
    empty = np.zeros(shape, bool)
    full = box(shape, (2, 2, 2), (6, 8, 9))
    both = metrics.compare(empty, empty, SPACING)
    assert both["dsc"] == 1 and both["jaccard"] == 1 and both["surface_dsc"] == 1
    assert set(both["flags"]) == {"pred_empty", "ref_empty"}
    assert math.isnan(both["hd95_mm"]) and math.isnan(both["msd_pred_to_ref_mm"])
    p = metrics.compare(empty, full, SPACING)
    assert p["flags"] == ["pred_empty"] and p["dsc"] == 0 and p["recall"] == 0 and math.isnan(p["precision"])
    assert p["surface_dsc"] == 0 and math.isnan(p["hd95_mm"]) and math.isnan(p["hd_max_mm"])
    r = metrics.compare(full, empty, SPACING)
    assert r["flags"] == ["ref_empty"] and r["precision"] == 0 and math.isnan(r["recall"])
    assert json.loads(json.dumps(metrics.jsonable(p)))["hd95_mm"] is None


def test_bad_inputs():
    a = np.zeros((5, 5, 5), bool)
    with pytest.raises(GeometryError):
        metrics.compare(a, np.zeros((5, 5, 6), bool), SPACING)
    with pytest.raises(GeometryError):
        metrics.compare(a, a, (1, 0, 1))
    with pytest.raises(InputError):
        metrics.compare(a, a, SPACING, tolerance_mm=-1)


# --------------------------------------------------------------------------------------------- independent reference

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the 0.1 wheel imports scipy's old namespaces
def test_matches_deepmind_surface_distance_package():
    sd = pytest.importorskip("surface_distance", reason="optional reference: pip install surface-distance")
    from scipy import ndimage

    rng = np.random.default_rng(7)
    for _ in range(3):
        ref = ndimage.gaussian_filter(rng.random((30, 40, 36)), 3) > 0.5
        pred = ndimage.gaussian_filter(rng.random((30, 40, 36)), 3) > 0.5
        spacing = tuple(rng.uniform(0.4, 3.0, 3))
        d = sd.compute_surface_distances(ref, pred, spacing)  # (gt, pred)
        ours = metrics.compare(pred, ref, spacing, tolerance_mm=1.5)
        assert ours["hd95_mm"] == pytest.approx(sd.compute_robust_hausdorff(d, 95), abs=1e-9)
        assert ours["hd_max_mm"] == pytest.approx(sd.compute_robust_hausdorff(d, 100), abs=1e-9)
        assert ours["surface_dsc"] == pytest.approx(sd.compute_surface_dice_at_tolerance(d, 1.5), abs=1e-12)
        gt_to_pred, pred_to_gt = sd.compute_average_surface_distance(d)
        assert ours["msd_ref_to_pred_mm"] == pytest.approx(gt_to_pred, abs=1e-9)
        assert ours["msd_pred_to_ref_mm"] == pytest.approx(pred_to_gt, abs=1e-9)
        assert ours["surface_area_ref_mm2"] == pytest.approx(d["surfel_areas_gt"].sum(), rel=1e-12)
    # and on a real expert pair
    onc, g = read_image(TCIA / "oncologist" / "0522c0057" / "Parotid-Rt.nrrd")
    rad, _ = read_image(TCIA / "radiographer" / "0522c0057" / "Parotid-Rt.nrrd")
    d = sd.compute_surface_distances(onc.astype(bool), rad.astype(bool), g.spacing_zyx)
    ours = metrics.compare(rad, onc, g.spacing_zyx, 2.85)
    assert ours["hd95_mm"] == pytest.approx(sd.compute_robust_hausdorff(d, 95), abs=1e-9)
    assert ours["surface_dsc"] == pytest.approx(sd.compute_surface_dice_at_tolerance(d, 2.85), abs=1e-12)


# --------------------------------------------------------------------------------------------- real expert masks

def _tcia_pair(case, organ, root=TCIA):
    onc, g = read_image(root / "oncologist" / case / f"{organ}.nrrd")
    rad, g2 = read_image(root / "radiographer" / case / f"{organ}.nrrd")
    assert g.same_grid(g2)
    return rad, onc, g


@pytest.mark.parametrize("case", ["0522c0017", "0522c0057", "TCGA-CV-7236"])
def test_tcia_inter_observer(case):
    out = {}
    for organ in ("Parotid-Lt", "Parotid-Rt", "Mandible"):
        rad, onc, g = _tcia_pair(case, organ)
        r = metrics.compare(rad, onc, g.spacing_zyx, metrics.default_tolerance(organ))
        out[organ] = r
        print(f"{case} {organ}: DSC {r['dsc']:.3f} HD95 {r['hd95_mm']:.2f} mm sDSC@{r['tolerance_mm']} "
              f"{r['surface_dsc']:.3f} V {r['volume_ref_cc']:.1f} cc")
        assert r["flags"] == []
        assert r["hd95_mm"] <= r["hd_max_mm"]
        assert 0 < r["jaccard"] < r["dsc"]
    for side in ("Parotid-Lt", "Parotid-Rt"):
        assert 0.65 <= out[side]["dsc"] <= 0.95
        assert 10 < out[side]["volume_ref_cc"] < 80  # adult parotid volumes
    assert 0.85 <= out["Mandible"]["dsc"] <= 0.99
    assert out["Mandible"]["tolerance_mm"] == 1.01 and out["Parotid-Lt"]["tolerance_mm"] == 2.85


@pytest.mark.shared
@pytest.mark.slow
def test_tcia_all_cases_inter_observer(shared_data):
    root = shared_data / "tcia-hn-masks"
    cases = sorted(p.name for p in (root / "oncologist").iterdir() if p.is_dir())
    dsc = {"Parotid": [], "Mandible": []}
    for case in cases:
        for organ in ("Parotid-Lt", "Parotid-Rt", "Mandible"):
            if not (root / "radiographer" / case / f"{organ}.nrrd").exists():
                continue
            rad, onc, g = _tcia_pair(case, organ, root)
            dsc["Mandible" if organ == "Mandible" else "Parotid"].append(metrics.compare(rad, onc, g.spacing_zyx)["dsc"])
    par, man = np.mean(dsc["Parotid"]), np.mean(dsc["Mandible"])
    print(f"{len(cases)} cases: parotid DSC {par:.3f} ± {np.std(dsc['Parotid'], ddof=1):.3f} "
          f"(n={len(dsc['Parotid'])}), mandible DSC {man:.3f} ± {np.std(dsc['Mandible'], ddof=1):.3f}")
    assert len(cases) >= 20
    assert 0.79 <= par <= 0.90
    assert 0.90 <= man <= 0.98


# --------------------------------------------------------------------------------------------- multi-segment, tolerances

def test_default_tolerances():
    assert metrics.default_tolerance("Parotid") == 2.85
    assert metrics.default_tolerance("Parotid-Lt") == 2.85
    assert metrics.default_tolerance("parotid_r") == 2.85
    assert metrics.default_tolerance("Mandible") == 1.01
    assert metrics.default_tolerance("Mandibular ramus") == 1.01
    assert metrics.default_tolerance("Condyle process") == 1.01
    assert metrics.default_tolerance("Skin") == 2.0
    assert metrics.default_tolerance("Something else") == 2.0
    assert metrics.resolve_tolerance("Skin", {"Skin": 1.5}) == 1.5
    assert metrics.resolve_tolerance("Skin", {"*": 3.0}) == 3.0
    assert metrics.parse_tolerance_args(["Parotid=2.5", "1.2"]) == {"Parotid": 2.5, "*": 1.2}
    with pytest.raises(InputError):
        metrics.parse_tolerance_args(["Parotid=abc"])


def test_compare_segmentations_names_and_notes():
    g = Geometry((20, 18, 10), (0.9, 0.7, 2.5))
    a = box(g.shape, (2, 2, 2), (6, 10, 12))
    b = box(g.shape, (2, 3, 2), (6, 11, 12))
    res = metrics.compare_segmentations({"Parotid": b, "Skin": a, "Extra": a}, {"Parotid": a, "Skin": a,
                                                                               "Mastoid process": a}, g)
    assert list(res["segments"]) == ["Parotid", "Skin"]
    assert res["spacing_mm"] == [0.9, 0.7, 2.5]
    assert res["segments"]["Parotid"]["tolerance_mm"] == 2.85
    assert res["segments"]["Skin"]["dsc"] == 1.0
    assert any("Mastoid process" in n for n in res["notes"]) and any("Extra" in n for n in res["notes"])
    for key in metrics.METRIC_KEYS:
        assert key in res["segments"]["Parotid"]
    roi = "ROI (parotid + 17 mm)"
    res = metrics.compare_segmentations({"Parotid": b, roi: a}, {"Parotid": a, roi: a}, g)
    assert list(res["segments"]) == ["Parotid"] and any("ROI" in n for n in res["notes"])
    assert list(metrics.compare_segmentations({roi: a}, {roi: a}, g, names=[roi])["segments"]) == [roi]
    res = metrics.compare_segmentations({"Parotid": b}, {"Parotid": a, "Skin": a}, g, names=["Skin"],
                                        tolerances={"Skin": 0.5})
    assert res["segments"]["Skin"]["flags"] == ["pred_empty"] and res["segments"]["Skin"]["tolerance_mm"] == 0.5
    with pytest.raises(InputError):
        metrics.compare_segmentations({"A": a}, {"B": a}, g)


# --------------------------------------------------------------------------------------------- cohort statistics

def test_summarise_cohort_and_paired_tests():
    from scipy import stats

    rng = np.random.default_rng(11)
    rows = []
    a_vals = rng.normal(0.85, 0.03, 25)
    b_vals = a_vals - rng.normal(0.02, 0.01, 25)
    for i in range(25):
        rows.append({"case": f"c{i}", "method": "A", "segment": "Parotid", "dsc": a_vals[i], "hd95_mm": 3.0})
        rows.append({"case": f"c{i}", "method": "B", "segment": "Parotid", "dsc": b_vals[i], "hd95_mm": None})
    summ = metrics.summarise_cohort(rows, metrics=("dsc", "hd95_mm"))
    st = summ["methods"]["A"]["segments"]["Parotid"]["dsc"]
    assert st["n"] == 25 and st["mean"] == pytest.approx(a_vals.mean()) and st["sd"] == pytest.approx(a_vals.std(ddof=1))
    assert summ["methods"]["B"]["segments"]["Parotid"]["hd95_mm"]["n"] == 0
    t = metrics.paired_test(a_vals, b_vals)
    assert t["test"] == "paired t-test" and t["normal"] is True
    assert t["p_value"] == pytest.approx(stats.ttest_rel(a_vals, b_vals).pvalue)
    assert t["significant"] is True
    # strongly non-normal differences (a few huge outliers) → Wilcoxon
    d = np.r_[np.full(20, 0.01) + rng.normal(0, 1e-3, 20), [0.5, 0.6, 0.7, 0.8, 0.9]]
    w = metrics.paired_test(b_vals + d, b_vals)
    assert w["test"] == "wilcoxon signed-rank" and w["normal"] is False
    assert w["p_value"] == pytest.approx(stats.wilcoxon(b_vals + d, b_vals).pvalue)
    assert metrics.paired_test([1, 2], [1, 3])["test"] is None
    comp = metrics.compare_methods(rows, "A", "B", metrics=("dsc",))
    assert comp["segments"]["Parotid"]["dsc"]["n"] == 25


# --------------------------------------------------------------------------------------------- CLIs

def test_evaluate_cli_seg_nrrd(tmp_path):
    from ParotidOARLib import segio

    g = Geometry((30, 28, 12), (0.9, 0.7, 2.5), (10.0, -20.0, 5.0))
    ref = {"Parotid": box(g.shape, (2, 5, 5), (9, 20, 22)), "Skin": box(g.shape, (1, 1, 1), (11, 27, 29))}
    pred = {"Parotid": box(g.shape, (2, 5, 7), (9, 20, 24)), "Skin": ref["Skin"]}
    segio.write_seg(tmp_path / "ref.seg.nrrd", ref, g)
    segio.write_seg(tmp_path / "pred.seg.nrrd", pred, g)
    out = tmp_path / "m.json"
    p = run_cli("evaluate", "--pred", tmp_path / "pred.seg.nrrd", "--ref", tmp_path / "ref.seg.nrrd",
                "--json", out, "--csv", tmp_path / "m.csv", "--tolerance-mm", "Skin=1.5")
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert set(res) >= {"segments", "spacing_mm", "notes"}
    assert res["spacing_mm"] == [0.9, 0.7, 2.5]
    par = res["segments"]["Parotid"]
    assert par["dsc"] == pytest.approx(2 * 15 / 34)  # 17 columns each, shifted by 2
    assert par["hd95_mm"] == pytest.approx(1.8) and par["tolerance_mm"] == 2.85
    assert res["segments"]["Skin"]["tolerance_mm"] == 1.5 and res["segments"]["Skin"]["dsc"] == 1.0
    assert "Parotid" in p.stdout and (tmp_path / "m.csv").read_text().startswith("segment,dsc,")
    # refuses to overwrite, then --force
    p = run_cli("evaluate", "--pred", tmp_path / "pred.seg.nrrd", "--ref", tmp_path / "ref.seg.nrrd", "--json", out)
    assert p.returncode != 0 and "already exists" in p.stderr
    p = run_cli("evaluate", "--pred", tmp_path / "pred.seg.nrrd", "--ref", tmp_path / "ref.seg.nrrd", "--json", out,
                "--force", "--segments", "Skin", "--quiet")
    assert p.returncode == 0 and list(json.loads(out.read_text())["segments"]) == ["Skin"]


def test_evaluate_cli_labelmap_and_masks_on_other_grid(tmp_path):
    g = Geometry((40, 40, 20), (0.5, 0.5, 1.0), (0.0, 0.0, 0.0))
    lab = np.zeros(g.shape, np.uint8)
    lab[5:15, 10:30, 10:30] = 1
    lab[5:15, 30:35, 10:30] = 2
    write_image(tmp_path / "ref.nrrd", lab, g)
    write_image(tmp_path / "pred.nrrd", lab, g)
    p = run_cli("evaluate", "--pred", tmp_path / "pred.nrrd", "--ref", tmp_path / "ref.nrrd", "--name-map",
                '{"1": "Parotid", "2": "Skin"}', "--json", tmp_path / "lab.json")
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "lab.json").read_text())
    assert res["segments"]["Parotid"]["dsc"] == 1.0 and res["segments"]["Skin"]["dsc"] == 1.0
    # without a name map a multi-label image is refused with advice
    p = run_cli("evaluate", "--pred", tmp_path / "pred.nrrd", "--ref", tmp_path / "ref.nrrd", "--json",
                tmp_path / "x.json")
    assert p.returncode == 2 and "--name-map" in p.stderr and not (tmp_path / "x.json").exists()
    # single binary masks, the prediction on a coarser grid covering the same physical box
    write_image(tmp_path / "gland.nii.gz", (lab == 1).astype(np.uint8), g)
    coarse = Geometry((20, 20, 10), (1.0, 1.0, 2.0), (0.25, 0.25, 0.5))
    zz, yy, xx = np.meshgrid(np.arange(10) * 2 + 0.5, np.arange(20) + 0.25, np.arange(20) + 0.25, indexing="ij")
    pm = ((zz >= 4.5) & (zz < 14.5) & (yy >= 4.75) & (yy < 14.75) & (xx >= 4.75) & (xx < 14.75)).astype(np.uint8)
    write_image(tmp_path / "auto.nrrd", pm, coarse)
    p = run_cli("evaluate", "--pred", tmp_path / "auto.nrrd", "--ref", tmp_path / "gland.nii.gz", "--json",
                tmp_path / "m.json", "--name", "Parotid")
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "m.json").read_text())
    assert any("resampled" in n for n in res["notes"])
    assert res["segments"]["Parotid"]["dsc"] > 0.85


def test_evaluate_refuses_a_prediction_off_the_reference_grid(tmp_path, capsys):
    """Issue #15 fault 2: a prediction from another case (grids that do not overlap, or a structure that
    falls outside the reference grid) is an error, not DSC 0 and 'pred empty' with exit 0."""
    from ParotidOARLib.__main__ import main

    g = Geometry((40, 40, 20), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    gland = box(g.shape, (5, 10, 10), (15, 30, 30))
    write_image(tmp_path / "ref.nrrd", gland.astype(np.uint8), g)
    far = Geometry(g.size, g.spacing, (300.0, 0.0, 0.0))  # another scan, 300 mm away
    write_image(tmp_path / "far.nrrd", gland.astype(np.uint8), far)
    half = Geometry((80, 40, 20), g.spacing, (-40.0, 0.0, 0.0))  # overlaps, but the gland lies outside
    write_image(tmp_path / "half.nrrd", box(half.shape, (5, 10, 5), (15, 30, 25)).astype(np.uint8), half)
    for pred, message in (("far.nrrd", "do not overlap"), ("half.nrrd", "outside the grid")):
        out = tmp_path / f"{pred}.json"
        rc = main(["evaluate", "--pred", str(tmp_path / pred), "--ref", str(tmp_path / "ref.nrrd"),
                   "--json", str(out), "--name", "Parotid"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, err
        assert not out.exists()
    # the same prediction on an overlapping grid is still compared (resampled)
    write_image(tmp_path / "near.nrrd", box(half.shape, (5, 10, 50), (15, 30, 70)).astype(np.uint8), half)
    rc = main(["evaluate", "--pred", str(tmp_path / "near.nrrd"), "--ref", str(tmp_path / "ref.nrrd"),
               "--json", str(tmp_path / "near.json"), "--name", "Parotid", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "near.json").read_text())["segments"]["Parotid"]["dsc"] == pytest.approx(1.0)


def test_evaluate_cohort_cli_dir_two_methods(tmp_path):
    from ParotidOARLib import segio

    g = Geometry((24, 24, 10), (1.0, 1.0, 2.0))
    rng = np.random.default_rng(5)
    for i in range(6):
        case = tmp_path / "cohort" / f"case{i}"
        case.mkdir(parents=True)
        ref = box(g.shape, (2, 4, 4), (8, 18, 18))
        segio.write_seg(case / "reference.seg.nrrd", {"Parotid": ref}, g)
        s = int(rng.integers(0, 2))
        segio.write_seg(case / "pred.seg.nrrd", {"Parotid": box(g.shape, (2, 4 + s, 4), (8, 18 + s, 18))}, g)
        segio.write_seg(case / "base.seg.nrrd", {"Parotid": box(g.shape, (2, 7, 4), (8, 21, 18))}, g)
    (tmp_path / "cohort" / "empty-case").mkdir()
    p = run_cli("evaluate-cohort", tmp_path / "cohort", "--compare-pred2", "base.seg.nrrd", "--json",
                tmp_path / "c.json", "--csv", tmp_path / "c.csv", "--summary-csv", tmp_path / "s.csv")
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["methods"] == ["pred", "base"] and res["n_cases"] == 6
    assert len(res["cases"]) == 12
    assert res["summary"]["methods"]["base"]["segments"]["Parotid"]["dsc"]["mean"] == pytest.approx(22 / 28)
    comp = res["comparison"]["segments"]["Parotid"]["dsc"]
    assert comp["n"] == 6 and comp["test"] in ("paired t-test", "wilcoxon signed-rank") and comp["mean_diff"] > 0
    assert any("empty-case" in n for n in res["notes"])
    assert "Parotid" in p.stdout and "±" in p.stdout
    assert (tmp_path / "s.csv").read_text().startswith("method,segment,metric")


def test_evaluate_cohort_cli_csv_on_tcia_masks(tmp_path):
    lines = ["case,pred,ref"]
    for case in ("0522c0017", "0522c0057", "TCGA-CV-7236"):
        for organ in ("Parotid-Lt", "Mandible"):
            lines.append(f"{case},{TCIA / 'radiographer' / case / organ}.nrrd,{TCIA / 'oncologist' / case / organ}.nrrd")
    (tmp_path / "cohort.csv").write_text("\n".join(lines) + "\n")
    p = run_cli("evaluate-cohort", tmp_path / "cohort.csv", "--json", tmp_path / "c.json")
    assert p.returncode == 0, p.stderr
    print(p.stdout)
    res = json.loads((tmp_path / "c.json").read_text())
    segs = res["summary"]["methods"][""]["segments"]
    assert segs["Parotid-Lt"]["dsc"]["n"] == 3 and 0.65 < segs["Parotid-Lt"]["dsc"]["mean"] < 0.95
    assert 0.85 < segs["Mandible"]["dsc"]["mean"] < 0.99
    assert "comparison" not in res
