"""Stage 2 from partially labelled real CT (OpenKBP): label groups and a marginal loss.

No public data set labels the six OARs. OpenKBP labels two things stage 2 can learn from:

* the **mandible**: inside the ROI it is the mandibular ramus and the condyle process (and a little
  of the mandibular body, which the paper's ramus contour takes in too);
* the **body**, from which the skin follows: the phantom (and the paper) define the skin as the
  body's outer rind, about 3 mm deep.

So a real sample cannot say "this voxel is ramus" or "this voxel is background", only "this voxel is
one of a *set* of classes". Each voxel of a real sample's label map holds a **group**, a set of
classes the voxel may be:

=========  ====================================================  =====================================
group      classes                                               where
=========  ====================================================  =====================================
AIR        background, external auditory canal                  outside the body (CT ≤ −400 HU, holes
                                                                 filled per slice); the canal's lumen
                                                                 is air open to the outside
INNER      background, auricula, mastoid process, canal          inside the body, deeper than the rind,
                                                                 not mandible (the three OARs the data
                                                                 does not label may be anywhere here)
RIND       skin                                                  the body's outer 3 mm, away from the ear
MANDIBLE   condyle process, mandibular ramus                     OpenKBP's Mandible
OPEN       background, auricula, mastoid process, canal,         like INNER, but on an axial slice where
           condyle process, mandibular ramus                     the Mandible is not contoured at all
                                                                 (OpenKBP often contours it only up to
                                                                 some level, below the condyle)
UNKNOWN    —                                                     no supervision (value 255): the ear
                                                                 zone (below), except the Mandible
=========  ====================================================  =====================================

**The ear zone** (groups v4). The auricle is a plate of soft tissue a few mm thick that stands out of the
head, and the canal opens in its concha: there the body's rind may be skin, auricula or canal, and nothing
in OpenKBP says which. Groups v3 allowed all three in RIND everywhere, and a long fine-tune (90 min, model
candidate 1.4.0-a) found the degenerate answer: it called the whole real rind "auricula" (28 cc of auricula
and 3 cc of skin on one side, skin DSC against the rind 0.24). So RIND is now skin alone, and the ear is left
unsupervised: :func:`ear_zone` finds the body's thin protrusions (what a morphological opening with a 5 mm
ball removes) and every voxel within 10 mm of them. Auricula and canal are learned from the phantoms alone.

The loss on a group map is the **marginal loss** (Shi et al., "Marginal loss and exclusion loss for
partially supervised multi-organ segmentation", Med Image Anal 2021;70:101979; the same idea as Fang &
Yan's target-adaptive loss, IEEE TMI 2020;39:3619): the softmax probabilities of the classes in a group
are summed into one probability, and cross-entropy is computed on those merged probabilities over the
supervised voxels. A voxel in INNER is therefore pushed away from ramus, condyle and skin only, never
towards background (it may be auricula, mastoid or canal); a voxel in MANDIBLE is pushed towards
"ramus or condyle" and the split between the two is left to the phantoms. A soft Dice (nnU-Net's batch
Dice, over the batch's group-labelled samples and their supervised voxels) is added for the groups
whose classes exclude background: MANDIBLE, over the voxels whose group shares none of its classes
(OPEN voxels may be ramus or condyle, so they count neither for nor against it), and RIND (skin alone, so
its probability is the skin's).

In a batch, a group-labelled sample is marked by an all-zero ``channel_mask`` (no class is labelled
on its own); :class:`ParotidOARLib.losses.DeepSupervisionLoss` then routes it to
:func:`marginal_loss`.
"""

from __future__ import annotations

import numpy as np

from . import labels as L

AIR, INNER, RIND, MANDIBLE, OPEN = 0, 1, 2, 3, 4
UNKNOWN = 255
RIND_MM = 3.0  # the phantom's skin: 2.6-3.4 mm

#: the classes (label values of stage 2: 0 background, 1 + index in ``L.OARS``) of each group
GROUP_CLASSES = {
    AIR: ("background", L.EAC),
    INNER: ("background", L.AURICULA, L.MASTOID, L.EAC),
    RIND: (L.SKIN,),
    MANDIBLE: (L.CONDYLE, L.RAMUS),
    OPEN: ("background", L.AURICULA, L.MASTOID, L.EAC, L.CONDYLE, L.RAMUS),
}
GROUP_NAMES = {AIR: "air", INNER: "inner", RIND: "rind", MANDIBLE: "mandible", OPEN: "open"}
#: groups that get a soft-Dice term: no background (the skin, since groups v4, is RIND's only class)
DICE_GROUPS = (MANDIBLE, RIND)
#: the ear zone (groups v4, :func:`ear_zone`): thin protrusions of the body are what an opening with a ball of
#: this radius removes (the auricle is ~2-6 mm thick), and the zone reaches this far around them
EAR_OPENING_MM = 5.0
EAR_ZONE_MM = 10.0
EAR_MIN_CC = 0.3
#: where a foreground-centred patch of a real crop is centred (not INNER, which is most of the crop)
SAMPLING_GROUPS = (MANDIBLE, RIND)


