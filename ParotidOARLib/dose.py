"""Dose to organs at risk for automatic vs reference contours (the paper's Table 3).

A dose volume (RTDOSE or any scalar volume in Gy, on any grid) is resampled
onto the CT/segmentation grid with SimpleITK (linear interpolation, physical
space; voxels outside the dose grid get 0 Gy and are reported). Per structure:

* **Dmean** — mean voxel dose inside the structure;
* **Dmax** — maximum voxel dose inside the structure;
* **D2cc** — the minimum dose to the hottest 2 cm³: voxel doses sorted in
  descending order, the dose of the k-th voxel with k = ceil(2 cc / voxel
  volume) (no interpolation). NaN with the flag ``volume_below_2cc`` when the
  structure is smaller than 2 cc.

Empty structures give NaN and the flag ``empty``.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import GeometryError, InputError
from .imageio import Geometry, to_sitk

D2CC_VOLUME_CC = 2.0


RTDOSE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.2"


def _is_dicom_file(path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_dose(path) -> tuple[np.ndarray, Geometry]:
    """A dose volume in Gy → (float32 array ``[k, j, i]``, Geometry).

    DICOM RTDOSE files are read with pydicom: pixel values × DoseGridScaling,
    geometry from ImagePositionPatient / ImageOrientationPatient /
    PixelSpacing / GridFrameOffsetVector (relative when its first value is 0,
    else absolute along the slice normal). Other files (NRRD, NIfTI, MHA) are
    read as scalar volumes already in Gy.
    """
    from pathlib import Path

    from .imageio import read_image

    path = Path(path)
    if not path.exists():
        raise InputError(f"Dose file not found: {path}.")
    if path.is_file() and (path.suffix.lower() == ".dcm" or _is_dicom_file(path)):
        return _read_rtdose(path)
    array, geometry = read_image(path)
    return array.astype(np.float32), geometry


def _read_rtdose(path) -> tuple[np.ndarray, Geometry]:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # pydicom raises several types on bad files
        raise InputError(f"Cannot read {path} as DICOM ({exc}).") from None
    if str(ds.get("Modality", "")) != "RTDOSE":
        raise InputError(f"{path} is a DICOM {ds.get('Modality', '?')} file, not an RTDOSE.")
    units = str(ds.get("DoseUnits", "GY")).upper()
    if units != "GY":
        raise InputError(f"{path} has DoseUnits {units}; only absolute dose in Gy (GY) can be evaluated.")
    try:
        pixels = ds.pixel_array.astype(np.float64) * float(ds.get("DoseGridScaling", 1.0))
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        offsets = np.asarray([float(v) for v in ds.get("GridFrameOffsetVector", [0.0])])
    except (AttributeError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: incomplete RTDOSE geometry ({exc}).") from None
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.shape[0] != offsets.size:
        raise InputError(f"{path}: {pixels.shape[0]} frames but {offsets.size} grid frame offsets.")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if offsets.size > 1 and offsets[0] != 0:
        offsets = offsets - float(ipp @ normal)  # absolute positions along the normal → relative
    if offsets.size > 1:
        steps = np.diff(offsets)
        if not np.allclose(steps, steps[0], rtol=1e-3, atol=1e-3) or abs(steps[0]) < 1e-6:
            raise InputError(f"{path}: dose frames are not evenly spaced; cannot build a regular grid.")
        dz = float(steps[0])
    else:
        dz = 1.0
    origin = ipp + offsets[0] * normal
    if dz < 0:  # frames run against the normal: reverse them
        pixels = pixels[::-1]
        origin = ipp + offsets[-1] * normal
        dz = -dz
    direction = np.column_stack([row_dir, col_dir, normal])
    geometry = Geometry((pixels.shape[2], pixels.shape[1], pixels.shape[0]), (col_spacing, row_spacing, dz),
                        tuple(origin), direction.ravel())
    return pixels.astype(np.float32), geometry


def resample_dose_to(dose: np.ndarray, dose_geometry: Geometry, target: Geometry) -> tuple[np.ndarray, float]:
    """Dose (Gy, ``[k, j, i]``) resampled onto ``target`` (linear). Returns (float32 array, fraction outside).

    The fraction is the share of target voxels whose centre lies outside the
    dose grid's voxel-centre hull (they are set to 0 Gy).
    """
    import SimpleITK as sitk

    dose = np.asarray(dose, dtype=np.float32)
    if dose.shape != dose_geometry.shape:
        raise GeometryError(f"Dose array shape {dose.shape} does not match its geometry {dose_geometry.shape}.")
    if not np.all(np.isfinite(dose)):
        raise InputError("The dose volume contains NaN/inf values; it is not a usable dose in Gy.")
    if dose_geometry.same_grid(target):
        return dose.copy(), 0.0
    img = to_sitk(dose, dose_geometry)
    ref = to_sitk(np.zeros(target.shape, np.uint8), target)
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    # coverage: resample a ones-image with nearest neighbour, default 0
    ones = to_sitk(np.ones(dose.shape, np.uint8), dose_geometry)
    cover = sitk.GetArrayFromImage(sitk.Resample(ones, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    return sitk.GetArrayFromImage(out), float(1.0 - cover.mean())


def dose_statistics(dose_gy: np.ndarray, mask: np.ndarray, voxel_volume_cc: float) -> dict:
    """Dmean, D2cc, Dmax (Gy) and volume (cc) of ``mask`` on the same grid as ``dose_gy``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != np.shape(dose_gy):
        raise GeometryError(f"Mask shape {mask.shape} does not match the dose grid {np.shape(dose_gy)}.")
    values = np.asarray(dose_gy)[mask].astype(np.float64)
    flags = []
    out = {"volume_cc": values.size * voxel_volume_cc}
    if values.size == 0:
        flags.append("empty")
        out.update(dmean_gy=math.nan, d2cc_gy=math.nan, dmax_gy=math.nan, flags=flags)
        return out
    out["dmean_gy"] = float(values.mean())
    out["dmax_gy"] = float(values.max())
    k = int(math.ceil(D2CC_VOLUME_CC / voxel_volume_cc - 1e-9))
    if k > values.size:
        flags.append("volume_below_2cc")
        out["d2cc_gy"] = math.nan
    else:
        # k-th largest value without a full sort
        out["d2cc_gy"] = float(np.partition(values, values.size - k)[values.size - k])
    out["flags"] = flags
    return out


