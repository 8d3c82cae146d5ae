"""Real-CT accuracy: the cascade on OpenKBP validation CTs (research use only).

* Stage 1: parotid DSC, HD95 and surface DSC (2.85 mm tolerance, Nikolov et al.) per side
  against the hospital's Parotid-Lt / Parotid-Rt, on the CT's own grid.
* Stage 2 (trained on phantoms only): how the predicted Mandibular ramus + Condyle process
  covers the real Mandible inside the predicted ROI (recall = covered fraction of the
  in-ROI mandible, precision = fraction of the prediction that is mandible, DSC).

Excluded: validation/pt_221 (parotid masks do not match the CT; mean HU −251/−343) and
patients without that side's parotid. OpenKBP: Babier et al. 2021, Med Phys 48:5549-5561, TCIA.

    .venv/bin/python Testing/benchmarks/eval_openkbp.py [--model DIR] [--data ../shared/data/openkbp]
Writes Testing/benchmarks/results/eval_openkbp.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

EXCLUDE = ("pt_221",)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "Resources" / "Models" / "parotid-oar-research-v1"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "openkbp"))
    ap.add_argument("--split", default="validation")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--component-study", action="store_true",
                    help="run stage 1 keeping every component and compare post-processing rules "
                         "(writes eval_openkbp_components.json)")
    ap.add_argument("--tta", action="store_true", help="left-right mirroring test-time augmentation")
    ap.add_argument("--parotid-only", action="store_true", help="stage 1 only (no mandible coverage figures)")
    ap.add_argument("--baseline", help="an earlier eval_openkbp JSON: paired tests per side (DSC, surface DSC, "
                                        "HD95) against it, e.g. results/eval_openkbp_1.2.0.json")
    ap.add_argument("--out", default=str(REPO / "Testing" / "benchmarks" / "results" / "eval_openkbp.json"))
    args = ap.parse_args(argv)
    from ParotidOARLib import cascade, dataset, labels as L, metrics
    from ParotidOARLib.errors import EmptyStructureError

    root = Path(args.data) / args.split
    if not root.is_dir():
        print(f"OpenKBP data not found at {root}; nothing to do.")
        return 0
    samples, _ = dataset.discover(root, "openkbp", exclude=EXCLUDE)
    if args.limit:
        samples = samples[:args.limit]
    bundle = cascade.load_model_bundle(args.model)
    if args.component_study:
        return component_study(args, samples, bundle)
    rows = []
    for s in samples:
        ct, g, masks, side = dataset.load_sample(s)
        t = time.perf_counter()
        row = {"patient": s.patient, "side": side}
        try:
            res = cascade.run(ct, g, cascade.SegmentOptions(side=side, model_dir=args.model, tta=args.tta,
                                                            threads=args.threads or None), bundle=bundle,
                              parotid_only=args.parotid_only)
        except EmptyStructureError:
            row.update({"dsc": 0.0, "empty": True})
            rows.append(row)
            print(f"{s.patient} {side}: no parotid found", flush=True)
            continue
        row["seconds"] = time.perf_counter() - t
        m = metrics.compare(res.masks[L.PAROTID], masks["Parotid"], g.spacing_zyx, tolerance_mm=2.85)
        row.update({k: m.get(k) for k in ("dsc", "jaccard", "hd95_mm", "surface_dsc", "precision", "recall",
                                          "volume_pred_cc", "volume_ref_cc")})
        if "Mandible" in masks and not args.parotid_only:
            mand = masks["Mandible"] & res.roi
            pred = (res.masks[L.RAMUS] | res.masks[L.CONDYLE]) & res.roi
            inter = float((mand & pred).sum())
            row["mandible_in_roi_cc"] = float(mand.sum()) * g.voxel_volume_cc
            row["mandible_recall"] = inter / mand.sum() if mand.any() else None
            row["mandible_precision"] = inter / pred.sum() if pred.any() else None
            row["mandible_dsc"] = 2 * inter / (mand.sum() + pred.sum()) if (mand.any() or pred.any()) else None
        rows.append(row)
        print(f"{s.patient} {side}: parotid DSC {row['dsc']:.3f} HD95 {row['hd95_mm']:.1f} mm "
              f"sDSC {row['surface_dsc']:.3f}; mandible recall {row.get('mandible_recall')}", flush=True)
    summary = {k: metrics.describe([r.get(k) for r in rows]) for k in
               ("dsc", "jaccard", "hd95_mm", "surface_dsc", "precision", "recall", "mandible_recall",
                "mandible_precision", "mandible_dsc", "seconds")}
    out = {"model": bundle.manifest.model_id, "data": f"OpenKBP {args.split} (minus {', '.join(EXCLUDE)})",
           "tta": bool(args.tta), "parotid_only": bool(args.parotid_only),
           "n_samples": len(rows), "n_patients": len({r['patient'] for r in rows}), "summary": summary,
           "rows": rows, "surface_dsc_tolerance_mm": 2.85,
           "note": "Mean ± SD over patient sides. Stage 2 was trained on phantoms only; ramus + condyle is "
                   "compared with the whole in-ROI mandible (which also holds part of the mandibular body)."}
    if args.baseline:
        out["paired_vs_baseline"] = paired_vs_baseline(rows, args.baseline)
        for k, t in out["paired_vs_baseline"]["tests"].items():
            print(f"vs {out['paired_vs_baseline']['model']}: {k} {t['mean_a']:.4f} vs {t['mean_b']:.4f} "
                  f"({t['test']}, p = {t['p_value']:.3g}, n = {t['n']})")
    p = Path(args.out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=1, default=float))
    print(f"parotid DSC {summary['dsc']['mean']:.3f} ± {summary['dsc']['sd']:.3f}, HD95 {summary['hd95_mm']['mean']:.1f} mm, "
          f"surface DSC {summary['surface_dsc']['mean']:.3f} (n={len(rows)}); mandible recall "
          f"{summary['mandible_recall']['mean']:.3f}, precision {summary['mandible_precision']['mean']:.3f}")
    print(f"wrote {p}")
    return 0


def paired_vs_baseline(rows, baseline_path) -> dict:
    """Paired tests (``metrics.paired_test``: t-test or Wilcoxon after a normality check) of this run's
    per-side DSC, surface DSC and HD95 against an earlier run's, matched by (patient, side)."""
    from ParotidOARLib import metrics

    base = json.loads(Path(baseline_path).read_text())
    index = {(r["patient"], r["side"]): r for r in base["rows"]}
    pairs = [(r, index[(r["patient"], r["side"])]) for r in rows if (r["patient"], r["side"]) in index]
    tests = {k: metrics.paired_test([a.get(k) for a, _ in pairs], [b.get(k) for _, b in pairs])
             for k in ("dsc", "surface_dsc", "hd95_mm")}
    better = sum(1 for a, b in pairs if (a.get("dsc") or 0) > (b.get("dsc") or 0))
    return {"model": base.get("model"), "file": Path(baseline_path).name, "n_pairs": len(pairs),
            "sides_with_higher_dsc": better, "tests": tests}


