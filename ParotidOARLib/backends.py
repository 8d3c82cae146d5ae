"""Inference backends: who runs a stage's network on one window.

* ``torch`` (the default and the reference): the bundle's PyTorch network, with oneDNN forced on the
  CPU (:func:`inference.optimise_for_cpu`).
* ``openvino`` (optional, CPU only; ``pip install openvino``): the same network converted in-process
  with ``openvino.convert_model`` (from the torch module, with a dynamic z, y, x input shape) and
  compiled for the CPU. The converted model is cached per weight file SHA-256 in
  :func:`cache_dir` (``openvino/<sha256>.xml`` + ``.bin``, and OpenVINO's compiled blobs), so only
  the first run pays the conversion (a few seconds). Same outputs as torch within float rounding
  (max |Δ logit| ~1e-3 on a window); the contour check is ``Testing/benchmarks/speed_check.py``.

:func:`resolve` picks the backend: ``openvino`` without the package, or on a GPU, falls back to
torch with a one-line message. Either backend's network is a callable ``net(x) -> logits`` on a
float32 window ``(1, 1, z, y, x)``: a torch tensor for torch, a NumPy array for OpenVINO
(:class:`OpenVINONet`). With OpenVINO on the CPU and the converted model cached, ``segment`` never imports
torch (1.1-1.2 s of interpreter time on 2 cores, against 0.2 s for openvino; issue 18): the windows are
combined in NumPy (:func:`inference.sliding_window`) and the device is :class:`CPUDevice`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .errors import InputError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "openvino")
DEFAULT_BACKEND = "torch"
CACHE_ENV = "PAROTIDOAR_CACHE"


def preload(*modules: str):
    """Import ``modules`` (e.g. ``"torch"``, about 1 s) in a background thread, so that their import overlaps
    what the main thread does meanwhile (reading the CT: SimpleITK's reader runs without the GIL). An
    ``import`` of the same module elsewhere simply waits for it (the import system's per-module lock); an
    error here is ignored, and that later import reports it. Returns the (non-daemon) thread."""
    import importlib
    import threading

    def _load():
        for m in modules:
            try:
                importlib.import_module(m)
            except Exception:  # noqa: BLE001 - the main thread's own import reports it
                return

    t = threading.Thread(target=_load, name="parotidoar-preload")
    t.start()
    return t


def check_backend(name) -> str:
    """``name`` as a known backend, else an :class:`InputError` naming the choices."""
    n = str(name or DEFAULT_BACKEND).strip().lower()
    if n not in BACKENDS:
        raise InputError(f"Unknown backend {name!r}; use {' or '.join(BACKENDS)} (default {DEFAULT_BACKEND}).")
    return n


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(name, device_type: str = "cpu", warn=None) -> str:
    """The backend that will run: ``name``, or ``torch`` when ``openvino`` cannot run here (the package is
    missing, or the device is not the CPU); then ``warn`` (default: print to stderr) gets one line."""
    name = check_backend(name)
    if name == "openvino":
        why = None
        if device_type != "cpu":
            why = f"the openvino backend runs on the CPU only, and the device is {device_type}"
        elif not openvino_available():
            why = "the openvino package is not installed (pip install openvino)"
        if why:
            msg = f"--backend openvino: {why}; using torch."
            (warn or (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)))(msg)
            return "torch"
    return name


def cache_dir() -> Path:
    """Where converted models are cached: ``$PAROTIDOAR_CACHE``, else ``$XDG_CACHE_HOME/ParotidOAR``
    (``~/.cache``; ``%LOCALAPPDATA%\\ParotidOAR\\Cache`` on Windows, ``~/Library/Caches/ParotidOAR`` on macOS)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "ParotidOAR" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "ParotidOAR"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ParotidOAR"


class OpenVINONet:
    """A compiled OpenVINO model: a NumPy array in, a NumPy array out (``numpy_io``: :func:`inference.sliding_window`
    then combines the windows in NumPy and never imports torch). A torch tensor in gives a torch tensor out."""

    numpy_io = True

    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def __call__(self, x):
        import numpy as np

        if isinstance(x, np.ndarray):
            out = self.request.infer([np.ascontiguousarray(x, dtype=np.float32)])[self.compiled.output(0)]
            return np.array(out, dtype=np.float32, copy=True)
        import torch

        return torch.from_numpy(self(x.detach().cpu().numpy()))


class CPUDevice:
    """The CPU, named without importing torch: what :func:`cascade.run` reports and passes on when OpenVINO runs
    the networks (``.type == "cpu"``, ``str()`` ``"cpu"``, like ``torch.device("cpu")``)."""

    type = "cpu"

    def __str__(self):
        return "cpu"

    __repr__ = __str__


def openvino_on_cpu(name, device: str = "auto") -> bool:
    """True when ``name`` is ``openvino`` and the requested ``device`` is ``auto`` or ``cpu`` (imports nothing:
    ``segment`` asks it to choose what to preload). ``--device cuda`` or ``mps`` with openvino falls back to
    torch (:func:`resolve`)."""
    return check_backend(name) == "openvino" and str(device or "auto").lower() in ("auto", "cpu")


def runs_without_torch(name, device: str = "auto") -> bool:
    """:func:`openvino_on_cpu` and the package is installed: :func:`cascade.run` then runs OpenVINO on the CPU
    without importing torch (unless the converted model is not cached yet: the conversion needs torch once)."""
    return openvino_on_cpu(name, device) and openvino_available()


def _torch_module(bundle, stage: str):
    """A fresh, unpatched float32 torch network of ``stage`` (the cached one may carry the oneDNN patch,
    which the converter does not know)."""
    from .network import build

    net = build(bundle.manifest.architecture(stage))
    net.load_state_dict(bundle.state_dict(stage), strict=True)
    return net.eval()


def openvino_model(bundle, stage: str, patch, threads: int | None = None, use_cache: bool = True):
    """``stage`` of ``bundle`` as an :class:`OpenVINONet` (converted, or read from the cache), compiled for
    the CPU with ``threads`` inference threads and float32 precision."""
    import openvino as ov

    sha = str(bundle.manifest.stage(stage).get("sha256") or "")
    folder = cache_dir() / "openvino"
    xml = folder / f"{sha}.xml" if (use_cache and sha) else None
    core = ov.Core()
    if xml is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(folder / "compiled")})
        except OSError as exc:  # an unwritable cache only costs time
            log.debug("openvino cache %s not usable: %s", folder, exc)
            xml = None
    model = None
    if xml is not None and xml.is_file() and xml.with_suffix(".bin").is_file():
        try:
            model = core.read_model(str(xml))
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is rebuilt
            log.debug("openvino cache %s unreadable (%s); converting again", xml, exc)
    if model is None:  # the only place this backend needs torch: once per model, then read from the cache
        import warnings

        import torch

        net = _torch_module(bundle, stage)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape checks, not the user's business
            model = ov.convert_model(net, example_input=torch.zeros((1, 1) + tuple(int(p) for p in patch)),
                                     input=[ov.PartialShape([1, 1, -1, -1, -1])])
        if xml is not None:
            try:
                tmp = folder / f".{sha}.{os.getpid()}.xml"
                ov.save_model(model, str(tmp), compress_to_fp16=False)
                tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
                tmp.replace(xml)
            except OSError as exc:
                log.debug("openvino cache %s not written: %s", xml, exc)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return OpenVINONet(core.compile_model(model, "CPU", config))
