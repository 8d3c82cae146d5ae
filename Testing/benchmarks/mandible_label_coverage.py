"""How far OpenKBP's Mandible label lets issue 13's all-slice mandible measure go (research use only).

OpenKBP's Mandible is an OAR contoured where dose mattered, often only up to some axial level, while the
17 mm ROI around the parotid reaches the condyle and the upper ramus. A prediction of ramus ∪ condyle
on the axial slices where the Mandible is not contoured at all counts as a false positive in the
all-slice precision, whatever the bone there is. This benchmark measures, per validation side, with
the ROI from the reference parotid (as issue 13's acceptance does):

* the shipped model's ramus ∪ condyle on the contoured slices and on the others (cc), and the CT
  numbers under each part: median HU and the fraction at ≥ 200 HU (cortical and trabecular bone), for
  the true positives, the false positives on contoured slices, and the prediction on the other slices;
* how far above the Mandible's highest contoured slice the prediction reaches (mm);
* **ceilings** for an ideal stage 2 that matches the reference exactly on the contoured slices and
  labels on the other slices only the predicted voxels at ≥ 200 HU (bone the reference leaves out):
  precision = ref / (ref + bone outside), DSC = 2·ref / (2·ref + bone outside). Recall stays 1.

It also draws, for the sides with the most prediction outside the contoured slices, a coronal and a
sagittal section through that prediction: CT, reference Mandible (green), prediction (red).

**Expert agreement on the same measure** (TCIA masks, Nikolov et al. 2021, CC BY 4.0; no CT needed): the
radiographers' Mandible against the oncologist-arbitrated one, inside the 17 mm ROI around the
oncologist's parotid, per side: DSC, precision and recall on the native grid (about 1×1×2.5 mm) and
with both in-ROI masks rasterised onto a 3.9×3.9×2.5 mm grid (area fraction ≥ 0.5; OpenKBP's grid).

    .venv/bin/python Testing/benchmarks/mandible_label_coverage.py [--threads 1] [--figures 3]
    .venv/bin/python Testing/benchmarks/mandible_label_coverage.py --tcia-only   # the expert part alone
Writes Testing/benchmarks/results/mandible_label_coverage.json and mandible_label_coverage.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BONE_HU = 200.0


def hu_stats(ct: np.ndarray, mask: np.ndarray) -> dict:
    v = ct[mask]
    if v.size == 0:
        return {"n": 0, "median_hu": None, "fraction_bone": None}
    return {"n": int(v.size), "median_hu": float(np.median(v)), "fraction_bone": float((v >= BONE_HU).mean())}


def cranial_sign(g) -> int:
    """+1 when the cranial direction (increasing LPS z) is increasing index 0 (k), else -1: index axis 0
    moves along the direction matrix's third column."""
    return 1 if g.direction_matrix[2, 2] >= 0 else -1


def side_measures(ct, g, mand_full, res) -> dict:
    from ParotidOARLib import labels as L, partial_labels

    roi = res.roi
    ref = mand_full & roi
    pred = (res.masks[L.RAMUS] | res.masks[L.CONDYLE]) & roi
    contoured = partial_labels.contoured_slices(mand_full)
    on, off = pred & contoured, pred & ~contoured
    tp, fp_on = on & ref, on & ~ref
    off_bone = off & (ct >= BONE_HU)
    vcc = g.voxel_volume_cc
    n_ref, n_bone_off = float(ref.sum()), float(off_bone.sum())
    top_ref = np.flatnonzero(mand_full.any(axis=(1, 2)))
    top_pred = np.flatnonzero(pred.any(axis=(1, 2)))
    dz = float(g.spacing_zyx[0])
    up = cranial_sign(g)
    reach = None
    if top_ref.size and top_pred.size:
        ref_end = top_ref.max() if up > 0 else top_ref.min()
        pred_end = top_pred.max() if up > 0 else top_pred.min()
        reach = float(max(0, (pred_end - ref_end) * up) * dz)
    out = {
        "ref_in_roi_cc": n_ref * vcc,
        "pred_cc": float(pred.sum()) * vcc,
        "pred_on_contoured_slices_cc": float(on.sum()) * vcc,
        "pred_off_contoured_slices_cc": float(off.sum()) * vcc,
        "pred_off_contoured_slices_bone_cc": n_bone_off * vcc,
        "reach_above_contoured_mm": reach,
        **dsc_precision_recall(pred, ref),
        "hu_true_positive": hu_stats(ct, tp),
        "hu_false_positive_on_contoured_slices": hu_stats(ct, fp_on),
        "hu_off_contoured_slices": hu_stats(ct, off),
        "ceiling_precision": n_ref / (n_ref + n_bone_off) if n_ref else None,
        "ceiling_dsc": 2 * n_ref / (2 * n_ref + n_bone_off) if n_ref else None,
    }
    return out


