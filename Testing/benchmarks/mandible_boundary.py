"""Where stage 2's ramus ∪ condyle and OpenKBP's Mandible disagree on the slices the Mandible is contoured on.

Issue 13's mandible measure is scored on OpenKBP's 3.9×3.9×2.5 mm grid, inside the ROI from the reference
parotid. On the axial slices where the Mandible is contoured, this benchmark sorts every disagreeing voxel:

* **missed** (Mandible, not predicted) and **extra** (predicted, not Mandible) voxels;
* how far each lies from the other mask (the Euclidean distance transform, in mm): *at the boundary* when
  within one in-plane voxel (≤ 3.9 mm), *far* otherwise;
* its CT number: the fraction at ≥ 200 HU (bone) of the Mandible, of the missed and of the extra voxels;
* what the missed voxels were called instead (another OAR, or nothing).

Boundary disagreement at this grid is partial volume: a 3.9 mm voxel on the bone's edge is part bone, part
soft tissue, and the reference and the network (working at 1×1×2 mm, resampled back) may put it either way.
Far disagreement is a model error of shape.

    .venv/bin/python Testing/benchmarks/mandible_boundary.py [--limit N] [--model DIR] [--threads 2]

Writes Testing/benchmarks/results/mandible_boundary.json (research use only; OpenKBP, Babier et al. 2021).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from mandible_label_coverage import BONE_HU, add_side_args, reference_roi_runs  # noqa: E402


def side_row(res, masks, ct, g) -> dict | None:
    """The disagreement figures of one side (None when the Mandible inside the ROI is under 10 voxels)."""
    from scipy import ndimage

    from ParotidOARLib import labels as L, partial_labels

    contoured = partial_labels.contoured_slices(masks["Mandible"])
    ref = masks["Mandible"] & res.roi & contoured
    if ref.sum() < 10:
        return None
    pred = (res.masks[L.RAMUS] | res.masks[L.CONDYLE]) & res.roi & contoured
    miss, extra = ref & ~pred, pred & ~ref
    sp = g.spacing_zyx
    one_voxel = float(max(sp[1], sp[2])) + 1e-3
    d_miss = ndimage.distance_transform_edt(~pred, sampling=sp)[miss] if pred.any() else np.full(int(miss.sum()), np.inf)
    d_extra = ndimage.distance_transform_edt(~ref, sampling=sp)[extra]

    def frac(x):
        return float(np.mean(x)) if np.size(x) else None

    return {"ref_voxels": int(ref.sum()), "pred_voxels": int(pred.sum()), "missed": int(miss.sum()),
            "extra": int(extra.sum()), "dsc": 2.0 * float((ref & pred).sum()) / float(ref.sum() + pred.sum()),
            "missed_at_boundary": frac(d_miss <= one_voxel), "extra_at_boundary": frac(d_extra <= one_voxel),
            "missed_far_cc": float((d_miss > one_voxel).sum()) * g.voxel_volume_cc,
            "extra_far_cc": float((d_extra > one_voxel).sum()) * g.voxel_volume_cc,
            "ref_bone": frac(ct[ref] >= BONE_HU), "missed_bone": frac(ct[miss] >= BONE_HU),
            "extra_bone": frac(ct[extra] >= BONE_HU),
            "missed_called": {n: int((res.masks[n] & miss).sum()) for n in L.OARS
                              if n not in (L.RAMUS, L.CONDYLE) and (res.masks[n] & miss).any()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_side_args(ap, "mandible_boundary.json")
    a = ap.parse_args(argv)
    from eval_openkbp import find_samples

    from ParotidOARLib import cascade, metrics

    samples = find_samples(a.data, "validation")
    if samples is None:
        return 0
    b = cascade.load_model_bundle(a.model)
    rows, t0 = [], time.perf_counter()
    for s, side, ct, g, masks, res in reference_roi_runs(samples, b, a.model, a.threads, 0.5):
        row = side_row(res, masks, ct, g)
        if row is None:
            continue
        rows.append({"patient": s.patient, "side": side, **row})
        print(f"{s.patient} {side}: DSC {row['dsc']:.3f}, missed {row['missed']} ({row['missed_at_boundary'] or 0:.0%} at the "
              f"boundary, {row['missed_bone'] or 0:.0%} bone), extra {row['extra']}", flush=True)
        if len(rows) == a.limit:
            break
    tot = {k: int(sum(r[k] for r in rows)) for k in ("ref_voxels", "pred_voxels", "missed", "extra")}
    summary = {"sides": len(rows), "voxels": tot,
               **{k: metrics.describe([r[k] for r in rows]) for k in (
                   "dsc", "missed_at_boundary", "extra_at_boundary", "missed_far_cc", "extra_far_cc", "ref_bone",
                   "missed_bone", "extra_bone")}}
    out = {"benchmark": __doc__.splitlines()[0], "model": b.manifest.model_id,
           "command": "python Testing/benchmarks/mandible_boundary.py " + " ".join(argv or sys.argv[1:]),
           "roi": "reference parotid + 17 mm", "step": 0.5, "bone_hu": BONE_HU, "summary": summary, "rows": rows,
           "seconds": round(time.perf_counter() - t0, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
