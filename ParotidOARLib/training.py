"""Training both cascade stages (and the one-step ablation model).

Recipe (the paper's nnU-Net recipe, scaled for CPU):

* deep supervision, ``Σ_d 2^-(d-1)·(soft Dice + CE)`` (:mod:`losses`);
* SGD, Nesterov momentum 0.99, initial lr 1e-2, poly decay ``(1 - it/total)^0.9``, batch 2,
  gradient-norm clipping at 12;
* epochs of N iterations; after each epoch a validation on fixed patches of the
  validation cases (loss + "pseudo Dice", as nnU-Net) — cheap enough for CPU;
* patch sampling oversamples the foreground (``fg_fraction`` of patches centred on a
  labelled voxel, class-balanced);
* augmentation (:mod:`augment`): rotation, scaling, elastic, left-right mirror of side crops,
  intensity scale/shift, noise;
* mixed precision (autocast + GradScaler) on CUDA; DistributedDataParallel when launched with
  ``torchrun`` (``WORLD_SIZE > 1``): every rank samples its own patches, rank 0 validates,
  logs and saves;
* resumable: ``checkpoint_last.pt`` is written after every epoch (atomically); the best
  validation-Dice and lowest validation-loss weights are kept as ``checkpoint_best_dice.pt``
  and ``checkpoint_best_loss.pt``;
* ``log.csv`` / ``log.json`` and ``curve.png`` (loss and Dice per epoch).

Data enters as cached *items*: a normalisable int16 CT volume on the stage grid, an
integer label volume, the sampling box and optional channel mask — built by
:func:`stage1_items` / :func:`stage2_items` from datasets or phantoms.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import labels as L
from .augment import AugmentParams, sample_patch
from .errors import DatasetError, ParotidOARError
from .losses import DeepSupervisionLoss
from .network import UNetConfig, build
from .progress import Progress

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------
# defaults: CPU-sized networks and grids (stored in the bundle manifest)
# ---------------------------------------------------------------------------------
STAGE1_SPACING = (4.0, 4.0, 3.0)  # x, y, z mm — OpenKBP is ~3.9-4.7 x 2-2.5 mm
STAGE1_PATCH = (32, 48, 40)  # z, y, x (96 x 192 x 160 mm)
STAGE2_SPACING = (1.0, 1.0, 2.0)
STAGE2_PATCH = (32, 48, 48)
ROI_JITTER_MM = 6.0  # random shift of the ROI box per side, mimics stage-1 errors


def default_config(stage: int) -> UNetConfig:
    if stage == 1:
        return UNetConfig(in_channels=1, num_classes=2, base_features=16, max_features=128,
                          strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], deep_supervision=True)
    return UNetConfig(in_channels=1, num_classes=len(L.OARS) + 1, base_features=16, max_features=128,
                      strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], deep_supervision=True)


@dataclass
class TrainConfig:
    stage: int = 1
    run_dir: str = "runs/train"
    epochs: int = 20
    iterations_per_epoch: int = 50
    batch_size: int = 2
    lr: float = 1e-2
    momentum: float = 0.99
    weight_decay: float = 3e-5
    fg_fraction: float = 0.33
    patch: tuple = STAGE1_PATCH
    spacing: tuple = STAGE1_SPACING
    network: dict = field(default_factory=dict)
    augment: dict = field(default_factory=dict)
    val_patches: int = 24
    device: str = "auto"
    threads: int = 0
    seed: int = 0
    max_minutes: float = 0.0  # 0 = no wall-clock limit; else stop after the epoch that passes it
    init_checkpoint: str = ""  # start from these weights (fine-tuning); ignored when resuming
    stop_after_epoch: int = 0  # stop (resumably) after this epoch, e.g. to train in chunks; 0 = run to the end
    progress: bool = True
    #: "sample": each sample is foreground-centred with probability ``fg_fraction`` (first recipe);
    #: "batch": nnU-Net's rule — the last ``round(batch * fg_fraction)`` samples (at least one) of
    #: every batch are foreground-centred, so no batch lacks the foreground
    fg_mode: str = "sample"
    augment_preset: str = "legacy"  # "legacy" (first recipe) or "nnunet" (augment.AugmentParams.nnunet)
    #: with ``max_minutes``: True = the poly decay also follows the wall clock (first recipe);
    #: False = the lr follows the iteration count only and ``max_minutes`` just stops (resumably)
    lr_by_time: bool = True
    #: whole-volume validation every N epochs through the inference path (``volume_validator``); 0 = never
    val_every: int = 0
    #: stage 1: probability that a real (dataset) sample gets a simulated parotidectomy (``resection``)
    resect_p: float = 0.0
    #: CPU: every convolution through oneDNN (``inference.optimise_for_cpu``), forward and backward; the same
    #: numbers, faster where PyTorch's heuristic would pick its slow path (Testing/benchmarks/bench_train_step.py)
    onednn: bool = False


# ---------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------

def compute_normalisation(items, max_per_item: int = 20000, seed: int = 0) -> dict:
    """nnU-Net CT normalisation from the training items' foreground voxels:
    clip to the 0.5 / 99.5 percentiles, then z-score with the foreground mean / SD."""
    rng = np.random.default_rng(seed)
    vals = []
    for it in items:
        fg = it["ct"][it["label"] > 0] if it.get("norm_mask") is None else it["ct"][it["norm_mask"]]
        if fg.size > max_per_item:
            fg = rng.choice(fg, max_per_item, replace=False)
        vals.append(fg.astype(np.float32))
    v = np.concatenate(vals) if vals else np.array([0.0, 1.0], np.float32)
    lo, hi = np.percentile(v, [0.5, 99.5])
    vc = np.clip(v, lo, hi)
    return {"clip": [float(lo), float(hi)], "mean": float(vc.mean()), "std": float(max(vc.std(), 1e-3)),
            "source": "foreground percentiles 0.5/99.5 + z-score (nnU-Net CT scheme)"}


def normalise(ct, norm: dict) -> np.ndarray:
    try:
        from . import preprocess

        return preprocess.normalise(ct, norm).astype(np.float32, copy=False)
    except (ImportError, AttributeError):
        lo, hi = norm["clip"]
        return ((np.clip(ct.astype(np.float32), lo, hi) - norm["mean"]) / norm["std"]).astype(np.float32)


# ---------------------------------------------------------------------------------
# items (cached, preprocessed training cases)
# ---------------------------------------------------------------------------------

def _save_npz(path: Path, **arrays):
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _item_from_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    d["meta"] = json.loads(str(d.pop("meta_json")))
    return d


def stage1_item(sample, spacing=STAGE1_SPACING, side_cut: str = "ct") -> dict:
    """Load one dataset sample → stage-1 item (side crop on the stage-1 grid).

    ``side_cut="ct"`` finds the body midline from the CT (> −400 HU), exactly as ``segment`` does;
    ``"body"`` uses the dataset's Body mask (the first recipe; OpenKBP's Body is the dose region,
    up to 11.8 mm off the CT's midline)."""
    from . import dataset
    from .stageprep import stage1_arrays

    if side_cut not in ("ct", "body"):
        raise ValueError(f"side_cut must be 'ct' or 'body', got {side_cut!r}")
    ct, g, masks, side = dataset.load_sample(sample)
    body = masks.get("Body") if side_cut == "body" else None
    keep = {"Parotid": masks["Parotid"]}
    if "Mandible" in masks:
        keep["Mandible"] = masks["Mandible"]
    ct1, m1, g1 = stage1_arrays(ct, g, keep, side, spacing, body=body)
    label = m1["Parotid"].astype(np.uint8)
    norm_mask = m1["Parotid"]  # nnU-Net: foreground intensities
    meta = {"patient": sample.patient, "side": side, "geometry": g1.to_dict(), "source": str(sample.ct_path.parent)}
    out = {"ct": ct1, "label": label, "norm_mask": norm_mask, "meta": meta}
    if "Mandible" in m1:
        out["mandible"] = m1["Mandible"]
    return out


