"""How much parotid DSC the stage-1 grid itself costs, and what expert agreement looks like on a coarse grid.

1. Phantom: the *reference* residual parotid of held-out phantoms (seeds 0..19, default spacing) resampled
   onto an axis-aligned grid at 4×4×3 mm (the shipped stage 1) or 2×2×2 mm and back to the CT grid, linear
   with threshold 0.5 — what the cascade does with a perfect stage-1 output. DSC against the reference is
   the most a stage 1 on that grid can score.
2. OpenKBP: the same round trip through the real stage-1 preprocessing (side crop, 4×4×3 mm) on validation
   samples.
3. TCIA (Nikolov et al. 2021, CC BY 4.0): radiographer vs oncologist parotid DSC at the native grid and after
   rasterising both masks onto coarse grids (area fraction >= 0.5), i.e. expert agreement at OpenKBP-like
   resolution.

    .venv/bin/python Testing/benchmarks/resolution_ceiling.py [--openkbp-limit 24]

Writes Testing/benchmarks/results/resolution_ceiling.json. Research use only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = REPO.parent / "shared" / "data"


def dsc(a, b) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(int(a.sum()) + int(b.sum()), 1))


def phantom_part(n_cases):
    from eval_phantom import DEFAULT_SPACING, load_case
    from ParotidOARLib import labels as L
    from ParotidOARLib.stageprep import canonical_grid, resample_mask

    spacings = ((4.0, 4.0, 3.0), (2.0, 2.0, 2.0))
    vals = {sp: [] for sp in spacings}
    for seed in range(n_cases):
        c = load_case(seed, DEFAULT_SPACING, None)
        ref, g = c["labels_full"][L.PAROTID], c["geometry"]
        for sp in spacings:
            coarse = canonical_grid(g, sp)
            vals[sp].append(dsc(resample_mask(resample_mask(ref, g, coarse), coarse, g), ref))
    out = {}
    for sp, v in vals.items():
        out["x".join(f"{x:g}" for x in sp) + " mm"] = {"n": len(v), "mean": float(np.mean(v)),
                                                      "min": float(np.min(v)), "values": v}
        print(f"phantom parotid round trip at {sp}: DSC {np.mean(v):.3f} (min {np.min(v):.3f})", flush=True)
    return out


def openkbp_part(limit):
    from ParotidOARLib import dataset, stageprep, training

    root = SHARED / "openkbp" / "validation"
    if not root.is_dir():
        return None
    samples, _ = dataset.discover(root, "openkbp", exclude=("pt_221",))
    vals = []
    for s in samples[:limit]:
        ct, g, masks, side = dataset.load_sample(s)
        _ct1, m1, g1 = stageprep.stage1_arrays(ct, g, {"Parotid": masks["Parotid"]}, side, training.STAGE1_SPACING,
                                               body=masks.get("Body"))
        back = stageprep.resample_mask(m1["Parotid"], g1, g)
        vals.append(dsc(back, masks["Parotid"]))
    print(f"OpenKBP parotid round trip through the stage-1 grid: DSC {np.mean(vals):.3f} (n={len(vals)})", flush=True)
    return {"n": len(vals), "mean": float(np.mean(vals)), "min": float(np.min(vals))}


def rasterise(image, spacing):
    """Binary mask image → bool array on a coarse grid (same origin corner and direction), area fraction >= 0.5."""
    import SimpleITK as sitk

    f = sitk.Cast(image, sitk.sitkFloat32)
    osp, size = image.GetSpacing(), image.GetSize()
    nsize = [int(np.ceil(size[i] * osp[i] / spacing[i])) for i in range(3)]
    radius = [max(int(round(spacing[i] / osp[i] / 2)), 0) for i in range(3)]
    box = sitk.Mean(f, radius)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    corner = np.asarray(image.GetOrigin()) - direction @ (np.asarray(osp) / 2)
    origin = corner + direction @ (np.asarray(spacing) / 2)
    res = sitk.Resample(box, nsize, sitk.Transform(), sitk.sitkLinear, tuple(origin), tuple(spacing),
                        image.GetDirection(), 0.0)
    return sitk.GetArrayFromImage(res) >= 0.5


def tcia_part():
    import SimpleITK as sitk

    root = SHARED / "tcia-hn-masks"
    if not (root / "oncologist").is_dir():
        return None
    grids = {"native": None, "3.9x3.9x2.5 mm": (3.9, 3.9, 2.5), "4x4x3 mm": (4.0, 4.0, 3.0)}
    vals = {k: [] for k in grids}
    for case in sorted((root / "oncologist").iterdir()):
        for organ in ("Parotid-Lt", "Parotid-Rt"):
            a, b = case / f"{organ}.nrrd", root / "radiographer" / case.name / f"{organ}.nrrd"
            if not (a.exists() and b.exists()):
                continue
            ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
            na, nb = sitk.GetArrayFromImage(ia) > 0, sitk.GetArrayFromImage(ib) > 0
            if not (na.any() and nb.any()):
                continue
            for k, sp in grids.items():
                vals[k].append(dsc(na, nb) if sp is None else dsc(rasterise(ia, sp), rasterise(ib, sp)))
    out = {k: {"n": len(v), "mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1))} for k, v in vals.items()}
    print("TCIA parotid radiographer vs oncologist: " +
          ", ".join(f"{k} {v['mean']:.3f}" for k, v in out.items()), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phantom-cases", type=int, default=20)
    ap.add_argument("--openkbp-limit", type=int, default=24)
    ap.add_argument("--out", default=str(REPO / "Testing" / "benchmarks" / "results" / "resolution_ceiling.json"))
    args = ap.parse_args(argv)
    result = {"phantom_parotid_round_trip": phantom_part(args.phantom_cases),
              "openkbp_parotid_round_trip_stage1_grid": openkbp_part(args.openkbp_limit),
              "tcia_parotid_interobserver": tcia_part(),
              "note": "Round trip = reference mask -> coarse grid -> CT grid (linear, >= 0.5): the DSC a perfect "
                      "stage 1 on that grid would score. TCIA masks: Nikolov et al. 2021, CC BY 4.0."}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
