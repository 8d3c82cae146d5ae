"""Read a CT series from a DICOM folder.

``read_ct_series(folder, series_uid=None) -> (array int16 HU [k, j, i], Geometry, meta)``

* The folder is scanned recursively; headers are read with pydicom
  (``stop_before_pixels``) and grouped by Series Instance UID.
* The CT series is chosen by Modality ``CT`` and SOP Class (CT Image Storage,
  Enhanced CT, Legacy Converted Enhanced CT). Other series (MR, RTDOSE,
  RTSTRUCT, SEG, ...) are ignored. With several CT series the reader refuses and
  lists them (Series Instance UID, description, slice count) unless
  ``series_uid`` picks one.
* Slices are sorted along the normal of ImageOrientationPatient. Gantry tilt
  (slice positions not stacked along that normal, or GantryDetectorTilt ≠ 0)
  is refused; a gap of 1.5× the median slice spacing or more is refused as
  missing slice(s); other uneven spacing is resampled (linear, along the slice
  normal) to the median spacing with a warning in ``meta["warnings"]``.
* Pixel data are decoded by SimpleITK/GDCM (uncompressed, RLE, JPEG lossless,
  JPEG-LS, JPEG 2000), falling back to pydicom's decoders; Rescale Slope /
  Intercept are applied.

Privacy: identifiers (patient ID, UIDs) are kept in ``meta`` so the outputs
(RTSTRUCT, DICOM SEG) can reference the source, but they are never logged.
Error messages contain only Series Instance UIDs (needed to choose a series),
series descriptions, modalities and slice counts — never names, IDs or dates.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DicomError, InputError
from .imageio import Geometry

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_IMAGE_STORAGE)

#: relative tolerance on slice spacing before a series counts as "uneven"
UNEVEN_TOLERANCE = 0.01
#: a gap of this many median spacings (or more) means missing slice(s)
MISSING_GAP_FACTOR = 1.5
#: largest accepted in-plane drift of slice positions per mm along the normal (tan of ~0.3 degrees)
TILT_TOLERANCE = 0.005
#: GantryDetectorTilt values (degrees) up to this are treated as zero
GANTRY_TILT_TOLERANCE_DEG = 0.01

_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "Modality", "SeriesInstanceUID", "SeriesDescription",
                "SeriesNumber", "StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "ImagePositionPatient",
                "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "RescaleSlope", "RescaleIntercept",
                "GantryDetectorTilt", "NumberOfFrames", "InstanceNumber", "SliceThickness", "ImageType",
                "SpecificCharacterSet"]


@dataclass
class SliceHeader:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    modality: str
    series_instance_uid: str
    study_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    series_description: str = ""
    series_number: str = ""
    patient_id: str = ""
    position: tuple | None = None
    orientation: tuple | None = None
    pixel_spacing: tuple | None = None
    rows: int = 0
    columns: int = 0
    gantry_tilt: float = 0.0
    number_of_frames: int = 1
    transfer_syntax: str = ""
    localizer: bool = False


@dataclass
class SeriesInfo:
    series_instance_uid: str
    modality: str
    description: str
    slices: list[SliceHeader] = field(default_factory=list)

    @property
    def is_ct(self) -> bool:
        return self.modality == "CT" and any(s.sop_class_uid in CT_SOP_CLASSES for s in self.slices)

    @property
    def count(self) -> int:
        return len(self.slices)

    def summary(self) -> str:
        desc = self.description or "(no description)"
        return f"{self.series_instance_uid}  {self.modality}  '{desc}'  {self.count} file(s)"


# --------------------------------------------------------------------------- scanning
def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    # files without the preamble (rare): a group 0x0008 element at offset 0
    return len(head) >= 8 and head[0:2] == b"\x08\x00" and head[2:4] in (b"\x05\x00", b"\x08\x00", b"\x16\x00")


def _iter_files(folder: Path):
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            yield Path(root) / name


def is_dicom_folder(path) -> bool:
    """True when ``path`` is a folder with at least one DICOM file in it (searched recursively)."""
    path = Path(path)
    if not path.is_dir():
        return False
    return any(_looks_like_dicom(p) for p in _iter_files(path))


def _floats(value, n):
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def read_header(path: Path) -> SliceHeader | None:
    """Header of one DICOM file (no pixel data), or None if it is not a usable DICOM instance."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception:  # not DICOM / truncated
        return None
    sop_class = str(ds.get("SOPClassUID", "") or "")
    series = str(ds.get("SeriesInstanceUID", "") or "")
    if not sop_class or not series:
        return None
    h = SliceHeader(
        path=path, sop_class_uid=sop_class, sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        modality=str(ds.get("Modality", "") or ""), series_instance_uid=series,
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        series_number=str(ds.get("SeriesNumber", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        rows=int(ds.get("Rows", 0) or 0), columns=int(ds.get("Columns", 0) or 0),
        number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
        transfer_syntax=str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""),
    )
    image_type = ds.get("ImageType") or []
    image_type = [image_type] if isinstance(image_type, str) else list(image_type)
    h.localizer = any(str(v).upper() == "LOCALIZER" for v in image_type)
    try:
        h.gantry_tilt = float(ds.get("GantryDetectorTilt", 0.0) or 0.0)
    except (TypeError, ValueError):
        h.gantry_tilt = 0.0
    return h


def scan_folder(folder) -> list[SeriesInfo]:
    """All DICOM series under ``folder`` (recursive), in order of first appearance."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"DICOM folder not found: {folder}. Check the path.")
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; pass the folder holding the DICOM series.")
    series: dict[str, SeriesInfo] = {}
    for path in _iter_files(folder):
        if not _looks_like_dicom(path):
            continue
        h = read_header(path)
        if h is None:
            continue
        s = series.get(h.series_instance_uid)
        if s is None:
            s = series[h.series_instance_uid] = SeriesInfo(h.series_instance_uid, h.modality,
                                                           h.series_description)
        s.slices.append(h)
    return list(series.values())


def choose_ct_series(series: list[SeriesInfo], series_uid: str | None = None, folder=None) -> SeriesInfo:
    where = f" in {folder}" if folder is not None else ""
    if not series:
        raise DicomError(f"No DICOM files found{where}. Pass a folder that holds a CT series.")
    listing = "\n".join("  " + s.summary() for s in series)
    if series_uid:
        for s in series:
            if s.series_instance_uid == series_uid:
                if not s.is_ct:
                    raise DicomError(f"Series {series_uid} is {s.modality or 'not a CT'}, not a CT image series. "
                                     f"Series found{where}:\n{listing}")
                return s
        raise DicomError(f"Series {series_uid} not found{where}. Series found:\n{listing}\n"
                         "Pass one of the CT Series Instance UIDs above with --series-uid.")
    cts = [s for s in series if s.is_ct]
    if not cts:
        raise DicomError(f"No CT image series found{where}. Series found:\n{listing}\n"
                         "ParotidOAR needs a CT (Modality CT, CT Image Storage).")
    if len(cts) > 1:
        ct_listing = "\n".join("  " + s.summary() for s in cts)
        raise DicomError(f"{len(cts)} CT series found{where}; choose one with --series-uid:\n{ct_listing}")
    return cts[0]


# --------------------------------------------------------------------------- geometry
@dataclass
class SliceStack:
    """A CT series' slices sorted along the slice normal, with its geometry checked."""

    slices: list[SliceHeader]
    row_cosine: np.ndarray  # direction of increasing column index (i)
    col_cosine: np.ndarray  # direction of increasing row index (j)
    normal: np.ndarray
    pixel_spacing_ij: tuple[float, float]  # (along i, along j) mm
    positions_mm: np.ndarray  # projection of each IPP on the normal
    spacing: float  # slice spacing used (mean if even, median if resampled)
    uneven: bool
    warnings: list[str]

    @property
    def rows(self) -> int:
        return self.slices[0].rows

    @property
    def columns(self) -> int:
        return self.slices[0].columns

    def geometry(self, nk: int | None = None) -> Geometry:
        direction = np.column_stack([self.row_cosine, self.col_cosine, self.normal])
        nk = len(self.slices) if nk is None else nk
        return Geometry((self.columns, self.rows, nk),
                        (self.pixel_spacing_ij[0], self.pixel_spacing_ij[1], self.spacing),
                        self.slices[0].position, direction.ravel())

    def volume_geometry(self) -> Geometry:
        """Grid of the volume :func:`read_ct_series` returns (resampled to the median spacing when uneven)."""
        if not self.uneven:
            return self.geometry()
        z = self.positions_mm - self.positions_mm[0]
        return self.geometry(int(np.floor(z[-1] / self.spacing + 1e-6)) + 1)

    def slice_geometry(self, index: int) -> Geometry:
        """One-slice geometry (size nk=1) of original slice ``index`` (at its own position)."""
        direction = np.column_stack([self.row_cosine, self.col_cosine, self.normal])
        return Geometry((self.columns, self.rows, 1),
                        (self.pixel_spacing_ij[0], self.pixel_spacing_ij[1], self.spacing),
                        self.slices[index].position, direction.ravel())


def build_stack(series: SeriesInfo) -> SliceStack:
    """Sort, check and describe the slices of a (single-frame) CT series."""
    uid = series.series_instance_uid
    # scout / localizer images sometimes share the axial series: they are not part of the volume
    slices = [s for s in series.slices if s.sop_class_uid in CT_SOP_CLASSES and not s.localizer]
    if any(s.number_of_frames > 1 for s in slices):
        raise DicomError(f"Series {uid} is a multi-frame (Enhanced) CT; only single-frame CT Image Storage "
                         "series are supported. Convert it to classic single-frame CT (for example with "
                         "dcm2niix → NRRD, or Slicer's DICOM export) first.")
    if len(slices) < 2:
        raise DicomError(f"Series {uid} has {len(slices)} CT slice(s); a 3D CT needs at least 2.")
    missing = [s for s in slices if s.position is None or s.orientation is None or s.pixel_spacing is None]
    if missing:
        raise DicomError(f"Series {uid}: {len(missing)} slice(s) lack ImagePositionPatient, "
                         "ImageOrientationPatient or PixelSpacing; cannot place them in space.")
    first = slices[0]
    for s in slices:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise DicomError(f"Series {uid}: slices have different sizes ({first.rows}x{first.columns} and "
                             f"{s.rows}x{s.columns}); it is not one volume.")
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise DicomError(f"Series {uid}: slices have different ImageOrientationPatient; it is not one volume.")
        if s.frame_of_reference_uid != first.frame_of_reference_uid:
            raise DicomError(f"Series {uid}: slices have different Frames of Reference; it is not one volume.")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, atol=1e-4):
            raise DicomError(f"Series {uid}: slices have different PixelSpacing; it is not one volume.")
    tilts = [s.gantry_tilt for s in slices if abs(s.gantry_tilt) > GANTRY_TILT_TOLERANCE_DEG]
    if tilts:
        raise DicomError(f"Series {uid} was acquired with gantry tilt ({tilts[0]:g} degrees). Tilted CT is not "
                         "supported: reconstruct the series without tilt, or resample it to an orthogonal grid "
                         "(e.g. Slicer's 'Acquisition transform' on DICOM load) and pass it as NRRD.")
    row = np.asarray(first.orientation[:3], float)
    col = np.asarray(first.orientation[3:], float)
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    if abs(float(row @ col)) > 1e-3:
        raise DicomError(f"Series {uid}: ImageOrientationPatient row and column directions are not orthogonal.")
    normal = np.cross(row, col)
    ipp = np.array([s.position for s in slices], float)
    proj = ipp @ normal
    order = np.argsort(proj, kind="stable")
    slices = [slices[i] for i in order]
    ipp = ipp[order]
    proj = proj[order]
    diffs = np.diff(proj)
    if np.any(diffs < 1e-3):
        raise DicomError(f"Series {uid} has two or more slices at the same position (duplicate files, or "
                         "several acquisitions in one series); keep one image per position.")
    # gantry tilt seen in the geometry: positions drift in-plane as we move along the normal
    steps = np.diff(ipp, axis=0)
    inplane = steps - np.outer(steps @ normal, normal)
    drift = np.linalg.norm(inplane, axis=1) / diffs
    if np.max(drift) > TILT_TOLERANCE:
        angle = float(np.degrees(np.arctan(np.max(drift))))
        raise DicomError(f"Series {uid}: slice positions are not stacked along the slice normal (about "
                         f"{angle:.1f} degrees of shear: gantry tilt). Tilted CT is not supported: reconstruct "
                         "without tilt or resample to an orthogonal grid and pass it as NRRD.")
    median = float(np.median(diffs))
    warnings: list[str] = []
    gaps = np.nonzero(diffs >= MISSING_GAP_FACTOR * median)[0]
    if gaps.size:
        g = int(gaps[0])
        n_missing = int(sum(max(1, round(diffs[i] / median) - 1) for i in gaps))
        raise DicomError(f"Series {uid} has missing slice(s): a gap of {diffs[g]:.2f} mm (median spacing "
                         f"{median:.2f} mm) after slice {g + 1} of {len(slices)}; about {n_missing} slice(s) "
                         "missing in total. Re-export the complete series.")
    uneven = bool(np.max(np.abs(diffs - median)) > UNEVEN_TOLERANCE * median)
    if uneven:
        spacing = median
        warnings.append(f"Uneven slice spacing ({diffs.min():.3f}-{diffs.max():.3f} mm); resampled to the median "
                        f"spacing {median:.3f} mm (linear interpolation along the slice normal).")
    else:
        spacing = float((proj[-1] - proj[0]) / (len(slices) - 1))
    ps = first.pixel_spacing  # (row spacing = along j, column spacing = along i)
    return SliceStack(slices, row, col, normal, (float(ps[1]), float(ps[0])), proj, spacing, uneven, warnings)


