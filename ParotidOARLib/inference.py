"""Patch-based network inference: device choice, sliding window with Gaussian weighting, mirroring TTA.

* :func:`select_device` — ``auto`` prefers CUDA, then Apple MPS, then CPU.
* :func:`configure_cpu_threads` — torch intra-op threads = the cores this process may use.
* :func:`sliding_window` — nnU-Net-style: windows of the training patch size with
  50 % overlap (``step`` = 0.5), each window's logits weighted by a Gaussian
  (σ = patch/8) so window centres dominate, accumulated, divided by the summed
  weights, softmax at the end. Inputs smaller than the patch are padded (with the
  normalised air value) to the patch so the network (InstanceNorm) sees what it saw in
  training. ``torch.inference_mode``; on CUDA autocast to float16 (bfloat16 where
  supported and requested); optional mirroring test-time augmentation over all
  axis combinations (8 passes).
* The network is any callable ``net(x) -> logits``: the torch module, or an OpenVINO model
  (:mod:`backends`).
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from .errors import InputError


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS / Windows
        return max(1, os.cpu_count() or 1)


def check_threads(threads) -> int | None:
    """``threads`` as a positive int, or None (= the usable cores). Anything else is an :class:`InputError`."""
    if threads is None:
        return None
    try:
        n = int(threads)
    except (TypeError, ValueError):
        n = None
    if n is None or n != threads or n < 1:
        raise InputError(f"--threads must be a whole number of CPU threads, 1 or more (this machine has "
                         f"{cpu_count()} usable cores), got {threads!r}. Leave it out to use them all.")
    return n


def thread_count(threads: int | None = None) -> int:
    """``threads`` checked (:func:`check_threads`), or the usable cores when it is None."""
    return check_threads(threads) or cpu_count()


def configure_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: the usable cores). Returns the count."""
    import torch

    n = thread_count(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def select_device(name: str = "auto"):
    """``auto`` → CUDA if available, else MPS, else CPU. An unavailable explicit device is an error."""
    import torch

    name = (name or "auto").lower()
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name.startswith("cuda"):
        if not cuda:
            raise InputError("--device cuda was requested but no CUDA GPU is available to PyTorch. "
                             "Use --device cpu (or auto).")
        return torch.device(name)
    if name == "mps":
        if not mps:
            raise InputError("--device mps was requested but Apple MPS is not available. Use --device cpu (or auto).")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"Unknown device {name!r}; use auto, cpu, cuda or mps.")


def optimise_for_cpu(net):
    """Make every ``Conv3d`` of ``net`` call oneDNN (MKLDNN) directly, in place; returns ``net``.

    PyTorch's CPU heuristic sends a convolution to its slow im2col path when
    ``batch × channels × depth × height`` is small (≤ 20480) — true for the first
    convolutions of a small 3D U-Net on one patch. Forcing oneDNN gives the same
    results (max |diff| ~1e-6) 1.3–6× faster on the 2-core CI machine (see
    docs/cascade.md). Channels-last-3d memory format was measured and did not help,
    so it is not used. A no-op without oneDNN or when already applied.
    """
    import torch
    from torch import nn

    if getattr(net, "_parotidoar_cpu_optimised", False) or not torch.backends.mkldnn.is_available():
        return net
    op = getattr(torch.ops.aten, "mkldnn_convolution", None)
    if op is None:
        return net
    for m in net.modules():
        if isinstance(m, nn.Conv3d) and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
            def forward(x, m=m):
                if x.device.type != "cpu" or x.dtype != torch.float32 or m.weight.dtype != torch.float32:
                    return nn.Conv3d.forward(m, x)
                return op(x, m.weight, m.bias, list(m.padding), list(m.stride), list(m.dilation), m.groups)
            m.forward = forward
    net._parotidoar_cpu_optimised = True
    return net


_GAUSS_CACHE: dict = {}


def gaussian_weights(patch_size, sigma_scale: float = 1.0 / 8, min_weight: float = 1e-3) -> np.ndarray:
    """nnU-Net's importance map: a separable Gaussian, max 1, floor ``min_weight`` (never 0)."""
    key = (tuple(patch_size), sigma_scale, min_weight)
    if key not in _GAUSS_CACHE:
        w = np.ones((), dtype=np.float64)
        for n in patch_size:
            x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
            sigma = max(n * sigma_scale, 1e-6)
            w = np.multiply.outer(w, np.exp(-0.5 * (x / sigma) ** 2))
        w = w / w.max()
        _GAUSS_CACHE[key] = np.maximum(w, min_weight).astype(np.float32)
    return _GAUSS_CACHE[key]


def window_starts(size: int, patch: int, step: float = 0.5) -> list[int]:
    """Start offsets covering ``[0, size)`` with windows of ``patch`` and overlap ≥ 1 − step."""
    if size <= patch:
        return [0]
    n = int(np.ceil((size - patch) / (patch * step))) + 1
    return [int(round(v)) for v in np.linspace(0, size - patch, n)]


