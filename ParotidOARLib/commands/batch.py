"""``python -m ParotidOARLib batch`` — segment a folder (or CSV) of CTs, skipping finished cases.

Examples::

    python -m ParotidOARLib batch --input cts/ --out results/ --side left
    python -m ParotidOARLib batch --input phantoms/ --out results/ --side-from-json
    python -m ParotidOARLib batch --input cases.csv --out results/      # CSV: input,side[,case_id,series_uid]
    python -m ParotidOARLib batch --input cts/ --out results/ --side left --workers 4     # local Dask cluster
    python -m ParotidOARLib batch --input cts/ --out results/ --side left --scheduler tcp://head:8786

Writes OUT/<case>.seg.nrrd, OUT/<case>.report.json and OUT/batch-summary.csv.
Exit code 0 when every case is ok or skipped, 1 when any case failed.
Research use only - not for clinical use.
"""

from __future__ import annotations

import argparse
import signal


def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more (got {text!r})")
    return n


def add_arguments(p):
    p.add_argument("--input", required=True,
                   help="folder (one CT file per case, or one DICOM series / phantom case per sub-folder) or a CSV")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    side = p.add_mutually_exclusive_group()
    side.add_argument("--side", choices=["left", "right"], help="operated side for every case")
    side.add_argument("--side-from-json", action="store_true",
                      help="read each case's side from case.json (phantom folders) or <case>.json")
    p.add_argument("--model", default=None, help="model bundle folder (default: the installed default bundle)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where the networks run: auto (CUDA if available, then Apple MPS, else CPU), cpu, cuda or mps (default auto)")
    p.add_argument("--roi-margin-mm", type=float, default=17.0)
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (slower)")
    p.add_argument("--force", action="store_true", help="redo cases whose outputs already exist")
    p.add_argument("--summary", default=None, help="summary CSV path (default OUT/batch-summary.csv)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads per case (default: all usable cores; with --workers N, cores / N)")
    p.add_argument("--progress-lines", action="store_true",
                   help="print machine-readable 'PROGRESS <0-100> <case>' lines on stdout, one per finished case")
    from .segment import add_speed_arguments

    add_speed_arguments(p)
    dask = p.add_argument_group("cohort batches on Dask (pip install \"parotidoar[dask]\")")
    where = dask.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                       help="run the cases on a local Dask cluster of N worker processes (each loads the model "
                            "once; without --workers or --scheduler the cases run one after another, without Dask)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run the cases on a running Dask cluster, e.g. tcp://head:8786 (its workers need "
                            "ParotidOAR and the same paths to the inputs, model and output folder)")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(args) -> int:
    from ..batch import discover_cases, run_batch
    from ..progress import Progress

    if args.workers is not None or args.scheduler:
        from ..cohort import import_distributed

        import_distributed()  # a missing Dask: one clear line before anything is read
    cases = discover_cases(args.input, side=args.side, side_from_json=args.side_from_json)
    options = dict(model_dir=args.model, device=args.device, roi_margin_mm=args.roi_margin_mm, tta=args.tta,
                   force=args.force, summary_path=args.summary, threads=args.threads, step=args.step,
                   backend=args.backend)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    progress = Progress(lines=args.progress_lines, bar=False if getattr(args, "quiet_progress", False) else None)
    try:
        if args.workers is not None or args.scheduler:
            from ..cohort import run_cohort

            rows = run_cohort(cases, args.out, workers=args.workers, scheduler=args.scheduler, progress=progress,
                              **options)
        else:
            rows = run_batch(cases, args.out, progress=progress, **options)
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, previous)
    return 1 if any(r["status"] == "failed" for r in rows) else 0
