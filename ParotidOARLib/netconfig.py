"""The architecture of a stage's network, as the model bundle's manifest stores it: :class:`UNetConfig`.

Kept apart from :mod:`ParotidOARLib.network` (the torch modules) so that reading a bundle's manifest, and
running its networks with OpenVINO, never imports torch (issue 18). :mod:`network` re-exports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    #: explicit features per stage (overrides base_features / max_features), e.g. nnU-Net's features_per_stage
    features_per_stage: list | None = None
    #: convolutions per encoder stage / per decoder stage (default 2 each)
    n_conv_per_stage: list | None = None
    n_conv_per_stage_decoder: list | None = None
    conv_bias: bool = True
    #: bias on the transposed (upsampling) convolutions: nnU-Net has one (= conv_bias), our trainer does not
    upsample_bias: bool = False
    norm_eps: float = 1e-5
    #: the network sees the (z, y, x) input with its axes in this order (nnU-Net's transpose_forward)
    input_axes: list | None = None
    #: array axes (0 = z, 1 = y, 2 = x) flipped before the network (and flipped back after it)
    input_flip: list | None = None
    #: > 1: that many networks with these settings, logits averaged (an nnU-Net fold ensemble)
    ensemble: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def features(self) -> list[int]:
        if self.features_per_stage:
            return [int(f) for f in self.features_per_stage]
        return [min(self.base_features * 2 ** i, self.max_features) for i in range(len(self.strides))]

    @property
    def divisor(self) -> tuple[int, int, int]:
        """Patch sizes must be multiples of this, per (z, y, x) axis of the input array."""
        d = [1, 1, 1]
        for s in self.strides:
            d = [a * b for a, b in zip(d, s)]
        if self.input_axes:  # d is in the network's axis order; network axis j is array axis input_axes[j]
            out = [1, 1, 1]
            for j, a in enumerate(self.input_axes):
                out[int(a)] = d[j]
            d = out
        return tuple(d)
