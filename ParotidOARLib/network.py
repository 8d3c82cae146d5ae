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

The optional fields (all defaulting to the trainer's own network, so its state-dict
keys never change) let the same class run networks trained by nnU-Net v2
(``PlainConvUNet``, imported by :mod:`ParotidOARLib.nnunet`): explicit features per
stage, convolutions per stage, biases on the convolutions and on the transposed
convolutions (nnU-Net has them), the axis order and flips the network was trained
with (nnU-Net's ``transpose_forward``), and a fold ensemble (logits averaged, as
nnU-Net v2 does).
"""

from __future__ import annotations

import torch
from torch import nn

from .netconfig import UNetConfig  # noqa: F401 - the architecture's description, kept importable from here


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel, stride, slope: float, bias: bool = True, eps: float = 1e-5):
        pad = [(k - 1) // 2 for k in kernel]
        super().__init__(
            nn.Conv3d(cin, cout, kernel, stride=stride, padding=pad, bias=bias),
            nn.InstanceNorm3d(cout, eps=eps, affine=True),
            nn.LeakyReLU(slope, inplace=True),
        )


class Stage(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel, stride, slope: float, n_conv: int = 2, bias: bool = True,
                 eps: float = 1e-5):
        super().__init__(*[ConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, slope, bias, eps)
                           for i in range(int(n_conv))])


def _axes_in(x: torch.Tensor, config: UNetConfig) -> torch.Tensor:
    """Array-order input (B, C, z, y, x) → the orientation the network was trained with."""
    if config.input_flip:
        x = torch.flip(x, [2 + int(a) for a in config.input_flip])
    if config.input_axes and list(config.input_axes) != [0, 1, 2]:
        x = x.permute(0, 1, *[2 + int(a) for a in config.input_axes]).contiguous()
    return x


def _axes_out(y: torch.Tensor, config: UNetConfig) -> torch.Tensor:
    """Inverse of :func:`_axes_in` for the network's output."""
    if config.input_axes and list(config.input_axes) != [0, 1, 2]:
        inverse = sorted(range(3), key=lambda j: int(config.input_axes[j]))
        y = y.permute(0, 1, *[2 + j for j in inverse]).contiguous()
    if config.input_flip:
        y = torch.flip(y, [2 + int(a) for a in config.input_flip])
    return y


class UNet3D(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        feats = config.features
        n = len(config.strides)
        if len(feats) != n:
            raise ValueError(f"features_per_stage has {len(feats)} entries for {n} stages")
        kernels = config.kernels or [[3, 3, 3]] * n
        n_enc = config.n_conv_per_stage or [2] * n
        n_dec = config.n_conv_per_stage_decoder or [2] * (n - 1)
        slope = config.negative_slope
        bias, eps = bool(config.conv_bias), float(config.norm_eps)
        self.encoder = nn.ModuleList()
        cin = config.in_channels
        for f, s, k, nc in zip(feats, config.strides, kernels, n_enc):
            self.encoder.append(Stage(cin, f, k, s, slope, nc, bias, eps))
            cin = f
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for d, level in enumerate(range(n - 1, 0, -1)):  # from the bottleneck up
            s = config.strides[level]
            self.up.append(nn.ConvTranspose3d(feats[level], feats[level - 1], s, stride=s,
                                              bias=bool(config.upsample_bias)))
            self.decoder.append(Stage(2 * feats[level - 1], feats[level - 1], kernels[level - 1], 1, slope,
                                      n_dec[d], bias, eps))
            self.heads.append(nn.Conv3d(feats[level - 1], config.num_classes, 1))

    def forward(self, x: torch.Tensor):
        x = _axes_in(x, self.config)
        out = self._forward_net(x)
        if isinstance(out, list):
            return [_axes_out(o, self.config) for o in out]
        return _axes_out(out, self.config)

    def _forward_net(self, x: torch.Tensor):
        """The U-Net itself, on an input already in the network's orientation."""
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


class Ensemble(nn.Module):
    """``config.ensemble`` U-Nets with the same architecture (nnU-Net folds); forward = mean of their logits
    (nnU-Net v2 averages the folds' logits too). Inference only: always the full-resolution output."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        member = UNetConfig.from_dict({**config.to_dict(), "ensemble": 1, "deep_supervision": False})
        self.members = nn.ModuleList(UNet3D(member) for _ in range(int(config.ensemble)))

    def forward(self, x: torch.Tensor):
        x = _axes_in(x, self.config)
        out = None
        for m in self.members:
            y = m._forward_net(x)
            y = y[0] if isinstance(y, list) else y
            out = y if out is None else out + y
        return _axes_out(out / len(self.members), self.config)


def build(config: UNetConfig | dict) -> nn.Module:
    if isinstance(config, dict):
        config = UNetConfig.from_dict(config)
    if int(config.ensemble) > 1:
        return Ensemble(config)
    return UNet3D(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
