"""Stage 2 from partially labelled real CT (issue 13): label groups, the marginal loss, the body rind,
group-labelled OpenKBP crops and a stage-2 training run that mixes them with phantoms.

Real torch, real OpenKBP files (skipped without ../shared/data/openkbp) and real phantoms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ParotidOARLib import labels as L
from ParotidOARLib import partial_labels as P
from ParotidOARLib.losses import DeepSupervisionLoss, masked_ce, soft_dice_loss

REPO = Path(__file__).resolve().parents[1]
OPENKBP = REPO.parent / "shared" / "data" / "openkbp"
needs_openkbp = pytest.mark.skipif(not (OPENKBP / "validation" / "pt_201").is_dir(),
                                   reason="needs ../shared/data/openkbp")
C = 1 + len(L.OARS)


def _logits_for(cls_map: np.ndarray, strength: float = 8.0) -> torch.Tensor:
    """Logits (1, C, Z, Y, X) that put almost all probability on ``cls_map``'s class per voxel."""
    t = torch.as_tensor(cls_map).long()[None]
    return (torch.nn.functional.one_hot(t, C).permute(0, 4, 1, 2, 3).float() * strength).requires_grad_(True)


def test_group_matrix_matches_the_documented_groups():
    m = P.group_matrix()
    v = P.class_value
    assert m.shape == (5, C)
    assert set(np.flatnonzero(m[P.MANDIBLE])) == {v(L.CONDYLE), v(L.RAMUS)}
    assert set(np.flatnonzero(m[P.RIND])) == {v(L.SKIN)}  # groups v4: the ear is UNKNOWN, not RIND
    assert set(np.flatnonzero(m[P.INNER])) == {0, v(L.AURICULA), v(L.MASTOID), v(L.EAC)}
    assert set(np.flatnonzero(m[P.AIR])) == {0, v(L.EAC)}
    assert set(np.flatnonzero(m[P.OPEN])) == {0, v(L.AURICULA), v(L.MASTOID), v(L.EAC), v(L.CONDYLE), v(L.RAMUS)}
    # the mandible and the rind never include background: they are the Dice groups
    assert m[P.MANDIBLE, 0] == 0 and m[P.RIND, 0] == 0
    # Dice on the groups without background: the mandible and the rind (skin alone)
    assert P.DICE_GROUPS == (P.MANDIBLE, P.RIND)


def test_marginal_loss_rewards_any_class_of_the_group_and_only_those():
    shape = (6, 6, 6)
    target = np.full(shape, P.MANDIBLE, np.uint8)
    target[:2] = P.INNER
    target[4:] = P.RIND
    tgt = torch.as_tensor(target)[None]

    def loss(cls_inner, cls_mandible, cls_rind):
        cm = np.zeros(shape, int)
        cm[:2], cm[2:4], cm[4:] = cls_inner, cls_mandible, cls_rind
        with torch.no_grad():
            return float(P.marginal_loss(_logits_for(cm), tgt))

    v = P.class_value
    good = [loss(v(L.AURICULA), v(L.RAMUS), v(L.SKIN)), loss(v(L.MASTOID), v(L.CONDYLE), v(L.SKIN)),
            loss(0, v(L.RAMUS), v(L.SKIN)), loss(v(L.EAC), v(L.CONDYLE), v(L.SKIN))]
    assert max(good) < 0.05, good
    # the mandible predicted as background, the inner body as ramus or skin, the rind as anything but skin
    # (groups v3 let the rind be auricula, and a long fine-tune called the whole real rind auricula): wrong
    for bad in (loss(v(L.AURICULA), 0, v(L.SKIN)), loss(v(L.RAMUS), v(L.RAMUS), v(L.SKIN)),
                loss(v(L.SKIN), v(L.RAMUS), v(L.SKIN)), loss(0, v(L.RAMUS), 0), loss(0, v(L.RAMUS), v(L.MASTOID)),
                loss(0, v(L.RAMUS), v(L.AURICULA)), loss(0, v(L.RAMUS), v(L.EAC))):
        assert bad > 0.5, bad


def test_marginal_loss_ignores_unknown_voxels():
    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 4, 8, 8))
    target[:, :2] = P.UNKNOWN
    logits = torch.randn(2, C, 4, 8, 8, requires_grad=True)
    P.marginal_loss(logits, target).backward()
    assert torch.count_nonzero(logits.grad[:, :, :2]) == 0  # no gradient where nothing is known
    assert torch.count_nonzero(logits.grad[:, :, 2:]) > 0
    changed = logits.detach().clone()
    changed[:, :, :2] = torch.randn(2, C, 2, 8, 8) * 10
    assert float(P.marginal_loss(changed, target)) == pytest.approx(float(P.marginal_loss(logits.detach(), target)))


def test_marginal_loss_with_singleton_groups_is_dice_plus_ce():
    """With one group per class the marginal loss is the ordinary Dice + CE of the foreground classes."""
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 6, 6)
    target = torch.randint(0, 3, (2, 4, 6, 6))
    eye = torch.eye(3)
    got = P.marginal_loss(logits, target, groups=eye, dice_groups=(1, 2))
    want = masked_ce(logits, target) + soft_dice_loss(logits, target)
    assert float(got) == pytest.approx(float(want), rel=1e-4)


