"""Segment many CTs: one case after another, never stopping on a bad case.

Inputs (:func:`discover_cases`):

* a folder with one CT per file (NRRD, NIfTI, MHA; ``*.seg.nrrd`` are
  ignored) — the case id is the file name without its suffixes;
* sub-folders of that folder: a phantom case folder (``ct.nrrd`` +
  ``case.json``, as written by ``python -m ParotidOARLib phantom``) or one
  DICOM series per sub-folder — the case id is the sub-folder name;
* or a CSV with a header: ``input`` (or ``path``) is required, ``case_id``,
  ``side`` and ``series_uid`` are optional; relative paths are relative to
  the CSV's folder.

The side comes from the CSV ``side`` column, else ``--side``, else (with
``--side-from-json``) from ``case.json`` next to a phantom's ``ct.nrrd`` or
from ``<case>.json`` beside the input.

Outputs (:func:`run_batch`): ``OUT/<case>.seg.nrrd`` and
``OUT/<case>.report.json`` per case (written atomically by
:func:`cascade.segment`), and a summary CSV (default
``OUT/batch-summary.csv``) with one row per case: status (``ok``,
``skipped``, ``failed``), error, seconds, model, device, ROI and per-structure
volumes and per-step times. Cases whose two outputs already exist are
skipped unless ``force``. A failed case is reported and the batch goes on;
the CLI exits with code 1 when any case failed.

The model is loaded and verified once per batch, not once per case. A case is **claimed** before
it is started: ``OUT/.<case>.claim`` is created exclusively (holding the host and process id) and
removed when the case ends, so several batches started on one list (or one folder) never segment
the same case twice; a claim left by a process that is gone (same host) is taken over. A case
that fails with an unexpected error (not a user error such as a corrupt file) is retried once.
At the end the summary is rebuilt from the per-case reports on disk, so a case another batch
finished meanwhile is listed with its volumes (status ``skipped``), one that failed there with its
error (``OUT/<case>.failed.json``, written by whichever batch ran it and removed on success) and one
still being segmented elsewhere is ``claimed``.

Each case goes through :func:`process_case` (skip, claim, segment, retry once, record, release);
:func:`run_batch` calls it in a plain loop, and :mod:`.cohort` calls it on Dask workers
(``batch --workers N`` / ``--scheduler``), so both paths behave the same. This module never imports Dask.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from . import labels
from .errors import InputError, OutputError, ParotidOARError
from .imageio import atomic_file, check_output, is_image_file

logger = logging.getLogger(__name__)

SUMMARY_NAME = "batch-summary.csv"
TIMING_STEPS = ("read", "stage1", "stage2", "total")


@dataclass
class BatchCase:
    case_id: str
    input: Path
    side: str | None = None
    series_uid: str | None = None
    error: str | None = None  # a problem found while discovering (e.g. no side)


def _strip_suffixes(name: str) -> str:
    lower = name.lower()
    for suffix in (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _side_from_json(case: BatchCase) -> str | None:
    candidates = []
    if case.input.is_file():
        candidates += [case.input.parent / "case.json" if case.input.name == "ct.nrrd" else None,
                       case.input.with_name(f"{case.case_id}.json")]
    else:
        candidates += [case.input / "case.json", case.input.with_name(f"{case.case_id}.json")]
    for path in candidates:
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise InputError(f"Cannot read the side from {path} ({exc}).") from None
            side = data.get("side") or (data.get("params") or {}).get("side")
            if side:
                return str(side).lower()
    return None


def _looks_like_dicom_folder(folder: Path) -> bool:
    for p in folder.iterdir():
        if p.is_file() and not p.name.startswith("."):
            if p.suffix.lower() in (".dcm", ".ima", "") or p.name.upper().startswith(("CT", "IM")):
                return True
    return False


def discover_cases(input_path, side: str | None = None, side_from_json: bool = False) -> list[BatchCase]:
    """The cases of a batch input (folder or CSV), sorted by case id for folders."""
    input_path = Path(input_path)
    if not input_path.exists():
        raise InputError(f"Batch input not found: {input_path}.")
    if side is not None:
        side = side.lower()
        if side not in ("left", "right"):
            raise InputError(f"--side must be left or right, got {side!r}.")
    cases: list[BatchCase] = []
    if input_path.is_file():
        if input_path.suffix.lower() != ".csv":
            raise InputError(f"{input_path} is a file; give a folder of CTs or a CSV with an 'input' column.")
        with open(input_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = {k.strip().lower(): k for k in (reader.fieldnames or [])}
            column = fields.get("input") or fields.get("path")
            if column is None:
                raise InputError(f"{input_path} needs an 'input' (or 'path') column; found {reader.fieldnames}.")
            for n, row in enumerate(reader, start=2):
                raw = (row.get(column) or "").strip()
                if not raw:
                    continue
                path = Path(raw) if Path(raw).is_absolute() else input_path.parent / raw
                case_id = (row.get(fields.get("case_id", ""), "") or "").strip() or (
                    path.name if path.is_dir() else _strip_suffixes(path.name))
                row_side = (row.get(fields.get("side", ""), "") or "").strip().lower() or None
                uid = (row.get(fields.get("series_uid", ""), "") or "").strip() or None
                cases.append(BatchCase(case_id, path, row_side, uid))
    else:
        for entry in sorted(input_path.iterdir(), key=lambda p: p.name):
            if entry.name.startswith("."):
                continue
            if entry.is_file() and is_image_file(entry):
                cases.append(BatchCase(_strip_suffixes(entry.name), entry))
            elif entry.is_dir():
                if (entry / "ct.nrrd").is_file():
                    cases.append(BatchCase(entry.name, entry / "ct.nrrd"))
                elif _looks_like_dicom_folder(entry):
                    cases.append(BatchCase(entry.name, entry))
        if not cases:
            raise InputError(f"No CT found in {input_path}: expected NRRD/NIfTI/MHA files or one DICOM series "
                             "(or phantom case) per sub-folder.")
    seen = set()
    for case in cases:
        if case.case_id in seen:
            case.error = f"Duplicate case id {case.case_id!r}; rename one of the inputs."
        seen.add(case.case_id)
        if case.side is None:
            case.side = side
        if case.side is None and side_from_json:
            try:
                case.side = _side_from_json(case)
            except InputError as exc:
                case.error = str(exc)
        if case.side not in ("left", "right") and case.error is None:
            case.error = (f"No side for case {case.case_id!r}: pass --side left|right, a CSV 'side' column, or "
                          "--side-from-json with a case.json / <case>.json next to the input.")
    return cases


def claim_path(out_dir, case_id: str) -> Path:
    return Path(out_dir) / f".{case_id}.claim"


def claim(out_dir, case_id: str) -> bool:
    """Claim a case for this process (exclusive create of :func:`claim_path`); False when another live
    process holds it. A claim from a process of this host that is gone is taken over."""
    from .imageio import _pid_alive

    path = claim_path(out_dir, case_id)
    me = f"{socket.gethostname()} {os.getpid()}\n"
    for _attempt in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                host, pid = path.read_text().split()
                stale = host == socket.gethostname() and not _pid_alive(int(pid))
            except (OSError, ValueError):
                stale = False  # being written right now, or unreadable: leave it to its owner
            if not stale:
                return False
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def release(out_dir, case_id: str) -> None:
    try:
        claim_path(out_dir, case_id).unlink()
    except FileNotFoundError:
        pass


def failure_path(out_dir, case_id: str) -> Path:
    """``OUT/<case>.failed.json``: the last failure of a case (whichever batch ran it); removed on success."""
    return Path(out_dir) / f"{case_id}.failed.json"


def _record_failure(out_dir, case: "BatchCase", error: str) -> None:
    try:
        with atomic_file(failure_path(out_dir, case.case_id)) as tmp:
            tmp.write_text(json.dumps({"case_id": case.case_id, "input": str(case.input), "error": error,
                                       "host": socket.gethostname(), "pid": os.getpid(),
                                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    except (OSError, ParotidOARError) as exc:  # the summary still has it; never stop the batch for this
        logger.warning("could not record the failure of %s: %s", case.case_id, exc)


def output_paths(out_dir, case_id: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir / f"{case_id}.seg.nrrd", out_dir / f"{case_id}.report.json"


def summary_row(case: BatchCase, status: str, error: str = "", seconds: float | None = None,
         report: dict | None = None) -> dict:
    report = report or {}
    model = report.get("model") or {}
    row = {"case_id": case.case_id, "input": str(case.input), "side": case.side or "", "status": status,
           "error": error, "seconds": "" if seconds is None else f"{seconds:.2f}",
           "model": model.get("id") or "", "device": report.get("device") or "",
           "roi_volume_cc": report.get("roi_volume_cc", "")}
    volumes = report.get("volumes_cc") or {}
    for name in labels.STRUCTURES:
        row[f"{name} cc"] = volumes.get(name, "")
    timings = report.get("timings") or {}
    for step in TIMING_STEPS:
        row[f"time {step} s"] = timings.get(step, "")
    return row


def summary_columns() -> list[str]:
    return (["case_id", "input", "side", "status", "error", "seconds", "model", "device", "roi_volume_cc"]
            + [f"{n} cc" for n in labels.STRUCTURES] + [f"time {s} s" for s in TIMING_STEPS])


def write_summary(path, rows: list[dict]) -> Path:
    """Write the summary CSV atomically (temp file + rename)."""
    path = Path(path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=summary_columns(), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    with atomic_file(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return path


def prepare_output(out_dir, summary_path=None) -> tuple[Path, Path]:
    """Create (if needed) and check the batch output folder; returns ``(out_dir, summary_path)``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"The batch output {out_dir} is a file; give a folder.")
    if not out_dir.exists():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)  # another batch may create it at the same moment
        except OSError as exc:
            raise OutputError(f"Cannot create the batch output folder {out_dir}: {exc.strerror or exc}.") from None
    summary_path = Path(summary_path) if summary_path else out_dir / SUMMARY_NAME
    check_output(summary_path, force=True)  # the summary is rewritten each run; the folder must be writable
    if summary_path.parent != out_dir:
        check_output(out_dir / SUMMARY_NAME, force=True, what="output folder")
    return out_dir, summary_path


