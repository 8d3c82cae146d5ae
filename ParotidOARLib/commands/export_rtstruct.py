"""``python -m ParotidOARLib export-rtstruct`` — convert a reviewed ``.seg.nrrd`` into a DICOM RT Structure Set."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--seg", required=True, help="Segmentation (.seg.nrrd) on (or overlapping) the CT.")
    parser.add_argument("--dicom", required=True, help="Folder with the CT DICOM series the contours belong to.")
    parser.add_argument("--out", required=True, help="Output RTSTRUCT file (.dcm).")
    parser.add_argument("--name-map", default=None,
                        help="JSON file {canonical name: department name}, or 'tg263' for TG-263 style names.")
    parser.add_argument("--include-roi", action="store_true", help="Also export the ROI segment (type CONTROL).")
    parser.add_argument("--series-uid", default=None, help="CT Series Instance UID when the folder holds several.")
    parser.add_argument("--force", action="store_true", help="Replace an existing output file.")


def run(args) -> int:
    from .. import rtstruct

    out = rtstruct.export(args.seg, args.dicom, args.out, series_uid=args.series_uid, name_map=args.name_map,
                          include_roi=args.include_roi, force=args.force)
    print(f"Wrote {out} (research use only - not for clinical use)")
    return 0