def test_deep_supervision_routes_group_labelled_samples():
    """A batch mixing a phantom (class labels) and a real crop (groups, all-zero channel mask): each is
    scored by its own loss, weighted by its share of the batch."""
    torch.manual_seed(2)
    logits = torch.randn(2, C, 4, 8, 8)
    y = torch.randint(0, C, (2, 4, 8, 8))
    y[1] = torch.randint(0, 4, (4, 8, 8))
    cm = torch.ones(2, C)
    cm[1] = 0
    fn = DeepSupervisionLoss(1)
    got = float(fn(logits, y, cm))
    full = soft_dice_loss(logits[:1], y[:1], cm[:1]) + masked_ce(logits[:1], y[:1], cm[:1])
    want = 0.5 * float(full) + 0.5 * float(P.marginal_loss(logits[1:], y[1:]))
    assert got == pytest.approx(want, rel=1e-5)
    # all class-labelled: unchanged behaviour
    cm2 = torch.ones(2, C)
    assert float(fn(logits, y, cm2)) == pytest.approx(float(soft_dice_loss(logits, y, cm2) + masked_ce(logits, y, cm2)))


def test_outer_rind_depth_in_physical_mm():
    # a box body 40 mm wide in a 1 x 1 x 2 mm grid (z, y, x spacing 2, 1, 1)
    body = np.zeros((20, 60, 60), bool)
    body[5:15, 10:50, 10:50] = True
    rind = P.outer_rind(body, (2.0, 1.0, 1.0), 3.0)
    assert not (rind & ~body).any()
    row = rind[10, 30]  # through the middle: 3 voxels (3 mm) at each lateral face
    assert row[10:13].all() and not row[13:47].any() and row[47:50].all()
    col = rind[:, 30, 30]  # along z (2 mm voxels): centres 1 and 3 mm deep
    assert col[5:7].all() and col[13:15].all() and not col[7:13].any()
    # OpenKBP's grids (3.9 and 5.4 mm in-plane): the outermost voxel in-plane
    for s in (3.9, 5.4):
        r4 = P.outer_rind(body[:, ::4, ::4], (2.0, s, s), 3.0)
        assert r4[10, 7, 3] and not r4[10, 7, 4]
    # a diagonal surface: the depth is taken along the normal, not along the axes
    yy, xx = np.mgrid[0:80, 0:80]
    half_plane = np.broadcast_to((xx + yy < 80)[None], (4, 80, 80)).copy()
    rd = P.outer_rind(half_plane, (1.0, 1.0, 1.0), 3.0)
    depth = (79.5 - (xx + yy)) / np.sqrt(2)  # a centre's distance below the surface x + y = 79.5
    inside = half_plane[0]
    assert rd[2][inside & (depth <= 2.0)].all() and not rd[2][inside & (depth > 4.0)].any()
    # the crop's faces are not a surface
    full = np.ones((6, 10, 10), bool)
    assert not P.outer_rind(full, (1, 1, 1)).any()


def test_open_voxels_may_be_mandible_and_stay_out_of_its_dice():
    """OPEN (deep body on a slice without a Mandible contour) accepts ramus and condyle as well as the
    INNER classes, never skin; and a ramus prediction there does not cost the MANDIBLE Dice."""
    shape = (6, 6, 6)
    target = np.full(shape, P.MANDIBLE, np.uint8)
    target[:3] = P.OPEN
    tgt = torch.as_tensor(target)[None]
    v = P.class_value

    def loss(cls_open):
        cm = np.full(shape, v(L.RAMUS), int)
        cm[:3] = cls_open
        with torch.no_grad():
            return float(P.marginal_loss(_logits_for(cm), tgt))

    for ok in (v(L.RAMUS), v(L.CONDYLE), 0, v(L.MASTOID)):
        assert loss(ok) < 0.05, (ok, loss(ok))
    assert loss(v(L.SKIN)) > 0.5
    # the same ramus prediction on INNER voxels is wrong, in the CE and in the Dice
    target[:3] = P.INNER
    with torch.no_grad():
        cm = np.full(shape, v(L.RAMUS), int)
        assert float(P.marginal_loss(_logits_for(cm), torch.as_tensor(target)[None])) > 1.0


def test_ear_zone_finds_a_thin_plate_on_a_round_body_and_nothing_else():
    """A 60 mm ball (the head, cut by the crop's bottom face) with a 3 mm thick, 20 mm plate standing out of
    it (the auricle): the zone is the plate and 10 mm around it. The ball alone, its staircase surface and the
    crop face give no zone."""
    sp = (2.0, 1.0, 1.0)
    z, y, x = np.meshgrid(np.arange(50) * 2.0, np.arange(100) * 1.0, np.arange(100) * 1.0, indexing="ij")
    head = (z - 30) ** 2 + (y - 50) ** 2 + (x - 45) ** 2 <= 30 ** 2
    assert not P.ear_zone(head, sp).any()
    plate = (np.abs(x - 82) <= 1.5) & (np.abs(y - 50) <= 12) & (np.abs(z - 40) <= 10)
    zone = P.ear_zone(head | plate, sp)
    assert zone[plate & ~head].all()
    from scipy import ndimage

    d_plate = ndimage.distance_transform_edt(~(plate & ~head), sampling=sp)
    assert (d_plate[zone] <= 10.0 + 1e-6).all()
    assert not zone[(d_plate > 10.0) & head].any()  # the rest of the head's surface stays supervised


