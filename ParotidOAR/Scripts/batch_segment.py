"""Headless batch segmentation inside 3D Slicer, through the module logic.

    Slicer --no-main-window --python-script ParotidOAR/Scripts/batch_segment.py -- \\
        --input DIR|cases.csv --side left|right|--side-from-json --out DIR [--mrb] [--force] \\
        [--model BUNDLE] [--device auto|cpu|gpu] [--roi-margin-mm 17] [--install-dependencies]

For each case (same discovery rules as ``python -m ParotidOARLib batch``) the CT
is read, added to the scene, segmented with ``ParotidOARLogic.segment`` (the
engine runs in a PythonSlicer subprocess, exactly as from the Segment tab) and
saved as ``OUT/<case>.seg.nrrd`` + ``OUT/<case>.report.json``; with ``--mrb``
the whole scene (CT, segmentation with its display settings, crop-box ROI) is
also saved as ``OUT/<case>.mrb``. Finished cases are skipped unless
``--force``; a failed case is reported and the batch goes on. A summary CSV is
written to ``OUT/batch-summary.csv``. Slicer exits with 0, or 1 if any case
failed, or 2 at once if a Python package is missing: no dialog is ever opened
(nobody could answer it under ``--no-main-window``); install the dependencies
from the module first, or pass ``--install-dependencies`` to install them
without asking. Research use only - not for clinical use.
"""

import argparse
import json
import os
import sys
import time
import traceback


def _paths():
    """Make ParotidOAR (module) and ParotidOARLib (engine) importable from this script's location."""
    here = os.path.dirname(os.path.abspath(globals().get("__file__") or sys.argv[0]))
    module_dir = os.path.dirname(here)
    for folder in (module_dir, os.path.dirname(module_dir)):
        if os.path.isdir(os.path.join(folder, "ParotidOARLib")) and folder not in sys.path:
            sys.path.insert(0, folder)
    if module_dir not in sys.path:
        sys.path.insert(0, module_dir)


def parse_args(argv):
    argv = [a for a in argv if a != "--"]
    p = argparse.ArgumentParser(prog="batch_segment.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    side = p.add_mutually_exclusive_group()
    side.add_argument("--side", choices=["left", "right"])
    side.add_argument("--side-from-json", action="store_true")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--roi-margin-mm", type=float, default=17.0)
    p.add_argument("--mrb", action="store_true", help="also save a .mrb scene per case")
    p.add_argument("--force", action="store_true", help="redo cases whose outputs exist")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per case before it is cancelled")
    p.add_argument("--install-dependencies", action="store_true",
                   help="install missing Python packages (torch through PyTorch Utils) without asking; by default "
                        "the batch stops at once when one is missing (no dialog can be answered headless)")
    return p.parse_args(argv)


def check_dependencies(install: bool) -> None:
    """Headless: never open a dialog. Missing packages stop the batch at once (DependencyError), unless
    ``install`` (``--install-dependencies``): then they are installed without asking."""
    from ParotidOARGui import Dependencies

    Dependencies.ensure(confirm=False, install=install)


def _atomic_json(path, data):
    tmp = f"{path}.part-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def segment_case(logic, case, args, out_dir):
    """One case: returns the report dict. Raises on any failure (the scene is cleared after)."""
    import slicer
    from ParotidOARLib import batch, preprocess, scene

    seg_path, report_path = batch.output_paths(out_dir, case.case_id)
    slicer.mrmlScene.Clear()
    array, geometry, _meta = preprocess.read_ct(case.input, series_uid=case.series_uid)
    volume = scene.add_volume(slicer.mrmlScene, array, geometry, case.case_id)
    volume.CreateDefaultDisplayNodes()
    segmentation = logic.segment(volume, case.side, device=args.device, modelDir=args.model,
                                 roiMarginMm=args.roi_margin_mm, timeout=args.timeout)
    segmentation.SetName(f"{case.case_id} OARs")
    tmp_seg = os.path.join(str(out_dir), f".{case.case_id}.part-{os.getpid()}.seg.nrrd")
    if not slicer.util.saveNode(segmentation, tmp_seg):
        raise RuntimeError(f"could not write {seg_path}")
    os.replace(tmp_seg, str(seg_path))
    segmentation.GetStorageNode().SetFileName(str(seg_path))
    report = scene.report_of(segmentation) or {}
    _atomic_json(str(report_path), report)
    if args.mrb:
        mrb = os.path.join(str(out_dir), f"{case.case_id}.mrb")
        tmp_mrb = os.path.join(str(out_dir), f".{case.case_id}.part-{os.getpid()}.mrb")
        if not slicer.util.saveScene(tmp_mrb):
            raise RuntimeError(f"could not write {mrb}")
        os.replace(tmp_mrb, mrb)
    return report


def main(argv):
    _paths()
    args = parse_args(argv)
    from ParotidOARGui.Dependencies import DependencyError

    try:  # before anything else: a missing package must not surface as a modal dialog nobody can answer
        check_dependencies(args.install_dependencies)
    except DependencyError as exc:
        print(f"batch_segment: {exc}", file=sys.stderr, flush=True)
        return 2
    import slicer
    from ParotidOAR import ParotidOARLogic
    from ParotidOARLib import batch
    from ParotidOARLib.errors import ParotidOARError

    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    cases = batch.discover_cases(args.input, side=args.side, side_from_json=args.side_from_json)
    logic = ParotidOARLogic()
    logic.ensureDependencies(confirm=False, install=args.install_dependencies)  # checked above: no dialog
    rows = []
    try:
        for n, case in enumerate(cases, start=1):
            prefix = f"[{n}/{len(cases)}] {case.case_id}"
            seg_path, report_path = batch.output_paths(out_dir, case.case_id)
            if case.error:
                rows.append(batch.summary_row(case, "failed", case.error))
                print(f"{prefix}: FAILED: {case.error}", flush=True)
                continue
            if not args.force and seg_path.exists() and report_path.exists():
                with open(report_path, encoding="utf-8") as f:
                    rows.append(batch.summary_row(case, "skipped", "outputs exist (use --force to redo)",
                                                  None, json.load(f)))
                print(f"{prefix}: skipped", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                report = segment_case(logic, case, args, out_dir)
            except ParotidOARError as exc:
                rows.append(batch.summary_row(case, "failed", str(exc), time.perf_counter() - t0))
                print(f"{prefix}: FAILED: {exc}", flush=True)
                continue
            except Exception as exc:  # one bad case must not stop the batch
                traceback.print_exc()
                rows.append(batch.summary_row(case, "failed", f"{type(exc).__name__}: {exc}",
                                              time.perf_counter() - t0))
                print(f"{prefix}: FAILED: {exc}", flush=True)
                continue
            finally:
                slicer.mrmlScene.Clear()
            seconds = time.perf_counter() - t0
            rows.append(batch.summary_row(case, "ok", "", seconds, report))
            print(f"{prefix}: ok in {seconds:.1f} s", flush=True)
    finally:
        batch.write_summary(os.path.join(out_dir, batch.SUMMARY_NAME), rows)
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"batch_segment: {len(rows) - failed} ok/skipped, {failed} failed; "
          f"summary {os.path.join(out_dir, batch.SUMMARY_NAME)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:  # argparse errors / --help
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception:
        traceback.print_exc()
        code = 2
    import slicer

    slicer.util.exit(code)