def class_value(name: str) -> int:
    return 0 if name == "background" else 1 + L.OARS.index(name)


def group_matrix(n_classes: int = 1 + len(L.OARS)) -> np.ndarray:
    """(groups × classes) 0/1 matrix: row g has a 1 for each class the group may be."""
    m = np.zeros((len(GROUP_CLASSES), n_classes), np.float32)
    for g, names in GROUP_CLASSES.items():
        for n in names:
            m[g, class_value(n)] = 1.0
    return m


def body_from_ct(ct: np.ndarray, threshold_hu: float = -400.0) -> np.ndarray:
    """The patient body: CT above ``threshold_hu``, largest connected component, holes filled per
    slice (``preprocess.body_mask``, the same body ``segment`` uses for its midline)."""
    from . import preprocess
    from .imageio import Geometry

    g = Geometry(size=tuple(reversed(ct.shape)), spacing=(1.0, 1.0, 1.0))  # the grid matters only for step=None
    return preprocess.body_mask(ct, g, threshold_hu=threshold_hu, step=1)


def outer_rind(body: np.ndarray, spacing_zyx, depth_mm: float = RIND_MM) -> np.ndarray:
    """The body's outer ``depth_mm`` (physical mm): body voxels whose centre lies within ``depth_mm`` of
    the body's surface. The surface lies on the faces of the outermost body voxels, so a voxel's depth
    is its distance to the nearest outside voxel centre minus the half-voxel from the outside voxel's
    centre to its face, along that direction (``0.5 / max_i(|u_i| / s_i)`` for the unit direction u
    and spacings s; half a voxel along an axis). On a 1 × 1 × 2 mm grid that gives 3 voxels in-plane
    and 2 along z for 3 mm; on OpenKBP's 3.9-5.4 mm grids, the outermost voxel. The crop's own faces are
    not a surface (a body cut by the crop gets no rind there)."""
    from scipy import ndimage

    body = np.asarray(body, bool)
    if not body.any() or body.all():
        return np.zeros_like(body)
    sp = np.asarray([float(s) for s in spacing_zyx])
    d, inds = ndimage.distance_transform_edt(body, sampling=sp, return_indices=True)
    cand = body & (d <= depth_mm + 0.5 * sp.max())  # only these can be within depth_mm
    pos = np.argwhere(cand)
    v = (inds[:, cand].T - pos) * sp  # mm, to the nearest outside voxel centre
    dist = d[cand]
    u = np.abs(v) / np.maximum(dist, 1e-9)[:, None]
    half = 0.5 / np.max(u / sp, axis=1)
    out = np.zeros_like(body)
    out[cand] = dist - half <= depth_mm + 1e-6
    return out


