"""Benchmark: ``batch`` on Dask with 1 and with 2 worker processes, on small phantom cases.

    .venv/bin/python Testing/benchmarks/batch_workers.py [--cases 8] [--model DIR] [--idle] [--out JSON]

* Input: ``--cases`` small phantom cases (``phantom.generate_case(seed, size='small')``, sides
  alternating), written as phantom case folders; ``--side-from-json``.
* Model: the default bundle (``--model`` to change), verified once per worker process.
* Runs, each a fresh ``python -m ParotidOARLib batch`` process on a fresh output folder:
  ``--workers 1 --threads C`` and ``--workers 2 --threads C/2`` (C = usable cores). On a 2-core
  machine that is 1 worker × 2 torch threads against 2 workers × 1 thread: the same cores, so
  the speed-up is what case-level parallelism buys over torch's intra-op threads.
* ``model_load_s``: loading and verifying the model once (SHA-256 of the weights), measured here
  in-process after torch is imported. A batch loads it once per worker, not once per case, so it
  saves ``model_load_s × (cases − workers)``.
* ``measured_idle``: ``--idle`` says the machine was otherwise idle; the load averages before and
  after are recorded either way.

Writes ``Testing/benchmarks/results/batch_workers.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from ParotidOARLib import cascade, phantom  # noqa: E402
from ParotidOARLib.inference import cpu_count  # noqa: E402


def run_batch(cases_dir: Path, out: Path, workers: int, threads: int, model) -> dict:
    argv = [sys.executable, "-m", "ParotidOARLib", "batch", "--input", str(cases_dir), "--out", str(out),
            "--side-from-json", "--device", "cpu", "--workers", str(workers), "--threads", str(threads)]
    if model:
        argv += ["--model", str(model)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"batch --workers {workers} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    with open(out / "batch-summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    seconds = [float(r["seconds"]) for r in rows if r["status"] == "ok"]
    return {"workers": workers, "threads_per_worker": threads, "wall_s": round(wall, 2),
            "cases_ok": len(seconds), "mean_case_s": round(sum(seconds) / max(len(seconds), 1), 2),
            "log_tail": r.stdout.strip().splitlines()[-2:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--model", default=None, help="model bundle (default: the installed default bundle)")
    ap.add_argument("--idle", action="store_true", help="record that the machine was otherwise idle")
    ap.add_argument("--out", default=str(HERE / "results" / "batch_workers.json"))
    args = ap.parse_args()

    cores = cpu_count()
    load_before = os.getloadavg()
    import torch  # noqa: F401  (imported first: the model-load time below is the load and the verification)

    t0 = time.perf_counter()
    model = cascade.load_model_bundle(args.model)
    model_load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        cases_dir = Path(tmp) / "cases"
        for i in range(args.cases):
            case = phantom.generate_case(100 + i, side="left" if i % 2 == 0 else "right", size="small")
            phantom.write_case(case, cases_dir / f"phantom-{i:02d}")
        runs = [run_batch(cases_dir, Path(tmp) / f"out-{w}", w, max(1, cores // w), args.model) for w in (1, 2)]
    result = {
        "benchmark": "batch --workers 1 vs --workers 2 (local Dask cluster), small phantom cases",
        "cases": args.cases, "cores": cores, "model": model.manifest.model_id,
        "machine": f"{platform.machine()} {platform.system()}, python {platform.python_version()}",
        "measured_idle": bool(args.idle), "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "runs": runs, "speedup_2_vs_1": round(runs[0]["wall_s"] / runs[1]["wall_s"], 2),
        "model_load_s": round(model_load_s, 3),
        "model_load_saved_s": {str(r["workers"]): round(model_load_s * (args.cases - r["workers"]), 2) for r in runs},
        "note": f"{cores} cores: 1 worker x {cores} torch threads vs 2 workers x {max(1, cores // 2)} each",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    for r in runs:
        print(f"workers {r['workers']} x {r['threads_per_worker']} threads: {r['wall_s']} s "
              f"({r['cases_ok']} cases, {r['mean_case_s']} s per case)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
