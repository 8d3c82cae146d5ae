"""Quantitative comparison of a segmentation with a reference (the paper's Table 1).

Per segment: DSC, Jaccard, precision, recall, volumes and their difference,
and the surface metrics of Nikolov et al. 2021 (DeepMind ``surface-distance``):

* **surface elements** ("surfels") are the marching-cubes triangles of the
  mask on the *half-voxel-shifted* raster: every voxel corner carries the code
  of its 2×2×2 neighbourhood (8 bits), each code maps to a set of triangles
  whose area depends on the (anisotropic) spacing. Corners whose code is
  neither 0 nor 255 are surface points; their weight is the surfel area.
* **distances** from each surface point of one mask to the nearest surface
  point of the other on the same corner grid, exact Euclidean distances in mm
  (the values an EDT of the other border would give; computed with a k-d tree
  over the other surface's points, points shared by both surfaces being 0).
* **surface DSC at tolerance τ** = (area of ref surfels within τ of the pred
  surface + area of pred surfels within τ of the ref surface) / (total area
  of both surfaces).
* **HD95** = max of the two *directed*, area-weighted 95th percentiles
  (DeepMind's ``compute_robust_hausdorff(…, 95)``); **HD max** = max of all
  distances; **MSD** = area-weighted mean of the directed distances.

Everything is computed on the union bounding box of both masks plus a
one-voxel zero border, never on the whole grid.

The neighbour-code → triangle table (:data:`_SURFEL_TABLE`) was generated with
VTK's marching cubes (:func:`build_surfel_table_vtk`, checked by a test). Each
configuration is triangulated on its *minority* side (codes with more than four
inside corners use the complement), so a surface has the same area whichever
side is called inside — the convention of DeepMind's table.

Empty masks (documented in ``docs/metrics-review.md``): both empty → DSC,
Jaccard, precision, recall and surface DSC are 1, distances NaN, flags
``pred_empty`` and ``ref_empty``; one empty → DSC/Jaccard/surface DSC 0,
distances NaN and the matching flag; precision (recall) is NaN when the
prediction (reference) is empty. NaN is written as ``null`` in JSON.

Arrays are numpy ``[k, j, i]``; spacings are in numpy order (``spacing_zyx``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import GeometryError, InputError
from .imageio import atomic_file, check_output

# ---------------------------------------------------------------------------------------------
# Marching-cubes surfel table.
#
# Corner bit convention: for the corner grid point c, the 2x2x2 voxels c + (a0, a1, a2) - 1 with
# a in {0,1}^3 contribute bit (4*a0 + 2*a1 + a2). Each code lists up to four triangles as area
# vectors (half the cross product of two edges, in voxel units, numpy axis order), 3 values each
# in units of 1/8, encoded one character per value: 'a'..'i' = -4..+4; '-' = no triangles.
_SURFEL_TABLE = """
- fff ffd ggegge fdf geggeg ffdfdf fffgggiee fdd ffffdd gecgec ffdggciee gcegce fdfgcgiee fddgcciee ieeiee
dff eggegg dffffd fffgggeie dfffdf fffgggeei dffffdfdf fffggggggfff dfffdd eggeggfdd gecgecdff geghhbeggffd gcegcedff ggehbheggfdf dffgccieefdd dddcccaee
dfd dfdfff egcegc ffdggceie dfdfdf geggegdfd egcegcfdf egchhhgecfff dfdfdd fffdfdfdd ffdggceea ffdggcggcffd gcegcedfd dfdgcgieefdf egchbbggefdd ddfccgaee
cgecge dffcggeie dfdcgceie eieeie cgecgefdf ggebhhgegdff fdfdfdcgceie dddccceae cgecgefdd fdddffcggeie cechhbcgeffd ddfccgeae gcegcecgecge ccecceffd cceccefff ccecce
ddf fffddf ddfffd ggeggeddf ecgecg fdfgcgeei ecgecgffd ecghhhgcefff ddffdd ddfffffdd gecgecddf ddfffdggciee fdfgcgeae fdfgcggcgfdf ecchbhgecfdf dfdcgcaee
cegceg dffcggeei cegcegffd ceghhhcgefff ddfccgeei eeieei ffdccgeeiddf dddccceea cegcegfdd fdddffcggeei gecgeccegceg ceccecfdf ccehbhcegfdf dfdcgceea ceccecfff ceccec
ddfdfd fffddfdfd egcegcddf ddfffdggceie ecgecgdfd dfdfdfgcgeei egcegcecgecg ecceccdff dfdddffdd fddddffffdfd ddfggceeaffd dfffdfddd dfdfdfgcgeae dffdddffd eggeggddd dffddd
dffcggaee dffcggcggdff cecbhhegcdff fddgcceae cgebbheggddf fddgcceea ecceccfff eccecc fdddffcggaee fdfffdddd geggegddd fdfddd ggeggeddd dddffd fffddd ddd
ddd fffddd dddffd ggeggeddd fdfddd geggegddd fdfffdddd dddgggieefff eccecc ecceccfff fddgcceea gcehhbeccffd fddgcceae geghbbecgfdd fddgccgccfdd dffcggaee
dffddd eggeggddd dffdddffd dddgggeiefff dfffdfddd dddfffgggeei dffffdfdfddd dfdddffdd ecceccdff eccecceggegg dffgcceeafdd ecgecgdfd dffgcceaefdd egcegcddf fffddfdfd ddfdfd
ceccec ceccecfff dfdcgceea ggebhbgecdfd ceccecfdf geggegceccec fdfcgceeadfd cegcegfdd dddccceea fffdddccceea eeaeea ddfccgeei gecbbbgceddd cegcegffd dffcggeei cegceg
dfdcgcaee eggbhbcegdfd dfdcgccgcdfd fdfgcgeae fdfcgcaeedfd gecgecddf ddfffffdd ddffdd egcbbbcgeddd ecgecgffd fdfgcgeei ecgecg ggeggeddf ddfffd fffddf ddf
ccecce cceccefff ccecceffd ccecceggegge ddfccgeae gegbbhgceddf ffdccgeaeddf cgecgefdd dddccceae fffccceaeddd ccehbbcecfdd cgecgefdf eaeeae dfdcgceie dffcggeie cgecge
ddfccgaee ecgbhhccedff ffdddfccgaee gcegcedfd ddfccgccgddf ffdggceea fffdfdfdd dfdfdd ecgbbbcegddd egcegcfdf geggegdfd dfdfdf ffdggceie egcegc dfdfff dfd
dddcccaee fffdddcccaee ccebhbeccdfd gcegcedff cecbbheccddf gecgecdff eggeggfdd dfffdd dddccccccddd dffffdfdf fffgggeei dfffdf fffgggeie dffffd eggegg dff
aeeaee fddgcciee fdfgcgiee gcegce ffdggciee gecgec ffffdd fdd fffgggiee ffdfdf geggeg fdf ggegge ffd fff -
"""

MAX_TRIANGLES = 4


def _decode_table(text: str) -> np.ndarray:
    entries = text.split()
    if len(entries) != 256:
        raise RuntimeError("corrupt surfel table")  # a programming error, not a user error
    out = np.zeros((256, MAX_TRIANGLES, 3))
    for code, entry in enumerate(entries):
        if entry == "-":
            continue
        values = np.array(["abcdefghi".index(ch) - 4 for ch in entry], dtype=float) / 8.0
        out[code, : len(values) // 3] = values.reshape(-1, 3)
    return out


@lru_cache(maxsize=1)
def surfel_vectors() -> np.ndarray:
    """(256, 4, 3) triangle area vectors per neighbour code (voxel units, numpy axis order)."""
    vec = _decode_table(_SURFEL_TABLE)
    vec.setflags(write=False)
    return vec


def encode_surfel_table(vectors: np.ndarray) -> str:
    """Inverse of the table decoding (used to regenerate :data:`_SURFEL_TABLE`)."""
    entries = []
    for code in range(256):
        tri = np.rint(np.asarray(vectors[code]) * 8).astype(int)
        tri = tri[np.any(tri != 0, axis=1)]
        entries.append("".join("abcdefghi"[v + 4] for v in tri.ravel()) or "-")
    return "\n".join(" ".join(entries[i:i + 16]) for i in range(0, 256, 16))


def build_surfel_table_vtk() -> np.ndarray:
    """Recompute the table with VTK's marching cubes (needs ``vtk``; used by the tests).

    For every code the 2×2×2 corner values (0/1) are contoured at 0.5 and the
    triangles' area vectors are collected; codes with more than four inside
    corners are contoured as their complement (minority-side triangulation).
    """
    import vtk
    from vtk.util import numpy_support

    out = np.zeros((256, MAX_TRIANGLES, 3))
    for code in range(256):
        c = 255 - code if bin(code).count("1") > 4 else code
        values = np.array([(c >> (4 * a + 2 * b + d)) & 1 for a in (0, 1) for b in (0, 1) for d in (0, 1)],
                          dtype=np.float32).reshape(2, 2, 2)  # [a0, a1, a2]
        image = vtk.vtkImageData()
        image.SetDimensions(2, 2, 2)  # VTK x := numpy axis 0, so VTK's x-fastest order is values[a2, a1, a0]
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(values.transpose(2, 1, 0).ravel(), deep=1))
        mc = vtk.vtkMarchingCubes()
        mc.SetInputData(image)
        mc.SetValue(0, 0.5)
        mc.ComputeNormalsOff()
        mc.ComputeGradientsOff()
        mc.Update()
        poly = mc.GetOutput()
        if poly.GetNumberOfCells() == 0:
            continue
        pts = numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).astype(float)
        tris = numpy_support.vtk_to_numpy(poly.GetPolys().GetConnectivityArray()).reshape(-1, 3)
        p = pts[tris]
        out[code, : len(tris)] = 0.5 * np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    return out


def surfel_area_table(spacing_zyx) -> np.ndarray:
    """Area in mm² of the surface element of each of the 256 neighbour codes for ``spacing_zyx``.

    A triangle's area vector n (voxel units) scales under the diagonal map
    diag(s0, s1, s2) to (n0·s1·s2, n1·s0·s2, n2·s0·s1) (cofactor matrix).
    """
    s0, s1, s2 = (float(v) for v in spacing_zyx)
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.linalg.norm(surfel_vectors() * scale, axis=2).sum(axis=1)


# ---------------------------------------------------------------------------------------------
# Geometry helpers


def _rows_any(m2d: np.ndarray) -> np.ndarray:
    """``m2d.any(axis=1)`` for a 2D array, 8 bytes at a time when the layout allows."""
    if m2d.dtype.itemsize == 1 and m2d.flags["C_CONTIGUOUS"] and m2d.shape[1] % 8 == 0:
        return m2d.view(np.uint64).any(axis=1)
    return m2d.any(axis=1)


def bounding_box(mask) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """``(lo, hi)`` numpy-order half-open bounds of the non-zero voxels, or None if empty.

    One pass over the whole array (per slice), then a projection of the occupied slab.
    """
    m = np.asarray(mask)
    if m.dtype == bool:
        m = m.view(np.uint8)
    flat = m.reshape(m.shape[0], -1) if m.flags["C_CONTIGUOUS"] else None
    ax0 = np.flatnonzero(_rows_any(flat) if flat is not None else np.any(m, axis=(1, 2)))
    if ax0.size == 0:
        return None
    k0, k1 = int(ax0[0]), int(ax0[-1]) + 1
    proj = np.bitwise_or.reduce(m[k0:k1] != 0, axis=0)  # (nj, ni) projection of the slab
    ax1 = np.flatnonzero(proj.any(axis=1))
    ax2 = np.flatnonzero(proj.any(axis=0))
    return (k0, int(ax1[0]), int(ax2[0])), (k1, int(ax1[-1]) + 1, int(ax2[-1]) + 1)


def _union_box(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return (tuple(min(x, y) for x, y in zip(a[0], b[0])), tuple(max(x, y) for x, y in zip(a[1], b[1])))


def _padded_crop(mask: np.ndarray, lo, hi) -> np.ndarray:
    """``mask[lo:hi] != 0`` as uint8 with a one-voxel zero border on every side."""
    shape = tuple(h - l + 2 for l, h in zip(lo, hi))
    out = np.zeros(shape, np.uint8)
    out[1:-1, 1:-1, 1:-1] = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] != 0
    return out


def neighbour_codes(padded: np.ndarray) -> np.ndarray:
    """Neighbour code of every voxel corner of a zero-padded uint8 0/1 array (shape − 1)."""
    n0, n1, n2 = (s - 1 for s in padded.shape)
    code = np.zeros((n0, n1, n2), np.uint8)
    for a0 in (0, 1):
        for a1 in (0, 1):
            for a2 in (0, 1):
                bit = 4 * a0 + 2 * a1 + a2
                code |= padded[a0:a0 + n0, a1:a1 + n1, a2:a2 + n2] << np.uint8(bit)
    return code


# ---------------------------------------------------------------------------------------------
# Surface distances


@dataclass
class SurfaceDistances:
    """Directed distances (mm) from each surfel to the other surface, with surfel areas (mm²).

    Arrays are sorted by distance (ascending). Empty arrays when a mask is empty.
    """

    pred_to_ref: np.ndarray
    area_pred: np.ndarray
    ref_to_pred: np.ndarray
    area_ref: np.ndarray

    @property
    def pred_empty(self) -> bool:
        return self.area_pred.size == 0

    @property
    def ref_empty(self) -> bool:
        return self.area_ref.size == 0


def _sorted(distances, areas):
    order = np.argsort(distances, kind="stable")
    return distances[order], areas[order]


def _directed_distances(from_idx, from_shared, to_points, coords_of, spacing):
    """Distances from the surface points ``from_idx`` to the nearest of ``to_points`` (k-d tree).

    Points lying on the other surface too (``from_shared``) are at distance 0
    and are not queried: for similar contours that is most of them.
    """
    from scipy.spatial import cKDTree

    d = np.zeros(from_idx.size)
    todo = ~from_shared
    if np.any(todo):
        tree = cKDTree(to_points)
        d[todo] = tree.query(coords_of(from_idx[todo]))[0]
    return d


def _surface_distances_on_crop(pred_pad, ref_pad, spacing_zyx) -> SurfaceDistances:
    """Surfels of both masks on the corner grid of the padded crop and their directed distances.

    The distance of a surface point to the other surface is the exact Euclidean
    distance to the nearest surface point of the other mask on the same corner
    grid (what an EDT of the other border would give), computed with a k-d tree.
    """
    areas = surfel_area_table(spacing_zyx)
    code_p = neighbour_codes(pred_pad)
    code_r = neighbour_codes(ref_pad)
    border_p = (code_p != 0) & (code_p != 255)
    border_r = (code_r != 0) & (code_r != 255)
    idx_p = np.flatnonzero(border_p)
    idx_r = np.flatnonzero(border_r)
    a_p = areas[code_p.ravel()[idx_p]]
    a_r = areas[code_r.ravel()[idx_r]]
    if idx_p.size == 0 or idx_r.size == 0:
        return SurfaceDistances(np.full(a_p.shape, np.nan), a_p, np.full(a_r.shape, np.nan), a_r)
    shape = code_p.shape
    sp = np.asarray(spacing_zyx, dtype=float)

    def coords_of(flat):
        return np.stack(np.unravel_index(flat, shape), axis=1) * sp

    d_pr = _directed_distances(idx_p, border_r.ravel()[idx_p], coords_of(idx_r), coords_of, sp)
    d_rp = _directed_distances(idx_r, border_p.ravel()[idx_r], coords_of(idx_p), coords_of, sp)
    d_pr, a_p = _sorted(d_pr, a_p)
    d_rp, a_r = _sorted(d_rp, a_r)
    return SurfaceDistances(d_pr, a_p, d_rp, a_r)


def surface_distances(pred_mask, ref_mask, spacing_zyx) -> SurfaceDistances:
    """Surfel distances and areas between two masks on the same grid (computed on the union box)."""
    pred = np.asarray(pred_mask)
    ref = np.asarray(ref_mask)
    _check_pair(pred, ref, spacing_zyx)
    box = _union_box(bounding_box(pred), bounding_box(ref))
    if box is None:
        e = np.zeros(0)
        return SurfaceDistances(e, e.copy(), e.copy(), e.copy())
    lo, hi = box
    return _surface_distances_on_crop(_padded_crop(pred, lo, hi), _padded_crop(ref, lo, hi),
                                      tuple(float(s) for s in spacing_zyx))


def weighted_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """Area-weighted percentile as DeepMind's ``compute_robust_hausdorff`` takes it.

    ``distances`` sorted ascending; the result is the first distance at which
    the cumulative area fraction reaches ``percent``/100 (no interpolation).
    """
    if distances.size == 0:
        return math.nan
    cum = np.cumsum(areas) / np.sum(areas)
    idx = int(np.searchsorted(cum, percent / 100.0))
    return float(distances[min(idx, distances.size - 1)])


def _check_pair(pred, ref, spacing_zyx):
    if pred.ndim != 3 or ref.ndim != 3:
        raise InputError(f"Masks must be 3D; got {pred.ndim}D and {ref.ndim}D arrays.")
    if pred.shape != ref.shape:
        raise GeometryError(f"Masks are on different grids: {pred.shape} vs {ref.shape}. "
                            "Resample the prediction onto the reference grid first (the evaluate command does).")
    sp = np.asarray(spacing_zyx, dtype=float)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise GeometryError(f"Spacing must be three positive numbers (numpy z, y, x order), got {spacing_zyx}.")


# ---------------------------------------------------------------------------------------------
# Per-segment comparison

METRIC_KEYS = ("dsc", "jaccard", "precision", "recall", "hd95_mm", "hd_max_mm", "msd_pred_to_ref_mm",
               "msd_ref_to_pred_mm", "surface_dsc", "tolerance_mm", "volume_pred_cc", "volume_ref_cc",
               "volume_diff_cc")
#: keys also returned by :func:`compare` (beyond the interface's list)
EXTRA_KEYS = ("hd95_pred_to_ref_mm", "hd95_ref_to_pred_mm", "assd_mm", "volume_diff_pct",
              "surface_area_pred_mm2", "surface_area_ref_mm2")


def _ratio(num, den, nan_flag=None, flags=None):
    if den == 0:
        if nan_flag and flags is not None:
            flags.append(nan_flag)
        return math.nan
    return float(num) / float(den)


def compare(pred_mask, ref_mask, spacing_zyx, tolerance_mm: float = 2.0) -> dict:
    """Compare two masks on the same grid (numpy ``[k, j, i]``, spacing in numpy order, mm).

    Returns a dict with :data:`METRIC_KEYS`, :data:`EXTRA_KEYS` and ``flags``
    (a list: ``pred_empty``, ``ref_empty``). Distances are NaN when either
    mask is empty. See the module docstring for the definitions.
    """
    pred = np.asarray(pred_mask)
    ref = np.asarray(ref_mask)
    _check_pair(pred, ref, spacing_zyx)
    tolerance_mm = float(tolerance_mm)
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise InputError(f"Surface-DSC tolerance must be a non-negative number of mm, got {tolerance_mm}.")
    spacing = tuple(float(s) for s in spacing_zyx)
    voxel_cc = spacing[0] * spacing[1] * spacing[2] / 1000.0
    box_p, box_r = bounding_box(pred), bounding_box(ref)
    flags: list[str] = []
    if box_p is None:
        flags.append("pred_empty")
    if box_r is None:
        flags.append("ref_empty")
    box = _union_box(box_p, box_r)
    if box is None:
        n_p = n_r = tp = 0
        sd = SurfaceDistances(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))
    else:
        lo, hi = box
        pp = _padded_crop(pred, lo, hi)
        rp = _padded_crop(ref, lo, hi)
        n_p = int(np.count_nonzero(pp))
        n_r = int(np.count_nonzero(rp))
        tp = int(np.count_nonzero(pp & rp))
        sd = _surface_distances_on_crop(pp, rp, spacing)
    both_empty = n_p == 0 and n_r == 0
    res: dict = {}
    res["dsc"] = 1.0 if both_empty else 2.0 * tp / (n_p + n_r)
    res["jaccard"] = 1.0 if both_empty else tp / (n_p + n_r - tp)
    res["precision"] = 1.0 if both_empty else _ratio(tp, n_p)
    res["recall"] = 1.0 if both_empty else _ratio(tp, n_r)
    if sd.pred_empty or sd.ref_empty:
        hd95 = hd_max = msd_pr = msd_rp = hd95_pr = hd95_rp = assd = math.nan
        surface_dsc = 1.0 if both_empty else 0.0
    else:
        hd95_pr = weighted_percentile(sd.pred_to_ref, sd.area_pred, 95.0)
        hd95_rp = weighted_percentile(sd.ref_to_pred, sd.area_ref, 95.0)
        hd95 = max(hd95_pr, hd95_rp)
        hd_max = float(max(sd.pred_to_ref[-1], sd.ref_to_pred[-1]))
        ap, ar = float(sd.area_pred.sum()), float(sd.area_ref.sum())
        msd_pr = float(np.dot(sd.pred_to_ref, sd.area_pred) / ap)
        msd_rp = float(np.dot(sd.ref_to_pred, sd.area_ref) / ar)
        assd = (msd_pr * ap + msd_rp * ar) / (ap + ar)
        within = float(sd.area_pred[sd.pred_to_ref <= tolerance_mm].sum()
                       + sd.area_ref[sd.ref_to_pred <= tolerance_mm].sum())
        surface_dsc = within / (ap + ar)
    res.update({
        "hd95_mm": hd95, "hd_max_mm": hd_max, "msd_pred_to_ref_mm": msd_pr, "msd_ref_to_pred_mm": msd_rp,
        "surface_dsc": surface_dsc, "tolerance_mm": tolerance_mm,
        "volume_pred_cc": n_p * voxel_cc, "volume_ref_cc": n_r * voxel_cc,
        "volume_diff_cc": (n_p - n_r) * voxel_cc,
        "hd95_pred_to_ref_mm": hd95_pr, "hd95_ref_to_pred_mm": hd95_rp, "assd_mm": assd,
        "volume_diff_pct": (100.0 * (n_p - n_r) / n_r) if n_r else math.nan,
        "surface_area_pred_mm2": float(sd.area_pred.sum()), "surface_area_ref_mm2": float(sd.area_ref.sum()),
        "flags": flags,
    })
    return res


# ---------------------------------------------------------------------------------------------
# Tolerances

#: Published per-organ tolerances (mm), Nikolov et al. 2021 (JMIR 23(7):e26151), matched after
#: normalising the name (case, side suffixes). Canonical ParotidOAR names use labels.info().
PUBLISHED_TOLERANCES_MM = {"parotid": 2.85, "mandible": 1.01}
DEFAULT_TOLERANCE_MM = 2.0

_SIDE_RE = re.compile(r"([\s_\-]*(lt|rt|l|r|left|right|links|rechts))$", re.IGNORECASE)


def _normalise_name(name: str) -> str:
    base = _SIDE_RE.sub("", name.strip())
    return re.sub(r"[\s_\-]+", " ", base).strip().lower()


def default_tolerance(name: str) -> float:
    """Default surface-DSC tolerance for a segment name (mm).

    Canonical names → ``labels.info(name).tolerance_mm``; otherwise a
    published value when the normalised name matches (``Parotid-Lt`` →
    parotid 2.85, ``Mandible`` → 1.01); else 2.0 mm.
    """
    from . import labels

    try:
        return float(labels.info(name).tolerance_mm)
    except KeyError:
        pass
    norm = _normalise_name(name)
    for key, value in PUBLISHED_TOLERANCES_MM.items():
        if norm == key or norm.startswith(key + " ") or norm == key + "s":
            return value
    return DEFAULT_TOLERANCE_MM


def resolve_tolerance(name: str, tolerances: dict | None = None) -> float:
    """``tolerances[name]`` if given (also accepts the key ``"*"`` as a global default), else the default."""
    if tolerances:
        if name in tolerances:
            return float(tolerances[name])
        if "*" in tolerances:
            return float(tolerances["*"])
    return default_tolerance(name)


def parse_tolerance_args(items) -> dict[str, float]:
    """``["Parotid=2.5", "Skin=1"]`` → dict; ``"2.5"`` alone sets the global default (key ``"*"``)."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = str(item).rpartition("=")
        if not sep:
            name, value = "*", item
        try:
            mm = float(value)
        except ValueError:
            raise InputError(f"Bad tolerance {item!r}: use NAME=MM, for example Parotid=2.85.") from None
        if not math.isfinite(mm) or mm < 0:
            raise InputError(f"Bad tolerance {item!r}: the value must be a non-negative number of mm.")
        out[name.strip() or "*"] = mm
    return out


