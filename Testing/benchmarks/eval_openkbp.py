"""Real-CT accuracy: the cascade on OpenKBP validation CTs (research use only).

* Stage 1: parotid DSC, HD95 and surface DSC (2.85 mm tolerance, Nikolov et al.) per side
  against the hospital's Parotid-Lt / Parotid-Rt, on the CT's own grid.
* Stage 2, where OpenKBP has real labels, inside the ROI built from stage 1's parotid and (``ref_*``)
  from the reference parotid (``--roi-from``):
  - the predicted Mandibular ramus ∪ Condyle process against the real Mandible (recall = covered
    fraction of the in-ROI mandible, precision = fraction of the prediction that is mandible, DSC);
  - the predicted Skin against the body's outer 3 mm (body from the CT at −400 HU, holes filled per
    slice): DSC, precision, recall and surface DSC at 2 mm.

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
    ap.add_argument("--patients", nargs="+", help="only these patients (e.g. pt_219 pt_210)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--component-study", action="store_true",
                    help="run stage 1 keeping every component and compare post-processing rules "
                         "(writes eval_openkbp_components.json)")
    ap.add_argument("--step", type=float, default=None,
                    help="sliding-window step for both stages (default: cascade.DEFAULT_STEPS; 0.5 = before issue 18)")
    ap.add_argument("--roi-threshold", type=float, default=None,
                    help="stage-1 probability that seeds the ROI (default: the model's stage1.roi_threshold, 0.5)")
    ap.add_argument("--tta", action="store_true", help="left-right mirroring test-time augmentation")
    ap.add_argument("--parotid-only", action="store_true", help="stage 1 only (no mandible coverage figures)")
    ap.add_argument("--roi-from", choices=["stage1", "reference", "both"], default="both",
                    help="stage-2 measures (mandible, skin) inside the ROI from stage 1's parotid, from the "
                         "reference parotid (ref_* keys; no stage-1 figures when 'reference'), or both")
    ap.add_argument("--baseline", help="an earlier eval_openkbp JSON: paired tests per side (DSC, surface DSC, "
                                        "HD95) against it, e.g. results/eval_openkbp_1.2.0.json")
    ap.add_argument("--out", default=str(REPO / "Testing" / "benchmarks" / "results" / "eval_openkbp.json"))
    args = ap.parse_args(argv)
    from ParotidOARLib import cascade, dataset, metrics
    from ParotidOARLib.errors import EmptyStructureError

    samples = find_samples(args.data, args.split, args.patients, args.limit)
    if samples is None:
        return 0
    bundle = cascade.load_model_bundle(args.model)
    if args.component_study:
        return component_study(args, samples, bundle)
    rows = []
    sources = [] if args.parotid_only else (["stage1", "reference"] if args.roi_from == "both" else [args.roi_from])
    for s in samples:
        ct, g, masks, side = dataset.load_sample(s)
        row = {"patient": s.patient, "side": side}
        opts = cascade.SegmentOptions(side=side, model_dir=args.model, tta=args.tta, threads=args.threads or None,
                                      step=args.step, roi_threshold=args.roi_threshold)
        rind = None
        if not args.parotid_only:  # the body from the CT at -400 HU (holes filled), its outer 3 mm
            rind = skin_rind(ct, g)
        if args.roi_from != "reference" or args.parotid_only:
            t = time.perf_counter()
            try:
                res = cascade.run(ct, g, opts, bundle=bundle, parotid_only=args.parotid_only)
            except EmptyStructureError:
                row.update({"dsc": 0.0, "empty": True})
                rows.append(row)
                print(f"{s.patient} {side}: no parotid found", flush=True)
                continue
            row["seconds"] = time.perf_counter() - t
            row.update(parotid_measures(res, masks, g))
            if "stage1" in sources:
                row.update(stage2_measures(res, masks, rind, g, ""))
        if "reference" in sources:
            res = cascade.run(ct, g, opts, bundle=bundle, parotid=masks["Parotid"], parotid_source="reference")
            row.update(stage2_measures(res, masks, rind, g, "ref_"))
        rows.append(row)
        print(f"{s.patient} {side}: parotid DSC {row.get('dsc', float('nan')):.3f} "
              f"HD95 {row.get('hd95_mm', float('nan')):.1f} mm; mandible DSC {row.get('mandible_dsc')} "
              f"(reference ROI {row.get('ref_mandible_dsc')}); skin DSC {row.get('skin_dsc')} "
              f"(reference ROI {row.get('ref_skin_dsc')})", flush=True)
    s2 = [p + k for p in ("", "ref_") for k in STAGE2_KEYS]
    summary = {k: metrics.describe([r.get(k) for r in rows]) for k in
               ("dsc", "jaccard", "hd95_mm", "surface_dsc", "precision", "recall", *s2, "seconds")}
    out = {"model": bundle.manifest.model_id, "data": f"OpenKBP {args.split} (minus {', '.join(EXCLUDE)})",
           "tta": bool(args.tta), "parotid_only": bool(args.parotid_only),
           "step": {st: cascade.stage_step(cascade.SegmentOptions(side="left", step=args.step), st) for st in ("stage1", "stage2")},
           "roi_threshold": cascade.roi_threshold(cascade.SegmentOptions(side="left", roi_threshold=args.roi_threshold),
                                                  bundle.manifest),
           "n_samples": len(rows), "n_patients": len({r['patient'] for r in rows}), "summary": summary,
           "rows": rows, "surface_dsc_tolerance_mm": 2.85,
           "roi_from": args.roi_from, "skin_rind_mm": SKIN_RIND_MM, "skin_surface_dsc_tolerance_mm": 2.0,
           "note": "Mean ± SD over patient sides. Inside the ROI (from stage 1's parotid: mandible_* and skin_*; "
                   "from the reference parotid: ref_*): ramus ∪ condyle against the real Mandible (which also "
                   "holds part of the mandibular body), and Skin against the body's outer 3 mm (the body from "
                   "the CT at -400 HU, holes filled per slice; partial_labels.outer_rind). mandible_contoured_slices_*: the "
                   "same mandible measures on the axial slices where OpenKBP's Mandible is contoured at all "
                   "(it is often contoured only up to some level); mandible_pred_outside_contoured_slices_cc: "
                   "predicted ramus and condyle on the other slices."}
    if args.baseline:
        out["paired_vs_baseline"] = paired_vs_baseline(rows, args.baseline)
        for k, t in out["paired_vs_baseline"]["tests"].items():
            print(f"vs {out['paired_vs_baseline']['model']}: {k} {t['mean_a']:.4f} vs {t['mean_b']:.4f} "
                  f"({t['test']}, p = {t['p_value']:.3g}, n = {t['n']})")
    p = Path(args.out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=1, default=float))
    def _m(k):
        v = summary.get(k, {}).get("mean")
        return "n/a" if v is None else f"{v:.3f}"

    print(f"parotid DSC {_m('dsc')} ± {summary['dsc'].get('sd') or 0:.3f}, HD95 {_m('hd95_mm')} mm, "
          f"surface DSC {_m('surface_dsc')} (n={len(rows)})")
    for pre, what in (("", "stage-1 ROI"), ("ref_", "reference ROI")):
        print(f"{what}: mandible DSC {_m(pre + 'mandible_dsc')} precision {_m(pre + 'mandible_precision')} recall "
              f"{_m(pre + 'mandible_recall')} (on the Mandible's contoured slices: DSC "
              f"{_m(pre + 'mandible_contoured_slices_dsc')} precision {_m(pre + 'mandible_contoured_slices_precision')}"
              f" recall {_m(pre + 'mandible_contoured_slices_recall')}); skin vs 3 mm body rind DSC {_m(pre + 'skin_dsc')} "
              f"surface DSC (2 mm) {_m(pre + 'skin_surface_dsc')}")
    print(f"wrote {p}")
    return 0


SKIN_RIND_MM = 3.0
STAGE2_KEYS = ("mandible_recall", "mandible_precision", "mandible_dsc", "skin_dsc", "skin_surface_dsc",
               "skin_precision", "skin_recall", "mandible_contoured_slices_dsc",
               "mandible_contoured_slices_precision", "mandible_contoured_slices_recall",
               "mandible_pred_outside_contoured_slices_cc")


def find_samples(data, split: str, patients=None, limit: int = 0):
    """OpenKBP samples of ``split`` (minus ``EXCLUDE``), only ``patients`` if given, the first ``limit``
    if > 0; None (and a line saying so) when the data is not there."""
    from ParotidOARLib import dataset

    root = Path(data) / split
    if not root.is_dir():
        print(f"OpenKBP data not found at {root}; nothing to do.")
        return None
    samples, _ = dataset.discover(root, "openkbp", exclude=EXCLUDE)
    if patients:
        samples = [x for x in samples if x.patient in set(patients)]
    return samples[:limit] if limit else samples


def parotid_measures(res, masks, g) -> dict:
    """Stage 1's parotid against the hospital's, on the CT grid (surface DSC at 2.85 mm)."""
    from ParotidOARLib import labels as L, metrics

    m = metrics.compare(res.masks[L.PAROTID], masks["Parotid"], g.spacing_zyx, tolerance_mm=2.85)
    return {k: m.get(k) for k in ("dsc", "jaccard", "hd95_mm", "surface_dsc", "precision", "recall",
                                  "volume_pred_cc", "volume_ref_cc")}


def skin_rind(ct, g):
    """The reference for the skin on OpenKBP: the body's outer 3 mm (body from the CT at -400 HU, holes filled)."""
    from ParotidOARLib import partial_labels

    return partial_labels.outer_rind(partial_labels.body_from_ct(ct), g.spacing_zyx, SKIN_RIND_MM)