def draw(panels, path: Path) -> None:
    """Coronal and sagittal sections through the centroid of the prediction off the contoured slices
    (else of the whole prediction), cropped to the ROI, cranial up; dashed: the Mandible's last contoured slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ParotidOARLib import partial_labels

    fig, axes = plt.subplots(len(panels), 2, figsize=(7, 3.6 * len(panels)), squeeze=False)
    for row, (title, ct, g, ref, pred, roi) in zip(axes, panels):
        up = cranial_sign(g)
        off = pred & ~partial_labels.contoured_slices(ref if ref.any() else pred)
        _, cy, cx = (int(round(c)) for c in np.argwhere(off if off.any() else pred).mean(axis=0))
        lo = np.maximum(np.argwhere(roi).min(axis=0) - 4, 0)
        hi = np.argwhere(roi).max(axis=0) + 5
        zs = np.flatnonzero(ref.any(axis=(1, 2)))
        ref_end = (zs.max() if up > 0 else zs.min()) if zs.size else None
        sz, sy, sx = (float(s) for s in g.spacing_zyx)
        for ax, (sec, asp, name) in zip(row, (
                ((slice(None), cy, slice(lo[2], hi[2])), sz / sx, "coronal"),
                ((slice(None), slice(lo[1], hi[1]), cx), sz / sy, "sagittal"))):
            img, r, p = (a[sec][lo[0]:hi[0]] for a in (ct, ref, pred))
            if up > 0:  # row 0 = the most cranial slice: imshow's and contour's default (row 0 at the top)
                img, r, p = img[::-1], r[::-1], p[::-1]
            ax.imshow(np.clip(img, -200, 1200), cmap="gray", aspect=asp, interpolation="nearest")
            if r.any():
                ax.contour(r.astype(float), levels=[0.5], colors="lime", linewidths=1.2)
            if p.any():
                ax.contour(p.astype(float), levels=[0.5], colors="red", linewidths=1.0)
            if ref_end is not None:  # the cranial edge of the last contoured slice
                row = ref_end - lo[0]
                ax.axhline((img.shape[0] - 1 - row) - 0.5 if up > 0 else row - 0.5, color="yellow", ls="--", lw=0.8)
            ax.set_title(f"{title}, {name}", fontsize=9)
            ax.axis("off")
    fig.suptitle("OpenKBP Mandible (green), ramus ∪ condyle (red), last contoured slice (yellow);\n"
                 "reference-parotid ROI, cranial up", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def dsc_precision_recall(pred, ref) -> dict:
    """DSC, precision and recall of ``pred`` against ``ref`` (None where undefined)."""
    inter = float(np.logical_and(pred, ref).sum())
    return {"dsc": 2 * inter / float(pred.sum() + ref.sum()) if (pred.any() or ref.any()) else None,
            "precision": inter / pred.sum() if pred.any() else None,
            "recall": inter / ref.sum() if ref.any() else None}


def summarise_tcia(rows: list[dict]) -> dict:
    """Mean, SD, ... of every measure; how many sides the two readers drew identically (copied contours)."""
    from ParotidOARLib import metrics

    if not rows:
        return {}
    out = {k: metrics.describe([r[k] for r in rows]) for k in rows[0] if k not in ("case", "side")}
    out["identical_sides"] = sum(r["native_dsc"] >= 0.9999 for r in rows)
    return out


def tcia_interobserver(root: Path, margin_mm: float = 17.0, coarse=(3.9, 3.9, 2.5)) -> dict | None:
    """Radiographers' vs oncologist's Mandible inside the ROI around the oncologist's parotid."""
    from resolution_ceiling import rasterise
    from ParotidOARLib import imageio, roi as roi_mod

    if not (root / "oncologist").is_dir():
        return None
    rows = []
    for case in sorted((root / "oncologist").iterdir()):
        ma, mb = case / "Mandible.nrrd", root / "radiographer" / case.name / "Mandible.nrrd"
        if not (ma.exists() and mb.exists()):
            continue
        onc, g = imageio.read_image(ma)
        rad, _ = imageio.read_image(mb)
        onc, rad = onc > 0, rad > 0
        for organ in ("Parotid-Lt", "Parotid-Rt"):
            pf = case / f"{organ}.nrrd"
            if not pf.exists() or not onc.any() or not rad.any():
                continue
            par = imageio.read_image(pf)[0] > 0
            if not par.any():
                continue
            roi = roi_mod.expand(par, g, margin_mm)
            a, b = onc & roi, rad & roi
            if not a.any():
                continue
            row = {"case": case.name, "side": organ, "onc_in_roi_cc": float(a.sum()) * g.voxel_volume_cc,
                   **{f"native_{k}": v for k, v in dsc_precision_recall(b, a).items()}}
            ia, ib = imageio.to_sitk(a.astype(np.uint8), g), imageio.to_sitk(b.astype(np.uint8), g)
            row.update({f"coarse_{k}": v for k, v in dsc_precision_recall(rasterise(ib, coarse), rasterise(ia, coarse)).items()})
            rows.append(row)
            print(f"TCIA {case.name} {organ}: mandible in ROI {row['onc_in_roi_cc']:.1f} cc; radiographer vs "
                  f"oncologist DSC {row['native_dsc']:.3f} native, {row['coarse_dsc']:.3f} at "
                  f"{'x'.join(f'{c:g}' for c in coarse)} mm", flush=True)
    return {"source": "DeepMind tcia-ct-scan-dataset, Nikolov et al. 2021, CC BY 4.0", "margin_mm": margin_mm,
            "coarse_grid_mm": list(coarse), "n_sides": len(rows), "n_cases": len({r["case"] for r in rows}),
            "summary": summarise_tcia(rows), "rows": rows,
            "note": "reference = oncologist-arbitrated Mandible; compared = radiographers' (independent); both "
                    "clipped to the ROI (oncologist's parotid + margin), then rasterised (area fraction >= 0.5)"}