class Stage1VolumeValidator:
    """Whole-volume stage-1 validation through the inference path: ``cascade.run(parotid_only=True)``
    with the network being trained — the same side cut, grid, sliding window and post-processing
    as ``segment`` — scored by DSC against each sample's reference parotid on the CT's own grid.

    The samples are loaded once (OpenKBP: ~6 MB per side)."""

    def __init__(self, samples, spacing, patch, threads: int | None = None, log=print):
        from . import dataset

        self.spacing, self.patch, self.threads = tuple(spacing), tuple(int(v) for v in patch), threads or None
        self.cases = []
        for s in samples:
            ct, g, masks, side = dataset.load_sample(s)
            self.cases.append((s.patient, side, ct, g, np.asarray(masks["Parotid"], bool)))
        log(f"whole-volume validation: {len(self.cases)} samples")

    def __call__(self, model, norm: dict) -> dict:
        import copy

        from . import bundle as bundle_mod, cascade
        from .errors import EmptyStructureError

        device = next(model.parameters()).device
        net = copy.deepcopy(model).float().eval()
        spec = bundle_mod.stage_spec(["background", L.PAROTID], self.spacing, norm, self.patch, net.config)
        man = bundle_mod.Manifest(name="training-validation", version="0", stages={"stage1": spec})
        bun = bundle_mod.Bundle("<in-memory>", man)
        dev_name = "cuda" if device.type == "cuda" else "cpu"
        bun._models[("stage1", str(torch.device(dev_name)))] = net
        rows = []
        for patient, side, ct, g, ref in self.cases:
            opts = cascade.SegmentOptions(side=side, device=dev_name, threads=self.threads, side_check=False)
            try:
                pred = cascade.run(ct, g, opts, bundle=bun, parotid_only=True).masks[L.PAROTID]
                inter = float(np.count_nonzero(pred & ref))
                dsc = 2 * inter / max(float(np.count_nonzero(pred) + np.count_nonzero(ref)), 1.0)
            except EmptyStructureError:
                dsc = 0.0
            rows.append({"patient": patient, "side": side, "dsc": round(dsc, 4)})
        d = np.array([r["dsc"] for r in rows], float)
        return {"mean_dsc": float(d.mean()) if d.size else 0.0, "median_dsc": float(np.median(d)) if d.size else 0.0,
                "sd_dsc": float(d.std()) if d.size else 0.0, "n": int(d.size), "rows": rows}


