"""nnU-Net v2 models as stage 1 or stage 2 of the cascade, and ParotidOAR data as nnU-Net datasets.

**Import** (:func:`import_stage`): an nnU-Net v2 trained-model folder
(``<trainer>__<plans>__<configuration>/`` with ``plans.json``, ``dataset.json`` and
``fold_X/checkpoint_final.pth``) becomes one stage of a normal ParotidOAR bundle
(manifest + SHA-256, weights in float32). What is read, and from where:

* **Configuration**: from the folder name (``…__3d_fullres``), else from the checkpoint's
  ``init_args``; a checkpoint trained with another configuration is refused. ``inherits_from``
  is resolved as nnU-Net does.
* **Architecture**: ``architecture.arch_kwargs`` of that configuration (``PlainConvUNet`` only;
  residual-encoder presets are refused) → :class:`network.UNetConfig` with nnU-Net's biases on
  the transposed convolutions and its axis order (``transpose_forward``).
* **Preprocessing**: ``spacing`` and ``patch_size`` (array order after nnU-Net's transpose,
  mapped back to ParotidOAR's (z, y, x)), CT normalisation from
  ``foreground_intensity_properties_per_channel`` (clip to the 0.5 / 99.5 percentiles, z-score:
  the form of :func:`preprocess.normalise`). nnU-Net's own image resampling (third-order
  splines, nearest along z when anisotropic) is recorded; ParotidOAR resamples linearly
  (see docs/nnunet.md for the measured effect).
* **Labels**: ``dataset.json`` labels mapped to canonical names with a label map.
* **Mirroring** axes from the checkpoint (used by ``--tta``); several folds are one
  :class:`network.Ensemble` (logits averaged, as nnU-Net v2 does). Fold ``all`` is ``fold_all/``.
* **Weights**: ``network_weights`` holds each tensor more than once (``all_modules`` repeats
  ``conv``/``norm``, ``decoder.encoder`` repeats the encoder); one copy is used and the others must
  agree. A ``module.`` / ``_orig_mod.`` prefix is stripped.

Checkpoints are read with ``weights_only=True`` and a small allow-list (numpy scalars and
dtypes, under numpy 1.x's and 2.x's names), never with unrestricted pickle.

**Export** (:func:`export_datasets`): stage-1 side crops and stage-2 ROI crops as nnU-Net raw
datasets (``imagesTr/``, ``labelsTr/``, ``dataset.json``), on ParotidOAR's stage grids, so a model
trained on them with ``nnUNetv2_train`` and imported back sees at inference what it saw in training.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
from pathlib import Path

import numpy as np

from . import labels as L
from .errors import InputError, ModelError, OutputExistsError

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
PLAIN_UNET = "PlainConvUNet"
#: input regions each stage may be trained on (see cascade.INPUT_REGIONS)
REGIONS = {1: ("side", "whole"), 2: ("roi",)}
#: a key in the exported dataset.json that says which stage and region the crops are (nnU-Net copies
#: dataset.json into its results folder, so the importer can check it)
EXPORT_KEY = "parotidoar"
NOT_CLINICAL = "Research use only - not for clinical use."


# --------------------------------------------------------------------------- reading the results folder
def _read_json(path: Path, what: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path.parent} has no {path.name}: it is not an nnU-Net v2 trained-model folder "
                         f"({what}). Pass the folder nnUNetv2_train wrote, e.g. "
                         "nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__3d_fullres.") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path} is not an nnU-Net {path.name}.")
    return d


def parse_folder_name(folder) -> dict:
    """``<trainer>__<plans>__<configuration>`` → dict (empty if the name does not have that form)."""
    parts = Path(folder).name.split("__")
    if len(parts) != 3 or not all(parts):
        return {}
    return {"trainer": parts[0], "plans": parts[1], "configuration": parts[2]}


def resolve_configuration(plans: dict, name: str) -> dict:
    """The configuration ``name`` of ``plans`` with ``inherits_from`` resolved (nnU-Net's rule: the
    child's keys replace the parent's)."""
    configs = plans.get("configurations") or {}
    seen = []
    chain = []
    while True:
        if name not in configs:
            raise ModelError(f"plans.json has no configuration {name!r} (it has {', '.join(configs) or 'none'}).")
        if name in seen:
            raise ModelError(f"plans.json: circular inherits_from ({' -> '.join(seen + [name])}).")
        seen.append(name)
        chain.append(configs[name])
        parent = configs[name].get("inherits_from")
        if not parent:
            break
        name = parent
    out = {}
    for c in reversed(chain):
        out.update(copy.deepcopy(c))
    out.pop("inherits_from", None)
    return out


def find_checkpoints(results_dir, folds=None, checkpoint: str = "final") -> list[tuple[str, Path]]:
    """``[(fold, path)]``. ``folds`` None: every numeric ``fold_N`` holding the checkpoint (as nnU-Net's
    predictor; ``fold_all`` is only used when asked for by name, ``all``)."""
    results_dir = Path(results_dir)
    if checkpoint not in CHECKPOINTS:
        raise InputError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}.")
    fname = CHECKPOINTS[checkpoint]
    if folds:
        out = []
        for f in folds:
            f = str(f)
            if not (f == "all" or f.isdigit()):
                raise InputError(f"Fold {f!r}: use fold numbers (0 1 2 3 4) or 'all' (the fold_all model).")
            p = results_dir / f"fold_{f}" / fname
            if not p.is_file():
                raise ModelError(f"{p} not found: fold {f} has no {fname} (training unfinished? try "
                                 f"--checkpoint {'best' if checkpoint == 'final' else 'final'}).")
            out.append((f, p))
        if len({f for f, _ in out}) != len(out):
            raise InputError(f"--folds lists a fold twice: {' '.join(str(f) for f in folds)}.")
        return out
    found = sorted((int(d.name[5:]), d / fname) for d in results_dir.glob("fold_*")
                   if d.name[5:].isdigit() and (d / fname).is_file())
    if not found:
        raise ModelError(f"{results_dir} has no fold_N/{fname}. Train a fold with nnUNetv2_train, or name "
                         "the folds to import with --folds (e.g. --folds all for fold_all/).")
    return [(str(f), p) for f, p in found]


# --------------------------------------------------------------------------- safe checkpoint loading
def _allow_list() -> list:
    """Objects an nnU-Net checkpoint may name besides torch's defaults: numpy scalars (in the training
    logs) and dtypes, under numpy 2's module names and numpy 1.x's (``numpy.core.multiarray.scalar``)."""
    import numpy as _np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    allowed = [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
               _np.dtype]
    dtypes = getattr(_np, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            obj = getattr(dtypes, name)
            if isinstance(obj, type) and name.endswith("DType"):
                allowed.append(obj)
    return allowed


def load_checkpoint(path) -> dict:
    """An nnU-Net checkpoint, read with ``weights_only=True`` and :func:`_allow_list`."""
    import pickle

    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allow_list()):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: safe loading refused this checkpoint ({first}). It holds objects other than "
                         "tensors, numbers and numpy scalars; it is not loaded with unrestricted pickle.") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelError(f"Cannot read checkpoint {path} ({type(exc).__name__}: {first}).") from None
    if not isinstance(ck, dict) or "network_weights" not in ck:
        raise ModelError(f"{path} is not an nnU-Net v2 checkpoint (no 'network_weights').")
    return ck


# --------------------------------------------------------------------------- weights
_PREFIXES = ("module.", "_orig_mod.")
_ENC = re.compile(r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(weight|bias)$")
_DEC = re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)$")
_UP = re.compile(r"^decoder\.transpconvs\.(\d+)\.(weight|bias)$")
_SEG = re.compile(r"^decoder\.seg_layers\.(\d+)\.(weight|bias)$")
_DUP = re.compile(r"(^decoder\.encoder\.|\.all_modules\.)")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def convert_weights(network_weights: dict) -> dict:
    """nnU-Net ``PlainConvUNet`` state dict → :class:`network.UNet3D` state dict.

    The copies under ``all_modules`` and ``decoder.encoder`` must equal the tensor they repeat;
    a key that fits neither form is an error (another architecture)."""
    import torch

    sd = {_strip(k): v for k, v in network_weights.items()}
    out, dups, unknown = {}, {}, []
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            unknown.append(k)
            continue
        if _DUP.search(k):
            dups[k] = v
            continue
        if m := _ENC.match(k):
            s, c, kind, p = m.groups()
            out[f"encoder.{s}.{c}.{0 if kind == 'conv' else 1}.{p}"] = v
        elif m := _DEC.match(k):
            s, c, kind, p = m.groups()
            out[f"decoder.{s}.{c}.{0 if kind == 'conv' else 1}.{p}"] = v
        elif m := _UP.match(k):
            out[f"up.{m.group(1)}.{m.group(2)}"] = v
        elif m := _SEG.match(k):
            out[f"heads.{m.group(1)}.{m.group(2)}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise ModelError(f"The checkpoint has weights a PlainConvUNet does not have ({', '.join(unknown[:4])}"
                         f"{' ...' if len(unknown) > 4 else ''}): another architecture; only nnU-Net's "
                         "PlainConvUNet can be imported.")
    for k, v in dups.items():  # each repeat must be the same tensor as the copy we keep
        base = k[len("decoder."):] if k.startswith("decoder.encoder.") else k
        base = re.sub(r"\.all_modules\.(\d+)\.", lambda m: ".?.", base)
        if ".?." in base:
            cands = [b for b in (base.replace(".?.", ".conv."), base.replace(".?.", ".norm.")) if b in sd]
        else:
            cands = [base] if base in sd else []
        if cands and not any(sd[b].shape == v.shape and torch.equal(sd[b], v) for b in cands):
            raise ModelError(f"The checkpoint's {k} differs from the weight it repeats ({cands[0]}); the "
                             "checkpoint is inconsistent.")
    return out


# --------------------------------------------------------------------------- plans → manifest entries
def _name_of(path) -> str:
    return str(path or "").rsplit(".", 1)[-1]


def architecture(cfg: dict, num_classes: int, transpose_forward, flip=None):
    """``arch_kwargs`` of a resolved configuration → :class:`network.UNetConfig` (inference: no deep
    supervision). Anything our U-Net cannot reproduce exactly is a :class:`ModelError`."""
    from .network import UNetConfig

    arch = cfg.get("architecture")
    if arch is None and "UNet_class_name" in cfg:  # plans written before nnU-Net 2.3
        if cfg["UNet_class_name"] != PLAIN_UNET:
            raise ModelError(f"The configuration uses {cfg['UNet_class_name']}; only {PLAIN_UNET} can be imported.")
        n = len(cfg["n_conv_per_stage_encoder"])
        kw = {"n_stages": n, "kernel_sizes": cfg["conv_kernel_sizes"], "strides": cfg["pool_op_kernel_sizes"],
              "features_per_stage": [min(cfg["UNet_base_num_features"] * 2 ** i, cfg["unet_max_num_features"])
                                     for i in range(n)],
              "n_conv_per_stage": cfg["n_conv_per_stage_encoder"],
              "n_conv_per_stage_decoder": cfg["n_conv_per_stage_decoder"], "conv_bias": True,
              "conv_op": "torch.nn.modules.conv.Conv3d" if len(cfg.get("patch_size", [])) == 3 else "Conv2d",
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
              "norm_op_kwargs": {"eps": 1e-5, "affine": True},
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
        cls = PLAIN_UNET
    elif isinstance(arch, dict):
        cls = _name_of(arch.get("network_class_name"))
        kw = arch.get("arch_kwargs") or {}
    else:
        raise ModelError("plans.json: the configuration has no 'architecture' entry.")
    if cls != PLAIN_UNET:
        raise ModelError(f"The configuration's network is {cls or '?'}; only nnU-Net's {PLAIN_UNET} (the default "
                         "'nnUNetPlans') can be imported, not residual-encoder (ResEnc) or other presets. "
                         "Retrain with the default plans, or use nnU-Net's own inference.")
    if _name_of(kw.get("conv_op")) != "Conv3d":
        raise ModelError(f"The configuration is {_name_of(kw.get('conv_op')) or 'not 3D'}, not 3D; import a 3d_* "
                         "configuration (3d_fullres or 3d_lowres).")
    if kw.get("nonlin_first"):
        raise ModelError("The network applies the nonlinearity before the norm (nonlin_first); not supported.")
    norm = _name_of(kw.get("norm_op"))
    nkw = kw.get("norm_op_kwargs") or {}
    if norm != "InstanceNorm3d" or not nkw.get("affine", False) or nkw.get("track_running_stats"):
        raise ModelError(f"The network's norm is {norm or 'none'} {nkw}; only InstanceNorm3d(affine=True) "
                         "(nnU-Net's default) is supported.")
    nonlin = _name_of(kw.get("nonlin"))
    nlkw = kw.get("nonlin_kwargs") or {}
    if nonlin == "LeakyReLU":
        slope = float(nlkw.get("negative_slope", 0.01))
    elif nonlin == "ReLU":
        slope = 0.0
    else:
        raise ModelError(f"The network's nonlinearity is {nonlin or 'none'}; only LeakyReLU and ReLU are supported.")
    n = int(kw["n_stages"])
    as_list = lambda v, m: [v] * m if isinstance(v, int) else [x for x in v]  # noqa: E731
    strides = [as_list(s, 3) for s in as_list(kw["strides"], n)]
    kernels = [as_list(k, 3) for k in as_list(kw["kernel_sizes"], n)]
    if any(int(k) % 2 == 0 for kk in kernels for k in kk):
        raise ModelError(f"Even kernel sizes {kernels} are not supported.")
    if "n_conv_per_stage" not in kw:
        raise ModelError("arch_kwargs has no n_conv_per_stage (a residual-encoder network?); only "
                         f"{PLAIN_UNET} can be imported.")
    t = [int(a) for a in (transpose_forward or [0, 1, 2])]
    if sorted(t) != [0, 1, 2]:
        raise ModelError(f"plans.json: transpose_forward {t} is not a permutation of (0, 1, 2).")
    flip = sorted({int(a) for a in flip}) if flip else None
    bias = bool(kw.get("conv_bias", False))
    return UNetConfig(in_channels=1, num_classes=int(num_classes), strides=strides, kernels=kernels,
                      deep_supervision=False, negative_slope=slope,
                      features_per_stage=[int(f) for f in as_list(kw["features_per_stage"], n)],
                      n_conv_per_stage=[int(c) for c in as_list(kw["n_conv_per_stage"], n)],
                      n_conv_per_stage_decoder=[int(c) for c in as_list(kw["n_conv_per_stage_decoder"], n - 1)],
                      conv_bias=bias, upsample_bias=bias, norm_eps=float(nkw.get("eps", 1e-5)),
                      input_axes=None if t == [0, 1, 2] else t, input_flip=flip,
                      base_features=int(as_list(kw["features_per_stage"], n)[0]),
                      max_features=int(max(as_list(kw["features_per_stage"], n))))


def to_array_order(values, transpose_forward):
    """nnU-Net's per-axis values (after its transpose) → ParotidOAR's array order (z, y, x)."""
    t = [int(a) for a in (transpose_forward or [0, 1, 2])]
    out = [None, None, None]
    for j, a in enumerate(t):
        out[a] = values[j]
    return out


def normalisation(plans: dict, cfg: dict) -> dict:
    schemes = cfg.get("normalization_schemes") or []
    if list(schemes) != ["CTNormalization"]:
        raise ModelError(f"The model's normalisation is {schemes}; ParotidOAR runs one CT channel with nnU-Net's "
                         "CTNormalization (dataset.json channel_names {\"0\": \"CT\"}).")
    props = (plans.get("foreground_intensity_properties_per_channel") or {}).get("0")
    if not props or not all(k in props for k in ("mean", "std", "percentile_00_5", "percentile_99_5")):
        raise ModelError("plans.json lacks foreground_intensity_properties_per_channel['0'] (mean, std, "
                         "percentile_00_5, percentile_99_5) needed for CT normalisation.")
    return {"clip": [float(props["percentile_00_5"]), float(props["percentile_99_5"])],
            "mean": float(props["mean"]), "std": float(max(float(props["std"]), 1e-8)),
            "source": "nnU-Net CTNormalization (plans.json foreground_intensity_properties_per_channel)"}


def _label_map(label_map) -> dict:
    if label_map is None:
        return {}
    if isinstance(label_map, dict):
        return {str(k): str(v) for k, v in label_map.items()}
    p = Path(label_map)
    if not p.is_file():
        raise InputError(f"Label map {p} not found.")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"Label map {p} is not valid JSON ({exc}).") from None
    if not isinstance(d, dict):
        raise InputError(f"Label map {p} must be a JSON object {{\"nnU-Net label\": \"ParotidOAR name\"}}.")
    return {str(k): str(v) for k, v in d.items()}


def stage_labels(dataset_json: dict, stage: int, label_map=None) -> list[str]:
    """``dataset.json`` labels (network output channels, in value order) → canonical names
    ``["background", ...]``. Every foreground label must map: stage 1 to exactly ``Parotid``,
    stage 2 to distinct OARs."""
    raw = dataset_json.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise ModelError("dataset.json has no 'labels'.")
    if dataset_json.get("regions_class_order") or any(isinstance(v, (list, tuple)) for v in raw.values()):
        raise ModelError("The model is region-based (dataset.json regions_class_order); only plain label models "
                         "can be imported.")
    by_value = {}
    for name, v in raw.items():
        if str(name).lower() == "ignore":
            continue  # nnU-Net's ignore label is no network output
        by_value[int(v)] = str(name)
    values = sorted(by_value)
    if values != list(range(len(values))):
        raise ModelError(f"dataset.json label values {values} are not 0..N-1.")
    mapping = _label_map(label_map)
    canonical_lower = {n.lower(): n for n in L.STRUCTURES}
    out, bad = ["background"], []
    for v in values[1:]:
        name = by_value[v]
        target = mapping.get(name, mapping.get(str(v)))
        target = canonical_lower.get(str(target if target is not None else name).lower(), target)
        if target not in L.STRUCTURES:
            bad.append(f"{name!r} (value {v})" + (f" -> {target!r}" if target else ""))
        out.append(target)
    allowed = [L.PAROTID] if stage == 1 else list(L.OARS)
    if bad:
        raise InputError(f"dataset.json labels {', '.join(bad)} do not map to a ParotidOAR structure "
                         f"({', '.join(allowed)}). Map them with --label-map names.json, e.g. "
                         f"{{\"{by_value[values[1]] if len(values) > 1 else 'label'}\": \"{allowed[0]}\"}}.")
    wrong = [n for n in out[1:] if n not in allowed]
    if wrong or len(out) < 2 or (stage == 1 and len(out) != 2):
        want = "background + Parotid only" if stage == 1 else "background + OARs among " + ", ".join(L.OARS)
        raise InputError(f"A stage-{stage} model must output {want}; this one's labels map to {out[1:]}. "
                         "Check --stage and --label-map.")
    if len(set(out)) != len(out):
        raise InputError(f"Two nnU-Net labels map to the same structure: {out[1:]}. Fix --label-map.")
    return out


def _median_extent_mm(plans: dict):
    shape = plans.get("original_median_shape_after_transp")
    spacing = plans.get("original_median_spacing_after_transp")
    if not shape or not spacing or len(shape) != 3 or len(spacing) != 3:
        return None
    t = plans.get("transpose_forward") or [0, 1, 2]
    return [float(a) * float(b) for a, b in zip(to_array_order(shape, t), to_array_order(spacing, t))]


def check_input_region(stage: int, region: str, dataset_json: dict, plans: dict) -> str:
    """The input region the stage's training images covered must be one the cascade gives that stage.

    Authoritative when the data came from ``train --export-nnunet`` (its dataset.json says which
    stage and region); otherwise the training images' median extent is checked for a gross mismatch."""
    if region not in REGIONS[stage]:
        raise InputError(f"Stage {stage} sees {' or '.join(REGIONS[stage])} in the cascade, not {region!r}.")
    marker = dataset_json.get(EXPORT_KEY)
    if isinstance(marker, dict) and marker.get("input_region"):
        had = str(marker["input_region"])
        if had != region or int(marker.get("stage", stage)) != stage:
            raise ModelError(f"This model was trained on ParotidOAR stage-{marker.get('stage', '?')} crops (input "
                             f"region {had!r}, dataset.json), but is imported as stage {stage} with input region "
                             f"{region!r}. Import it as stage {marker.get('stage', '?')}, or train on the other "
                             "exported dataset.")
        return region
    ext = _median_extent_mm(plans)
    if ext is None:
        return region
    z, y, x = ext
    desc = f"median training image {x:.0f} x {y:.0f} x {z:.0f} mm (LR x AP x CC, plans.json)"
    if region == "roi" and max(x, y) > 200.0:
        raise ModelError(f"Stage 2 sees the ROI box + context (about 100-150 mm), but this model was trained on "
                         f"larger images ({desc}): not ROI crops. Import it as stage 1 (--input-region whole or "
                         "side), or train stage 2 on ROI crops (train --export-nnunet).")
    if region == "side" and x > 0.8 * y and x > 150.0:
        raise ModelError(f"Stage 1 with --input-region side sees half the head, but this model's training images "
                         f"are as wide as the whole head ({desc}). Use --input-region whole.")
    if region == "whole" and x < 0.6 * y:
        raise ModelError(f"--input-region whole, but this model's training images look like side halves or "
                         f"crops ({desc}). Use --input-region side (stage 1) or import it as stage 2.")
    return region


