"""The Python API for notebooks and scripts: SimpleITK images in, SimpleITK images out.

    >>> from ParotidOARLib import load_model, segment_image
    >>> model = load_model()                       # the default bundle, verified once
    >>> result = segment_image("ct.nrrd", side="left", model=model)
    >>> result.labelmap                            # SimpleITK.Image, uint8, on the CT's grid
    >>> result.labels                              # {"Parotid": 1, "Auricula": 2, ...}
    >>> result.mask("Parotid")                     # SimpleITK.Image, uint8 0/1
    >>> result.save("ct.nii.gz")                   # or .seg.nrrd / .nrrd (never overwrites unless force=True)

Research use only - NOT FOR CLINICAL USE. Importing this module does not import torch; the
first :func:`load_model` or :func:`segment_image` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import labels
from .errors import InputError
from .imageio import Geometry

__all__ = ["Model", "Segmentation", "load_model", "segment_image"]


@dataclass
class Model:
    """A verified model bundle (SHA-256 of every weight file checked once, at :func:`load_model`)."""

    bundle: object  # bundle.Bundle
    device: str = "auto"

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    @property
    def clinical_use(self) -> bool:
        return bool(self.bundle.manifest.clinical_use)

    @property
    def directory(self) -> Path:
        return Path(self.bundle.directory)

    def __repr__(self) -> str:
        use = "clinical" if self.clinical_use else "research use only - not for clinical use"
        return f"<ParotidOAR model {self.name}@{self.version} ({use}) from {self.directory}>"


def load_model(model=None, device: str = "auto") -> Model:
    """Load and verify a model bundle: ``None`` (the default bundle), an installed bundle's name, or a
    bundle folder. ``device`` (``auto``, ``cpu``, ``cuda``, ``mps``) is the default for
    :func:`segment_image` calls with this model. Raises :class:`~ParotidOARLib.errors.ModelError`."""
    from .cascade import load_model_bundle

    if isinstance(model, Model):
        return model
    return Model(load_model_bundle(None if model is None else str(model)), device=device)


@dataclass
class Segmentation:
    """What :func:`segment_image` returns. Every image is on the input CT's grid."""

    masks: dict  # name → bool numpy array [k, j, i] (the seven structures)
    roi: np.ndarray
    roi_name: str
    geometry: Geometry
    side: str
    report: dict = field(repr=False)

    @property
    def labels(self) -> dict[str, int]:
        """``{structure name: label value}`` in :attr:`labelmap` (Parotid 1, the six OARs 2..7)."""
        from .segio import labelmap_values

        return labelmap_values(self.masks)

    @property
    def labelmap(self):
        """A uint8 ``SimpleITK.Image`` label map (values from :attr:`labels`; where two structures overlap,
        the first in :attr:`labels` order wins, as in the ``.nii.gz`` output)."""
        from .imageio import to_sitk

        array = np.zeros(self.geometry.shape, np.uint8)
        for name, value in sorted(self.labels.items(), key=lambda kv: -kv[1]):  # lowest value written last
            array[self.masks[name]] = value
        return to_sitk(array, self.geometry)

    def mask(self, name: str):
        """One structure (or the ROI, by its name or ``"ROI"``) as a uint8 0/1 ``SimpleITK.Image``."""
        from .imageio import to_sitk

        if name in (self.roi_name, "ROI"):
            array = self.roi
        elif name in self.masks:
            array = self.masks[name]
        else:
            raise InputError(f"No structure {name!r}; choose one of {', '.join(list(self.masks) + ['ROI'])}.")
        return to_sitk(np.asarray(array, np.uint8), self.geometry)

    @property
    def volumes_cc(self) -> dict[str, float]:
        return dict(self.report["volumes_cc"])

    def save(self, path, force: bool = False):
        """Write ``.seg.nrrd`` (every structure and the ROI) or a ``.nii.gz`` / ``.nii`` / ``.nrrd`` label
        map with ``<name>.labels.json`` beside it. Atomic; never replaces a file unless ``force``.
        Returns the path(s) written."""
        from . import __version__, segio

        masks = dict(self.masks)
        masks[self.roi_name] = self.roi
        if segio.is_seg_path(path):
            header = {"ParotidOAR_Model": self.report["model"]["id"], "ParotidOAR_Version": __version__,
                      "ParotidOAR_Side": self.side}
            if self.report.get("notice"):
                header["ParotidOAR_Notice"] = self.report["notice"]
            return segio.write_seg(path, masks, self.geometry, side=self.side, force=force, extra_header=header)
        if segio.labelmap_suffix(path) is None:
            raise InputError(f"{path}: save as .seg.nrrd, .nii.gz, .nii or .nrrd.")
        return segio.write_labelmap(path, masks, self.geometry, side=self.side, force=force,
                                    extra={"model": self.report["model"]["id"], "version": __version__,
                                           "notice": self.report.get("notice")})


