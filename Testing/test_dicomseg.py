"""DICOM SEG export (ParotidOARLib.dicomseg) via highdicom, re-read with highdicom and pydicom."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicom_utils import phantom_case, write_ct_series  # noqa: E402

from ParotidOARLib import dicomseg, labels  # noqa: E402
from ParotidOARLib.errors import DicomError, OutputExistsError  # noqa: E402

hd = pytest.importorskip("highdicom", reason="highdicom is part of the test install (requirements-test.txt)")


@pytest.fixture(scope="module")
def case():
    return phantom_case(0, "left")


@pytest.fixture(scope="module")
def ct(case, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    return folder, write_ct_series(folder, case.ct, case.geometry)


def test_dicom_seg_round_trip(case, ct, tmp_path):
    folder, info = ct
    masks = dict(case.labels)
    masks[labels.ROI] = case.roi
    out = dicomseg.write_dicom_seg(tmp_path / "seg.dcm", masks, case.geometry, folder)
    seg = hd.seg.segread(out)
    assert seg.number_of_segments == len(masks)
    # one frame per (segment, CT slice where the segment is present); empty frames omitted
    expected_frames = sum(int(m.reshape(m.shape[0], -1).any(axis=1).sum()) for m in masks.values())
    assert int(seg.NumberOfFrames) == expected_frames
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == info["study_uid"] and ds.FrameOfReferenceUID == info["frame_of_reference_uid"]
    assert ds.SeriesInstanceUID != info["series_uid"]
    ref_series = ds.ReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == info["series_uid"]
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} <= set(
        info["sop_instance_uids"])
    # segment labels and codes from labels.py: SNOMED CT as SCT, private codes as 99POAR
    by_label = {str(s.SegmentLabel): s for s in ds.SegmentSequence}
    assert set(by_label) == set(masks)
    for name in masks:
        s = by_label[name]
        scheme, value, _ = labels.info(name).type_code
        t = s.SegmentedPropertyTypeCodeSequence[0]
        assert (t.CodingSchemeDesignator, t.CodeValue) == (scheme, value)
    assert by_label[labels.PAROTID].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert by_label[labels.MASTOID].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "99POAR"
    assert by_label[labels.ROI].SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "99POAR"
    # pixel content: rebuild each mask by source instance (k order) and compare
    uids = info["sop_instance_uids"]
    for s in ds.SegmentSequence:
        number = int(s.SegmentNumber)
        pix = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number],
                                                ignore_spatial_locations=True)
        np.testing.assert_array_equal(pix[..., 0].astype(bool), masks[str(s.SegmentLabel)])


def test_dicom_seg_refuses_overwrite(case, ct, tmp_path):
    out = tmp_path / "seg.dcm"
    out.write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        dicomseg.write_dicom_seg(out, dict(case.labels), case.geometry, ct[0])
    assert out.read_bytes() == b"x"


def test_missing_highdicom_gives_clear_error(case, ct, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom → ImportError
    with pytest.raises(DicomError, match="pip install highdicom"):
        dicomseg.write_dicom_seg(tmp_path / "seg.dcm", dict(case.labels), case.geometry, ct[0])
    assert not (tmp_path / "seg.dcm").exists()