# --------------------------------------------------------------------------- the import
class NnunetStage:
    """One nnU-Net trained-model folder read for import: ``.spec`` (manifest stage entry), ``.state_dict``."""

    def __init__(self, spec: dict, state_dict: dict, record: dict):
        self.spec, self.state_dict, self.record = spec, state_dict, record


def read_stage(results_dir, stage: int, folds=None, label_map=None, checkpoint: str = "final",
               input_region: str | None = None, context_mm: float = 8.0, flip=None) -> NnunetStage:
    """Read and check everything; build the network and load the weights strictly. Writes nothing."""
    from . import bundle
    from .network import build

    results_dir = Path(results_dir)
    stage = int(stage)
    if stage not in (1, 2):
        raise InputError(f"--stage must be 1 or 2, got {stage}.")
    if not results_dir.is_dir():
        raise InputError(f"{results_dir} is not a folder. Pass an nnU-Net v2 trained-model folder.")
    plans = _read_json(results_dir / "plans.json", "plans.json is written by nnUNetv2_plan_and_preprocess")
    dataset_json = _read_json(results_dir / "dataset.json", "dataset.json is copied there by nnUNetv2_train")
    region = check_input_region(stage, input_region or REGIONS[stage][0], dataset_json, plans)
    names = stage_labels(dataset_json, stage, label_map)
    ckpts = find_checkpoints(results_dir, folds, checkpoint)
    loaded = [(f, p, load_checkpoint(p)) for f, p in ckpts]

    folder = parse_folder_name(results_dir)
    init = [ck.get("init_args") or {} for _, _, ck in loaded]
    configuration = folder.get("configuration") or init[0].get("configuration")
    if not configuration:
        raise ModelError(f"Cannot tell the configuration: {results_dir.name} is not named "
                         "<trainer>__<plans>__<configuration> and the checkpoint has no init_args.")
    for (f, p, ck), ia in zip(loaded, init):
        if ia.get("configuration") and ia["configuration"] != configuration:
            raise ModelError(f"{p} was trained with configuration {ia['configuration']!r}, but the folder is "
                             f"{configuration!r}: a checkpoint from another configuration. Put it in its own "
                             "results folder.")
        if ia.get("fold") is not None and str(ia["fold"]) != f:
            raise ModelError(f"{p} says it is fold {ia['fold']}, but lies in fold_{f}/.")
        if folder.get("trainer") and ck.get("trainer_name") and ck["trainer_name"] != folder["trainer"]:
            raise ModelError(f"{p} was written by trainer {ck['trainer_name']}, but the folder names "
                             f"{folder['trainer']}.")
    cfg = resolve_configuration(plans, configuration)
    if cfg.get("previous_stage"):
        raise ModelError(f"{configuration} is nnU-Net's own cascade (it takes the {cfg['previous_stage']} "
                         "segmentation as an extra input); import a 3d_fullres or 3d_lowres model instead.")
    t = plans.get("transpose_forward") or [0, 1, 2]
    arch = architecture(cfg, len(names), t, flip)
    spacing_zyx = to_array_order([float(v) for v in cfg["spacing"]], t)
    patch_zyx = to_array_order([int(v) for v in cfg["patch_size"]], t)
    if any(p % d for p, d in zip(patch_zyx, arch.divisor)):
        raise ModelError(f"plans.json patch_size {cfg['patch_size']} is not a multiple of the network's strides.")
    norm = normalisation(plans, cfg)
    mirrors = [ck.get("inference_allowed_mirroring_axes") for _, _, ck in loaded]
    mirror = mirrors[0]
    if any(m != mirror for m in mirrors):
        raise ModelError(f"The folds were trained with different mirroring axes ({mirrors}); import them separately.")
    mirror_zyx = sorted(int(t[int(j)]) for j in mirror) if mirror else []

    weights = [convert_weights(ck["network_weights"]) for _, _, ck in loaded]
    if len(weights) > 1:
        arch.ensemble = len(weights)
        sd = {f"members.{i}.{k}": v for i, w in enumerate(weights) for k, v in w.items()}
    else:
        sd = weights[0]
    net = build(arch)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())[:300]
        raise ModelError(f"The checkpoint weights do not fit the {configuration} network described by plans.json "
                         f"({msg}). Was plans.json replaced after training?") from None
    sd = {k: v.detach().float().contiguous() if v.is_floating_point() else v for k, v in net.state_dict().items()}

    spec = bundle.stage_spec(names, spacing_zyx[::-1], norm, patch_zyx, arch,
                             context_mm=context_mm if stage == 2 else None)
    spec["normalisation"]["source"] = norm["source"]
    spec["input_region"] = region
    spec["mirror_axes"] = mirror_zyx
    resampling = cfg.get("resampling_fn_data_kwargs") or {}
    record = {
        "format": "nnU-Net v2", "folder": str(results_dir.resolve()), "dataset": plans.get("dataset_name"),
        "plans": plans.get("plans_name") or folder.get("plans"), "configuration": configuration,
        "trainer": loaded[0][2].get("trainer_name") or folder.get("trainer"),
        "folds": [f for f, _, _ in loaded], "checkpoint": CHECKPOINTS[checkpoint],
        "epochs": [ck.get("current_epoch") for _, _, ck in loaded],
        "checkpoint_sha256": [bundle.sha256_file(p) for _, p, _ in loaded],
        "label_names": _dataset_label_names(dataset_json),
        "transpose_forward": [int(a) for a in t], "input_flip": arch.input_flip,
        "nnunet_resampling": {"data": {k: resampling.get(k) for k in ("order", "order_z", "force_separate_z")},
                              "parotidoar": "linear (SimpleITK) onto the stage grid"},
        "image_reader_writer": plans.get("image_reader_writer"),
        "imported": datetime.date.today().isoformat(),
    }
    spec["source"] = {k: record[k] for k in ("format", "dataset", "configuration", "trainer", "folds", "checkpoint")}
    return NnunetStage(spec, sd, record)


