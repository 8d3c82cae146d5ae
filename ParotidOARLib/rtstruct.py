"""DICOM RT Structure Set export (and import back to masks) with pydicom.

``write_rtstruct(out_path, masks, geometry, dicom_dir, ...)`` writes one ROI
per structure with CLOSED_PLANAR contours on the CT slices of the referenced
series; ``export(seg_path, dicom_dir, out_path, ...)`` does the same from a
``.seg.nrrd``; ``read_rtstruct_masks(path, geometry_or_dicom_dir)`` rasterises
an RTSTRUCT back onto a CT grid.

Contours
    Per CT slice, the binary mask is contoured with an oriented marching-squares
    extractor (this module) at the 0.5 iso-level, i.e. through the midpoints
    between voxel centres (on voxel boundaries, with corners cut). Every
    connected island gives its own closed contour; every hole gives its own
    closed contour; an island inside a hole gives another. Diagonal-only
    contacts are resolved as *separate* foreground pieces (4-connected
    foreground). Collinear points are dropped (exact, no smoothing).

Holes: even-odd (XOR) convention
    Holes are written as separate contours, and a point is inside the ROI when
    it is inside an odd number of that slice's contours. This is how SlicerRT,
    plastimatch and most planning systems rasterise several contours on one
    slice, and it needs no "keyhole" cuts (which distort the shape and are
    fragile when imported). Because the iso-line never passes through a voxel
    centre, even-odd rasterisation at voxel centres
    (:func:`read_rtstruct_masks`) gives back exactly the exported mask.

Privacy: patient and study attributes are copied from the CT into the output
(the RTSTRUCT must belong to the same patient and study) and never logged.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path

import numpy as np

from . import __version__, labels
from .errors import DicomError, GeometryError, InputError
from .imageio import Geometry, atomic_file, check_output

log = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
#: Referenced SOP Class for the RT Referenced Study Sequence (Detached Study Management, as used by TPS)
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"

#: TG-263-style names (AAPM TG-263, Mayo et al. 2018); side-specific names take the _L / _R suffix.
#: Parotid, Skin, Bone_Mastoid and Ear_External follow TG-263 primary names; condyle, ramus and canal have no
#: TG-263 entry and are built with its rules (general-to-specific, "_" separated, side suffix, <= 16
#: characters). Check them against your department's list and pass a JSON --name-map where they differ.
TG263 = {
    labels.PAROTID: "Parotid",
    labels.AURICULA: "Ear_External",
    labels.CONDYLE: "Mandible_Cond",
    labels.SKIN: "Skin",
    labels.MASTOID: "Bone_Mastoid",
    labels.EAC: "Canal_Auditory",
    labels.RAMUS: "Mandible_Ramus",
}
_TG263_UNSIDED = {labels.SKIN}


def tg263_name_map(side: str | None) -> dict[str, str]:
    """Canonical name → TG-263 style name (``_L``/``_R`` suffix when the side is known)."""
    suffix = {"left": "_L", "right": "_R"}.get(side or "", "")
    return {k: v if k in _TG263_UNSIDED else v + suffix for k, v in TG263.items()}


def load_name_map(value, side: str | None = None) -> dict[str, str]:
    """``None`` → {}; ``"tg263"`` → :func:`tg263_name_map`; a dict; or a JSON file path {canonical: name}."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if str(value).lower() in ("tg263", "tg-263"):
        return tg263_name_map(side)
    path = Path(value)
    if not path.exists():
        raise InputError(f"Name map not found: {path}. Pass a JSON file {{\"canonical name\": \"your name\"}} "
                         "or 'tg263'.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot read name map {path}: {exc}. It must be a JSON object.") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise InputError(f"Name map {path} must be a JSON object mapping canonical names to strings.")
    return {str(k): v for k, v in data.items()}


