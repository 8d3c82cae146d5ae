"""Ablation (the paper's Table 1 claim): two-step cascade vs a one-step network.

One-step = a single network for the six OARs on the whole side-cropped CT (cut to the body's
bounding box), same architecture, spacing (1×1×2 mm), patch, recipe and iteration budget as
stage 2 of the cascade, trained on the same phantoms::

    python -m ParotidOARLib train --one-step --phantom-cases 60 --work-dir runs/shipped \\
        --epochs 24 --iterations-per-epoch 50 --threads 1

Both are evaluated on the same held-out phantoms (seeds 0..19, 0.98×0.98×2 mm) against the
reference OARs clipped to the reference ROI. The cascade's rows come from
``results/eval_phantom.json`` (run eval_phantom.py first). The one-step prediction is clipped
to the *reference* ROI (an oracle ROI — this favours the one-step model; without an ROI it
would also be penalised for every voxel outside it).

Per OAR: DSC, Jaccard, HD95, precision, recall, mean ± SD, and a paired test per metric
(KS normality check of the differences → paired t-test, else Wilcoxon) via
:func:`ParotidOARLib.metrics.paired_test`. Writes Testing/benchmarks/ablation.json.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

METRICS = ("dsc", "jaccard", "hd95_mm", "precision", "recall")


def one_step_predict(net, ck, case, device):
    import torch

    from ParotidOARLib import labels as L
    from ParotidOARLib.inference import sliding_window
    from ParotidOARLib.training import normalise, one_step_item

    g = case["geometry"]
    it = one_step_item(case["ct"], g, {}, case["side"], tuple(ck["spacing"]))  # the grid only, no labels
    from ParotidOARLib.imageio import Geometry

    g1 = Geometry.from_dict(it["meta"]["geometry"])
    norm = ck["normalisation"]
    x = normalise(it["ct"], norm)
    pad = float(normalise(np.array([-1024.0]), norm)[0])
    with torch.inference_mode():
        probs = sliding_window(net, x, tuple(ck["patch"]), len(L.OARS) + 1, device, pad_value=pad)
    # probabilities → the input grid inside the reference ROI's box, clipped to the ROI, as the cascade does
    from ParotidOARLib import cascade, roi as roi_mod

    return cascade.roi_masks_from_probabilities(probs, g1, g, case["roi"], roi_mod.bounding_box(case["roi"]), L.OARS)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one-step-run", default=str(REPO / "runs" / "shipped" / "onestep"))
    ap.add_argument("--cascade-results", default=str(REPO / "Testing" / "benchmarks" / "results" / "eval_phantom.json"))
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "Testing" / "benchmarks" / "ablation.json"))
    args = ap.parse_args(argv)
    import torch

    from eval_phantom import DEFAULT_SPACING, load_case
    from ParotidOARLib import labels as L, metrics
    from ParotidOARLib.network import build
    from ParotidOARLib.training import load_checkpoint

    ck = load_checkpoint(args.one_step_run, "best_dice")
    cfg = dict(ck["network"])
    cfg["deep_supervision"] = False
    net = build(cfg)
    net.load_state_dict(ck["model"])
    net.eval()
    device = torch.device("cpu")
    casc = json.loads(Path(args.cascade_results).read_text())
    set_name = next(k for k in casc["sets"] if k.startswith("default"))
    casc_rows = [dict(r, method="two-step") for r in casc["sets"][set_name]["rows"] if r["segment"] in L.OARS]
    rows, times = [], []
    for seed in range(args.cases):
        c = load_case(seed, DEFAULT_SPACING, None)
        t = time.perf_counter()
        pred = one_step_predict(net, ck, c, device)
        times.append(time.perf_counter() - t)
        cmp = metrics.compare_segmentations(pred, c["labels"], c["geometry"], names=list(L.OARS))
        for name, m in cmp["segments"].items():
            rows.append({"method": "one-step", "case": f"seed{seed}", "segment": name, **{k: m.get(k) for k in METRICS}})
        print(f"one-step seed {seed}: " + ", ".join(f"{n} {cmp['segments'][n]['dsc']:.3f}" for n in L.OARS), flush=True)
    all_rows = casc_rows + rows
    summary = metrics.summarise_cohort(all_rows, METRICS)
    tests = metrics.compare_methods(all_rows, "two-step", "one-step", METRICS)
    st = ck["state"]
    out = {
        "description": "Two-step cascade vs one-step network on held-out phantoms (seeds 0..19, 0.98x0.98x2 mm), "
                       "reference OARs clipped to the reference ROI. One-step output clipped to the reference "
                       "(oracle) ROI.",
        "budget": {"one_step_iterations": st["iteration"], "one_step_epochs": st["epoch"],
                   "one_step_minutes": round(st["elapsed_s"] / 60, 1),
                   "note": "same architecture, spacing, patch, recipe and iteration budget as the cascade's stage 2; "
                           "the cascade additionally has its stage-1 network (trained on OpenKBP)."},
        "cascade_model": casc.get("model"), "one_step_checkpoint": ck.get("selected_by"),
        "one_step_seconds_per_case": float(np.mean(times)) if times else None,
        "summary": summary, "paired_tests": tests, "rows": all_rows,
    }
    p = Path(args.out)
    p.write_text(json.dumps(out, indent=1, default=float))
    print("\nOAR                      two-step DSC     one-step DSC     p (test)")
    for n in L.OARS:
        a = summary["methods"]["two-step"]["segments"][n]["dsc"]
        b = summary["methods"]["one-step"]["segments"][n]["dsc"]
        t = tests["segments"][n]["dsc"]
        print(f"{n:25s} {a['mean']:.3f} ± {a['sd']:.3f}   {b['mean']:.3f} ± {b['sd']:.3f}   "
              f"{t['p_value']:.3g} ({t['test']})")
    print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