def stage2_measures(res, masks, rind, g, prefix: str) -> dict:
    """Inside the result's ROI: ramus ∪ condyle against the real mandible, skin against the body rind."""
    from ParotidOARLib import labels as L, metrics, partial_labels

    out = {}
    if "Mandible" in masks:
        mand = masks["Mandible"] & res.roi
        pred = (res.masks[L.RAMUS] | res.masks[L.CONDYLE]) & res.roi
        inter = float((mand & pred).sum())
        out["mandible_in_roi_cc"] = float(mand.sum()) * g.voxel_volume_cc
        out["mandible_recall"] = inter / mand.sum() if mand.any() else None
        out["mandible_precision"] = inter / pred.sum() if pred.any() else None
        out["mandible_dsc"] = 2 * inter / (mand.sum() + pred.sum()) if (mand.any() or pred.any()) else None
        # OpenKBP's Mandible is often contoured only up to some level (an OAR contoured where dose
        # matters): the same measures on the axial slices where the Mandible is contoured at all
        contoured = partial_labels.contoured_slices(masks["Mandible"])  # the training groups' definition
        m_c, p_c = mand & contoured, pred & contoured
        i_c = float((m_c & p_c).sum())
        out["mandible_pred_outside_contoured_slices_cc"] = float((pred & ~contoured).sum()) * g.voxel_volume_cc
        out["mandible_contoured_slices_precision"] = i_c / p_c.sum() if p_c.any() else None
        out["mandible_contoured_slices_recall"] = i_c / m_c.sum() if m_c.any() else None
        out["mandible_contoured_slices_dsc"] = 2 * i_c / (m_c.sum() + p_c.sum()) if (m_c.any() or p_c.any()) else None
    if rind is not None:
        ref = rind & res.roi
        pred = res.masks[L.SKIN] & res.roi
        if ref.any() or pred.any():
            m = metrics.compare(pred, ref, g.spacing_zyx, tolerance_mm=2.0)
            out.update({"skin_dsc": m.get("dsc"), "skin_surface_dsc": m.get("surface_dsc"),
                        "skin_precision": m.get("precision"), "skin_recall": m.get("recall")})
    return {prefix + k: v for k, v in out.items()}


def paired_vs_baseline(rows, baseline_path) -> dict:
    """Paired tests (``metrics.paired_test``: t-test or Wilcoxon after a normality check) of this run's
    per-side DSC, surface DSC and HD95 against an earlier run's, matched by (patient, side)."""
    from ParotidOARLib import metrics

    base = json.loads(Path(baseline_path).read_text())
    index = {(r["patient"], r["side"]): r for r in base["rows"]}
    pairs = [(r, index[(r["patient"], r["side"])]) for r in rows if (r["patient"], r["side"]) in index]
    keys = [k for k in ("dsc", "surface_dsc", "hd95_mm", "mandible_dsc", "skin_dsc", "ref_mandible_dsc", "ref_skin_dsc")
            if any(a.get(k) is not None and b.get(k) is not None for a, b in pairs)]
    tests = {k: metrics.paired_test([a.get(k) for a, _ in pairs], [b.get(k) for _, b in pairs]) for k in keys}
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
    from ParotidOARLib import cascade, dataset, labels as L, metrics, partial_labels
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