# --------------------------------------------------------------------------- contour extraction
def extract_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D binary mask ``[j, i]`` → list of (N, 2) arrays of (i, j) index coordinates.

    Oriented marching squares at iso 0.5: contour vertices lie on the midpoints
    between neighbouring voxel centres. Each loop is closed implicitly (the last
    point is not repeated). Islands and holes each give one loop (even-odd).
    """
    m = np.asarray(mask2d, dtype=bool)
    if not m.any():
        return []
    nj, ni = m.shape
    # crop to the bounding box (+1 padding) for speed
    js, is_ = np.nonzero(m)
    j0, i0 = js.min(), is_.min()
    sub = m[j0:js.max() + 1, i0:is_.max() + 1]
    p = np.pad(sub, 1)
    a = p[:-1, :-1]
    b = p[:-1, 1:]
    c = p[1:, 1:]
    d = p[1:, :-1]
    cj, ci = np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), indexing="ij")
    # edges in traversal order a→b (T), b→c (R), c→d (B), d→a (L); doubled integer coordinates (X=2x, Y=2y)
    ex = [2 * ci + 1, 2 * ci + 2, 2 * ci + 1, 2 * ci]
    ey = [2 * cj, 2 * cj + 1, 2 * cj + 2, 2 * cj + 1]
    first = [a, b, c, d]
    second = [b, c, d, a]
    enter = [~f & s for f, s in zip(first, second)]
    leave = [f & ~s for f, s in zip(first, second)]
    width = 2 * p.shape[1] + 1
    src, dst = [], []
    for e in range(4):
        sel = enter[e]
        if not sel.any():
            continue
        # the next exiting edge in traversal order
        t1, t2, t3 = (e + 1) % 4, (e + 2) % 4, (e + 3) % 4
        target = np.select([leave[t1], leave[t2], leave[t3]], [t1, t2, t3], default=-1)
        for t in (t1, t2, t3):
            s = sel & (target == t)
            if s.any():
                src.append(ey[e][s] * width + ex[e][s])
                dst.append(ey[t][s] * width + ex[t][s])
    src = np.concatenate(src)
    dst = np.concatenate(dst)
    order = np.argsort(src)
    src = src[order]
    dst = dst[order]
    nxt = np.searchsorted(src, dst)  # index of each point's successor
    n = len(src)
    visited = np.zeros(n, bool)
    nxt_l = nxt.tolist()
    loops = []
    for start in range(n):
        if visited[start]:
            continue
        idx = []
        cur = start
        while not visited[cur]:
            visited[cur] = True
            idx.append(cur)
            cur = nxt_l[cur]
        keys = src[idx]
        pts = np.stack([keys % width, keys // width], axis=1)  # (X, Y) doubled
        # drop collinear vertices (exact: directions are multiples of 45 degrees)
        prev = np.roll(pts, 1, axis=0)
        nxtp = np.roll(pts, -1, axis=0)
        v1 = pts - prev
        v2 = nxtp - pts
        cross = v1[:, 0] * v2[:, 1] - v1[:, 1] * v2[:, 0]
        pts = pts[cross != 0]
        xy = pts / 2.0 - 1.0  # undo the doubling and the padding
        xy[:, 0] += i0
        xy[:, 1] += j0
        loops.append(xy)
    return loops


def rasterize_even_odd(polygons, shape) -> np.ndarray:
    """Even-odd fill of polygons given as (N, 2) arrays of (i, j) coordinates on a ``shape = (nj, ni)`` grid.

    A voxel is set when its centre is inside an odd number of polygons (the
    XOR of the individual fills). Half-open rules make shared edges exact.
    """
    nj, ni = shape
    toggles = np.zeros((nj, ni + 1), dtype=np.int32)
    for poly in polygons:
        poly = np.asarray(poly, float)
        if len(poly) < 3:
            continue
        x0, y0 = poly[:, 0], poly[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        ylo = np.minimum(y0, y1)
        yhi = np.maximum(y0, y1)
        r0 = np.ceil(ylo).astype(np.int64)
        r1 = np.ceil(yhi).astype(np.int64)  # rows r with ylo <= r < yhi
        r0 = np.clip(r0, 0, nj)
        r1 = np.clip(r1, 0, nj)
        counts = np.maximum(r1 - r0, 0)
        if counts.sum() == 0:
            continue
        e = np.repeat(np.arange(len(x0)), counts)
        offs = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = r0[e] + offs
        t = (rows - y0[e]) / (y1[e] - y0[e])
        x = x0[e] + t * (x1[e] - x0[e])
        col = np.clip(np.ceil(x).astype(np.int64), 0, ni)  # centres i >= x are right of the crossing
        np.add.at(toggles, (rows, col), 1)
    return (np.cumsum(toggles, axis=1)[:, :ni] % 2).astype(bool)


# --------------------------------------------------------------------------- writing
def _ds(v: float) -> str:
    s = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


_CONTOUR_DATA = 0x30060050


def _raw_ds(tag, values):
    """A DS data element stored pre-encoded (pydicom would otherwise build and validate one object per number,
    which dominates the write time for large structure sets). Values are formatted to <= 16 characters."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    text = "\\".join(_ds(float(v)) for v in values).encode("ascii")
    if len(text) % 2:
        text += b" "
    return RawDataElement(Tag(tag), "DS", len(text), text, 0, False, True)


