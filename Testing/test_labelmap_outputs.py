"""``segment --out x.nii.gz`` / ``x.nrrd``: a uint8 label map plus ``x.labels.json`` (names → values)
beside it; ``.seg.nrrd`` stays the default. Read back with SimpleITK, the label map holds exactly the
``.seg.nrrd``'s structures (same voxels, names and geometry) from the same CT and model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bundle_utils import rotation_direction, synthetic_ct
from conftest import REPO
from ParotidOARLib import labels, segio
from ParotidOARLib.imageio import write_image

RESEARCH = "NOT FOR CLINICAL USE"


@pytest.fixture(scope="module")
def ct_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    ct, g = synthetic_ct(size=(64, 60, 24), spacing=(3.1, 3.4, 4.5), direction=rotation_direction(15, 0, True))
    return write_image(d / "ct.nrrd", ct, g)


def _cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "ParotidOARLib", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=600)


@pytest.fixture(scope="module")
def outputs(ct_path, tiny_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("out")
    done = {}
    for name in ("ref.seg.nrrd", "a.nii.gz", "b.nrrd"):
        r = _cli("segment", ct_path, "--side", "left", "--out", d / name, "--model", tiny_bundle, "--device", "cpu",
                 "--threads", "1", "--no-side-check")
        assert r.returncode == 0, r.stderr
        assert RESEARCH in r.stderr
        done[name] = d / name
    return d, done


@pytest.mark.parametrize("name", ["a.nii.gz", "b.nrrd"])
def test_labelmap_matches_the_seg_nrrd(outputs, name):
    import SimpleITK as sitk

    d, done = outputs
    seg_masks, seg_geom, _ = segio.read_seg(done["ref.seg.nrrd"])
    img = sitk.ReadImage(str(done[name]))
    assert img.GetPixelID() == sitk.sitkUInt8 and img.GetDimension() == 3
    # geometry: SimpleITK's own view of the file equals the .seg.nrrd's grid
    assert img.GetSize() == tuple(seg_geom.size)
    assert np.allclose(img.GetSpacing(), seg_geom.spacing, atol=1e-5)
    assert np.allclose(img.GetOrigin(), seg_geom.origin, atol=1e-3)
    assert np.allclose(img.GetDirection(), np.ravel(seg_geom.direction), atol=1e-5)
    doc = json.loads((d / f"{name.split('.')[0]}.labels.json").read_text())
    assert doc["labels"] == {n: i + 1 for i, n in enumerate(labels.STRUCTURES)}
    assert doc["labelmap"] == name
    assert doc["not_in_labelmap"] == [labels.roi_segment_name(17.0)]
    assert RESEARCH in doc["notice"] and doc["side"] == "left"
    array = sitk.GetArrayFromImage(img)
    assert set(np.unique(array)) <= {0, *doc["labels"].values()}
    overlapped = doc["overlap_voxels"]
    for n, value in doc["labels"].items():
        got = array == value
        if n not in overlapped:
            assert np.array_equal(got, seg_masks[n]), n
        else:  # only voxels already labelled by an earlier structure are missing
            assert not (got & ~seg_masks[n]).any() and (seg_masks[n] & ~got).sum() == overlapped[n], n
    assert array.any()
    # nothing outside the structures
    union = np.zeros_like(array, dtype=bool)
    for n in doc["labels"]:
        union |= seg_masks[n]
    assert np.array_equal(array > 0, union)


def test_seg_nrrd_stays_the_default_and_nothing_else_is_written(outputs):
    d, _ = outputs
    assert sorted(p.name for p in d.iterdir()) == ["a.labels.json", "a.nii.gz", "b.labels.json", "b.nrrd",
                                                   "ref.seg.nrrd"]
    # the segment help names the label-map formats
    r = _cli("segment", "--help")
    assert r.returncode == 0 and ".nii.gz" in r.stdout and ".seg.nrrd" in r.stdout


def test_an_existing_sidecar_is_not_overwritten(ct_path, tiny_bundle, tmp_path):
    (tmp_path / "c.labels.json").write_text("precious")
    r = _cli("segment", ct_path, "--side", "left", "--out", tmp_path / "c.nii.gz", "--model", tiny_bundle,
             "--device", "cpu", "--threads", "1", "--no-side-check")
    assert r.returncode == 2 and "c.labels.json" in r.stderr and "--force" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.labels.json"]
    assert (tmp_path / "c.labels.json").read_text() == "precious"
    r = _cli("segment", ct_path, "--side", "left", "--out", tmp_path / "c.png", "--model", tiny_bundle)
    assert r.returncode == 2 and ".nii.gz" in r.stderr and "Traceback" not in r.stderr


def test_labelmap_round_trip_helpers(tmp_path):
    """write_labelmap / read_labelmap on their own: the overlap rule and the JSON counts."""
    from ParotidOARLib.imageio import Geometry

    g = Geometry(size=(6, 5, 4), spacing=(1.0, 2.0, 3.0), origin=(1.0, 2.0, 3.0))
    a = np.zeros(g.shape, bool)
    a[1:3, 1:3, 1:3] = True
    b = np.zeros(g.shape, bool)
    b[2:4, 2:4, 2:4] = True
    roi = np.ones(g.shape, bool)
    masks = {labels.PAROTID: a, labels.SKIN: b, labels.roi_segment_name(17.0): roi, "Other": ~roi}
    path, js = segio.write_labelmap(tmp_path / "x.nrrd", masks, g, side="right")
    got, g2, doc = segio.read_labelmap(path)
    assert js == tmp_path / "x.labels.json" and g2.same_grid(g)
    assert doc["labels"] == {labels.PAROTID: 1, labels.SKIN: 4, "Other": 8}
    assert np.array_equal(got[labels.PAROTID], a)
    assert np.array_equal(got[labels.SKIN], b & ~a)
    assert doc["overlap_voxels"] == {labels.SKIN: int((a & b).sum())}
    with pytest.raises(Exception, match="--force"):
        segio.write_labelmap(tmp_path / "x.nrrd", masks, g)
