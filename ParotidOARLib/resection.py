"""Simulated parotidectomy on real CT: a stage-1 training augmentation.

ParotidOAR segments the *residual* parotid after surgery, but the public training CTs (OpenKBP)
hold intact glands. This module turns an intact gland into a plausible post-operative one, on the
fly, in a training sample:

1. a random cut plane removes a cap of the gland (15-50 % of its voxels by default). The cap's
   direction is random but never upward (the upper pole next to the ear canal is usually kept)
   and, half of the time, biased lateral: a superficial parotidectomy takes the lobe lateral to
   the facial nerve;
2. the removed region collapses into soft tissue (60 %) or fat, and the part next to the cut is
   filled with seroma (5-15 HU) or fibrosis (15-25 HU) — the post-operative appearances the
   phantom also models (``phantom.py``) and the brachytherapy literature describes;
3. the new intensities keep the scan's own texture (the original minus its local mean) and are
   blended over about one voxel, so the network cannot find the edit by its noise or its edge;
4. the label keeps only the residual gland.

Everything works on the prepared (normalised) arrays of one item; ``to_norm`` maps HU to them.
"""
from __future__ import annotations

import numpy as np

#: defaults, as in the phantom's post-operative model
FRACTION = (0.15, 0.5)
FILL_FRACTION = (0.3, 0.9)
SOFT_TISSUE_HU = 40.0
FAT_HU = -100.0
SEROMA_HU = (5.0, 15.0)
FIBROSIS_HU = (15.0, 25.0)


def _direction_in_array(v_lps, direction_matrix) -> np.ndarray:
    """An LPS direction → (z, y, x) array components (orthonormal direction matrix)."""
    ijk = np.asarray(direction_matrix, float).T @ np.asarray(v_lps, float)
    return ijk[::-1]


def draw_normal(rng: np.random.Generator, side: str, direction_matrix=np.eye(3)) -> np.ndarray:
    """The cap's direction in (z, y, x) array components: random, never upward, lateral half the time."""
    n = rng.normal(size=3)  # LPS
    lateral = 1.0 if side == "left" else -1.0  # +x is the patient's left in LPS
    if rng.random() < 0.5:
        n[0] = abs(n[0]) * lateral + 0.5 * lateral
    if n[2] > 0.2 * np.linalg.norm(n):  # superior: flip so the upper pole stays
        n[2] = -n[2]
    n /= max(np.linalg.norm(n), 1e-9)
    return _direction_in_array(n, direction_matrix)


def simulate(image: np.ndarray, label: np.ndarray, spacing_zyx, rng: np.random.Generator, to_norm,
             side: str = "left", direction_matrix=np.eye(3), fraction=FRACTION):
    """Resect part of ``label``'s gland in ``image`` → (new image float32, new label uint8, info).

    ``image`` is the normalised CT (z, y, x), ``label`` the binary gland, ``to_norm(hu)`` maps HU to
    the image's units. The inputs are not modified. With no gland, the inputs come back unchanged."""
    from scipy import ndimage

    gland = label > 0
    img = np.asarray(image, dtype=np.float32)
    if gland.sum() < 8:
        return img.copy(), label.astype(np.uint8), {"resected": 0.0}
    idx = np.argwhere(gland)
    lo = np.maximum(idx.min(0) - 3, 0)
    hi = np.minimum(idx.max(0) + 4, gland.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    g = gland[sl]
    sp = np.asarray(spacing_zyx, float)
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(g.shape, sp)], indexing="ij")
    nrm = draw_normal(rng, side, direction_matrix)
    proj = zz * nrm[0] + yy * nrm[1] + xx * nrm[2]
    vals = proj[g]
    frac = float(rng.uniform(*fraction))
    cut = float(np.quantile(vals, 1.0 - frac))
    removed = g & (proj > cut)
    if not removed.any() or removed.sum() == g.sum():
        return img.copy(), label.astype(np.uint8), {"resected": 0.0}
    span = max(float(vals.max()) - cut, 1e-3)
    fill = removed & (proj <= cut + rng.uniform(*FILL_FRACTION) * span)
    target = np.full(g.shape, to_norm(SOFT_TISSUE_HU if rng.random() < 0.6 else FAT_HU), np.float32)
    fill_hu = rng.uniform(*SEROMA_HU) if rng.random() < 0.5 else rng.uniform(*FIBROSIS_HU)
    target[fill] = to_norm(fill_hu)
    sub = img[sl]
    texture = sub - ndimage.gaussian_filter(sub, 1.0)  # keep the scan's own noise
    weight = np.clip(ndimage.gaussian_filter(removed.astype(np.float32), 0.7) * 1.5, 0.0, 1.0)
    weight[weight < 0.05] = 0.0  # a local blend: nothing moves beyond ~2 voxels of the cap
    weight[removed] = 1.0
    out = img.copy()
    out[sl] = sub * (1.0 - weight) + (target + texture) * weight
    lab = label.astype(np.uint8).copy()
    lab_sub = lab[sl]
    lab_sub[removed] = 0
    return out, lab, {"resected": float(removed.sum() / g.sum()), "normal_zyx": nrm.tolist()}
