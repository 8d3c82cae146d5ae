"""Benchmark: `segment` end to end on a full-size 512×512×150 phantom CT (CPU, and CUDA when present).

    .venv/bin/python Testing/benchmarks/bench_segment.py [--threads 2] [--model DIR] [--repeat 3]
    .venv/bin/python Testing/benchmarks/bench_segment.py --segment-args="--backend openvino" --tag openvino

* Input: ``phantom.generate_case(seed, 'left', spacing=(0.98, 0.98, 2.0), size='full')`` gives
  512×512×100 (200 mm); it is extended to 150 slices (300 mm) by repeating its bottom
  (neck) and top slices, 25 each, so the grid is the issue's 512×512×150 at 0.98×0.98×2 mm.
  Written as ``ct.nrrd`` (gzip), so the read time is real.
* Model: the default bundle (``Resources/Models/parotid-oar-research-v1``) if installed,
  else a random-weight bundle with the recommended production architecture
  (:func:`cascade.default_architecture`), whose parotid (hence ROI) is arbitrary. Because
  stage-2 time scales with the ROI box, the benchmark also times net 2 alone on a crop
  the size of the phantom's *reference* ROI box (+ context, at the stage-2 spacing):
  ``stage2_reference_roi_s``.
* Each run is a fresh ``python -m ParotidOARLib segment`` process (honest peak RSS and
  model loading); the figures are the report's ``timings`` and ``peak_memory``, and the
  process's wall time. ``median`` is the run with the median total of ``--repeat`` runs (3;
  issue 18's acceptance figure), ``best`` the fastest. ``--segment-args`` adds options to
  ``segment`` (e.g. ``--step 0.5 --side-check-window side``: the settings before issue 18).

Writes ``Testing/benchmarks/results/segment_cpu.json`` (and ``segment_cuda.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))

import numpy as np  # noqa: E402

from ParotidOARLib import bundle, cascade, labels, phantom, preprocess  # noqa: E402
from ParotidOARLib.imageio import Geometry, write_image  # noqa: E402


def make_ct(out: Path, seed: int = 7, slices: int = 150):
    case = phantom.generate_case(seed, side="left", spacing=(0.98, 0.98, 2.0), size="full")
    ct, g = case.ct, case.geometry
    extra = slices - ct.shape[0]
    below, above = extra // 2, extra - extra // 2
    if extra > 0:
        ct = np.concatenate([np.repeat(ct[:1], below, 0), ct, np.repeat(ct[-1:], above, 0)], axis=0)
        origin = np.asarray(g.origin) - np.asarray(g.direction_matrix)[:, 2] * g.spacing[2] * below
        g = Geometry((g.size[0], g.size[1], ct.shape[0]), g.spacing, tuple(origin), g.direction)
        roi = np.concatenate([np.zeros((below,) + case.roi.shape[1:], bool), case.roi,
                              np.zeros((above,) + case.roi.shape[1:], bool)], axis=0)
    else:
        roi = case.roi
    write_image(out, ct, g)
    return g, roi, case


def production_random_bundle(directory: Path, stage1_bias: float = 0.0, stage1_checkpoint=None) -> Path:
    """Random weights, production architecture; stage 1 optionally from a training checkpoint."""
    import torch

    from ParotidOARLib.network import UNetConfig, build

    torch.manual_seed(0)
    specs, sds = {}, {}
    norm = {"clip": [-1000.0, 1500.0], "mean": 40.0, "std": 300.0}
    for stage, names in (("stage1", ["background", labels.PAROTID]), ("stage2", ["background", *labels.OARS])):
        d = cascade.default_architecture(stage)
        if stage == "stage1" and stage1_checkpoint:
            ck = torch.load(stage1_checkpoint, map_location="cpu", weights_only=False)
            arch = UNetConfig.from_dict(ck["network"])
            specs[stage] = bundle.stage_spec(names, ck["spacing"], ck["normalisation"], ck["patch"], arch,
                                             inference_patch_size=d.patch_size)
            sds[stage] = ck["model"]
            continue
        net = build(d.architecture)
        if stage == "stage1":
            with torch.no_grad():
                net.heads[-1].bias[1] += stage1_bias
        specs[stage] = bundle.stage_spec(names, d.spacing, norm, d.patch_size, d.architecture,
                                         context_mm=d.context_mm or None)
        sds[stage] = net.state_dict()
    m = bundle.Manifest(name="random-production-architecture", version="0", clinical_use=False,
                        description="Random weights, production architecture: for timing only.",
                        stages=specs, created="2026-01-01")
    return bundle.save_bundle(directory, m, sds, force=True)


def stage2_reference_time(model_dir: Path, ct_path: Path, roi: np.ndarray, g: Geometry, device: str,
                          threads: int) -> dict:
    """Net 2 alone on a crop the size of the phantom's reference ROI box (+context)."""
    import torch

    from ParotidOARLib import inference, roi as roi_mod

    b = bundle.load_bundle(model_dir)
    dev = inference.select_device(device)
    if dev.type == "cpu":
        inference.configure_cpu_threads(threads)
    net = b.model("stage2", dev)
    if dev.type == "cpu":
        inference.optimise_for_cpu(net)
    man = b.manifest
    lo, hi = roi_mod.bounding_box(roi)
    clo, chi = preprocess.lps_bounds(g, lo, hi)
    ctx = float(man.stage("stage2").get("context_mm", cascade.STAGE2_CONTEXT_MM))
    g2 = preprocess.axis_aligned_grid(man.spacing("stage2"), clo - ctx, chi + ctx,
                                      min_size_zyx=man.patch_size("stage2"))
    x = np.random.default_rng(0).normal(size=g2.shape).astype(np.float32)
    inference.sliding_window(net, x[:8, :8, :8], man.patch_size("stage2"), 7, dev)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    inference.sliding_window(net, x, man.patch_size("stage2"), 7, dev, step=cascade.DEFAULT_STEPS["stage2"])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"stage2_reference_roi_s": round(time.perf_counter() - t, 3), "reference_roi_crop_size": list(g2.size),
            "reference_roi_cc": round(float(roi.sum()) * g.voxel_volume_cc, 1)}


