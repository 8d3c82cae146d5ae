"""DICOM RT Structure Set export (ParotidOARLib.rtstruct): round trip, validity, holes/islands, CLI, refusals."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as MplPath

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicom_utils import dsc, phantom_case, rotation, write_ct_series  # noqa: E402

from ParotidOARLib import __main__ as cli  # noqa: E402
from ParotidOARLib import dicomio, labels, rtstruct, segio  # noqa: E402
from ParotidOARLib.errors import GeometryError, InputError, OutputExistsError  # noqa: E402
from ParotidOARLib.imageio import Geometry  # noqa: E402

RTSS = rtstruct.RT_STRUCTURE_SET_STORAGE


@pytest.fixture(scope="module")
def case():
    return phantom_case(0, "left")


@pytest.fixture(scope="module")
def ct(case, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    info = write_ct_series(folder, case.ct, case.geometry, patient_id="PHANTOM-RT-1")
    return folder, info


@pytest.fixture(scope="module")
def all_masks(case):
    masks = dict(case.labels)
    masks[labels.ROI] = case.roi
    return masks


@pytest.fixture(scope="module")
def written(all_masks, case, ct, tmp_path_factory):
    out = tmp_path_factory.mktemp("rs") / "rtstruct.dcm"
    rtstruct.write_rtstruct(out, all_masks, case.geometry, ct[0], include_roi=True)
    return out


def shapes_with_hole_and_islands(geometry: Geometry):
    """A ring (hole) with an island inside the hole, and two separate islands, on several slices."""
    nk, nj, ni = geometry.shape
    jj, ii = np.mgrid[:nj, :ni]
    r = np.hypot(jj - nj / 2, ii - ni / 3)
    ring = np.zeros(geometry.shape, bool)
    islands = np.zeros(geometry.shape, bool)
    for k in range(nk // 3, nk // 3 + 6):
        ring[k] = ((r < 20) & (r >= 10)) | (r < 4)  # outer, hole, island in the hole
        islands[k] = (np.hypot(jj - nj / 2, ii - 2 * ni / 3) < 6) | (np.hypot(jj - nj / 4, ii - 2 * ni / 3) < 5)
    return ring, islands


def test_round_trip_phantom_dsc(written, all_masks, ct):
    back = rtstruct.read_rtstruct_masks(written, ct[0])
    scores = {}
    for name, mask in all_masks.items():
        assert mask.any(), name
        scores[name] = dsc(back[name], mask)
    print("RTSTRUCT round-trip DSC:", {k: round(v, 4) for k, v in scores.items()})
    for name, score in scores.items():
        assert score >= 0.95, (name, score)
    # skin (3 mm rind) is thin: it must still come back voxel for voxel
    assert scores[labels.SKIN] >= 0.99


def test_round_trip_with_independent_rasteriser(written, all_masks, case):
    """Rasterise with matplotlib (per contour point-in-polygon, XOR) instead of our scanline filler."""
    ds = pydicom.dcmread(written)
    numbers = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    g = case.geometry
    nk, nj, ni = g.shape
    centres = np.stack(np.meshgrid(np.arange(ni), np.arange(nj), indexing="xy"), -1).reshape(-1, 2)
    for roi in ds.ROIContourSequence:
        name = numbers[int(roi.ReferencedROINumber)]
        if name not in (labels.PAROTID, labels.SKIN, labels.MASTOID):
            continue
        mask = np.zeros(g.shape, bool)
        for c in roi.ContourSequence:
            ijk = g.lps_to_index(np.asarray(c.ContourData, float).reshape(-1, 3))
            k = int(round(ijk[0, 2]))
            inside = MplPath(ijk[:, :2]).contains_points(centres).reshape(nj, ni)
            mask[k] ^= inside
        assert dsc(mask, all_masks[name]) >= 0.99, name


def test_hole_and_islands(case, ct, tmp_path):
    ring, islands = shapes_with_hole_and_islands(case.geometry)
    out = rtstruct.write_rtstruct(tmp_path / "rs.dcm", {"Ring": ring, "Islands": islands}, case.geometry, ct[0])
    back = rtstruct.read_rtstruct_masks(out, ct[0])
    assert dsc(back["Ring"], ring) >= 0.95 and dsc(back["Islands"], islands) >= 0.95
    np.testing.assert_array_equal(back["Ring"], ring)  # even-odd reproduces hole and inner island exactly
    np.testing.assert_array_equal(back["Islands"], islands)
    ds = pydicom.dcmread(out)
    per_roi = {}
    for roi in ds.ROIContourSequence:
        counts = {}
        for c in roi.ContourSequence:
            assert c.ContourGeometricType == "CLOSED_PLANAR"
            uid = c.ContourImageSequence[0].ReferencedSOPInstanceUID
            counts[uid] = counts.get(uid, 0) + 1
        per_roi[int(roi.ReferencedROINumber)] = counts
    assert set(per_roi[1].values()) == {3}  # ring: outer + hole + island in the hole, one contour each
    assert set(per_roi[2].values()) == {2}  # two islands, two contours
    assert len(per_roi[1]) == 6


def test_rtstruct_validates(written, ct, case, all_masks):
    folder, info = ct
    ds = pydicom.dcmread(written)
    ct0 = pydicom.dcmread(info["paths"][0], stop_before_pixels=True)
    # SOP Common, RT Series, modules' required attributes
    assert ds.SOPClassUID == RTSS and ds.file_meta.MediaStorageSOPClassUID == RTSS
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "RTSTRUCT"
    required = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex",  # Patient
                "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                "AccessionNumber",  # General Study
                "Modality", "SeriesInstanceUID", "SeriesNumber", "OperatorsName",  # RT Series
                "Manufacturer",  # General Equipment
                "StructureSetLabel", "StructureSetDate", "StructureSetTime", "ReferencedFrameOfReferenceSequence",
                "StructureSetROISequence",  # Structure Set
                "ROIContourSequence",  # ROI Contour
                "RTROIObservationsSequence",  # RT ROI Observations
                "SOPClassUID", "SOPInstanceUID", "SpecificCharacterSet"]  # SOP Common
    missing = [kw for kw in required if kw not in ds]
    assert not missing, missing
    # patient / study copied, new UIDs generated
    assert ds.PatientID == "PHANTOM-RT-1" and ds.PatientName == ct0.PatientName
    assert ds.StudyInstanceUID == info["study_uid"]
    new_uids = {ds.SOPInstanceUID, ds.SeriesInstanceUID}
    assert len(new_uids) == 2 and all(pydicom.uid.UID(u).is_valid for u in new_uids)
    assert not new_uids & ({info["series_uid"], info["study_uid"]} | set(info["sop_instance_uids"]))
    # exactly one frame of reference, the CT's; study and series references
    assert len(ds.ReferencedFrameOfReferenceSequence) == 1
    ref_for = ds.ReferencedFrameOfReferenceSequence[0]
    assert ref_for.FrameOfReferenceUID == info["frame_of_reference_uid"]
    study = ref_for.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == info["study_uid"]
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == info["series_uid"]
    ct_uids = set(info["sop_instance_uids"])
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == ct_uids
    # ROI numbering consistent across the three sequences
    roi_numbers = [int(r.ROINumber) for r in ds.StructureSetROISequence]
    assert len(set(roi_numbers)) == len(roi_numbers) == len(all_masks)
    assert sorted(int(r.ReferencedROINumber) for r in ds.ROIContourSequence) == sorted(roi_numbers)
    assert sorted(int(o.ReferencedROINumber) for o in ds.RTROIObservationsSequence) == sorted(roi_numbers)
    assert all(r.ReferencedFrameOfReferenceUID == info["frame_of_reference_uid"] for r in ds.StructureSetROISequence)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    assert set(names.values()) == set(all_masks)
    types = {names[int(o.ReferencedROINumber)]: o.RTROIInterpretedType for o in ds.RTROIObservationsSequence}
    assert types[labels.ROI] == "CONTROL"
    assert all(types[n] == "ORGAN" for n in labels.STRUCTURES)
    # colours from labels; every contour references a CT slice and lies in that slice's plane
    positions = {u: np.asarray(p) for u, p in zip(info["sop_instance_uids"], info["positions"])}
    normal = case.geometry.direction_matrix[:, 2]
    for roi in ds.ROIContourSequence:
        name = names[int(roi.ReferencedROINumber)]
        assert tuple(int(v) for v in roi.ROIDisplayColor) == labels.color_255(name)
        for c in roi.ContourSequence:
            assert len(c.ContourImageSequence) == 1
            ref = c.ContourImageSequence[0]
            assert ref.ReferencedSOPClassUID == info["sop_class_uid"]
            assert ref.ReferencedSOPInstanceUID in ct_uids
            pts = np.asarray(c.ContourData, float).reshape(-1, 3)
            assert len(pts) == int(c.NumberOfContourPoints) >= 3
            assert np.abs((pts - positions[ref.ReferencedSOPInstanceUID]) @ normal).max() < 1e-3
    # the folder still reads as the same CT with the RTSTRUCT inside it
    assert ds.ApprovalStatus == "UNAPPROVED"


def test_roi_excluded_by_default_and_name_maps(case, ct, all_masks, tmp_path):
    out = rtstruct.write_rtstruct(tmp_path / "a.dcm", all_masks, case.geometry, ct[0], name_map="tg263",
                                  side="left")
    ds = pydicom.dcmread(out)
    names = [str(r.ROIName) for r in ds.StructureSetROISequence]
    assert len(names) == 7 and "Parotid_L" in names and "Skin" in names and "Bone_Mastoid_L" in names
    assert all(len(n) <= 16 for n in names)
    assert str(ds.StructureSetROISequence[0].ROIDescription) == labels.PAROTID
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({labels.PAROTID: "PAROTID_LT", labels.ROI: "z_ROI"}))
    out2 = rtstruct.write_rtstruct(tmp_path / "b.dcm", all_masks, case.geometry, ct[0], name_map=mapping,
                                   include_roi=True)
    names2 = [str(r.ROIName) for r in pydicom.dcmread(out2).StructureSetROISequence]
    assert names2[0] == "PAROTID_LT" and names2[-1] == "z_ROI" and labels.SKIN in names2
    with pytest.raises(InputError, match="Name map not found"):
        rtstruct.write_rtstruct(tmp_path / "c.dcm", all_masks, case.geometry, ct[0], name_map=tmp_path / "no.json")
    assert not (tmp_path / "c.dcm").exists()


def test_refuses_overwrite_and_writes_atomically(case, ct, all_masks, tmp_path):
    out = tmp_path / "rs.dcm"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        rtstruct.write_rtstruct(out, all_masks, case.geometry, ct[0])
    assert out.read_bytes() == b"keep me"
    rtstruct.write_rtstruct(out, all_masks, case.geometry, ct[0], force=True)
    assert pydicom.dcmread(out).SOPClassUID == RTSS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rs.dcm"]  # no temp files left
    with pytest.raises(InputError, match="does not exist"):
        rtstruct.write_rtstruct(tmp_path / "nope" / "rs.dcm", all_masks, case.geometry, ct[0])


def test_mask_on_cropped_grid_is_resampled(case, ct, tmp_path):
    """A segmentation stored on a crop of the CT grid lands on the right CT slices."""
    g = case.geometry
    lo, hi = (5, 10, 20), (g.shape[0] - 5, g.shape[1] - 10, g.shape[2] - 30)
    crop_geom = g.crop(lo, hi)
    full = case.labels[labels.PAROTID]
    crop = full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    out = rtstruct.write_rtstruct(tmp_path / "rs.dcm", {labels.PAROTID: crop}, crop_geom, ct[0])
    back = rtstruct.read_rtstruct_masks(out, ct[0])[labels.PAROTID]
    expected = np.zeros(g.shape, bool)
    expected[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = crop
    assert dsc(back, expected) == 1.0


def test_segmentation_not_on_this_ct_refused(case, ct, tmp_path):
    g = case.geometry
    far = Geometry(g.size, g.spacing, tuple(np.asarray(g.origin) + [0, 0, 5000.0]), g.direction)
    with pytest.raises(GeometryError, match="does not overlap"):
        rtstruct.write_rtstruct(tmp_path / "rs.dcm", {labels.PAROTID: case.labels[labels.PAROTID]}, far, ct[0])
    assert not (tmp_path / "rs.dcm").exists()


def test_oblique_and_uneven_ct(tmp_path):
    """Non-identity direction + uneven slices: contours sit on the original slices; read back on the read grid."""
    geom = Geometry((40, 36, 12), (1.1, 0.9, 2.0), (-30.0, 20.0, 10.0), rotation((0, 15, 25)).ravel())
    z = np.array([0, 2, 4, 6, 7, 8, 10, 12, 14, 16, 18, 20], float)
    arr = np.full(geom.shape, 40, np.int16)
    info = write_ct_series(tmp_path / "ct", arr, geom, z_offsets_mm=z)
    _, read_geom, meta = dicomio.read_ct_series(tmp_path / "ct")
    assert meta["resampled"]
    kk, jj, ii = np.indices(read_geom.shape)
    box = (np.abs(ii - 20) < 10) & (np.abs(jj - 18) < 8) & (kk >= 2) & (kk <= 8)
    out = rtstruct.write_rtstruct(tmp_path / "rs.dcm", {labels.PAROTID: box}, read_geom, tmp_path / "ct")
    ds = pydicom.dcmread(out)
    refs = {c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in ds.ROIContourSequence[0].ContourSequence}
    assert refs <= set(info["sop_instance_uids"])
    assert len(refs) == int(np.sum((z >= 4) & (z <= 16)))  # every original slice between 4 and 16 mm
    back = rtstruct.read_rtstruct_masks(out, tmp_path / "ct")[labels.PAROTID]
    assert dsc(back, box) >= 0.95


def test_export_cli_from_seg_nrrd(case, ct, all_masks, tmp_path, capsys):
    seg = segio.write_seg(tmp_path / "case.seg.nrrd", all_masks, case.geometry, side="left")
    out = tmp_path / "out.dcm"
    argv = ["export-rtstruct", "--seg", str(seg), "--dicom", str(ct[0]), "--out", str(out), "--name-map", "tg263"]
    assert cli.main(argv) == 0
    ds = pydicom.dcmread(out)
    assert len(ds.StructureSetROISequence) == 7 and ds.StructureSetROISequence[0].ROIName == "Parotid_L"
    assert ds.StructureSetROISequence[0].ROIGenerationAlgorithm == "SEMIAUTOMATIC"
    back = rtstruct.read_rtstruct_masks(out, ct[0])
    assert dsc(back["Parotid_L"], all_masks[labels.PAROTID]) >= 0.95
    # refuses to overwrite; --force replaces; --include-roi adds the CONTROL ROI
    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(argv + ["--force", "--include-roi"]) == 0
    ds = pydicom.dcmread(out)
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence][-1] == "CONTROL"
    # a wrong series UID is a clean error, not a traceback
    assert cli.main(argv + ["--force", "--series-uid", "1.2.3"]) == 2
    assert "not found" in capsys.readouterr().err
    # the CT folder with an RTSTRUCT in it still reads as the CT
    rtstruct.write_rtstruct(Path(ct[0]) / "rs_inside.dcm", all_masks, case.geometry, ct[0])
    try:
        a, _, _ = dicomio.read_ct_series(ct[0])
        np.testing.assert_array_equal(a, case.ct)
    finally:
        os.remove(Path(ct[0]) / "rs_inside.dcm")


def test_contour_extractor_exact_on_random_masks():
    rng = np.random.default_rng(7)
    for _ in range(200):
        shape = tuple(rng.integers(1, 25, 2))
        m = rng.random(shape) < rng.random()
        loops = rtstruct.extract_contours(m)
        np.testing.assert_array_equal(rtstruct.rasterize_even_odd(loops, m.shape), m)
        for loop in loops:  # vertices on midpoints between voxel centres; no collinear vertices
            assert np.all(np.isclose((loop * 2) % 1, 0))
            assert len(loop) >= 4
