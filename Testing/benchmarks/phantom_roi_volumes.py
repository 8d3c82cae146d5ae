"""ROI-clipped OAR volumes of the synthetic phantom over many seeds (issue #13, phantom realism).

For each seed the phantom case is generated exactly as the held-out evaluation does it
(``eval_phantom.py``: ``generate_case(seed, side="random", size="full")`` at 0.98x0.98x2 mm) and
for every OAR the volume inside the case's reference ROI (the residual parotid + 17 mm,
``case.roi & case.labels_full[name]``) is measured, plus the whole OAR volume and the gap (mm,
surface to surface) from the parotid's upper pole (its top 5 mm in the patient frame) to the
external auditory canal and to the auricle.

    .venv/bin/python Testing/benchmarks/phantom_roi_volumes.py --seeds 50 [--first 0] [--size full]

Prints min / 5th / 25th / median / 75th / 95th percentile / max per OAR over the seeds and the
number of seeds with the ROI-clipped auricula >= 2 cc; writes
Testing/benchmarks/results/phantom_roi_volumes.json. Runs in one process (single-threaded).
Research use only.
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

OUT = REPO / "Testing" / "benchmarks" / "results" / "phantom_roi_volumes.json"
POLE_MM = 5.0  # the "upper pole": parotid voxels within this many mm of the gland's top (patient z)
AURICULA_MIN_CC = 2.0


def _world_points(mask, geometry):
    idx = np.argwhere(mask)[:, ::-1].astype(float)  # (i, j, k)
    return geometry.index_to_lps(idx)


def _gap_mm(a_pts, b_pts):
    if len(a_pts) == 0 or len(b_pts) == 0:
        return None
    from scipy.spatial import cKDTree

    d, _ = cKDTree(b_pts).query(a_pts, k=1)
    return float(d.min())


def measure(seed: int, size: str) -> dict:
    from ParotidOARLib import phantom

    c = phantom.generate_case(seed, side="random", size=size)
    g = c.geometry
    vcc = g.voxel_volume_cc
    row = {"seed": seed, "side": c.side, "roi_cc": round(float(c.roi.sum()) * vcc, 3),
           "parotid_cc": round(float(c.labels_full[L.PAROTID].sum()) * vcc, 3), "roi_clipped_cc": {}, "full_cc": {}}
    for name in L.OARS:
        full = c.labels_full[name]
        row["roi_clipped_cc"][name] = round(float((full & c.roi).sum()) * vcc, 3)
        row["full_cc"][name] = round(float(full.sum()) * vcc, 3)
    # the parotid's upper pole in the patient frame (p_world = R p_patient + c)
    rot = np.asarray(c.params["rotation"]).reshape(3, 3)
    centre = np.asarray(c.params["head_centre_lps"])
    par = _world_points(c.labels_full[L.PAROTID], g)
    zp = (par - centre) @ rot[:, 2]
    pole = par[zp >= zp.max() - POLE_MM]
    row["pole_to_canal_mm"] = _gap_mm(pole, _world_points(c.labels_full[L.EAC], g))
    row["pole_to_auricle_mm"] = _gap_mm(pole, _world_points(c.labels_full[L.AURICULA], g))
    row["parotid_to_auricle_mm"] = _gap_mm(par, _world_points(c.labels_full[L.AURICULA], g))
    return row


def describe(values):
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return None
    q = np.percentile(v, [0, 5, 25, 50, 75, 95, 100])
    return {"n": int(v.size), "min": float(q[0]), "p5": float(q[1]), "p25": float(q[2]), "median": float(q[3]),
            "p75": float(q[4]), "p95": float(q[5]), "max": float(q[6]), "n_zero": int((v <= 0).sum())}


def markdown_table(result: dict) -> str:
    """The per-OAR ROI-clipped volume table of a result (as in docs/phantom.md)."""
    lines = ["| structure | min | 5th pct | median | 95th pct | max | whole structure, median |",
             "|---|---|---|---|---|---|---|"]
    for name in L.OARS:
        d, f = result["roi_clipped_cc"][name], result["full_cc"][name]
        lines.append(f"| {name} | {d['min']:.2f} | {d['p5']:.2f} | {d['median']:.2f} | {d['p95']:.2f} | "
                     f"{d['max']:.2f} | {f['median']:.2f} |")
    o = result["other"]
    for key, label in (("parotid_cc", "residual parotid (cc)"), ("roi_cc", "ROI (cc)"),
                       ("pole_to_canal_mm", "gap upper pole - canal (mm)"),
                       ("pole_to_auricle_mm", "gap upper pole - auricle (mm)")):
        d = o[key]
        lines.append(f"| {label} | {d['min']:.1f} | {d['p5']:.1f} | {d['median']:.1f} | {d['p95']:.1f} | "
                     f"{d['max']:.1f} | |")
    lines.append(f"\nAuricula >= {result['auricula_min_cc']:g} cc inside the ROI: "
                 f"**{result['n_auricula_ge_min']} / {result['n_seeds']}** seeds "
                 f"(generator {result['generator_version']}, size {result['size']}, seeds "
                 f"{result['seeds'][0]}..{result['seeds'][1]}).")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=50, help="number of seeds (default 50)")
    ap.add_argument("--first", type=int, default=0, help="first seed (default 0: the held-out seeds 0..)")
    ap.add_argument("--size", choices=("full", "small"), default="full")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", metavar="JSON", help="only print the markdown table of an earlier result")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return 0
    from ParotidOARLib import phantom

    rows = []
    t0 = time.time()
    for seed in range(args.first, args.first + args.seeds):
        row = measure(seed, args.size)
        rows.append(row)
        print(f"seed {seed:3d} {row['side']:5s} parotid {row['parotid_cc']:5.1f} cc  ROI-clipped: "
              + "  ".join(f"{n.split()[0][:8]} {row['roi_clipped_cc'][n]:5.2f}" for n in L.OARS)
              + f"  pole->canal {row['pole_to_canal_mm']:.1f} mm  pole->auricle {row['pole_to_auricle_mm']:.1f} mm",
              flush=True)
    summary = {n: describe([r["roi_clipped_cc"][n] for r in rows]) for n in L.OARS}
    full = {n: describe([r["full_cc"][n] for r in rows]) for n in L.OARS}
    extra = {k: describe([r[k] for r in rows]) for k in ("parotid_cc", "roi_cc", "pole_to_canal_mm",
                                                          "pole_to_auricle_mm", "parotid_to_auricle_mm")}
    n_aur = sum(r["roi_clipped_cc"][L.AURICULA] >= AURICULA_MIN_CC for r in rows)
    print(f"\nROI-clipped OAR volume (cc) over {len(rows)} seeds ({args.first}..{args.first + args.seeds - 1}, "
          f"size {args.size}, generator {phantom.GENERATOR_VERSION}):")
    print(f"{'structure':26s} {'min':>6s} {'p5':>6s} {'p25':>6s} {'median':>6s} {'p75':>6s} {'p95':>6s} {'max':>6s}"
          f" {'#zero':>5s}")
    for name, d in list(summary.items()) + [(k, v) for k, v in extra.items()]:
        print(f"{name:26s} " + " ".join(f"{d[k]:6.2f}" for k in ("min", "p5", "p25", "median", "p75", "p95", "max"))
              + f" {d['n_zero']:5d}")
    print(f"auricula >= {AURICULA_MIN_CC:g} cc inside the ROI: {n_aur} / {len(rows)} seeds "
          f"({time.time() - t0:.0f} s)")
    result = {"generator_version": phantom.GENERATOR_VERSION, "size": args.size, "side": "random",
              "spacing": list(phantom.DEFAULT_SPACING), "seeds": [args.first, args.first + args.seeds - 1],
              "roi_margin_mm": L.ROI_MARGIN_MM_DEFAULT, "upper_pole_mm": POLE_MM,
              "auricula_min_cc": AURICULA_MIN_CC, "n_auricula_ge_min": int(n_aur), "n_seeds": len(rows),
              "roi_clipped_cc": summary, "full_cc": full, "other": extra, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + markdown_table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
