"""Losses: soft Dice + cross-entropy with nnU-Net-style deep supervision.

``L = Σ_d w_d · (SoftDice_d + CE_d)`` with ``w_d ∝ 2^-(d-1)`` (d = 1 is full resolution),
normalised to sum to 1 as nnU-Net does (the lowest-resolution output gets weight 0).
The ground truth is downsampled for each output with nearest-neighbour sampling
(max-pool style for foreground so thin structures survive at low resolution).

An optional ``channel_mask`` (batch × classes, 1 = labelled) restricts Dice and CE to
the classes a partially labelled case actually has. A sample whose ``channel_mask`` is all zero
is **group-labelled** (real OpenKBP crops for stage 2): its target holds label groups, not classes,
and it is scored with the marginal loss of :mod:`ParotidOARLib.partial_labels`. A batch may mix both
kinds; each kind's loss is weighted by its share of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net: 1, 1/2, 1/4, …; the lowest resolution gets 0; normalised to sum 1."""
    w = [1.0 / (2 ** i) for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    s = sum(w)
    return [v / s for v in w]


def downsample_labels(target: torch.Tensor, shape) -> torch.Tensor:
    """Integer label map (B, Z, Y, X) → ``shape`` (z, y, x) by strided nearest sampling."""
    if tuple(target.shape[-3:]) == tuple(shape):
        return target
    t = target[:, None].float()
    return F.interpolate(t, size=tuple(shape), mode="nearest")[:, 0].long()


def soft_dice_loss(logits, target, channel_mask=None, smooth: float = 1e-5, batch_dice: bool = True):
    """1 − mean soft Dice over the foreground classes (nnU-Net's batch Dice)."""
    probs = torch.softmax(logits.float(), 1)
    n_cls = logits.shape[1]
    onehot = F.one_hot(target.long(), n_cls).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    dice = dice[..., 1:]  # foreground classes
    if channel_mask is not None:
        cm = channel_mask[:, 1:].float()
        if batch_dice:
            cm = cm.max(0).values
        return 1 - (dice * cm).sum() / cm.sum().clamp(min=1)
    return 1 - dice.mean()


def masked_ce(logits, target, channel_mask=None):
    if channel_mask is None:
        return F.cross_entropy(logits.float(), target.long())
    # unlabelled classes: drop their logits' competition by masking them out of the softmax
    big = torch.finfo(torch.float32).min / 4
    mask = channel_mask[:, :, None, None, None].bool()
    lg = torch.where(mask, logits.float(), torch.full_like(logits.float(), big))
    return F.cross_entropy(lg, target.long())


class DeepSupervisionLoss(torch.nn.Module):
    def __init__(self, n_outputs: int = 1, dice_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        self.weights = deep_supervision_weights(n_outputs)
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight

    def forward(self, outputs, target, channel_mask=None):
        if torch.is_tensor(outputs):
            outputs = [outputs]
        weights = self.weights if len(self.weights) == len(outputs) else deep_supervision_weights(len(outputs))
        total = 0.0
        for w, out in zip(weights, outputs):
            if w == 0:  # nnU-Net's unused lowest head: zero gradient, so DDP sees every parameter used
                total = total + 0.0 * out.float().sum()
                continue
            t = downsample_labels(target, out.shape[-3:])
            total = total + w * self._one_scale(out, t, channel_mask)
        return total

    def _class_loss(self, out, t, channel_mask=None):
        return (self.dice_weight * soft_dice_loss(out, t, channel_mask)
                + self.ce_weight * masked_ce(out, t, channel_mask))

    def _one_scale(self, out, t, channel_mask):
        grouped = None if channel_mask is None else channel_mask.sum(1) == 0
        if grouped is None or not bool(grouped.any()):
            return self._class_loss(out, t, channel_mask)
        from .partial_labels import marginal_loss

        n = float(channel_mask.shape[0])
        n_g = float(grouped.sum())
        loss = (n_g / n) * marginal_loss(out[grouped], t[grouped])
        full = ~grouped
        if bool(full.any()):
            loss = loss + ((n - n_g) / n) * self._class_loss(out[full], t[full], channel_mask[full])
        return loss