def reference_roi_runs(samples, bundle, model_dir, threads, step):
    """For each OpenKBP sample with a Mandible: ``(sample, side, ct, geometry, masks, result)``, the result
    being the cascade with the ROI from the reference parotid (issue 13's acceptance ROI)."""
    from ParotidOARLib import cascade, dataset

    for s in samples:
        ct, g, masks, side = dataset.load_sample(s)
        if "Mandible" not in masks or not masks["Mandible"].any():
            continue
        opts = cascade.SegmentOptions(side=side, model_dir=model_dir, threads=threads, step=step)
        yield s, side, ct, g, masks, cascade.run(ct, g, opts, bundle=bundle, parotid=masks["Parotid"],
                                                 parotid_source="reference")


def add_side_args(ap, out_name: str):
    """The options of the per-side mandible benchmarks (``mandible_boundary.py``, ``mandible_grid.py``): --model,
    --data, --limit, --threads and --out (default ``results/<out_name>``)."""
    ap.add_argument("--model", default=str(REPO / "Resources" / "Models" / "parotid-oar-research-v1"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "openkbp"))
    ap.add_argument("--limit", type=int, default=0, help="the first N validation sides with a Mandible (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / out_name))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "Resources" / "Models" / "parotid-oar-research-v1"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "openkbp"))
    ap.add_argument("--split", default="validation")
    ap.add_argument("--patients", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--step", type=float, default=0.5, help="sliding-window step (0.5 as eval_openkbp's figures)")
    ap.add_argument("--figures", type=int, default=3, help="sides drawn (most prediction off the contoured slices)")
    ap.add_argument("--tcia", default=str(REPO.parent / "shared" / "data" / "tcia-hn-masks"))
    ap.add_argument("--tcia-only", action="store_true",
                    help="only the expert part; the model part is kept from the existing JSON")
    ap.add_argument("--out", default=str(REPO / "Testing" / "benchmarks" / "results" / "mandible_label_coverage.json"))
    args = ap.parse_args(argv)
    if args.tcia_only:
        out_path = Path(args.out)
        out = json.loads(out_path.read_text()) if out_path.exists() else {}
        out["tcia_interobserver"] = tcia_interobserver(Path(args.tcia))
        out_path.write_text(json.dumps(out, indent=1, default=float))
        t = out["tcia_interobserver"]
        if t:
            sm = t["summary"]
            print(f"TCIA {t['n_sides']} sides: native DSC {sm['native_dsc']['mean']:.3f} P {sm['native_precision']['mean']:.3f} "
                  f"R {sm['native_recall']['mean']:.3f}; coarse DSC {sm['coarse_dsc']['mean']:.3f} P "
                  f"{sm['coarse_precision']['mean']:.3f} R {sm['coarse_recall']['mean']:.3f}; wrote {out_path}")
        return 0
    from eval_openkbp import EXCLUDE, find_samples
    from ParotidOARLib import cascade, labels as L, metrics

    samples = find_samples(args.data, args.split, args.patients)
    if samples is None:
        return 0
    bundle = cascade.load_model_bundle(args.model)
    rows, keep = [], []
    t0 = time.perf_counter()
    for s, side, ct, g, masks, res in reference_roi_runs(samples, bundle, args.model, args.threads, args.step):
        m = side_measures(ct, g, masks["Mandible"], res)
        if not m["ref_in_roi_cc"]:
            continue
        rows.append({"patient": s.patient, "side": side, **m})
        keep.append((m["pred_off_contoured_slices_cc"], f"{s.patient} {side}", ct, g, masks["Mandible"],
                     (res.masks[L.RAMUS] | res.masks[L.CONDYLE]) & res.roi, res.roi))
        keep = sorted(keep, key=lambda x: -x[0])[:args.figures]
        print(f"{s.patient} {side}: DSC {m['dsc']:.3f} P {m['precision']:.3f} R {m['recall']:.3f}; off contoured "
              f"slices {m['pred_off_contoured_slices_cc']:.2f} cc ({m['hu_off_contoured_slices']['fraction_bone'] or 0:.2f}"
              f" at >= {BONE_HU:.0f} HU), reach {m['reach_above_contoured_mm']} mm; ceiling P "
              f"{m['ceiling_precision']:.3f} DSC {m['ceiling_dsc']:.3f}", flush=True)

    def col(k, sub=None):
        return [(r[k][sub] if sub else r[k]) for r in rows]

    summary = {k: metrics.describe(col(k)) for k in (
        "dsc", "precision", "recall", "ref_in_roi_cc", "pred_off_contoured_slices_cc",
        "pred_off_contoured_slices_bone_cc", "reach_above_contoured_mm", "ceiling_precision", "ceiling_dsc")}
    for part in ("hu_true_positive", "hu_false_positive_on_contoured_slices", "hu_off_contoured_slices"):
        summary[part] = {k: metrics.describe(col(part, k)) for k in ("median_hu", "fraction_bone")}
    off = np.array(col("pred_off_contoured_slices_cc"))
    summary["sides_with_over_0.5cc_off_contoured_slices"] = int((off > 0.5).sum())
    summary["sides_with_ceiling_precision_below_0.80"] = int(sum(p < 0.80 for p in col("ceiling_precision")))
    out = {"model": bundle.manifest.model_id, "data": f"OpenKBP {args.split} (minus {', '.join(EXCLUDE)})",
           "roi_from": "reference", "step": args.step, "bone_hu": BONE_HU, "n_sides": len(rows),
           "seconds": round(time.perf_counter() - t0, 1), "summary": summary, "rows": rows,
           "tcia_interobserver": tcia_interobserver(Path(args.tcia)),
           "note": "ceiling_* = an ideal stage 2 equal to the reference on the Mandible's contoured slices that "
                   "labels, on the other slices, only the predicted voxels at >= bone_hu; precision and DSC over all "
                   "slices as issue 13 measures them."}
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    if keep:
        draw([k[1:] for k in keep], Path(args.out).with_suffix(".png"))
    print(f"{len(rows)} sides: DSC {summary['dsc']['mean']:.3f} P {summary['precision']['mean']:.3f} "
          f"R {summary['recall']['mean']:.3f}; ceiling P {summary['ceiling_precision']['mean']:.3f} "
          f"DSC {summary['ceiling_dsc']['mean']:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
