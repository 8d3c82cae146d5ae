"""Phantom accuracy of a model bundle: the cascade on held-out phantom cases vs reference.seg.nrrd.

Held-out seeds: 0..19 at the default spacing 0.98×0.98×2 mm (training uses seeds ≥ 100000,
validation 200000+, so these are never trained on). Also: other spacings (0.6×0.6×1.25 and
1.0×1.0×3.0 mm) and stronger poses (±20° instead of the phantom's ±10°), seeds 20.. .
The reference is the phantom's ``labels`` (OARs clipped to the reference ROI, as the paper's
manual contours were); the prediction is the cascade's output (clipped to its own ROI).

    .venv/bin/python Testing/benchmarks/eval_phantom.py [--model DIR] [--cases 20] [--extra 5]

Writes Testing/benchmarks/results/eval_phantom.json (per-case rows + mean ± SD per structure).
Generated cases are cached in runs/eval-phantoms/ (git-ignored). Research use only.
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

from ParotidOARLib import labels as L  # noqa: E402
from ParotidOARLib.imageio import Geometry  # noqa: E402

TARGETS = {L.PAROTID: 0.87, L.AURICULA: 0.88, L.CONDYLE: 0.91, L.SKIN: 0.75, L.MASTOID: 0.89, L.EAC: 0.74,
           L.RAMUS: 0.93}
CACHE = REPO / "runs" / "eval-phantoms"
DEFAULT_SPACING = (0.98, 0.98, 2.0)


def case_sets(n_default: int, n_extra: int, first_seed: int = 0):
    sets = [("default 0.98x0.98x2.0 mm", [(s, DEFAULT_SPACING, None) for s in range(first_seed, first_seed + n_default)])]
    if n_extra:
        base = 20
        sets.append(("spacing 0.6x0.6x1.25 mm", [(base + i, (0.6, 0.6, 1.25), None) for i in range(n_extra)]))
        sets.append(("spacing 1.0x1.0x3.0 mm", [(base + 100 + i, (1.0, 1.0, 3.0), None) for i in range(n_extra)]))
        rng = np.random.default_rng(7)
        sets.append(("pose +-20 deg", [(base + 200 + i, DEFAULT_SPACING,
                                        [float(v) for v in rng.uniform(-20, 20, 3)]) for i in range(n_extra)]))
    return sets


def load_case(seed, spacing, pose):
    """→ dict(ct, geometry, labels (clipped), roi, side, labels_full)."""
    from ParotidOARLib import phantom

    tag = f"seed{seed}_{'x'.join(f'{v:g}' for v in spacing)}" + ("" if pose is None else "_pose" +
                                                               "_".join(f"{v:.1f}" for v in pose))
    if phantom.GENERATOR_VERSION != "1":  # a cache made by another phantom version is never reused
        tag += f"_g{phantom.GENERATOR_VERSION}"
    p = CACHE / f"{tag}.npz"
    if p.exists():
        with np.load(p) as z:
            d = {k: z[k] for k in z.files}
        meta = json.loads(str(d.pop("meta")))
        labels_c = {n: d[f"L_{i}"] for i, n in enumerate(L.STRUCTURES)}
        labels_f = {n: d[f"F_{i}"] for i, n in enumerate(L.STRUCTURES)}
        return {"ct": d["ct"], "geometry": Geometry.from_dict(meta["geometry"]), "labels": labels_c,
                "labels_full": labels_f, "roi": d["roi"], "side": meta["side"], "tag": tag}
    kw = {} if pose is None else {"pose_deg": pose}
    c = phantom.generate_case(seed, side="random", spacing=spacing, size="full", **kw)
    CACHE.mkdir(parents=True, exist_ok=True)
    arrays = {"ct": c.ct, "roi": c.roi}
    for i, n in enumerate(L.STRUCTURES):
        arrays[f"L_{i}"] = c.labels[n]
        arrays[f"F_{i}"] = c.labels_full[n]
    tmp = p.with_name(p.name + ".tmp.npz")
    np.savez_compressed(tmp, meta=np.array(json.dumps({"geometry": c.geometry.to_dict(), "side": c.side})), **arrays)
    tmp.replace(p)
    return {"ct": c.ct, "geometry": c.geometry, "labels": c.labels, "labels_full": c.labels_full, "roi": c.roi,
            "side": c.side, "tag": tag}


def compare_case(pred: dict, c: dict, seed) -> list[dict]:
    """One row per structure: ``pred`` (``{name: bool mask}``) against the case's reference labels."""
    from ParotidOARLib import metrics

    cmp = metrics.compare_segmentations(pred, c["labels"], c["geometry"], names=list(L.STRUCTURES))
    return [{"case": f"seed{seed}", "seed": seed, "side": c["side"], "segment": name,
             **{k: m.get(k) for k in ("dsc", "jaccard", "hd95_mm", "surface_dsc", "precision", "recall",
                                      "volume_pred_cc", "volume_ref_cc", "tolerance_mm")}}
            for name, m in cmp["segments"].items()]


