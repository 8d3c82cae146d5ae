"""Test helper: write synthetic DICOM CT (and non-CT) series with pydicom.

``write_ct_series(folder, array, geometry, ...)`` writes one CT Image Storage
file per k slice of ``array`` (HU, ``[k, j, i]``) on ``geometry`` (any
direction matrix), with proper UIDs (``pydicom.uid.generate_uid``),
ImagePositionPatient / ImageOrientationPatient / PixelSpacing from the
geometry and Rescale Slope / Intercept. Options create the awkward cases the
reader must handle: gantry tilt (sheared positions and/or the
GantryDetectorTilt tag), uneven spacing (explicit slice positions), missing
slices, a non-CT modality, and RLE Lossless compression (pydicom's native
encoder; no extra packages).

Synthetic data only: the patient is "PHANTOM^SYNTHETIC".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"

SOP_CLASS_BY_MODALITY = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE, "RTDOSE": RT_DOSE_STORAGE}


def _ds_str(v: float) -> str:
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def write_ct_series(folder, array, geometry, *, study_uid: str | None = None, series_uid: str | None = None,
                    frame_of_reference_uid: str | None = None, patient_id: str = "PHANTOM-001",
                    series_description: str = "Synthetic CT", series_number: int = 1, modality: str = "CT",
                    z_offsets_mm=None, drop_slices=(), gantry_shear_deg: float = 0.0,
                    gantry_tilt_tag_deg: float | None = None, rescale=(1.0, -1024.0), compress: bool = False,
                    prefix: str | None = None, extra_localizer: bool = False) -> dict:
    """Write ``array`` (HU) as a DICOM series in ``folder``; return UIDs and file paths.

    * ``z_offsets_mm``: per-slice position along the slice normal relative to the
      origin (default ``k * spacing_k``) — use for uneven spacing;
    * ``drop_slices``: k indices not written (missing slices);
    * ``gantry_shear_deg``: shift each slice in-plane along the column direction by
      ``z * tan(angle)`` (positions no longer stacked along the normal, as in a
      tilted acquisition reconstructed without correction);
    * ``gantry_tilt_tag_deg``: value written to GantryDetectorTilt;
    * ``rescale``: (slope, intercept); stored values = (HU - intercept) / slope as uint16;
    * ``compress``: RLE Lossless transfer syntax.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    nk, nj, ni = array.shape
    assert (ni, nj, nk) == tuple(geometry.size), "array and geometry disagree"
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    d = geometry.direction_matrix
    row, col, normal = d[:, 0], d[:, 1], d[:, 2]
    si, sj, sk = geometry.spacing
    origin = np.asarray(geometry.origin, float)
    z = np.arange(nk) * sk if z_offsets_mm is None else np.asarray(z_offsets_mm, float)
    slope, intercept = rescale
    prefix = prefix or modality
    sop_class = SOP_CLASS_BY_MODALITY[modality]
    sop_uids, paths, positions = [], [], []
    for k in range(nk):
        if k in set(drop_slices):
            continue
        ipp = origin + normal * z[k] + col * (z[k] * np.tan(np.radians(gantry_shear_deg)))
        stored = np.rint((array[k].astype(np.float64) - intercept) / slope)
        stored = np.clip(stored, 0, 65535).astype(np.uint16)
        sop_uid = generate_uid()
        ds = _image_dataset(sop_class, sop_uid, modality, study_uid, series_uid, frame_of_reference_uid,
                            patient_id, series_description, series_number, k + 1)
        ds.ImagePositionPatient = [_ds_str(v) for v in ipp]
        ds.ImageOrientationPatient = [_ds_str(v) for v in list(row) + list(col)]
        ds.PixelSpacing = [_ds_str(sj), _ds_str(si)]
        ds.SliceThickness = _ds_str(sk)
        ds.SliceLocation = _ds_str(float(ipp @ normal))
        if gantry_tilt_tag_deg is not None:
            ds.GantryDetectorTilt = _ds_str(gantry_tilt_tag_deg)
        ds.Rows, ds.Columns = nj, ni
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope = _ds_str(slope)
        ds.RescaleIntercept = _ds_str(intercept)
        ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = stored.tobytes()
        if compress:
            ds.compress(RLELossless)
        path = folder / f"{prefix}{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(sop_uid)
        paths.append(path)
        positions.append(ipp)
    if extra_localizer:  # a scout image in the same series (different orientation): must be ignored
        ds = _image_dataset(sop_class, generate_uid(), modality, study_uid, series_uid, frame_of_reference_uid,
                            patient_id, series_description, series_number, 0)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImagePositionPatient = ["0", "0", "0"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.PixelSpacing = ["1", "1"]
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
        ds.save_as(folder / f"{prefix}_scout.dcm", enforce_file_format=True)
    return {"folder": folder, "study_uid": study_uid, "series_uid": series_uid,
            "frame_of_reference_uid": frame_of_reference_uid, "sop_instance_uids": sop_uids,
            "sop_class_uid": sop_class, "paths": paths, "positions": np.array(positions)}


def _image_dataset(sop_class, sop_uid, modality, study_uid, series_uid, for_uid, patient_id, description,
                   series_number, instance_number) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "ParotidOAR test phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic head and neck"
    ds.SeriesDescription = description
    ds.PatientName = "PHANTOM^SYNTHETIC"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = str(series_number)
    ds.InstanceNumber = str(instance_number)
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.KVP = "120" if modality == "CT" else None
    if ds.KVP is None:
        del ds.KVP
    return ds


def write_case(folder, case, **kwargs) -> dict:
    """Write a phantom case's CT (``case.ct`` on ``case.geometry``) as a DICOM series."""
    return write_ct_series(folder, case.ct, case.geometry, **kwargs)


def read_dataset(path):
    return pydicom.dcmread(str(path))


_CASES: dict = {}


def phantom_case(seed: int = 0, side: str = "left"):
    """A small phantom case (cached per process: generation takes a few seconds)."""
    key = (seed, side)
    if key not in _CASES:
        try:
            from ParotidOARLib import phantom

            _CASES[key] = phantom.generate_case(seed, side, size="small")
        except Exception as exc:  # phantom module missing or broken: fall back to simple shapes
            import warnings

            warnings.warn(f"phantom.generate_case failed ({type(exc).__name__}: {exc}); using simple shapes")
            _CASES[key] = simple_case(seed, side)
    return _CASES[key]


@dataclass
class SimpleCase:
    ct: np.ndarray
    geometry: object
    labels: dict
    roi: np.ndarray
    side: str


def simple_case(seed: int = 0, side: str = "left") -> SimpleCase:
    """Ellipsoid 'head' with a 3 mm skin, a parotid-like ellipsoid and simple OAR shapes (no phantom needed)."""
    from ParotidOARLib import labels
    from ParotidOARLib.imageio import Geometry

    rng = np.random.default_rng(seed)
    geom = Geometry((120, 120, 40), (0.98, 0.98, 2.0), (-60.0, -60.0, -40.0))
    k, j, i = np.indices(geom.shape)
    x, y, z = (geom.index_to_lps(np.stack([i, j, k], -1).reshape(-1, 3)).T).reshape(3, *geom.shape)
    r = np.sqrt((x / 55) ** 2 + (y / 50) ** 2 + (z / 60) ** 2)
    body = r < 1
    skin = body & (r > 1 - 3.0 / 52)
    ct = np.full(geom.shape, -1000, np.int16)
    ct[body] = 40
    ct[skin] = 60
    parotid = ((x - 35) / 12) ** 2 + ((y + 5) / 10) ** 2 + (z / 18) ** 2 < 1
    ct[parotid] = 10
    ramus = (np.abs(x - 30) < 3) & (np.abs(y + 18) < 6) & (np.abs(z) < 20)
    ct[ramus] = 900
    mastoid = ((x - 40) / 6) ** 2 + ((y - 20) / 6) ** 2 + ((z - 15) / 6) ** 2 < 1
    ct[mastoid] = 700
    eac = ((x - 45) ** 2 + (y - 8) ** 2 < 9) & (np.abs(z - 14) < 8) & body
    ct[eac] = -1000
    condyle = ((x - 30) / 4) ** 2 + ((y + 18) / 5) ** 2 + ((z - 24) / 4) ** 2 < 1
    auricle = ((x - 56) / 3) ** 2 + ((y - 8) / 12) ** 2 + ((z - 14) / 16) ** 2 < 1
    ct = (ct + rng.integers(-5, 6, geom.shape)).astype(np.int16)
    masks = {labels.PAROTID: parotid, labels.AURICULA: auricle, labels.CONDYLE: condyle, labels.SKIN: skin,
             labels.MASTOID: mastoid, labels.EAC: eac, labels.RAMUS: ramus & ~condyle}
    roi = ((x - 35) / 29) ** 2 + ((y + 5) / 27) ** 2 + (z / 35) ** 2 < 1
    return SimpleCase(ct, geom, {n: m & roi for n, m in masks.items()}, roi, side)


def rotation(angles_deg) -> np.ndarray:
    """Right-handed rotation matrix (x, then y, then z axis rotation), for non-identity directions."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def dsc(a, b) -> float:
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * (a & b).sum() / total)
