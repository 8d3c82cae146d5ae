"""Contour check for issue 18's speed options: the old settings against the new default (and OpenVINO).

Every case is segmented with each configuration in the same process and the same code:

* ``old``: ``step=0.5`` (nnU-Net's 50 % window overlap) and ``side_check_window="side"`` (the wrong-side
  check over the whole other side): the behaviour before issue 18;
* ``new``: the current defaults of :class:`cascade.SegmentOptions` (steps ``cascade.DEFAULT_STEPS``: 0.5 for
  stage 1, 0.75 for stage 2; the wrong-side check in one window at the mirror image of the parotid);
* ``openvino``: the defaults with ``backend="openvino"`` (only when the package is installed).

Cases and measures are those of the accuracy benchmarks, through their own functions:

* the 20 held-out phantoms (generator 2, seeds 0-19, 0.98x0.98x2 mm; ``eval_phantom.load_case`` and
  ``eval_phantom.compare_case``): every structure's DSC against the phantom reference;
* OpenKBP validation (``eval_openkbp``; pt_221 excluded): the parotid's DSC against the hospital contour, and
  inside the ROI from stage 1's parotid the mandible (ramus + condyle against the real Mandible) and the skin
  (against the body's outer 3 mm), ``eval_openkbp.parotid_measures`` / ``stage2_measures``.

For each configuration: every structure's mean DSC, and its difference from ``old`` (the issue's acceptance:
|difference| <= 0.005 for every structure); also the DSC between the old and the new contours themselves, the
wrong-side check's two volumes and warnings, and the cascade times (under the same load, so comparable).

    .venv/bin/python Testing/benchmarks/speed_check.py                 # everything (~20-25 min, 2 idle cores)
    .venv/bin/python Testing/benchmarks/speed_check.py --limit 2       # 2 phantoms + 2 OpenKBP sides
    .venv/bin/python Testing/benchmarks/speed_check.py --configs new --default-steps stage1=0.55 \
        --out Testing/benchmarks/results/speed_check_stage1_step055.json   # a candidate default, before adopting it

Writes ``Testing/benchmarks/results/speed_check.json``. Research use only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import eval_openkbp  # noqa: E402
import eval_phantom  # noqa: E402

from ParotidOARLib import labels as L  # noqa: E402

TOLERANCE = 0.005
#: configuration name → SegmentOptions fields over the defaults
CONFIGS = {"old": {"step": 0.5, "side_check_window": "side"}, "new": {}, "openvino": {"backend": "openvino"}}
OPENKBP_MEASURES = ("dsc", "mandible_dsc", "skin_dsc")  # parotid, ramus+condyle vs mandible, skin vs body rind


def _dice(a, b) -> float | None:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = int(a.sum()) + int(b.sum())
    return None if n == 0 else 2.0 * float(np.count_nonzero(a & b)) / n


def _run(cascade, ct, g, side, config: dict, bundle, threads):
    from ParotidOARLib.errors import EmptyStructureError

    opts = cascade.SegmentOptions(side=side, threads=threads or None, **config)
    t = time.perf_counter()
    try:
        res = cascade.run(ct, g, opts, bundle=bundle)
    except EmptyStructureError:
        return None, time.perf_counter() - t
    return res, time.perf_counter() - t


def _case_record(results: dict, seconds: dict) -> dict:
    """What every case records besides its measures: times, the side check, old-vs-other contour DSC."""
    rec = {"seconds": {k: round(v, 3) for k, v in seconds.items()},
           "side_check": {k: (r.report.get("side_check") if r is not None else None) for k, r in results.items()}}
    old = results.get("old")
    if old is not None:
        rec["dsc_vs_old_contours"] = {
            k: {n: _dice(r.masks[n], old.masks[n]) for n in L.STRUCTURES}
            for k, r in results.items() if k != "old" and r is not None}
    return rec


def _means(rows, configs, key_of, measures):
    """{config: {measure: mean over the cases where it is defined}} and the differences from ``old``."""
    means = {}
    for c in configs:
        means[c] = {}
        for m in measures:
            vals = [key_of(r, c, m) for r in rows]
            vals = [v for v in vals if v is not None]
            means[c][m] = float(np.mean(vals)) if vals else None
    diffs = {c: {m: (None if means[c][m] is None or means["old"][m] is None else means[c][m] - means["old"][m])
                 for m in measures} for c in configs if c != "old"}
    return means, diffs


def check_phantoms(cascade, bundle, configs, limit, threads, log) -> dict:
    seeds = list(range(20))[: limit or None]
    rows = []
    for seed in seeds:
        c = eval_phantom.load_case(seed, eval_phantom.DEFAULT_SPACING, None)
        results, seconds, dsc = {}, {}, {}
        for name in configs:
            res, seconds[name] = _run(cascade, c["ct"], c["geometry"], c["side"], CONFIGS[name], bundle, threads)
            results[name] = res
            pred = res.masks if res is not None else {n: np.zeros(c["ct"].shape, bool) for n in L.STRUCTURES}
            dsc[name] = {r["segment"]: r["dsc"] for r in eval_phantom.compare_case(pred, c, seed)}
        rows.append({"seed": seed, "side": c["side"], "dsc": dsc, **_case_record(results, seconds)})
        log(f"phantom seed {seed} ({c['side']}): " + "; ".join(
            f"{k} {seconds[k]:.1f} s" for k in configs) + "".join(
            f" | DSC {c}-old " + ", ".join(f"{n} {dsc[c][n] - dsc['old'][n]:+.3f}" for n in L.STRUCTURES)
            for c in configs if c != "old"))
    means, diffs = _means(rows, configs, lambda r, c, m: r["dsc"][c].get(m), L.STRUCTURES)
    return {"cases": f"generator-2 phantoms, seeds {seeds[0]}-{seeds[-1]}, 0.98x0.98x2 mm", "n": len(rows),
            "mean_dsc": means, "diff_vs_old": diffs, "rows": rows}


def check_openkbp(cascade, bundle, configs, limit, threads, data, log) -> dict:
    from ParotidOARLib import dataset

    root = Path(data) / "validation"
    if not root.is_dir():
        log(f"OpenKBP data not found at {root}: skipped")
        return {"skipped": f"no data at {root}"}
    samples, _ = dataset.discover(root, "openkbp", exclude=eval_openkbp.EXCLUDE)
    samples = samples[: limit or None]
    rows = []
    for s in samples:
        ct, g, masks, side = dataset.load_sample(s)
        rind = eval_openkbp.skin_rind(ct, g)
        results, seconds, meas = {}, {}, {}
        for name in configs:
            res, seconds[name] = _run(cascade, ct, g, side, CONFIGS[name], bundle, threads)
            results[name] = res
            if res is None:  # no parotid found: DSC 0, as eval_openkbp counts it
                meas[name] = {"dsc": 0.0}
                continue
            meas[name] = {**eval_openkbp.parotid_measures(res, masks, g),
                          **eval_openkbp.stage2_measures(res, masks, rind, g, "")}
        rows.append({"patient": s.patient, "side": side,
                     "measures": {k: {m: v.get(m) for m in OPENKBP_MEASURES} for k, v in meas.items()},
                     **_case_record(results, seconds)})
        d = rows[-1]["measures"]
        log(f"openkbp {s.patient} {side}: " + "; ".join(f"{k} {seconds[k]:.1f} s" for k in configs) +
            " | " + ", ".join(f"{m} " + " ".join(f"{c} {_fmt(d.get(c, {}).get(m))}" for c in configs)
                              for m in OPENKBP_MEASURES))
    means, diffs = _means(rows, configs, lambda r, c, m: r["measures"][c].get(m), OPENKBP_MEASURES)
    return {"cases": f"OpenKBP validation sides (minus {', '.join(eval_openkbp.EXCLUDE)})", "n": len(rows),
            "measures": {"dsc": "parotid vs the hospital contour", "mandible_dsc":
                         "ramus + condyle vs the Mandible, inside the ROI from stage 1's parotid",
                         "skin_dsc": "skin vs the body's outer 3 mm, inside that ROI"},
            "mean_dsc": means, "diff_vs_old": diffs, "rows": rows}


def _fmt(v):
    return "n/a" if v is None else f"{v:.3f}"


def verdict(sections: dict, configs) -> dict:
    out = {}
    for c in configs:
        if c == "old":
            continue
        worst = []
        for sec_name, sec in sections.items():
            for m, d in (sec.get("diff_vs_old", {}).get(c) or {}).items():
                if d is not None:
                    worst.append((abs(d), f"{sec_name}: {m}", d))
        worst.sort(reverse=True)
        out[c] = {"max_abs_diff": worst[0][2] if worst else None, "where": worst[0][1] if worst else None,
                  "within_tolerance": all(w[0] <= TOLERANCE for w in worst) if worst else None}
    return out


def side_check_agreement(sections: dict, configs) -> dict:
    """How often each configuration's wrong-side warning agrees with the old one's."""
    out = {}
    for c in configs:
        if c == "old":
            continue
        agree = differ = 0
        cases = []
        for sec in sections.values():
            for r in sec.get("rows", []):
                a, b = r["side_check"].get("old"), r["side_check"].get(c)
                if not a or not b:
                    continue
                if bool(a.get("warning")) == bool(b.get("warning")):
                    agree += 1
                else:
                    differ += 1
                    cases.append(r.get("patient", f"seed{r.get('seed')}"))
        out[c] = {"same_warning": agree, "different_warning": differ, "cases_differing": cases}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bundle folder (default: the default bundle)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N phantoms and N OpenKBP sides")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all usable cores)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "openkbp"))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                    help="configurations to compare (old is always run)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["phantoms", "openkbp"])
    ap.add_argument("--default-steps", nargs="+", default=[], metavar="STAGE=STEP",
                    help="try other default window steps before changing cascade.DEFAULT_STEPS, e.g. stage1=0.55: "
                         "the new and openvino configurations run with them (old keeps step 0.5)")
    ap.add_argument("--out", default=str(HERE / "results" / "speed_check.json"))
    args = ap.parse_args(argv)
    from ParotidOARLib import backends, cascade

    configs = ["old"] + [c for c in args.configs if c != "old"]
    for item in args.default_steps:
        stage, _, step = item.partition("=")
        if stage not in cascade.DEFAULT_STEPS or not step:
            ap.error(f"--default-steps {item!r}: use STAGE=STEP with STAGE one of {', '.join(cascade.DEFAULT_STEPS)}")
        cascade.DEFAULT_STEPS[stage] = float(step)
    if "openvino" in configs and not backends.openvino_available():
        print("openvino is not installed: the openvino configuration is skipped (pip install openvino)")
        configs.remove("openvino")
    bundle = cascade.load_model_bundle(args.model)

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    sections = {}
    if "phantoms" not in args.skip:
        sections["phantoms"] = check_phantoms(cascade, bundle, configs, args.limit, args.threads, log)
    if "openkbp" not in args.skip:
        sections["openkbp"] = check_openkbp(cascade, bundle, configs, args.limit, args.threads, args.data, log)
    defaults = cascade.SegmentOptions(side="left")
    out = {"model": bundle.manifest.model_id, "configs": {c: CONFIGS[c] for c in configs},
           "defaults": {"steps": dict(cascade.DEFAULT_STEPS), "side_check_window": defaults.side_check_window,
                        "backend": defaults.backend},
           "tolerance": TOLERANCE, "limit": args.limit or None, "threads": args.threads or None,
           "verdict": verdict(sections, configs), "side_check": side_check_agreement(sections, configs),
           "seconds": round(time.perf_counter() - t0, 1), **sections}
    p = Path(args.out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=1, default=float) + "\n")
    for sec_name, sec in sections.items():
        if "mean_dsc" not in sec:
            continue
        for c in configs:
            print(f"{sec_name} ({sec['n']}) {c:8s} mean DSC " + ", ".join(
                f"{m} {_fmt(v)}" + ("" if c == "old" or sec["diff_vs_old"][c][m] is None else
                                    f" ({sec['diff_vs_old'][c][m]:+.4f})") for m, v in sec["mean_dsc"][c].items()))
    for c, v in out["verdict"].items():
        print(f"{c}: largest |mean DSC - old| {_fmt(abs(v['max_abs_diff']) if v['max_abs_diff'] is not None else None)}"
              f" ({v['where']}); within {TOLERANCE}: {v['within_tolerance']}")
    print(f"wrote {p} in {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