def test_contoured_slices():
    m = np.zeros((5, 4, 4), bool)
    m[1, 2, 2] = m[3, 0, 1] = True
    s = P.contoured_slices(m)
    assert s[1].all() and s[3].all() and not s[[0, 2, 4]].any()


@needs_openkbp
def test_real_item_groups_follow_the_openkbp_labels():
    from ParotidOARLib import dataset
    from ParotidOARLib.imageio import Geometry
    from ParotidOARLib.stageprep import resample_mask

    samples, _ = dataset.discover(OPENKBP / "validation", "openkbp", exclude=["pt_221"])
    s = [x for x in samples if x.patient == "pt_201"][0]
    it = P.stage2_real_item(s)
    lab, g2 = it["label"], Geometry.from_dict(it["meta"]["geometry"])
    assert it["meta"]["partial"] and not it["channel_mask"].any()
    assert lab.shape == it["ct"].shape == it["roi"].shape
    assert set(np.unique(lab)) <= {P.AIR, P.INNER, P.RIND, P.MANDIBLE, P.OPEN, P.UNKNOWN}
    # the mandible group is OpenKBP's mandible resampled onto the crop
    ct, g, masks, side = dataset.load_sample(s)
    mand = resample_mask(masks["Mandible"], g, g2)
    assert mand.any() and np.array_equal(lab == P.MANDIBLE, mand)
    # air where the CT is air, rind next to it, inner body deeper
    assert np.median(it["ct"][lab == P.AIR]) < -900
    assert np.median(it["ct"][lab == P.INNER]) > -200
    # OPEN: the deep body on the slices where the Mandible is not contoured (OpenKBP often stops
    # below the condyle); INNER only on contoured slices
    slices = resample_mask(P.contoured_slices(masks["Mandible"]), g, g2)
    assert not (lab == P.OPEN)[slices].any() and not (lab == P.INNER)[~slices].any()
    assert (lab == P.OPEN).any() == bool((~slices & (lab != P.AIR) & (lab != P.RIND) & (lab != P.UNKNOWN)).any())
    # the ear zone (groups v4): unsupervised, around the auricle, a small part of the crop, and the rind
    # away from it stays skin
    zone = lab == P.UNKNOWN
    assert 0 < zone.mean() < 0.15
    assert (lab[it["roi"]] == P.RIND).sum() * g2.voxel_volume_cc > 1.0  # the ROI reaches the skin
    # a rind is only a few mm deep: every rind voxel is within 4 mm of air (or of the ear zone, which holds air)
    from scipy import ndimage

    d = ndimage.distance_transform_edt((lab != P.AIR) & ~zone, sampling=g2.spacing_zyx)
    assert d[lab == P.RIND].max() <= 4.0


@needs_openkbp
def test_stage2_training_on_openkbp_and_phantoms(tmp_path):
    """`train --stage 2 --format openkbp` mixes group-labelled real crops with phantoms, fine-tuning the
    shipped bundle (its weights and normalisation), and writes a record naming both sources."""
    data = tmp_path / "openkbp"
    for split, pts in (("train", ["pt_201"]), ("validation", ["pt_202"])):
        (data / split).mkdir(parents=True)
        for pt in pts:
            src = OPENKBP / "validation" / pt
            if not src.is_dir():
                pytest.skip(f"{src} missing")
            os.symlink(src, data / split / pt)
    shipped = REPO / "Resources" / "Models" / "parotid-oar-research-v1"
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "ParotidOARLib", "train", "--stage", "2", "--format", "openkbp", "--data", str(data),
           "--work-dir", str(work), "--epochs", "1", "--iterations-per-epoch", "3", "--phantom-cases", "1",
           "--phantom-val-cases", "1", "--phantom-size", "small", "--init-from", str(shipped),
           "--real-fraction", "0.5", "--threads", "1", "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((work / "stage2" / "record.json").read_text())
    assert rec["stage2_real_samples_train"] == 2 and rec["stage2_real_samples_validation"] == 2
    assert rec["real_fraction"] == 0.5 and rec["iterations"] == 3
    from ParotidOARLib import bundle as bundle_mod

    assert rec["normalisation"]["mean"] == pytest.approx(bundle_mod.verify(shipped).normalisation("stage2")["mean"])
    cfg = json.loads((work / "stage2" / "train_config.json").read_text())
    assert cfg["init_checkpoint"] == str(shipped)
    # low-resolution simulation on by default with real CT in the mix, down to OpenKBP's ~4 mm
    assert cfg["augment"]["p_lowres"] == 0.25 and cfg["augment"]["lowres_zoom"][0] == 0.25