# (min_cc, max_gap_mm) rules compared by --component-study; the shipped default is one of them
RULES = {"all components": (0.0, float("inf")), "largest only": (float("inf"), float("inf")),
         "largest + >=2 cc (v1 default)": (2.0, float("inf")),
         "largest + any within 5 mm": (0.0, 5.0), "largest + any within 10 mm": (0.0, 10.0),
         "largest + any within 20 mm": (0.0, 20.0), "largest + >=0.5 cc within 10 mm": (0.5, 10.0)}


def component_study(args, samples, bundle):
    """Stage-1 post-processing chosen on OpenKBP validation: every rule applied to the same
    all-components parotid (on the CT grid), scored against the hospital contour."""
    from ParotidOARLib import cascade, dataset, labels as L, metrics
    from ParotidOARLib.errors import EmptyStructureError

    rows = []
    for s in samples:
        ct, g, masks, side = dataset.load_sample(s)
        opts = cascade.SegmentOptions(side=side, model_dir=args.model, threads=args.threads or None,
                                      min_component_cc=0.0, max_component_gap_mm=float("inf"))
        row = {"patient": s.patient, "side": side}
        try:
            res = cascade.run(ct, g, opts, bundle=bundle, parotid_only=True)
        except EmptyStructureError:
            rows.append({**row, **{r: {"dsc": 0.0} for r in RULES}})
            continue
        for rule, (min_cc, gap) in RULES.items():
            m = cascade.keep_components(res.masks[L.PAROTID], g.spacing_zyx, min_cc, gap)
            c = metrics.compare(m, masks["Parotid"], g.spacing_zyx, tolerance_mm=2.85)
            row[rule] = {k: c.get(k) for k in ("dsc", "hd95_mm", "surface_dsc", "precision", "recall")}
        rows.append(row)
        print(s.patient, side, " ".join(f"{row[r]['dsc']:.3f}" for r in RULES), flush=True)
    summary = {r: {k: metrics.describe([row[r].get(k) for row in rows]) for k in
                   ("dsc", "hd95_mm", "surface_dsc", "precision", "recall")} for r in RULES}
    out = {"model": bundle.manifest.model_id, "data": f"OpenKBP {args.split} (minus {', '.join(EXCLUDE)})",
           "n_samples": len(rows), "rules": {r: list(v) for r, v in RULES.items()}, "summary": summary,
           "rows": rows}
    p = Path(args.out).with_name("eval_openkbp_components.json")
    p.write_text(json.dumps(out, indent=1, default=float))
    for r in RULES:
        d, h = summary[r]["dsc"], summary[r]["hd95_mm"]
        print(f"{r:34s} DSC {d['mean']:.3f} ± {d['sd']:.3f}  HD95 median {h['median']:.1f} mm")
    print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
