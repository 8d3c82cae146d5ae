"""Compare an imported stage with nnU-Net's own inference (``nnUNetv2_predict --save_probabilities``).

    .venv/bin/python Testing/benchmarks/nnunet_compare_predict.py BUNDLE STAGE IMAGE.nii.gz NNUNET_PROBS.npz [--tta]

``IMAGE`` is an exported crop (``imagesTr/*_0000.nii.gz``, already at the stage spacing, so nnU-Net
does not resample it). The bundle's stage network runs on it through ParotidOAR's sliding window,
once with ParotidOAR's padding (normalised air) and once padding with 0 as nnU-Net does, and the
softmax probabilities are compared with nnU-Net's (max |difference|, share of voxels whose argmax
label differs). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import numpy as np  # noqa: E402


def main(argv=None):
    import SimpleITK as sitk

    from ParotidOARLib import bundle, cascade, preprocess
    from ParotidOARLib.inference import select_device, sliding_window

    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("stage", choices=["stage1", "stage2"])
    ap.add_argument("image")
    ap.add_argument("probs")
    ap.add_argument("--tta", action="store_true", help="nnU-Net ran with mirroring (its default)")
    a = ap.parse_args(argv)
    b = bundle.load_bundle(a.bundle)
    man = b.manifest
    net = b.model(a.stage)
    img = sitk.GetArrayFromImage(sitk.ReadImage(a.image)).astype(np.float32)
    x = preprocess.normalise(img, man.normalisation(a.stage))
    with np.load(a.probs) as z:
        ref = z["probabilities"].astype(np.float32)
    patch = cascade.inference_patch(man, a.stage)
    n = len(man.labels(a.stage))
    dev = select_device("cpu")
    out = {"image": Path(a.image).name, "shape": list(img.shape), "patch": list(patch), "tta": a.tta}
    for name, pad in (("pad_air", cascade._normalised_air(man.normalisation(a.stage))), ("pad_zero", 0.0)):
        p = sliding_window(net, x, patch, n, dev, tta=a.tta, pad_value=pad,
                           mirror_axes=man.stage(a.stage).get("mirror_axes"))
        out[name] = {"max_abs_prob_diff": float(np.abs(p - ref).max()),
                     "label_disagreement": float(np.mean(p.argmax(0) != ref.argmax(0)))}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
