"""``python -m ParotidOARLib batch`` — segment a folder (or CSV) of CTs, skipping finished cases.

Examples::

    python -m ParotidOARLib batch --input cts/ --out results/ --side left
    python -m ParotidOARLib batch --input phantoms/ --out results/ --side-from-json
    python -m ParotidOARLib batch --input cases.csv --out results/      # CSV: input,side[,case_id,series_uid]

Writes OUT/<case>.seg.nrrd, OUT/<case>.report.json and OUT/batch-summary.csv.
Exit code 0 when every case is ok or skipped, 1 when any case failed.
Research use only - not for clinical use.
"""

from __future__ import annotations


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


def run(args) -> int:
    from ..batch import discover_cases, run_batch

    cases = discover_cases(args.input, side=args.side, side_from_json=args.side_from_json)
    rows = run_batch(cases, args.out, model_dir=args.model, device=args.device, roi_margin_mm=args.roi_margin_mm,
                     tta=args.tta, force=args.force, summary_path=args.summary)
    return 1 if any(r["status"] == "failed" for r in rows) else 0
