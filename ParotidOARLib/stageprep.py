"""Training-side preprocessing: turn a labelled case into stage-1 / stage-2 arrays.

It mirrors the cascade's inference preprocessing (side crop at the body midline,
resampling to the stage spacing, the stage-2 crop around the ROI) so that the
networks see at training time what they see at inference time. Where
:mod:`ParotidOARLib.preprocess` provides a function it is used; the small
fallbacks here only keep training usable on its own.

Grids: everything is resampled onto an **axis-aligned LPS grid** (identity
direction) at the stage spacing, so a scan stored inferior-first (OpenKBP,
direction diag(1, 1, -1)) and one stored superior-first look the same to the network.
"""

from __future__ import annotations

import numpy as np

from .imageio import Geometry

AIR_HU = -1000


def canonical_grid(geometry: Geometry, spacing_xyz, lo_lps=None, hi_lps=None) -> Geometry:
    """Axis-aligned (identity direction) grid at ``spacing_xyz`` covering ``geometry`` (or a box)."""
    if lo_lps is None or hi_lps is None:
        ni, nj, nk = geometry.size
        corners = np.array([[i, j, k] for i in (-0.5, ni - 0.5) for j in (-0.5, nj - 0.5) for k in (-0.5, nk - 0.5)])
        lps = geometry.index_to_lps(corners)
        lo_lps, hi_lps = lps.min(0), lps.max(0)
    sp = np.asarray(spacing_xyz, float)
    size = np.maximum(1, np.round((np.asarray(hi_lps) - np.asarray(lo_lps)) / sp).astype(int))
    origin = np.asarray(lo_lps) + sp / 2
    return Geometry(tuple(int(s) for s in size), tuple(sp), tuple(origin), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def resample_to(array, geometry: Geometry, target: Geometry, interpolator="linear", default=0.0):
    import SimpleITK as sitk

    from .imageio import to_sitk

    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolator]
    src = to_sitk(np.asarray(array), geometry)
    if interpolator == "linear" and src.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        src = sitk.Cast(src, sitk.sitkFloat32)
    ref = sitk.Image(target.size, sitk.sitkUInt8)
    target.apply_to_sitk(ref)
    out = sitk.Resample(src, ref, sitk.Transform(), interp, float(default))
    return sitk.GetArrayFromImage(out)


def resample_mask(mask, geometry: Geometry, target: Geometry):
    """Bool mask → target grid (linear interpolation of the mask, threshold 0.5)."""
    return resample_to(mask.astype(np.float32), geometry, target, "linear", 0.0) >= 0.5


def body_midline_x(ct, geometry: Geometry, body=None) -> float:
    """LPS x of the body midline — :func:`preprocess.body_midline_x`, as the cascade cuts."""
    from . import preprocess

    if body is not None and not body.any():
        body = None
    return preprocess.body_midline_x(ct, geometry, body)


def side_cropped_grid(ct, geometry: Geometry, side: str, spacing_xyz, body=None) -> Geometry:
    """Canonical grid at ``spacing_xyz`` over the requested side (x ≥ midline for left)."""
    full = canonical_grid(geometry, spacing_xyz)
    mid = body_midline_x(ct, geometry, body)
    lo = np.asarray(full.origin) - np.asarray(full.spacing) / 2
    hi = lo + np.asarray(full.size) * np.asarray(full.spacing)
    lo, hi = lo.copy(), hi.copy()
    if side == "left":
        lo[0] = mid
    else:
        hi[0] = mid
    return canonical_grid(geometry, spacing_xyz, lo, hi)


def stage1_arrays(ct, geometry: Geometry, masks: dict, side: str, spacing_xyz, body=None):
    """Side crop + resample: → (ct int16, {name: bool}, Geometry) on the stage-1 grid."""
    g = side_cropped_grid(ct, geometry, side, spacing_xyz, body)
    ct_r = resample_to(ct.astype(np.float32), geometry, g, "linear", AIR_HU)
    out = {n: resample_mask(m, geometry, g) for n, m in masks.items()}
    return np.round(ct_r).astype(np.int16), out, g


def roi_box_lps(roi_mask, geometry: Geometry):
    """LPS min/max corners of a mask's voxels (half a voxel outside the centres)."""
    idx = np.argwhere(roi_mask)
    lo, hi = idx.min(0), idx.max(0)
    corners = np.array([[i, j, k] for i in (lo[2] - 0.5, hi[2] + 0.5) for j in (lo[1] - 0.5, hi[1] + 0.5)
                        for k in (lo[0] - 0.5, hi[0] + 0.5)])
    lps = geometry.index_to_lps(corners)
    return lps.min(0), lps.max(0)


def expand_roi(parotid, geometry: Geometry, margin_mm: float = 17.0):
    try:
        from . import roi

        return roi.expand(parotid, geometry, margin_mm)
    except ImportError:
        from scipy import ndimage

        idx = np.argwhere(parotid)
        pad = np.ceil(margin_mm / np.asarray(geometry.spacing_zyx)).astype(int) + 1
        lo = np.maximum(idx.min(0) - pad, 0)
        hi = np.minimum(idx.max(0) + pad + 1, parotid.shape)
        sub = parotid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d = ndimage.distance_transform_edt(~sub, sampling=geometry.spacing_zyx)
        out = np.zeros_like(parotid, bool)
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = d <= margin_mm
        return out


def stage2_arrays(ct, geometry: Geometry, masks: dict, spacing_xyz, roi_mask, jitter_mm=0.0,
                  rng=None, context_mm=8.0):
    """ROI crop (ROI bbox, optionally jittered, plus ``context_mm``) on the stage-2 grid.

    → (ct int16, {name: bool}, roi bool, Geometry). ``roi`` is the ROI resampled onto the crop.
    """
    lo, hi = roi_box_lps(roi_mask, geometry)
    if jitter_mm and rng is not None:
        lo = lo + rng.uniform(-jitter_mm, jitter_mm, 3)
        hi = hi + rng.uniform(-jitter_mm, jitter_mm, 3)
    lo, hi = lo - context_mm, hi + context_mm
    g = canonical_grid(geometry, spacing_xyz, lo, hi)
    ct_r = resample_to(ct.astype(np.float32), geometry, g, "linear", AIR_HU)
    out = {n: resample_mask(m, geometry, g) for n, m in masks.items()}
    roi_r = resample_mask(roi_mask, geometry, g)
    return np.round(ct_r).astype(np.int16), out, roi_r, g
