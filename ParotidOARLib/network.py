"""A small, readable 3D U-Net following nnU-Net's design (Isensee et al. 2021).

* Each stage: two ``conv3×3×3 → InstanceNorm → LeakyReLU`` blocks; the first
  conv of stages 2… is strided (downsampling by strided convolution, no pooling).
* Decoder: transposed convolution up, concatenate the skip, two conv blocks.
* Features start at ``base_features`` and double per stage up to ``max_features``
  (the paper: 32 → 320).
* Deep supervision: a 1×1×1 head per decoder level. In training ``forward``
  returns the list of logits from full resolution down; in eval mode (or with
  ``deep_supervision=False``) only the full-resolution logits.

The whole architecture is described by :class:`UNetConfig`, which is stored in
the model bundle's manifest, so weights always load into the right network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class UNetConfig:
    in_channels: int = 1
    num_classes: int = 2  # including background
    base_features: int = 32
    max_features: int = 320
    #: one (z, y, x) stride per stage; the first is normally (1, 1, 1)
    strides: list = field(default_factory=lambda: [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]])
    #: kernel size per stage; (1, 3, 3) is useful for very anisotropic first stages
    kernels: list | None = None
    deep_supervision: bool = True
    negative_slope: float = 0.01

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def features(self) -> list[int]:
        return [min(self.base_features * 2 ** i, self.max_features) for i in range(len(self.strides))]

    @property
    def divisor(self) -> tuple[int, int, int]:
        """Patch sizes must be multiples of this, per (z, y, x) axis."""
        d = [1, 1, 1]
        for s in self.strides:
            d = [a * b for a, b in zip(d, s)]
        return tuple(d)


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel, stride, slope: float):
        pad = [k // 2 for k in kernel]
        super().__init__(
            nn.Conv3d(cin, cout, kernel, stride=stride, padding=pad, bias=True),
            nn.InstanceNorm3d(cout, eps=1e-5, affine=True),
            nn.LeakyReLU(slope, inplace=True),
        )


class Stage(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel, stride, slope: float):
        super().__init__(ConvBlock(cin, cout, kernel, stride, slope), ConvBlock(cout, cout, kernel, 1, slope))


class UNet3D(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        feats = config.features
        kernels = config.kernels or [[3, 3, 3]] * len(config.strides)
        slope = config.negative_slope
        self.encoder = nn.ModuleList()
        cin = config.in_channels
        for f, s, k in zip(feats, config.strides, kernels):
            self.encoder.append(Stage(cin, f, k, s, slope))
            cin = f
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for level in range(len(feats) - 1, 0, -1):  # from the bottleneck up
            s = config.strides[level]
            self.up.append(nn.ConvTranspose3d(feats[level], feats[level - 1], s, stride=s, bias=False))
            self.decoder.append(Stage(2 * feats[level - 1], feats[level - 1], kernels[level - 1], 1, slope))
            self.heads.append(nn.Conv3d(feats[level - 1], config.num_classes, 1))

    def forward(self, x: torch.Tensor):
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        outputs = []
        for up, dec, head in zip(self.up, self.decoder, self.heads):
            x = up(x)
            x = dec(torch.cat([x, skips.pop()], dim=1))
            outputs.append(head(x))
        if self.training and self.config.deep_supervision:
            return outputs[::-1]  # full resolution first
        return outputs[-1]


def build(config: UNetConfig | dict) -> UNet3D:
    if isinstance(config, dict):
        config = UNetConfig.from_dict(config)
    return UNet3D(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
