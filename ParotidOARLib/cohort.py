"""Cohort batches on Dask: ``batch --workers N`` (a local cluster) or ``batch --scheduler ADDRESS``.

The same cases, claims, retry-once, failure records and summary CSV as the sequential
:func:`batch.run_batch`: every case runs :func:`batch.process_case` on a Dask worker, and the
caller rebuilds the summary with :func:`batch.finish_summary`. Only the scheduling differs:

* ``workers=N`` — a ``distributed.LocalCluster`` of N worker processes, one Dask thread each,
  torch using ``max(1, cores // N)`` threads per case (or ``threads``);
* ``scheduler="tcp://host:8786"`` — ``distributed.Client`` joins a running cluster (started by
  ``dask scheduler`` / ``dask worker`` or by ``dask-jobqueue`` on Slurm, PBS or SGE). Its workers
  need ParotidOAR installed and must see the inputs, the model and the output folder at the same
  paths. Torch uses ``threads``, else the worker host's cores divided by the Dask threads that host runs.

Each worker process loads and verifies the model once (:func:`worker_bundle`, a module-level
cache keyed by the bundle folder), not once per case. Dask is imported here, when a cohort batch
starts, never by the sequential path.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from . import batch, labels
from .errors import DependencyError, InputError

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "parotidoar[dask]" (in a source checkout: pip install ".[dask]")'

#: per worker process: bundle key -> (ModelBundle, seconds its load and verification took)
_BUNDLES: dict = {}
_BUNDLES_LOCK = threading.Lock()


def import_distributed():
    """``distributed``, or a :class:`DependencyError` saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise DependencyError(f"batch --workers / --scheduler needs Dask, which is not installed: "
                              f"{INSTALL_HINT}.") from None
    return distributed


def worker_bundle(model_dir=None):
    """The model bundle for this process, loaded and verified on first use; ``(bundle, load_s)`` where
    ``load_s`` is the load + verify time when this call loaded it, else 0."""
    from . import bundle as bundle_mod
    from . import cascade

    directory = bundle_mod.resolve_bundle_dir(model_dir)
    manifest = directory / "manifest.json"
    key = (str(directory.resolve()), manifest.stat().st_mtime_ns if manifest.exists() else 0)
    with _BUNDLES_LOCK:
        if key in _BUNDLES:
            return _BUNDLES[key][0], 0.0
        t0 = time.perf_counter()
        loaded = cascade.load_model_bundle(directory)
        seconds = time.perf_counter() - t0
        _BUNDLES[key] = (loaded, seconds)
        logger.info("model %s loaded and verified in %.1f s (pid %d)", loaded.manifest.model_id, seconds, os.getpid())
        return loaded, seconds


def _host(address: str) -> str:
    return address.split("://")[-1].rsplit(":", 1)[0]


