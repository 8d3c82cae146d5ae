"""Time the MRML glue on a full-size phantom (slicer-core scene): what the Segment tab costs
around the engine. Prints the figures and writes Testing/benchmarks/results/bench_scene.json.

    .venv/bin/python Testing/benchmarks/bench_scene.py [--size full|small]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full", choices=["full", "small"])
    args = ap.parse_args(argv)

    from conftest import MRMLApp
    from ParotidOARLib import labels, phantom, scene, segio

    case = phantom.generate_case(7, side="left", size=args.size)
    app = MRMLApp()
    figures = {"grid": list(case.geometry.size), "spacing_mm": list(case.geometry.spacing)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        volume = scene.add_volume(app.scene, case.ct, case.geometry, "CT")
        figures["add_volume_s"] = time.perf_counter() - t
        t = time.perf_counter()
        scene.write_volume(volume, tmp / "input.nrrd")
        figures["write_volume_uncompressed_s"] = time.perf_counter() - t
        masks = dict(case.labels)
        masks[labels.ROI] = case.roi
        seg = segio.write_seg(tmp / "result.seg.nrrd", masks, case.geometry, side="left")
        import numpy as np

        idx = np.argwhere(case.roi)[:, ::-1]
        lps = case.geometry.index_to_lps(np.array([idx.min(0) - 0.5, idx.max(0) + 0.5]))
        box = {"min": lps.min(0).tolist(), "max": lps.max(0).tolist()}
        report = {"side": "left", "crop_box_lps": box}
        t = time.perf_counter()
        node = scene.load_result(app.scene, seg, volume, report=report, closed_surface=False)
        figures["load_result_no_surface_s"] = time.perf_counter() - t
        t = time.perf_counter()
        scene.load_result(app.scene, seg, volume, node, report=report, closed_surface=True)
        figures["load_result_with_closed_surface_s"] = time.perf_counter() - t
        t = time.perf_counter()
        scene.segment_content_hash(node)
        figures["content_hash_s"] = time.perf_counter() - t
        t = time.perf_counter()
        scene.segment_arrays(node, volume)
        figures["segment_arrays_s"] = time.perf_counter() - t
    figures = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}
    figures["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    for k, v in figures.items():
        print(f"{k:36s} {v}")
    out = REPO / "Testing" / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_scene.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