def stage2_item(sample, spacing=STAGE2_SPACING, margin_mm: float = L.ROI_MARGIN_MM_DEFAULT) -> dict:
    """Load one dataset sample → stage-2 item: the reference parotid + 17 mm ROI box (+ context for
    the sampling-time jitter) on the stage-2 grid, labels = the OARs the case has. OARs the case
    lacks are marked unlabelled in ``channel_mask`` (their Dice/CE terms are masked out)."""
    from . import dataset
    from .stageprep import expand_roi, stage2_arrays

    ct, g, masks, side = dataset.load_sample(sample)
    roi = expand_roi(masks["Parotid"], g, margin_mm)
    oar = {n: masks[n] for n in L.OARS if n in masks}
    ct2, m2, roi2, g2 = stage2_arrays(ct, g, oar, spacing, roi, context_mm=ROI_JITTER_MM + 10.0)
    label = _oar_label(m2, ct2.shape)
    channel_mask = np.array([1] + [int(n in m2) for n in L.OARS], np.uint8)
    meta = {"patient": sample.patient, "side": side, "geometry": g2.to_dict(), "source": str(sample.ct_path.parent),
            "oars": [n for n in L.OARS if n in m2]}
    return {"ct": ct2, "label": label, "roi": roi2, "channel_mask": channel_mask, "meta": meta}


