"""``python -m ParotidOARLib demo`` — the ``make demo`` job.

1. Generate one full synthetic phantom case into ``OUT/<case-id>/`` (refreshed on every run;
   only that case folder is replaced).
2. If the cascade and a default model bundle are installed, segment the phantom CT and
   compare the result with the phantom's reference segmentation (DSC, HD95 per structure).
   Otherwise say that no model is installed yet.
"""

from __future__ import annotations

import time
from pathlib import Path

DEMO_SEED = 20240  # fixed: the demo case is the same on every machine
CLINICAL_NOTE = "Research use only - not for clinical use. The demo data are synthetic."


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="demo-output", help="demo folder (default demo-output)")
    parser.add_argument("--side", choices=("left", "right"), default="left", help="operated side of the phantom")
    parser.add_argument("--device", default="auto", help="where the networks run: auto (CUDA if available, then Apple MPS, else CPU), cpu, cuda or mps "
                        "(default auto)")
    parser.add_argument("--size", choices=("full", "small"), default="full",
                        help="phantom size: full 512x512x100 (default) or small ~160x160x60 (quick check)")


def _find_model():
    """(cascade module, metrics module, bundle dir) or None when the cascade or a model is not installed."""
    try:
        from .. import bundle, cascade, metrics
    except ImportError:
        return None
    model_dir = bundle.default_bundle_dir()
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    return cascade, metrics, Path(model_dir)


def run(args) -> int:
    from .. import labels, phantom, segio

    print(CLINICAL_NOTE)
    out = Path(args.out)
    t0 = time.perf_counter()
    case = phantom.generate_case(DEMO_SEED, side=args.side, size=args.size)
    case.case_id = f"phantom-demo-{args.side}" + ("" if args.size == "full" else f"-{args.size}")
    case_dir = phantom.write_case(case, out / case.case_id, force=True)  # the demo's own folder
    ct_path, ref_path = case_dir / "ct.nrrd", case_dir / "reference.seg.nrrd"
    print(f"Synthetic phantom case ({case.side} side operated, {case.geometry.size[0]}x{case.geometry.size[1]}x"
          f"{case.geometry.size[2]} voxels) written in {time.perf_counter() - t0:.1f} s to {case_dir.resolve()}:")
    for name in ("ct.nrrd", "reference.seg.nrrd", "reference-full.seg.nrrd", "case.json"):
        print(f"  {case_dir / name}")

    found = _find_model()
    seg_path = None
    if found is None:
        print("No segmentation model is installed yet (Resources/Models/parotid-oar-research-v1), "
              "so the demo stops after the phantom. Train or install a bundle, then run `make demo` again.")
    else:
        cascade, metrics, model_dir = found
        seg_path = case_dir / "segmentation.seg.nrrd"
        print(f"Segmenting with the model bundle {model_dir} ...")
        t1 = time.perf_counter()
        options = cascade.SegmentOptions(side=case.side, model_dir=str(model_dir), device=args.device, force=True)
        cascade.segment(ct_path, seg_path, options, report_path=case_dir / "segmentation-report.json")
        seconds = time.perf_counter() - t1
        pred, geometry, _ = segio.read_seg(seg_path)
        ref, _, _ = segio.read_seg(ref_path)
        result = metrics.compare_segmentations(pred, ref, geometry, names=list(labels.STRUCTURES))
        print(f"Cascade finished in {seconds:.1f} s. Agreement with the phantom reference (inside the ROI):")
        print(f"  {'structure':<26} {'DSC':>6} {'HD95 mm':>8}")
        for name, m in result["segments"].items():
            hd = m.get("hd95_mm")
            hd_text = f"{hd:8.2f}" if isinstance(hd, (int, float)) and hd == hd and hd != float("inf") else f"{'-':>8}"
            print(f"  {name:<26} {m['dsc']:6.3f} {hd_text}")
    print("Open in 3D Slicer: drag and drop ct.nrrd and reference.seg.nrrd"
          + (" and segmentation.seg.nrrd" if seg_path else "") + " onto the Slicer window, or run")
    files = [str(ct_path), str(ref_path)] + ([str(seg_path)] if seg_path else [])
    print("  Slicer " + " ".join(files))
    print(CLINICAL_NOTE)
    return 0
