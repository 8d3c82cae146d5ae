"""Image I/O with explicit geometry.

Convention used everywhere in the engine:

* voxel arrays are numpy arrays indexed ``[k, j, i]`` (slice, row, column) —
  the order SimpleITK's ``GetArrayFromImage`` returns;
* :class:`Geometry` holds ``origin``, ``spacing`` (ITK order: i, j, k) and a
  3×3 ``direction`` (columns are the i, j, k axes in LPS), plus ``size``
  (ITK order). Geometry is never implied by array order.

Physical coordinates are LPS millimetres, as in DICOM, ITK and Slicer.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import GeometryError, InputError


@dataclass(frozen=True)
class Geometry:
    size: tuple[int, int, int]  # (ni, nj, nk)
    spacing: tuple[float, float, float]  # mm, (si, sj, sk)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # LPS mm of voxel (0,0,0) centre
    direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)  # row-major 3x3, ITK convention

    def __post_init__(self):
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in np.asarray(self.direction).ravel()))
        if len(self.size) != 3 or len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise GeometryError("Geometry needs 3 sizes, 3 spacings, 3 origin values and a 3x3 direction.")
        if not all(np.isfinite(self.spacing)) or min(self.spacing) <= 0:
            raise GeometryError(f"Spacing must be three positive numbers, got {self.spacing}.")

    # --- derived -----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy array shape ``(nk, nj, ni)``."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in numpy axis order, for scipy (e.g. ``distance_transform_edt(sampling=...)``)."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """4×4 matrix mapping (i, j, k, 1) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    @property
    def voxel_volume_cc(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_lps(self, ijk) -> np.ndarray:
        """Continuous index (…, 3) in ITK (i, j, k) order → LPS mm (…, 3)."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ (self.direction_matrix @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def lps_to_index(self, lps) -> np.ndarray:
        """LPS mm (…, 3) → continuous (i, j, k) index (…, 3)."""
        lps = np.asarray(lps, dtype=float) - np.asarray(self.origin)
        inv = np.linalg.inv(self.direction_matrix @ np.diag(self.spacing))
        return lps @ inv.T

    def same_grid(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (self.size == other.size
                and np.allclose(self.spacing, other.spacing, atol=tol)
                and np.allclose(self.origin, other.origin, atol=max(tol, 1e-3))
                and np.allclose(self.direction, other.direction, atol=tol))

    def crop(self, lo_zyx, hi_zyx) -> "Geometry":
        """Geometry of ``array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]`` (numpy order bounds)."""
        lo_ijk = np.asarray(lo_zyx)[::-1]
        hi_ijk = np.asarray(hi_zyx)[::-1]
        return Geometry(tuple(int(v) for v in hi_ijk - lo_ijk), self.spacing,
                        tuple(self.index_to_lps(lo_ijk)), self.direction)

    # --- conversions -------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image) -> "Geometry":
        if image.GetDimension() != 3:
            raise InputError(f"Expected a 3D image, got {image.GetDimension()}D. Load a 3D CT volume.")
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def apply_to_sitk(self, image):
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing),
                "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(d["size"], d["spacing"], d["origin"], d["direction"])


def to_sitk(array: np.ndarray, geometry: Geometry):
    """numpy ``[k, j, i]`` array + geometry → SimpleITK image."""
    import SimpleITK as sitk

    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.shape != geometry.shape:
        raise GeometryError(f"Array shape {array.shape} does not match geometry shape {geometry.shape}.")
    img = sitk.GetImageFromArray(array)
    return geometry.apply_to_sitk(img)


def from_sitk(image) -> tuple[np.ndarray, Geometry]:
    import SimpleITK as sitk

    geom = Geometry.from_sitk(image)
    return sitk.GetArrayFromImage(image), geom


IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def is_image_file(path) -> bool:
    name = str(path).lower()
    return any(name.endswith(s) for s in IMAGE_SUFFIXES) and not name.endswith(".seg.nrrd")


def read_image(path) -> tuple[np.ndarray, Geometry]:
    """Read a 3D NRRD/NIfTI/MHA file → (array ``[k, j, i]``, Geometry).

    DICOM folders are handled by :mod:`ParotidOARLib.dicomio`; use
    :func:`ParotidOARLib.preprocess.read_ct` for "any CT input".
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"Input not found: {path}. Check the path.")
    if path.is_dir():
        raise InputError(f"{path} is a folder; expected an image file (NRRD, NIfTI or MHA).")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"Cannot read {path} as an image ({str(exc).strip().splitlines()[-1]}). "
                         "Use a NRRD, NIfTI or MHA file or a DICOM folder.") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "expected a scalar (grey-level) CT volume.")
    return from_sitk(image)


@contextmanager
def atomic_file(path, suffix: str = ""):
    """Yield a hidden temporary sibling of ``path``; on success rename it onto ``path``.

    Whatever happens, no temporary file is left behind and ``path`` is either the old
    file or the complete new one. ``suffix`` is appended for writers that pick the
    format from the file name (e.g. ``".nrrd"``, ``".png"``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_image(path, array: np.ndarray, geometry: Geometry, compress: bool = True) -> Path:
    """Write atomically (temp file + rename) as NRRD/NIfTI/MHA chosen by suffix."""
    import SimpleITK as sitk

    path = Path(path)
    img = to_sitk(array, geometry)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with atomic_file(path, suffix) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=compress)
    return path
