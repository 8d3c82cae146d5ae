"""DICOM CT input (ParotidOARLib.dicomio) on synthetic series written with pydicom."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicom_utils import phantom_case, rotation, write_ct_series  # noqa: E402

from ParotidOARLib import dicomio, imageio, preprocess  # noqa: E402
from ParotidOARLib.errors import DicomError, InputError  # noqa: E402
from ParotidOARLib.imageio import Geometry  # noqa: E402


@pytest.fixture(scope="module")
def case():
    return phantom_case(0, "left")


@pytest.fixture(scope="module")
def ct_dir(case, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    info = write_ct_series(folder / "series", case.ct, case.geometry, patient_id="PHANTOM-SECRET-ID")
    return folder, info


def small_volume(shape=(10, 24, 20), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 2000, shape).astype(np.int16)


def test_read_matches_nrrd_of_same_image(case, ct_dir, tmp_path):
    folder, info = ct_dir
    nrrd = imageio.write_image(tmp_path / "ct.nrrd", case.ct, case.geometry)
    a_nrrd, g_nrrd, _ = preprocess.read_ct(nrrd)
    a, g, meta = dicomio.read_ct_series(folder)
    assert a.dtype == np.int16
    np.testing.assert_array_equal(a, a_nrrd)
    assert g.same_grid(g_nrrd), (g, g_nrrd)
    assert np.allclose(g.origin, case.geometry.origin, atol=1e-3)
    # the preprocess entry point (used by `segment`) delegates to dicomio for folders
    a2, g2, meta2 = preprocess.read_ct(folder)
    np.testing.assert_array_equal(a2, a)
    assert meta2["format"] == "dicom"
    # identifiers kept for the outputs
    assert meta["series_instance_uid"] == info["series_uid"]
    assert meta["study_instance_uid"] == info["study_uid"]
    assert meta["frame_of_reference_uid"] == info["frame_of_reference_uid"]
    assert meta["patient_id"] == "PHANTOM-SECRET-ID"
    assert meta["modality"] == "CT" and meta["series_description"] == "Synthetic CT"
    assert meta["sop_instance_uids"] == info["sop_instance_uids"]  # written in k order
    z = [s["z_mm"] for s in meta["slices"]]
    assert np.all(np.diff(z) > 0)
    assert meta["warnings"] == [] and meta["resampled"] is False


def test_shuffled_file_names_and_oblique_direction_with_rescale(tmp_path):
    """Slices are sorted by position (not file name); any right-handed direction; slope/intercept applied."""
    arr = (small_volume() // 2) * 2  # even HU so that slope 2 stores exactly
    geom = Geometry((20, 24, 10), (0.7, 0.9, 2.5), (-40.0, 12.5, 100.0), rotation((10, -20, 35)).ravel())
    info = write_ct_series(tmp_path, arr, geom, rescale=(2.0, -2048.0))
    for n, p in enumerate(info["paths"]):  # file names no longer follow slice order
        p.rename(p.with_name(f"x{(n * 7) % 10:02d}_{n}.dcm"))
    a, g, meta = dicomio.read_ct_series(tmp_path)
    np.testing.assert_array_equal(a, arr)
    assert g.same_grid(geom), (g, geom)
    assert meta["sop_instance_uids"] == info["sop_instance_uids"]


def test_rle_lossless_compressed_series(tmp_path):
    arr = small_volume(seed=1)
    geom = Geometry((20, 24, 10), (1.0, 1.0, 3.0), (0, 0, 0))
    info = write_ct_series(tmp_path, arr, geom, compress=True)
    assert pydicom.dcmread(info["paths"][0]).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    a, g, _ = dicomio.read_ct_series(tmp_path)
    np.testing.assert_array_equal(a, arr)
    assert g.same_grid(geom)


def test_other_series_and_localizer_are_ignored(tmp_path):
    arr = small_volume(seed=2)
    geom = Geometry((20, 24, 10), (1.0, 1.0, 2.0), (5, 5, 5))
    ct = write_ct_series(tmp_path / "ct", arr, geom, extra_localizer=True)
    write_ct_series(tmp_path / "mr", np.abs(arr), geom, modality="MR", series_description="T1", rescale=(1, 0))
    assert dicomio.is_dicom_folder(tmp_path)
    a, _, meta = dicomio.read_ct_series(tmp_path)
    np.testing.assert_array_equal(a, arr)
    assert meta["series_instance_uid"] == ct["series_uid"]
    assert len(meta["sop_instance_uids"]) == 10  # the scout is not a slice


def test_several_ct_series_refused_and_series_uid_picks(tmp_path):
    geom = Geometry((20, 24, 10), (1.0, 1.0, 2.0))
    a1, a2 = small_volume(seed=3), small_volume(seed=4)
    s1 = write_ct_series(tmp_path / "a", a1, geom, series_description="Head 2.0 mm", patient_id="PID-XYZ")
    s2 = write_ct_series(tmp_path / "b", a2[:8], Geometry((20, 24, 8), (1.0, 1.0, 2.0)),
                         study_uid=s1["study_uid"], series_description="Head soft tissue", series_number=2,
                         patient_id="PID-XYZ")
    with pytest.raises(DicomError) as err:
        dicomio.read_ct_series(tmp_path)
    msg = str(err.value)
    assert "2 CT series" in msg and "--series-uid" in msg
    for s, desc, n in ((s1, "Head 2.0 mm", 10), (s2, "Head soft tissue", 8)):
        line = next(x for x in msg.splitlines() if s["series_uid"] in x)
        assert desc in line and f"{n} file(s)" in line
    assert "PID-XYZ" not in msg and "PHANTOM" not in msg  # no patient identifiers in errors
    a, _, meta = dicomio.read_ct_series(tmp_path, series_uid=s2["series_uid"])
    np.testing.assert_array_equal(a, a2[:8])
    assert meta["series_instance_uid"] == s2["series_uid"]


def test_wrong_series_uid_and_non_ct_uid_refused(tmp_path):
    geom = Geometry((20, 24, 10), (1.0, 1.0, 2.0))
    write_ct_series(tmp_path / "ct", small_volume(), geom)
    mr = write_ct_series(tmp_path / "mr", np.abs(small_volume()), geom, modality="MR", rescale=(1, 0))
    with pytest.raises(DicomError, match="not found"):
        dicomio.read_ct_series(tmp_path, series_uid="1.2.3.4.5")
    with pytest.raises(DicomError, match="not a CT image series"):
        dicomio.read_ct_series(tmp_path, series_uid=mr["series_uid"])


def test_no_ct_series_refused(tmp_path):
    geom = Geometry((20, 24, 10), (1.0, 1.0, 2.0))
    mr = write_ct_series(tmp_path / "mr", np.abs(small_volume()), geom, modality="MR", series_description="T2 FS",
                         rescale=(1, 0))
    with pytest.raises(DicomError) as err:
        dicomio.read_ct_series(tmp_path)
    assert "No CT image series" in str(err.value)
    assert mr["series_uid"] in str(err.value) and "MR" in str(err.value) and "T2 FS" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not dicom")
    assert not dicomio.is_dicom_folder(empty)
    with pytest.raises(DicomError, match="No DICOM files"):
        dicomio.read_ct_series(empty)
    with pytest.raises(InputError):
        dicomio.read_ct_series(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["shear", "tag"])
def test_gantry_tilt_refused(tmp_path, kind):
    geom = Geometry((20, 24, 10), (1.0, 1.0, 2.0))
    if kind == "shear":  # positions drift in-plane along the stack: tilted acquisition
        write_ct_series(tmp_path, small_volume(), geom, gantry_shear_deg=15.0)
    else:  # the tag says tilted even though positions look orthogonal
        write_ct_series(tmp_path, small_volume(), geom, gantry_tilt_tag_deg=12.0)
    with pytest.raises(DicomError, match="[Gg]antry tilt") as err:
        dicomio.read_ct_series(tmp_path)
    assert "not supported" in str(err.value)


def test_missing_slice_refused(tmp_path):
    geom = Geometry((20, 24, 12), (1.0, 1.0, 2.0))
    write_ct_series(tmp_path, small_volume((12, 24, 20)), geom, drop_slices=(6,))
    with pytest.raises(DicomError, match="missing slice") as err:
        dicomio.read_ct_series(tmp_path)
    assert "4.00 mm" in str(err.value) and "1 slice" in str(err.value)


def test_truncated_slice_is_named(tmp_path):
    """Issue #15 fault 8a: a slice whose pixel data was cut short used to get "Decompress the series"; the
    message names the truncated file and how much of it is there."""
    geom = Geometry((20, 24, 10), (1.0, 1.0, 2.0))
    info = write_ct_series(tmp_path, small_volume(), geom)
    victim = Path(sorted(info["paths"])[3])
    victim.write_bytes(victim.read_bytes()[:-300])
    with pytest.raises(DicomError, match="truncated or damaged") as err:
        dicomio.read_ct_series(tmp_path)
    assert victim.name in str(err.value) and "660 of 960 bytes" in str(err.value)
    assert "Decompress" not in str(err.value)


def test_duplicate_positions_refused(tmp_path):
    geom = Geometry((20, 24, 4), (1.0, 1.0, 2.0))
    write_ct_series(tmp_path, small_volume((4, 24, 20)), geom, z_offsets_mm=[0, 2, 2, 4])
    with pytest.raises(DicomError, match="same position"):
        dicomio.read_ct_series(tmp_path)


def test_uneven_spacing_resampled_with_warning(tmp_path):
    """Slices at uneven z; HU = 10 * z so linear resampling has an exact answer."""
    z = np.array([0.0, 2.0, 4.0, 5.0, 6.5, 8.5, 10.5, 12.5, 14.0, 16.0])
    geom = Geometry((20, 24, 10), (1.0, 1.0, 2.0), (3.0, -4.0, 50.0))
    arr = np.broadcast_to((10 * z).astype(np.int16)[:, None, None], (10, 24, 20)).copy()
    info = write_ct_series(tmp_path, arr, geom, z_offsets_mm=z)
    a, g, meta = dicomio.read_ct_series(tmp_path)
    assert meta["resampled"] is True
    assert any("Uneven slice spacing" in w and "2.000 mm" in w for w in meta["warnings"])
    assert g.spacing[2] == pytest.approx(2.0)  # the median spacing
    assert g.size[2] == 9  # 0..16 mm at 2 mm
    assert np.allclose(g.origin, geom.origin)
    expected = 10 * (np.arange(9) * 2.0)
    np.testing.assert_allclose(a[:, 3, 4], expected, atol=0.51)
    assert len(meta["slices"]) == 10
    assert meta["sop_instance_uids"][0] == info["sop_instance_uids"][0]
    assert meta["sop_instance_uids"][1] == info["sop_instance_uids"][1]  # z = 2 mm is an original slice
    assert len(meta["sop_instance_uids"]) == 9


def test_small_irregularity_is_not_uneven(tmp_path):
    """Scanner rounding (< 1 %) keeps the series as is, spacing = mean."""
    z = np.arange(10) * 2.0 + np.array([0, 0.005, -0.004, 0.003, 0, 0.002, -0.003, 0, 0.004, 0])
    geom = Geometry((20, 24, 10), (1.0, 1.0, 2.0))
    arr = small_volume()
    write_ct_series(tmp_path, arr, geom, z_offsets_mm=z)
    a, g, meta = dicomio.read_ct_series(tmp_path)
    assert meta["warnings"] == [] and not meta["resampled"]
    np.testing.assert_array_equal(a, arr)
    assert g.spacing[2] == pytest.approx(2.0, abs=1e-3)


def test_is_dicom_folder(tmp_path, ct_dir):
    assert dicomio.is_dicom_folder(ct_dir[0])
    assert not dicomio.is_dicom_folder(tmp_path)
    assert not dicomio.is_dicom_folder(ct_dir[1]["paths"][0])  # a file, not a folder


def test_segment_on_dicom_folder_equals_segment_on_nrrd(case, ct_dir, tmp_path):
    """`cascade.segment` gives the same masks from the DICOM folder as from the NRRD of the same image,
    and writes the RTSTRUCT / DICOM SEG outputs from the DICOM input."""
    cascade = pytest.importorskip("ParotidOARLib.cascade")
    bundle_utils = pytest.importorskip("bundle_utils")
    from ParotidOARLib import rtstruct, segio

    # coarse spacings keep the sliding windows few; the positive bias gives a non-empty parotid
    model = bundle_utils.make_tiny_bundle(tmp_path / "bundle", stage1_bias=1.0, stage1_spacing=(6.0, 6.0, 6.0),
                                          stage2_spacing=(4.0, 4.0, 4.0))
    nrrd = imageio.write_image(tmp_path / "ct.nrrd", case.ct, case.geometry)
    opts = cascade.SegmentOptions(side=case.side, model_dir=model, device="cpu")
    cascade.segment(nrrd, tmp_path / "from_nrrd.seg.nrrd", opts, warn=False)
    report = cascade.segment(ct_dir[0], tmp_path / "from_dicom.seg.nrrd", opts, warn=False,
                             rtstruct_path=tmp_path / "rs.dcm", dicom_seg_path=tmp_path / "seg.dcm")
    m_nrrd, g_nrrd, _ = segio.read_seg(tmp_path / "from_nrrd.seg.nrrd")
    m_dicom, g_dicom, _ = segio.read_seg(tmp_path / "from_dicom.seg.nrrd")
    assert g_nrrd.same_grid(g_dicom)
    assert list(m_nrrd) == list(m_dicom) and any(m.any() for m in m_nrrd.values())
    for name in m_nrrd:
        np.testing.assert_array_equal(m_nrrd[name], m_dicom[name], err_msg=name)
    assert pydicom.dcmread(tmp_path / "seg.dcm").Modality == "SEG"
    back = rtstruct.read_rtstruct_masks(tmp_path / "rs.dcm", ct_dir[0])
    for name, mask in m_dicom.items():
        if mask.any():
            assert name in back
            np.testing.assert_array_equal(back[name], mask, err_msg=name)
    assert report["outputs"]["rtstruct"]
    # the JSON report links outputs to the series by UID but carries no patient identifier or per-slice list
    text = json.dumps(report)
    assert report["input"]["series_instance_uid"]
    assert "PHANTOM-SECRET-ID" not in text and "patient_id" not in report["input"]
    assert "sop_instance_uids" not in report["input"] and "slices" not in report["input"]
