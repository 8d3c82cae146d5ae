"""Patch extraction with data augmentation, in torch, fast on CPU.

One ``grid_sample`` call per patch applies, together:

* rotation (mostly about the cranio-caudal axis) and isotropic scaling, in mm so that
  anisotropic spacing is handled;
* elastic deformation from a coarse random displacement field (4×4×4 control points,
  trilinearly upsampled — cheap);
* the crop itself (the patch centre is chosen by the caller: foreground oversampling).

Mirroring: only left-right (x), and only because every training input is **side-cropped**
and its labels carry no side (``Parotid``, ``Mastoid process`` …): mirroring a right-side
crop makes an anatomically valid left-side crop (the side is swapped together with the
image). Up-down or front-back flips would not be anatomy, so they are never applied.

Intensity (on the normalised image): multiplicative scale, additive shift, Gaussian noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AugmentParams:
    p_spatial: float = 0.8
    rot_z_deg: float = 15.0  # about the cranio-caudal axis
    rot_xy_deg: float = 7.0
    scale: tuple = (0.85, 1.15)
    p_elastic: float = 0.3
    elastic_mm: float = 4.0
    p_mirror: float = 0.5  # left-right mirror of a side crop (side swapped with it)
    p_intensity: float = 0.8
    int_scale: tuple = (0.9, 1.1)
    int_shift: float = 0.1
    p_noise: float = 0.15
    noise_sd: float = 0.1

    @classmethod
    def none(cls):
        return cls(p_spatial=0, p_elastic=0, p_mirror=0, p_intensity=0, p_noise=0)


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx  # acts on (x, y, z) vectors


def sample_patch(image: torch.Tensor, label: torch.Tensor | None, center_zyx, patch_zyx, spacing_zyx,
                 rng: np.random.Generator, params: AugmentParams | None = None, pad_value: float = 0.0,
                 extra: torch.Tensor | None = None):
    """Extract an augmented patch.

    image: (Z, Y, X) float tensor (already normalised); label: (Z, Y, X) integer tensor.
    extra: optional (C, Z, Y, X) float tensor sampled like the image (e.g. an ROI mask).
    Returns (image (1, z, y, x), label (z, y, x) long or None, extra or None).
    """
    params = params or AugmentParams.none()
    pz, py, px = patch_zyx
    sp = np.asarray(spacing_zyx, float)
    # patch voxel offsets from the centre, in mm, (z, y, x) → handle as (x, y, z) for rotation
    gz, gy, gx = np.meshgrid(np.arange(pz) - (pz - 1) / 2, np.arange(py) - (py - 1) / 2,
                             np.arange(px) - (px - 1) / 2, indexing="ij")
    off_mm = np.stack([gx * sp[2], gy * sp[1], gz * sp[0]], -1)  # (z,y,x,3) in x,y,z order
    spatial = rng.random() < params.p_spatial
    if spatial:
        ang = np.deg2rad([rng.uniform(-params.rot_xy_deg, params.rot_xy_deg),
                          rng.uniform(-params.rot_xy_deg, params.rot_xy_deg),
                          rng.uniform(-params.rot_z_deg, params.rot_z_deg)])
        m = _rotation(*ang) * rng.uniform(*params.scale)
        off_mm = off_mm @ m.T
    if rng.random() < params.p_elastic:
        coarse = torch.from_numpy(rng.normal(0, params.elastic_mm, (1, 3, 4, 4, 4)).astype(np.float32))
        disp = F.interpolate(coarse, size=(pz, py, px), mode="trilinear", align_corners=True)[0]
        off_mm = off_mm + disp.permute(1, 2, 3, 0).numpy()
    # → source voxel coordinates (x, y, z)
    c = np.asarray(center_zyx, float)
    src = np.empty_like(off_mm)
    src[..., 0] = c[2] + off_mm[..., 0] / sp[2]
    src[..., 1] = c[1] + off_mm[..., 1] / sp[1]
    src[..., 2] = c[0] + off_mm[..., 2] / sp[0]
    # read only the sub-volume the patch needs (fast; the volume may be stored as float16 / uint8)
    Z, Y, X = image.shape
    lo = np.floor(src.reshape(-1, 3).min(0)).astype(int) - 1  # x, y, z
    hi = np.ceil(src.reshape(-1, 3).max(0)).astype(int) + 2
    lo = np.clip(lo, 0, [X - 1, Y - 1, Z - 1])
    hi = np.clip(hi, lo + 1, [X, Y, Z])
    image = image[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    if label is not None:
        label = label[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    if extra is not None:
        extra = extra[:, lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    src = src - lo
    Z, Y, X = image.shape
    norm = np.empty_like(src)
    norm[..., 0] = 2 * src[..., 0] / max(X - 1, 1) - 1
    norm[..., 1] = 2 * src[..., 1] / max(Y - 1, 1) - 1
    norm[..., 2] = 2 * src[..., 2] / max(Z - 1, 1) - 1
    grid = torch.from_numpy(norm.astype(np.float32))[None]
    mirror = rng.random() < params.p_mirror
    if mirror:
        grid = torch.flip(grid, dims=[3])  # flip the patch's x axis
    img = F.grid_sample((image.float() - pad_value)[None, None], grid, mode="bilinear", padding_mode="zeros",
                        align_corners=True)[0] + pad_value
    lab = None
    if label is not None:
        lab = F.grid_sample(label[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                            align_corners=True)[0, 0].round().long()
    ext = None
    if extra is not None:
        ext = F.grid_sample(extra[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    if rng.random() < params.p_intensity:
        img = img * rng.uniform(*params.int_scale) + rng.uniform(-params.int_shift, params.int_shift)
    if rng.random() < params.p_noise:
        img = img + torch.randn_like(img) * rng.uniform(0, params.noise_sd)
    return img, lab, ext
