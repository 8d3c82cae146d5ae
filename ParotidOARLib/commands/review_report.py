"""``review-report LOG…``: per-structure review summary (the paper's Table 2).

Each LOG is a review log folder, a ``review-log.csv`` or a ``review-log.jsonl``.
Only the latest record per (case, segmentation, segment, reviewer) counts.
Prints per structure and reviewer: mean score, % acceptable (score ≥ 2) and
the 0–3 distribution; optional JSON, CSV and PNG chart. Corrupt log lines are
reported as warnings and skipped.
"""

from __future__ import annotations


from ..errors import ReviewError


def add_arguments(parser):
    parser.add_argument("logs", nargs="+", metavar="LOG", help="review log folder(s) or .csv/.jsonl file(s)")
    parser.add_argument("--source", help="only records whose true source is this (e.g. automatic)")
    parser.add_argument("--case", help="only this case id")
    parser.add_argument("--json", help="output JSON summary")
    parser.add_argument("--csv", help="output CSV (one row per structure and reviewer)")
    parser.add_argument("--png", help="output PNG chart of the score distribution per structure")
    parser.add_argument("--force", action="store_true", help="replace existing output files")


def run(args) -> int:
    from .. import metrics, review
    from ..imageio import check_outputs

    check_outputs([args.json, args.csv, args.png], args.force)  # before any work
    records, warnings = review.read_logs(args.logs)
    for w in warnings:
        print(f"warning: {w}")
    if not records:
        raise ReviewError("The review log(s) hold no valid records.")
    summary = review.summarise(records, source=args.source, case_id=args.case)
    summary["logs"] = [str(p) for p in args.logs]
    summary["warnings"] = warnings
    if not summary["segments"]:
        raise ReviewError("No records match the --source/--case filter.")
    print(review.format_summary(summary))
    o = summary["overall"]
    print(f"overall: {o['n']} latest scores, mean {o['mean_score']:.2f}, {o['acceptable_pct']:.1f}% acceptable "
          f"(score >= {review.ACCEPTABLE_MIN_SCORE}); {summary['cases']} case(s), "
          f"reviewers: {', '.join(summary['reviewers'])}")
    if args.json:
        metrics.write_json(args.json, summary, force=args.force)
    if args.csv:
        metrics.write_csv(args.csv, review.summary_rows(summary), review.SUMMARY_CSV_FIELDS, force=args.force)
    if args.png:
        review.plot_summary(summary, args.png, force=args.force)
    return 0
