"""The Segment tab's logic, free of Qt: volume → engine CLI process → segmentation node.

:class:`SegmentLogic` takes the MRML ``scene`` and an injectable process
runner (default :class:`~ParotidOARGui.Process.ProcessRunner`). It writes
the input volume to a temporary NRRD, runs
``<python> -m ParotidOARLib segment IN --side … --out OUT.seg.nrrd --report R.json
--progress-lines`` in a separate process and, on success, imports the result
with :func:`ParotidOARLib.scene.load_result`. An output node that holds the
result of another CT (the previous patient) is never reused: a new node is
created instead. On failure or cancel the scene is left exactly as it was (the output node is only created or changed after
the process succeeded) and the process's error text is reported.

The GUI drives :meth:`SegmentLogic.poll` from a ``qt.QTimer``; scripts and
the self-test call :meth:`SegmentLogic.run`, which blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ParotidOARLib import labels, scene as mrml_scene
from ParotidOARLib.errors import Cancelled, InputError, ParotidOARError

try:
    from .Process import ProcessRunner
    from .Signal import Signal
except ImportError:  # pragma: no cover
    from Process import ProcessRunner
    from Signal import Signal

#: folder holding the ParotidOARLib package (next to ParotidOAR.py when installed, the repo root in a checkout)
_HERE = Path(__file__).resolve().parent


def engine_dir() -> Path:
    for candidate in (_HERE.parent, _HERE.parent.parent):
        if (candidate / "ParotidOARLib" / "__init__.py").exists():
            return candidate
    raise InputError("The ParotidOARLib engine was not found next to the module; reinstall the extension.")


def default_python() -> str:
    """``PythonSlicer`` inside Slicer (as SlicerTotalSegmentator does), else this interpreter.

    Inside Slicer ``sys.executable`` may be the Slicer application itself, which
    must never be started with ``-m``: then PythonSlicer is looked up next to it.
    """
    found = shutil.which("PythonSlicer")
    if found:
        return found
    exe = Path(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        if (exe.parent / name).is_file():
            return str(exe.parent / name)
    if exe.name.lower().startswith("slicer"):
        raise InputError("PythonSlicer was not found next to Slicer; reinstall 3D Slicer.")
    return sys.executable


class SegmentationFailed(ParotidOARError):
    """The segmentation process exited with an error; the message holds its error text."""


DEVICES = {"auto": "auto", "cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}


@dataclass
class SegmentRequest:
    volume_node: object
    side: str = "left"  # "left" | "right"
    segmentation_node: object = None  # None: create a new node on success
    device: str = "auto"  # auto | cpu | gpu
    model_dir: str | None = None  # None: the bundled default model
    roi_margin_mm: float = 17.0
    show_roi: bool = True
    force: bool = False  # replace a segmentation with user edits
    closed_surface: bool = True
    parotid_segmentation: object = None  # use this node's Parotid segment instead of stage 1 (redo the OARs)

    def validate(self) -> None:
        if self.volume_node is None or self.volume_node.GetImageData() is None:
            raise InputError("Select an input CT volume (it has no image data).")
        side = str(self.side).lower()
        if side not in ("left", "right"):
            raise InputError(f"Side must be Left or Right, got {self.side!r}.")
        self.side = side
        device = str(self.device).lower()
        if device not in DEVICES:
            raise InputError(f"Device must be Auto, CPU or GPU, got {self.device!r}.")
        self.device = device
        if not (0 < float(self.roi_margin_mm) <= 100):
            raise InputError(f"ROI margin must be between 0 and 100 mm, got {self.roi_margin_mm}.")


class SegmentLogic:
    """Events: ``progress(pct, step)``, ``finished(segmentation_node_or_None, error_text_or_None)``."""

    def __init__(self, scene, process=None, python_executable: str | None = None, keep_temp: bool = False):
        self.scene = scene
        self.process = process if process is not None else ProcessRunner()
        self.python_executable = python_executable  # None: default_python(), resolved when a run starts
        self.keep_temp = keep_temp
        self.progress = Signal("pct: float, step: str")
        self.finished = Signal("segmentation_node, error_text")
        self.request: SegmentRequest | None = None
        self.report: dict | None = None
        self.result_node = None
        self.error: str | None = None
        self._tmp: Path | None = None
        self.process.progress.connect(self.progress.emit)
        self.process.finished.connect(self._on_process_finished)

    # ---------------------------------------------------------------- commands
    def build_command(self, input_path, out_path, report_path, request: SegmentRequest,
                      parotid_path=None) -> list[str]:
        cmd = [self.python_executable or default_python(), "-m", "ParotidOARLib", "segment", str(input_path),
               "--side", request.side, "--out", str(out_path), "--report", str(report_path),
               "--device", DEVICES[request.device], "--roi-margin-mm", f"{float(request.roi_margin_mm):g}",
               "--progress-lines"]
        if request.model_dir:
            cmd[5:5] = ["--model", str(request.model_dir)]
        if parotid_path:
            cmd += ["--parotid", str(parotid_path)]
        return cmd

    def environment(self) -> dict:
        env = dict(os.environ)
        root = str(engine_dir())
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    @property
    def is_running(self) -> bool:
        return self.process.is_running

    def check(self, request: SegmentRequest) -> None:
        """Everything that can refuse a request before any work (and before any dependency check):
        the inputs, the output's owner CT (another CT's result is never reused) and user edits."""
        request.validate()
        if mrml_scene.made_for_other_volume(request.segmentation_node, request.volume_node):
            if request.parotid_segmentation is request.segmentation_node:
                raise InputError(
                    f"'Redo OARs' uses the Parotid of {request.segmentation_node.GetName()!r}, which was computed "
                    f"from another CT than {request.volume_node.GetName()!r}. Choose this CT's segmentation.")
            # the previous patient's result stays as it is; the new CT gets its own node
            request.segmentation_node = None
        mrml_scene.check_can_write(request.segmentation_node, request.force)

    def start(self, request: SegmentRequest) -> None:
        """Check, write the volume to a temp file and start the process (returns at once)."""
        if self.is_running:
            raise InputError("A segmentation is already running. Wait for it or cancel it.")
        self.check(request)  # fail before any work
        self.request, self.report, self.result_node, self.error = request, None, None, None
        self._tmp = Path(tempfile.mkdtemp(prefix="ParotidOAR-"))
        try:
            parotid_path = None
            if request.parotid_segmentation is not None:
                parotid_path = mrml_scene.write_segment_mask(request.parotid_segmentation, request.volume_node,
                                                             labels.PAROTID, self._tmp / "parotid.nrrd")
            input_path = mrml_scene.write_volume(request.volume_node, self._tmp / "input.nrrd")
            cmd = self.build_command(input_path, self._tmp / "result.seg.nrrd", self._tmp / "report.json", request,
                                     parotid_path)
            self.progress.emit(0.0, "Starting")
            self.process.start(cmd, env=self.environment(), cwd=str(self._tmp))
        except Exception:
            self._cleanup()
            raise

    def poll(self) -> bool:
        """Call regularly (QTimer); True while running."""
        return self.process.poll()

    def cancel(self) -> None:
        self.process.cancel()

    def run(self, request: SegmentRequest, timeout: float | None = None):
        """Blocking run: returns the segmentation node or raises (SegmentationFailed / Cancelled)."""
        self.start(request)
        self.process.wait(timeout=timeout)
        if self.error is not None:
            if self.process.cancelled:
                raise Cancelled(self.error)
            raise SegmentationFailed(self.error)
        return self.result_node

    # ---------------------------------------------------------------- results
    def _on_process_finished(self, returncode: int, cancelled: bool) -> None:
        node, error = None, None
        try:
            if cancelled:
                error = "Segmentation cancelled; the scene was not changed."
            elif returncode != 0:
                error = self.process.error_text()
            else:
                node = self._import_result()
        except ParotidOARError as exc:
            error = str(exc)
        except Exception as exc:  # an import bug must still end the run cleanly
            error = f"Could not load the result: {exc}"
        finally:
            self._cleanup()
        self.result_node, self.error = node, error
        if node is not None:
            self.progress.emit(100.0, "Done")
        self.finished.emit(node, error)

    def _import_result(self):
        request = self.request
        report_path = self._tmp / "report.json"
        self.report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else {}
        self.report.setdefault("side", request.side)
        return mrml_scene.load_result(
            self.scene, self._tmp / "result.seg.nrrd", request.volume_node, request.segmentation_node,
            report=self.report, side=request.side, show_roi=request.show_roi, force=request.force,
            closed_surface=request.closed_surface)

    def _cleanup(self) -> None:
        if self._tmp is not None and not self.keep_temp:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None
