"""CT reading, validation, body midline, side cut, resampling and normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from bundle_utils import rotation_direction, synthetic_ct
from ParotidOARLib import preprocess
from ParotidOARLib.errors import InputError
from ParotidOARLib.imageio import Geometry, write_image


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_read_ct_formats_keep_values_and_geometry(tmp_path, suffix):
    ct, g = synthetic_ct(size=(40, 36, 12), spacing=(2.0, 2.5, 3.0))
    path = write_image(tmp_path / f"ct{suffix}", ct, g)
    arr, g2, meta = preprocess.read_ct(path)
    assert arr.dtype == np.int16
    assert np.array_equal(arr, ct)
    assert g2.same_grid(g)
    assert meta["source"] == str(path) and meta["format"] in ("nrrd", "nifti", "metaimage")


def test_read_ct_float_input_becomes_rounded_int16(tmp_path):
    ct, g = synthetic_ct(size=(40, 36, 12))
    f = ct.astype(np.float32) + 0.4
    f[0, 0, 0] = 1e6  # out of int16 range → clipped, not wrapped
    path = write_image(tmp_path / "ct.nrrd", f, g)
    arr, _, meta = preprocess.read_ct(path)
    assert arr.dtype == np.int16 and meta["original_dtype"] == "float32"
    assert arr[0, 0, 0] == 32767
    assert np.array_equal(arr.ravel()[1:], ct.ravel()[1:])


def test_read_ct_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        preprocess.read_ct(tmp_path / "missing.nrrd")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="unsupported file type"):
        preprocess.read_ct(tmp_path / "x.txt")
    (tmp_path / "a.seg.nrrd").write_text("x")
    with pytest.raises(InputError, match="segmentation"):
        preprocess.read_ct(tmp_path / "a.seg.nrrd")
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\ngarbage\n")
    with pytest.raises(InputError, match="Cannot read"):
        preprocess.read_ct(tmp_path / "bad.nrrd")


def test_read_ct_dicom_folder(tmp_path):
    pytest.importorskip("pydicom")
    dicom_utils = pytest.importorskip("dicom_utils")
    pytest.importorskip("ParotidOARLib.dicomio")
    ct, g = synthetic_ct(size=(40, 36, 12), spacing=(2.0, 2.0, 3.0))
    dicom_utils.write_ct_series(tmp_path / "dcm", ct, g)
    arr, g2, meta = preprocess.read_ct(tmp_path / "dcm")
    assert arr.dtype == np.int16
    assert np.array_equal(arr, ct)
    assert g2.same_grid(g)
    assert meta["format"] == "dicom"


# --------------------------------------------------------------------------- validation
def test_validate_accepts_a_ct():
    ct, g = synthetic_ct()
    preprocess.validate_ct(ct, g, "ct")


def test_validate_rejects_non_3d():
    with pytest.raises(InputError, match="3D"):
        preprocess.validate_ct(np.zeros((10, 10)), None, "slice")
    with pytest.raises(InputError, match="3D"):
        preprocess.validate_ct(np.zeros((2, 10, 10, 10)), None, "4d")


def test_validate_rejects_missing_geometry_and_mismatch():
    ct, g = synthetic_ct()
    with pytest.raises(InputError, match="spacing"):
        preprocess.validate_ct(ct, None, "ct")
    with pytest.raises(InputError, match="does not match"):
        preprocess.validate_ct(ct[:, :, :-1], g, "ct")


def test_validate_rejects_non_ct():
    ct, g = synthetic_ct()
    mr = (ct.astype(np.int32) + 1000).clip(0, 1200).astype(np.int16)  # MR-like: no negative values
    with pytest.raises(InputError, match="does not look like a CT"):
        preprocess.validate_ct(mr, g, "mr")
    soft = np.clip(ct, -1000, 200)  # air but no bone: not a head CT in HU
    with pytest.raises(InputError, match="does not look like a CT"):
        preprocess.validate_ct(soft, g, "soft")
    with pytest.raises(InputError, match="does not look like a CT"):
        preprocess.validate_ct(np.zeros(g.shape, np.int16), g, "zeros")


def test_validate_rejects_too_small():
    ct, g = synthetic_ct(size=(20, 20, 10), spacing=(2.0, 2.0, 2.0))  # 40 mm wide
    with pytest.raises(InputError, match="too small"):
        preprocess.validate_ct(ct, g, "tiny")
    ct, g = synthetic_ct(size=(80, 80, 5), spacing=(3.0, 3.0, 10.0))  # too few slices
    with pytest.raises(InputError, match="too small"):
        preprocess.validate_ct(ct, g, "thick")


def test_validate_refuses_a_field_of_view_far_beyond_a_head_and_neck_ct():
    """Issue #15 fault 4: a 10 mm isotropic scan of about 1 m ran for minutes; it is refused at once, with the
    numbers. A real OpenKBP-like grid (128 x 128 x 128 at 4.7 x 4.7 x 2.5 mm) is still accepted."""
    ct, g = synthetic_ct(size=(100, 100, 40), spacing=(10.0, 10.0, 10.0))
    with pytest.raises(InputError, match=r"far beyond a head-and-neck CT \(1000x1000x400 mm, voxels 10x10x10 mm\)"):
        preprocess.validate_ct(ct, g, "huge")
    ct, g = synthetic_ct(size=(60, 60, 30), spacing=(8.0, 8.0, 8.0))  # 480 mm: the extent is fine, the voxels not
    with pytest.raises(InputError, match="far beyond"):
        preprocess.validate_ct(ct, g, "coarse")
    ct, g = synthetic_ct(size=(128, 128, 128), spacing=(4.7, 4.7, 2.5))
    preprocess.validate_ct(ct, g, "openkbp-like")


def test_nan_infinite_and_sheared_inputs_are_refused(tmp_path):
    """Issue #15 faults 7a and 7b: NaN/inf voxels in a float CT and a sheared direction matrix used to be
    segmented silently (NaN cast to an arbitrary int16; the sheared grid treated as square)."""
    ct, g = synthetic_ct(size=(64, 60, 24), spacing=(3.0, 3.0, 4.0))
    bad = ct.astype(np.float32)
    bad[10, 20, 30:35] = np.nan
    bad[11, 20, 30] = np.inf
    path = write_image(tmp_path / "nan.nrrd", bad, g)
    with pytest.raises(InputError, match="5 NaN and 1 infinite voxel"):
        preprocess.read_ct(path)
    with pytest.raises(InputError, match="NaN"):
        preprocess.to_int16(bad, "array")
    c, s = np.cos(np.radians(80)), np.sin(np.radians(80))
    sheared = Geometry(g.size, g.spacing, g.origin, (1, c, 0, 0, s, 0, 0, 0, 1))
    path = write_image(tmp_path / "sheared.nrrd", ct, sheared)
    array, geometry, _ = preprocess.read_ct(path)
    with pytest.raises(InputError, match="sheared .* 80.0 degrees"):
        preprocess.validate_ct(array, geometry, "sheared")
    preprocess.validate_ct(ct, Geometry(g.size, g.spacing, g.origin, rotation_direction(20, 10, True)), "rotated")


def test_negative_spacing_in_a_header_is_reported(tmp_path):
    """Issue #15 fault 7c: ITK reads a negative MetaImage spacing as a flipped axis without a word."""
    ct, g = synthetic_ct(size=(64, 60, 24), spacing=(3.0, 3.0, 4.0))
    path = write_image(tmp_path / "ct.mha", ct, g, compress=False)
    assert preprocess.read_ct(path)[2]["warnings"] == []
    data = path.read_bytes()
    assert b"ElementSpacing = 3 3 4" in data
    path.write_bytes(data.replace(b"ElementSpacing = 3 3 4", b"ElementSpacing = 3 -3 4", 1))
    _array, geometry, meta = preprocess.read_ct(path)
    assert geometry.direction_matrix[1, 1] == -1  # what ITK made of it
    assert len(meta["warnings"]) == 1 and "negative value" in meta["warnings"][0]