def _threads_here(settings: dict) -> int | None:
    """Torch threads per case on this worker: ``settings['threads']``, else this host's usable cores shared
    among the Dask threads it runs."""
    if settings.get("threads"):
        return settings["threads"]
    from .inference import cpu_count

    try:
        from distributed import get_worker

        worker = get_worker()
        slots = settings.get("host_slots", {}).get(_host(worker.address)) or worker.state.nthreads
    except (ImportError, ValueError, AttributeError):
        slots = 1
    return max(1, cpu_count() // max(1, int(slots)))


def run_case(case: batch.BatchCase, out_dir: str, settings: dict, first: bool) -> dict:
    """One case on a Dask worker (:func:`batch.process_case` with this worker's cached model)."""
    from . import cascade

    notes, load_s = [], []
    threads = _threads_here(settings)

    def _segment(case, seg_path, report_path, first):
        bundle, seconds = worker_bundle(settings["model_dir"])
        if seconds:
            load_s.append(seconds)
        options = cascade.SegmentOptions(side=case.side, model_dir=settings["model_dir"], device=settings["device"],
                                         roi_margin_mm=settings["roi_margin_mm"], tta=settings["tta"],
                                         force=settings["force"], series_uid=case.series_uid, threads=threads,
                                         step=settings.get("step"),
                                         backend=settings.get("backend", "torch"))
        return cascade.segment(case.input, seg_path, options, report_path=report_path, warn=first, bundle=bundle)

    row, outcome = batch.process_case(case, out_dir, _segment, force=settings["force"], first=first,
                                      note=notes.append)
    return {"row": row, "outcome": outcome, "notes": notes, "model_load_s": sum(load_s),
            "worker": f"{socket.gethostname()} {os.getpid()}", "threads": threads}


def run_cohort(cases: list[batch.BatchCase], out_dir, *, workers: int | None = None, scheduler: str | None = None,
               threads: int | None = None, model_dir=None, device: str = "auto",
               roi_margin_mm: float = labels.ROI_MARGIN_MM_DEFAULT, tta: bool = False, force: bool = False,
               summary_path=None, log=print, progress=None, step: float | None = None,
               backend: str = "torch") -> list[dict]:
    """Segment every case on Dask (``workers`` local processes, or the cluster at ``scheduler``); returns the
    summary rows in case order (also written to ``summary_path``), as :func:`batch.run_batch` does."""
    from . import bundle as bundle_mod
    from .inference import check_threads, cpu_count

    if (workers is None) == (scheduler is None):
        raise InputError("Give either --workers N (a local Dask cluster) or --scheduler ADDRESS, not both.")
    if workers is not None and (int(workers) != workers or workers < 1):
        raise InputError(f"--workers must be 1 or more, got {workers!r}.")
    check_threads(threads)
    distributed = import_distributed()
    out_dir, summary_path = batch.prepare_output(out_dir, summary_path)
    model_dir = str(bundle_mod.resolve_bundle_dir(model_dir))  # a wrong --model fails here, not once per case
    _log = batch.make_logger(log, progress)
    total = len(cases)
    cluster = None
    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise InputError(f"Cannot reach the Dask scheduler at {scheduler}: {exc}. Is it running "
                             "(dask scheduler; dask worker ADDRESS)?") from None
        info = client.scheduler_info()["workers"].values()
        host_slots: dict = {}
        for w in info:
            host_slots[_host(w["host"])] = host_slots.get(_host(w["host"]), 0) + int(w.get("nthreads", 1))
        where = f"the Dask cluster at {scheduler} ({len(info)} workers)"
    else:
        threads = threads or max(1, cpu_count() // workers)
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.ERROR)
        client = distributed.Client(cluster)
        host_slots = {}
        where = f"a local Dask cluster of {workers} worker processes"
    settings = {"model_dir": model_dir, "device": device, "roi_margin_mm": roi_margin_mm, "tta": tta,
                "force": force, "threads": threads, "host_slots": host_slots, "step": step, "backend": backend}
    _log(f"batch: {total} cases on {where}; torch threads per case: "
         f"{threads if threads else 'the host cores / its Dask threads'}")
    rows: list[dict | None] = [None] * total
    loads: list[float] = []
    t0 = time.perf_counter()
    token = uuid.uuid4().hex[:8]
    futures = {}
    try:
        for i, case in enumerate(cases):
            fut = client.submit(run_case, case, str(out_dir), settings, i == 0, pure=False,
                                key=f"parotidoar-{token}-{i}")
            futures[fut] = i
        for done, fut in enumerate(distributed.as_completed(futures), start=1):
            i = futures[fut]
            case = cases[i]
            elapsed = time.perf_counter() - t0
            left = f", ~{elapsed / done * (total - done):.0f} s left" if done < total else ""
            prefix = f"[{done}/{total}{left}] {case.case_id}"
            try:
                result = fut.result()
            except Exception as exc:  # the worker died (KilledWorker), or a bug: the batch goes on
                error = f"{type(exc).__name__}: {exc}"
                batch._record_failure(out_dir, case, error)
                result = {"row": batch.summary_row(case, "failed", error), "outcome": f"FAILED: {error}",
                          "notes": [], "model_load_s": 0.0}
            for text in result["notes"]:
                _log(f"{prefix}: {text}", logging.WARNING)
            rows[i] = result["row"]
            if result["model_load_s"]:
                loads.append(result["model_load_s"])
            _log(f"{prefix}: {result['outcome']}",
                 logging.WARNING if rows[i]["status"] == "failed" else logging.INFO)
            if progress is not None:
                progress.advance(done, total, case.case_id)
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    finally:
        finished = [(c, r) for c, r in zip(cases, rows) if r is not None]
        batch.finish_summary([c for c, _ in finished], [r for _, r in finished], out_dir, summary_path)
        client.close()
        if cluster is not None:
            cluster.close()
    rows = [r for r in rows if r is not None]
    if loads:
        _log(f"dask: model loaded and verified {len(loads)} times (once per worker process), "
             f"{sum(loads) / len(loads):.3f} s each")
    _log(batch.totals_line(rows, total, summary_path))
    return rows
