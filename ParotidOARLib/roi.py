"""The brachytherapy region of interest: the parotid expanded by a physical margin.

The ROI is every voxel whose centre lies within ``margin_mm`` (default 17 mm,
the I-125 seed penetration depth) of a parotid voxel centre, measured in
physical millimetres — exact under anisotropic spacing.

It is computed with an exact Euclidean distance transform
(:func:`scipy.ndimage.distance_transform_edt` with ``sampling`` = spacing) on
the parotid's bounding box padded by the margin, never on the whole volume.
This gives *identical* voxels to the whole-volume EDT (every mask voxel lies in
the box, and any voxel outside the padded box is more than ``margin_mm`` away
along one axis alone), in ~0.1 s instead of 5–10 s on a 512×512×156 CT.
SimpleITK's ball dilation is not used: its structuring element is approximate
and over-expands by about 6 % in volume.

The direction matrix is orthonormal for CT (ITK enforces it in practice), so
index-space distances scaled by the spacing are physical distances for any
orientation.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import EmptyStructureError
from .imageio import Geometry
from .labels import ROI_MARGIN_MM_DEFAULT


def bounding_box(mask: np.ndarray, pad_vox=0) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(lo_zyx, hi_zyx)`` (hi exclusive) of the non-zero voxels, padded by ``pad_vox``
    (an int or one int per axis, numpy order) and clipped to the array.

    Raises :class:`EmptyStructureError` for an empty mask.
    """
    mask = np.asarray(mask)
    lo, hi = [], []
    pads = np.broadcast_to(np.asarray(pad_vox, dtype=int), (mask.ndim,))
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        if hit.size == 0:
            raise EmptyStructureError("The mask is empty: no bounding box.")
        lo.append(max(0, int(hit[0]) - int(pads[axis])))
        hi.append(min(mask.shape[axis], int(hit[-1]) + 1 + int(pads[axis])))
    return tuple(lo), tuple(hi)


def margin_voxels(geometry: Geometry, margin_mm: float) -> tuple[int, int, int]:
    """Voxels (numpy order) that cover ``margin_mm`` along each axis."""
    return tuple(int(math.floor(margin_mm / s)) + 1 for s in geometry.spacing_zyx)


def expand(mask: np.ndarray, geometry: Geometry, margin_mm: float = ROI_MARGIN_MM_DEFAULT) -> np.ndarray:
    """Bool mask of voxels within ``margin_mm`` (physical mm) of ``mask``, on the same grid.

    Equal, voxel for voxel, to
    ``distance_transform_edt(~mask, sampling=geometry.spacing_zyx) <= margin_mm``
    on the whole grid, but computed on the padded bounding box only.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(geometry.shape):
        raise ValueError(f"mask shape {mask.shape} does not match geometry {geometry.shape}")
    if margin_mm < 0:
        raise ValueError("margin_mm must be >= 0")
    lo, hi = bounding_box(mask, margin_voxels(geometry, margin_mm))
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = mask[sl]
    out = np.zeros(mask.shape, dtype=bool)
    if margin_mm == 0:
        out[sl] = sub
        return out
    dist = ndimage.distance_transform_edt(~sub, sampling=geometry.spacing_zyx)
    out[sl] = dist <= margin_mm
    return out


def volume_cc(mask: np.ndarray, geometry: Geometry) -> float:
    return float(np.count_nonzero(mask)) * geometry.voxel_volume_cc