def _mark_preencoded(ds) -> None:
    """Tell pydicom the contour items are already encoded (explicit VR little endian, the file's own charset),
    so that writing keeps the pre-encoded ContourData bytes instead of decoding and re-encoding them."""
    try:
        for roi in ds.ROIContourSequence:
            for item in roi.get("ContourSequence", []):
                # the item's effective charset (ContourData is ASCII, so any charset is exact)
                item.set_original_encoding(False, True, item._character_set)
    except (AttributeError, TypeError, LookupError):  # other pydicom versions: plain (slower) write
        pass


def _slice_masks(mask: np.ndarray, geometry: Geometry, stack) -> np.ndarray:
    """``mask`` on ``geometry`` → bool array [n_slices, rows, cols] on the CT's original slices."""
    ct_geom = stack.geometry()
    if not stack.uneven and geometry.same_grid(ct_geom):
        return mask
    import SimpleITK as sitk

    from .imageio import to_sitk

    img = to_sitk(mask.astype(np.float32), geometry)
    out = np.zeros((len(stack.slices), stack.rows, stack.columns), bool)
    for s in range(len(stack.slices)):
        ref = sitk.Image(stack.columns, stack.rows, 1, sitk.sitkFloat32)
        stack.slice_geometry(s).apply_to_sitk(ref)
        res = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        out[s] = sitk.GetArrayFromImage(res)[0] >= 0.5
    return out


def _copy_attrs(dst, src, keywords):
    for kw in keywords:
        if kw in src:
            setattr(dst, kw, src[kw].value)


