"""Benchmark: time of one OAR comparison (all metrics) on full 512x512xN CT grids.

Uses the real expert masks in Testing/Data/tcia-hn-masks (radiographer vs
oncologist; Parotid-Lt, Parotid-Rt, Mandible; 3 cases), or all cases of
../shared/data/tcia-hn-masks with ``--shared``. Reading the files is not timed.
For each pair the median of ``--repeats`` runs of ``metrics.compare`` is taken.
If DeepMind's ``surface-distance`` package is installed, its
``compute_surface_distances`` + HD95 + surface DSC are timed on the same pairs
for reference (and the results are checked to agree).

Writes Testing/benchmarks/results/metrics.json.

    .venv/bin/python Testing/benchmarks/bench_metrics.py [--repeats 5] [--shared]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from ParotidOARLib import metrics  # noqa: E402
from ParotidOARLib.imageio import read_image  # noqa: E402

ORGANS = ("Parotid-Lt", "Parotid-Rt", "Mandible")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shared", action="store_true", help="use all cases in ../shared/data/tcia-hn-masks")
    ap.add_argument("--out", default=str(HERE / "results" / "metrics.json"))
    args = ap.parse_args(argv)

    root = (REPO.parent / "shared" / "data" / "tcia-hn-masks") if args.shared else \
        (REPO / "Testing" / "Data" / "tcia-hn-masks")
    cases = sorted(p.name for p in (root / "oncologist").iterdir() if p.is_dir())
    try:
        import surface_distance as sd
    except ImportError:
        sd = None
    per_pair = []
    for case in cases:
        for organ in ORGANS:
            r_path = root / "oncologist" / case / f"{organ}.nrrd"
            p_path = root / "radiographer" / case / f"{organ}.nrrd"
            if not (r_path.exists() and p_path.exists()):
                continue
            ref, geom = read_image(r_path)
            pred, _ = read_image(p_path)
            tol = metrics.default_tolerance(organ)
            metrics.compare(pred, ref, geom.spacing_zyx, tol)  # warm-up (table cache)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                res = metrics.compare(pred, ref, geom.spacing_zyx, tol)
                times.append(time.perf_counter() - t0)
            entry = {"case": case, "organ": organ, "grid_zyx": list(ref.shape),
                     "spacing_zyx_mm": [round(s, 4) for s in geom.spacing_zyx],
                     "seconds_median": statistics.median(times), "seconds_max": max(times),
                     "dsc": res["dsc"], "hd95_mm": res["hd95_mm"], "surface_dsc": res["surface_dsc"],
                     "tolerance_mm": tol}
            if sd is not None:
                rb, pb = ref.astype(bool), pred.astype(bool)
                ts = []
                for _ in range(max(1, args.repeats // 2)):
                    t0 = time.perf_counter()
                    d = sd.compute_surface_distances(rb, pb, geom.spacing_zyx)
                    hd = sd.compute_robust_hausdorff(d, 95)
                    sdsc = sd.compute_surface_dice_at_tolerance(d, tol)
                    ts.append(time.perf_counter() - t0)
                entry["deepmind_seconds_median"] = statistics.median(ts)
                entry["agrees_with_deepmind"] = bool(abs(hd - res["hd95_mm"]) < 1e-9
                                                     and abs(sdsc - res["surface_dsc"]) < 1e-12)
            per_pair.append(entry)
            dm = f"  deepmind {entry['deepmind_seconds_median']:.3f} s" if sd is not None else ""
            print(f"{case:>14} {organ:<11} grid {tuple(ref.shape)}  {entry['seconds_median']:.3f} s "
                  f"(max {entry['seconds_max']:.3f}){dm}  DSC {res['dsc']:.3f} HD95 {res['hd95_mm']:.2f} mm")
    med = [e["seconds_median"] for e in per_pair]
    summary = {"pairs": len(per_pair), "median_s": statistics.median(med), "max_s": max(med),
               "mean_s": statistics.mean(med), "target_s": 0.2, "all_below_target": max(med) < 0.2}
    if sd is not None:
        summary["deepmind_median_s"] = statistics.median(e["deepmind_seconds_median"] for e in per_pair)
        summary["all_agree_with_deepmind"] = all(e["agrees_with_deepmind"] for e in per_pair)
    out = {"benchmark": "metrics.compare on one OAR pair (full CT grid, union box + 1 voxel)",
           "data": str(root.relative_to(REPO.parent)) if root.is_relative_to(REPO.parent) else str(root),
           "repeats": args.repeats, "machine": {"python": platform.python_version(), "numpy": np.__version__,
                                                "cpu_count": os.cpu_count(), "platform": platform.platform(),
                                                "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
           "summary": summary, "per_pair": per_pair}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.part")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"\n{summary['pairs']} pairs: median {summary['median_s']:.3f} s, max {summary['max_s']:.3f} s per pair "
          f"(target < 0.2 s)" + (f"; DeepMind surface-distance median {summary['deepmind_median_s']:.3f} s"
                                 if sd is not None else ""))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
