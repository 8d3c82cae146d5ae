"""The 17 mm ROI: exact physical expansion, checked against independent computations.

* the whole-grid brute-force EDT (``distance_transform_edt(~mask, sampling=spacing)``)
  on a real 512×512×156 parotid mask — identical voxels;
* an independent exact nearest-neighbour distance in LPS mm (KD-tree over the parotid
  voxel centres, via the geometry's index→LPS map) on every real mask in
  ``Testing/Data/tcia-hn-masks`` (and ``../shared/data`` when present), and on a
  rotated, anisotropic grid.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from conftest import DATA
from ParotidOARLib import roi
from ParotidOARLib.errors import EmptyStructureError
from ParotidOARLib.imageio import Geometry, read_image

MASKS = DATA / "tcia-hn-masks"


def kd_reference(mask: np.ndarray, geometry: Geometry, margin_mm: float, extra_vox: int = 4):
    """Exact ROI by nearest-neighbour distance in LPS mm, over the bbox + margin + extra voxels.

    Voxels outside that box are checked to be farther than the margin by the
    distance from their box face (sanity), so the result covers the whole grid.
    Returns (roi bool, distance array on the box, box slices).
    """
    idx = np.argwhere(mask)
    pts = geometry.index_to_lps(idx[:, ::-1])
    pad = np.ceil(margin_mm / np.asarray(geometry.spacing_zyx)).astype(int) + extra_vox
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    k, j, i = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    q = geometry.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    dist, _ = cKDTree(pts).query(q, distance_upper_bound=margin_mm + 5 * max(geometry.spacing))
    dist = dist.reshape(k.shape)
    out = np.zeros(mask.shape, bool)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    out[sl] = dist <= margin_mm
    return out, dist, sl


def assert_same_roi(got: np.ndarray, ref: np.ndarray, dist: np.ndarray, sl, margin_mm: float):
    diff = got != ref
    if diff.any():
        # only exact ties at the margin (floating-point rounding) may differ
        d = dist[diff[sl]]
        assert diff[sl].sum() == diff.sum(), "ROI differs outside the reference box"
        assert np.all(np.abs(d - margin_mm) < 1e-6), f"{diff.sum()} voxels differ, distances {d[:10]}"


def _real_masks():
    out = []
    for reader in ("oncologist",):
        for case in sorted((MASKS / reader).iterdir()):
            for name in ("Parotid-Lt", "Parotid-Rt"):
                out.append(MASKS / reader / case.name / f"{name}.nrrd")
    return out


def test_roi_matches_whole_grid_edt_on_real_parotid():
    """The issue's reference: whole-volume EDT on a real 512×512×156 parotid mask; identical voxels."""
    arr, g = read_image(MASKS / "oncologist" / "0522c0017" / "Parotid-Lt.nrrd")
    mask = arr > 0
    assert mask.shape == (156, 512, 512) and mask.any()
    got = roi.expand(mask, g, 17.0)
    brute = ndimage.distance_transform_edt(~mask, sampling=g.spacing_zyx) <= 17.0
    assert np.array_equal(got, brute)
    assert got.sum() > 10 * mask.sum()  # a real expansion, not the mask itself