# --------------------------------------------------------------------------- pixels
def _read_pixels(h: SliceHeader) -> np.ndarray:
    """HU values (float64) of one slice as [rows, columns]."""
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(h.path))
        img = reader.Execute()
        arr = sitk.GetArrayFromImage(img).astype(np.float64)
        return arr.reshape(arr.shape[-2:]) if arr.ndim == 3 and arr.shape[0] == 1 else arr
    except RuntimeError:
        pass
    try:  # pydicom decoders (RLE natively; JPEG with pylibjpeg if installed)
        import pydicom

        try:
            from pydicom.pixels import apply_rescale  # pydicom >= 3
        except ImportError:  # pydicom 2.x
            from pydicom.pixel_data_handlers.util import apply_modality_lut as apply_rescale

        ds = pydicom.dcmread(str(h.path))
        return np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float64)
    except Exception as exc:
        damage = _pixel_data_damage(h)
        if damage:
            raise DicomError(f"{h.path} is truncated or damaged ({damage}). Copy or export that file (or the whole "
                             "series) again.") from None
        raise DicomError(f"Cannot decode the pixel data of {h.path.name} (transfer syntax {h.transfer_syntax}): "
                         f"{type(exc).__name__}. Decompress the series (e.g. 'gdcmconv --raw') and retry.") from None


