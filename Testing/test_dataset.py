"""Training dataset discovery, validation (every problem at once), label maps and splits."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from ParotidOARLib import dataset, segio
from ParotidOARLib.errors import DatasetError
from ParotidOARLib.imageio import Geometry, write_image


def _ct_and_parotid(shape=(20, 48, 48), hu=-20, offset=(10, 24, 34)):
    ct = np.full(shape, -1000, np.int16)
    zz, yy, xx = np.indices(shape)
    body = (yy - 24) ** 2 + (xx - 24) ** 2 < 20 ** 2
    ct[body] = 40
    ct[(yy - 24) ** 2 + (xx - 24) ** 2 < 4 ** 2] = 800  # a "bone" so it is a CT
    par = (zz - offset[0]) ** 2 / 9 + (yy - offset[1]) ** 2 / 16 + (xx - offset[2]) ** 2 / 16 < 1
    ct[par] = hu
    return ct, par


GEOM = Geometry((48, 48, 20), (2.0, 2.0, 3.0), (-48.0, -48.0, 0.0))


def _seg_case(root, name, *, parotid_name="Parotid", hu=-20, empty=False, mismatch=False, no_seg=False):
    d = root / name
    d.mkdir(parents=True)
    ct, par = _ct_and_parotid(hu=hu)
    write_image(d / "ct.nrrd", ct, GEOM)
    if no_seg:
        return d
    g = GEOM
    if mismatch:
        g = Geometry((48, 48, 20), (2.0, 2.0, 3.0), (-40.0, -48.0, 0.0))
    if empty:
        par = np.zeros_like(par)
    segio.write_seg(d / "labels.seg.nrrd", {parotid_name: par, "Mastoid process": np.zeros_like(par)}, g)
    return d


def test_valid_seg_dataset_and_auto_side(tmp_path):
    for i in range(3):
        _seg_case(tmp_path, f"case{i}")
    samples, problems = dataset.discover(tmp_path, "seg")
    assert problems == []
    assert len(samples) == 3
    assert dataset.validate(samples, problems) == []
    ct, g, masks, side = dataset.load_sample(samples[0])
    assert g.same_grid(GEOM) and masks["Parotid"].sum() > 0
    assert side == "left"  # parotid centroid at +x of the body midline (LPS +x = patient left)


def test_broken_dataset_lists_every_problem(tmp_path):
    _seg_case(tmp_path, "good")
    _seg_case(tmp_path, "no_labels", no_seg=True)
    _seg_case(tmp_path, "empty_parotid", empty=True)
    _seg_case(tmp_path, "shifted", mismatch=True)
    _seg_case(tmp_path, "in_air", hu=-900)  # mask does not match the CT (like OpenKBP validation/pt_221)
    _seg_case(tmp_path, "unmapped", parotid_name="Parotid_L")
    samples, problems = dataset.discover(tmp_path, "seg")
    with pytest.raises(DatasetError) as exc:
        dataset.validate(samples, problems)
    msg = str(exc.value)
    for case in ("no_labels", "empty_parotid", "shifted", "in_air", "unmapped"):
        assert case in msg, msg
    assert "good" not in msg
    assert "6 problem" not in msg and "5 problem(s)" in msg
    assert "geometry does not match" in msg and "is empty" in msg and "HU" in msg


def test_label_map_maps_institution_names_with_side(tmp_path):
    _seg_case(tmp_path, "a", parotid_name="Parotid_L")
    lm = tmp_path / "map.json"
    lm.write_text(json.dumps({"Parotid_L": "Parotid:left", "Mastoid": "Mastoid process"}))
    samples, problems = dataset.discover(tmp_path, "seg", label_map=lm)
    assert problems == [] and len(samples) == 1
    assert samples[0].side == "left" and "Parotid" in samples[0].label_sources
    with pytest.raises(DatasetError):
        dataset.load_label_map({"X": "NotAStructure"})


def test_labelmap_format(tmp_path):
    d = tmp_path / "p1"
    d.mkdir()
    ct, par = _ct_and_parotid()
    write_image(d / "ct.nrrd", ct, GEOM)
    lab = np.zeros(ct.shape, np.uint8)
    lab[par] = 3
    write_image(d / "labels.nrrd", lab, GEOM)
    (d / "labels.json").write_text(json.dumps({"3": "Parotid_R"}))
    samples, problems = dataset.discover(tmp_path, "labelmap", label_map={"Parotid_R": "Parotid:right"})
    assert problems == [] and [s.side for s in samples] == ["right"]
    _, _, masks, _ = dataset.load_sample(samples[0])
    assert np.array_equal(masks["Parotid"], par)


def test_split_is_deterministic_and_70_15_15(tmp_path):
    pats = [f"pt_{i}" for i in range(40)]
    a = dataset.make_split(pats, seed=3)
    shuffled = pats[:]
    random.Random(1).shuffle(shuffled)
    b = dataset.make_split(shuffled, seed=3)
    assert a == b
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (28, 6, 6)
    assert set(a["train"]) | set(a["validation"]) | set(a["test"]) == set(pats)
    assert not set(a["train"]) & set(a["test"])
    assert dataset.make_split(pats, seed=4) != a
    p = dataset.save_split(a, tmp_path / "splits.json")
    assert dataset.load_or_make_split(p, shuffled, seed=99) == a  # existing split is kept


def test_openkbp_adapter_two_samples_and_pt221(shared_data):
    root = shared_data / "openkbp" / "validation"
    if not (root / "pt_221").exists():
        pytest.skip("openkbp/validation/pt_221 not present")
    samples, problems = dataset.discover(root, "openkbp")
    assert problems == []
    by_pat = {}
    for s in samples:
        by_pat.setdefault(s.patient, []).append(s.side)
    assert sorted(by_pat["pt_221"]) == ["left", "right"]
    sel = [s for s in samples if s.patient in ("pt_221", sorted(by_pat)[0])]
    found = dataset.validate(sel, raise_error=False)
    bad = [p for p in found if "pt_221" in p]
    assert len(bad) == 2 and all("HU" in p for p in bad)  # both parotids are mostly air
    assert not [p for p in found if "pt_221" not in p]
    # the left sample uses Parotid-Lt, the right Parotid-Rt
    s_left = [s for s in sel if s.patient == "pt_221" and s.side == "left"][0]
    assert s_left.label_sources["Parotid"][0].name == "Parotid-Lt.nrrd"
