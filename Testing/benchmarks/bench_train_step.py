"""Benchmark: seconds per training iteration on the CPU, PyTorch's default convolutions against oneDNN forced.

Issue 12 asks whether forcing oneDNN (``inference.optimise_for_cpu``, used at inference since the first
release) pays in training too. Both paths compute the same convolution (forward and backward; the test suite
checks the gradients), so the choice is a matter of speed only. For each stage of the shipped bundle (its
architecture and training patch, batch 2) one iteration is: forward, the deep-supervision Dice + CE loss,
backward, gradient clipping and an SGD step, exactly as ``training.train`` does. The two paths alternate, after
warm-up iterations, and the median of ``--iterations`` timed iterations is kept for each.

Run it on an idle machine (no training or test suite beside it)::

    .venv/bin/python Testing/benchmarks/bench_train_step.py [--threads 2] [--iterations 12]

Writes Testing/benchmarks/results/train_step_cpu.json.
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


def one_iteration(model, opt, loss_fn, x, y, cm) -> float:
    import torch

    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out = model(x)
    loss = loss_fn([o.float() for o in out] if isinstance(out, list) else out.float(), y, cm)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
    opt.step()
    return time.perf_counter() - t


def bench_stage(man, stage: str, iterations: int, warmup: int) -> dict:
    import numpy as np
    import torch

    from ParotidOARLib.inference import optimise_for_cpu
    from ParotidOARLib.network import build
    from ParotidOARLib.losses import DeepSupervisionLoss

    cfg = man.architecture(stage)
    patch = tuple(int(v) for v in man.patch_size(stage))
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(2, 1, *patch)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, cfg.num_classes, size=(2, *patch)).astype(np.int64))
    cm = torch.ones(2, cfg.num_classes, dtype=torch.float32)
    models = {}
    for name in ("default", "onednn"):
        torch.manual_seed(0)
        net = build(cfg)
        if name == "onednn":
            optimise_for_cpu(net)
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)
        models[name] = (net, opt)
    loss_fn = DeepSupervisionLoss(len(cfg.strides) - 1)
    times = {n: [] for n in models}
    for i in range(warmup + iterations):
        for name, (net, opt) in models.items():
            dt = one_iteration(net, opt, loss_fn, x, y, cm)
            if i >= warmup:
                times[name].append(dt)
    med = {n: statistics.median(v) for n, v in times.items()}
    return {"patch_zyx": list(patch), "batch": 2, "architecture": cfg.to_dict(),
            "seconds_per_iteration": {n: round(v, 4) for n, v in med.items()},
            "all_seconds": {n: [round(t, 4) for t in v] for n, v in times.items()},
            "speedup_onednn": round(med["default"] / med["onednn"], 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "Resources" / "Models" / "parotid-oar-research-v1"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "train_step_cpu.json"))
    args = ap.parse_args(argv)
    import torch

    from ParotidOARLib import bundle

    torch.set_num_threads(args.threads)
    man = bundle.read_manifest(args.model)
    result = {"benchmark": "one training iteration (forward, loss, backward, clip, SGD step), batch 2, CPU",
              "model": f"{man.name}@{man.version}", "threads": args.threads, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "cpu_count_visible": len(os.sched_getaffinity(0)),
              "load_average_before": list(os.getloadavg()), "stages": {}}
    for stage in ("stage1", "stage2"):
        r = bench_stage(man, stage, args.iterations, args.warmup)
        result["stages"][stage] = r
        s = r["seconds_per_iteration"]
        print(f"{stage}: default {s['default']:.3f} s/it, oneDNN {s['onednn']:.3f} s/it "
              f"(x{r['speedup_onednn']:.2f})", flush=True)
    result["load_average_after"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
