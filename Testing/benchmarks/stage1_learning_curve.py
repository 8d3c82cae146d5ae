"""Stage 1's learning curve on whole validation volumes, and the budget it says 0.80 would take (issue 12).

Every point is a mean parotid DSC over the 62 OpenKBP validation sides through ``segment``'s path
(the trainer's whole-volume validation, ``training.volume_validator``), against the iterations of the
chain of runs that led to it (batch 2, 4 stages at 4×4×3 mm, patch 32×48×40, recipe v2):

* the 20-minute pilot from scratch (``results/stage1_pilots.json``, 4 stages 4×4×3);
* runs/s13a from scratch (3,200 iterations; ``results/experiment_stage1_recipe_v2.json``);
* runs/s14 (+2,850, no whole-volume validation), runs/s15 (+4,000) and runs/s18 (+5,000), each
  continuing the previous one (``--init-from``); their points come from ``stage1/record.json``.

It fits mean DSC = a + b·log10(iterations) by least squares over the points from the chain, and
reports the iterations, and the hours on 2 cores at the measured seconds per iteration, at which the
fit reaches the target. A flat fit says no budget of this recipe gets there.

    .venv/bin/python Testing/benchmarks/stage1_learning_curve.py [--runs runs] [--target 0.80]
Writes Testing/benchmarks/results/stage1_learning_curve.json and stage1_learning_curve.png. Without the
run folders (git-ignored) it redraws from the JSON it wrote before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "Testing" / "benchmarks" / "results"
# the chain: each run's iterations before it started (runs/s14 had no whole-volume validation)
CHAIN = (("s15", 3200 + 2850), ("s18", 3200 + 2850 + 4000))
#: the shipped stage 1's evaluation on the same sides (the line drawn for comparison)
BASELINE = RESULTS / "eval_openkbp_1.2.0.json"


def collect(runs: Path) -> list[dict]:
    pts = []
    pil = json.loads((RESULTS / "stage1_pilots.json").read_text())["pilots"]["4stage_4x4x3"]
    pts.append({"run": "pilot 4stage_4x4x3 (from scratch)", "iterations": pil["iterations"],
                "mean_dsc": pil["mean_dsc"], "chain": False})
    s13 = json.loads((RESULTS / "experiment_stage1_recipe_v2.json").read_text())
    pts.append({"run": "s13a (from scratch)", "iterations": s13["training"]["iterations"],
                "mean_dsc": s13["openkbp_validation"]["summary"]["dsc"]["mean"], "chain": True})
    for name, before in CHAIN:
        rec = runs / name / "stage1" / "record.json"
        if not rec.exists():
            raise FileNotFoundError(rec)
        for v in json.loads(rec.read_text()).get("volume_validation", []):
            pts.append({"run": name, "iterations": before + v["iteration"], "mean_dsc": v["mean_dsc"],
                        "median_dsc": v.get("median_dsc"), "chain": True})
    return pts


def fit(pts: list[dict], target: float, seconds_per_iteration: float) -> dict:
    chain = [p for p in pts if p["chain"]]
    x = np.log10([p["iterations"] for p in chain])
    y = np.array([p["mean_dsc"] for p in chain])
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    out = {"model": "mean_dsc = a + b*log10(iterations)", "a": float(a), "b_per_decade": float(b),
           "n_points": len(chain), "residual_sd": float(resid.std(ddof=2)) if len(chain) > 2 else None,
           "target": target, "seconds_per_iteration": seconds_per_iteration}
    if b > 1e-6:
        it = 10 ** ((target - a) / b)
        out.update({"iterations_to_target": float(it), "hours_on_2_cores": float(it * seconds_per_iteration / 3600),
                    "factor_over_last": float(it / max(p["iterations"] for p in chain))})
    else:
        out.update({"iterations_to_target": None, "hours_on_2_cores": None})
    return out


def draw(pts, f, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for run in dict.fromkeys(p["run"] for p in pts):
        q = [p for p in pts if p["run"] == run]
        ax.plot([p["iterations"] for p in q], [p["mean_dsc"] for p in q], "o-" if len(q) > 1 else "o", label=run)
    xs = np.logspace(3, 5.3, 50)
    ax.plot(xs, f["a"] + f["b_per_decade"] * np.log10(xs), "k--", lw=0.8,
            label=f"fit: {f['b_per_decade']:+.3f} per 10x iterations")
    base = json.loads(BASELINE.read_text())
    ax.axhline(base["summary"]["dsc"]["mean"], color="gray", lw=0.8, ls=":",
               label=f"{base['model'].split('@')[-1]} ({base['summary']['dsc']['mean']:.3f})")
    ax.axhline(f["target"], color="red", lw=0.8, ls=":", label=f"target {f['target']}")
    ax.set_xscale("log")
    ax.set_xlabel("training iterations (batch 2), cumulative over the chain")
    ax.set_ylabel("mean parotid DSC, 62 validation sides")
    ax.set_ylim(0.65, max(0.82, f["target"] + 0.02))
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(REPO / "runs"))
    ap.add_argument("--target", type=float, default=0.80)
    ap.add_argument("--seconds-per-iteration", type=float, default=None,
                    help="default: the 4-stage pilot's measured figure (2 threads, idle)")
    ap.add_argument("--out", default=str(RESULTS / "stage1_learning_curve.json"))
    args = ap.parse_args(argv)
    out_path = Path(args.out)
    try:
        pts = collect(Path(args.runs))
    except FileNotFoundError as e:
        if not out_path.exists():
            print(f"error: {e} is missing and there is no earlier {out_path.name} to redraw", file=sys.stderr)
            return 2
        pts = json.loads(out_path.read_text())["points"]
        print(f"{e} is missing: redrawing from {out_path}")
    spi = args.seconds_per_iteration or json.loads(
        (RESULTS / "stage1_pilots.json").read_text())["pilots"]["4stage_4x4x3"]["seconds_per_iteration"]
    f = fit(pts, args.target, spi)
    out_path.write_text(json.dumps({"points": pts, "fit": f, "note": __doc__.split("\n\n")[1]}, indent=1))
    draw(pts, f, out_path.with_suffix(".png"))
    for p in pts:
        print(f"{p['run']:<36} {p['iterations']:>7} it  mean DSC {p['mean_dsc']:.4f}")
    tail = (f"{f['iterations_to_target']:.3g} iterations, {f['hours_on_2_cores']:.3g} h on 2 cores"
            if f["iterations_to_target"] else "never (flat or falling)")
    print(f"fit {f['a']:.3f} {f['b_per_decade']:+.4f}*log10(it); {args.target} at {tail}; wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
