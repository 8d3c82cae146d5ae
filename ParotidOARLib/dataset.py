"""Training datasets: discovery, validation (every problem at once) and splits.

A dataset is a folder of cases, one sub-folder per patient. Three layouts:

``seg`` (default; what ``python -m ParotidOARLib phantom`` writes)
    ``<case>/ct.nrrd`` (or any NRRD/NIfTI/MHA image, or a DICOM folder ``<case>/dicom/``)
    plus a Slicer ``.seg.nrrd``. ``reference-full.seg.nrrd`` is preferred over
    ``reference.seg.nrrd`` (stage 2 learns unclipped anatomy; the cascade clips to the
    ROI itself), else the only ``*.seg.nrrd``. An optional ``case.json`` may give ``"side"``.
``labelmap``
    ``<case>/ct.*`` plus ``labels.nrrd`` (an integer label map) and ``labels.json``
    (``{"1": "Parotid_L", ...}`` or ``{"Parotid_L": 1, ...}``).
``openkbp``
    The OpenKBP layout (``ct.nrrd``, ``Parotid-Lt.nrrd``, ``Parotid-Rt.nrrd``,
    ``Mandible.nrrd``, ``Body.nrrd`` … one uint8 mask per file). Each patient gives two
    samples: the left side with Parotid-Lt and the right side with Parotid-Rt.

Institution names map to canonical names (``labels.STRUCTURES``) with a label-map JSON:
``{"Parotid_L": "Parotid:left", "Parotid_R": "Parotid:right", "Mandible": "Mandible"}``
(``"Name:side"`` marks a one-sided structure; a dict ``{"name": ..., "side": ...}`` works
too). Canonical names and the phantom's names need no map. Extra structures
``Mandible`` and ``Body`` are kept (partial labels for stage 2 / the body mask).

:func:`validate` checks every case and raises one :class:`DatasetError` listing every
problem; :func:`make_split` gives a deterministic 70/15/15 patient split.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import labels as L
from .errors import DatasetError, ParotidOARError
from .imageio import Geometry, is_image_file

FORMATS = ("seg", "labelmap", "openkbp")
EXTRA_NAMES = ("Mandible", "Body")
#: mean HU inside a parotid must lie in this window (catches masks that do not match the CT,
#: e.g. OpenKBP validation/pt_221 at -251/-343 HU; contrast-enhanced glands reach ~+115)
PAROTID_HU_RANGE = (-200.0, 200.0)
BODY_THRESHOLD_HU = -400.0
OPENKBP_NAMES = {"Parotid-Lt": ("Parotid", "left"), "Parotid-Rt": ("Parotid", "right"),
                 "Mandible": ("Mandible", None), "Body": ("Body", None)}


@dataclass
class Sample:
    """One training sample: a patient and a side."""

    patient: str
    side: str  # "left" | "right"
    ct_path: Path
    #: canonical name -> (path, how): how = "mask" (a uint8 file), "seg:<segment name>",
    #: "labelmap:<value>"
    label_sources: dict = field(default_factory=dict)
    fmt: str = "seg"

    @property
    def key(self) -> str:
        return f"{self.patient}:{self.side}"


def load_label_map(path_or_dict) -> dict:
    """Label-map JSON → {institution name: (canonical name, side or None)}."""
    if path_or_dict is None:
        return {}
    if isinstance(path_or_dict, dict):
        raw = path_or_dict
    else:
        try:
            raw = json.loads(Path(path_or_dict).read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"Cannot read label map {path_or_dict}: {exc}. Give a JSON object "
                               '{"institution name": "canonical name[:left|right]"}.') from exc
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            name, side = v.get("name"), v.get("side")
        else:
            name, _, side = str(v).partition(":")
            side = side or None
        if name not in L.STRUCTURES and name not in EXTRA_NAMES:
            raise DatasetError(f"Label map entry {k!r} -> {name!r}: not a canonical name. "
                               f"Use one of {', '.join(L.STRUCTURES + EXTRA_NAMES)}.")
        if side not in (None, "left", "right"):
            raise DatasetError(f"Label map entry {k!r}: side must be left or right, got {side!r}.")
        out[k] = (name, side)
    return out


def _canonical(name: str, label_map: dict):
    if name in label_map:
        return label_map[name]
    if name in L.STRUCTURES or name in EXTRA_NAMES:
        return name, None
    if name in OPENKBP_NAMES:
        return OPENKBP_NAMES[name]
    return None, None


def _find_ct(case_dir: Path):
    for name in ("ct.nrrd", "ct.nii.gz", "ct.nii", "ct.mha", "CT.nrrd"):
        if (case_dir / name).exists():
            return case_dir / name
    imgs = [p for p in sorted(case_dir.iterdir()) if p.is_file() and is_image_file(p)
            and not p.name.startswith("labels")]
    if len(imgs) == 1:
        return imgs[0]
    for sub in ("dicom", "DICOM", "ct"):
        if (case_dir / sub).is_dir():
            return case_dir / sub
    return None


def _case_side(case_dir: Path):
    cj = case_dir / "case.json"
    if cj.exists():
        try:
            side = json.loads(cj.read_text()).get("side")
            if side in ("left", "right"):
                return side
        except ValueError:
            pass
    return None


def discover(data_dir, fmt: str = "seg", label_map=None, exclude=()) -> tuple[list[Sample], list[str]]:
    """Find the samples of a dataset folder. Returns (samples, problems) — nothing raised yet."""
    data_dir = Path(data_dir)
    lm = load_label_map(label_map)
    problems: list[str] = []
    if fmt not in FORMATS:
        raise DatasetError(f"Unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if not data_dir.is_dir():
        raise DatasetError(f"Dataset folder {data_dir} does not exist.")
    case_dirs = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and p.name not in set(exclude))
    if not case_dirs:
        raise DatasetError(f"No case folders in {data_dir}. Put one folder per patient in it.")
    samples: list[Sample] = []
    for cd in case_dirs:
        ct = _find_ct(cd)
        if ct is None:
            problems.append(f"{cd.name}: no CT found (expected ct.nrrd / a single image / a dicom/ folder).")
            continue
        per_side = {"left": {}, "right": {}, None: {}}
        if fmt == "openkbp":
            for p in sorted(cd.glob("*.nrrd")):
                if p.name == ct.name:
                    continue
                name, side = _canonical(p.name[:-5], lm)
                if name:
                    per_side[side][name] = (p, "mask")
        elif fmt == "seg":
            segs = sorted(cd.glob("*.seg.nrrd"))
            pick = None
            for pref in ("labels.seg.nrrd", "reference-full.seg.nrrd", "reference.seg.nrrd"):
                if (cd / pref).exists():
                    pick = cd / pref
                    break
            if pick is None and len(segs) == 1:
                pick = segs[0]
            if pick is None:
                problems.append(f"{cd.name}: " + ("no .seg.nrrd label file." if not segs else
                                f"several .seg.nrrd files ({', '.join(s.name for s in segs)}); "
                                "name the one to use labels.seg.nrrd."))
                continue
            try:
                import slicerio

                seg = slicerio.read_segmentation(str(pick), skip_voxels=True)
                names = [s.get("name") for s in seg.get("segments", [])]
            except Exception as exc:  # noqa: BLE001 - any read failure is a dataset problem
                problems.append(f"{cd.name}: cannot read {pick.name}: {exc}")
                continue
            for n in names:
                name, side = _canonical(n, lm)
                if name:
                    per_side[side][name] = (pick, f"seg:{n}")
        else:  # labelmap
            lmap_img, lmap_json = cd / "labels.nrrd", cd / "labels.json"
            if not lmap_img.exists():
                cands = [p for p in cd.glob("labels.*") if is_image_file(p)]
                lmap_img = cands[0] if cands else lmap_img
            if not lmap_img.exists() or not lmap_json.exists():
                problems.append(f"{cd.name}: labelmap format needs labels.nrrd (or .nii.gz) and labels.json.")
                continue
            try:
                names = json.loads(lmap_json.read_text())
            except ValueError as exc:
                problems.append(f"{cd.name}: labels.json is not valid JSON ({exc}).")
                continue
            pairs = []
            for k, v in names.items():
                if str(k).isdigit():
                    pairs.append((str(v), int(k)))
                elif isinstance(v, int):
                    pairs.append((str(k), v))
            for n, value in pairs:
                name, side = _canonical(n, lm)
                if name:
                    per_side[side][name] = (lmap_img, f"labelmap:{value}")
        common = per_side[None]
        sides = [s for s in ("left", "right") if per_side[s]]
        if not sides:
            s = _case_side(cd)
            if s is None and "Parotid" in common:
                s = "auto"  # decided from the parotid centroid at load time
            sides = [s] if s else []
        if not sides or not any("Parotid" in {**common, **per_side.get(s, {})} for s in sides):
            problems.append(f"{cd.name}: no Parotid label (after the label map). "
                            "Map your parotid name with --label-map, e.g. {\"Parotid_L\": \"Parotid:left\"}.")
            continue
        for s in sides:
            srcs = {**common, **per_side.get(s, {})}
            if "Parotid" not in srcs:
                continue  # e.g. OpenKBP patient without a right parotid: only the left sample
            samples.append(Sample(cd.name, s, ct, srcs, fmt))
    return samples, problems


# --- loading ---------------------------------------------------------------------

_SEG_CACHE: dict = {}


def _read_label(path: Path, how: str, geometry_ct: Geometry):
    from .imageio import read_image

    if how == "mask":
        arr, g = read_image(path)
        return arr > 0, g
    if how.startswith("seg:"):
        from . import segio

        key = str(path)
        if key not in _SEG_CACHE:
            _SEG_CACHE.clear()
            _SEG_CACHE[key] = segio.read_seg(path)
        masks, g, _ = _SEG_CACHE[key]
        return masks[how[4:]], g
    if how.startswith("labelmap:"):
        arr, g = read_image(path)
        return arr == int(how.split(":", 1)[1]), g
    raise DatasetError(f"unknown label source {how}")


def read_ct_any(path: Path):
    try:
        from . import preprocess

        arr, g, _ = preprocess.read_ct(path)
        return arr, g
    except ImportError:
        from .imageio import read_image

        return read_image(path)


def load_sample(sample: Sample, names=None):
    """→ (ct int16 [k,j,i], Geometry, {canonical name: bool mask}, side). Labels are on the CT grid
    (resampled with nearest neighbour if a label file has another grid but overlaps)."""
    ct, g = read_ct_any(sample.ct_path)
    masks = {}
    for name, (p, how) in sample.label_sources.items():
        if names is not None and name not in names:
            continue
        m, gm = _read_label(p, how, g)
        if not gm.same_grid(g):
            m = _resample_nearest_to(m, gm, g)
        masks[name] = m.astype(bool)
    side = sample.side
    if side == "auto":
        side = infer_side(ct, g, masks["Parotid"], masks.get("Body"))
    return ct.astype(np.int16, copy=False), g, masks, side


def _resample_nearest_to(mask, g_from: Geometry, g_to: Geometry):
    import SimpleITK as sitk

    from .imageio import to_sitk

    ref = to_sitk(np.zeros(g_to.shape, np.uint8), g_to)
    out = sitk.Resample(to_sitk(mask.astype(np.uint8), g_from), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(out) > 0


def body_mask(ct, geometry, body=None):
    """The body mask: the given one if non-empty, else CT > -400 HU (largest component)."""
    if body is not None and body.any():
        return body
    try:
        from . import preprocess

        return preprocess.body_mask(ct, geometry)
    except ImportError:
        return ct > BODY_THRESHOLD_HU


def midline_x(ct, geometry, body=None) -> float:
    """LPS x (mm) of the body midline (mean x of body voxels)."""
    b = body_mask(ct, geometry, body)
    idx = np.argwhere(b[:: 2, :: 2, :: 2]) * 2  # (k, j, i), subsampled for speed
    lps = geometry.index_to_lps(idx[:, ::-1])
    return float(lps[:, 0].mean())


def infer_side(ct, geometry, parotid, body=None) -> str:
    idx = np.argwhere(parotid)
    x = geometry.index_to_lps(idx[:, ::-1])[:, 0].mean()
    return "left" if x > midline_x(ct, geometry, body) else "right"


# --- validation ------------------------------------------------------------------

def check_sample(sample: Sample, required=("Parotid",)) -> list[str]:
    """Problems with one sample (empty list = fine)."""
    out = []
    tag = f"{sample.patient} ({sample.side})"
    try:
        ct, g = read_ct_any(sample.ct_path)
    except ParotidOARError as exc:
        return [f"{tag}: CT unusable: {exc}"]
    except Exception as exc:  # noqa: BLE001
        return [f"{tag}: cannot read CT {sample.ct_path.name}: {exc}"]
    if ct.ndim != 3:
        return [f"{tag}: CT is not 3D."]
    for name in required:
        if name not in sample.label_sources:
            out.append(f"{tag}: missing label {name}.")
    bad_files = set()
    for name, (p, how) in sample.label_sources.items():
        try:
            m, gm = _read_label(p, how, g)
        except Exception as exc:  # noqa: BLE001
            out.append(f"{tag}: cannot read label {name} from {Path(p).name}: {exc}")
            continue
        if not gm.same_grid(g):
            if str(p) in bad_files:
                continue
            bad_files.add(str(p))
            out.append(f"{tag}: labels ({Path(p).name}) geometry does not match the CT "
                       f"(size {gm.size} vs {g.size}, spacing {tuple(round(s, 3) for s in gm.spacing)} vs "
                       f"{tuple(round(s, 3) for s in g.spacing)}, origin {tuple(round(o, 1) for o in gm.origin)} vs "
                       f"{tuple(round(o, 1) for o in g.origin)}). Export labels on the CT grid.")
            continue
        if name == "Parotid":
            n = int(m.sum())
            if n == 0:
                out.append(f"{tag}: Parotid is empty.")
                continue
            hu = float(ct[m].mean())
            if not (PAROTID_HU_RANGE[0] <= hu <= PAROTID_HU_RANGE[1]):
                out.append(f"{tag}: mean CT inside Parotid is {hu:.0f} HU (expected {PAROTID_HU_RANGE[0]:.0f}.."
                           f"{PAROTID_HU_RANGE[1]:.0f}); the mask probably does not match the CT. Fix or exclude it.")
    return out


def validate(samples: list[Sample], problems: list[str] | None = None, required=("Parotid",),
             exclude=(), raise_error: bool = True, progress=None) -> list[str]:
    """Check every sample; raise one DatasetError that lists every problem (unless raise_error=False)."""
    problems = list(problems or [])
    for i, s in enumerate(samples):
        if s.patient in exclude:
            continue
        problems.extend(check_sample(s, required))
        if progress:
            progress(i + 1, len(samples))
    if problems and raise_error:
        raise DatasetError(f"The dataset has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)
                           + "\nFix them, or exclude the patients with --exclude.")
    return problems


# --- splits ----------------------------------------------------------------------

def make_split(patients, seed: int = 0, fractions=(0.70, 0.15, 0.15)) -> dict:
    """Deterministic patient split: order by SHA-256(seed:patient), then cut 70/15/15.

    Independent of the order patients are listed in and of the Python hash seed.
    """
    pats = sorted(set(patients), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n = len(pats)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    if n >= 3:
        n_train = max(1, min(n_train, n - 2))
        n_val = max(1, min(n_val, n - n_train - 1))
    return {"seed": seed, "fractions": list(fractions), "train": sorted(pats[:n_train]),
            "validation": sorted(pats[n_train:n_train + n_val]), "test": sorted(pats[n_train + n_val:])}


def save_split(split: dict, path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(split, indent=2))
    os.replace(tmp, path)
    return path


def load_or_make_split(path, patients, seed: int = 0) -> dict:
    path = Path(path)
    if path.exists():
        split = json.loads(path.read_text())
        known = set(split["train"]) | set(split["validation"]) | set(split["test"])
        if known == set(patients):
            return split
    split = make_split(patients, seed)
    save_split(split, path)
    return split