@pytest.mark.parametrize("path", _real_masks(), ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_roi_exact_on_real_masks(path):
    arr, g = read_image(path)
    mask = arr > 0
    got = roi.expand(mask, g, 17.0)
    ref, dist, sl = kd_reference(mask, g, 17.0)
    assert_same_roi(got, ref, dist, sl, 17.0)
    assert got[mask].all()


def test_roi_exact_on_shared_masks(shared_data):
    """More real parotids (radiographer and oncologist readings) from ../shared/data."""
    root = shared_data / "tcia-hn-masks"
    if not root.exists():
        pytest.skip("no tcia-hn-masks in shared data")
    paths = sorted(root.glob("*/*/Parotid-*.nrrd"))
    assert paths
    rng = np.random.default_rng(3)
    for n, p in enumerate(rng.choice(paths, size=min(5, len(paths)), replace=False)):
        arr, g = read_image(p)
        mask = arr > 0
        if not mask.any():
            continue
        for margin in ((17.0, 5.0) if n == 0 else (17.0,)):
            got = roi.expand(mask, g, margin)
            ref, dist, sl = kd_reference(mask, g, margin)
            assert_same_roi(got, ref, dist, sl, margin)


def _blob_geometry(direction):
    return Geometry((70, 60, 40), (0.7, 1.3, 2.9), (-20.0, 15.0, -100.0), direction)


def _blob(g: Geometry, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros(g.shape, bool)
    mask[18:24, 25:35, 30:42] = True
    mask[20, 20:40, 35] = True  # a thin spur
    mask[rng.integers(15, 25), rng.integers(20, 40), rng.integers(25, 45)] = True
    return mask


def test_roi_exact_rotated_anisotropic():
    from bundle_utils import rotation_direction

    g = _blob_geometry(rotation_direction(25.0, 12.0, flip_k=True))
    mask = _blob(g)
    for margin in (17.0, 6.5):
        got = roi.expand(mask, g, margin)
        ref, dist, sl = kd_reference(mask, g, margin)
        assert_same_roi(got, ref, dist, sl, margin)
        brute = ndimage.distance_transform_edt(~mask, sampling=g.spacing_zyx) <= margin
        assert np.array_equal(got, brute)


def test_roi_touching_the_border_and_one_voxel():
    g = Geometry((30, 30, 12), (1.0, 1.0, 3.0))
    mask = np.zeros(g.shape, bool)
    mask[0, 0, 0] = True
    got = roi.expand(mask, g, 5.0)
    brute = ndimage.distance_transform_edt(~mask, sampling=g.spacing_zyx) <= 5.0
    assert np.array_equal(got, brute)
    # a single voxel: exactly the voxels within 5 mm
    kk, jj, ii = np.nonzero(got)
    d = np.sqrt((kk * 3.0) ** 2 + jj ** 2 + ii ** 2)
    assert np.all(d <= 5.0)
    assert got.sum() == np.count_nonzero(np.sqrt((np.arange(12)[:, None, None] * 3.0) ** 2
                                                 + np.arange(30)[None, :, None] ** 2
                                                 + np.arange(30)[None, None, :] ** 2) <= 5.0)


def test_roi_is_not_the_ball_dilation():
    """SimpleITK's ball dilation over-expands; ours matches the EDT instead (documented choice)."""
    import SimpleITK as sitk

    from ParotidOARLib.imageio import to_sitk

    g = Geometry((80, 80, 40), (0.98, 0.98, 2.5))
    mask = np.zeros(g.shape, bool)
    mask[15:25, 30:50, 30:50] = True
    got = roi.expand(mask, g, 17.0)
    radius = [int(round(17.0 / s)) for s in g.spacing]
    ball = sitk.GetArrayFromImage(sitk.BinaryDilate(to_sitk(mask, g), radius, sitk.sitkBall)) > 0
    brute = ndimage.distance_transform_edt(~mask, sampling=g.spacing_zyx) <= 17.0
    assert np.array_equal(got, brute)
    assert not np.array_equal(ball, brute)


def test_bounding_box_and_errors():
    m = np.zeros((10, 12, 14), bool)
    m[2:4, 5, 7:9] = True
    assert roi.bounding_box(m) == ((2, 5, 7), (4, 6, 9))
    assert roi.bounding_box(m, pad_vox=3) == ((0, 2, 4), (7, 9, 12))
    assert roi.bounding_box(m, pad_vox=(1, 0, 10)) == ((1, 5, 0), (5, 6, 14))
    with pytest.raises(EmptyStructureError):
        roi.bounding_box(np.zeros((3, 3, 3), bool))
    g = Geometry((14, 12, 10), (1, 1, 1))
    with pytest.raises(EmptyStructureError):
        roi.expand(np.zeros(g.shape, bool), g, 17.0)
    with pytest.raises(ValueError):
        roi.expand(np.zeros((2, 2, 2), bool), g, 17.0)
    assert roi.volume_cc(m, g) == pytest.approx(m.sum() / 1000.0)
