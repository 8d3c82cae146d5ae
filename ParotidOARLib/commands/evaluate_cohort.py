"""``evaluate-cohort DIR|CSV``: per-case metrics and mean ± SD per structure (the paper's Table 1).

Inputs:

* **DIR** — one sub-folder per case, each holding the prediction
  (``--pred-file``, default ``pred.seg.nrrd``) and the reference
  (``--ref-file``, default ``reference.seg.nrrd``); with ``--compare-pred2 FILE``
  a second method's prediction in the same folders is compared with the first.
  Folders lacking a file are skipped and listed.
* **CSV** — columns ``case,pred,ref`` and optionally ``method``; relative
  paths are relative to the CSV's folder. Several rows per case are allowed
  (for example one binary mask per organ).

With two methods a paired test per structure and metric is run (paired
t-test when a Kolmogorov–Smirnov check does not reject normality of the
differences, else Wilcoxon signed-rank). Output: JSON (``--json``), per-case
CSV (``--csv``), summary CSV (``--summary-csv``) and a printed table. Exit
status 1 when some cases could not be evaluated (they are listed).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..errors import InputError, ParotidOARError

TABLE_METRICS = (("dsc", "DSC", 3), ("jaccard", "Jaccard", 3), ("hd95_mm", "HD95 mm", 2),
                 ("precision", "Precision", 3), ("recall", "Recall", 3), ("surface_dsc", "Surface DSC", 3))


def add_arguments(parser):
    parser.add_argument("source", help="cohort folder (one sub-folder per case) or CSV (case,pred,ref[,method])")
    parser.add_argument("--pred-file", default="pred.seg.nrrd", help="prediction file name in each case folder")
    parser.add_argument("--ref-file", default="reference.seg.nrrd", help="reference file name in each case folder")
    parser.add_argument("--compare-pred2", metavar="FILE",
                        help="second method's prediction file name in each case folder (paired comparison)")
    parser.add_argument("--method-names", nargs=2, metavar=("A", "B"), default=None,
                        help="names of the two methods in DIR mode (default: the file stems)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="methods to compare in CSV mode (default: the two methods if exactly two)")
    parser.add_argument("--segments", nargs="+", metavar="NAME", help="segments to compare (default: all common)")
    parser.add_argument("--name-map", help="label value → name for label-map inputs (JSON file or inline JSON)")
    parser.add_argument("--tolerance-mm", nargs="+", metavar="NAME=MM", default=[],
                        help="surface-DSC tolerance per segment (NAME=MM) or for all (MM)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    parser.add_argument("--json", help="output JSON (per-case rows, summary, comparison)")
    parser.add_argument("--csv", help="output per-case CSV")
    parser.add_argument("--summary-csv", help="output summary CSV (mean, SD per method, segment, metric)")
    parser.add_argument("--force", action="store_true", help="replace existing output files")


def _stem(name: str) -> str:
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def collect_jobs(source, pred_file="pred.seg.nrrd", ref_file="reference.seg.nrrd", pred2_file=None,
                 method_names=None) -> tuple[list[dict], list[str]]:
    """Jobs ``{"case", "method", "pred", "ref"}`` from a cohort folder or CSV, plus notes on skipped cases."""
    source = Path(source)
    notes = []
    jobs = []
    if not source.exists():
        raise InputError(f"Cohort source not found: {source}. Give a folder or a CSV file.")
    if source.is_dir():
        names = method_names or ([_stem(pred_file), _stem(pred2_file)] if pred2_file else [""])
        if pred2_file and names[0] == names[1]:
            raise InputError("The two methods need different names; use --method-names A B.")
        files = [pred_file] + ([pred2_file] if pred2_file else [])
        for case_dir in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
            ref = case_dir / ref_file
            if not ref.exists():
                notes.append(f"{case_dir.name}: no {ref_file}; skipped.")
                continue
            for method, f in zip(names, files):
                pred = case_dir / f
                if not pred.exists():
                    notes.append(f"{case_dir.name}: no {f}; skipped for method {method or 'pred'}.")
                    continue
                jobs.append({"case": case_dir.name, "method": method, "pred": pred, "ref": ref})
        if not jobs:
            raise InputError(f"No case folder in {source} holds both {pred_file} and {ref_file}.")
        return jobs, notes
    with open(source, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("case", "pred", "ref") if c not in cols]
        if missing:
            raise InputError(f"{source} lacks column(s) {', '.join(missing)}; the header must be case,pred,ref"
                             "[,method].")
        for lineno, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row.get("case"):
                notes.append(f"{source.name}:{lineno}: empty case; row skipped.")
                continue
            pred = Path(row["pred"])
            ref = Path(row["ref"])
            pred = pred if pred.is_absolute() else source.parent / pred
            ref = ref if ref.is_absolute() else source.parent / ref
            jobs.append({"case": row["case"], "method": row.get("method", ""), "pred": pred, "ref": ref})
    if not jobs:
        raise InputError(f"{source} lists no cases.")
    return jobs, notes


def evaluate_cohort(jobs, segments=None, name_map=None, tolerances=None, compare=None, alpha=0.05) -> dict:
    from .. import metrics
    from .evaluate import evaluate

    rows, notes, errors = [], [], []
    for job in jobs:
        try:
            res = evaluate(job["pred"], job["ref"], segments=segments, name_map=name_map, tolerances=tolerances)
        except ParotidOARError as exc:
            errors.append(f"{job['case']} ({job['method'] or 'pred'}): {exc}")
            continue
        notes.extend(f"{job['case']}: {n}" for n in res["notes"])
        for r in metrics.cohort_rows(job["case"], res, job["method"]):
            r["pred"], r["ref"] = str(job["pred"]), str(job["ref"])
            rows.append(r)
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    out = {"cases": rows, "summary": metrics.summarise_cohort(rows), "methods": methods, "notes": notes,
           "errors": errors, "n_cases": len({r["case"] for r in rows})}
    if compare is None and len(methods) == 2:
        compare = methods
    if compare:
        a, b = compare
        for m in (a, b):
            if m not in methods:
                raise InputError(f"Method {m!r} is not in the cohort (methods: {', '.join(methods) or 'none'}).")
        out["comparison"] = metrics.compare_methods(rows, a, b, alpha=alpha)
    return out


def _fmt(st, p):
    if st["n"] == 0 or not math.isfinite(st["mean"]):
        return "n/a"
    sd = st["sd"]
    return f"{st['mean']:.{p}f} ± {sd:.{p}f}" if math.isfinite(sd) else f"{st['mean']:.{p}f}"


def format_cohort_table(result: dict) -> str:
    lines = []
    for method, m in result["summary"]["methods"].items():
        lines.append(f"Method: {method or 'pred'}  ({m['n_cases']} cases; mean ± SD)")
        names = list(m["segments"])
        w0 = max([9] + [len(n) for n in names])
        lines.append("Structure".ljust(w0) + "".join(f"  {h:>16}" for _, h, _ in TABLE_METRICS))
        for n in names:
            lines.append(n.ljust(w0) + "".join(f"  {_fmt(m['segments'][n][k], p):>16}"
                                               for k, _, p in TABLE_METRICS))
        lines.append("")
    comp = result.get("comparison")
    if comp:
        lines.append(f"Paired comparison {comp['method_a']} vs {comp['method_b']} (p-values; test)")
        for seg, mets in comp["segments"].items():
            cells = []
            for k, h, _ in TABLE_METRICS:
                t = mets[k]
                cells.append(f"{h}: " + (f"p={t['p_value']:.3g} ({'t' if t['test'] == 'paired t-test' else 'W'})"
                                         if t["test"] else "n/a"))
            lines.append(f"  {seg}: " + "; ".join(cells))
    return "\n".join(lines)


SUMMARY_FIELDS = ("method", "segment", "metric", "n", "mean", "sd", "median", "min", "max")


def summary_rows(result: dict) -> list[dict]:
    rows = []
    for method, m in result["summary"]["methods"].items():
        for seg, mets in m["segments"].items():
            for metric, st in mets.items():
                rows.append({"method": method, "segment": seg, "metric": metric, **st})
    return rows


def run(args) -> int:
    from .. import metrics
    from ..imageio import check_outputs
    from .evaluate import parse_name_map

    check_outputs([args.json, args.csv, args.summary_csv], args.force)  # before any work
    jobs, notes = collect_jobs(args.source, args.pred_file, args.ref_file, args.compare_pred2, args.method_names)
    result = evaluate_cohort(jobs, segments=args.segments, name_map=parse_name_map(args.name_map),
                             tolerances=metrics.parse_tolerance_args(args.tolerance_mm), compare=args.compare,
                             alpha=args.alpha)
    result["notes"] = notes + result["notes"]
    if args.json:
        metrics.write_json(args.json, result, force=args.force)
    if args.csv:
        fields = ("case", "method", "segment") + metrics.METRIC_KEYS + metrics.EXTRA_KEYS + ("flags", "pred", "ref")
        metrics.write_csv(args.csv, result["cases"], fields, force=args.force)
    if args.summary_csv:
        metrics.write_csv(args.summary_csv, summary_rows(result), SUMMARY_FIELDS, force=args.force)
    print(format_cohort_table(result))
    for n in result["notes"]:
        print(f"note: {n}")
    if result["errors"]:
        for e in result["errors"]:
            print(f"error: {e}")
        print(f"error: {len(result['errors'])} evaluation(s) failed; the others were written.")
        return 1
    return 0