# ---------------------------------------------------------------------------------------------
# Multi-segment comparison


def compare_segmentations(pred_masks: dict, ref_masks: dict, geometry, names=None, tolerances=None) -> dict:
    """Compare every named segment of two segmentations on the same grid.

    ``names=None`` compares the segments present in both (reference order), except the
    ROI control segment ("ROI (parotid + N mm)"), which is compared only when named;
    names present in only one are listed in ``notes``. An explicitly named
    segment missing from one side is compared as an empty mask (and noted).
    Returns ``{"segments": {NAME: compare(...)}, "spacing_mm": [si, sj, sk], "notes": [...]}``.
    """
    notes: list[str] = []
    if names is None:
        from .labels import is_roi

        names = [n for n in ref_masks if n in pred_masks and not is_roi(n)]
        rois = [n for n in ref_masks if n in pred_masks and is_roi(n)]
        if rois:
            notes.append(f"ROI segment(s) not compared by default (a control structure): {', '.join(rois)}.")
        only_ref = [n for n in ref_masks if n not in pred_masks]
        only_pred = [n for n in pred_masks if n not in ref_masks]
        if only_ref:
            notes.append(f"Only in the reference (not compared): {', '.join(only_ref)}.")
        if only_pred:
            notes.append(f"Only in the prediction (not compared): {', '.join(only_pred)}.")
        if not names:
            raise InputError("The prediction and the reference have no segment name in common "
                             f"(prediction: {', '.join(pred_masks) or 'none'}; reference: "
                             f"{', '.join(ref_masks) or 'none'}). Use --segments / --name-map to match them.")
    segments = {}
    for name in names:
        if name not in pred_masks and name not in ref_masks:
            raise InputError(f"Segment {name!r} is in neither segmentation. Available: "
                             f"{', '.join(sorted(set(pred_masks) | set(ref_masks)))}.")
        shape = geometry.shape
        pred = pred_masks.get(name)
        ref = ref_masks.get(name)
        if pred is None:
            notes.append(f"{name}: missing from the prediction, compared as empty.")
            pred = np.zeros(shape, bool)
        if ref is None:
            notes.append(f"{name}: missing from the reference, compared as empty.")
            ref = np.zeros(shape, bool)
        for label, arr in (("prediction", pred), ("reference", ref)):
            if np.shape(arr) != tuple(shape):
                raise GeometryError(f"{name} in the {label} has shape {np.shape(arr)}, expected {tuple(shape)}.")
        segments[name] = compare(pred, ref, geometry.spacing_zyx, resolve_tolerance(name, tolerances))
        for flag in segments[name]["flags"]:
            notes.append(f"{name}: {flag.replace('_', ' ')}; distances are undefined (NaN/null).")
    return {"segments": segments, "spacing_mm": list(geometry.spacing), "notes": notes}


