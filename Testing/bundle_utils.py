"""Test helpers: tiny random-weight model bundles and small synthetic CTs.

``make_tiny_bundle(directory, ...)`` writes a valid bundle (manifest + stage1/stage2
state dicts) with 3-stage, 4-feature U-Nets: fast on CPU, random predictions.
``stage1_bias`` shifts the stage-1 final head (positive → more parotid,
strongly negative → an empty parotid, for the error path).

``synthetic_ct(...)`` builds a head-like CT (air, skin/soft tissue ellipse,
bone ring, a fat layer) with any spacing/direction and the body centred off the
image centre when asked — used when the phantom is not wanted or not available.
Research/test use only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ParotidOARLib import bundle, labels
from ParotidOARLib.imageio import Geometry
from ParotidOARLib.network import UNetConfig, build

TINY_NORM = {"clip": [-200.0, 400.0], "mean": 40.0, "std": 150.0}


def tiny_config(num_classes: int) -> UNetConfig:
    return UNetConfig(in_channels=1, num_classes=num_classes, base_features=4, max_features=16,
                      strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], deep_supervision=True)


def make_tiny_bundle(directory, *, seed: int = 0, stage1_bias: float | None = 0.0, name: str = "tiny-test",
                     clinical_use: bool = False, stage1_spacing=(4.0, 4.0, 4.0), stage2_spacing=(3.0, 3.0, 3.0),
                     stage1_patch=(32, 64, 32), stage2_patch=(48, 64, 64), force: bool = False,
                     half: bool = True) -> Path:
    """Write a random-weight bundle to ``directory`` and return its path.

    ``stage1_bias``: added to the parotid logit minus the background logit of the
    stage-1 head (``-50`` → no parotid anywhere, ``+50`` → parotid everywhere).
    """
    import torch

    torch.manual_seed(seed)
    c1, c2 = tiny_config(2), tiny_config(len(labels.OARS) + 1)
    n1, n2 = build(c1), build(c2)
    if stage1_bias:
        with torch.no_grad():
            head = n1.heads[-1]
            if abs(stage1_bias) >= 20:
                head.weight.zero_()
            head.bias[0] -= stage1_bias / 2
            head.bias[1] += stage1_bias / 2
    stages = {
        "stage1": bundle.stage_spec(["background", labels.PAROTID], stage1_spacing, TINY_NORM, stage1_patch, c1),
        "stage2": bundle.stage_spec(["background", *labels.OARS], stage2_spacing, TINY_NORM, stage2_patch, c2),
    }
    manifest = bundle.Manifest(
        name=name, version="0.0.1", clinical_use=clinical_use,
        description="Tiny random-weight test bundle (not a model).", license="Apache-2.0",
        data={"description": "none (random weights)", "sources": []}, stages=stages,
        training={"note": "random initialisation, seed %d" % seed}, roi_margin_mm=17.0, created="2026-01-01")
    return bundle.save_bundle(directory, manifest, {"stage1": n1.state_dict(), "stage2": n2.state_dict()},
                              half=half, force=force)


def rotation_direction(deg_z: float = 20.0, deg_x: float = 0.0, flip_k: bool = False) -> tuple:
    """An orthonormal direction matrix (row-major) — rotations about z then x, optional k flip."""
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    d = rz @ rx
    if flip_k:
        d = d @ np.diag([1, 1, -1])
    return tuple(d.ravel())


def synthetic_ct(size=(80, 80, 30), spacing=(3.0, 3.0, 4.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
                 body_centre_lps=(0.0, 0.0, 0.0), semi_axes_mm=(75.0, 95.0), seed: int = 0,
                 origin=None) -> tuple[np.ndarray, Geometry]:
    """A head-like int16 CT on a grid centred at LPS (0, 0, 0) (or at ``origin``).

    The body is an elliptic cylinder (semi-axes x, y in mm) around
    ``body_centre_lps``: 40 HU tissue, a 6 mm fat layer (−100 HU), a 7 mm bone
    ring (900 HU) inside, air (−1000 HU) outside, mild noise.
    """
    size = tuple(int(v) for v in size)
    sp = np.asarray(spacing, float)
    d = np.asarray(direction, float).reshape(3, 3)
    if origin is None:
        centre_idx = (np.asarray(size) - 1) / 2.0
        origin = -(d @ (sp * centre_idx))
    geom = Geometry(size, tuple(sp), tuple(origin), tuple(d.ravel()))
    nk, nj, ni = geom.shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3)
    lps = geom.index_to_lps(ijk).reshape(nk, nj, ni, 3)
    x = lps[..., 0] - body_centre_lps[0]
    y = lps[..., 1] - body_centre_lps[1]
    ax, ay = semi_axes_mm
    r = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)  # 1 at the skin
    rmm = (1 - r) * min(ax, ay)  # ~ depth below the skin in mm
    ct = np.full(geom.shape, -1000.0)
    body = r <= 1
    ct[body] = 40.0
    ct[body & (rmm < 6)] = -100.0
    ct[body & (rmm < 1.5)] = 20.0
    ring = body & (rmm > 25) & (rmm < 32)
    ct[ring] = 900.0
    rng = np.random.default_rng(seed)
    ct += rng.normal(0, 10, ct.shape)
    return np.clip(np.rint(ct), -1024, 3071).astype(np.int16), geom