def summarise(rows):
    from ParotidOARLib import metrics

    out = {}
    for name in L.STRUCTURES:
        r = [x for x in rows if x["segment"] == name]
        out[name] = {m: metrics.describe([x.get(m) for x in r]) for m in
                     ("dsc", "jaccard", "hd95_mm", "surface_dsc", "precision", "recall")}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "Resources" / "Models" / "parotid-oar-research-v1"))
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--extra", type=int, default=5, help="cases per extra spacing / pose set")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reference-parotid", action="store_true",
                    help="stage 2 alone: build the ROI from the reference parotid instead of stage 1 "
                         "(shows how much of the OAR error comes from stage 1)")
    ap.add_argument("--step", type=float, default=None,
                    help="sliding-window step for both stages (default: cascade.DEFAULT_STEPS; 0.5 = before issue 18)")
    ap.add_argument("--roi-threshold", type=float, default=None,
                    help="stage-1 probability that seeds the ROI (default: the model's stage1.roi_threshold, 0.5)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="first seed of the default-spacing set: 0 = the held-out test phantoms; 200000 = the "
                         "training's validation phantoms, for choosing settings without touching seeds 0-19")
    ap.add_argument("--tta", action="store_true", help="left-right mirroring test-time augmentation")
    ap.add_argument("--generate-only", action="store_true", help="only fill the case cache")
    ap.add_argument("--out", default=str(REPO / "Testing" / "benchmarks" / "results" / "eval_phantom.json"))
    args = ap.parse_args(argv)
    from ParotidOARLib import cascade
    from ParotidOARLib.errors import EmptyStructureError

    sets = case_sets(args.cases, args.extra, args.first_seed)
    if args.generate_only:
        for _, cases in sets:
            for seed, sp, pose in cases:
                t = time.time()
                load_case(seed, sp, pose)
                print(f"case seed {seed} {sp} ready ({time.time() - t:.1f} s)", flush=True)
        return 0
    bundle = cascade.load_model_bundle(args.model)
    result = {"model": bundle.manifest.model_id, "model_dir": str(args.model), "targets_dsc": TARGETS,
              "reference": "phantom labels clipped to the reference ROI (reference.seg.nrrd)",
              "held_out_seeds": "0..19 default spacing; 20.. extra sets; training seeds >= 100000",
              "default_set_seeds": [args.first_seed, args.first_seed + args.cases - 1],
              "roi_threshold": cascade.roi_threshold(cascade.SegmentOptions(side="left", roi_threshold=args.roi_threshold),
                                                     bundle.manifest),
              "parotid": "reference (stage 2 alone)" if args.reference_parotid else "stage 1", "tta": bool(args.tta),
              "step": {st: cascade.stage_step(cascade.SegmentOptions(side="left", step=args.step), st) for st in ("stage1", "stage2")},
              "sets": {}}
    for set_name, cases in sets:
        rows, times, failures = [], [], []
        for seed, sp, pose in cases:
            c = load_case(seed, sp, pose)
            t = time.perf_counter()
            try:
                opts = cascade.SegmentOptions(side=c["side"], model_dir=args.model, tta=args.tta, step=args.step,
                                              threads=args.threads or None, roi_threshold=args.roi_threshold)
                res = cascade.run(c["ct"], c["geometry"], opts, bundle=bundle,
                                  parotid=c["labels_full"][L.PAROTID] if args.reference_parotid else None,
                                  parotid_source="reference" if args.reference_parotid else None)
                pred = res.masks
            except EmptyStructureError as exc:
                failures.append({"seed": seed, "error": str(exc)})
                pred = {n: np.zeros(c["ct"].shape, bool) for n in L.STRUCTURES}
            times.append(time.perf_counter() - t)
            case_rows = compare_case(pred, c, seed)
            rows += case_rows
            d = {r["segment"]: round(r["dsc"], 3) for r in case_rows}
            print(f"[{set_name}] seed {seed} ({c['side']}) {times[-1]:.1f} s  DSC {d}", flush=True)
        summ = summarise(rows)
        result["sets"][set_name] = {"n_cases": len(cases), "failures": failures, "seconds_per_case_mean":
                                    float(np.mean(times)), "summary": summ, "rows": rows}
        print(f"== {set_name}: mean DSC " + ", ".join(f"{n} {summ[n]['dsc']['mean']:.3f}" for n in L.STRUCTURES))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