# --------------------------------------------------------------------------- body, midline, side
@pytest.mark.parametrize("offset", [-30.0, 0.0, 25.0])
def test_midline_follows_the_body_not_the_image_centre(offset):
    ct, g = synthetic_ct(body_centre_lps=(offset, 10.0, 0.0))
    mid = preprocess.body_midline_x(ct, g)
    assert mid == pytest.approx(offset, abs=3.5)  # within about one voxel (3 mm)
    body = preprocess.body_mask(ct, g)
    assert body.dtype == bool and body.shape == ct.shape
    assert preprocess.body_midline_x(ct, g, body) == pytest.approx(offset, abs=3.5)


def test_midline_rotated_and_flipped_geometry():
    d = rotation_direction(15.0, 0.0, flip_k=True)
    ct, g = synthetic_ct(size=(90, 90, 20), spacing=(2.5, 2.5, 5.0), direction=d, body_centre_lps=(-18.0, 0, 0))
    assert preprocess.body_midline_x(ct, g) == pytest.approx(-18.0, abs=4.0)


def test_body_mask_drops_the_couch():
    ct, g = synthetic_ct(size=(80, 80, 20))
    ct[:, 75:78, :] = 200  # a couch, separated from the body by air
    body = preprocess.body_mask(ct, g)
    assert not body[:, 76, :].any()
    assert body[:, 40, 40].all()


