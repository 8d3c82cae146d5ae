"""Synthetic post-operative head-and-neck CT phantom (research and testing only).

Real patient CTs with the six parotid-brachytherapy OARs cannot be shipped, so
every test, benchmark and the demo use this procedural phantom instead.

Every structure is an analytic implicit shape defined in a *patient frame*
(LPS axes, millimetres, origin midway between the two external auditory
canals). A random pose rotation ``R`` (each Euler angle within ±10°) and a
translation ``c`` map the patient frame into the scanner's LPS frame::

    p_world = R @ p_patient + c

The CT grid stays axis-aligned (identity direction, a real origin); labels and
intensities are obtained by mapping each voxel centre back into the patient
frame and evaluating the shapes there, so the pose is applied through the
physical geometry of the sampling — labels and image always agree.

Anatomy (sizes scale with the head): soft tissue ~40 HU, subcutaneous fat ~-100
HU, a ~3 mm skin rind, skull / skull base / temporal bone (cortical 700-1500
HU), mastoid process with air cells behind and below the ear canal, an
air-filled external auditory canal (~7 mm wide, ~25 mm long), the auricle standing
out in air with its concha cupping the canal opening, the mandibular ramus
(cortical + cancellous) with the condyle in the glenoid fossa just in front of
the canal, and the parotid gland (-30..+30 HU) wrapped around the back of the
ramus below the canal. On the operated side a random part of the gland is
resected and partly replaced by seroma or fibrosis. Both sides exist (mirror
anatomy); only the operated side's structures are labelled. The reference ROI is
the residual parotid expanded by 17 mm (exact Euclidean distance in mm) and the
six OARs in ``labels`` are clipped to it (as in the paper); ``labels_full``
keeps them whole.

Determinism: one :class:`numpy.random.Generator` seeded with ``seed`` drives
everything; all parameters are drawn in a fixed order before any optional
override is applied, and files are written with fixed gzip settings and no
timestamps, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import labels as L
from .errors import InputError, OutputExistsError
from .imageio import Geometry

GENERATOR_VERSION = "2"  # 2: concha around the canal opening (issue #13)
DISCLAIMER = "Synthetic phantom data - research use only, not for clinical use."
DEFAULT_SPACING = (0.98, 0.98, 2.0)  # (x, y, z) mm
SIZES = ("full", "small")
SIDES = ("left", "right", "random")
FULL_MATRIX = 512  # in-plane voxels of a full case (any spacing)
FULL_Z_MM = 200.0  # cranio-caudal extent of a full case
FULL_Z_BELOW_EAR_MM = 140.0  # of which below the ear-canal level
SMALL_EXTENT_MM = (156.8, 156.8, 120.0)  # (x, y, z) of a "small" case (160 x 160 x 60 at the default spacing)
MAX_CASES_PER_SEED = 1000
AIR_HU = -1000.0
# concha (cavum conchae) around the canal opening, relative to the auricle's size (see _auricle)
CONCHA_RADIUS_PER_WIDTH = 0.22
CONCHA_DEPTH_PER_HEIGHT = 0.18
CONCHA_POSTERIOR_SHIFT = 0.3  # centre behind the meatus axis, in units of the inner radius
HU_MIN, HU_MAX = -1024, 3071

# body cross-section key frames (patient z in mm relative to the ear-canal level, unscaled)
_Z_KEYS = np.array([-150.0, -90.0, -70.0, -45.0, -20.0, 0.0, 25.0, 70.0])
_A_KEYS = np.array([60.0, 56.0, 58.0, 67.0, 72.0, 72.0, 76.0, 72.0])  # half width (x)
_B_KEYS = np.array([60.0, 58.0, 66.0, 80.0, 88.0, 95.0, 98.0, 92.0])  # half depth (y)
_CY_KEYS = np.array([12.0, 12.0, 0.0, -8.0, -8.0, -2.0, 4.0, 6.0])  # centre (y)


@dataclass
class PhantomCase:
    """One generated case. Arrays are numpy ``[k, j, i]``; physical space is LPS mm."""

    ct: np.ndarray  # int16 HU
    geometry: Geometry
    labels: dict  # name -> bool mask; Parotid + 6 OARs, OARs clipped to the ROI
    labels_full: dict  # the same structures, unclipped
    roi: np.ndarray  # bool, residual parotid + margin
    side: str  # operated side, "left" | "right"
    params: dict = field(default_factory=dict)  # anatomy and acquisition parameters (JSON-able)
    seed: int = 0
    case_id: str = ""

    @property
    def roi_name(self) -> str:
        return L.roi_segment_name(self.params.get("roi_margin_mm", L.ROI_MARGIN_MM_DEFAULT))


# --------------------------------------------------------------------------------------------
# parameters


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def _rotation(angles_deg) -> np.ndarray:
    """Rotation about x (pitch, nodding), then y (roll), then z (yaw): ``Rz @ Ry @ Rx``."""
    ax, ay, az = (math.radians(float(a)) for a in angles_deg)
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def sample_params(rng: np.random.Generator) -> dict:
    """Draw every random parameter of a case, in a fixed order (do not reorder: determinism)."""
    p = {}
    p["side_draw"] = _u(rng, 0, 1)
    s = _u(rng, 0.9, 1.1)
    p["head_scale"] = s
    p["pose_deg"] = [_u(rng, -10, 10) for _ in range(3)]
    p["position_mm"] = [_u(rng, -15, 15), _u(rng, -15, 15), _u(rng, -40, 40)]
    p["skin_mm"] = _u(rng, 2.6, 3.4)
    p["fat_mm"] = _u(rng, 2.0, 6.0)
    p["skull_mm"] = _u(rng, 5.0, 8.0)
    p["hu"] = {
        "soft_tissue": _u(rng, 35, 50), "fat": _u(rng, -115, -85), "skin_extra": _u(rng, 0, 15),
        "brain": _u(rng, 28, 38), "skull": _u(rng, 900, 1300), "temporal_bone": _u(rng, 1100, 1500),
        "cortical": _u(rng, 1000, 1400), "cancellous": _u(rng, 250, 450), "mastoid_matrix": _u(rng, 700, 950),
        "air_cell": _u(rng, -950, -800), "cartilage": _u(rng, 80, 130), "parotid": _u(rng, -30, 30),
        "teeth": _u(rng, 1600, 2400),
    }
    p["canal"] = {"radius": _u(rng, 3.0, 4.0), "length": _u(rng, 22.0, 28.0),
                  "anterior_tilt": _u(rng, 0.0, 0.25), "upward_tilt": _u(rng, -0.05, 0.15)}
    p["auricle"] = {"width": _u(rng, 28, 36) * s, "height": _u(rng, 55, 68) * s, "angle_deg": _u(rng, 18, 35),
                    "tilt_deg": _u(rng, 5, 20), "thickness": _u(rng, 3.0, 5.0), "curl": _u(rng, 2.0, 6.0)}
    p["mastoid"] = {"semi_axes": [_u(rng, 8, 10) * s, _u(rng, 9, 12) * s, _u(rng, 12, 16) * s],
                    "n_cells": int(rng.integers(15, 41)), "cell_radius": [_u(rng, 1.2, 1.8), _u(rng, 2.2, 3.2)],
                    "cell_seed": int(rng.integers(0, 2**31 - 1))}
    p["condyle"] = {"semi_axes": [_u(rng, 8, 10) * s, _u(rng, 4.0, 5.0) * s, _u(rng, 4.5, 5.5) * s],
                    "joint_space": _u(rng, 2.0, 3.0)}
    p["ramus"] = {"width": _u(rng, 28, 34) * s, "height": _u(rng, 45, 55) * s, "half_thickness": _u(rng, 3.0, 4.5),
                  "cortex": _u(rng, 1.5, 2.5), "posterior_tilt": _u(rng, -0.1, 0.15), "medial_slope": _u(rng, 0.05, 0.15)}
    p["parotid"] = {"superficial_semi_axes": [_u(rng, 7.0, 9.0) * s, _u(rng, 20, 25) * s, _u(rng, 24, 30) * s],
                    "deep_semi_axes": [_u(rng, 10, 13) * s, _u(rng, 10, 13) * s, _u(rng, 20, 25) * s],
                    "deform_amp": _u(rng, 0.05, 0.2),
                    "deform_freq": [_u(rng, 0.08, 0.2) for _ in range(3)],
                    "deform_phase": [_u(rng, 0, 2 * math.pi) for _ in range(3)]}
    normal = rng.normal(size=3)
    if normal[2] > 0.2 * np.linalg.norm(normal):  # keep the upper pole (next to the canal) in most cases
        normal[2] = -normal[2]
    p["resection"] = {"fraction": _u(rng, 0.15, 0.5),
                      "normal": [float(v) for v in normal / max(np.linalg.norm(normal), 1e-9)],
                      "fill_fraction": _u(rng, 0.3, 0.9),
                      "fill": "seroma" if rng.random() < 0.5 else "fibrosis",
                      "seroma_hu": _u(rng, 5, 15), "fibrosis_hu": _u(rng, 15, 25),
                      "collapse": "soft_tissue" if rng.random() < 0.6 else "fat"}
    p["noise_sigma"] = _u(rng, 10, 40)
    p["blur_mm"] = _u(rng, 0.3, 0.9)
    p["hu_offset"] = _u(rng, -15, 15)
    p["metal"] = bool(rng.random() < 0.25)
    p["metal_detail"] = {"n": int(rng.integers(1, 4)), "positions": [_u(rng, 0.15, 0.85) for _ in range(3)],
                         "amplitude": _u(rng, 250, 700), "streaks": int(rng.integers(6, 14)),
                         "phase": _u(rng, 0, math.pi)}
    p["roi_margin_mm"] = float(L.ROI_MARGIN_MM_DEFAULT)
    return p


def _apply_overrides(params: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if key not in params or key == "side_draw":
            raise InputError(f"Unknown phantom parameter {key!r}; known: "
                             f"{', '.join(k for k in params if k != 'side_draw')}.")
        if isinstance(params[key], dict) and isinstance(value, dict):
            unknown = set(value) - set(params[key])
            if unknown:
                raise InputError(f"Unknown keys {sorted(unknown)} for phantom parameter {key!r}.")
            params[key] = {**params[key], **value}
        else:
            params[key] = value
    return params


# --------------------------------------------------------------------------------------------
# geometry helpers


def _check_spacing(spacing) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise InputError(f"Spacing must be three positive numbers (x, y, z mm), got {spacing!r}.") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"Spacing must be three positive numbers (x, y, z mm), got {spacing!r}.")
    if max(values) > 10:
        raise InputError(f"Spacing {values} mm is too coarse for this anatomy; use at most 10 mm per axis.")
    if min(values) < 0.2:
        raise InputError(f"Spacing {values} mm is too fine (huge grid); use at least 0.2 mm per axis.")
    return values


def _grid(size: str, spacing, rotation: np.ndarray, centre: np.ndarray, sign: float) -> Geometry:
    sx, sy, sz = spacing
    if size == "full":
        n = (FULL_MATRIX, FULL_MATRIX, max(8, int(round(FULL_Z_MM / sz))))
        # in-plane centred on the scanner isocentre (0, 0); z from below the neck to above the ears
        origin = (-(n[0] - 1) / 2 * sx, -(n[1] - 1) / 2 * sy, centre[2] - FULL_Z_BELOW_EAR_MM)
    else:
        n = tuple(max(8, int(round(e / s))) for e, s in zip(SMALL_EXTENT_MM, spacing))
        # around the ear-parotid region of the operated side (the midline just inside the grid)
        focus = rotation @ np.array([sign * 40.0, 8.0, -22.0]) + centre
        origin = tuple(focus - (np.asarray(n) - 1) / 2 * np.asarray(spacing))
    origin = tuple(round(float(v), 4) for v in origin)
    return Geometry(n, spacing, origin)


class _Box:
    """Patient-frame coordinates (u, v, w) of a block of the grid, as float32 arrays [k, j, i].

    ``slices`` index the grid; :meth:`sub` returns a view-based sub-block whose
    ``slices`` index *this* block.
    """

    def __init__(self, geometry: Geometry, rotation, centre, lo_zyx, hi_zyx):
        self.geometry, self.rotation, self.centre = geometry, rotation, centre
        self.lo = np.asarray(lo_zyx, dtype=int)
        self.hi = np.asarray(hi_zyx, dtype=int)
        self.shape = tuple(int(v) for v in self.hi - self.lo)
        m = rotation.T @ geometry.direction_matrix @ np.diag(geometry.spacing)  # ijk -> patient
        t = rotation.T @ (np.asarray(geometry.origin) - centre)
        k = np.arange(self.lo[0], self.hi[0], dtype=np.float64)
        j = np.arange(self.lo[1], self.hi[1], dtype=np.float64)
        i = np.arange(self.lo[2], self.hi[2], dtype=np.float64)
        self.coords = []
        for r in range(3):
            plane = ((m[r, 0] * i + t[r])[None, :] + (m[r, 1] * j)[:, None]).astype(np.float32)
            out = np.empty(self.shape, dtype=np.float32)
            np.add(plane[None], (m[r, 2] * k).astype(np.float32)[:, None, None], out=out)
            self.coords.append(out)
        self.slices = tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi))

    def sub(self, lo_p, hi_p):
        """Sub-block covering a patient-frame box, or None if it misses this block."""
        found = _index_box(self.geometry, self.rotation, self.centre, lo_p, hi_p, within=(self.lo, self.hi))
        if found is None:
            return None
        return _SubBox(self, found[0] - self.lo, found[1] - self.lo)


class _SubBox:
    """A view of a :class:`_Box`; ``slices`` index the parent box."""

    def __init__(self, parent: _Box, lo, hi):
        self.lo, self.hi = np.asarray(lo, int), np.asarray(hi, int)
        self.slices = tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi))
        self.coords = [c[self.slices] for c in parent.coords]
        self.shape = self.coords[0].shape


def _index_box(geometry: Geometry, rotation, centre, lo_p, hi_p, within=None):
    """numpy-order index bounds of the grid block covering a patient-frame box (None if outside)."""
    lo_p, hi_p = np.asarray(lo_p, float), np.asarray(hi_p, float)
    corners = np.array([[x, y, z] for x in (lo_p[0], hi_p[0]) for y in (lo_p[1], hi_p[1])
                        for z in (lo_p[2], hi_p[2])])
    ijk = geometry.lps_to_index(corners @ rotation.T + centre)
    lo = np.floor(ijk.min(axis=0)).astype(int)[::-1]
    hi = np.ceil(ijk.max(axis=0)).astype(int)[::-1] + 1
    glo, ghi = np.zeros(3, int), np.asarray(geometry.shape)
    if within is not None:
        glo, ghi = np.asarray(within[0]), np.asarray(within[1])
    lo, hi = np.maximum(lo, glo), np.minimum(hi, ghi)
    if np.any(hi <= lo):
        return None
    return lo, hi


def _ellipse_distance(x, y, a, b):
    """Approximate signed distance (mm, negative inside) to the ellipse (x/a)^2 + (y/b)^2 = 1."""
    return _ellipse_distance_inv(x, y, 1.0 / (a * a), 1.0 / (b * b))


def _ellipse_distance_inv(x, y, ia2, ib2):
    """First-order signed distance F/|grad F| with F = x^2 ia2 + y^2 ib2 - 1 (float32, few temporaries)."""
    gx = x * ia2
    gy = y * ib2
    f = x * gx
    f += y * gy
    f -= 1.0
    gx *= gx
    gy *= gy
    gx += gy
    np.sqrt(gx, out=gx)
    gx *= 2.0
    np.maximum(gx, 1e-3, out=gx)
    f /= gx
    return f


def _body_distance(u, v, w, s):
    """Signed distance to the skin surface: elliptic cross-sections interpolated along patient z.

    The per-height parameters come from a 0.2 mm lookup table (exactly as ``np.interp``
    up to that step, and much faster on millions of voxels).
    """
    wmin, wmax = float(w.min()), float(w.max())
    step = 0.2
    zs = np.arange(wmin - step, wmax + 2 * step, step)
    a = np.interp(zs, _Z_KEYS * s, _A_KEYS * s)
    b = np.interp(zs, _Z_KEYS * s, _B_KEYS * s)
    cy = np.interp(zs, _Z_KEYS * s, _CY_KEYS * s).astype(np.float32)
    ia2, ib2 = (1.0 / (a * a)).astype(np.float32), (1.0 / (b * b)).astype(np.float32)
    idx = w - np.float32(zs[0])
    idx *= np.float32(1.0 / step)
    idx += 0.5
    idx = idx.astype(np.int32)
    yy = v - cy[idx]
    return _ellipse_distance_inv(u, yy, ia2[idx], ib2[idx])


def _head_half_width(y, z, s) -> float:
    a = float(np.interp(z, _Z_KEYS * s, _A_KEYS * s))
    b = float(np.interp(z, _Z_KEYS * s, _B_KEYS * s))
    cy = float(np.interp(z, _Z_KEYS * s, _CY_KEYS * s))
    return a * math.sqrt(max(0.0, 1.0 - ((y - cy) / b) ** 2))


def _ellipsoid(u, v, w, centre, semi):
    """(normalised radius)^2 - 1: negative inside."""
    return (((u - centre[0]) / semi[0]) ** 2 + ((v - centre[1]) / semi[1]) ** 2
            + ((w - centre[2]) / semi[2]) ** 2 - 1.0)


def _sdf_box(dx, dy, dz):
    """Signed distance of a box from per-axis signed distances."""
    outside = np.sqrt(np.maximum(dx, 0) ** 2 + np.maximum(dy, 0) ** 2 + np.maximum(dz, 0) ** 2)
    inside = np.minimum(np.maximum(np.maximum(dx, dy), dz), 0)
    return outside + inside


# --------------------------------------------------------------------------------------------
# anatomy of one ear / parotid region (evaluated for |x|, i.e. both sides mirror each other)


def _landmarks(p: dict) -> dict:
    s = p["head_scale"]
    canal, cond, ram = p["canal"], p["condyle"], p["ramus"]
    a0 = _head_half_width(0.0, 0.0, s)  # lateral head surface at the canal
    d = np.array([-1.0, -canal["anterior_tilt"], canal["upward_tilt"]])
    d /= np.linalg.norm(d)
    canal_start = np.array([a0 + 1.0, 0.0, 0.0])
    cy = -(canal["radius"] + cond["joint_space"] + 1.0 + cond["semi_axes"][1])
    condyle_centre = np.array([a0 - 22.0 * s, cy, 1.0])
    ramus_top = condyle_centre[2] - cond["semi_axes"][2] - 7.0 * s
    return {"a0": a0, "canal_start": canal_start, "canal_dir": d,
            "condyle_centre": condyle_centre, "ramus_top": ramus_top,
            "ramus_bottom": ramus_top - ram["height"], "ramus_x": condyle_centre[0],
            "ramus_posterior": cy + cond["semi_axes"][1] * 0.8,
            "mastoid_centre": np.array([a0 - 22.0 * s, 16.0 * s, -14.0 * s])}


def _ramus_sdf(u, v, w, p, lm):
    r = p["ramus"]
    depth = lm["ramus_top"] - w  # mm below the top of the ramus
    xr = lm["ramus_x"] - r["medial_slope"] * depth
    y_post = lm["ramus_posterior"] + r["posterior_tilt"] * depth
    dx = np.abs(u - xr) - r["half_thickness"]
    dy = np.abs(v - (y_post - r["width"] / 2)) - r["width"] / 2
    zc = (lm["ramus_top"] + lm["ramus_bottom"]) / 2
    dz = np.abs(w - zc) - (lm["ramus_top"] - lm["ramus_bottom"]) / 2
    return _sdf_box(dx, dy, dz)


def _ramus_bounds(p, lm):
    r = p["ramus"]
    h = lm["ramus_top"] - lm["ramus_bottom"]
    xs = (lm["ramus_x"], lm["ramus_x"] - r["medial_slope"] * h)
    ys = (lm["ramus_posterior"], lm["ramus_posterior"] + r["posterior_tilt"] * h)
    lo = (min(xs) - r["half_thickness"] - 1, min(ys) - r["width"] - 1, lm["ramus_bottom"] - 1)
    hi = (max(xs) + r["half_thickness"] + 1, max(ys) + 1, lm["ramus_top"] + 1)
    return lo, hi


def _mastoid_f(u, v, w, p, lm):
    mc = lm["mastoid_centre"]
    ms = p["mastoid"]["semi_axes"]
    below = np.maximum(mc[2] - w, 0)
    taper = 1.0 + (0.6 / ms[2]) * below  # narrower towards the tip
    return ((u - mc[0]) * taper / ms[0]) ** 2 + ((v - mc[1]) * taper / ms[1]) ** 2 + ((w - mc[2]) / ms[2]) ** 2 - 1


def _canal_mask(u, v, w, p, lm):
    c0, cdir = lm["canal_start"], lm["canal_dir"]
    length, radius = p["canal"]["length"], p["canal"]["radius"]
    rx, ry, rz = u - c0[0], v - c0[1], w - c0[2]
    t = rx * cdir[0] + ry * cdir[1] + rz * cdir[2]
    r2 = rx * rx + ry * ry + rz * rz - t * t
    return (t >= 0) & (t <= length + 1.0) & (r2 <= radius * radius)


def _canal_bounds(p, lm):
    c0, cdir = lm["canal_start"], lm["canal_dir"]
    c1 = c0 + cdir * (p["canal"]["length"] + 1.0)
    r = p["canal"]["radius"] + 1.0
    return np.minimum(c0, c1) - r, np.maximum(c0, c1) + r


def _condyle_masks(u, v, w, p, lm):
    c = lm["condyle_centre"]
    semi = p["condyle"]["semi_axes"]
    head = _ellipsoid(u, v, w, c, semi) <= 0
    # neck: elliptic column from the head down into the ramus
    neck_r = (((u - c[0]) / (semi[0] * 0.45)) ** 2 + ((v - c[1]) / (semi[1] * 0.9)) ** 2) <= 1
    neck = neck_r & (w <= c[2]) & (w >= lm["ramus_top"] - 2.0)
    return head, neck


def _box_around(centre, semi, pad=1.0):
    centre, semi = np.asarray(centre, float), np.asarray(semi, float)
    return centre - semi - pad, centre + semi + pad


def _paint(ct, mask, value):
    np.copyto(ct, np.float32(value), where=mask)


class _Side:
    """Sub-blocks of the work box on one side; coordinates are mirrored to |x| (lateral positive)."""

    def __init__(self, work: _Box, sign: float):
        self.work, self.sign = work, sign

    def box(self, lo, hi):
        x_lo, x_hi = sorted((self.sign * lo[0], self.sign * hi[0]))
        sub = self.work.sub((x_lo, lo[1], lo[2]), (x_hi, hi[1], hi[2]))
        if sub is None:
            return None
        u_raw, v, w = sub.coords
        sub.u = np.abs(u_raw)
        sub.v, sub.w = v, w
        sub.half = (u_raw * self.sign) > 0
        return sub


def _side_anatomy(ct, body_d, work: _Box, p: dict, lm: dict, sign: float, operated: bool, cells, out: dict):
    """Paint one side's ear/parotid anatomy into the work-box CT; on the operated side OR its
    structures into the work-box masks ``out`` (name -> bool array)."""
    hu = p["hu"]
    side = _Side(work, sign)
    skin_t, fat_t = p["skin_mm"], p["fat_mm"]
    length, radius = p["canal"]["length"], p["canal"]["radius"]
    cond_semi = np.asarray(p["condyle"]["semi_axes"])
    js = p["condyle"]["joint_space"]

    def put(name, sub, mask):
        if operated:
            out[name][sub.slices] |= mask

    # temporal bone (skull base around the canal) with the glenoid fossa hollowed out
    tb_centre = lm["canal_start"] + lm["canal_dir"] * (length * 0.75) + np.array([0.0, 3.0, 3.0])
    tb_semi = (length * 0.55 + 4.0, 15.0, 12.0)
    b = side.box(*_box_around(tb_centre, tb_semi))
    if b is not None:
        temporal = (_ellipsoid(b.u, b.v, b.w, tb_centre, tb_semi) <= 0) & (body_d[b.slices] < 0) & b.half
        temporal &= _ellipsoid(b.u, b.v, b.w, lm["condyle_centre"], cond_semi + js) > 0
        _paint(ct[b.slices], temporal, hu["temporal_bone"])

    # mastoid process: cortical shell, bony matrix with air cells
    b = side.box(*_box_around(lm["mastoid_centre"], p["mastoid"]["semi_axes"]))
    if b is not None:
        m_f = _mastoid_f(b.u, b.v, b.w, p, lm)
        mastoid = (m_f <= 0) & (body_d[b.slices] < -(skin_t + 1.5)) & b.half
        mastoid &= ~_canal_mask(b.u, b.v, b.w, p, lm)
        c = ct[b.slices]
        _paint(c, mastoid, hu["cortical"])
        core = (m_f <= -0.25) & mastoid
        _paint(c, core, hu["mastoid_matrix"])
        air = np.zeros(c.shape, dtype=bool)
        for centre, rad in cells:
            air |= ((b.u - centre[0]) ** 2 + (b.v - centre[1]) ** 2 + (b.w - centre[2]) ** 2) <= rad * rad
        _paint(c, air & core, hu["air_cell"])
        put(L.MASTOID, b, mastoid)

    # external auditory canal: air cylinder from the concha medially into the temporal bone
    b = side.box(*_canal_bounds(p, lm))
    if b is not None:
        canal = _canal_mask(b.u, b.v, b.w, p, lm) & (body_d[b.slices] < 0) & b.half
        _paint(ct[b.slices], canal, AIR_HU)
        put(L.EAC, b, canal)

    # condyle (head + neck, cortical with a cancellous core) in the glenoid fossa
    lo, hi = _box_around(lm["condyle_centre"], cond_semi)
    b = side.box((lo[0], lo[1], lm["ramus_top"] - 3.0), hi)
    if b is not None:
        head, neck = _condyle_masks(b.u, b.v, b.w, p, lm)
        deep = body_d[b.slices] < -(skin_t + 1.0)
        head &= deep
        neck &= deep
        c = ct[b.slices]
        _paint(c, (head | neck) & b.half, hu["cortical"])
        _paint(c, (_ellipsoid(b.u, b.v, b.w, lm["condyle_centre"], cond_semi - 1.5) <= 0) & b.half,
               hu["cancellous"])
        put(L.CONDYLE, b, (head | (neck & (b.w > lm["ramus_top"]))) & b.half)

    # mandibular ramus: rounded vertical plate, cortical shell + cancellous core
    b = side.box(*_ramus_bounds(p, lm))
    if b is not None:
        sdf = _ramus_sdf(b.u, b.v, b.w, p, lm)
        deep = body_d[b.slices] < -(skin_t + 1.0)
        ramus = (sdf <= 0) & b.half & (b.w <= lm["ramus_top"]) & deep
        c = ct[b.slices]
        _paint(c, ramus, hu["cortical"])
        _paint(c, (sdf <= -p["ramus"]["cortex"]) & b.half & deep, hu["cancellous"])
        put(L.RAMUS, b, ramus)

    # parapharyngeal fat medial to the deep lobe (unlabelled texture)
    pp = p["parotid"]
    xr, yp = lm["ramus_x"], lm["ramus_posterior"]
    ht = p["ramus"]["half_thickness"]
    zc = lm["ramus_top"] - 0.35 * p["ramus"]["height"]
    ppf_c, ppf_s = (xr - 14.0, yp + 4.0, zc), (5.0, 9.0, 16.0)
    b = side.box(*_box_around(ppf_c, ppf_s))
    if b is not None:
        _paint(ct[b.slices], (_ellipsoid(b.u, b.v, b.w, ppf_c, ppf_s) <= 0) & b.half & (body_d[b.slices] < 0),
               hu["fat"])

    # parotid: superficial lobe lateral to the ramus + retromandibular part behind it,
    # below the canal, under the subcutaneous fat, clear of bone
    sup_c = (xr + ht + pp["superficial_semi_axes"][0] - 1.0, yp + 1.0, zc + 3.0)
    deep_c = (xr + 5.0, yp + pp["deep_semi_axes"][1] + 1.0, zc)
    grow = math.sqrt(1.0 + 3.0 * pp["deform_amp"])
    lo1, hi1 = _box_around(sup_c, np.asarray(pp["superficial_semi_axes"]) * grow)
    lo2, hi2 = _box_around(deep_c, np.asarray(pp["deep_semi_axes"]) * grow)
    b = side.box(np.minimum(lo1, lo2), np.maximum(hi1, hi2))
    if b is None:
        return
    u, v, w = b.u, b.v, b.w
    f = np.minimum(_ellipsoid(u, v, w, sup_c, pp["superficial_semi_axes"]),
                   _ellipsoid(u, v, w, deep_c, pp["deep_semi_axes"]))
    fq, ph = pp["deform_freq"], pp["deform_phase"]
    f += pp["deform_amp"] * (np.sin(fq[0] * v + ph[0]) + np.sin(fq[1] * w + ph[1]) + np.sin(fq[2] * u + ph[2]))
    head, neck = _condyle_masks(u, v, w, p, lm)
    gland = ((f <= 0) & (body_d[b.slices] < -(skin_t + fat_t)) & (w < -(radius + 2.5))
             & (_ramus_sdf(u, v, w, p, lm) > 1.0) & (_mastoid_f(u, v, w, p, lm) > 0.35)
             & ~_canal_mask(u, v, w, p, lm) & ~head & ~neck & b.half)
    c = ct[b.slices]
    _paint(c, gland, hu["parotid"])
    residual = gland
    if operated and p["resection"]["fraction"] > 0 and gland.any():
        res = p["resection"]
        nrm = np.asarray(res["normal"], dtype=np.float32)  # in the mirrored frame: +x is lateral
        proj = u * nrm[0] + v * nrm[1] + w * nrm[2]
        gvals = proj[gland]
        frac = min(max(float(res["fraction"]), 0.0), 0.95)
        cut = float(np.quantile(gvals, 1.0 - frac))
        removed = gland & (proj > cut)
        residual = gland & ~removed
        span = max(float(gvals.max()) - cut, 1e-3)
        fill = removed & (proj <= cut + res["fill_fraction"] * span)
        _paint(c, removed, hu["soft_tissue"] if res["collapse"] == "soft_tissue" else hu["fat"])
        _paint(c, fill, res["seroma_hu"] if res["fill"] == "seroma" else res["fibrosis_hu"])
    put(L.PAROTID, b, residual)


def _auricle(ct, body_d, work: _Box, p: dict, sign: float, operated: bool, out: dict):
    """The auricle: a thin curved plate standing out from the head behind the canal opening."""
    au = p["auricle"]
    s = p["head_scale"]
    y_att = p["canal"]["radius"] + 3.0
    z_att = -4.0 * s  # the lobule hangs level with the upper parotid
    x_att = _head_half_width(y_att, z_att, s) - 2.0
    alpha, beta = math.radians(au["angle_deg"]), math.radians(au["tilt_deg"])
    ds = np.array([math.sin(alpha), math.cos(alpha), 0.0])
    dv = np.array([0.0, math.sin(beta), math.cos(beta)])
    dv -= ds * float(ds @ dv)
    dv /= np.linalg.norm(dv)
    n = np.cross(ds, dv)
    hw, hh = au["width"] / 2, au["height"] / 2
    att = np.array([x_att, y_att, z_att])
    reach = au["curl"] * 2 + au["thickness"]
    corners = np.array([att + ds * a + dv * c + n * e for a in (0.0, 2 * hw) for c in (-hh, hh)
                        for e in (-reach, reach)])
    # the tragus: a small flap in front of the canal opening
    r_c = p["canal"]["radius"]
    tr_semi = np.array([2.5, 2.5, 5.0]) * s
    tr_c = np.array([_head_half_width(-(r_c + 1.5), 0.0, s) + tr_semi[0] - 1.0, -(r_c + 1.5), 0.0])
    # the concha (cavum conchae): a cup of auricle around the canal opening, its rim standing out
    # laterally from the head; the meatus stays open. No random draw of its own (sizes follow the
    # auricle's), so every other parameter of a seed is unchanged. Inner radius 0.22 x width
    # (5.5-8.7 mm: 11-17 mm across), wall = the auricle's thickness (3-5 mm), depth 0.18 x height
    # (9-13.5 mm), centred a little behind the meatus (the tragus is its front wall).
    co_r = CONCHA_RADIUS_PER_WIDTH * au["width"]
    co_t = au["thickness"]
    co_depth = CONCHA_DEPTH_PER_HEIGHT * au["height"]
    co_c = np.array([_head_half_width(0.0, 0.0, s), CONCHA_POSTERIOR_SHIFT * co_r, 0.0])
    co_lo = co_c + np.array([-3.0, -(co_r + co_t), -(co_r + co_t)])
    co_hi = co_c + np.array([co_depth + 3.0, co_r + co_t, co_r + co_t])
    lo = np.minimum(np.minimum(corners.min(axis=0), tr_c - tr_semi), co_lo) - 1.0
    hi = np.maximum(np.maximum(corners.max(axis=0), tr_c + tr_semi), co_hi) + 1.0
    b = _Side(work, sign).box(lo, hi)
    if b is None:
        return
    rx, ry, rz = b.u - att[0], b.v - att[1], b.w - att[2]
    sa = rx * ds[0] + ry * ds[1] + rz * ds[2]
    va = rx * dv[0] + ry * dv[1] + rz * dv[2]
    na = rx * n[0] + ry * n[1] + rz * n[2]
    ru = ((sa - hw) / hw) ** 2 + (va / hh) ** 2
    bend = np.abs(na - au["curl"] * ru)
    outside = body_d[b.slices] >= 0
    tragus = (_ellipsoid(b.u, b.v, b.w, tr_c, tr_semi) <= 0) & b.half & outside
    plate = (ru <= 1.0) & (bend <= au["thickness"] / 2) & b.half & outside
    rho = np.sqrt((b.v - co_c[1]) ** 2 + (b.w - co_c[2]) ** 2)
    bd = body_d[b.slices]
    concha = (outside & b.half & (bd <= co_depth) & (rho <= co_r + co_t)
              & ((rho >= co_r) | (bd <= 2.0)) & ((b.v * b.v + b.w * b.w) > r_c * r_c))
    c = ct[b.slices]
    _paint(c, plate | tragus | concha, p["hu"]["soft_tissue"])
    _paint(c, plate & (bend <= au["thickness"] / 2 - 1.0) & (va > -0.55 * hh), p["hu"]["cartilage"])
    _paint(c, concha & (rho >= co_r + 1.0) & (rho <= co_r + co_t - 1.0) & (bd >= 1.0), p["hu"]["cartilage"])
    if operated:
        out[L.AURICULA][b.slices] |= plate | tragus | concha


def _mastoid_cells(p: dict, lm: dict):
    rng = np.random.default_rng(p["mastoid"]["cell_seed"])
    mc, ms = lm["mastoid_centre"], p["mastoid"]["semi_axes"]
    lo, hi = p["mastoid"]["cell_radius"]
    cells = []
    for _ in range(p["mastoid"]["n_cells"]):
        direction = rng.normal(size=3)
        direction /= max(np.linalg.norm(direction), 1e-9)
        r = rng.uniform(0, 0.75) ** (1 / 3)
        cells.append((mc + direction * r * np.asarray(ms) * 0.8, float(rng.uniform(lo, hi))))
    return cells


# --------------------------------------------------------------------------------------------
# ROI


def expand_roi(mask: np.ndarray, geometry: Geometry, margin_mm: float) -> np.ndarray:
    """The reference ROI: the residual parotid expanded by ``margin_mm`` (exact EDT in mm, :func:`roi.expand`)."""
    from . import roi as _roi

    return np.asarray(_roi.expand(mask, geometry, margin_mm), dtype=bool)


# --------------------------------------------------------------------------------------------
# the generator


def _resolve_side(side: str, draw: float) -> str:
    if side not in SIDES:
        raise InputError(f"Side must be one of {', '.join(SIDES)}, got {side!r}.")
    if side == "random":
        return "left" if draw < 0.5 else "right"
    return side


def _noise_table(sigma: float) -> np.ndarray:
    """65536 Gaussian quantiles (inverse-CDF sampling from 16 random bits)."""
    from scipy.special import ndtri

    return (sigma * ndtri((np.arange(65536) + 0.5) / 65536)).astype(np.float32)


def generate_case(seed: int, side: str = "left", spacing=DEFAULT_SPACING, size: str = "full",
                  **anatomy_overrides) -> PhantomCase:
    """Generate one synthetic post-operative case (deterministic for a given seed and arguments).

    ``anatomy_overrides`` replace sampled parameters (see :func:`sample_params`), e.g.
    ``pose_deg=[0, 0, 0]``, ``noise_sigma=0``, ``metal=True``, ``resection={"fraction": 0.5}``.
    """
    from scipy import ndimage

    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise InputError(f"Seed must be an integer, got {seed!r}.") from None
    if seed < 0:
        raise InputError(f"Seed must be a non-negative integer, got {seed}.")
    if size not in SIZES:
        raise InputError(f"Size must be 'full' or 'small', got {size!r}.")
    spacing = _check_spacing(spacing)
    rng = np.random.default_rng(seed)
    p = sample_params(rng)
    p = _apply_overrides(p, anatomy_overrides)
    side = _resolve_side(side, p["side_draw"])
    sign = 1.0 if side == "left" else -1.0  # LPS: +x is the patient's left
    s = p["head_scale"]
    rotation = _rotation(p["pose_deg"])
    centre = np.asarray(p["position_mm"], dtype=float)
    geometry = _grid(size, spacing, rotation, centre, sign)
    lm = _landmarks(p)
    hu = p["hu"]

    # the work box: the grid block covering the whole head and neck (everything else is air)
    amax = max(float(_A_KEYS.max()) * s, lm["a0"] + 35.0) + 3.0
    bmax = float(_B_KEYS.max()) * s + 3.0
    wb = _index_box(geometry, rotation, centre, (-amax, -bmax, -1000.0), (amax, bmax, 1000.0))
    if wb is None:
        raise InputError("The phantom does not intersect the grid (internal error in the grid layout).")
    work = _Box(geometry, rotation, centre, *wb)
    u, v, w = work.coords
    body_d = _body_distance(u, v, w, s)
    ct = np.full(work.shape, AIR_HU, dtype=np.float32)
    body = body_d < 0
    _paint(ct, body, hu["soft_tissue"])
    skin_t, fat_t = p["skin_mm"], p["fat_mm"]
    _paint(ct, (body_d < -skin_t) & (body_d >= -(skin_t + fat_t)), hu["fat"])
    rind = body & (body_d >= -skin_t)
    _paint(ct, rind, hu["soft_tissue"] + hu["skin_extra"])

    # cranium: skull shell and brain above the skull base; skull-base slab at the ear level
    zb = 10.0 * s
    scalp = skin_t + 2.0
    b = work.sub((-amax, -bmax, zb - 8.0), (amax, bmax, 1000.0))
    if b is not None:
        bu, bv, bw = b.coords
        d = body_d[b.slices]
        c = ct[b.slices]
        above = bw > zb
        _paint(c, above & (d < -scalp) & (d >= -(scalp + p["skull_mm"])), hu["skull"])
        _paint(c, above & (d < -(scalp + p["skull_mm"])), hu["brain"])
        cy = np.float32(np.interp(zb, _Z_KEYS * s, _CY_KEYS * s) - 0.45 * np.interp(zb, _Z_KEYS * s, _B_KEYS * s))
        _paint(c, (bw <= zb) & (bw > zb - 6.0) & (d < -scalp) & (bv > cy) & (np.abs(bu) < lm["a0"] - 12.0),
               hu["skull"])

    # cervical spine and airway (unlabelled context)
    b = work.sub((-12.0, 22.0 * s - 11.0, -1000.0), (12.0, 22.0 * s + 11.0, -25.0 * s))
    if b is not None:
        bu, bv, bw = b.coords
        f = (bu / 11.0) ** 2 + ((bv - 22.0 * s) / 10.0) ** 2
        _paint(ct[b.slices], f <= 1, hu["cortical"])
        _paint(ct[b.slices], f <= 0.65, hu["cancellous"])
    b = work.sub((-10.0, -12.0 * s - 8.0, -150.0 * s), (10.0, -12.0 * s + 8.0, -18.0 * s))
    if b is not None:
        bu, bv, bw = b.coords
        _paint(ct[b.slices], ((bu / 9.0) ** 2 + ((bv + 12.0 * s) / 7.0) ** 2) <= 1, AIR_HU)

    # mandibular body and teeth: a U-shaped band from one angle to the other
    gon_y = lm["ramus_posterior"] - 6.0
    gon_x = lm["ramus_x"] - p["ramus"]["medial_slope"] * (lm["ramus_top"] - lm["ramus_bottom"])
    chin_y = -80.0 * s
    zbot = lm["ramus_bottom"]
    b = work.sub((-gon_x - 7.0, chin_y - 7.0, zbot - 1.0), (gon_x + 7.0, gon_y + 1.0, zbot + 37.0))
    if b is not None:
        bu, bv, bw = b.coords
        mand_d = np.abs(_ellipse_distance(bu, bv - gon_y, gon_x, gon_y - chin_y))
        c = ct[b.slices]
        mand = (mand_d <= 5.0) & (bv < gon_y) & (bw >= zbot) & (bw <= zbot + 26.0)
        _paint(c, mand, hu["cortical"])
        _paint(c, mand & (mand_d <= 3.0) & (bw >= zbot + 2.0) & (bw <= zbot + 24.0), hu["cancellous"])
        _paint(c, (mand_d <= 3.5) & (bv < gon_y - 20.0) & (bw > zbot + 26.0) & (bw <= zbot + 36.0), hu["teeth"])

    # the two ear / parotid regions (mirror anatomy); only the operated side is labelled
    cells = _mastoid_cells(p, lm)
    masks = {name: np.zeros(work.shape, dtype=bool) for name in L.STRUCTURES if name != L.SKIN}
    for sgn in (1.0, -1.0):
        _side_anatomy(ct, body_d, work, p, lm, sgn, sgn == sign, cells, masks)
        _auricle(ct, body_d, work, p, sgn, sgn == sign, masks)
    if not masks[L.PAROTID].any():
        raise InputError("The operated-side parotid lies outside the grid; use the default --size/--spacing.")
    others = np.zeros(work.shape, dtype=bool)
    for m in masks.values():
        others |= m
    masks[L.SKIN] = rind & ((u * sign) > 0) & ~others

    # dental metal: fillings on the tooth arc plus streaks in their slices
    if p["metal"]:
        md = p["metal_detail"]
        for q in range(int(md["n"])):
            sgn_m = 1.0 if q % 2 == 0 else -1.0
            ty = gon_y - 20.0 - md["positions"][q] * (gon_y - 20.0 - chin_y)
            tx = sgn_m * gon_x * math.sqrt(max(0.0, 1 - ((ty - gon_y) / (gon_y - chin_y)) ** 2))
            tc = np.array([tx, ty, zbot + 31.0])
            b = work.sub(tc - 3.5, tc + 3.5)
            if b is not None:
                bu, bv, bw = b.coords
                _paint(ct[b.slices], ((bu - tc[0]) ** 2 + (bv - tc[1]) ** 2 + (bw - tc[2]) ** 2) <= 2.5 ** 2, HU_MAX)
            wc = rotation @ tc + centre
            kc = int(round(float(geometry.lps_to_index(wc)[2])))
            nk = max(1, int(math.ceil(4.0 / geometry.spacing[2])))
            k0, k1 = max(work.lo[0], kc - nk), min(work.hi[0], kc + nk + 1)
            if k1 <= k0:
                continue
            ii = np.arange(work.lo[2], work.hi[2]) * geometry.spacing[0] + geometry.origin[0] - wc[0]
            jj = np.arange(work.lo[1], work.hi[1]) * geometry.spacing[1] + geometry.origin[1] - wc[1]
            theta = np.arctan2(jj[:, None], ii[None, :])
            rad = np.hypot(jj[:, None], ii[None, :])
            streak = (md["amplitude"] * np.cos(md["streaks"] * theta + md["phase"] + q)
                      * np.exp(-rad / 60.0) * (rad > 3.0)).astype(np.float32)
            ct[k0 - work.lo[0]:k1 - work.lo[0]] += streak[None]

    # acquisition: blur (partial volume), HU offset, noise, quantisation to int16
    sig = [p["blur_mm"] / sp for sp in geometry.spacing_zyx]
    ct = ndimage.gaussian_filter(ct, sigma=sig, mode="nearest", truncate=3.0)
    bits = rng.bit_generator.random_raw((int(np.prod(geometry.shape)) + 3) // 4)
    idx = bits.view(np.uint16)[:int(np.prod(geometry.shape))].reshape(geometry.shape)
    noise = _noise_table(float(p["noise_sigma"]))
    air = np.clip(np.rint(noise + np.float32(AIR_HU + p["hu_offset"])), HU_MIN, HU_MAX).astype(np.int16)
    ct_i16 = air[idx]
    ct += np.float32(p["hu_offset"])
    ct += noise[idx[work.slices]]
    np.rint(ct, out=ct)
    np.clip(ct, HU_MIN, HU_MAX, out=ct)
    ct_i16[work.slices] = ct
    del ct, idx, bits

    labels_full = {}
    for name in L.STRUCTURES:
        m = np.zeros(geometry.shape, dtype=bool)
        m[work.slices] = masks[name]
        labels_full[name] = m
    margin = float(p["roi_margin_mm"])
    roi = expand_roi(labels_full[L.PAROTID], geometry, margin)
    labels = {}
    for name, m in labels_full.items():
        labels[name] = np.zeros(geometry.shape, dtype=bool)
        labels[name][work.slices] = masks[name] & roi[work.slices]

    params = _jsonable(p)
    params["side"] = side
    params["size"] = size
    params["spacing"] = list(spacing)
    params["head_centre_lps"] = [float(v) for v in centre]
    params["rotation"] = [float(v) for v in rotation.ravel()]
    params["volumes_cc"] = {name: round(float(m.sum()) * geometry.voxel_volume_cc, 3)
                            for name, m in masks.items()}
    params["generator_version"] = GENERATOR_VERSION
    return PhantomCase(ct=ct_i16, geometry=geometry, labels=labels, labels_full=labels_full, roi=roi,
                       side=side, params=params, seed=seed, case_id=f"phantom-{seed}")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    if isinstance(obj, (np.integer, int)) and not isinstance(obj, bool):
        return int(obj)
    return obj


# --------------------------------------------------------------------------------------------
# writing


_STAMP_PREFIX = b"# on "
_FIXED_STAMP = b"1970-01-01 00:00:00"  # SOURCE_DATE_EPOCH=0 convention for reproducible files


def _strip_timestamp(path: Path) -> None:
    """Replace pynrrd's "# on <UTC time>(GMT)." header comment by a fixed epoch stamp, in place.

    The line keeps its length, so only those 19 bytes change; the data are untouched.
    """
    with open(path, "r+b") as fh:
        head = fh.read(512)
        start = head.find(b"\n" + _STAMP_PREFIX)
        if start < 0:
            return
        pos = start + 1 + len(_STAMP_PREFIX)
        if head[pos + 19:pos + 25] == b"(GMT)." and head[pos + 4:pos + 5] == b"-":
            fh.seek(pos)
            fh.write(_FIXED_STAMP)


def _write_ct_nrrd(path: Path, ct: np.ndarray, geometry: Geometry) -> None:
    """int16 NRRD (gzip level 1, fixed header stamp: byte-identical for identical input)."""
    import nrrd

    lin = geometry.direction_matrix @ np.diag(geometry.spacing)
    header = {
        "type": "short", "dimension": 3, "space": "left-posterior-superior",
        "space directions": lin.T,  # one row per axis (i, j, k)
        "space origin": np.asarray(geometry.origin, dtype=float),
        "kinds": ["domain", "domain", "domain"], "endian": "little", "encoding": "gzip",
    }
    nrrd.write(str(path), np.ascontiguousarray(ct, dtype="<i2"), header, index_order="C", compression_level=1)
    _strip_timestamp(path)


def _fortran_mask(mask: np.ndarray) -> np.ndarray:
    """The same mask in Fortran order (so that segio's [i, j, k] transpose is C-contiguous, which
    makes slicerio's per-segment indexing ~10x faster); only the bounding box is copied."""
    out = np.zeros(mask.shape, dtype=bool, order="F")
    if mask.any():
        idx = [np.nonzero(mask.any(axis=ax))[0] for ax in ((1, 2), (0, 2), (0, 1))]
        sl = tuple(slice(int(ix[0]), int(ix[-1]) + 1) for ix in idx)
        out[sl] = mask[sl]
    return out


def case_summary(case: PhantomCase) -> dict:
    return {
        "case_id": case.case_id, "seed": case.seed, "side": case.side,
        "spacing": list(case.geometry.spacing), "size": case.params.get("size"),
        "geometry": case.geometry.to_dict(), "roi_name": case.roi_name,
        "structures": list(L.STRUCTURES), "synthetic": True, "note": DISCLAIMER,
        "params": case.params,
    }


def write_case(case: PhantomCase, out_dir, force: bool = False) -> Path:
    """Write one case into the folder ``out_dir`` (created; never overwritten unless ``force``).

    Files: ``ct.nrrd``, ``reference.seg.nrrd`` (7 structures clipped to the ROI + the ROI),
    ``reference-full.seg.nrrd`` (unclipped) and ``case.json``. Everything is first written
    into a hidden sibling folder which then replaces ``out_dir`` in one rename.
    """
    from . import segio

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a folder. Choose another output path.")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise OutputExistsError(f"{out_dir} already exists. Choose another --out or pass --force to replace it.")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create output folder {parent} ({exc.strerror or exc}). "
                         "Choose a writable --out.") from None
    tmp = parent / f".{out_dir.name}.part-{os.getpid()}"
    old = parent / f".{out_dir.name}.old-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise InputError(f"Cannot write into {parent} ({exc.strerror or exc}). Choose a writable --out.") from None
    try:
        _write_ct_nrrd(tmp / "ct.nrrd", case.ct, case.geometry)
        roi = _fortran_mask(case.roi)
        header = {"ParotidOAR_Source": "synthetic phantom", "ParotidOAR_Seed": str(case.seed)}
        for filename, source in (("reference.seg.nrrd", case.labels), ("reference-full.seg.nrrd", case.labels_full)):
            masks = {name: _fortran_mask(source[name]) for name in L.STRUCTURES}
            masks[case.roi_name] = roi
            segio.write_seg(tmp / filename, masks, case.geometry, side=case.side, extra_header=header)
            _strip_timestamp(tmp / filename)
        (tmp / "case.json").write_text(json.dumps(case_summary(case), indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a run with ``--seed seed``: ``seed * 1000 + index``."""
    return int(seed) * MAX_CASES_PER_SEED + int(index)


def case_id(seed: int, index: int) -> str:
    return f"phantom-s{int(seed)}-{int(index):03d}"


def generate(out_dir, cases: int = 1, seed: int = 0, side: str = "random", spacing=DEFAULT_SPACING,
             size: str = "full", force: bool = False, progress=None, **anatomy_overrides) -> list[Path]:
    """Generate ``cases`` cases into ``out_dir/<case-id>/`` (see :func:`case_id`, :func:`case_seed`).

    All arguments are checked and every target folder is checked for existence before
    anything is written, so a refused run leaves nothing behind.
    """
    try:
        cases, seed = int(cases), int(seed)
    except (TypeError, ValueError):
        raise InputError("--cases and --seed must be integers.") from None
    if cases < 1:
        raise InputError(f"--cases must be at least 1, got {cases}.")
    if cases > MAX_CASES_PER_SEED:
        raise InputError(f"--cases must be at most {MAX_CASES_PER_SEED} per seed; use several seeds.")
    if seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed}.")
    if side not in SIDES:
        raise InputError(f"--side must be one of {', '.join(SIDES)}, got {side!r}.")
    if size not in SIZES:
        raise InputError(f"--size must be 'full' or 'small', got {size!r}.")
    spacing = _check_spacing(spacing)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a folder. Choose a folder path.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create --out folder {out_dir} ({exc.strerror or exc}). "
                         "Choose a writable location.") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"--out folder {out_dir} is not writable. Choose a writable location.")
    targets = [out_dir / case_id(seed, i) for i in range(cases)]
    existing = [t for t in targets if t.exists() and (not t.is_dir() or any(t.iterdir()))]
    if existing and not force:
        names = ", ".join(t.name for t in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise OutputExistsError(f"{len(existing)} case folder(s) already exist in {out_dir} ({names}). "
                                "Nothing was written. Pass --force to replace them or choose another --out.")
    written = []
    for i, target in enumerate(targets):
        case = generate_case(case_seed(seed, i), side=side, spacing=spacing, size=size, **anatomy_overrides)
        case.case_id = target.name
        written.append(write_case(case, target, force=force))
        if progress is not None:
            progress(i + 1, cases, target)
    return written