def write_rtstruct(out_path, masks: dict, geometry: Geometry, dicom_dir, *, series_uid: str | None = None,
                   name_map=None, include_roi: bool = False, force: bool = False, side: str | None = None,
                   roi_generation_algorithm: str = "AUTOMATIC", label: str = "ParotidOAR") -> Path:
    """Write ``{name: bool mask [k, j, i]}`` on ``geometry`` as an RT Structure Set referencing the CT in ``dicom_dir``.

    * one ROI per structure, in ``masks`` order; ROI segments (``labels.is_roi``)
      only with ``include_roi`` (RT ROI Interpreted Type CONTROL, others ORGAN);
    * masks on another grid than the CT are resampled onto the CT slices;
    * ``name_map``: dict, JSON path or ``"tg263"`` (uses ``side``) → ROI names;
    * atomic write; an existing ``out_path`` is replaced only with ``force``.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    from . import dicomio

    out_path = Path(out_path)
    check_output(out_path, force)
    names = [n for n in masks if include_roi or not labels.is_roi(n)]
    if not names:
        raise InputError("No structures to export (only the ROI segment was given; pass include_roi to export it).")
    nmap = load_name_map(name_map, side)
    stack = dicomio.load_stack(dicom_dir, series_uid)
    ct0 = pydicom.dcmread(str(stack.slices[0].path), stop_before_pixels=True)
    slice_refs = [(h.sop_class_uid, h.sop_instance_uid) for h in stack.slices]

    # ---- contours per structure (in physical LPS mm on the original CT slices)
    row = stack.row_cosine * stack.pixel_spacing_ij[0]
    col = stack.col_cosine * stack.pixel_spacing_ij[1]
    contours: dict[str, list[tuple[int, np.ndarray]]] = {}
    any_content = False
    lost = []
    for name in names:
        mask = np.asarray(masks[name], dtype=bool)
        if mask.shape != geometry.shape:
            raise InputError(f"Mask {name!r} has shape {mask.shape}, expected {geometry.shape}.")
        per_slice = _slice_masks(mask, geometry, stack)
        items = []
        for s in np.nonzero(per_slice.reshape(len(per_slice), -1).any(axis=1))[0]:
            ipp = np.asarray(stack.slices[s].position, float)
            for loop in extract_contours(per_slice[s]):
                pts = ipp + loop[:, :1] * row + loop[:, 1:2] * col
                items.append((int(s), pts))
        if mask.any():
            any_content = True
            if not items:
                lost.append(name)
        contours[name] = items
    if any_content and all(not v for v in contours.values()):
        raise GeometryError("The segmentation does not overlap the CT series' slices. Was it made from this CT? "
                            "Check --dicom / --series-uid.")
    for name in lost:
        log.warning("Structure %r has voxels but none on the CT slices; exported without contours.", name)

    # ---- dataset
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    # SOP Common
    ds.SpecificCharacterSet = ct0.get("SpecificCharacterSet", "ISO_IR 192") or "ISO_IR 192"
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # Patient (type 2 attributes always present), copied from the CT
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, kw, ct0[kw].value if kw in ct0 else "")
    _copy_attrs(ds, ct0, ("IssuerOfPatientID", "OtherPatientIDsSequence", "PatientAge", "PatientSize",
                          "PatientWeight", "PatientIdentityRemoved", "DeidentificationMethod"))
    # General Study
    ds.StudyInstanceUID = stack.slices[0].study_instance_uid
    for kw in ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(ds, kw, ct0[kw].value if kw in ct0 else "")
    _copy_attrs(ds, ct0, ("StudyDescription",))
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = ""
    ds.SeriesDescription = "ParotidOAR structures (research use only - not for clinical use)"
    ds.OperatorsName = ""
    ds.SeriesDate = date
    ds.SeriesTime = time
    # General Equipment
    ds.Manufacturer = "ParotidOAR"
    ds.ManufacturerModelName = "ParotidOAR research segmentation"
    ds.SoftwareVersions = __version__
    # Structure Set
    ds.StructureSetLabel = label[:16]
    ds.StructureSetName = "ParotidOAR"
    ds.StructureSetDescription = "Automatic parotid OAR segmentation. Research use only - not for clinical use."
    ds.StructureSetDate = date
    ds.StructureSetTime = time
    for_uid = stack.slices[0].frame_of_reference_uid
    if not for_uid:
        raise DicomError("The CT series has no FrameOfReferenceUID; an RT Structure Set cannot reference it.")

    def image_ref(sop_class, sop_inst):
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_inst
        return item

    series_item = Dataset()
    series_item.SeriesInstanceUID = stack.slices[0].series_instance_uid
    series_item.ContourImageSequence = Sequence([image_ref(c, i) for c, i in slice_refs])
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = STUDY_COMPONENT_SOP_CLASS
    study_item.ReferencedSOPInstanceUID = stack.slices[0].study_instance_uid
    study_item.RTReferencedSeriesSequence = Sequence([series_item])
    for_item = Dataset()
    for_item.FrameOfReferenceUID = for_uid
    for_item.RTReferencedStudySequence = Sequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = Sequence([for_item])

    ssroi, roic, obs = [], [], []
    for number, name in enumerate(names, start=1):
        try:
            color = labels.color_255(name)
            rt_type = labels.info(name).rt_type
        except KeyError:
            color, rt_type = (128, 128, 128), "ORGAN"
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = for_uid
        item.ROIName = nmap.get(name, name)[:64]
        item.ROIDescription = name[:64]
        item.ROIGenerationAlgorithm = roi_generation_algorithm
        item.ROIGenerationDescription = "ParotidOAR two-stage cascade (research use only)"
        ssroi.append(item)
        c = Dataset()
        c.ReferencedROINumber = number
        c.ROIDisplayColor = list(color)
        seq = []
        for n_contour, (s, pts) in enumerate(contours[name], start=1):
            ci = Dataset()
            ci.ContourImageSequence = Sequence([image_ref(*slice_refs[s])])
            ci.ContourGeometricType = "CLOSED_PLANAR"
            ci.NumberOfContourPoints = len(pts)
            ci.ContourNumber = n_contour
            ci[_CONTOUR_DATA] = _raw_ds(_CONTOUR_DATA, pts.ravel())
            seq.append(ci)
        if seq:
            c.ContourSequence = Sequence(seq)
        roic.append(c)
        o = Dataset()
        o.ObservationNumber = number
        o.ReferencedROINumber = number
        o.RTROIInterpretedType = rt_type
        o.ROIInterpreter = ""
        obs.append(o)
    ds.StructureSetROISequence = Sequence(ssroi)
    ds.ROIContourSequence = Sequence(roic)
    ds.RTROIObservationsSequence = Sequence(obs)
    # Approval: never approved by software
    ds.ApprovalStatus = "UNAPPROVED"

    _mark_preencoded(ds)
    with atomic_file(out_path, force=force) as tmp:
        dicomio.save_dataset(ds, tmp)
    return out_path


def export(seg_path, dicom_dir, out_path, *, series_uid: str | None = None, name_map=None,
           include_roi: bool = False, force: bool = False) -> Path:
    """Convert a ``.seg.nrrd`` (e.g. after review/editing in Slicer) into an RTSTRUCT for the CT in ``dicom_dir``."""
    from . import segio

    check_output(out_path, force)  # before reading anything
    masks, geometry, segments = segio.read_seg(seg_path)
    side = _side_from_segments(segments)
    return write_rtstruct(out_path, masks, geometry, dicom_dir, series_uid=series_uid, name_map=name_map,
                          include_roi=include_roi, force=force, side=side, roi_generation_algorithm="SEMIAUTOMATIC")


def _side_from_segments(segments) -> str | None:
    for s in segments:
        term = s.get("terminology") or {}
        mod = term.get("typeModifier") if isinstance(term, dict) else None
        if mod and len(mod) > 1:
            if str(mod[1]) == labels.LEFT[1]:
                return "left"
            if str(mod[1]) == labels.RIGHT[1]:
                return "right"
    return None


# --------------------------------------------------------------------------- reading
def read_rtstruct_masks(rtstruct_path, geometry_or_dicom_dir) -> dict[str, np.ndarray]:
    """Rasterise every ROI of an RTSTRUCT onto a CT grid → ``{ROIName: bool mask [k, j, i]}``.

    ``geometry_or_dicom_dir``: a :class:`Geometry`, or the CT folder (the
    series the RTSTRUCT references is used). Each contour goes to the nearest
    k plane; contours of one ROI on one plane are combined even-odd (XOR).
    Contours outside the grid are ignored; ROIs without contours give empty masks.
    """
    import pydicom

    path = Path(rtstruct_path)
    if not path.exists():
        raise InputError(f"RTSTRUCT not found: {path}.")
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:
        raise InputError(f"Cannot read {path} as DICOM ({type(exc).__name__}).") from None
    if str(ds.get("SOPClassUID", "")) != RT_STRUCTURE_SET_STORAGE:
        raise DicomError(f"{path.name} is not an RT Structure Set (SOP Class {ds.get('SOPClassUID', '?')}).")
    if isinstance(geometry_or_dicom_dir, Geometry):
        geometry = geometry_or_dicom_dir
    else:
        from . import dicomio

        ref_series = None
        try:
            ref_series = str(ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
                             .RTReferencedSeriesSequence[0].SeriesInstanceUID)
        except (AttributeError, IndexError):
            pass
        geometry = dicomio.load_stack(geometry_or_dicom_dir, ref_series).volume_geometry()
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    nk, nj, ni = geometry.shape
    out: dict[str, np.ndarray] = {}
    for roi in ds.get("ROIContourSequence", []):
        name = names.get(int(roi.ReferencedROINumber), f"ROI {int(roi.ReferencedROINumber)}")
        # contours grouped by their own plane (continuous k); even-odd within a plane
        planes: dict[float, list[np.ndarray]] = {}
        for c in roi.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "")) not in ("CLOSED_PLANAR", ""):
                continue
            pts = np.asarray([float(v) for v in c.ContourData], float).reshape(-1, 3)
            ijk = geometry.lps_to_index(pts)
            planes.setdefault(round(float(ijk[:, 2].mean()), 3), []).append(ijk[:, :2])
        # each grid plane takes the nearest contour plane (several source planes never XOR each other)
        nearest: dict[int, float] = {}
        for kc in planes:
            k = int(np.floor(kc + 0.5))
            if 0 <= k < nk and (k not in nearest or abs(kc - k) < abs(nearest[k] - k)):
                nearest[k] = kc
        mask = np.zeros(geometry.shape, bool)
        for k, kc in nearest.items():
            mask[k] = rasterize_even_odd(planes[kc], (nj, ni))
        out[name] = mask
    return out
