"""The notebook API: ``from ParotidOARLib import load_model, segment_image``, with SimpleITK images in
and out. The README's example is run exactly as written (in a fresh interpreter, in an empty folder,
with the shipped model)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bundle_utils import synthetic_ct
from conftest import REPO
from ParotidOARLib import labels, segio
from ParotidOARLib.errors import InputError, ModelError
from ParotidOARLib.imageio import to_sitk

MARKER = "<!-- notebook example: Testing/test_api.py runs this block as it is -->"


def readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert MARKER in text
    m = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], flags=re.S)
    assert m, "no python block after the marker"
    return m.group(1)


@pytest.mark.slow
def test_readme_notebook_example_runs(tmp_path):
    import SimpleITK as sitk

    code = readme_example()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("PAROTIDOAR_MODELS", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    assert "not for clinical use" in r.stdout.lower()
    assert "'Parotid': 1" in r.stdout and "'Mandibular ramus': 7" in r.stdout
    lm = sitk.ReadImage(str(tmp_path / "ct_labels.nii.gz"))
    masks, g, _ = segio.read_seg(tmp_path / "ct.seg.nrrd")
    assert lm.GetSize() == tuple(g.size) and np.allclose(lm.GetSpacing(), g.spacing, atol=1e-5)
    array = sitk.GetArrayFromImage(lm)
    assert np.array_equal(array == 1, masks[labels.PAROTID]) and masks[labels.PAROTID].sum() > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.seg.nrrd", "ct_labels.nii.gz"]


def test_segment_image_takes_an_image_or_a_path_and_returns_images(tiny_bundle, tmp_path):
    import SimpleITK as sitk

    from ParotidOARLib import Segmentation, load_model, segment_image

    ct, g = synthetic_ct(size=(64, 60, 24), spacing=(3.0, 3.0, 4.0))
    image = to_sitk(ct, g)
    model = load_model(tiny_bundle, device="cpu")
    assert model.name == "tiny-test" and "not for clinical use" in repr(model)
    a = segment_image(image, "left", model, threads=1, side_check=False)
    assert isinstance(a, Segmentation)
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    b = segment_image(tmp_path / "ct.nrrd", "left", model, threads=1, side_check=False)
    for name in labels.STRUCTURES:
        assert np.array_equal(a.masks[name], b.masks[name]), name
    lm = a.labelmap
    assert isinstance(lm, sitk.Image) and lm.GetPixelID() == sitk.sitkUInt8
    assert lm.GetSize() == image.GetSize() and lm.GetOrigin() == image.GetOrigin()
    assert lm.GetDirection() == image.GetDirection() and lm.GetSpacing() == image.GetSpacing()
    arr = sitk.GetArrayFromImage(lm)
    assert np.array_equal(arr == 1, a.masks[labels.PAROTID])
    assert np.array_equal(sitk.GetArrayFromImage(a.mask("ROI")) == 1, a.roi)
    # saving: the same files as the CLI, never over an existing one
    a.save(tmp_path / "x.nii.gz")
    assert json.loads((tmp_path / "x.labels.json").read_text())["labels"] == a.labels
    with pytest.raises(Exception, match="--force"):
        a.save(tmp_path / "x.nii.gz")
    # a given parotid (as an image on the CT grid) replaces stage 1
    c = segment_image(image, "left", model, parotid=a.mask("Parotid"), threads=1, side_check=False)
    assert np.array_equal(c.masks[labels.PAROTID], a.masks[labels.PAROTID])


def test_api_errors_are_one_line_project_errors(tiny_bundle):
    from ParotidOARLib import load_model, segment_image

    with pytest.raises(ModelError):
        load_model("no-such-bundle")
    with pytest.raises(InputError, match="SimpleITK.Image or a path"):
        segment_image(np.zeros((4, 4, 4)), "left", tiny_bundle)
    with pytest.raises(InputError, match="side"):
        ct, g = synthetic_ct(size=(64, 60, 24), spacing=(3.0, 3.0, 4.0))
        segment_image(to_sitk(ct, g), "up", tiny_bundle)


def test_importing_the_package_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, ParotidOARLib; ParotidOARLib.segment_image; "
                        "print('torch' in sys.modules)"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
