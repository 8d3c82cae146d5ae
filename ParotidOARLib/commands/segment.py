"""``python -m ParotidOARLib segment`` — run the two-stage cascade on one CT.

Example::

    python -m ParotidOARLib segment ct.nrrd --side left --out ct.seg.nrrd --report report.json

Research use only - not for clinical use.
"""

from __future__ import annotations

import signal


def add_arguments(p):
    p.add_argument("input", help="CT: NRRD / NIfTI / MHA file or a DICOM series folder")
    p.add_argument("--side", required=True, choices=["left", "right"],
                   help="operated side (patient left = LPS +x)")
    p.add_argument("--out", required=True,
                   help="output: .seg.nrrd (a Slicer segmentation with every structure and the ROI; the default "
                        "choice), or .nii.gz / .nii / .nrrd (a uint8 label map of the seven structures, with "
                        "OUT-STEM.labels.json beside it naming each label value)")
    p.add_argument("--model", default=None, help="model bundle folder (default: the installed "
                                                 "parotid-oar-research-v1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where the networks run: auto (CUDA if available, then Apple MPS, else CPU), cpu, cuda or mps (default auto)")
    p.add_argument("--roi-margin-mm", type=float, default=17.0, help="ROI margin around the parotid (default 17)")
    p.add_argument("--report", default=None, help="write a JSON report (volumes, timings, model, memory)")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.add_argument("--parotid", default=None, metavar="FILE",
                   help="use this parotid contour instead of stage 1 (.seg.nrrd with a 'Parotid' segment, or a "
                        "binary mask NRRD/NIfTI; resampled to the CT grid if needed): the ROI and the six OARs "
                        "are built from it, e.g. after correcting stage 1's parotid")
    p.add_argument("--no-side-check", dest="side_check", action="store_false",
                   help="skip the wrong-side check (stage 1 also run, coarsely, on the other side: a warning when "
                        "the chosen side's parotid looks intact and the other side's resected)")
    p.add_argument("--tta", action="store_true", help="left-right mirroring test-time augmentation (about 2x slower); "
                   "an imported nnU-Net stage mirrors along its checkpoint's axes instead (up to 8x)")
    p.add_argument("--progress-lines", action="store_true",
                   help="print machine-readable 'PROGRESS <0-100> <step>' lines on stdout")
    p.add_argument("--series-uid", default=None, help="DICOM: the series to use when the folder has several")
    p.add_argument("--rtstruct", default=None, help="also write a DICOM RT Structure Set (DICOM input only)")
    p.add_argument("--dicom-seg", default=None, help="also write a DICOM SEG object (DICOM input only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable cores)")
    add_speed_arguments(p)
    p.add_argument("--side-check-window", default="mirror", choices=["mirror", "side"],
                   help="where the wrong-side check runs stage 1: mirror = one window at the mirror image of the "
                        "chosen parotid (default), side = the whole other side (before issue 18; about 1 s slower)")


def add_speed_arguments(p):
    """``--step`` and ``--backend`` (``segment`` and ``batch``)."""
    p.add_argument("--step", type=float, default=None,
                   help="sliding-window step as a fraction of the patch, for both stages (default: 0.5 for stage 1, "
                        "nnU-Net's 50%% overlap, and 0.75 for stage 2, at least 25%% overlap and about a third of the "
                        "windows; --step 0.5 is the behaviour before issue 18; 1.0 = fewest windows)")
    p.add_argument("--backend", default="torch", choices=["torch", "openvino"],
                   help="what runs the networks: torch (default, the reference) or openvino (CPU only, faster, and "
                        "without importing torch once its converted model is cached; needs `pip install openvino`, "
                        "else torch is used with a one-line warning)")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(args) -> int:
    from ..backends import openvino_on_cpu, preload

    # the networks' runtime, imported while the CT is read (issue 18): torch ~1.1 s; openvino 0.2 s, and with it
    # on the CPU torch is not needed at all (backends.runs_without_torch)
    preload("openvino" if openvino_on_cpu(args.backend, args.device) else "torch")
    from ..cascade import SegmentOptions, segment
    from ..progress import Progress

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    prog = Progress(lines=args.progress_lines, bar=False if getattr(args, "quiet_progress", False) else None)
    try:
        opts = SegmentOptions(side=args.side, model_dir=args.model, device=args.device,
                              roi_margin_mm=args.roi_margin_mm, tta=args.tta, force=args.force,
                              series_uid=args.series_uid, threads=args.threads, step=args.step,
                              parotid_path=args.parotid, side_check=args.side_check,
                              side_check_window=args.side_check_window, backend=args.backend)
        report = segment(args.input, args.out, opts, progress=prog, report_path=args.report,
                         rtstruct_path=args.rtstruct, dicom_seg_path=args.dicom_seg)
    finally:
        prog.close()
        signal.signal(signal.SIGTERM, previous)
    vols = report["volumes_cc"]
    summary = ", ".join(f"{n} {v:.1f} cc" for n, v in vols.items())
    print(f"wrote {args.out} ({report['side']} side, ROI {report['roi_volume_cc']:.1f} cc; {summary}) "
          f"in {report['timings']['total']:.1f} s on {report['device']}")
    return 0