def run_once(ct: Path, out_dir: Path, model_dir: Path, device: str, threads: int, extra=()) -> dict:
    out = out_dir / "out.seg.nrrd"
    rep = out_dir / "report.json"
    for p in (out, rep):
        if p.exists():
            p.unlink()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "ParotidOARLib", "segment", str(ct), "--side", "left", "--out", str(out),
           "--model", str(model_dir), "--device", device, "--report", str(rep), "--threads", str(threads), *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"segment failed ({proc.returncode}):\n{proc.stderr}")
    r = json.loads(rep.read_text())
    return {"process_wall_s": round(wall, 3), "timings": r["timings"], "peak_memory": r["peak_memory"],
            "roi_volume_cc": r["roi_volume_cc"], "volumes_cc": r["volumes_cc"], "crop_box_lps": r["crop_box_lps"],
            "stage_grids": {k: r["grids"][k]["size"] for k in ("stage1", "stage2")}, "device": r["device"],
            "backend": r.get("backend", "torch"), "step": r.get("step"), "side_check": r.get("side_check")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 2))
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--segment-args", default="", help="extra segment options, e.g. \"--backend openvino\"")
    ap.add_argument("--tag", default="", help="suffix of the result file: segment_<device>[_<tag>].json")
    ap.add_argument("--stage1-checkpoint", default=None,
                    help="without a default bundle: take stage 1 from a training checkpoint (realistic ROI)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ct = tmp / "ct.nrrd"
        g, roi, case = make_ct(ct)
        if args.model:
            model_dir, model_kind = Path(args.model), "given"
        elif bundle.default_bundle_dir() is not None:
            model_dir, model_kind = bundle.default_bundle_dir(), "default bundle (trained)"
        else:
            model_dir = production_random_bundle(tmp / "random-bundle", stage1_checkpoint=args.stage1_checkpoint)
            model_kind = "random weights, production architecture (cascade.default_architecture)"
            if args.stage1_checkpoint:
                model_kind = (f"stage 1 from training checkpoint {args.stage1_checkpoint}; stage 2 random weights, "
                              "production architecture (cascade.default_architecture)")
        man = bundle.read_manifest(model_dir)
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            extra = shlex.split(args.segment_args)
            runs = [run_once(ct, tmp, model_dir, device, args.threads, extra) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["timings"]["total"])
            median = sorted(runs, key=lambda r: r["timings"]["total"])[(len(runs) - 1) // 2]
            result = {
                "benchmark": "segment end to end (python -m ParotidOARLib segment, fresh process per run)",
                "input": {"size": list(g.size), "spacing": list(g.spacing),
                          "note": "phantom full case (512x512x100 at 0.98x0.98x2 mm) extended to 150 slices "
                                  "by repeating 25 edge slices below and above"},
                "model": {"dir": str(model_dir), "kind": model_kind, "name": man.name,
                          "stage1": {k: man.stage("stage1")[k] for k in ("spacing", "patch_size")},
                          "stage2": {k: man.stage("stage2")[k] for k in ("spacing", "patch_size")},
                          "architecture": {s: {k: man.stage(s)["architecture"][k]
                                               for k in ("base_features", "max_features", "strides")}
                                           for s in ("stage1", "stage2")}},
                "device": device, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                "cpu_count_visible": os.cpu_count(), "load_average_before": os.getloadavg(),
                "torch": torch.__version__, "segment_args": extra, "runs": runs, "median": median, "best": best,
                "median_process_wall_s": float(np.median([r["process_wall_s"] for r in runs])),
            }
            result.update(stage2_reference_time(model_dir, ct, roi, g, device, args.threads))
            result["load_average_after"] = os.getloadavg()
            path = Path(args.out) / (f"segment_{device}" + (f"_{args.tag}" if args.tag else "") + ".json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
            t = median["timings"]
            print(f"[{device}, {args.threads} threads, {model_kind}{', ' + ' '.join(extra) if extra else ''}] "
                  f"median of {len(runs)}: total {t['total']:.2f} s, process {median['process_wall_s']:.2f} s "
                  f"(read {t['read']:.2f}, preprocess {t['preprocess']:.2f}, stage1 {t['stage1']:.2f}, "
                  f"side check {t.get('side_check', 0.0):.2f}, roi {t['roi']:.2f}, stage2 {t['stage2']:.2f}, resample {t['resample']:.2f}, "
                  f"write {t['write']:.2f}); peak RSS {max(r['peak_memory']['rss_mb'] for r in runs):.0f} MB; "
                  f"ROI {best['roi_volume_cc']:.0f} cc; stage-2 on the reference ROI box "
                  f"{result['stage2_reference_roi_s']:.2f} s; load avg {result['load_average_before'][0]:.1f} "
                  f"→ {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
