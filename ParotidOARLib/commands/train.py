"""``python -m ParotidOARLib train`` — train stage 1 and/or stage 2 and write a model bundle.

Examples::

    # stage 1 on real OpenKBP CT (train/ for training, validation/ for model selection)
    python -m ParotidOARLib train --format openkbp --data ../shared/data/openkbp --exclude pt_221 \\
        --stage 1 --work-dir runs/shipped --epochs 40 --iterations-per-epoch 50
    # stage 2 on 60 generated phantoms, then write the bundle
    python -m ParotidOARLib train --stage 2 --phantom-cases 60 --work-dir runs/shipped \\
        --out Resources/Models/parotid-oar-research-v1 --force
    # your own data: a folder of cases with ct.nrrd + labels.seg.nrrd
    python -m ParotidOARLib train --data my_cases --label-map names.json --stage both --out my-bundle

Multi-GPU: ``torchrun --nproc_per_node=4 -m ParotidOARLib train ...`` (DistributedDataParallel).
Research use only - not for clinical use.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import DatasetError, ParotidOARError


def _probability(text: str) -> float:
    import argparse

    try:
        p = float(text)
    except ValueError:
        p = float("nan")
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"takes a probability in [0, 1], got {text!r}")
    return p


def add_arguments(p):
    p.add_argument("--data", help="dataset folder (case sub-folders; for --format openkbp the folder holding "
                                   "train/ and validation/, or a folder of pt_* cases)")
    p.add_argument("--format", choices=["seg", "labelmap", "openkbp"], default="seg",
                   help="how --data is laid out: seg (each case folder: a CT + a .seg.nrrd; the default), labelmap "
                        "(a CT + labels.nrrd + labels.json naming the values) or openkbp (OpenKBP's pt_* folders "
                        "of one mask per structure)")
    p.add_argument("--label-map", help="JSON mapping institution names to canonical names, "
                                        "e.g. {\"Parotid_L\": \"Parotid:left\"}")
    p.add_argument("--exclude", nargs="*", default=[], help="patients to leave out (e.g. pt_221)")
    p.add_argument("--stage", choices=["1", "2", "both"], default="both",
                   help="which network to train: 1 (the parotid), 2 (the six OARs inside the ROI) or both "
                        "(the default)")
    p.add_argument("--out", help="bundle folder to write (needs both stages trained in --work-dir)")
    p.add_argument("--work-dir", default="runs/train", help="checkpoints, logs, caches (default runs/train)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iterations-per-epoch", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--resume", action="store_true", help="continue from checkpoint_last.pt in the work dir")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where training runs: auto (CUDA if available, else CPU), cpu or cuda (default auto)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--phantom-cases", type=int, default=0,
                   help="stage 2 (and --one-step): generate N training phantoms (seeds 100000+)")
    p.add_argument("--phantom-val-cases", type=int, default=6, help="validation phantoms (seeds 200000+)")
    p.add_argument("--phantom-size", default="full", choices=["full", "small"])
    p.add_argument("--stage1-phantom-cases", type=int, default=0,
                   help="mix N phantoms (seeds 300000+) into stage-1 training")
    p.add_argument("--one-step", action="store_true",
                   help="ablation: train one network for the six OARs on the whole side crop")
    p.add_argument("--max-minutes", type=float, default=0.0, help="wall-clock budget per stage (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--checkpoint", default="best_dice", choices=["best_dice", "best_loss", "best_volume", "last"],
                   help="which checkpoint goes into the bundle")
    p.add_argument("--base-features", type=int, default=0, help="network width (default: 16)")
    p.add_argument("--patch1", type=int, nargs=3, metavar=("Z", "Y", "X"), help="stage-1 patch (voxels)")
    p.add_argument("--patch2", type=int, nargs=3, metavar=("Z", "Y", "X"), help="stage-2 patch (voxels)")
    p.add_argument("--init-from", default="", help="fine-tune: start from this checkpoint file, or a model bundle "
                   "folder (its stage's weights; stage 2 also keeps the bundle's normalisation)")
    p.add_argument("--real-fraction", type=float, default=0.5,
                   help="stage 2 with --format openkbp and --phantom-cases: share of real (group-labelled) crops "
                        "in the sampled items; the phantoms are repeated to reach it (default 0.5)")
    p.add_argument("--phantom-repeat", type=int, default=1,
                   help="weight of the stage-1 phantom cases in the mix (each listed N times)")
    p.add_argument("--fg-fraction", type=float, default=0.33, help="share of foreground-centred patches")
    p.add_argument("--recipe", choices=["v1", "v2"],
                   help="training recipe (default: v2 for stage 1, v1 for stage 2). v2 = nnU-Net's rules: the last "
                        "sample of every batch foreground-centred, nnU-Net augmentation probabilities (no elastic; "
                        "gamma, blur, contrast, low-resolution), lr decay by iteration count only (--max-minutes "
                        "just stops, resumably), the side cut from the CT as in segment. v1 = the first recipe.")
    p.add_argument("--fg-mode", choices=["sample", "batch"], help="override the recipe's foreground rule")
    p.add_argument("--augment", choices=["legacy", "nnunet"], help="override the recipe's augmentation preset")
    p.add_argument("--lowres", type=float, nargs="+", metavar=("P", "ZOOM_MIN"),
                   help="low-resolution simulation: probability P, zoom drawn in [ZOOM_MIN, 1] (default 0.5, "
                        "nnU-Net's); stage 2 with --format openkbp defaults to 0.25 0.25, so the phantoms' "
                        "1 mm detail is also seen at OpenKBP's ~4 mm")
    p.add_argument("--lr-schedule", choices=["iterations", "time"],
                   help="poly lr decay over --epochs x --iterations-per-epoch (v2) or, with --max-minutes, over "
                        "whichever of iterations and wall-clock runs out first (v1; for short pilots)")
    p.add_argument("--side-cut", choices=["ct", "body"],
                   help="stage 1: midline from the CT (as segment) or the dataset's Body mask (v1)")
    p.add_argument("--spacing1", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="stage-1 grid spacing in mm (default 4 4 3)")
    p.add_argument("--stages1", type=int, default=0,
                   help="stage-1 resolution stages (default 4; 5 adds one more 2x2x2 downsampling)")
    p.add_argument("--max-features", type=int, default=0, help="feature cap (default 8x --base-features, <= 128)")
    p.add_argument("--resect", type=_probability, default=0.0, metavar="P",
                   help="stage 1: probability that a dataset sample gets a simulated parotidectomy (a cap of the "
                        "gland replaced by soft tissue, fat, seroma or fibrosis; the label keeps the residual; "
                        "docs/training.md). Default 0")
    p.add_argument("--onednn", action="store_true",
                   help="CPU: run every convolution through oneDNN in training too (as segment does; the same "
                        "numbers; Testing/benchmarks/bench_train_step.py measures the speed)")
    p.add_argument("--val-every", type=int, default=0,
                   help="stage 1: every N epochs, segment every validation sample whole through the segment code "
                        "path and keep the best mean DSC as checkpoint_best_volume.pt (0 = never)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--export-nnunet", default=None, metavar="DIR",
                   help="do not train: write the stage-1 side crops and stage-2 ROI crops (of --data and/or the "
                        "phantoms) as nnU-Net raw datasets in DIR, to train with nnUNetv2_train (docs/nnunet.md)")
    p.add_argument("--nnunet-ids", type=int, nargs=2, default=[501, 502], metavar=("ID1", "ID2"),
                   help="nnU-Net dataset ids of the exported stage-1 and stage-2 datasets (default 501 502)")


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _generic_split(data, fmt, label_map, exclude, work, check=None):
    """Discover, validate (every problem at once, plus ``check(samples)``'s), split by patient."""
    from .. import dataset

    samples, problems = dataset.discover(data, fmt, label_map, exclude)
    samples = [s for s in samples if s.patient not in exclude]
    if check is not None:
        problems = problems + check(samples)
    dataset.validate(samples, problems)
    split = dataset.load_or_make_split(work / "splits.json", [s.patient for s in samples])
    tr = [s for s in samples if s.patient in split["train"]]
    va = [s for s in samples if s.patient in split["validation"]]
    return tr, va, split


def _openkbp_split(args, work: Path):
    """OpenKBP's own train / validation split of ``--data`` (checked, saved as ``splits.json``), or None
    when ``--data`` has no ``train/`` folder → (train samples, validation samples, split)."""
    from .. import dataset

    data = Path(args.data)
    if not (data / "train").is_dir():
        return None
    tr_s, p1 = dataset.discover(data / "train", "openkbp", args.label_map, args.exclude)
    va_s, p2 = dataset.discover(data / "validation", "openkbp", args.label_map, args.exclude) \
        if (data / "validation").is_dir() else ([], [])
    tr_s = [s for s in tr_s if s.patient not in args.exclude]
    va_s = [s for s in va_s if s.patient not in args.exclude]
    _log(f"validating {len(tr_s) + len(va_s)} samples ...")
    dataset.validate(tr_s + va_s, p1 + p2)
    split = {"train": sorted({s.patient for s in tr_s}), "validation": sorted({s.patient for s in va_s}),
             "test": [], "note": "OpenKBP's own train/validation split; OpenKBP test is not used",
             "excluded": list(args.exclude)}
    dataset.save_split(split, work / "splits.json")
    return tr_s, va_s, split


def stage1_data(args, work: Path):
    official = _openkbp_split(args, work) if args.format == "openkbp" else None
    if official is not None:
        tr_s, va_s, split = official
    else:
        tr_s, va_s, split = _generic_split(Path(args.data), args.format, args.label_map, args.exclude, work)
    tr, va, desc = _cached_stage_items(1, tr_s, va_s, split, work, spacing=stage1_spacing(args),
                                       side_cut=recipe(args, 1)["side_cut"])
    return tr, va, {**desc, "validation_samples": va_s}


def stage1_spacing(args) -> tuple:
    from .. import training

    return tuple(args.spacing1) if getattr(args, "spacing1", None) else training.STAGE1_SPACING


RECIPES = {"v1": {"fg_mode": "sample", "augment": "legacy", "lr_by_time": True, "side_cut": "body"},
           "v2": {"fg_mode": "batch", "augment": "nnunet", "lr_by_time": False, "side_cut": "ct"}}


def recipe(args, stage: int) -> dict:
    """The stage's recipe (``--recipe``, default v2 for stage 1 and v1 for stage 2) with overrides."""
    name = getattr(args, "recipe", None) or ("v2" if stage == 1 else "v1")
    r = {"name": name, **RECIPES[name]}
    for k in ("fg_mode", "augment", "side_cut"):
        if getattr(args, k, None):
            r[k] = getattr(args, k)
    if getattr(args, "lr_schedule", None):
        r["lr_by_time"] = args.lr_schedule == "time"
    return r


def _cached_stage_items(stage: int, tr_s, va_s, split: dict, work: Path, spacing=None, side_cut="body"):
    """Build (or reuse) the cached stage-``stage`` items of the split's samples → (train, validation, record)."""
    import functools

    from .. import training

    if stage == 1:
        spacing = tuple(spacing or training.STAGE1_SPACING)
        build = functools.partial(training.stage1_item, spacing=spacing, side_cut=side_cut)
        tag = f"s1-{spacing}" + ("" if side_cut == "body" else f"-cut-{side_cut}")
    else:
        spacing, build = training.STAGE2_SPACING, training.stage2_item
        tag = f"s{stage}-{spacing}"
    _log(f"stage-{stage} cache: {len(tr_s)} train + {len(va_s)} validation samples")
    cache = work / "cache" / f"stage{stage}"
    tr = training.cached_items(tr_s, build, cache, tag, _log)
    va = training.cached_items(va_s, build, cache, tag, _log)
    k = f"stage{stage}_"
    return tr, va, {k + "samples_train": len(tr), k + "samples_validation": len(va),
                    k + "patients_train": len(split["train"]), k + "patients_validation": len(split["validation"]),
                    "split": split}


PHANTOM_SPACINGS = [(0.98, 0.98, 2.0), (0.98, 0.98, 2.0), (0.6, 0.6, 1.25), (1.0, 1.0, 3.0), (0.8, 0.8, 1.5)]


def stage2_data(args, work: Path):
    """Stage 2 from the user's own cases: each needs the Parotid (its reference ROI) and at least one
    of the six OARs; OARs a case lacks are masked out of its loss (partial labels)."""
    from .. import labels as L

    if args.format == "openkbp":
        return stage2_openkbp_data(args, work)

    def check(samples):
        return [f"{s.patient} ({s.side}): none of the six OARs ({', '.join(L.OARS)}) after the label map; "
                "stage 2 cannot learn from it. Map their names with --label-map or exclude the patient."
                for s in samples if not any(n in s.label_sources for n in L.OARS)]

    tr_s, va_s, split = _generic_split(Path(args.data), args.format, args.label_map, args.exclude, work, check)
    tr, va, desc = _cached_stage_items(2, tr_s, va_s, split, work)
    desc.update({"stage2_data": str(args.data), "stage2_format": args.format})
    return tr, va, desc


def stage2_openkbp_data(args, work: Path):
    """Stage 2 from OpenKBP: group-labelled crops (``partial_labels``: the mandible supervises ramus ∪
    condyle, the body's 3 mm rind supervises skin, nothing else is taken as background), built from the
    reference parotid + 17 mm like the phantoms' crops, on OpenKBP's own train / validation split."""
    from .. import training
    from ..partial_labels import stage2_real_item

    official = _openkbp_split(args, work)
    if official is None:
        raise ParotidOARError(f"--format openkbp needs {args.data}/train (and validation); not found.")
    tr_s, va_s, split = official
    # v2: the rind's half-voxel along the surface normal; v3: OPEN where the Mandible is not contoured
    tag = f"s2-real-{training.STAGE2_SPACING}-groups-v4"
    _log(f"stage-2 real (group-labelled) cache: {len(tr_s)} train + {len(va_s)} validation samples")
    cache = work / "cache" / "stage2-real"
    tr = training.cached_items(tr_s, stage2_real_item, cache, tag, _log)
    va = training.cached_items(va_s, stage2_real_item, cache, tag, _log)
    return tr, va, {"stage2_real_samples_train": len(tr), "stage2_real_samples_validation": len(va),
                    "stage2_real_patients_train": len(split["train"]), "split": split,
                    "stage2_data": str(args.data), "stage2_format": "openkbp (group labels: mandible, body rind)"}


def mix_stage2(real: list, phantoms: list, real_fraction: float) -> list:
    """Phantoms repeated so that about ``real_fraction`` of the sampled items are real crops."""
    if not real or not phantoms or real_fraction <= 0:
        return phantoms + (real if real_fraction > 0 else [])
    if real_fraction >= 1:
        return real
    reps = max(1, round(len(real) * (1 - real_fraction) / (real_fraction * len(phantoms))))
    return real + phantoms * reps


def init_normalisation(path: str, stage: int):
    """The normalisation a fine-tune starts from: a bundle's stage spec, or a training checkpoint's."""
    import torch

    from .. import bundle as bundle_mod

    p = Path(path)
    if p.is_dir():
        return bundle_mod.verify(p).normalisation(f"stage{stage}")
    ck = torch.load(p, map_location="cpu", weights_only=False)
    return ck.get("normalisation") if isinstance(ck, dict) else None


def stage_normalisation(args, stage: int, items) -> dict:
    """The normalisation ``stage`` trains with: a fine-tune (``--init-from``) keeps the one its weights learned;
    a new network takes nnU-Net's CT scheme computed from ``items``."""
    from .. import training

    norm = init_normalisation(args.init_from, stage) if args.init_from else None
    return norm if norm is not None else training.compute_normalisation(items)


def phantom_items(n, seed0, stage, args, one_step=False, log_every=10):
    """Generate (or load from the work-dir cache) n phantom items with seeds seed0.. .

    Training phantoms vary the acquisition spacing (0.6-1.0 mm in-plane, 1.25-3 mm slices)
    so stage 2 holds up at other spacings; validation phantoms (seeds >= 200000) use the default."""
    import numpy as np

    from .. import phantom, training

    work = Path(args.work_dir)
    items = []
    t0 = time.time()
    # a cache made by another phantom generator version is never reused
    gen = "" if phantom.GENERATOR_VERSION == "1" else f"_g{phantom.GENERATOR_VERSION}"
    for i in range(n):
        seed = seed0 + i
        sp = PHANTOM_SPACINGS[i % len(PHANTOM_SPACINGS)] if seed0 < 200000 else (0.98, 0.98, 2.0)
        if stage == 1:
            sp1 = stage1_spacing(args)
            suffix = "" if sp1 == training.STAGE1_SPACING else "_" + "x".join(f"{v:g}" for v in sp1)
            p = work / "cache" / "stage1-phantom" / f"phantom_{seed}_{args.phantom_size}{suffix}{gen}.npz"
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                it = training.phantom_stage1_item(seed, spacing_case=sp, size=args.phantom_size, stage_spacing=sp1)
                training._save_npz(p, meta_json=np.array(json.dumps(it["meta"])),
                                   **{k: v for k, v in it.items() if hasattr(v, "dtype")})
            items.append(training._item_from_npz(p))
            continue
        p2 = work / "cache" / "stage2-phantom" / f"phantom_{seed}_{args.phantom_size}{gen}.npz"
        p1 = work / "cache" / "onestep-phantom" / f"phantom_{seed}_{args.phantom_size}{gen}.npz"
        if not (p2.exists() and p1.exists()):
            p2.parent.mkdir(parents=True, exist_ok=True)
            p1.parent.mkdir(parents=True, exist_ok=True)
            it2, it1 = training.phantom_stage2_items(seed, spacing_case=sp, size=args.phantom_size, one_step=True)
            for p, it in ((p2, it2), (p1, it1)):
                training._save_npz(p, meta_json=np.array(json.dumps(it["meta"])),
                                   **{k: v for k, v in it.items() if hasattr(v, "dtype")})
        items.append(training._item_from_npz(p1 if one_step else p2))
        if (i + 1) % log_every == 0:
            _log(f"  phantoms {i + 1}/{n} ({time.time() - t0:.0f} s)")
    return items


def _cfg(args, stage, run_dir, spacing, patch, network=None):
    from .. import training

    n_stages = getattr(args, "stages1", 0) if stage == 1 else 0
    if network is None and (getattr(args, "base_features", 0) or n_stages or getattr(args, "max_features", 0)):
        net = training.default_config(stage)
        if args.base_features:
            net.base_features = args.base_features
            net.max_features = min(net.max_features, 8 * args.base_features)
        if getattr(args, "max_features", 0):
            net.max_features = args.max_features
        if n_stages:
            if n_stages < 2:
                raise ParotidOARError("--stages1 must be at least 2.")
            net.strides = [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1)
        network = net.to_dict()
    override = getattr(args, "patch1" if stage == 1 else "patch2", None)
    if override:
        patch = tuple(override)

    r = recipe(args, stage)
    lowres = getattr(args, "lowres", None)
    if lowres is None and stage == 2 and getattr(args, "format", "") == "openkbp" and getattr(args, "data", None):
        lowres = [0.25, 0.25]
    augment = {}
    if lowres:
        if not 0 <= lowres[0] <= 1 or (len(lowres) > 1 and not 0 < lowres[1] <= 1) or len(lowres) > 2:
            raise ParotidOARError("--lowres takes P in [0, 1] and optionally ZOOM_MIN in (0, 1].")
        augment = {"p_lowres": float(lowres[0]), "lowres_zoom": (float(lowres[1]) if len(lowres) > 1 else 0.5, 1.0)}
    return training.TrainConfig(stage=stage, run_dir=str(run_dir), epochs=args.epochs,
                                iterations_per_epoch=args.iterations_per_epoch, batch_size=args.batch_size,
                                lr=args.lr, patch=tuple(patch), spacing=tuple(spacing), network=network or {},
                                augment=augment,
                                device=args.device, threads=args.threads, seed=args.seed,
                                max_minutes=args.max_minutes, progress=not args.no_progress,
                                fg_fraction=getattr(args, "fg_fraction", 0.33),
                                init_checkpoint=getattr(args, "init_from", ""), fg_mode=r["fg_mode"],
                                augment_preset=r["augment"], lr_by_time=r["lr_by_time"],
                                val_every=getattr(args, "val_every", 0) if stage == 1 else 0,
                                resect_p=getattr(args, "resect", 0.0) if stage == 1 else 0.0,
                                onednn=bool(getattr(args, "onednn", False)))


def _init_distributed():
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, else gloo)."""
    import torch

    from .. import training

    world, rank, local_rank = training._dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world, rank


@contextmanager
def _rank0_first(world: int, rank: int):
    """Rank 0 builds the caches / split files; the other ranks wait, then read them."""
    import torch

    if world > 1 and rank != 0:
        torch.distributed.barrier()
    yield
    if world > 1 and rank == 0:
        torch.distributed.barrier()


def run(args) -> int:
    import torch

    from ..inference import check_threads

    if args.threads:  # 0 = torch's default
        torch.set_num_threads(check_threads(args.threads))
    world, rank = _init_distributed()
    try:
        return _run(args, world, rank)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _run(args, world: int, rank: int) -> int:
    from .. import training

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        print("Research use only - not for clinical use.", file=sys.stderr)
    cmdline = "python -m ParotidOARLib train " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["train"] else sys.argv[1:])
    if args.export_nnunet:
        if world > 1:
            raise ParotidOARError("--export-nnunet runs in one process; do not start it with torchrun.")
        return export_nnunet(args, work)
    data_desc = {"description": "", "sources": []}
    stages = {"1": [1], "2": [2], "both": [1, 2]}[args.stage]
    if args.one_step:
        if args.phantom_cases < 1:
            raise ParotidOARError("--one-step trains on phantoms: give --phantom-cases N.")
        with _rank0_first(world, rank):
            tr = phantom_items(args.phantom_cases, 100000, 2, args, one_step=True)
            va = phantom_items(args.phantom_val_cases, 200000, 2, args, one_step=True)
        norm = training.compute_normalisation(tr)
        cfg = _cfg(args, 2, work / "onestep", training.STAGE2_SPACING, training.STAGE2_PATCH)
        rec = training.train(cfg, training.prepare(tr, norm, 2, cfg.patch, 0.0),
                             training.prepare(va, norm, 2, cfg.patch, 0.0), norm, resume=args.resume, log=_log)
        rec["command_line"] = cmdline
        if rank == 0:
            (work / "onestep" / "record.json").write_text(json.dumps(rec, indent=2))
        return 0
    if 1 in stages:
        if not args.data:
            raise ParotidOARError("Stage 1 needs --data (a dataset folder).")
        with _rank0_first(world, rank):
            tr, va, desc = stage1_data(args, work)
            if args.stage1_phantom_cases:
                tr = tr + phantom_items(args.stage1_phantom_cases, 300000, 1, args) * max(1, args.phantom_repeat)
                desc["stage1_phantom_cases"] = args.stage1_phantom_cases
        norm = stage_normalisation(args, 1, tr)
        val_samples = desc.pop("validation_samples", [])
        cfg = _cfg(args, 1, work / "stage1", stage1_spacing(args), training.STAGE1_PATCH)
        _log(f"stage 1: {len(tr)} training items, {len(va)} validation items, recipe {recipe(args, 1)}, "
             f"normalisation {norm}")
        validator = None
        if cfg.val_every and rank == 0:
            if not val_samples:
                raise ParotidOARError("--val-every needs validation samples; the split has none.")
            validator = training.Stage1VolumeValidator(val_samples, cfg.spacing, cfg.patch,
                                                       threads=args.threads or None, log=_log)
        rec = training.train(cfg, training.prepare(tr, norm, 1, cfg.patch), training.prepare(va, norm, 1, cfg.patch),
                             norm, resume=args.resume, log=_log, volume_validator=validator)
        rec.update(desc)
        rec["command_line"] = cmdline
        rec["data"] = str(args.data)
        rec["format"] = args.format
        if rank == 0:
            (work / "stage1" / "record.json").write_text(json.dumps(rec, indent=2))
    if 2 in stages:
        own = bool(args.data)
        if not own and not args.phantom_cases:
            raise ParotidOARError("Stage 2 needs cases with OAR labels: a --data folder (seg / labelmap) "
                                  "holding the six OARs, and/or --phantom-cases N synthetic phantoms.")
        tr, va, desc2 = [], [], {}
        with _rank0_first(world, rank):
            if own:
                tr, va, desc2 = stage2_data(args, work)
            if args.phantom_cases:
                ph_tr = phantom_items(args.phantom_cases, 100000, 2, args)
                if args.format == "openkbp":
                    tr = mix_stage2(tr, ph_tr, args.real_fraction)
                    desc2["real_fraction"] = args.real_fraction
                else:
                    tr = tr + ph_tr
                ph_va = phantom_items(args.phantom_val_cases, 200000, 2, args)
                # interleaved, so that the fixed validation patches hold phantoms (the per-class Dice) too
                va = [x for pair in itertools.zip_longest(ph_va, va) for x in pair if x is not None]
        # from the class-labelled items (a group map's foreground is not an organ's)
        norm = stage_normalisation(args, 2, [it for it in tr if not it["meta"].get("partial")] or tr)
        cfg = _cfg(args, 2, work / "stage2", training.STAGE2_SPACING, training.STAGE2_PATCH)
        _log(f"stage 2: {len(tr)} training items, {len(va)} validation items, normalisation {norm}")
        rec = training.train(cfg, training.prepare(tr, norm, 2, cfg.patch), training.prepare(va, norm, 2, cfg.patch),
                             norm, resume=args.resume, log=_log)
        rec.update(desc2)
        rec.update({"phantom_cases_train": args.phantom_cases, "command_line": cmdline})
        if args.phantom_cases:
            rec.update({"phantom_seeds_train": [100000, 100000 + args.phantom_cases - 1],
                        "phantom_cases_validation": args.phantom_val_cases})
        if rank == 0:
            (work / "stage2" / "record.json").write_text(json.dumps(rec, indent=2))
    if args.out and rank == 0:
        out = write_bundle_from_work(work, args.out, force=args.force, which=args.checkpoint)
        _log(f"bundle written: {out}")
    return 0


def export_nnunet(args, work: Path) -> int:
    """``--export-nnunet DIR``: the training crops of the chosen stages as nnU-Net raw datasets
    (all cases, training and validation: nnU-Net makes its own five-fold split)."""
    from .. import nnunet

    stages = {"1": [1], "2": [2], "both": [1, 2]}[args.stage]
    out = Path(args.export_nnunet)
    written = []
    if 1 in stages:
        items = []
        if args.data:
            tr, va, _ = stage1_data(args, work)
            items += tr + va
        if args.stage1_phantom_cases:
            items += phantom_items(args.stage1_phantom_cases, 300000, 1, args)
        if not items:
            raise ParotidOARError("Nothing to export for stage 1: give --data and/or --stage1-phantom-cases N.")
        written.append(nnunet.export_dataset(out, args.nnunet_ids[0], "ParotidOARStage1", 1, items, force=args.force))
    if 2 in stages:
        items, skipped = [], []
        if args.data and args.format != "openkbp":
            tr, va, _ = stage2_data(args, work)
            for it in tr + va:  # nnU-Net has no partial labels: a case must have all six OARs
                if "channel_mask" in it and not all(int(v) for v in it["channel_mask"]):
                    skipped.append(it["meta"].get("patient", "?"))
                else:
                    items.append(it)
        if args.phantom_cases:
            items += phantom_items(args.phantom_cases, 100000, 2, args)
            items += phantom_items(args.phantom_val_cases, 200000, 2, args)
        if skipped:
            _log(f"stage 2: {len(skipped)} case(s) without all six OARs left out (nnU-Net needs full labels): "
                 + ", ".join(skipped))
        if not items:
            raise ParotidOARError("Nothing to export for stage 2: give a --data folder with the six OARs and/or "
                                  "--phantom-cases N.")
        context = 8.0  # as the cascade crops stage 2 (cascade.STAGE2_CONTEXT_MM)
        items = [nnunet.roi_context_crop(it, context) for it in items]
        written.append(nnunet.export_dataset(out, args.nnunet_ids[1], "ParotidOARStage2", 2, items, force=args.force,
                                             context_mm=context))
    for d in written:
        _log(f"nnU-Net dataset written: {d} ({len(list((d / 'labelsTr').iterdir()))} cases)")
    print("Research use only - not for clinical use. Next: nnUNetv2_plan_and_preprocess, nnUNetv2_train, then "
          "python -m ParotidOARLib models import-nnunet (docs/nnunet.md).")
    return 0


OPENKBP_SOURCE = ("OpenKBP: Babier A. et al., 'OpenKBP: The open-access knowledge-based planning grand challenge "
                  "and dataset', Medical Physics 48:5549-5561, 2021; images from The Cancer Imaging Archive (TCIA); "
                  "research and non-commercial use.")
PHANTOM_SOURCE = "Synthetic ParotidOAR phantom (ParotidOARLib.phantom), generated; no patient data."


def _own_data_source(name: str) -> str:
    return f"Dataset '{name}' (the training institution's own data; state its provenance and consent here)."


def data_description(work: Path = None, stage1_run=None, stage2_run=None) -> dict:
    """What the bundle was trained on, from the two runs' records (never assumed)."""
    r1 = _read(Path(stage1_run or Path(work) / "stage1") / "record.json")
    r2 = _read(Path(stage2_run or Path(work) / "stage2") / "record.json")
    parts, sources = [], []
    split1 = r1.get("split") or {}
    if r1.get("format") == "openkbp" or str(split1.get("note", "")).startswith("OpenKBP"):
        excl = ", ".join(split1.get("excluded") or []) or "none"
        parts.append(f"Stage 1 (parotid): real head-and-neck planning CT from OpenKBP "
                     f"({r1.get('stage1_patients_train', '?')} training patients x 2 sides; model selected on "
                     f"{r1.get('stage1_patients_validation', '?')} OpenKBP validation patients; excluded: {excl}; "
                     f"pt_221 because its parotid masks do not match the CT, the others have no parotid contours).")
        sources.append(OPENKBP_SOURCE)
    elif r1:
        parts.append(f"Stage 1 (parotid): {r1.get('stage1_samples_train', '?')} training and "
                     f"{r1.get('stage1_samples_validation', '?')} validation samples of the dataset "
                     f"'{Path(str(r1.get('data', '?'))).name}' ({r1.get('stage1_patients_train', '?')} / "
                     f"{r1.get('stage1_patients_validation', '?')} patients).")
        sources.append(_own_data_source(Path(str(r1.get('data', '?'))).name))
    if r1.get("stage1_phantom_cases"):
        parts.append(f"{r1['stage1_phantom_cases']} synthetic phantoms (seeds 300000+) were mixed into stage 1.")
    s2 = []
    if r2.get("stage2_samples_train"):
        name = Path(str(r2.get("stage2_data", "?"))).name
        s2.append(f"{r2['stage2_samples_train']} training / {r2.get('stage2_samples_validation', '?')} validation "
                  f"samples of the dataset '{name}'")
        if _own_data_source(name) not in sources:
            sources.append(_own_data_source(name))
    if r2.get("phantom_cases_train"):
        s2.append(f"the synthetic ParotidOAR post-operative phantom ({r2['phantom_cases_train']} cases, seeds "
                  f"{r2.get('phantom_seeds_train', '?')}; evaluation uses seeds 0..19, never trained on)")
    if s2:
        parts.append("Stage 2 (six OARs): " + " and ".join(s2) + ".")
    if r1.get("stage1_phantom_cases") or r2.get("phantom_cases_train"):
        sources.append(PHANTOM_SOURCE)
    parts.append("Research use only - not for clinical use.")
    return {"description": " ".join(parts), "sources": sources}


def _read(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def write_bundle_from_work(work, out, force=False, which="best_dice", extra_record=None, stage1_run=None,
                           stage2_run=None, version="1.0.0"):
    """Assemble a bundle from ``work/stage1`` and ``work/stage2`` (or explicit run folders)."""
    from .. import training

    work = Path(work)
    s1 = Path(stage1_run) if stage1_run else work / "stage1"
    s2 = Path(stage2_run) if stage2_run else work / "stage2"
    rec = {"stage1": _read(s1 / "record.json"), "stage2": _read(s2 / "record.json")}
    for k in ("stage1", "stage2"):
        rec[k].pop("normalisation", None)
        rec[k].pop("network", None)
    if extra_record:
        rec.update(extra_record)
    rec["command_line"] = rec["stage1"].get("command_line", "") + " ; " + rec["stage2"].get("command_line", "")
    rec["hardware"] = f"{os.cpu_count()} CPU cores (shared), torch {__import__('torch').__version__}"
    return training.write_bundle(out, s1, s2, data_description=data_description(work, s1, s2),
                                 training_record=rec, which=which, force=force, version=version)