def ear_zone(body: np.ndarray, spacing_zyx, opening_mm: float = EAR_OPENING_MM,
             zone_mm: float = EAR_ZONE_MM, min_cc: float = EAR_MIN_CC) -> np.ndarray:
    """Where a real crop cannot tell skin from auricula or canal: the body's thin protrusions (the voxels a
    morphological opening with a ball of radius ``opening_mm`` removes: the auricle) and every voxel within
    ``zone_mm`` of them. Only protrusions of at least ``min_cc`` count. The opening is done with exact
    distance transforms in mm (erosion: deeper than ``opening_mm``; dilation: within ``opening_mm`` of the
    eroded body). The crop's faces are not a surface, as in :func:`outer_rind`."""
    from scipy import ndimage

    body = np.asarray(body, bool)
    if not body.any() or body.all():
        return np.zeros_like(body)
    sp = [float(s) for s in spacing_zyx]
    core = ndimage.distance_transform_edt(body, sampling=sp) > opening_mm
    if not core.any():
        return np.zeros_like(body)
    # more than a voxel beyond the opened body (the staircase of an oblique surface is not a protrusion)
    thin = body & (ndimage.distance_transform_edt(~core, sampling=sp) > opening_mm + max(sp))
    lab, n = ndimage.label(thin, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros_like(body)
    sizes = np.bincount(lab.ravel()) * float(np.prod(sp)) / 1000.0
    sizes[0] = 0.0
    thin = (sizes >= min_cc)[lab]
    if not thin.any():
        return np.zeros_like(body)
    return ndimage.distance_transform_edt(~thin, sampling=sp) <= zone_mm


def contoured_slices(mask: np.ndarray) -> np.ndarray:
    """A volume that is True on every axial slice (index axis 0) where ``mask`` has a voxel."""
    mask = np.asarray(mask, bool)
    return np.broadcast_to(mask.any(axis=(1, 2))[:, None, None], mask.shape).copy()


def group_map(ct: np.ndarray, mandible: np.ndarray | None, spacing_zyx, body: np.ndarray | None = None,
              depth_mm: float = RIND_MM, mandible_slices: np.ndarray | None = None) -> np.ndarray:
    """A real crop's label map of groups (uint8): AIR / INNER / RIND / MANDIBLE / OPEN, and UNKNOWN in the
    ear zone (:func:`ear_zone`; see the module doc). ``mandible_slices`` (True where the Mandible was
    contoured on the slice, on this grid; :func:`contoured_slices` on the source grid, resampled) turns INNER
    into OPEN elsewhere. Without a
    mandible label the mandible's voxels cannot be told from INNER, so the deep body is UNKNOWN (only
    the rind and the air are supervised)."""
    body = body_from_ct(ct) if body is None else np.asarray(body, bool)
    rind = outer_rind(body, spacing_zyx, depth_mm)
    out = np.full(ct.shape, AIR, np.uint8)
    out[body] = INNER if mandible is not None else UNKNOWN
    if mandible is not None and mandible_slices is not None:
        out[body & ~np.asarray(mandible_slices, bool)] = OPEN
    out[rind] = RIND
    out[ear_zone(body, spacing_zyx)] = UNKNOWN  # skin, auricula or canal: not said by the data (groups v4)
    if mandible is not None:
        out[np.asarray(mandible, bool)] = MANDIBLE
    return out


def stage2_real_item(sample, spacing=None, margin_mm: float = L.ROI_MARGIN_MM_DEFAULT, context_mm: float | None = None,
                     depth_mm: float = RIND_MM) -> dict:
    """One OpenKBP side → a group-labelled stage-2 item: the reference parotid + ``margin_mm`` ROI box
    (+ context for the sampling-time jitter, as :func:`training.stage2_item`) on the stage-2 grid,
    ``label`` = :func:`group_map` computed on that grid, ``channel_mask`` all zero (group-labelled)."""
    from . import dataset, training
    from .stageprep import expand_roi, stage2_arrays

    spacing = training.STAGE2_SPACING if spacing is None else spacing
    context_mm = training.ROI_JITTER_MM + 10.0 if context_mm is None else context_mm
    ct, g, masks, side = dataset.load_sample(sample)
    roi = expand_roi(masks["Parotid"], g, margin_mm)
    # the body on the whole CT (an airway or mouth cut by the crop would otherwise get a "skin" rind)
    keep = {"Body": body_from_ct(ct)}
    if "Mandible" in masks:
        keep["Mandible"] = masks["Mandible"]
        keep["MandibleSlices"] = contoured_slices(masks["Mandible"])
    ct2, m2, roi2, g2 = stage2_arrays(ct, g, keep, spacing, roi, context_mm=context_mm)
    label = group_map(ct2, m2.get("Mandible"), g2.spacing_zyx, body=m2["Body"], depth_mm=depth_mm,
                      mandible_slices=m2.get("MandibleSlices"))
    meta = {"patient": sample.patient, "side": side, "geometry": g2.to_dict(), "source": str(sample.ct_path.parent),
            "groups": {GROUP_NAMES[k]: [class_value(n) for n in v] for k, v in GROUP_CLASSES.items()},
            "partial": True}
    return {"ct": ct2, "label": label, "roi": roi2, "channel_mask": np.zeros(1 + len(L.OARS), np.uint8),
            "meta": meta}


def marginal_loss(logits, target, groups=None, smooth: float = 1e-5, dice_groups=DICE_GROUPS):
    """Marginal cross-entropy + soft Dice on merged probabilities (see the module doc).

    logits (B, C, Z, Y, X); target (B, Z, Y, X) of group ids (``UNKNOWN`` = unsupervised);
    groups: (G, C) 0/1 tensor (default :func:`group_matrix`)."""
    import torch

    if groups is None:
        groups = torch.as_tensor(group_matrix(logits.shape[1]), device=logits.device)
    groups = groups.to(device=logits.device, dtype=torch.float32)
    probs = torch.softmax(logits.float(), 1)
    merged = torch.einsum("gc,bczyx->bgzyx", groups, probs)  # P(voxel in group g)
    t = target.long()
    known = t != UNKNOWN
    n_known = known.sum()
    if n_known == 0:
        return 0.0 * logits.float().sum()
    tg = torch.where(known, t, torch.zeros_like(t))
    p_true = merged.gather(1, tg[:, None])[:, 0].clamp(min=1e-7)
    ce = -(torch.log(p_true) * known).sum() / n_known
    dice_terms = []
    for g in dice_groups:
        # voxels of another group sharing a class with g may or may not be g: left out of g's Dice
        shares = torch.nonzero((groups @ groups[g] > 0) & (torch.arange(len(groups), device=groups.device) != g))
        kn = (known & ~torch.isin(t, shares.flatten().to(t.dtype)))[:, None].float()
        p = merged[:, g:g + 1] * kn
        y = (t == g)[:, None].float()
        if not bool(y.any()):  # a group absent from the batch has no overlap to measure (its CE still counts)
            continue
        inter = (p * y).sum()
        dice_terms.append((2 * inter + smooth) / (p.sum() + y.sum() + smooth))
    dice = torch.stack(dice_terms).mean() if dice_terms else torch.ones((), device=logits.device)
    return ce + (1 - dice)
