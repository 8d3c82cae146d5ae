"""Canonical structure names, label values, colours and terminology.

This is the single source of truth for what ParotidOAR segments. Every writer
(``.seg.nrrd``, RTSTRUCT, DICOM SEG, MRML) takes names, colours and codes from
here, so a name is spelled one way everywhere.

Terminology follows Slicer's ``TerminologyEntry`` tag format. SNOMED CT codes
are used where a code for the exact structure exists (parotid gland, skin,
external auditory canal); structures without an exact, verified SNOMED CT
concept use the private coding scheme ``99POAR`` (DICOM PS3.16 allows a
``99``-prefixed local scheme), with the parent structure as anatomic region.
"""

from __future__ import annotations

from dataclasses import dataclass

ROI_MARGIN_MM_DEFAULT = 17.0  # I-125 seed penetration depth (the paper)

PAROTID = "Parotid"
AURICULA = "Auricula"
CONDYLE = "Condyle process"
SKIN = "Skin"
MASTOID = "Mastoid process"
EAC = "External auditory canal"
RAMUS = "Mandibular ramus"

#: The six organs at risk segmented by stage 2, in label-value order (1..6).
OARS = (AURICULA, CONDYLE, SKIN, MASTOID, EAC, RAMUS)
#: All seven anatomical structures; Parotid first (stage 1).
STRUCTURES = (PAROTID,) + OARS


def roi_segment_name(margin_mm: float = ROI_MARGIN_MM_DEFAULT) -> str:
    """Name of the ROI segment, e.g. ``"ROI (parotid + 17 mm)"``."""
    return f"ROI (parotid + {margin_mm:g} mm)"


ROI = roi_segment_name()

#: our own terminology context (ParotidOAR/Resources/ParotidOAR.term.json, loaded by the Slicer module), so that
#: Slicer's terminology selector resolves the private 99POAR codes as well as the SNOMED CT ones
CONTEXT = "Segmentation category and type - ParotidOAR"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
CATEGORY_ANATOMY = ("SCT", "123037004", "Anatomical Structure")
CATEGORY_ROI = ("99POAR", "ROI", "Region of interest")
LEFT = ("SCT", "7771000", "Left")
RIGHT = ("SCT", "24028007", "Right")


@dataclass(frozen=True)
class StructureInfo:
    name: str
    color: tuple[float, float, float]  # RGB in 0..1
    type_code: tuple[str, str, str]  # (scheme, value, meaning)
    region_code: tuple[str, str, str] | None = None  # anatomic region (parent), if any
    rt_type: str = "ORGAN"  # RT ROI Interpreted Type
    tolerance_mm: float = 2.0  # surface-DSC tolerance (Nikolov et al. style), see README


STRUCTURE_INFO: dict[str, StructureInfo] = {
    PAROTID: StructureInfo(PAROTID, (0.89, 0.58, 0.27), ("SCT", "45289007", "Parotid gland"),
                           tolerance_mm=2.85),  # Nikolov et al. 2021 parotid tolerance
    AURICULA: StructureInfo(AURICULA, (0.90, 0.45, 0.62), ("99POAR", "AURICLE", "Auricle of ear"),
                            ("SCT", "117590005", "Ear structure")),
    CONDYLE: StructureInfo(CONDYLE, (0.98, 0.93, 0.55), ("99POAR", "CONDYLE", "Condylar process of mandible"),
                           ("SCT", "91609006", "Mandible"),
                           tolerance_mm=1.01),  # part of the mandible: Nikolov's mandible 1.01 mm, as the ramus
    SKIN: StructureInfo(SKIN, (0.70, 0.50, 0.40), ("SCT", "39937001", "Skin structure")),
    MASTOID: StructureInfo(MASTOID, (0.50, 0.72, 0.96), ("99POAR", "MASTOID", "Mastoid process of temporal bone")),
    EAC: StructureInfo(EAC, (0.20, 0.72, 0.35), ("SCT", "84301002", "External auditory canal")),
    RAMUS: StructureInfo(RAMUS, (0.93, 0.78, 0.35), ("99POAR", "RAMUS", "Ramus of mandible"),
                         ("SCT", "91609006", "Mandible"), tolerance_mm=1.01),  # Nikolov: mandible 1.01 mm
}
STRUCTURE_INFO[ROI] = StructureInfo(ROI, (1.0, 1.0, 0.0), CATEGORY_ROI, rt_type="CONTROL")


def info(name: str) -> StructureInfo:
    """Info for a canonical name; ROI names with any margin map to the ROI entry."""
    if name in STRUCTURE_INFO:
        return STRUCTURE_INFO[name]
    if name.startswith("ROI (parotid +"):
        base = STRUCTURE_INFO[ROI]
        return StructureInfo(name, base.color, base.type_code, None, base.rt_type, base.tolerance_mm)
    raise KeyError(f"Unknown structure {name!r}; known: {', '.join(STRUCTURE_INFO)}")


def is_roi(name: str) -> bool:
    return name.startswith("ROI (parotid +")


def terminology(name: str, side: str | None = None) -> dict:
    """Slicer/slicerio terminology dict for a structure (side: 'left'|'right'|None)."""
    si = info(name)
    category = CATEGORY_ROI if is_roi(name) else CATEGORY_ANATOMY
    entry = {
        "contextName": CONTEXT,
        "category": list(category),
        "type": list(si.type_code),
        "anatomicContextName": ANATOMIC_CONTEXT,
    }
    if side in ("left", "right") and not is_roi(name):
        entry["typeModifier"] = list(LEFT if side == "left" else RIGHT)
    if si.region_code is not None:
        entry["anatomicRegion"] = list(si.region_code)
    return entry


def terminology_string(name: str, side: str | None = None) -> str:
    """The ``TerminologyEntry`` tag value Slicer stores in ``.seg.nrrd`` and MRML."""
    t = terminology(name, side)
    mod = t.get("typeModifier", ["", "", ""])
    region = t.get("anatomicRegion", ["", "", ""])
    return "~".join([
        t["contextName"], "^".join(t["category"]), "^".join(t["type"]), "^".join(mod),
        t["anatomicContextName"], "^".join(region), "^^",
    ])


def color_255(name: str) -> tuple[int, int, int]:
    return tuple(int(round(c * 255)) for c in info(name).color)