def cached_items(samples, build_fn, cache_dir: Path, tag: str, log=print) -> list[dict]:
    """Build (or load) one cached item per sample: ``cache_dir/<patient>_<side>.npz``."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    items = []
    t0 = time.time()
    for i, s in enumerate(samples):
        p = cache_dir / f"{s.patient}_{s.side}.npz"
        if p.exists():
            it = _item_from_npz(p)
            if it["meta"].get("tag") == tag:
                items.append(it)
                continue
        it = build_fn(s)
        it["meta"]["tag"] = tag
        arrays = {k: v for k, v in it.items() if isinstance(v, np.ndarray)}
        _save_npz(p, meta_json=np.array(json.dumps(it["meta"])), **arrays)
        items.append(it)
        if (i + 1) % 20 == 0:
            log(f"  cached {i + 1}/{len(samples)} ({time.time() - t0:.0f} s)")
    return items


def _oar_label(masks: dict, shape) -> np.ndarray:
    """OAR masks → one label map (value = 1 + index in ``L.OARS``); OARs absent from ``masks`` stay 0.
    Overlapping masks: the later OAR wins (the phantom's OARs do not overlap)."""
    label = np.zeros(shape, np.uint8)
    for v, n in enumerate(L.OARS, start=1):
        if n in masks:
            label[masks[n]] = v
    return label


def phantom_stage2_items(seed: int, side="random", spacing_case=(0.98, 0.98, 2.0), size="full",
                         stage_spacing=STAGE2_SPACING, context_mm=None, one_step=True, **overrides):
    """Generate one phantom → (stage-2 item, one-step item or None).

    Stage 2: the reference-ROI box (+ ``context_mm`` so ROI jitter can be applied at sampling
    time) on the stage-2 grid. One-step (ablation): the whole side crop, cut to the body's
    bounding box (+10 mm), on the same grid spacing."""
    from . import phantom
    from .stageprep import stage1_arrays, stage2_arrays

    case = phantom.generate_case(seed, side=side, spacing=spacing_case, size=size, **overrides)
    oar = {n: case.labels_full[n] for n in L.OARS}
    ctx = ROI_JITTER_MM + 10.0 if context_mm is None else context_mm
    ct2, m2, roi2, g2 = stage2_arrays(case.ct, case.geometry, oar, stage_spacing, case.roi, context_mm=ctx)
    meta = {"patient": f"phantom-{seed}", "side": case.side, "geometry": g2.to_dict(), "seed": seed,
            "spacing_case": list(spacing_case)}
    item2 = {"ct": ct2, "label": _oar_label(m2, ct2.shape), "roi": roi2, "meta": meta}
    item1 = None
    if one_step:
        item1 = one_step_item(case.ct, case.geometry, oar, case.side, stage_spacing)
        item1["meta"].update({"patient": f"phantom-{seed}", "seed": seed, "spacing_case": list(spacing_case)})
    return item2, item1


def one_step_item(ct, geometry, oar_masks: dict, side: str, stage_spacing=STAGE2_SPACING, margin_mm=10.0):
    from .stageprep import canonical_grid, resample_mask, resample_to, side_cropped_grid

    gs = side_cropped_grid(ct, geometry, side, stage_spacing)
    # cut the side crop to the body's bounding box (+ margin): same anatomy, far fewer voxels
    body = ct > -400
    idx = np.argwhere(body)
    corners = np.array([[i, j, k] for i in (idx[:, 2].min(), idx[:, 2].max()) for j in (idx[:, 1].min(), idx[:, 1].max())
                        for k in (idx[:, 0].min(), idx[:, 0].max())], float)
    blps = geometry.index_to_lps(corners)
    lo_s = np.asarray(gs.origin) - np.asarray(gs.spacing) / 2
    hi_s = lo_s + np.asarray(gs.size) * np.asarray(gs.spacing)
    lo = np.maximum(lo_s, blps.min(0) - margin_mm)
    hi = np.minimum(hi_s, blps.max(0) + margin_mm)
    g = canonical_grid(geometry, stage_spacing, lo, hi)
    ct1 = np.round(resample_to(ct.astype(np.float32), geometry, g, "linear", -1000)).astype(np.int16)
    m1 = {n: resample_mask(m, geometry, g) for n, m in oar_masks.items()}
    return {"ct": ct1, "label": _oar_label(m1, ct1.shape), "meta": {"side": side, "geometry": g.to_dict()}}


def phantom_stage1_item(seed: int, side="random", spacing_case=(0.98, 0.98, 2.0), size="full",
                        stage_spacing=STAGE1_SPACING) -> dict:
    from . import phantom
    from .stageprep import stage1_arrays

    case = phantom.generate_case(seed, side=side, spacing=spacing_case, size=size)
    ct1, m1, g1 = stage1_arrays(case.ct, case.geometry, {"Parotid": case.labels_full[L.PAROTID]},
                                case.side, stage_spacing)
    meta = {"patient": f"phantom-{seed}", "side": case.side, "geometry": g1.to_dict(), "seed": seed}
    return {"ct": ct1, "label": m1["Parotid"].astype(np.uint8), "meta": meta}


def foreground_centres(label: np.ndarray, classes, limit: int = 4000) -> dict:
    """{class: up to ``limit`` voxel indices of that class, evenly spread}, for the classes present."""
    fg = {}
    for c in classes:
        idx = np.argwhere(label == c)
        if len(idx):
            if len(idx) > limit:
                idx = idx[np.linspace(0, len(idx) - 1, limit).astype(int)]
            fg[int(c)] = idx
    return fg


def prepare(items: list[dict], norm: dict, stage: int, patch, jitter_mm: float = ROI_JITTER_MM) -> list[dict]:
    """Normalise and index the items for sampling (in memory, float32 torch)."""
    out = []
    for it in items:
        g = it["meta"]["geometry"]
        sp_zyx = (g["spacing"][2], g["spacing"][1], g["spacing"][0])
        lab = it["label"]
        if it["meta"].get("partial"):  # group-labelled real crop (partial_labels): mandible and rind centres
            from .partial_labels import SAMPLING_GROUPS as classes
        else:
            classes = [c for c in np.unique(lab) if c != 0]
        fg = foreground_centres(lab, classes)
        if "roi" in it and stage == 2 and it["roi"].any():
            ridx = np.argwhere(it["roi"])
            box = (ridx.min(0), ridx.max(0) + 1)
            jit = np.ceil(jitter_mm / np.asarray(sp_zyx)).astype(int)
        else:
            nz = np.argwhere(it["ct"] > -400) if (it["ct"] > -400).any() else np.argwhere(np.ones_like(lab))
            box = (nz.min(0), nz.max(0) + 1)
            jit = np.zeros(3, int)
        out.append({"image": torch.from_numpy(normalise(it["ct"], norm).astype(np.float16)),
                    "label": torch.from_numpy(lab.astype(np.uint8)),
                    "fg": fg, "box": box, "jitter": jit, "spacing_zyx": sp_zyx,
                    "pad": float(normalise(np.array([-1000.0]), norm)[0]), "meta": it["meta"],
                    "channel_mask": it.get("channel_mask"),
                    # a dataset CT (not a phantom, not group-labelled): may get a simulated resection
                    "real": stage == 1 and "seed" not in it["meta"] and not it["meta"].get("partial"),
                    "norm": norm})
    return out


def forced_foreground(i: int, batch_size: int, fg_fraction: float) -> bool:
    """nnU-Net's ``get_do_oversample``: sample ``i`` of a batch is foreground-centred when it is among
    the last ``batch_size - round(batch_size * (1 - fg_fraction))`` (at least the last one)."""
    return i >= min(batch_size - 1, round(batch_size * (1 - fg_fraction)))


def _resected(it: dict, rng: np.random.Generator) -> dict:
    """A copy of a prepared stage-1 item with a simulated parotidectomy (``resection.simulate``)."""
    from . import resection
    from .imageio import Geometry

    norm = it["norm"]
    g = Geometry.from_dict(it["meta"]["geometry"])
    img, lab, _ = resection.simulate(it["image"].numpy(), it["label"].numpy(), it["spacing_zyx"], rng,
                                     lambda hu: float(normalise(np.array([hu]), norm)[0]),
                                     side=it["meta"].get("side", "left"), direction_matrix=g.direction_matrix)
    fg = np.argwhere(lab > 0)
    return {**it, "image": torch.from_numpy(img.astype(np.float16)), "label": torch.from_numpy(lab),
            "fg": {1: fg} if len(fg) else {}}


def sample_batch(items, batch_size, patch, rng, fg_fraction, aug: AugmentParams, n_classes: int,
                 fg_mode: str = "sample", resect_p: float = 0.0):
    imgs, labs, cms = [], [], []
    for i in range(batch_size):
        it = items[rng.integers(len(items))]
        if resect_p and it.get("real") and it["fg"] and rng.random() < resect_p:
            it = _resected(it, rng)
        if fg_mode == "batch":
            want_fg = forced_foreground(i, batch_size, fg_fraction)
            if want_fg and not it["fg"]:  # an item without foreground cannot give a foreground patch
                with_fg = [x for x in items if x["fg"]]
                it = with_fg[rng.integers(len(with_fg))] if with_fg else it
        else:
            want_fg = rng.random() < fg_fraction
        if it["fg"] and want_fg:
            c = list(it["fg"].keys())[rng.integers(len(it["fg"]))]
            centre = it["fg"][c][rng.integers(len(it["fg"][c]))].astype(float)
        else:
            lo, hi = it["box"]
            # the stage-2 crop of the cascade is the ROI box padded to the patch: centre
            # within the box, jittered like a stage-1 error
            lo = np.asarray(lo) - it["jitter"]
            hi = np.asarray(hi) + it["jitter"]
            centre = np.array([rng.uniform(a, max(a, b - 1)) for a, b in zip(lo, hi)])
        img, lab, _ = sample_patch(it["image"], it["label"], centre, patch, it["spacing_zyx"], rng, aug,
                                   pad_value=it["pad"])
        imgs.append(img)
        labs.append(lab)
        cm = it.get("channel_mask")
        cms.append(torch.ones(n_classes) if cm is None else torch.as_tensor(cm, dtype=torch.float32))
    return torch.stack(imgs), torch.stack(labs), torch.stack(cms)


def fixed_val_patches(items, n, patch, seed, fg_fraction=0.5, n_classes=2):
    rng = np.random.default_rng(seed + 12345)
    batches = []
    for i in range(n):
        x, y, cm = sample_batch([items[i % len(items)]], 1, patch, rng, fg_fraction, AugmentParams.none(), n_classes)
        batches.append((x, y, cm))
    return batches


# ---------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ParotidOARError("--device cuda was requested but no CUDA GPU is available. Use --device cpu.")
    return torch.device(name)


def poly_lr(cfg: TrainConfig, iteration: int, elapsed_s: float) -> float:
    """Poly decay ``lr·(1 − f)^0.9`` with f = iteration / (epochs × iterations per epoch). With
    ``max_minutes`` and ``lr_by_time`` (the first recipe) f is whichever of that and the spent share of
    the wall-clock budget is larger; the time part moves once per epoch, from the elapsed time all
    ranks agree on, so every DDP rank takes the same step. Without ``lr_by_time`` the budget only stops."""
    frac = iteration / max(cfg.epochs * cfg.iterations_per_epoch, 1)
    if cfg.max_minutes and cfg.lr_by_time:
        frac = max(frac, elapsed_s / (60 * cfg.max_minutes))
    return cfg.lr * max(0.0, 1 - min(frac, 1.0)) ** 0.9


def _dist_info():
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return ws, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _atomic_torch_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _plot(log_rows, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ep = [r["epoch"] for r in log_rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [r["train_loss"] for r in log_rows], label="train loss")
    ax[0].plot(ep, [r["val_loss"] for r in log_rows], label="validation loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    ax[1].plot(ep, [r["val_dice"] for r in log_rows], label="validation pseudo-Dice (mean)")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylim(0, 1)
    ax[1].legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate_patches(model, batches, loss_fn, device, n_classes):
    model.eval()
    losses, inter, denom = [], np.zeros(n_classes), np.zeros(n_classes)
    for x, y, cm in batches:
        out = model(x.to(device))
        losses.append(float(loss_fn(out, y.to(device), cm.to(device))))
        pred = out.argmax(1).cpu()
        classes = cm.sum(1) > 0  # group-labelled samples (all-zero channel mask) count in the loss only
        if not bool(classes.any()):
            continue
        pred, y = pred[classes], y[classes]
        for c in range(1, n_classes):
            p, t = pred == c, y == c
            inter[c] += float((p & t).sum())
            denom[c] += float(p.sum() + t.sum())
    model.train()
    dice = [2 * inter[c] / denom[c] if denom[c] > 0 else float("nan") for c in range(1, n_classes)]
    return float(np.mean(losses)), dice


def train(cfg: TrainConfig, train_items: list[dict], val_items: list[dict], norm: dict, resume: bool = False,
          log=print, volume_validator=None) -> dict:
    """Train one network. Returns the training record (also in run_dir/record.json).

    ``volume_validator(model, norm) -> {"mean_dsc": float, ...}`` (e.g. :class:`Stage1VolumeValidator`)
    runs every ``cfg.val_every`` epochs; the checkpoint with its best mean is kept as
    ``checkpoint_best_volume.pt``, its curve drawn to ``volume_curve.png``."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    world, rank, local_rank = _dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if cfg.threads:  # 0 = torch's default
        from .inference import check_threads

        torch.set_num_threads(check_threads(cfg.threads))
    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    net_cfg = UNetConfig.from_dict(cfg.network) if cfg.network else default_config(cfg.stage)
    n_classes = net_cfg.num_classes
    patch = tuple(int(v) for v in cfg.patch)
    div = net_cfg.divisor
    if any(p % d for p, d in zip(patch, div)):
        raise ParotidOARError(f"Patch {patch} must be a multiple of the network divisor {div}.")
    torch.manual_seed(cfg.seed * 1000 + rank * 7919)  # same initial weights on every rank / rerun
    model = build(net_cfg).to(device)
    if cfg.onednn and device.type == "cpu":
        from .inference import optimise_for_cpu

        optimise_for_cpu(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    n_out = len(net_cfg.strides) - 1
    loss_fn = DeepSupervisionLoss(n_out)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    aug = AugmentParams.preset(cfg.augment_preset, **(cfg.augment or {}))
    state = {"iteration": 0, "epoch": 0, "best_dice": -1.0, "best_loss": float("inf"), "log": [],
             "ema_dice": None, "elapsed_s": 0.0, "best_volume_dsc": -1.0, "volume_log": []}
    last = run / "checkpoint_last.pt"
    if resume and last.exists():
        ck = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if use_amp and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        state = {"best_volume_dsc": -1.0, "volume_log": [], **ck["state"]}
        log(f"resumed from {last} at iteration {state['iteration']} (epoch {state['epoch']})")
    else:
        if resume:
            log(f"--resume: no checkpoint in {run}; starting fresh")
        if cfg.init_checkpoint:
            src = Path(cfg.init_checkpoint)
            if src.is_dir():  # a model bundle: its stage's weights (SHA-256 checked)
                from . import bundle as bundle_mod

                man = bundle_mod.verify(src)
                src = src / man.stage(f"stage{cfg.stage}")["file"]
            ck0 = torch.load(src, map_location=device, weights_only=False)
            model.load_state_dict(ck0["model"] if "model" in ck0 else ck0)
            log(f"initialised from {cfg.init_checkpoint}")
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    rng = np.random.default_rng(cfg.seed * 1000 + rank * 7919)
    if state.get("rng") and world == 1:  # resume the exact sampling stream
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(torch.as_tensor(state["torch_rng"], dtype=torch.uint8))
    val_batches = fixed_val_patches(val_items or train_items, cfg.val_patches, patch, cfg.seed, n_classes=n_classes)
    (run / "train_config.json").write_text(json.dumps({**asdict(cfg), "network": net_cfg.to_dict(),
                                                       "normalisation": norm}, indent=2))
    model.train()
    while state["epoch"] < cfg.epochs:
        bar = Progress(bar=None if cfg.progress and rank == 0 else False, unit="iteration")  # tqdm on a TTY
        t_epoch = time.time()
        losses = []
        for i in range(cfg.iterations_per_epoch):
            lr = poly_lr(cfg, state["iteration"], state["elapsed_s"])
            for gparam in opt.param_groups:
                gparam["lr"] = lr
            x, y, cm = sample_batch(train_items, cfg.batch_size, patch, rng, cfg.fg_fraction, aug, n_classes,
                                    cfg.fg_mode, resect_p=cfg.resect_p if cfg.stage == 1 else 0.0)
            x, y, cm = x.to(device), y.to(device), cm.to(device)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=use_amp):
                out = ddp_model(x)
            loss = loss_fn([o.float() for o in out] if isinstance(out, list) else out.float(), y, cm)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
            state["iteration"] += 1
            bar.advance(i + 1, cfg.iterations_per_epoch,
                        f"epoch {state['epoch'] + 1}/{cfg.epochs} loss {np.mean(losses[-20:]):.3f} | val Dice "
                        f"{state['ema_dice'] if state['ema_dice'] is not None else float('nan'):.3f}")
        bar.close()
        state["epoch"] += 1
        state["elapsed_s"] += time.time() - t_epoch
        if world > 1:  # one clock for all ranks: the same lr and the same stop decision everywhere
            t = torch.tensor([state["elapsed_s"]], dtype=torch.float64,
                             device=device if device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            state["elapsed_s"] = float(t.item())
        if rank == 0:
            vloss, vdice = evaluate_patches(model, val_batches, loss_fn, device, n_classes)
            mdice = float(np.nanmean(vdice)) if not all(math.isnan(d) for d in vdice) else 0.0
            state["ema_dice"] = mdice if state["ema_dice"] is None else 0.9 * state["ema_dice"] + 0.1 * mdice
            row = {"epoch": state["epoch"], "iteration": state["iteration"], "lr": lr,
                   "train_loss": float(np.mean(losses)), "val_loss": vloss, "val_dice": mdice,
                   "val_dice_ema": state["ema_dice"], "val_dice_per_class": vdice, "elapsed_s": state["elapsed_s"]}
            state["log"].append(row)
            state["rng"] = rng.bit_generator.state
            state["torch_rng"] = torch.get_rng_state().tolist()
            ck = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                  "scaler": scaler.state_dict() if use_amp else None, "state": state,
                  "network": net_cfg.to_dict(), "normalisation": norm, "patch": list(patch),
                  "spacing": list(cfg.spacing), "stage": cfg.stage}
            if state["ema_dice"] > state["best_dice"]:
                state["best_dice"] = state["ema_dice"]
                _atomic_torch_save({**ck, "selected_by": "best validation Dice (EMA)"}, run / "checkpoint_best_dice.pt")
            if vloss < state["best_loss"]:
                state["best_loss"] = vloss
                _atomic_torch_save({**ck, "selected_by": "lowest validation loss"}, run / "checkpoint_best_loss.pt")
            if volume_validator is not None and cfg.val_every and state["epoch"] % cfg.val_every == 0:
                t_val = time.time()
                res = volume_validator(model, norm)
                vrow = {"epoch": state["epoch"], "iteration": state["iteration"], "elapsed_s": state["elapsed_s"],
                        "seconds": round(time.time() - t_val, 1),
                        **{k: v for k, v in res.items() if k != "rows"}}
                state["volume_log"].append(vrow)
                row["volume_dsc"] = res["mean_dsc"]
                log(f"whole-volume validation at it {state['iteration']}: mean DSC {res['mean_dsc']:.4f} "
                    f"(median {res.get('median_dsc', float('nan')):.4f}, n={res.get('n')}, {vrow['seconds']} s)")
                if res["mean_dsc"] > state["best_volume_dsc"]:
                    state["best_volume_dsc"] = res["mean_dsc"]
                    ck["state"] = state
                    _atomic_torch_save({**ck, "selected_by": "best whole-volume validation DSC",
                                        "volume_validation": res}, run / "checkpoint_best_volume.pt")
                _write_volume_log(run, state["volume_log"])
            _atomic_torch_save(ck, last)
            _write_logs(run, state["log"])
            log(f"epoch {state['epoch']}/{cfg.epochs} it {state['iteration']} lr {lr:.2e} "
                f"loss {row['train_loss']:.4f} val_loss {vloss:.4f} val_dice {mdice:.3f} "
                f"(ema {state['ema_dice']:.3f}) per-class {[round(float(d), 3) for d in vdice]} "
                f"[{state['elapsed_s'] / 60:.1f} min]")
        if cfg.stop_after_epoch and state["epoch"] >= cfg.stop_after_epoch:
            log(f"stopping after epoch {state['epoch']} (resume with --resume)")
            break
        if cfg.max_minutes and state["elapsed_s"] / 60 >= cfg.max_minutes:
            log(f"stopping after {cfg.max_minutes} min wall-clock budget (epoch {state['epoch']})")
            break
    record = {"stage": cfg.stage, "epochs_done": state["epoch"], "epochs_planned": cfg.epochs,
              "iterations": state["iteration"], "iterations_per_epoch": cfg.iterations_per_epoch,
              "batch_size": cfg.batch_size, "patch": list(patch), "spacing": list(cfg.spacing),
              "best_val_dice_ema": state["best_dice"], "lowest_val_loss": state["best_loss"],
              "best_volume_dsc": state.get("best_volume_dsc"), "volume_validation": state.get("volume_log", []),
              "recipe": {"fg_mode": cfg.fg_mode, "fg_fraction": cfg.fg_fraction, "augment": cfg.augment_preset,
                         "lr_by_time": cfg.lr_by_time, "lr": cfg.lr, "val_every": cfg.val_every,
                         "onednn": bool(cfg.onednn and device.type == "cpu")},
              "final_val_dice_per_class": state["log"][-1]["val_dice_per_class"] if state["log"] else None,
              "train_minutes": round(state["elapsed_s"] / 60, 1), "device": str(device), "world_size": world,
              "threads": torch.get_num_threads(), "normalisation": norm, "network": net_cfg.to_dict()}
    if rank == 0:
        (run / "record.json").write_text(json.dumps(record, indent=2))
    return record


def _write_volume_log(run: Path, rows):
    """``volume_log.json`` and ``volume_curve.png``: whole-volume validation DSC against iterations."""
    tmp = run / "volume_log.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, run / "volume_log.json")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    it = [r["iteration"] for r in rows]
    ax.plot(it, [r["mean_dsc"] for r in rows], "o-", label="mean DSC")
    if all("median_dsc" in r for r in rows):
        ax.plot(it, [r["median_dsc"] for r in rows], "s--", label="median DSC")
    ax.set_xlabel("iteration")
    ax.set_ylabel("whole-volume validation DSC")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run / "volume_curve.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, run / "volume_curve.png")


def _write_logs(run: Path, rows):
    tmp = run / "log.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, run / "log.json")
    keys = ["epoch", "iteration", "lr", "train_loss", "val_loss", "val_dice", "val_dice_ema", "elapsed_s"]
    tmp = run / "log.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            w.writerow([r[k] for k in keys])
    os.replace(tmp, run / "log.csv")
    _plot(rows, run / "curve.png")


# ---------------------------------------------------------------------------------
# bundle
# ---------------------------------------------------------------------------------

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_checkpoint(run_dir, which: str = "best_dice") -> dict:
    p = Path(run_dir) / f"checkpoint_{which}.pt"
    if not p.exists():
        p = Path(run_dir) / "checkpoint_last.pt"
    if not p.exists():
        raise ParotidOARError(f"No checkpoint in {run_dir}. Train that stage first.")
    return torch.load(p, map_location="cpu", weights_only=False)


STAGE1_LABELS = {"0": "background", "1": L.PAROTID}
STAGE2_LABELS = {"0": "background", **{str(i): n for i, n in enumerate(L.OARS, start=1)}}


def write_bundle(out_dir, stage1_run, stage2_run, *, name="parotid-oar-research-v1", version="1.0.0",
                 data_description=None, training_record=None, which="best_dice", force=False,
                 description=None) -> Path:
    """Assemble a model bundle (manifest + stage1.pt + stage2.pt, fp16) from two stage runs."""
    from . import bundle

    c1 = load_checkpoint(stage1_run, which)
    c2 = load_checkpoint(stage2_run, which)
    out_dir = Path(out_dir)
    record = dict(training_record or {})
    record.setdefault("git_commit", git_commit())
    record.setdefault("command_line", " ".join([os.path.basename(sys.executable), "-m", "ParotidOARLib"] + sys.argv[1:]))
    for k, c in (("stage1", c1), ("stage2", c2)):
        st = c["state"]
        record.setdefault(k, {})
        record[k].update({"epochs": st["epoch"], "iterations": st["iteration"], "checkpoint": c.get("selected_by", "last"),
                          "best_val_dice_ema": st["best_dice"], "lowest_val_loss": st["best_loss"],
                          "final_val_dice_per_class": st["log"][-1]["val_dice_per_class"] if st["log"] else None,
                          "train_minutes": round(st["elapsed_s"] / 60, 1)})
    spec1 = bundle.stage_spec(["background", L.PAROTID], c1["spacing"], c1["normalisation"], c1["patch"],
                              c1["network"])
    spec2 = bundle.stage_spec(["background", *L.OARS], c2["spacing"], c2["normalisation"], c2["patch"],
                              c2["network"])
    import datetime

    manifest = bundle.Manifest(
        name=name, version=version, clinical_use=False,
        description=description or ("ParotidOAR research model: stage 1 (parotid) trained on real OpenKBP CT, "
                                    "stage 2 (six OARs) trained on the synthetic ParotidOAR phantom. "
                                    "Research use only - not for clinical use."),
        license="Research use only - not for clinical use. Stage-1 training data: OpenKBP (TCIA), "
                "research and non-commercial use; cite Babier et al. 2021.",
        data=data_description or {"description": "", "sources": []},
        stages={"stage1": spec1, "stage2": spec2}, training=record,
        created=datetime.date.today().isoformat())
    return bundle.save_bundle(out_dir, manifest, {"stage1": c1["model"], "stage2": c2["model"]}, half=True,
                              force=force)


def replace_stage_in_bundle(base_dir, stage: str, run_dir, out_dir, *, version: str, which: str = "best_volume",
                            record: dict | None = None, data_description: dict | None = None,
                            force: bool = False, description: str | None = None) -> Path:
    """A new bundle from an existing one with one stage's network replaced by a training run's
    checkpoint (``checkpoint_<which>.pt``); the other stage is kept byte for byte in value (fp16).
    The replaced stage's training record (``record``) goes into the manifest; the old one is kept
    under ``training.history``."""
    import copy
    import datetime

    from . import bundle

    base = bundle.load_bundle(base_dir, verify=True)
    man = copy.deepcopy(base.manifest)
    ck = load_checkpoint(run_dir, which)
    labels = man.labels(stage)
    spec = bundle.stage_spec(labels, ck["spacing"], ck["normalisation"], ck["patch"], ck["network"],
                             context_mm=man.stage(stage).get("context_mm"))
    man.stages[stage] = spec
    st = ck["state"]
    rec = {"epochs": st["epoch"], "iterations": st["iteration"], "checkpoint": ck.get("selected_by", "last"),
           "best_volume_dsc": st.get("best_volume_dsc"), "train_minutes": round(st["elapsed_s"] / 60, 1),
           **(record or {})}
    history = list(man.training.get("history", []))
    history.append({"version": man.version, stage: man.training.get(stage)})
    man.training = {**man.training, stage: rec, "history": history, "git_commit": git_commit()}
    man.version = version
    man.created = datetime.date.today().isoformat()
    if data_description is not None:
        man.data = data_description
    if description is not None:
        man.description = description
    states = {s: (ck["model"] if s == stage else base.state_dict(s)) for s in bundle.STAGES}
    return bundle.save_bundle(out_dir, man, states, half=True, force=force)
