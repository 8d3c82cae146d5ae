"""What ParotidOAR's linear resampling changes compared with nnU-Net's third-order splines.

    .venv/bin/python Testing/benchmarks/nnunet_resampling.py [--model DIR] [--phantoms 3] [--openkbp pt_201 ...]

nnU-Net resamples each CT to the configuration's spacing with third-order splines (nearest
neighbour along z only when the spacing is more than 3x anisotropic, which the head-and-neck CTs
and stage grids here are not). The cascade resamples with linear interpolation
(``preprocess.resample_region(..., "linear")``). This script runs the cascade twice per CT, once
as shipped and once with the CT resampled by SimpleITK's third-order B-spline (the interpolating
cubic spline, nnU-Net's order 3) onto the same stage-1 and stage-2 grids, and reports

* the input difference on the stage grids (mean / 99th percentile |HU|), and
* the Dice between the two outputs per structure (1.0 = the interpolation changes nothing).

Writes ``Testing/benchmarks/results/nnunet_resampling.json``.
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

import numpy as np  # noqa: E402

from ParotidOARLib import bundle, cascade, labels, phantom, preprocess  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def _dice(a, b):
    s = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if s == 0 else 2.0 * np.count_nonzero(a & b) / s


def run_both(ct, geometry, side, b):
    """(linear result, spline result, input differences per stage grid)."""
    original = preprocess.resample_region
    diffs = []

    def spline(array, geom, target, interpolator="linear", **kw):
        if interpolator != "linear":
            return original(array, geom, target, interpolator, **kw)
        # the spline reads a 4-voxel neighbourhood: resample from a generously padded source box, so
        # the crop's border does not enter (nnU-Net resamples the whole image)
        box = preprocess.source_index_box(geom, target, pad=4)
        if box is None:
            return original(array, geom, target, "bspline", **kw)
        sl = tuple(slice(a, b) for a, b in zip(*box))
        out = preprocess.resample_to(np.asarray(array)[sl], geom.crop(*box), target, "bspline", **kw)
        if np.asarray(array).dtype == np.int16 and out.dtype == np.float32:  # the CT, not a mask
            lin = original(array, geom, target, interpolator, **kw)
            d = np.abs(out - lin)
            diffs.append({"grid": list(target.size), "mean_abs_hu": round(float(d.mean()), 2),
                          "p99_abs_hu": round(float(np.percentile(d, 99)), 1)})
        return out

    opts = cascade.SegmentOptions(side=side, threads=1)
    lin = cascade.run(ct, geometry, opts, bundle=b)
    preprocess.resample_region = spline
    try:
        spl = cascade.run(ct, geometry, opts, bundle=b)
    finally:
        preprocess.resample_region = original
    return lin, spl, diffs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--phantoms", type=int, default=3)
    ap.add_argument("--openkbp", nargs="*", default=["pt_201", "pt_210"])
    ap.add_argument("--out", default=str(HERE / "results" / "nnunet_resampling.json"))
    a = ap.parse_args(argv)
    b = bundle.load_bundle(bundle.resolve_bundle_dir(a.model))
    rows = []
    cases = [("phantom", s) for s in range(a.phantoms)] + [("openkbp", p) for p in a.openkbp]
    for kind, key in cases:
        t0 = time.time()
        if kind == "phantom":
            case = phantom.generate_case(key, side="left")
            ct, geom, side = case.ct, case.geometry, "left"
        else:
            path = SHARED / "openkbp" / "validation" / key / "ct.nrrd"
            if not path.exists():
                continue
            ct, geom, _ = preprocess.read_ct(path)
            side = "left"
        lin, spl, diffs = run_both(ct, geom, side, b)
        dice = {n: round(_dice(lin.masks[n], spl.masks[n]), 4) for n in labels.STRUCTURES
                if lin.masks[n].any() or spl.masks[n].any()}
        vox = geom.voxel_volume_cc
        vols = {n: [round(float(lin.masks[n].sum()) * vox, 2), round(float(spl.masks[n].sum()) * vox, 2)]
                for n in labels.STRUCTURES}
        rows.append({"case": f"{kind}:{key}", "side": side, "input_difference": diffs, "dice_linear_vs_spline": dice,
                     "volumes_cc_linear_spline": vols, "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = {"model": b.manifest.model_id, "what": "cascade with linear (shipped) vs third-order B-spline CT "
           "resampling onto the same stage grids; Dice between the two outputs", "cases": rows}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
