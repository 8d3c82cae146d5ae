"""The two-stage cascade: CT → parotid → 17 mm ROI → six organs at risk.

1. **Side.** The operated side is kept by a sagittal cut at the body-mask midline
   (LPS x; left = x > midline), see :func:`preprocess.body_midline_x`.
2. **Stage 1.** The side half is resampled onto an LPS-aligned grid at the
   stage-1 spacing, normalised with the bundle's values, and segmented by net 1
   (sliding window, Gaussian weighting). The largest parotid component is kept,
   plus any other within ``max_component_gap_mm`` (10 mm) of it: far-away blobs are
   dropped (chosen on OpenKBP validation, see :func:`keep_components`). An empty parotid stops the run
   (:class:`EmptyStructureError`): no OARs are ever produced from an empty ROI.
   The parotid probability is interpolated (linear, inside the parotid's box
   only) back onto the input grid and thresholded at 0.5.
3. **ROI.** ``roi.expand(parotid, input geometry, margin)`` — exact physical EDT
   on the parotid bounding box + margin, on the input grid.
4. **Stage 2.** The crop is the ROI's LPS bounding box plus ``context_mm``
   (8 mm, as in training), grown to at least the patch size, at the stage-2
   spacing. Net 2 gives per-class probabilities; these are resampled with
   linear interpolation onto the input grid inside the ROI's box, argmaxed,
   and every label outside the ROI is set to 0.
5. Everything handed back is on exactly the input geometry.

:func:`segment` wraps it with reading, output writing (atomic, no overwrite
without ``force``) and the JSON report.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, imageio, labels, preprocess, progress as progress_mod, roi as roi_mod
from .errors import EmptyStructureError, GeometryError, InputError
from .imageio import Geometry

log = logging.getLogger(__name__)

RESEARCH_WARNING = ("Research use only - NOT FOR CLINICAL USE (model trained on synthetic/public data).")
STAGE2_CONTEXT_MM = 8.0
MIN_COMPONENT_CC = 0.0
MAX_COMPONENT_GAP_MM = 10.0  # chosen on OpenKBP validation (eval_openkbp.py --component-study)
BODY_MARGIN_MM = 10.0
MIN_SIDE_WIDTH_MM = 30.0  # the parotid lies ~40-70 mm lateral of the midline
#: thickest slices the shipped model was trained on: OpenKBP 2-2.5 mm, phantoms 2 mm (a bundle may say
#: otherwise in its manifest's data.max_slice_mm); thicker slices get a warning
TRAINED_MAX_SLICE_MM = 3.0
#: wrong-side check: the other side's stage-1 parotid below this fraction of the chosen side's (which is at
#: least SIDE_CHECK_MIN_CC) looks resected while the chosen one looks intact
SIDE_CHECK_RATIO = 0.5
SIDE_CHECK_MIN_CC = 5.0
SIDE_CHECK_WINDOWS = ("mirror", "side")
#: sliding-window step per stage (fraction of the patch) when SegmentOptions.step is None. Stage 2 at 0.75 (at
#: least 25 % overlap) runs about a third of the windows of nnU-Net's 0.5 (before issue 18); stage 1 keeps 0.5:
#: at 0.75 the OpenKBP parotid DSC fell by 0.04-0.05 on both sides of pt_201 (speed_check.py --limit 2)
DEFAULT_STEPS = {"stage1": 0.5, "stage2": 0.75}
#: stage-1 probability above which a voxel joins the parotid itself. The ROI may be seeded from a lower one
#: (the bundle's ``stage1.roi_threshold`` or ``SegmentOptions.roi_threshold``): the uncertain rim of the gland,
#: where it touches the kept parotid, is then inside the ROI's 17 mm too (see :func:`_stage1_parotid`)
PAROTID_THRESHOLD = 0.5


# --------------------------------------------------------------------------- recommended architecture
@dataclass
class StageDefaults:
    architecture: object  # network.UNetConfig
    spacing: tuple  # (x, y, z) mm
    patch_size: tuple  # (z, y, x) voxels
    context_mm: float = 0.0

    def to_dict(self) -> dict:
        return {"architecture": self.architecture.to_dict(), "spacing": list(self.spacing),
                "patch_size": list(self.patch_size), "context_mm": self.context_mm}


def default_architecture(stage) -> StageDefaults:
    """The network, spacing and patch recommended for the shipped CPU-fast model (docs/cascade.md).

    Stage 1 sees the side half of the head at 4×4×3 mm (a 512×512×150 CT at 0.98×0.98×2 mm
    → about 63×125×100 voxels), stage 2 the ROI box + 8 mm at 1×1×2 mm (typically
    ~90×100×45 voxels). Both: 4 resolution stages, 16 → 128 features.
    """
    from .netconfig import UNetConfig

    s = str(stage).replace("stage", "")
    if s == "1":
        return StageDefaults(
            UNetConfig(in_channels=1, num_classes=2, base_features=16, max_features=128,
                       strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], deep_supervision=True),
            (4.0, 4.0, 3.0), (64, 64, 32), 0.0)
    if s == "2":
        return StageDefaults(
            UNetConfig(in_channels=1, num_classes=len(labels.OARS) + 1, base_features=16, max_features=128,
                       strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], deep_supervision=True),
            (1.0, 1.0, 2.0), (48, 96, 96), STAGE2_CONTEXT_MM)
    raise ValueError(f"stage must be 1 or 2, got {stage!r}")


# --------------------------------------------------------------------------- options / result
@dataclass
class SegmentOptions:
    side: str
    model_dir: str | os.PathLike | None = None
    device: str = "auto"
    roi_margin_mm: float = labels.ROI_MARGIN_MM_DEFAULT
    tta: bool = False
    force: bool = False
    series_uid: str | None = None
    min_component_cc: float = MIN_COMPONENT_CC
    max_component_gap_mm: float = MAX_COMPONENT_GAP_MM
    threads: int | None = None  # CPU threads; default = usable cores
    side_check: bool = True  # also run stage 1 (coarsely) on the other side and warn if --side looks wrong
    step: float | None = None  # sliding-window step (fraction of the patch) for both stages; None: DEFAULT_STEPS
    #: where the wrong-side check looks: "mirror" (one window at the mirror image of the chosen parotid) or "side"
    #: (the whole other side, before issue 18); see :func:`_side_check`
    side_check_window: str = "mirror"
    backend: str = "torch"  # "torch" (the reference) or "openvino" (optional package; falls back to torch)
    parotid_path: str | os.PathLike | None = None  # a parotid contour to use instead of stage 1
    #: stage-1 probability that seeds the ROI (<= 0.5); None: the bundle's ``stage1.roi_threshold`` (default 0.5,
    #: the parotid itself). Never changes the parotid contour; unused with a given parotid
    roi_threshold: float | None = None


@dataclass
class CascadeResult:
    masks: dict  # name → bool [k, j, i]: Parotid + 6 OARs
    roi: np.ndarray
    roi_name: str
    crop_box_lps: dict  # {"min": [x, y, z], "max": [x, y, z]} — the stage-2 crop (voxel edges)
    report: dict
    geometry: Geometry = None
    side: str = ""

    def all_masks(self) -> dict:
        """Structures + ROI, in the order written to the ``.seg.nrrd``."""
        out = dict(self.masks)
        out[self.roi_name] = self.roi
        return out


class _Timer:
    def __init__(self):
        self.t = {}
        self._start = time.perf_counter()

    def __call__(self, name):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[name] = timer.t.get(name, 0.0) + time.perf_counter() - self.t0
        return _Ctx()


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (POSIX getrusage; Windows peak working set)."""
    try:
        import resource
    except ImportError:  # Windows
        try:
            import ctypes
            from ctypes import wintypes

            class _Counters(ctypes.Structure):
                _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                            ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                            ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                            ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
                            ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                            ("PagefileUsage", ctypes.c_size_t), ("PeakPagefileUsage", ctypes.c_size_t)]

            counters = _Counters()
            counters.cb = ctypes.sizeof(counters)
            handle = ctypes.windll.kernel32.GetCurrentProcess()
            if not ctypes.windll.psapi.GetProcessMemoryInfo(handle, ctypes.byref(counters), counters.cb):
                return None
            return counters.PeakWorkingSetSize / 2 ** 20
        except Exception:  # noqa: BLE001 - memory reporting must never fail a segmentation
            return None
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024.0 if sys.platform != "darwin" else rss_kb / (1024.0 * 1024.0)