def _dataset_label_names(dataset_json: dict) -> list[str]:
    raw = dataset_json.get("labels") or {}
    return [n for n, _v in sorted(raw.items(), key=lambda kv: kv[1] if isinstance(kv[1], int) else 999)]


def import_stage(results_dir, stage: int, out, *, folds=None, label_map=None, checkpoint: str = "final",
                 base=None, input_region: str | None = None, context_mm: float = 8.0, flip=None,
                 name: str | None = None, version: str | None = None, force: bool = False) -> tuple[Path, dict]:
    """Import an nnU-Net v2 model as stage ``stage`` of the bundle ``out`` → ``(out, summary)``.

    If ``out`` is an existing bundle, its other stage is kept and this stage replaced (the folder is
    rewritten atomically) — only with ``force``, as every other writer of the project. Otherwise the other stage comes from ``base`` (a bundle folder or name;
    default: the default bundle). Weights are stored in float32."""
    from . import bundle

    out = Path(out)
    stage = int(stage)
    st, other = f"stage{stage}", f"stage{3 - stage}"
    if out.exists() and not (out / bundle.MANIFEST).is_file():
        raise OutputExistsError(f"{out} exists and is not a model bundle. Choose another --out folder.")
    adding = out.exists()
    if adding and not force:
        raise OutputExistsError(f"{out} is an existing bundle. Pass --force to replace its {st} (its {other} is "
                                "kept), or choose a new --out folder.")
    if adding and base is not None:
        raise InputError(f"--out {out} is an existing bundle; its {other} is kept, so --base cannot be used. "
                         "Write to a new folder to take the other stage from --base.")
    imported = read_stage(results_dir, stage, folds, label_map, checkpoint, input_region, context_mm, flip)
    src = bundle.load_bundle(out if adding else bundle.resolve_bundle_dir(base), verify=True)
    man = src.manifest
    keep_spec = {k: v for k, v in copy.deepcopy(man.stage(other)).items() if k not in ("file", "sha256", "dtype")}
    state_dicts = {other: src.state_dict(other), st: imported.state_dict}
    rec = imported.record
    src_desc = man.stage(other).get("source")
    other_desc = (f"nnU-Net v2 {src_desc.get('dataset')} ({src_desc.get('configuration')})" if src_desc
                  else f"{man.model_id}")
    desc = (f"Stage {stage} imported from nnU-Net v2 ({rec['dataset']}, {rec['configuration']}, {rec['trainer']}, "
            f"fold{'s' if len(rec['folds']) > 1 else ''} {', '.join(rec['folds'])}); stage {3 - stage} from "
            f"{other_desc}. {NOT_CLINICAL}")
    data = copy.deepcopy(man.data) if adding else {"description": "", "sources": list(man.data.get("sources", []))}
    note = (f"Stage {stage}: the nnU-Net dataset {rec['dataset']} (the importing institution's training data; state "
            "its provenance and consent here).")
    data["sources"] = [s for s in data.get("sources", []) if not s.startswith(f"Stage {stage}: the nnU-Net")] + [note]
    data["description"] = (f"Stage {stage}: nnU-Net v2 model trained on {rec['dataset']}. Stage {3 - stage}: "
                           f"{man.data.get('description', '') if not adding else other_desc}".strip())
    training = copy.deepcopy(man.training) if adding else {other: {"from_bundle": man.model_id}}
    training[st] = {"imported_from": rec}
    manifest = bundle.Manifest(
        name=name or (man.name if adding else out.name), version=version or (man.version if adding else "1.0.0"),
        clinical_use=False, description=desc, license=man.license, data=data,
        stages={st: imported.spec, other: keep_spec}, training=training, roi_margin_mm=man.roi_margin_mm,
        created=datetime.date.today().isoformat())
    manifest.stages = {s: manifest.stages[s] for s in bundle.STAGES}
    from .cascade import stage_input_region

    for s in bundle.STAGES:
        stage_input_region(manifest, s)
    bundle.save_bundle(out, manifest, state_dicts, half=False, force=adding)
    bundle.verify(out)
    summary = {"bundle": str(out), "stage": st, "replaced_in_existing_bundle": adding,
               "other_stage_from": str(src.directory), "labels": imported.spec["labels"],
               "spacing_xyz": imported.spec["spacing"], "patch_size_zyx": imported.spec["patch_size"],
               "input_region": imported.spec["input_region"], "mirror_axes_zyx": imported.spec["mirror_axes"],
               "folds": rec["folds"], "configuration": rec["configuration"]}
    return out, summary


