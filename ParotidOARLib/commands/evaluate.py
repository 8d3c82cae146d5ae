"""``evaluate``: compare a segmentation with a reference (DSC, Jaccard, HD95, surface DSC, volumes).

Each of ``--pred`` / ``--ref`` may be

* a Slicer ``.seg.nrrd`` (segments by name);
* a label map (NRRD/NIfTI/MHA) with ``--name-map`` (JSON file or inline JSON,
  ``{"1": "Parotid", "2": "Auricula"}``);
* a single binary mask (NRRD/NIfTI/MHA; any one non-zero value), named by
  ``--name`` or by the file stem. Two single masks are always paired.

A prediction on another grid is resampled onto the reference grid
(nearest neighbour, physical space) and the result says so in ``notes``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import GeometryError, InputError


def add_arguments(parser):
    parser.add_argument("--pred", required=True, help="prediction: .seg.nrrd, label map or binary mask")
    parser.add_argument("--ref", required=True, help="reference: .seg.nrrd, label map or binary mask")
    parser.add_argument("--segments", nargs="+", metavar="NAME", help="segments to compare (default: all common)")
    parser.add_argument("--name-map", help="label value → name for label-map inputs (JSON file or inline JSON)")
    parser.add_argument("--pred-name-map", help="name map for the prediction only (overrides --name-map)")
    parser.add_argument("--ref-name-map", help="name map for the reference only (overrides --name-map)")
    parser.add_argument("--name", help="segment name for single binary-mask inputs (default: the file stem)")
    parser.add_argument("--tolerance-mm", nargs="+", metavar="NAME=MM", default=[],
                        help="surface-DSC tolerance per segment (NAME=MM) or for all (MM); defaults per organ")
    parser.add_argument("--dose", help="optional dose in Gy: RTDOSE (.dcm) or scalar volume, any grid; "
                                       "adds Dmean/D2cc/Dmax per segment")
    parser.add_argument("--json", required=True, help="output JSON file")
    parser.add_argument("--csv", help="optional per-segment CSV")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")


def parse_name_map(text) -> dict[int, str] | None:
    """JSON file path or inline JSON object → {label value: name}."""
    if not text:
        return None
    p = Path(text)
    try:
        raw = json.loads(p.read_text(encoding="utf-8")) if p.exists() else json.loads(text)
    except (ValueError, OSError) as exc:
        raise InputError(f"--name-map {text!r} is neither a readable JSON file nor inline JSON ({exc}). "
                         "Example: '{\"1\": \"Parotid\"}'.") from None
    if not isinstance(raw, dict) or not raw:
        raise InputError("A name map must be a non-empty JSON object such as {\"1\": \"Parotid\"}.")
    out = {}
    for k, v in raw.items():
        try:
            value = int(k)
        except ValueError:
            raise InputError(f"Name map key {k!r} is not an integer label value.") from None
        if value == 0:
            raise InputError("Label value 0 is background and cannot be named in a name map.")
        out[value] = str(v)
    return out


def evaluate(pred_path, ref_path, segments=None, name_map=None, pred_name_map=None, ref_name_map=None,
             name=None, tolerances=None, dose_path=None) -> dict:
    """Load both inputs, align grids, compare; returns the JSON-ready result dict."""
    from .. import metrics
    from ..segio import load_masks, lost_in_resampling, resample_masks_to

    pred_masks, pred_geom, pred_kind = load_masks(pred_path, pred_name_map or name_map, name)
    ref_masks, ref_geom, ref_kind = load_masks(ref_path, ref_name_map or name_map, name)
    notes = []
    if pred_kind == "mask" and ref_kind == "mask":
        (pn, pm), (rn, _) = next(iter(pred_masks.items())), next(iter(ref_masks.items()))
        if pn != rn:
            notes.append(f"Single masks paired: prediction {pn!r} compared with reference {rn!r}.")
            pred_masks = {rn: pm}
    if not pred_geom.same_grid(ref_geom):
        if not np.allclose(np.abs(np.linalg.det(pred_geom.direction_matrix)), 1, atol=1e-3):
            raise GeometryError(f"{pred_path} has a degenerate direction matrix.")
        resampled = resample_masks_to(pred_masks, pred_geom, ref_geom)
        compared = segments or [n for n in resampled if n in ref_masks]
        lost = lost_in_resampling(pred_masks, pred_geom, resampled, ref_geom, compared)
        if lost:
            raise GeometryError(f"The prediction {pred_path} does not overlap the reference {ref_path}: "
                                f"{'; '.join(lost)}. Check that both files belong to the same scan.")
        pred_masks = resampled
        notes.append(f"The prediction was on another grid (size {list(pred_geom.size)}, spacing "
                     f"{[round(s, 4) for s in pred_geom.spacing]} mm) and was resampled onto the reference grid "
                     "(nearest neighbour, physical space) before comparison.")
    result = metrics.compare_segmentations(pred_masks, ref_masks, ref_geom, names=segments, tolerances=tolerances)
    result["notes"] = notes + result["notes"]
    result["pred"] = str(pred_path)
    result["ref"] = str(ref_path)
    if dose_path:
        from .. import dose

        d, dgeom = dose.read_dose(dose_path)
        names = list(result["segments"])
        result["dose"] = dose.compare_dose(d, dgeom, ref_geom, pred_masks, ref_masks, names=names)
    return result


def run(args) -> int:
    from .. import metrics
    from ..imageio import check_outputs

    check_outputs([args.json, args.csv], args.force)  # before any work
    result = evaluate(args.pred, args.ref, segments=args.segments, name_map=parse_name_map(args.name_map),
                      pred_name_map=parse_name_map(args.pred_name_map),
                      ref_name_map=parse_name_map(args.ref_name_map), name=args.name,
                      tolerances=metrics.parse_tolerance_args(args.tolerance_mm), dose_path=args.dose)
    metrics.write_json(args.json, result, force=args.force)
    if args.csv:
        metrics.write_csv(args.csv, metrics.result_rows(result), metrics.SEGMENT_CSV_FIELDS, force=args.force)
    if not args.quiet:
        print(metrics.format_table(result))
        for note in result["notes"]:
            print(f"note: {note}")
        print(f"wrote {args.json}" + (f" and {args.csv}" if args.csv else ""))
    return 0