def peak_memory(device=None) -> dict:
    rss_mb = _peak_rss_mb()
    out = {"rss_mb": round(rss_mb, 1) if rss_mb is not None else None}
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


def keep_components(mask: np.ndarray, spacing_zyx, min_cc: float = MIN_COMPONENT_CC,
                    max_gap_mm: float = MAX_COMPONENT_GAP_MM) -> np.ndarray:
    """Stage-1 post-processing: the largest connected component (26-connectivity), plus any
    other of at least ``min_cc`` whose nearest voxel is at most ``max_gap_mm`` from the
    largest (a residual gland can be split in pieces; a blob far from the parotid bed is a
    false positive). ``max_gap_mm = inf`` keeps every component of at least ``min_cc``."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    voxel_cc = float(np.prod(spacing_zyx)) / 1000.0
    largest = int(np.argmax(counts))
    keep = counts * voxel_cc >= min_cc
    if np.isfinite(max_gap_mm) and keep.sum() > 1:
        lo, hi = roi_mod.bounding_box(mask)
        sub = tuple(slice(a, b) for a, b in zip(lo, hi))
        dist = ndimage.distance_transform_edt(lab[sub] != largest, sampling=spacing_zyx)
        near = ndimage.minimum(dist, lab[sub], index=np.arange(n + 1))
        keep &= np.asarray(near) <= max_gap_mm
    keep[largest] = True
    keep[0] = False
    return keep[lab]


def _normalised_air(norm: dict) -> float:
    return float(preprocess.normalise(np.array([preprocess.AIR_HU], np.float32), norm)[0])


def load_model_bundle(model_dir=None):
    from . import bundle as bundle_mod

    return bundle_mod.load_bundle(bundle_mod.resolve_bundle_dir(model_dir), verify=True)


# --------------------------------------------------------------------------- the cascade
def run(array: np.ndarray, geometry: Geometry, options: SegmentOptions, progress=None, bundle=None,
        name: str = "input", parotid_only: bool = False, parotid: np.ndarray | None = None,
        parotid_source: str | None = None) -> CascadeResult:
    """Segment one CT (int16 HU ``[k, j, i]`` on ``geometry``). See the module docstring.

    ``parotid_only`` stops after stage 1 (OARs and ROI left empty): used to study stage 1
    alone on real CT, where no six-OAR reference exists.

    ``parotid`` (bool ``[k, j, i]`` on ``geometry``) replaces stage 1: the ROI and stage 2 are built
    from this parotid (a clinician's corrected contour, or a reference one to study stage 2 alone).
    Only the part on the operated side of the body midline is used; none there is an error.
    ``parotid_source`` names it in the report (``"parotid_source": "given (<source>)"``)."""
    timer = _Timer()
    t_total = time.perf_counter()
    side, margin = check_options(options)
    array = preprocess.to_int16(array, name)  # (refuses NaN / infinite values)
    preprocess.validate_ct(array, geometry, name)
    if bundle is None:
        with timer("load_model"):
            bundle = load_model_bundle(options.model_dir)
    man = bundle.manifest
    roi_thr = roi_threshold(options, man)  # a bad stage1.roi_threshold is refused before any work
    unknown = [] if parotid_only else [n for n in man.labels("stage2")[1:] if n not in labels.OARS]
    if unknown or man.labels("stage1")[1:] != [labels.PAROTID]:
        from .errors import ModelError
        raise ModelError(f"Bundle {bundle.directory} has labels {man.labels('stage1')} / {man.labels('stage2')}; "
                         f"expected ['background', 'Parotid'] and background + {list(labels.OARS)}.")
    # stage 1 alone (parotid_only) needs no stage-2 network: whole-volume validation during
    # stage-1 training runs this path with a stage-1-only bundle
    needed = ("stage1",) if parotid_only else ("stage1", "stage2")
    for st in needed:
        stage_input_region(man, st)  # a stage trained on another input region is refused here

    warnings = []
    slice_mm = float(geometry.spacing[int(np.argmax(np.abs(geometry.direction_matrix[2])))])
    max_slice = float(man.data.get("max_slice_mm", TRAINED_MAX_SLICE_MM))
    if slice_mm > max_slice + 1e-6:
        warnings.append(f"{name}: {slice_mm:g} mm slices; the model was trained on slices of at most {max_slice:g} mm. "
                        "Small structures (the ear canal, the condyle) may be missed or too small: check them, or "
                        "use a thinner reconstruction of the scan.")

    # ---- preprocess: midline, side half on the stage-1 grid. It needs no torch, so in a fresh process it
    # runs while `segment` is still importing torch in the background (backends.preload; issue 18).
    with timer("preprocess"):
        midline, midline_info = preprocess.body_midline(array, geometry)
        side_lo, side_hi = _side_box(geometry, midline, midline_info, side)
        # a stage 1 trained on the whole CT sees all of the body; its parotid is kept on the operated side
        lo, hi = (side_lo, side_hi) if stage_input_region(man, "stage1") == "side" else \
            _side_box(geometry, midline, midline_info, None)
        if side_hi[0] - side_lo[0] < MIN_SIDE_WIDTH_MM:
            raise InputError(f"{name}: the patient's {side} side is not in the image (only {max(side_hi[0] - side_lo[0], 0):.0f} mm "
                             f"of it beyond the body midline at x = {midline:.1f} mm LPS; need "
                             f"{MIN_SIDE_WIDTH_MM:.0f} mm). Check --side (left = patient left) and the scan.")
        sp1 = man.spacing("stage1")
        g1 = preprocess.axis_aligned_grid(sp1, lo, hi)
        norm1 = man.normalisation("stage1")
        x1 = None
        if parotid is None:  # a given parotid needs no stage-1 input
            ct1 = preprocess.resample_region(array, geometry, g1, "linear", default_value=preprocess.AIR_HU,
                                             output_dtype=np.float32)
            x1 = preprocess.normalise(ct1, norm1)
            del ct1

    from . import backends
    from .inference import sliding_window

    with timer("load_model"):
        if backends.runs_without_torch(options.backend, options.device):
            # OpenVINO on the CPU: no torch import at all once the converted model is cached (issue 18)
            from .inference import thread_count

            device, threads, backend = backends.CPUDevice(), thread_count(options.threads), "openvino"
        else:
            from .inference import configure_cpu_threads, select_device

            device = select_device(options.device)
            threads = configure_cpu_threads(options.threads) if device.type == "cpu" else None
            backend = backends.resolve(options.backend, device.type)
        nets = {st: _network(bundle, st, device, backend, threads) for st in needed}
        net1, net2 = nets["stage1"], nets.get("stage2")
    for st in needed:
        div = man.architecture(st).divisor
        if any(p % d for p, d in zip(inference_patch(man, st), div)):
            from .errors import ModelError
            raise ModelError(f"Bundle {bundle.directory}: {st} patch {inference_patch(man, st)} is not a multiple of "
                             f"the network's {div}. Fix the manifest or retrain.")
    if progress:
        progress(progress_mod.STEPS["preprocess"][1], "preprocess")

    # ---- stage 1 (or the given parotid)
    given = None if parotid is None else (parotid_source or "caller")
    side_check = None
    roi_seed_info = None
    if parotid is not None:
        parotid = _given_parotid(parotid, geometry, side, midline, name)
        roi_seed = parotid
    else:
        parotid, chosen_cc, parotid_box, roi_seed, roi_seed_info = _stage1_parotid(
            net1, x1, man, options, device, norm1, g1, geometry, side, midline, name, progress, timer, roi_thr)
        if options.side_check:
            with timer("side_check"):
                side_check = _side_check(net1, array, geometry, man, options, device, norm1, midline, midline_info,
                                         side, chosen_cc, parotid_box)
            if side_check.get("warning"):
                warnings.append(f"{name}: {side_check['warning']}")
    del x1
    if parotid_only:
        masks = {n: parotid if n == labels.PAROTID else np.zeros(geometry.shape, bool) for n in labels.STRUCTURES}
        return CascadeResult(masks, np.zeros(geometry.shape, bool), "", {},
                             {"side": side, "timings": dict(timer.t), "side_check": side_check,
                              "warnings": warnings}, geometry, side)

    # ---- ROI
    with timer("roi"):
        roi = roi_mod.expand(roi_seed, geometry, margin)
        rlo, rhi = roi_mod.bounding_box(roi)
    if progress:
        progress(progress_mod.STEPS["roi"][1], "roi")

    # ---- stage 2
    with timer("stage2"):
        sp2 = man.spacing("stage2")
        norm2 = man.normalisation("stage2")
        patch2 = inference_patch(man, "stage2")
        context = float(man.stage("stage2").get("context_mm", STAGE2_CONTEXT_MM))
        clo, chi = preprocess.lps_bounds(geometry, rlo, rhi)
        g2 = preprocess.axis_aligned_grid(sp2, clo - context, chi + context, min_size_zyx=patch2)
        ct2 = preprocess.resample_region(array, geometry, g2, "linear", default_value=preprocess.AIR_HU,
                                         output_dtype=np.float32)
        x2 = preprocess.normalise(ct2, norm2)
        del ct2
        probs2 = sliding_window(net2, x2, patch2, len(man.labels("stage2")), device,
                                step=stage_step(options, "stage2"),
                                tta=options.tta, pad_value=_normalised_air(norm2),
                                progress=progress_mod.scaled(progress, "stage2"),
                                mirror_axes=man.stage("stage2").get("mirror_axes"))
        del x2

    # ---- back to the input grid, inside the ROI box only
    with timer("resample"):
        masks = roi_masks_from_probabilities(probs2, g2, geometry, roi, (rlo, rhi), man.labels("stage2")[1:])
        del probs2
        masks[labels.PAROTID] = parotid
        masks = {n: masks.get(n, np.zeros(geometry.shape, bool)) for n in labels.STRUCTURES}
    if progress:
        progress(progress_mod.STEPS["resample"][1], "resample")

    roi_name = labels.roi_segment_name(margin)
    lo2, hi2 = preprocess.lps_bounds(g2)
    crop_box = {"min": [round(float(v), 3) for v in lo2], "max": [round(float(v), 3) for v in hi2]}
    vox_cc = geometry.voxel_volume_cc
    timings = dict(timer.t)
    timings["cascade_total"] = time.perf_counter() - t_total
    report = {
        "tool": "ParotidOAR", "version": __version__,
        "notice": None if man.clinical_use else RESEARCH_WARNING,
        "model": {"id": man.model_id, "name": man.name, "version": man.version,
                  "clinical_use": bool(man.clinical_use), "directory": str(bundle.directory),
                  "sha256": bundle.sha256},
        "device": str(device), "threads": threads, "tta": bool(options.tta), "backend": backend,
        "step": {st: stage_step(options, st) for st in ("stage1", "stage2")},
        "side_check_window": options.side_check_window if side_check is not None else None,
        "parotid_source": "stage 1" if given is None else f"given ({given})",
        "warnings": warnings, "side_check": side_check,
        "side": side, "midline_x_mm": round(midline, 3), "midline": midline_info,
        "roi_margin_mm": margin, "roi_name": roi_name, "roi_seed": roi_seed_info,
        "roi_volume_cc": round(float(np.count_nonzero(roi)) * vox_cc, 3),
        "volumes_cc": {n: round(float(np.count_nonzero(m)) * vox_cc, 3) for n, m in masks.items()},
        "crop_box_lps": crop_box,
        "grids": {"input": geometry.to_dict(), "stage1": g1.to_dict(), "stage2": g2.to_dict()},
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "peak_memory": peak_memory(device),
    }
    return CascadeResult(masks, roi, roi_name, crop_box, report, geometry, side)


def check_options(options: SegmentOptions) -> tuple[str, float]:
    """Validate the options a user can get wrong (before any work); returns (side, margin in mm)."""
    from .backends import check_backend
    from .inference import check_threads

    side = preprocess.check_side(options.side)
    margin = float(options.roi_margin_mm)
    if not np.isfinite(margin) or margin <= 0:
        raise InputError(f"--roi-margin-mm must be a positive number of mm, got {options.roi_margin_mm}.")
    if options.step is not None and not (0.0 < float(options.step) <= 1.0):
        raise InputError(f"--step must be in (0, 1], got {options.step}.")
    if options.side_check_window not in SIDE_CHECK_WINDOWS:
        raise InputError(f"--side-check-window must be {' or '.join(SIDE_CHECK_WINDOWS)}, got "
                         f"{options.side_check_window!r}.")
    if options.roi_threshold is not None and not (0.0 < float(options.roi_threshold) <= PAROTID_THRESHOLD):
        raise InputError(f"--roi-threshold must be in (0, {PAROTID_THRESHOLD:g}], got {options.roi_threshold}.")
    check_threads(options.threads)
    check_backend(options.backend)
    return side, margin


def roi_threshold(options, man) -> float:
    """The stage-1 probability that seeds the ROI: ``options.roi_threshold``, else the bundle's
    ``stage1.roi_threshold``, else :data:`PAROTID_THRESHOLD` (the ROI is the parotid + margin)."""
    if options.roi_threshold is not None:
        return float(options.roi_threshold)
    t = float(man.stage("stage1").get("roi_threshold", PAROTID_THRESHOLD))
    if not (0.0 < t <= PAROTID_THRESHOLD):
        from .errors import ModelError
        raise ModelError(f"The model's stage1.roi_threshold must be in (0, {PAROTID_THRESHOLD:g}], got {t}.")
    return t


def _stage1_to_input(fg1, keep, thr, g1, geometry, side, midline):
    """Voxels of ``keep`` (bool, stage-1 grid) back on the input grid: ``fg1`` resampled linearly inside their
    padded box and thresholded at ``thr`` (voxels outside ``keep`` capped below ``thr``), on the operated side
    only. → (bool mask on the input grid or None if its box misses the input, LPS box on the stage-1 grid)."""
    blo, bhi = roi_mod.bounding_box(keep, pad_vox=2)
    plo, phi = preprocess.lps_bounds(g1, blo, bhi)
    tgt_box = _input_box(geometry, plo, phi)
    if tgt_box is None:
        return None, (plo, phi)
    fg = np.where(keep, fg1, np.minimum(fg1, thr - 0.01)).astype(np.float32)  # dropped components stay out
    tlo, thi = tgt_box
    g_sub = geometry.crop(tlo, thi)
    sub = preprocess.resample_to(fg, g1, g_sub, "linear", default_value=0.0) >= thr
    sub &= preprocess.side_halfspace_mask(g_sub, side, midline)
    out = np.zeros(geometry.shape, bool)
    out[tuple(slice(a, b) for a, b in zip(tlo, thi))] = sub
    return out, (plo, phi)


def _stage1_parotid(net1, x1, man, options, device, norm1, g1, geometry, side, midline, name, progress, timer,
                    thr: float = PAROTID_THRESHOLD):
    """Stage 1 on the side crop → the parotid on the input grid (post-processed, operated side only), its
    stage-1 volume (cc), its LPS box (lo, hi) on the stage-1 grid, the ROI's seed on the input grid and a
    report of it.

    The seed is the parotid, or, with a ROI threshold ``thr`` below 0.5 (:func:`roi_threshold`), the parotid
    plus the voxels of probability >= ``thr`` connected (26-connectivity, stage-1 grid) to the kept parotid:
    where stage 1 hesitates at the gland's edge, the OARs next to it still fall inside the ROI. It never
    changes the parotid contour."""
    from scipy import ndimage

    from .inference import sliding_window

    with timer("stage1"):
        probs1 = sliding_window(net1, x1, inference_patch(man, "stage1"), 2, device,
                                step=stage_step(options, "stage1"),
                                tta=options.tta, pad_value=_normalised_air(norm1),
                                progress=progress_mod.scaled(progress, "stage1"),
                                mirror_axes=man.stage("stage1").get("mirror_axes"))
        fg1 = probs1[1]
        del probs1
        if stage_input_region(man, "stage1") == "whole":  # only the operated side's parotid counts
            fg1 = np.where(preprocess.side_halfspace_mask(g1, side, midline), fg1, 0.0).astype(np.float32)
        par1 = fg1 >= PAROTID_THRESHOLD
        empty_msg = (f"Stage 1 found no parotid on the patient's {side} side of {name}. Check --side "
                     "(left = patient left), that the scan covers the parotid region, and the model. "
                     "No organs at risk were produced.")
        if not par1.any():
            raise EmptyStructureError(empty_msg)
        par1 = keep_components(par1, g1.spacing_zyx, options.min_component_cc, options.max_component_gap_mm)
        par1_cc = float(np.count_nonzero(par1)) * g1.voxel_volume_cc
        parotid, box = _stage1_to_input(fg1, par1, PAROTID_THRESHOLD, g1, geometry, side, midline)
        if parotid is None or not parotid.any():
            raise EmptyStructureError(empty_msg)
        seed, info = parotid, {"threshold": thr}
        if thr < PAROTID_THRESHOLD:
            lab, _ = ndimage.label(fg1 >= thr, structure=np.ones((3, 3, 3), bool))
            ids = np.unique(lab[par1])
            seed1 = np.isin(lab, ids[ids > 0])
            extra, _ = _stage1_to_input(fg1, seed1, thr, g1, geometry, side, midline)
            seed = parotid if extra is None else parotid | extra
            info["added_cc"] = round(float(np.count_nonzero(seed & ~parotid)) * geometry.voxel_volume_cc, 3)
    return parotid, par1_cc, box, seed, info


def _side_box(geometry: Geometry, midline: float, midline_info: dict, side: str | None):
    """LPS (lo, hi) of the stage-1 search box: the body (+ BODY_MARGIN_MM of air; a 500 mm field of view
    is mostly air) on ``side`` of the midline (``None``: both sides)."""
    lo, hi = preprocess.lps_bounds(geometry)
    blo, bhi = (np.asarray(v) for v in midline_info["body_box_lps"])
    lo, hi = np.maximum(lo, blo - BODY_MARGIN_MM), np.minimum(hi, bhi + BODY_MARGIN_MM)
    if side == "left":
        lo[0] = max(lo[0], midline)
    elif side == "right":
        hi[0] = min(hi[0], midline)
    return lo, hi


def _side_check(net1, array, geometry, man, options, device, norm1, midline, midline_info, side, chosen_cc,
                parotid_box=None) -> dict:
    """Stage 1 on the *other* side too, as a volume estimate, to catch a wrong ``--side``: after a
    parotidectomy the operated side's gland is gone or small, so a chosen side whose gland looks intact while
    the other looks resected is probably the wrong one. Returns the two stage-1 volumes and, in that case, a
    ``warning``.

    Where it looks (``options.side_check_window``, ``method`` in the result): ``"mirror"`` (the default), one
    window of the stage-1 patch (96 x 192 x 160 mm for the shipped model), centred on the mirror image, across
    the body midline, of the chosen parotid's box and kept on the other side (the glands sit about
    symmetrically, and the window is about twice a gland's size in every direction); ``"side"``, the whole
    other side in non-overlapping patch windows (the behaviour before issue 18, several times slower)."""
    from .inference import sliding_window

    other = "right" if side == "left" else "left"
    out = {"chosen_side": side, "chosen_cc": round(chosen_cc, 2), "other_cc": None, "warning": None}
    if stage_input_region(man, "stage1") != "side":
        out["skipped"] = "stage 1 was trained on the whole CT, not on one side"
        return out
    lo, hi = _side_box(geometry, midline, midline_info, other)
    if hi[0] - lo[0] < MIN_SIDE_WIDTH_MM:
        out["skipped"] = f"the patient's {other} side is not in the image"
        return out
    patch = inference_patch(man, "stage1")
    sp1 = np.asarray(man.spacing("stage1"), float)
    if options.side_check_window == "mirror" and parotid_box is not None:
        out["method"] = "mirror window"
        centre = 0.5 * (np.asarray(parotid_box[0], float) + np.asarray(parotid_box[1], float))
        centre[0] = 2.0 * midline - centre[0]
        half = np.asarray(patch[::-1], float) * sp1 / 2.0
        lo, hi = np.maximum(lo, centre - half), np.minimum(hi, centre + half)
    else:
        out["method"] = "whole side"
    g = preprocess.axis_aligned_grid(tuple(sp1), lo, hi)
    ct = preprocess.resample_region(array, geometry, g, "linear", default_value=preprocess.AIR_HU,
                                    output_dtype=np.float32)
    x = preprocess.normalise(ct, norm1)
    del ct
    fg = sliding_window(net1, x, patch, 2, device, step=1.0, tta=False,
                        pad_value=_normalised_air(norm1))[1] >= 0.5
    other_cc = 0.0
    if fg.any():
        fg = keep_components(fg, g.spacing_zyx, options.min_component_cc, options.max_component_gap_mm)
        other_cc = float(np.count_nonzero(fg)) * g.voxel_volume_cc
    out["other_cc"] = round(other_cc, 2)
    if chosen_cc >= SIDE_CHECK_MIN_CC and other_cc < SIDE_CHECK_RATIO * chosen_cc:
        out["warning"] = (f"the parotid on the chosen ({side}) side looks intact ({chosen_cc:.1f} cc) and the one on "
                          f"the {other} side looks resected ({other_cc:.1f} cc). Is the operated side {other}? Check "
                          "--side (left = patient left).")
    return out


def stage_step(options, stage: str) -> float:
    """The sliding-window step of ``stage``: ``options.step`` if given, else :data:`DEFAULT_STEPS`."""
    return DEFAULT_STEPS[stage] if options.step is None else float(options.step)


def _network(bundle, stage: str, device, backend: str, threads):
    """The stage's network for ``backend``: the bundle's torch module (oneDNN forced on the CPU) or an
    OpenVINO model, each made once per bundle (a batch or an API model reuses it)."""
    if backend == "openvino":
        from .backends import openvino_model

        key = ("openvino", stage, threads)
        if key not in bundle.backend_models:
            bundle.backend_models[key] = openvino_model(bundle, stage, inference_patch(bundle.manifest, stage),
                                                        threads)
        return bundle.backend_models[key]
    net = bundle.model(stage, device)
    if device.type == "cpu":
        from .inference import optimise_for_cpu

        optimise_for_cpu(net)
    return net


def _given_parotid(parotid, geometry: Geometry, side: str, midline: float, name: str) -> np.ndarray:
    """Check a caller's parotid (instead of stage 1): right grid, on the operated side, not empty."""
    parotid = np.asarray(parotid)
    if parotid.shape != tuple(geometry.shape):
        raise InputError(f"The given parotid has shape {parotid.shape}, the CT {name} {tuple(geometry.shape)}; "
                         "it must lie on the CT's grid (resample it first).")
    parotid = parotid.astype(bool)
    if not parotid.any():
        raise EmptyStructureError(f"The given parotid for {name} is empty; draw the residual parotid, or leave "
                                  "it out to let stage 1 find it.")
    on_side = parotid & preprocess.side_halfspace_mask(geometry, side, midline)
    if not on_side.any():
        other = "right" if side == "left" else "left"
        raise InputError(f"The given parotid lies entirely on the patient's {other} side of {name} (body midline "
                         f"x = {midline:.1f} mm LPS), but --side is {side}. Check --side (left = patient left) "
                         "or the parotid contour.")
    return on_side


def roi_masks_from_probabilities(probs: np.ndarray, prob_geometry: Geometry, geometry: Geometry, roi: np.ndarray,
                                 roi_box, names) -> dict:
    """Per-class probabilities (C, z, y, x) on ``prob_geometry`` → ``{names[c-1]: bool mask}`` on ``geometry``:
    linear resampling inside the ROI's index box ``roi_box`` = (lo, hi) only, argmax, and every voxel
    outside ``roi`` set to background (channel 0)."""
    import SimpleITK as sitk

    rlo, rhi = roi_box
    g_roi = geometry.crop(rlo, rhi)
    vec = sitk.GetImageFromArray(np.moveaxis(probs, 0, -1), isVector=True)
    prob_geometry.apply_to_sitk(vec)
    ref = sitk.Image([int(v) for v in g_roi.size], sitk.sitkUInt8)
    g_roi.apply_to_sitk(ref)
    back = sitk.GetArrayFromImage(sitk.Resample(vec, ref, sitk.Transform(), sitk.sitkLinear, 0.0))
    del vec
    lab = np.argmax(back, axis=-1).astype(np.uint8)
    del back
    sl = tuple(slice(a, b) for a, b in zip(rlo, rhi))
    lab[~roi[sl]] = 0
    masks = {}
    for value, name in enumerate(names, start=1):
        m = np.zeros(geometry.shape, bool)
        m[sl] = lab == value
        masks[name] = m
    return masks


#: what each stage may see: stage 1 the side half (the default) or the whole CT, stage 2 the ROI box + context
INPUT_REGIONS = {"stage1": ("side", "whole"), "stage2": ("roi",)}


def stage_input_region(man, stage: str) -> str:
    """The stage's ``input_region`` from the manifest (default: side / roi); another one is a ModelError."""
    region = man.stage(stage).get("input_region") or INPUT_REGIONS[stage][0]
    if region not in INPUT_REGIONS[stage]:
        from .errors import ModelError
        raise ModelError(f"The bundle's {stage} was trained on the input region {region!r}, but the cascade's "
                         f"{stage} sees {' or '.join(repr(r) for r in INPUT_REGIONS[stage])}. Use a {stage} "
                         "model trained on that region (see docs/nnunet.md).")
    return region


def inference_patch(man, stage: str) -> tuple[int, int, int]:
    """The window used at inference: the stage's optional ``inference_patch_size`` (a larger window
    than in training: fewer overlapping windows, several times faster on CPU, see docs/cascade.md),
    else its training ``patch_size`` (nnU-Net's choice)."""
    spec = man.stage(stage)
    return tuple(int(v) for v in spec.get("inference_patch_size") or spec["patch_size"])


def _input_box(geometry: Geometry, lo_lps, hi_lps):
    """Index box of ``geometry`` covering the LPS box (None if outside)."""
    g = preprocess.axis_aligned_grid(geometry.spacing, lo_lps, hi_lps)
    return preprocess.source_index_box(geometry, g, pad=1)


# --------------------------------------------------------------------------- file → file
#: reader metadata copied into the JSON report (an allow-list, so identifiers never leak into it)
_REPORT_INPUT_KEYS = ("format", "modality", "study_instance_uid", "series_instance_uid",
                      "frame_of_reference_uid", "resampled", "warnings", "original_dtype")


def segment(input_path, out_path, options: SegmentOptions, progress=None, report_path=None,
            rtstruct_path=None, dicom_seg_path=None, warn=True, bundle=None) -> dict:
    """Read ``input_path``, run the cascade, write ``out_path`` and optional outputs.

    ``out_path`` ending in ``.seg.nrrd`` is a Slicer segmentation (every structure and the ROI);
    ``.nii.gz``, ``.nii`` or ``.nrrd`` is a uint8 label map of the seven structures with a JSON of
    label names and values beside it (``x.nii.gz`` → ``x.labels.json``; :func:`segio.write_labelmap`).

    All outputs are written to temporary siblings first and renamed into place
    only when every one succeeded; on any error or cancellation nothing is left.
    Returns the report dict (also written to ``report_path`` as JSON). ``bundle``: an already loaded
    and verified model bundle (a batch loads it once), else ``options.model_dir`` is loaded.
    """
    from . import segio

    t0 = time.perf_counter()
    input_path = Path(input_path)
    out_path = Path(out_path)
    if not input_path.exists():
        raise InputError(f"Input not found: {input_path}. Check the path.")
    check_options(options)
    labelmap_fmt = segio.labelmap_suffix(out_path)
    labels_json = segio.labels_json_path(out_path) if labelmap_fmt else None
    outputs = [out_path, report_path, rtstruct_path, dicom_seg_path, labels_json]
    imageio.check_outputs(outputs, options.force)  # every output writable, before any work
    if labelmap_fmt is None and not segio.is_seg_path(out_path):
        raise InputError(f"The output {out_path} must end in .seg.nrrd (a Slicer segmentation) or .nii.gz, .nii "
                         "or .nrrd (a label map with a JSON of label names beside it).")
    if (rtstruct_path or dicom_seg_path) and not input_path.is_dir():
        raise InputError("--rtstruct/--dicom-seg need the input to be a DICOM CT series folder (they reference "
                         f"its UIDs); {input_path} is not a folder. Use `export-rtstruct` with the DICOM series.")
    if options.parotid_path and not Path(options.parotid_path).exists():
        raise InputError(f"Parotid contour not found: {options.parotid_path}. Check the --parotid path.")

    # load the model first: a missing/corrupt bundle fails before the (slow) read
    if bundle is None:
        bundle = load_model_bundle(options.model_dir)
        log.info("model %s from %s (verified)", bundle.manifest.model_id, bundle.directory)
    if warn and not bundle.manifest.clinical_use:
        print(RESEARCH_WARNING, file=sys.stderr, flush=True)
    if progress:
        progress(0, "read")
    t_read = time.perf_counter()
    array, geometry, meta = preprocess.read_ct(input_path, series_uid=options.series_uid)
    t_read = time.perf_counter() - t_read
    log.info("read %s: %s voxels, spacing %s mm, in %.1f s", input_path, "x".join(map(str, geometry.size)),
             ", ".join(f"{v:g}" for v in geometry.spacing), t_read)
    if progress:
        progress(progress_mod.STEPS["read"][1], "read")
    parotid = read_parotid(options.parotid_path, geometry) if options.parotid_path else None
    result = run(array, geometry, options, progress=progress, bundle=bundle, name=input_path.name, parotid=parotid,
                 parotid_source=str(options.parotid_path) if options.parotid_path else None)
    del array

    t_write = time.perf_counter()
    # every output goes to a temporary sibling; all are published only when all are written, and never
    # over a file that exists (even one that appeared during the run) unless --force
    with imageio.staged_outputs(outputs, options.force) as (seg_tmp, report_tmp, rtstruct_tmp, dicom_seg_tmp,
                                                            labels_tmp):
        header = {"ParotidOAR_Model": result.report["model"]["id"], "ParotidOAR_Version": __version__,
                  "ParotidOAR_Side": result.side}
        if result.report["notice"]:
            header["ParotidOAR_Notice"] = result.report["notice"]
        if labelmap_fmt:
            segio.write_labelmap(seg_tmp, result.all_masks(), geometry, json_path=labels_tmp, side=result.side,
                                 force=True, fmt=labelmap_fmt, name=out_path.name,
                                 extra={"model": result.report["model"]["id"], "version": __version__,
                                        "notice": result.report["notice"]})
        else:
            segio.write_seg(seg_tmp, result.all_masks(), geometry, side=result.side, force=True,
                            extra_header=header)
        if progress:
            progress(95, "write")
        from . import dicomseg, rtstruct  # (highdicom, pydicom are imported only when writing)

        for tmp, write, extra in ((rtstruct_tmp, rtstruct.write_rtstruct, {"include_roi": True}),
                                  (dicom_seg_tmp, dicomseg.write_dicom_seg, {})):
            if tmp:
                write(tmp, result.all_masks(), geometry, input_path, series_uid=options.series_uid, force=True,
                      side=result.side, **extra)
        report = result.report
        report["warnings"] = list(meta.get("warnings") or []) + list(report.get("warnings") or [])
        # Only what is needed to link the outputs to their input: no patient identifiers, no per-slice UIDs.
        report["input"] = {"path": str(input_path),
                           **{k: v for k, v in meta.items() if k in _REPORT_INPUT_KEYS}}
        report["outputs"] = {"seg": str(out_path), "report": str(report_path) if report_path else None,
                             "rtstruct": str(rtstruct_path) if rtstruct_path else None,
                             "dicom_seg": str(dicom_seg_path) if dicom_seg_path else None,
                           "labels_json": str(labels_json) if labels_json else None}
        report["timings"]["read"] = round(t_read, 4)
        report["timings"]["write"] = round(time.perf_counter() - t_write, 4)
        report["timings"]["total"] = round(time.perf_counter() - t0, 4)
        report["peak_memory"] = peak_memory(_device_of(report))
        if report_tmp:
            report_tmp.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    log.info("wrote %s", ", ".join(str(p) for p in outputs if p))
    log.debug("timings (s): %s", report["timings"])
    if progress:
        progress(100, "write")
    return report


def read_parotid(path, geometry: Geometry) -> np.ndarray:
    """A parotid contour file → bool mask on the CT grid ``geometry``: a ``.seg.nrrd`` (the segment named
    Parotid, or its only segment) or a binary mask image (NRRD/NIfTI/MHA). Another grid is resampled
    (nearest neighbour, physical space)."""
    from .segio import load_masks, lost_in_resampling, resample_masks_to

    masks, geom, _kind = load_masks(path)
    if len(masks) > 1:
        named = [n for n in masks if n.strip().lower() == labels.PAROTID.lower()]
        if len(named) != 1:
            raise InputError(f"{path} holds {len(masks)} segments ({', '.join(masks)}) and "
                             f"{'none' if not named else 'several'} named {labels.PAROTID!r}; name the parotid "
                             f"segment {labels.PAROTID!r} or pass a file with the parotid only.")
        masks = {named[0]: masks[named[0]]}
    (mask,) = masks.values()
    if not geom.same_grid(geometry):
        try:
            resampled = resample_masks_to({"parotid": mask}, geom, geometry)
        except GeometryError as exc:
            raise InputError(f"The parotid contour {path} does not lie on the CT: {exc}") from None
        lost = lost_in_resampling({"parotid": mask}, geom, resampled, geometry)
        if lost:
            raise InputError(f"The parotid contour {path} lies outside the CT: {lost[0]}. Check that the "
                             "contour was drawn on this CT.")
        mask = resampled["parotid"]
    return mask


def _device_of(report):
    dev = report.get("device", "cpu")
    if str(dev).startswith("cuda"):
        import torch

        return torch.device(dev)
    return None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