def _read_report(report_path) -> dict:
    try:
        return json.loads(Path(report_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def process_case(case: BatchCase, out_dir, segment, *, force: bool = False, first: bool = False,
                 note=None) -> tuple[dict, str]:
    """One case of a batch, whichever process runs it: skip it when done, claim it, segment it
    (``segment(case, seg_path, report_path, first) -> report``), retry an unexpected failure once,
    record a failure, release the claim. Returns ``(summary row, one-line outcome)``; ``note(text)``
    hears the retry. The sequential loop and the Dask workers (:mod:`.cohort`) both call this."""
    out_dir = Path(out_dir)
    note = note or (lambda text: None)
    seg_path, report_path = output_paths(out_dir, case.case_id)
    if case.error:
        _record_failure(out_dir, case, case.error)
        return summary_row(case, "failed", case.error), f"FAILED: {case.error}"
    if not force and seg_path.exists() and report_path.exists():
        return (summary_row(case, "skipped", "outputs exist (use --force to redo)", None, _read_report(report_path)),
                "skipped (done; --force to redo)")
    if not claim(out_dir, case.case_id):
        return summary_row(case, "claimed", "being segmented by another batch"), \
            "skipped (another batch is segmenting it)"
    try:
        if not force and seg_path.exists() and report_path.exists():  # finished while we looked
            return (summary_row(case, "skipped", "outputs exist (use --force to redo)", None,
                                _read_report(report_path)), "skipped (done; --force to redo)")
        t0 = time.perf_counter()
        for attempt in (1, 2):
            try:
                report = segment(case, seg_path, report_path, first and attempt == 1)
                error = None
                break
            except ParotidOARError as exc:  # a user error (corrupt file, bad side...): no retry
                error = str(exc)
                break
            except (MemoryError, RuntimeError, ValueError, OSError) as exc:  # must not stop the batch
                error = f"{type(exc).__name__}: {exc}"
                if attempt == 1:
                    note(f"failed ({error}); retrying once")
        seconds = time.perf_counter() - t0
        if error is not None:
            _record_failure(out_dir, case, error)
            return summary_row(case, "failed", error, seconds), f"FAILED: {error}"
        try:
            failure_path(out_dir, case.case_id).unlink()
        except FileNotFoundError:
            pass
        return summary_row(case, "ok", "", seconds, report), f"ok in {seconds:.1f} s -> {seg_path}"
    finally:
        release(out_dir, case.case_id)


def finish_summary(cases: list[BatchCase], rows: list[dict], out_dir, summary_path) -> Path:
    """Rebuild the rows of cases claimed elsewhere from the files on disk, then write the summary CSV."""
    for i, row in enumerate(rows):
        if row["status"] == "claimed":
            seg_path, report_path = output_paths(out_dir, cases[i].case_id)
            if seg_path.exists() and report_path.exists():
                rows[i] = summary_row(cases[i], "skipped", "done by another batch", None, _read_report(report_path))
            elif failure_path(out_dir, cases[i].case_id).exists():
                record = _read_report(failure_path(out_dir, cases[i].case_id))
                rows[i] = summary_row(cases[i], "failed", f"(another batch) {record.get('error', '')}")
    return write_summary(summary_path, rows)


def totals_line(rows: list[dict], total: int, summary_path) -> str:
    n_failed = sum(r["status"] == "failed" for r in rows)
    n_ok = sum(r["status"] == "ok" for r in rows)
    n_skip = sum(r["status"] in ("skipped", "claimed") for r in rows)
    return f"batch: {n_ok} ok, {n_skip} skipped, {n_failed} failed of {total}; summary: {summary_path}"


def make_logger(log=print, bar=None):
    """``_log(message, level)``: ``log(message)`` (stdout by default, above a progress bar if any) and the
    ``ParotidOARLib.batch`` logger at DEBUG (so that -v does not show it twice and --log-file records it)."""
    def _log(message, level=logging.INFO):
        logger.debug("%s%s", "" if level <= logging.INFO else "warning: ", message)
        if bar is not None and log is print:
            bar.write(message)
        else:
            log(message)
    return _log


def run_batch(cases: list[BatchCase], out_dir, *, model_dir=None, device: str = "auto",
              roi_margin_mm: float = labels.ROI_MARGIN_MM_DEFAULT, tta: bool = False, force: bool = False,
              summary_path=None, threads: int | None = None, log=print, progress=None, step: float | None = None,
              backend: str = "torch") -> list[dict]:
    """Segment every case, one after another; returns the summary rows (also written to ``summary_path``).
    ``step`` (None: :data:`cascade.DEFAULT_STEPS`) and ``backend``: as :class:`cascade.SegmentOptions`.

    ``progress`` is a :class:`progress.Progress` (a bar with the time left on a terminal, or
    ``PROGRESS`` lines), advanced once per case."""
    from . import cascade

    out_dir, summary_path = prepare_output(out_dir, summary_path)
    rows: list[dict] = []
    total = len(cases)
    run_seconds: list[float] = []  # cases segmented in this run: the estimate of the time left
    _log = make_logger(log, progress)
    bundle = None  # loaded and verified once, at the first case this run segments

    def _segment(case, seg_path, report_path, first):
        nonlocal bundle
        if bundle is None:
            bundle = cascade.load_model_bundle(model_dir)
            logger.info("model %s from %s (verified once for the batch)", bundle.manifest.model_id,
                        bundle.directory)
        options = cascade.SegmentOptions(side=case.side, model_dir=model_dir, device=device,
                                         roi_margin_mm=roi_margin_mm, tta=tta, force=force,
                                         series_uid=case.series_uid, threads=threads,
                                         step=step, backend=backend)
        return cascade.segment(case.input, seg_path, options, report_path=report_path, warn=first, bundle=bundle)

    try:
        for n, case in enumerate(cases, start=1):
            left = (f", ~{sum(run_seconds) / len(run_seconds) * (total - n + 1):.0f} s left" if run_seconds
                    else "")
            prefix = f"[{n}/{total}{left}] {case.case_id}"
            row, outcome = process_case(case, out_dir, _segment, force=force, first=not run_seconds,
                                        note=lambda text: _log(f"{prefix}: {text}", logging.WARNING))
            rows.append(row)
            if row["status"] == "ok":
                run_seconds.append(float(row["seconds"]))
            _log(f"{prefix}: {outcome}", logging.WARNING if row["status"] == "failed" else logging.INFO)
            if progress is not None:
                progress.advance(n, total, case.case_id)
    finally:
        finish_summary(cases, rows, out_dir, summary_path)  # also after Ctrl-C: the finished cases stay documented
    _log(totals_line(rows, total, summary_path))
    return rows