def _mirror_axes(tta: bool, axes=None):
    """Mirroring TTA: identity + left-right flip only. Stage grids are LPS-aligned, so tensor axis 4 (x) is
    left-right; training mirrors only that axis (the anatomy is not symmetric superior-inferior or
    anterior-posterior), so flipping the other axes would show the network orientations it never saw.

    ``axes`` (array axes, 0 = z, 1 = y, 2 = x): the axes the model was trained to be mirror-invariant
    along (an imported nnU-Net stage's ``inference_allowed_mirroring_axes``); TTA then runs the
    identity and every combination of them, as nnU-Net does."""
    if not tta:
        return [()]
    if axes is None:
        return [(), (4,)]
    dims = [2 + int(a) for a in axes]
    return [()] + [c for r in range(1, len(dims) + 1) for c in itertools.combinations(dims, r)]


def sliding_window(net, image: np.ndarray, patch_size, num_classes: int, device, *, step: float = 0.5,
                   tta: bool = False, pad_value: float = 0.0, progress=None, autocast: bool = True,
                   channels_last: bool = False, mirror_axes=None) -> np.ndarray:
    """Softmax probabilities ``float32 [C, z, y, x]`` for a normalised ``image [z, y, x]``.

    ``progress(fraction)`` is called after each window (0..1). ``mirror_axes``: see :func:`_mirror_axes`.
    A network with ``numpy_io = True`` (the OpenVINO backend) takes and returns NumPy arrays: its windows are
    combined in NumPy, so that path never imports torch (issue 18); ``device`` and the torch options are unused.
    """
    image = np.asarray(image, dtype=np.float32)
    patch = tuple(int(p) for p in patch_size)
    shape = image.shape
    padded_shape = tuple(max(s, p) for s, p in zip(shape, patch))
    pad_lo = [(ps - s) // 2 for ps, s in zip(padded_shape, shape)]
    if padded_shape != shape:
        buf = np.full(padded_shape, pad_value, dtype=np.float32)
        buf[tuple(slice(a, a + s) for a, s in zip(pad_lo, shape))] = image
        image = buf
    starts = [window_starts(s, p, step) for s, p in zip(padded_shape, patch)]
    windows = [tuple(slice(a, a + p) for a, p in zip(w, patch)) for w in itertools.product(*starts)]
    mirrors = _mirror_axes(tta, mirror_axes)
    crop = (slice(None),) + tuple(slice(a, a + s) for a, s in zip(pad_lo, shape))
    counter = _Progress(progress, len(windows) * len(mirrors))
    if getattr(net, "numpy_io", False):
        return _combine_numpy(net, image, windows, mirrors, num_classes, patch, crop, counter)
    import torch

    weight = torch.from_numpy(gaussian_weights(patch)).to(device)
    logits_sum = torch.zeros((num_classes,) + padded_shape, dtype=torch.float32, device=device)
    weight_sum = torch.zeros(padded_shape, dtype=torch.float32, device=device)
    x_full = torch.from_numpy(image).to(device)
    use_autocast = autocast and device.type == "cuda"
    amp_dtype = torch.float16

    def run(xin):
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_autocast):
            return net(xin).float()

    with torch.inference_mode():
        for sl in windows:
            inp = x_full[sl][None, None]
            if channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last_3d)
            acc = _mirrored(run, inp, mirrors, torch.flip, counter)
            logits_sum[(slice(None),) + sl] += acc[0] * weight
            weight_sum[sl] += weight
        logits = logits_sum / weight_sum
        probs = torch.softmax(logits, dim=0)
        out = probs[crop].float().cpu().numpy()
    return np.ascontiguousarray(out)


def _mirrored(run, inp, mirrors, flip, counter):
    """One window's logits: ``run`` on the window and on each mirrored copy (flipped back), averaged."""
    acc = None
    for axes in mirrors:
        out = run(flip(inp, axes) if axes else inp)
        out = flip(out, axes) if axes else out
        acc = out if acc is None else acc + out
        counter.step()
    return acc / len(mirrors) if len(mirrors) > 1 else acc


class _Progress:
    """Calls ``progress(done / total)`` once per network pass (nothing when ``progress`` is None)."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.done = progress, max(1, total), 0

    def step(self):
        self.done += 1
        if self.progress is not None:
            self.progress(self.done / self.total)


def _combine_numpy(net, image, windows, mirrors, num_classes, patch, crop, counter) -> np.ndarray:
    """:func:`sliding_window`'s accumulation for a NumPy network: the same Gaussian-weighted sum of each window's
    logits (mirrored passes averaged), divided by the summed weights, then the softmax."""
    weight = gaussian_weights(patch)
    logits = np.zeros((num_classes,) + image.shape, dtype=np.float32)
    weight_sum = np.zeros(image.shape, dtype=np.float32)

    def run(xin):
        return np.asarray(net(np.ascontiguousarray(xin)), dtype=np.float32)

    for sl in windows:
        acc = _mirrored(run, image[sl][None, None], mirrors, np.flip, counter)
        logits[(slice(None),) + sl] += acc[0] * weight
        weight_sum[sl] += weight
    logits = logits[crop] / weight_sum[crop[1:]]
    logits -= logits.max(axis=0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0, keepdims=True)
    return np.ascontiguousarray(logits)