def compare_dose(dose: np.ndarray, dose_geometry: Geometry, geometry: Geometry, auto_masks: dict,
                 ref_masks: dict, names=None) -> dict:
    """Dose statistics for automatic and reference contours of each structure, and auto − reference.

    Returns ``{"segments": {NAME: {"auto": {...}, "reference": {...}, "difference": {dmean_gy, d2cc_gy,
    dmax_gy}}}, "notes": [...], "dose_max_gy": float}``.
    """
    resampled, outside = resample_dose_to(dose, dose_geometry, geometry)
    notes = []
    if not dose_geometry.same_grid(geometry):
        notes.append("The dose was resampled onto the segmentation grid (SimpleITK, linear interpolation).")
    if outside > 0:
        notes.append(f"{100 * outside:.1f} % of the segmentation grid lies outside the dose grid (set to 0 Gy).")
    if names is None:
        names = [n for n in ref_masks if n in auto_masks]
    vcc = geometry.voxel_volume_cc
    segments = {}
    for name in names:
        if name not in auto_masks or name not in ref_masks:
            notes.append(f"{name}: missing from the {'automatic' if name not in auto_masks else 'reference'} "
                         "contours; skipped.")
            continue
        a = dose_statistics(resampled, auto_masks[name], vcc)
        r = dose_statistics(resampled, ref_masks[name], vcc)
        diff = {k: a[k] - r[k] for k in ("dmean_gy", "d2cc_gy", "dmax_gy", "volume_cc")}
        segments[name] = {"auto": a, "reference": r, "difference": diff}
    return {"segments": segments, "notes": notes, "dose_max_gy": float(resampled.max()) if resampled.size else 0.0}


def dose_rows(result: dict) -> list[dict]:
    rows = []
    for name, s in result["segments"].items():
        row = {"segment": name}
        for side in ("auto", "reference", "difference"):
            for k in ("dmean_gy", "d2cc_gy", "dmax_gy", "volume_cc"):
                row[f"{side}_{k}"] = s[side].get(k)
        rows.append(row)
    return rows