def test_fill_holes_per_slice_is_scipys_fill_holes_slice_by_slice():
    """The one-labelling hole fill gives exactly scipy's binary_fill_holes on every axial slice: holes, a
    cavity open to the border, a diagonal-only link (4-connectivity), an empty and a full slice; holes never
    leak between slices."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    mask = rng.random((6, 40, 50)) > 0.55
    ring = np.zeros((40, 50), bool)
    ring[5:30, 5:30] = True
    ring[10:25, 10:25] = False          # a hole
    ring[12:14, 40:48] = True
    mask[1] = ring
    open_cavity = ring.copy()
    open_cavity[15:18, 0:12] = False    # the hole opened to the image border: not a hole any more
    mask[2] = open_cavity
    diag = np.zeros((40, 50), bool)
    diag[0:5, 0:5] = True
    diag[1:4, 1:4] = False
    diag[1, 1] = True                   # a background pixel linked to the outside only diagonally stays a hole
    mask[3] = diag
    mask[4] = False
    mask[5] = True
    expected = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    got = preprocess.fill_holes_per_slice(mask)
    assert got.dtype == bool and np.array_equal(got, expected)
    assert got[1, 15, 15] and not got[2, 15, 15]
    with pytest.raises(ValueError):
        preprocess.fill_holes_per_slice(np.zeros((4, 4), bool))


@pytest.mark.parametrize("side", ["left", "right"])
def test_side_crop_keeps_the_correct_half(side):
    ct, g = synthetic_ct(body_centre_lps=(20.0, 0, 0))
    mid = preprocess.body_midline_x(ct, g)
    arr, g2, (lo, hi) = preprocess.side_crop(ct, g, side, midline_x=mid)
    assert arr.shape == g2.shape
    assert np.array_equal(arr, ct[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    # x of the cropped voxel centres (identity direction: x grows with i)
    xs = g2.index_to_lps(np.array([[0, 0, 0], [g2.size[0] - 1, 0, 0]]))[:, 0]
    if side == "left":  # LPS +x = patient left
        assert xs.min() >= mid - g.spacing[0] and xs.max() == pytest.approx(g.index_to_lps([g.size[0] - 1, 0, 0])[0])
    else:
        assert xs.max() <= mid + g.spacing[0] and xs.min() == pytest.approx(g.origin[0])
    half = preprocess.side_halfspace_mask(g, side, mid)
    x_all = g.index_to_lps(np.argwhere(half)[:, ::-1])[:, 0]
    assert (x_all > mid).all() if side == "left" else (x_all < mid).all()
    assert half.sum() + preprocess.side_halfspace_mask(g, "right" if side == "left" else "left", mid).sum() \
        <= half.size


def test_side_crop_oblique_box_contains_the_half():
    g = Geometry((50, 40, 10), (2.0, 2.0, 4.0), (-50.0, -40.0, 0.0), rotation_direction(30.0))
    mid = 3.0
    lo, hi = preprocess.side_halfspace_box(g, "left", mid)
    half = preprocess.side_halfspace_mask(g, "left", mid)
    inside = np.zeros(g.shape, bool)
    inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    assert half.any() and not (half & ~inside).any()
    with pytest.raises(InputError):
        preprocess.check_side("both")
    assert preprocess.check_side("L") == "left" and preprocess.check_side("Right") == "right"


# --------------------------------------------------------------------------- resampling
def test_resample_keeps_the_physical_box():
    ct, g = synthetic_ct(size=(80, 70, 30), spacing=(3.0, 3.0, 4.0), direction=rotation_direction(20.0))
    arr, g2 = preprocess.resample(ct, g, (4.0, 4.0, 3.0))
    assert g2.spacing == (4.0, 4.0, 3.0) and arr.shape == g2.shape
    assert np.allclose(preprocess.lps_bounds(g)[0], preprocess.lps_bounds(g2)[0], atol=2.5)
    assert np.allclose(preprocess.physical_extent_mm(g), preprocess.physical_extent_mm(g2), atol=4.0)
    assert g2.direction == g.direction
    # identity resampling returns the same values
    same = preprocess.resample_to(ct, g, g, "linear")
    assert np.array_equal(same, ct)
    mask = ct > 500
    m2 = preprocess.resample_to(mask, g, g, "nearest")
    assert m2.dtype == bool and np.array_equal(m2, mask)


def test_resample_region_equals_full_resample():
    ct, g = synthetic_ct(size=(80, 70, 30), spacing=(3.0, 3.0, 4.0))
    target = preprocess.axis_aligned_grid((1.5, 1.5, 2.0), (-20.0, -30.0, -10.0), (25.0, 10.0, 30.0))
    full = preprocess.resample_to(ct, g, target, "linear", output_dtype=np.float32)
    part = preprocess.resample_region(ct, g, target, "linear", output_dtype=np.float32)
    assert part.dtype == np.float32 and np.allclose(full, part)
    outside = preprocess.axis_aligned_grid((2, 2, 2), (1000.0, 1000.0, 1000.0), (1010.0, 1010.0, 1010.0))
    assert (preprocess.resample_region(ct, g, outside) == preprocess.AIR_HU).all()


def test_axis_aligned_grid_min_size_grows_symmetrically():
    g = preprocess.axis_aligned_grid((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (10.0, 20.0, 10.0), min_size_zyx=(8, 16, 16))
    assert g.size == (16, 20, 8)
    lo, hi = preprocess.lps_bounds(g)
    assert np.allclose(lo, [-3.0, 0.0, -3.0]) and np.allclose(hi, [13.0, 20.0, 13.0])


def test_normalise():
    a = np.array([-2000, -100, 0, 100, 5000], np.int16)
    out = preprocess.normalise(a, {"clip": [-100, 300], "mean": 50.0, "std": 100.0})
    assert out.dtype == np.float32
    assert np.allclose(out, [-1.5, -1.5, -0.5, 0.5, 2.5])
    stats = preprocess.intensity_statistics(np.arange(1000))
    assert stats["clip"][0] == pytest.approx(4.995) and stats["std"] > 0
