"""Benchmark: synthetic phantom generation (full 512x512x100 and small ~160x160x60 cases).

Prints the median of 3 runs (wall-clock and process CPU time, since the CI machine's 2 cores
are shared) for ``phantom.generate_case`` and for ``phantom.write_case``, and writes
``Testing/benchmarks/results/phantom.json``.

    .venv/bin/python Testing/benchmarks/bench_phantom.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ParotidOARLib import phantom  # noqa: E402


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - w0, time.process_time() - c0


def bench(size: str, repeats: int, seed0: int) -> dict:
    gen_wall, gen_cpu, write_wall, write_cpu = [], [], [], []
    shape = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            case, w, c = _timed(lambda: phantom.generate_case(seed0 + r, side="random", size=size))
            gen_wall.append(w)
            gen_cpu.append(c)
            shape = case.geometry.size
            _, w, c = _timed(lambda: phantom.write_case(case, Path(tmp) / f"case{r}"))
            write_wall.append(w)
            write_cpu.append(c)
    return {"size": size, "grid_ijk": list(shape), "repeats": repeats,
            "generate_wall_s": round(statistics.median(gen_wall), 3),
            "generate_cpu_s": round(statistics.median(gen_cpu), 3),
            "write_wall_s": round(statistics.median(write_wall), 3),
            "write_cpu_s": round(statistics.median(write_cpu), 3),
            "all_generate_wall_s": [round(v, 3) for v in gen_wall]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "Testing" / "benchmarks" / "results" / "phantom.json"))
    args = parser.parse_args()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = [bench("small", args.repeats, 100), bench("full", args.repeats, 200)]
    record = {"benchmark": "phantom", "python": platform.python_version(), "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_before": load_before,
              "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "spacing_mm": list(phantom.DEFAULT_SPACING), "results": results,
              "targets_s": {"full": 5.0, "small": 1.0}}
    for r in results:
        print(f"{r['size']:>5} {r['grid_ijk']}: generate {r['generate_wall_s']:.2f} s wall "
              f"({r['generate_cpu_s']:.2f} s CPU), write {r['write_wall_s']:.2f} s wall "
              f"({r['write_cpu_s']:.2f} s CPU)  [median of {r['repeats']}]")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
