"""Test helpers: nnU-Net v2 trained-model folders in nnU-Net's own format, without nnunetv2.

The networks are nnU-Net's real ``PlainConvUNet`` (``dynamic_network_architectures``, built from
``arch_kwargs`` the way nnU-Net resolves ``_kw_requires_import``); the checkpoints hold what
``nnUNetTrainer.save_checkpoint`` writes (network weights, optimizer state, logs with numpy
scalars, init_args, trainer name, mirroring axes).
"""

from __future__ import annotations

import io
import json
import pydoc
import re
import zipfile
from pathlib import Path

import numpy as np


def arch_kwargs(features, kernels, strides, n_conv=None, n_conv_dec=None) -> dict:
    n = len(features)
    return {
        "n_stages": n, "features_per_stage": list(features),
        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [list(k) for k in kernels],
        "strides": [list(s) for s in strides],
        "n_conv_per_stage": list(n_conv or [2] * n), "n_conv_per_stage_decoder": list(n_conv_dec or [2] * (n - 1)),
        "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }


def configuration(kwargs: dict, spacing_zyx, patch_zyx, network="dynamic_network_architectures.architectures.unet.PlainConvUNet"):
    return {
        "data_identifier": "nnUNetPlans_3d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch_zyx), "median_image_size_in_voxels": list(patch_zyx), "spacing": list(spacing_zyx),
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": network, "arch_kwargs": kwargs,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }


def plans(configurations: dict, norm=(40.0, 150.0, -200.0, 400.0), transpose=(0, 1, 2), name="Dataset501_Test",
          median_shape=None, median_spacing=None) -> dict:
    mean, std, lo, hi = norm
    t = list(transpose)
    return {
        "dataset_name": name, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(median_spacing or [1.0, 1.0, 1.0]),
        "original_median_shape_after_transp": list(median_shape or [64, 64, 64]),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": t,
        "transpose_backward": [t.index(i) for i in range(3)],
        "configurations": configurations, "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3000.0, "mean": mean, "median": mean, "min": -1000.0, "percentile_00_5": lo,
            "percentile_99_5": hi, "std": std}},
    }


def dataset_json(label_names) -> dict:
    return {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{n: i for i, n in enumerate(label_names, 1)}},
            "numTraining": 10, "file_ending": ".nii.gz"}


def build_plain_unet(kwargs: dict, num_classes: int, deep_supervision=False):
    """nnU-Net's PlainConvUNet from ``arch_kwargs`` (imports resolved as nnU-Net does)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    kw = dict(kwargs)
    for k in ("conv_op", "norm_op", "dropout_op", "nonlin"):
        if kw.get(k) is not None:
            kw[k] = pydoc.locate(kw[k])
    return PlainConvUNet(input_channels=1, num_classes=num_classes, deep_supervision=deep_supervision, **kw)


def randomise(net, seed: int):
    """He init (as nnU-Net) plus random norm affines and biases, so no parameter is trivial."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight") and p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def checkpoint(net, plans_d: dict, ds: dict, configuration_name: str, fold, mirror_axes=(0, 1, 2),
               trainer="nnUNetTrainer", prefix="") -> dict:
    """What nnUNetTrainer.save_checkpoint writes (numpy scalars in the logs, as in a real run)."""
    import torch

    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    return {
        "network_weights": {prefix + k: v for k, v in net.state_dict().items()},
        "optimizer_state": opt.state_dict(),
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.41), np.float64(0.52)], "ema_fg_dice": [np.float64(0.41)],
                    "dice_per_class_or_region": [[np.float64(0.4), np.float64(0.5)]],
                    "train_losses": [np.float32(-0.2)], "val_losses": [np.float32(-0.1)], "lrs": [0.01],
                    "epoch_start_timestamps": [1.7e9], "epoch_end_timestamps": [1.7e9 + 60]},
        "_best_ema": np.float64(0.41),
        "current_epoch": 2,
        "init_args": {"plans": plans_d, "configuration": configuration_name, "fold": fold, "dataset_json": ds,
                      "device": torch.device("cpu")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": tuple(mirror_axes),
    }


def write_results(folder, plans_d: dict, ds: dict, nets_by_fold: dict, configuration_name: str, **ck_kwargs) -> Path:
    """An nnU-Net results folder: plans.json, dataset.json, fold_X/checkpoint_final.pth (and _best)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans_d, indent=2))
    (folder / "dataset.json").write_text(json.dumps(ds, indent=2))
    for fold, net in nets_by_fold.items():
        d = folder / f"fold_{fold}"
        d.mkdir(exist_ok=True)
        ck = checkpoint(net, plans_d, ds, configuration_name, fold if fold == "all" else int(fold), **ck_kwargs)
        torch.save(ck, d / "checkpoint_final.pth")
        torch.save(ck, d / "checkpoint_best.pth")
    return folder


def as_numpy1_pickle(path) -> None:
    """Rewrite a checkpoint so its numpy scalars are named as numpy 1.x pickles name them
    (``numpy.core.multiarray.scalar``), as in checkpoints written before numpy 2."""
    path = Path(path)
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    buf = io.BytesIO()
    n = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data, n = re.subn(rb"cnumpy\._core\.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n", data)
            dst.writestr(info, data)
    assert n > 0, "no numpy scalar in the checkpoint to rename"
    path.write_bytes(buf.getvalue())


def unet3d_to_plain_state(sd: dict, plain_keys) -> dict:
    """ParotidOAR UNet3D weights → PlainConvUNet state dict (for a round trip of our own models).
    Written independently of the importer: every PlainConvUNet key is derived from its own name."""
    import torch

    out = {}
    for k in plain_keys:
        base = k[len("decoder."):] if k.startswith("decoder.encoder.") else k
        base = re.sub(r"\.all_modules\.0\.", ".conv.", base)
        base = re.sub(r"\.all_modules\.1\.", ".norm.", base)
        m = re.match(r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(\w+)$", base)
        if m:
            ours = f"encoder.{m[1]}.{m[2]}.{0 if m[3] == 'conv' else 1}.{m[4]}"
        elif m := re.match(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(\w+)$", base):
            ours = f"decoder.{m[1]}.{m[2]}.{0 if m[3] == 'conv' else 1}.{m[4]}"
        elif m := re.match(r"^decoder\.transpconvs\.(\d+)\.(\w+)$", base):
            ours = f"up.{m[1]}.{m[2]}"
        elif m := re.match(r"^decoder\.seg_layers\.(\d+)\.(\w+)$", base):
            ours = f"heads.{m[1]}.{m[2]}"
        else:
            raise KeyError(k)
        if ours not in sd and ours.startswith("up.") and ours.endswith(".bias"):
            w = sd[ours[:-len("bias")] + "weight"]
            out[k] = torch.zeros(w.shape[1])  # our upsampling has no bias: nnU-Net's is zero
        else:
            out[k] = sd[ours].clone()
    return out
