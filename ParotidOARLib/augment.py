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

Two presets: the defaults (the project's first recipe: spatial p 0.8, elastic p 0.3) and
:meth:`AugmentParams.nnunet` — nnU-Net v2's probabilities (``nnUNetTrainer.get_training_transforms``):
rotation p 0.2 and scaling p 0.2 (0.7–1.4) drawn independently, no elastic deformation, Gaussian
noise p 0.1, Gaussian blur p 0.2, brightness p 0.15, contrast p 0.15, low-resolution simulation
p 0.25 (zoom 0.5–1), gamma p 0.1 on the inverted image and p 0.3 on the image, left-right mirroring.
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
    # nnU-Net-style transforms (off in the first recipe). When ``p_rotation`` / ``p_scaling`` are
    # set, rotation and scaling are drawn independently with them and ``p_spatial`` is unused.
    p_rotation: float | None = None
    p_scaling: float | None = None
    p_blur: float = 0.0
    blur_sigma: tuple = (0.5, 1.0)  # voxels
    p_brightness: float = 0.0
    brightness: tuple = (0.75, 1.25)
    p_contrast: float = 0.0
    contrast: tuple = (0.75, 1.25)
    p_lowres: float = 0.0
    lowres_zoom: tuple = (0.5, 1.0)
    p_gamma: float = 0.0
    p_gamma_inverted: float = 0.0
    gamma: tuple = (0.7, 1.5)

    @classmethod
    def none(cls):
        return cls(p_spatial=0, p_elastic=0, p_mirror=0, p_intensity=0, p_noise=0)

    @classmethod
    def nnunet(cls, **overrides):
        """nnU-Net v2's default augmentation probabilities (see the module docstring)."""
        base = dict(p_spatial=0.0, p_rotation=0.2, p_scaling=0.2, scale=(0.7, 1.4), p_elastic=0.0,
                    p_intensity=0.0, p_noise=0.1, noise_sd=0.1 ** 0.5, p_blur=0.2, p_brightness=0.15,
                    p_contrast=0.15, p_lowres=0.25, p_gamma=0.3, p_gamma_inverted=0.1)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def preset(cls, name: str, **overrides):
        if name == "nnunet":
            return cls.nnunet(**overrides)
        if name in ("legacy", "default"):
            return cls(**overrides)
        raise ValueError(f"unknown augmentation preset {name!r} (nnunet or legacy)")


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
    if params.p_rotation is None and params.p_scaling is None:  # first recipe: both together
        rotate = scale = rng.random() < params.p_spatial
    else:
        rotate = rng.random() < (params.p_rotation or 0.0)
        scale = rng.random() < (params.p_scaling or 0.0)
    if rotate or scale:
        m = np.eye(3)
        if rotate:
            ang = np.deg2rad([rng.uniform(-params.rot_xy_deg, params.rot_xy_deg),
                              rng.uniform(-params.rot_xy_deg, params.rot_xy_deg),
                              rng.uniform(-params.rot_z_deg, params.rot_z_deg)])
            m = _rotation(*ang)
        if scale:
            m = m * rng.uniform(*params.scale)
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
    img = _nnunet_intensity(img, rng, params)
    return img, lab, ext


def _gaussian_blur(img: torch.Tensor, sigmas) -> torch.Tensor:
    """Separable Gaussian blur of a (1, z, y, x) image; ``sigmas`` in voxels per axis (z, y, x)."""
    out = img[None]
    for axis, sd in enumerate(sigmas):
        if sd <= 0:
            continue
        r = max(1, int(math.ceil(3 * sd)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sd) ** 2)
        k = (k / k.sum()).view(1, 1, *[-1 if a == axis else 1 for a in range(3)])
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k)
    return out[0]


def _gamma(img: torch.Tensor, g: float, invert: bool) -> torch.Tensor:
    """nnU-Net's gamma transform with retained mean and SD (optionally on the inverted image)."""
    x = -img if invert else img
    mean, sd = x.mean(), x.std()
    lo, hi = x.min(), x.max()
    rng_ = (hi - lo).clamp(min=1e-7)
    x = ((x - lo) / rng_) ** g * rng_ + lo
    x = (x - x.mean()) / x.std().clamp(min=1e-7) * sd + mean
    return -x if invert else x


def _nnunet_intensity(img: torch.Tensor, rng: np.random.Generator, p: AugmentParams) -> torch.Tensor:
    """Blur, brightness, contrast, low-resolution simulation and gamma, in nnU-Net's order."""
    if p.p_blur and rng.random() < p.p_blur:
        img = _gaussian_blur(img, [rng.uniform(*p.blur_sigma) if rng.random() < 0.5 else 0.0 for _ in range(3)])
    if p.p_brightness and rng.random() < p.p_brightness:
        img = img * rng.uniform(*p.brightness)
    if p.p_contrast and rng.random() < p.p_contrast:
        mean, lo, hi = img.mean(), img.min(), img.max()
        img = ((img - mean) * rng.uniform(*p.contrast) + mean).clamp(lo, hi)
    if p.p_lowres and rng.random() < p.p_lowres:
        shape = img.shape[1:]
        zoom = rng.uniform(*p.lowres_zoom)
        small = [max(1, int(round(s * zoom))) for s in shape]
        low = F.interpolate(img[None], size=small, mode="nearest")
        img = F.interpolate(low, size=tuple(shape), mode="trilinear", align_corners=False)[0]
    if p.p_gamma_inverted and rng.random() < p.p_gamma_inverted:
        img = _gamma(img, _draw_gamma(rng, p.gamma), invert=True)
    if p.p_gamma and rng.random() < p.p_gamma:
        img = _gamma(img, _draw_gamma(rng, p.gamma), invert=False)
    return img


def _draw_gamma(rng: np.random.Generator, gamma_range) -> float:
    """nnU-Net: half of the draws below 1, half above (so < 1 is as likely as > 1)."""
    lo, hi = gamma_range
    return rng.uniform(lo, 1.0) if (rng.random() < 0.5 and lo < 1) else rng.uniform(max(lo, 1.0), hi)