# --------------------------------------------------------------------------- export (training data for nnU-Net)
def _write_nifti(path: Path, array: np.ndarray, geometry) -> None:
    import SimpleITK as sitk

    from .imageio import to_sitk

    sitk.WriteImage(to_sitk(np.ascontiguousarray(array), geometry), str(path), True)


def roi_context_crop(item: dict, context_mm: float = 8.0) -> dict:
    """A stage-2 item (cut with extra context for the trainer's ROI jitter) → the crop the cascade gives
    stage 2: the ROI's box plus ``context_mm`` (``item["roi"]`` is the ROI on the item's grid)."""
    from .imageio import Geometry
    from .roi import bounding_box

    g = Geometry.from_dict(item["meta"]["geometry"])
    pad = [int(np.ceil(context_mm / s - 1e-6)) for s in g.spacing_zyx]
    lo, hi = bounding_box(item["roi"], pad)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    meta = dict(item["meta"], geometry=g.crop(lo, hi).to_dict())
    return {"ct": item["ct"][sl], "label": item["label"][sl], "meta": meta}


def export_dataset(out_root, dataset_id: int, name: str, stage: int, items, force: bool = False,
                   context_mm: float | None = None) -> Path:
    """One nnU-Net raw dataset ``Dataset<id>_<name>`` from stage items (``ct`` int16, ``label`` uint8,
    ``meta.geometry``) → its folder. Written to a temporary sibling and renamed into place."""
    from .imageio import Geometry, atomic_folder

    if not items:
        raise InputError(f"No stage-{stage} cases to export.")
    if not (1 <= int(dataset_id) <= 999):
        raise InputError(f"nnU-Net dataset ids are 1..999, got {dataset_id}.")
    out_root = Path(out_root)
    final = out_root / f"Dataset{int(dataset_id):03d}_{name}"
    if final.exists() and not force:
        raise OutputExistsError(f"{final} already exists. Pass --force to replace it.")
    with atomic_folder(final, force=True) as tmp:  # existence checked above, with its own message
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        cases = []
        for i, it in enumerate(items):
            meta = it.get("meta") or {}
            g = Geometry.from_dict(meta["geometry"])
            case = re.sub(r"[^A-Za-z0-9_-]", "-", f"{meta.get('patient', 'case')}_{meta.get('side', '')}").strip("_")
            case = f"{case}_{i:04d}"
            _write_nifti(tmp / "imagesTr" / f"{case}_0000.nii.gz", np.asarray(it["ct"], np.int16), g)
            _write_nifti(tmp / "labelsTr" / f"{case}.nii.gz", np.asarray(it["label"], np.uint8), g)
            cases.append(case)
        names = [L.PAROTID] if stage == 1 else list(L.OARS)
        ds = {"channel_names": {"0": "CT"},
              "labels": {"background": 0, **{n: i for i, n in enumerate(names, start=1)}},
              "numTraining": len(cases), "file_ending": ".nii.gz",
              "name": name, "description": f"ParotidOAR stage-{stage} "
              + ("side crops at the stage-1 grid" if stage == 1 else "ROI crops (parotid + 17 mm box + context)")
              + f". {NOT_CLINICAL}",
              EXPORT_KEY: {"stage": stage, "input_region": "side" if stage == 1 else "roi", "context_mm": context_mm,
                           "spacing_xyz": list(Geometry.from_dict(items[0]["meta"]["geometry"]).spacing),
                           "orientation": "LPS-aligned grid (identity direction), as the cascade feeds the network"}}
        (tmp / "dataset.json").write_text(json.dumps(ds, indent=2) + "\n")
    return final