def _read(image, series_uid=None):
    """``SimpleITK.Image`` or a path (file or DICOM folder) → (int16 array, Geometry, name)."""
    from . import preprocess

    if isinstance(image, (str, os.PathLike)):
        array, geometry, _meta = preprocess.read_ct(image, series_uid=series_uid)
        return array, geometry, Path(image).name
    if hasattr(image, "GetDimension") and hasattr(image, "GetSpacing"):
        from .imageio import from_sitk

        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError("The image has several components per voxel; pass a scalar CT (HU).")
        array, geometry = from_sitk(image)
        return preprocess.to_int16(array, "image"), geometry, "image"
    raise InputError(f"segment_image takes a SimpleITK.Image or a path, not {type(image).__name__}.")


def segment_image(image, side: str, model=None, *, device: str | None = None, roi_margin_mm: float = 17.0,
                  tta: bool = False, threads: int | None = None, step: float | None = None,
                  side_check: bool = True, parotid=None, series_uid: str | None = None, progress=None,
                  backend: str = "torch") -> Segmentation:
    """Segment one CT with the two-stage cascade.

    ``image``: a ``SimpleITK.Image`` (HU) or a path (NRRD / NIfTI / MHA file or a DICOM series folder).
    ``side``: the operated side, ``"left"`` or ``"right"`` (patient left = LPS +x).
    ``model``: a :class:`Model` from :func:`load_model` (load it once for many images), a bundle name or
    folder, or None for the default bundle. ``parotid``: optionally a parotid contour to use instead of
    stage 1 (a ``SimpleITK.Image`` mask on the CT's grid, or a path as ``segment --parotid`` takes).
    ``progress``: optional ``callable(percent, step)``. ``step``: the sliding-window step for both stages
    (default None: ``cascade.DEFAULT_STEPS``, 0.5 for stage 1 and 0.75 for stage 2; 0.5 is the behaviour before
    issue 18). ``backend``: ``"torch"`` (the reference) or ``"openvino"`` (optional package; without it torch is used
    and a one-line warning is printed).

    Returns a :class:`Segmentation`. Raises :class:`~ParotidOARLib.errors.ParotidOARError` subclasses
    (one-line messages) for bad input or a bad model. Research use only - not for clinical use.
    """
    from . import cascade

    model = load_model(model)
    array, geometry, name = _read(image, series_uid)
    given = None
    source = None
    if parotid is not None:
        if isinstance(parotid, (str, os.PathLike)):
            given, source = cascade.read_parotid(parotid, geometry), str(parotid)
        else:
            from .imageio import from_sitk

            mask, g = from_sitk(parotid)
            if not g.same_grid(geometry):
                raise InputError("The parotid mask is not on the CT's grid; resample it (or pass a file path, "
                                 "which is resampled for you).")
            given, source = np.asarray(mask) != 0, "image"
    options = cascade.SegmentOptions(side=side, device=device or model.device, roi_margin_mm=roi_margin_mm,
                                     tta=tta, threads=threads, side_check=side_check, backend=backend,
                                     step=step)
    result = cascade.run(array, geometry, options, progress=progress, bundle=model.bundle, name=name,
                         parotid=given, parotid_source=source)
    return Segmentation({n: result.masks[n] for n in labels.STRUCTURES if n in result.masks}, result.roi,
                        result.roi_name, geometry, result.side, result.report)