#: transfer syntaxes whose pixel data is stored as is (its length is known from the header)
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _pixel_data_damage(h: SliceHeader) -> str | None:
    """Why a slice's pixel data cannot be read when it is not a compression problem: the file ends early
    (uncompressed pixel data shorter than rows x columns x bytes), has no pixel data, or cannot be read
    past its header. None if nothing of the kind is found."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(h.path))
        data = ds.get("PixelData")
    except Exception as exc:  # the header was read before: the rest of the file is damaged
        return f"the file cannot be read past its header: {type(exc).__name__}"
    if data is None:
        return "it has no pixel data"
    if h.transfer_syntax in _UNCOMPRESSED:
        expected = (int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "NumberOfFrames", 1) or 1)
                    * int(getattr(ds, "SamplesPerPixel", 1) or 1) * (int(ds.BitsAllocated) // 8))
        if len(data) < expected:
            return f"{len(data)} of {expected} bytes of pixel data"
    return None


def read_ct_series(folder, series_uid: str | None = None) -> tuple[np.ndarray, Geometry, dict]:
    """Read the CT series in ``folder`` → (int16 HU array ``[k, j, i]``, Geometry, meta).

    ``meta``: ``format`` ("dicom"), ``patient_id``, ``study_instance_uid``,
    ``series_instance_uid``, ``frame_of_reference_uid``, ``series_description``,
    ``modality``, ``sop_class_uid``, ``slices`` (list of ``{"sop_instance_uid",
    "z_mm", "position"}`` in sorted order, ``z_mm`` = position along the slice
    normal), ``sop_instance_uids`` (per array slice in k order; ``None`` for
    interpolated slices when resampled), ``resampled`` (bool), ``warnings``.
    """
    folder = Path(folder)
    stack = load_stack(folder, series_uid)
    n = len(stack.slices)
    raw = np.empty((n, stack.rows, stack.columns), dtype=np.float64)
    for k, h in enumerate(stack.slices):
        px = _read_pixels(h)
        if px.shape != (stack.rows, stack.columns):
            raise DicomError(f"Slice {k + 1} of series {stack.slices[0].series_instance_uid} decodes to "
                             f"{px.shape}, expected {(stack.rows, stack.columns)}.")
        raw[k] = px
    z = stack.positions_mm - stack.positions_mm[0]
    geometry = stack.volume_geometry()
    if stack.uneven:
        nk = geometry.size[2]
        target = np.arange(nk) * stack.spacing
        idx = np.clip(np.searchsorted(z, target, side="right") - 1, 0, n - 2)
        w = (target - z[idx]) / (z[idx + 1] - z[idx])
        w = np.clip(w, 0.0, 1.0)[:, None, None]
        volume = (1.0 - w) * raw[idx] + w * raw[idx + 1]
        sop_per_k = []
        for t in target:
            hit = np.nonzero(np.abs(z - t) < 1e-3)[0]
            sop_per_k.append(stack.slices[int(hit[0])].sop_instance_uid if hit.size else None)
    else:
        nk = n
        volume = raw
        sop_per_k = [h.sop_instance_uid for h in stack.slices]
    array = np.empty(volume.shape, np.int16)
    np.clip(np.rint(volume), -32768, 32767, out=array, casting="unsafe")
    first = stack.slices[0]
    meta = {
        "source": str(folder),
        "format": "dicom",
        "modality": first.modality,
        "sop_class_uid": first.sop_class_uid,
        "patient_id": first.patient_id,
        "study_instance_uid": first.study_instance_uid,
        "series_instance_uid": first.series_instance_uid,
        "frame_of_reference_uid": first.frame_of_reference_uid,
        "series_description": first.series_description,
        "sop_instance_uids": sop_per_k,
        "slices": [{"sop_instance_uid": h.sop_instance_uid, "z_mm": float(p), "position": list(h.position)}
                   for h, p in zip(stack.slices, stack.positions_mm)],
        "resampled": stack.uneven,
        "warnings": list(stack.warnings),
        "original_dtype": "int16",
    }
    for w_ in stack.warnings:
        log.warning("DICOM series: %s", w_)  # no identifiers
    return array, geometry, meta


def save_dataset(ds, path) -> None:
    """``ds.save_as`` as a conformant Part 10 file (pydicom 3 and 2.x)."""
    try:
        ds.save_as(str(path), enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        ds.save_as(str(path), write_like_original=False)


def load_stack(folder, series_uid: str | None = None) -> SliceStack:
    """Scan ``folder``, choose the CT series and return its checked, sorted slice stack."""
    folder = Path(folder)
    series = scan_folder(folder)
    chosen = choose_ct_series(series, series_uid, folder)
    return build_stack(chosen)
