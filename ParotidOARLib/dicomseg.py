"""DICOM Segmentation (SEG) export via highdicom (optional dependency).

``write_dicom_seg(out_path, masks, geometry, dicom_dir, *, series_uid=None, force=False)``
writes a BINARY segmentation with one segment per structure, referencing the
source CT instances (one frame per CT slice where the segment is present).
Segment category/type codes come from :mod:`labels` (SNOMED CT codes as
``SCT``, ParotidOAR's private codes with the ``99POAR`` scheme); the segment
display colour is the structure's colour. Masks on another grid than the CT
are resampled onto the CT slices first (as for RTSTRUCT).

highdicom is imported lazily: without it, :class:`~ParotidOARLib.errors.DicomError`
explains how to install it (``pip install highdicom``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import __version__, labels
from .errors import DicomError, InputError
from .imageio import Geometry, atomic_file, check_output


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise DicomError("DICOM SEG export needs the optional package 'highdicom' "
                         "(pip install highdicom). RTSTRUCT export works without it.") from None
    return highdicom


def _code(triplet):
    from pydicom.sr.coding import Code

    scheme, value, meaning = triplet
    return Code(value=str(value), scheme_designator=str(scheme), meaning=str(meaning))


def write_dicom_seg(out_path, masks: dict, geometry: Geometry, dicom_dir, *, series_uid: str | None = None,
                    force: bool = False, side: str | None = None, include_roi: bool = True,
                    algorithm_type: str = "AUTOMATIC") -> Path:
    """Write ``{name: bool mask [k, j, i]}`` as a DICOM SEG referencing the CT series in ``dicom_dir``."""
    out_path = Path(out_path)
    check_output(out_path, force)
    hd = _highdicom()
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from . import dicomio
    from .rtstruct import _slice_masks

    names = [n for n in masks if include_roi or not labels.is_roi(n)]
    if not names:
        raise InputError("No structures to export.")
    stack = dicomio.load_stack(dicom_dir, series_uid)
    sources = [pydicom.dcmread(str(h.path)) for h in stack.slices]
    frames = np.zeros((len(stack.slices), stack.rows, stack.columns, len(names)), dtype=bool)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name="ParotidOAR", family=codes.cid7162.ArtificialIntelligence, version=__version__)
    for n, name in enumerate(names):
        mask = np.asarray(masks[name], dtype=bool)
        if mask.shape != geometry.shape:
            raise InputError(f"Mask {name!r} has shape {mask.shape}, expected {geometry.shape}.")
        frames[..., n] = _slice_masks(mask, geometry, stack)
        try:
            si = labels.info(name)
            category = labels.CATEGORY_ROI if labels.is_roi(name) else labels.CATEGORY_ANATOMY
            type_code = si.type_code
            color = si.color
            region = si.region_code
        except KeyError:
            category, type_code, color, region = labels.CATEGORY_ANATOMY, ("SCT", "91723000",
                                                                            "Anatomical structure"), \
                (0.5, 0.5, 0.5), None
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=n + 1, segment_label=name[:64],
            segmented_property_category=_code(category), segmented_property_type=_code(type_code),
            algorithm_type=algorithm_type, algorithm_identification=algorithm,
            anatomic_regions=[_code(region)] if region else None,
            display_color=_lab(hd, color),
        ))
    if not frames.any():
        raise InputError("All structures are empty on the CT slices; nothing to write as DICOM SEG. "
                         "Was the segmentation made from this CT?")
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=generate_uid(), series_number=900, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="ParotidOAR", manufacturer_model_name="ParotidOAR research segmentation",
            software_versions=__version__, device_serial_number="0",
            content_description="ParotidOAR OARs. Research use only - not for clinical use.",
            content_label="PAROTIDOAR", omit_empty_frames=True)
    except (ValueError, TypeError) as exc:
        raise DicomError(f"highdicom could not build the DICOM SEG: {exc}") from None
    with atomic_file(out_path, force=force) as tmp:
        dicomio.save_dataset(seg, tmp)
    return out_path


def _lab(hd, color01):
    """CIELab display colour from an RGB colour in 0..1 (None if this highdicom cannot convert)."""
    cls = getattr(getattr(hd, "color", None), "CIELabColor", None)
    if cls is None or not hasattr(cls, "from_rgb"):
        return None
    return cls.from_rgb(*(float(round(c * 255)) for c in color01))