# ---------------------------------------------------------------------------------------------
# Cohort statistics (paper's Table 1) and paired method comparison

SUMMARY_METRICS = ("dsc", "jaccard", "hd95_mm", "precision", "recall", "surface_dsc", "msd_pred_to_ref_mm",
                   "msd_ref_to_pred_mm", "volume_diff_cc")


def _finite(values) -> np.ndarray:
    a = np.asarray([np.nan if v is None else float(v) for v in values], dtype=float)
    return a[np.isfinite(a)]


def describe(values) -> dict:
    """n (finite values), mean, sample SD (ddof=1), median, min, max; NaN/None values are skipped."""
    a = _finite(values)
    if a.size == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "median": math.nan, "min": math.nan, "max": math.nan}
    return {"n": int(a.size), "mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else math.nan,
            "median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def summarise_cohort(rows, metrics=SUMMARY_METRICS) -> dict:
    """Mean ± SD per segment (and per method when rows carry ``method``).

    ``rows``: dicts with ``case``, ``segment``, optional ``method`` and metric
    values (as produced by :func:`cohort_rows`). Returns
    ``{"methods": {METHOD: {"segments": {NAME: {metric: describe()}}, "n_cases": N}}}``;
    rows without a method are grouped under ``""``.
    """
    out: dict = {"methods": {}}
    grouped: dict = {}
    for r in rows:
        grouped.setdefault(r.get("method") or "", {}).setdefault(r["segment"], []).append(r)
    for method, segs in grouped.items():
        seg_out = {}
        cases = set()
        for seg, seg_rows in segs.items():
            cases.update(r.get("case") for r in seg_rows)
            seg_out[seg] = {m: describe(r.get(m) for r in seg_rows) for m in metrics}
        out["methods"][method] = {"segments": seg_out, "n_cases": len(cases)}
    return out


def paired_test(a, b, alpha: float = 0.05) -> dict:
    """Paired comparison of two methods on the same cases (as in the paper).

    Pairs with a NaN on either side are dropped. The differences ``a − b`` are
    checked for normality with a Kolmogorov–Smirnov test against a normal
    distribution with their own mean and SD; if normality is not rejected at
    ``alpha`` a paired t-test is used, otherwise a Wilcoxon signed-rank test.
    """
    from scipy import stats

    a = np.asarray([np.nan if v is None else float(v) for v in a], dtype=float)
    b = np.asarray([np.nan if v is None else float(v) for v in b], dtype=float)
    if a.shape != b.shape:
        raise InputError(f"Paired test needs the same number of values on both sides ({a.size} vs {b.size}).")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    out = {"n": int(d.size), "mean_a": float(a.mean()) if a.size else math.nan,
           "mean_b": float(b.mean()) if b.size else math.nan,
           "mean_diff": float(d.mean()) if d.size else math.nan,
           "sd_diff": float(d.std(ddof=1)) if d.size > 1 else math.nan,
           "normality_test": "kolmogorov-smirnov", "normality_p": math.nan, "normal": None,
           "test": None, "statistic": math.nan, "p_value": math.nan, "significant": None, "alpha": alpha}
    if d.size < 3:
        out["note"] = "fewer than 3 complete pairs: no test"
        return out
    sd = d.std(ddof=1)
    if sd == 0:
        out["note"] = "all differences are equal: no test"
        return out
    ks = stats.kstest((d - d.mean()) / sd, "norm")
    out["normality_p"] = float(ks.pvalue)
    out["normal"] = bool(ks.pvalue > alpha)
    if out["normal"]:
        t = stats.ttest_rel(a, b)
        out.update(test="paired t-test", statistic=float(t.statistic), p_value=float(t.pvalue))
    else:
        w = stats.wilcoxon(a, b)
        out.update(test="wilcoxon signed-rank", statistic=float(w.statistic), p_value=float(w.pvalue))
    out["significant"] = bool(out["p_value"] < alpha)
    return out


def compare_methods(rows, method_a: str, method_b: str, metrics=("dsc", "jaccard", "hd95_mm", "precision",
                                                                 "recall", "surface_dsc"), alpha=0.05) -> dict:
    """Paired test per segment and metric between two methods, matching rows by (case, segment)."""
    index = {(r.get("method") or "", r["case"], r["segment"]): r for r in rows}
    segments = []
    for r in rows:
        if r["segment"] not in segments:
            segments.append(r["segment"])
    out = {"method_a": method_a, "method_b": method_b, "segments": {}}
    for seg in segments:
        cases = sorted({c for (m, c, s) in index if s == seg and m == method_a}
                       & {c for (m, c, s) in index if s == seg and m == method_b})
        if not cases:
            continue
        out["segments"][seg] = {
            m: paired_test([index[(method_a, c, seg)].get(m) for c in cases],
                           [index[(method_b, c, seg)].get(m) for c in cases], alpha)
            for m in metrics}
    return out


def cohort_rows(case: str, result: dict, method: str | None = None) -> list[dict]:
    """Flatten a :func:`compare_segmentations` result into one row per segment."""
    rows = []
    for name, seg in result["segments"].items():
        row = {"case": case, "method": method or "", "segment": name}
        row.update({k: seg.get(k) for k in METRIC_KEYS + EXTRA_KEYS})
        row["flags"] = ";".join(seg.get("flags", []))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Output helpers (atomic, never overwrite without force)


def jsonable(obj):
    """Replace NaN/inf by None and numpy scalars by Python numbers, recursively."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_text(path, text: str, force: bool = False) -> Path:
    """Write ``text`` to ``path`` via a temp file + ``os.replace``; refuse to overwrite unless ``force``."""
    path = Path(path)
    check_output(path, force)
    with atomic_file(path, force=force) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def write_json(path, obj, force: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n", force)


def _fmt_cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else repr(round(v, 6))
    if isinstance(v, (list, tuple)):
        return ";".join(str(x) for x in v)
    return str(v)


def rows_to_csv(rows, fieldnames) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fieldnames)
    for r in rows:
        w.writerow([_fmt_cell(r.get(f)) for f in fieldnames])
    return buf.getvalue()


def write_csv(path, rows, fieldnames, force: bool = False) -> Path:
    return atomic_write_text(path, rows_to_csv(rows, fieldnames), force)


SEGMENT_CSV_FIELDS = ("segment",) + METRIC_KEYS + EXTRA_KEYS + ("flags",)


def result_rows(result: dict) -> list[dict]:
    """Rows (one per segment) of a :func:`compare_segmentations` result, for CSV/tables."""
    rows = []
    for name, seg in result["segments"].items():
        row = {"segment": name}
        row.update({k: seg.get(k) for k in METRIC_KEYS + EXTRA_KEYS})
        row["flags"] = ";".join(seg.get("flags", []))
        rows.append(row)
    return rows


def format_table(result: dict) -> str:
    """A fixed-width text table of the main metrics per segment."""
    cols = [("dsc", "DSC", 6, 3), ("jaccard", "Jacc", 6, 3), ("precision", "Prec", 6, 3), ("recall", "Rec", 6, 3),
            ("hd95_mm", "HD95mm", 7, 2), ("hd_max_mm", "HDmax", 7, 2), ("surface_dsc", "sDSC", 6, 3),
            ("tolerance_mm", "tau", 5, 2), ("volume_pred_cc", "Vpred", 8, 2), ("volume_ref_cc", "Vref", 8, 2)]
    names = list(result["segments"])
    w0 = max([len("Segment")] + [len(n) for n in names])
    lines = ["Segment".ljust(w0) + " " + " ".join(h.rjust(w) for _, h, w, _ in cols)]
    for n in names:
        seg = result["segments"][n]
        cells = []
        for key, _, w, p in cols:
            v = seg.get(key)
            cells.append(("n/a" if v is None or (isinstance(v, float) and not math.isfinite(v))
                          else f"{v:.{p}f}").rjust(w))
        lines.append(n.ljust(w0) + " " + " ".join(cells))
    return "\n".join(lines)
