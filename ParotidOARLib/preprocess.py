"""CT input: reading, validation, body mask, side cut, resampling and intensity normalisation.

Shared by inference (:mod:`cascade`) and training, so both see identical inputs.

Conventions: arrays are numpy ``[k, j, i]``; physical space is LPS mm
(+x = patient Left, +y = Posterior, +z = Superior); spacings given as
``spacing_xyz`` are in ITK/physical axis order (i, j, k) → (x, y, z) for an
axis-aligned image.

Validation thresholds (documented in docs/cascade.md):

* CT check: the image must contain values below ``CT_AIR_MAX_HU`` (−500 HU, air)
  *and* above ``CT_DENSE_MIN_HU`` (300 HU, bone); an MR, a mask or an already
  normalised image fails.
* Size check: the physical extent of the scan must be at least
  ``MIN_EXTENT_MM`` = 60 mm left-right, 60 mm antero-posterior and 30 mm
  cranio-caudal (a parotid is ~40–50 mm tall, ~30–40 mm wide; with the 17 mm
  ROI margin anything smaller cannot contain one side of the head), with at
  least ``MIN_VOXELS`` = (16, 16, 8) voxels along (i, j, k).
* Upper bounds: at most ``MAX_EXTENT_MM`` = 800 × 800 × 2000 mm (a CT bore is
  about 700–800 mm wide; 2 m is a whole body), and the finest voxel spacing at
  most ``MAX_FINEST_SPACING_MM`` = 6 mm (OpenKBP's coarsest in-plane spacing is
  4.7 mm). A 10 mm isotropic 1.6 m scan is refused at once instead of running
  for minutes.
* Values: NaN or infinite voxels are refused (:func:`to_int16`); a sheared
  (non-orthogonal) direction matrix is refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import EmptyStructureError, InputError
from .imageio import Geometry, is_image_file, read_image

CT_AIR_MAX_HU = -500.0
CT_DENSE_MIN_HU = 300.0
MIN_EXTENT_MM = (60.0, 60.0, 30.0)  # LPS x, y, z
MIN_VOXELS = (16, 16, 8)  # i, j, k
MAX_EXTENT_MM = (800.0, 800.0, 2000.0)  # LPS x, y, z
MAX_FINEST_SPACING_MM = 6.0
SHEAR_TOLERANCE = 1e-3  # |cos| of the angle between two direction axes
BODY_THRESHOLD_HU = -400.0
AIR_HU = -1024


# --------------------------------------------------------------------------- reading
def read_ct(path, series_uid: str | None = None) -> tuple[np.ndarray, Geometry, dict]:
    """Read a CT from a NRRD/NIfTI/MHA file or a DICOM series folder.

    Returns ``(array int16 [k, j, i], Geometry, meta)``; ``meta`` has at least
    ``source``, ``format`` and ``original_dtype``. DICOM folders are read by
    :func:`ParotidOARLib.dicomio.read_ct_series` (which picks the CT series or
    lists them when ambiguous).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"Input not found: {path}. Check the path.")
    if path.is_dir():
        try:
            from . import dicomio
        except ImportError:
            raise InputError(f"{path} is a folder, but DICOM support (ParotidOARLib.dicomio) is not "
                             "available in this installation. Convert the series to NRRD first.") from None
        array, geometry, meta = dicomio.read_ct_series(path, series_uid=series_uid)
        meta = dict(meta or {})
        meta.setdefault("source", str(path))
        meta.setdefault("format", "dicom")
        meta.setdefault("original_dtype", str(np.asarray(array).dtype))
        return to_int16(array), geometry, meta
    if str(path).lower().endswith(".seg.nrrd"):
        raise InputError(f"{path} is a segmentation (.seg.nrrd), not a CT image. Pass the CT volume.")
    if not is_image_file(path):
        raise InputError(f"{path}: unsupported file type. Use a NRRD (.nrrd/.nhdr), NIfTI (.nii/.nii.gz), "
                         "MetaImage (.mha/.mhd) file or a DICOM series folder.")
    array, geometry = read_image(path)
    meta = {"source": str(path), "format": _format_of(path), "original_dtype": str(array.dtype),
            "warnings": header_warnings(path)}
    return to_int16(array, path.name), geometry, meta


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    return "metaimage"


def header_warnings(path) -> list[str]:
    """Warnings about a file's header that the reader silently "fixes": a negative spacing in a
    MetaImage (``ElementSpacing``) or NRRD (``spacings``) header, which ITK turns into a flipped axis."""
    path = Path(path)
    name = path.name.lower()
    key = "elementspacing" if name.endswith((".mha", ".mhd")) else "spacings" if name.endswith((".nrrd", ".nhdr")) \
        else None
    if key is None:
        return []
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536).decode("latin-1")
    except OSError:
        return []
    for line in head.splitlines():
        if not line.strip():
            break  # NRRD: the header ends at the first blank line
        field, sep, value = line.replace("=", ":", 1).partition(":")
        if sep and field.strip().lower() == key:
            try:
                values = [float(v) for v in value.split()]
            except ValueError:
                return []
            if any(v < 0 for v in values):
                return [f"{path.name}: the header's spacing {' '.join(value.split())} has a negative value; it was "
                        "read as a positive spacing with that axis flipped. Check that left and right (and the "
                        "output's orientation) are correct."]
            return []
        if field.strip().lower() == "elementdatafile":
            break
    return []


def to_int16(array: np.ndarray, name: str = "input") -> np.ndarray:
    """HU values as int16 (rounded, clipped); int16 input is returned as is (no copy).

    NaN or infinite values are refused (:class:`InputError`): they have no HU value to round to."""
    array = np.asarray(array)
    if array.dtype == np.int16:
        return array
    if array.dtype.kind in "iub" and array.dtype.itemsize <= 1:
        return array.astype(np.int16)
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            n_nan = int(np.isnan(array).sum())
            n_inf = int(array.size - finite.sum()) - n_nan
            raise InputError(f"{name}: {n_nan} NaN and {n_inf} infinite voxel value(s); a CT has a finite HU value "
                             "in every voxel. Fix the image (for example set them to -1024 HU, air) and retry.")
        del finite
        out = np.empty(array.shape, np.int16)
        np.clip(np.rint(array), -32768, 32767, out=out, casting="unsafe")
        return out
    return np.clip(array, -32768, 32767).astype(np.int16)


# --------------------------------------------------------------------------- validation
def physical_extent_mm(geometry: Geometry) -> np.ndarray:
    """Extent (x, y, z) in LPS mm of the box spanned by the voxel centres' outer faces."""
    corners = np.array([[a, b, c] for a in (-0.5, geometry.size[0] - 0.5)
                        for b in (-0.5, geometry.size[1] - 0.5)
                        for c in (-0.5, geometry.size[2] - 0.5)])
    pts = geometry.index_to_lps(corners)
    return pts.max(axis=0) - pts.min(axis=0)


def validate_ct(array: np.ndarray, geometry: Geometry | None, name: str = "input") -> None:
    """Raise :class:`InputError` if ``array`` is not a usable 3D head-and-neck CT."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputError(f"{name}: expected a 3D CT volume, got a {array.ndim}D image of shape {array.shape}. "
                         "Load the full CT series, not a single slice or a 4D series.")
    if geometry is None:
        raise InputError(f"{name}: the image has no spacing/geometry. Use a NRRD, NIfTI, MHA or DICOM input "
                         "that records voxel spacing.")
    sp = np.asarray(geometry.spacing, dtype=float)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(f"{name}: voxel spacing {tuple(sp)} is missing or zero. Fix the image header "
                         "(spacing in mm) before segmenting.")
    if tuple(array.shape) != tuple(geometry.shape):
        raise InputError(f"{name}: array shape {array.shape} does not match its geometry {geometry.shape}.")
    if any(n < m for n, m in zip(geometry.size, MIN_VOXELS)) or np.any(
            physical_extent_mm(geometry) < np.asarray(MIN_EXTENT_MM)):
        ext = physical_extent_mm(geometry)
        raise InputError(
            f"{name}: the scan is too small to contain one side of the head ({geometry.size[0]}x"
            f"{geometry.size[1]}x{geometry.size[2]} voxels, {ext[0]:.0f}x{ext[1]:.0f}x{ext[2]:.0f} mm). "
            f"Need at least {MIN_EXTENT_MM[0]:.0f}x{MIN_EXTENT_MM[1]:.0f}x{MIN_EXTENT_MM[2]:.0f} mm "
            f"(LR x AP x CC) and {MIN_VOXELS[0]}x{MIN_VOXELS[1]}x{MIN_VOXELS[2]} voxels; use the full "
            "head-and-neck planning CT.")
    ext = physical_extent_mm(geometry)
    if np.any(ext > np.asarray(MAX_EXTENT_MM)) or min(sp) > MAX_FINEST_SPACING_MM:
        raise InputError(
            f"{name}: the field of view is far beyond a head-and-neck CT ({ext[0]:.0f}x{ext[1]:.0f}x{ext[2]:.0f} mm, "
            f"voxels {sp[0]:g}x{sp[1]:g}x{sp[2]:g} mm). ParotidOAR accepts at most {MAX_EXTENT_MM[0]:.0f}x"
            f"{MAX_EXTENT_MM[1]:.0f}x{MAX_EXTENT_MM[2]:.0f} mm (LR x AP x CC) with voxels of at most "
            f"{MAX_FINEST_SPACING_MM:g} mm along the finest axis. Check the header's spacing (mm, not cm) or crop "
            "the scan to the head and neck.")
    d = geometry.direction_matrix
    cosines = np.abs(d.T @ d - np.diag(np.diag(d.T @ d)))
    if cosines.max() > SHEAR_TOLERANCE:
        angle = float(np.degrees(np.arccos(min(1.0, cosines.max()))))
        raise InputError(f"{name}: the direction matrix is sheared (two voxel axes meet at {angle:.1f} degrees, not 90); "
                         "a sheared grid would be segmented as if it were square. Resample the scan onto an "
                         "orthogonal grid first (DICOM gantry tilt is handled when reading the DICOM series).")
    lo = float(array.min())
    hi = float(array.max())
    if not (lo < CT_AIR_MAX_HU and hi > CT_DENSE_MIN_HU):
        raise InputError(
            f"{name}: this does not look like a CT in Hounsfield units (values {lo:g} to {hi:g}; a CT has air "
            f"below {CT_AIR_MAX_HU:g} HU and bone above {CT_DENSE_MIN_HU:g} HU). Check that the input is the "
            "planning CT (not an MR, a mask or a rescaled image).")


# --------------------------------------------------------------------------- body / side
def _lps_x_coefficients(geometry: Geometry) -> tuple[float, np.ndarray]:
    """x(i, j, k) = ox + g · (i, j, k)."""
    g = geometry.direction_matrix[0, :] * np.asarray(geometry.spacing)
    return geometry.origin[0], g


def _default_step(geometry: Geometry) -> int:
    return max(1, int(round(min(2.0 / min(geometry.spacing[:2]), 4))))  # ~2 mm in-plane


def _body_mask_sub(array: np.ndarray, threshold_hu: float, step: int) -> np.ndarray:
    from scipy import ndimage

    sub = np.asarray(array)[:, ::step, ::step] > threshold_hu
    if not sub.any():
        raise EmptyStructureError("No body found in the CT (nothing above "
                                  f"{threshold_hu:g} HU). Check that the input is a CT in Hounsfield units.")
    lab, n = ndimage.label(sub)
    if n > 1:
        counts = np.bincount(lab.ravel())
        counts[0] = 0
        sub = lab == int(np.argmax(counts))
    return fill_holes_per_slice(sub)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``mask [k, j, i]`` with the holes of every axial slice filled: the same as
    ``ndimage.binary_fill_holes`` slice by slice (a hole is background not 4-connected to the slice's border),
    done with one 3D labelling of the background whose structure has no link between slices (0.17 s instead
    of 0.26 s on the 2 mm body mask of a 512×512×150 CT, issue 18)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3 or min(mask.shape) == 0:
        raise ValueError(f"fill_holes_per_slice needs a non-empty 3D mask, got shape {mask.shape}")
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    lab, n = ndimage.label(~mask, structure=structure)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        outside[edge] = True
    outside[0] = True  # label 0: the mask itself
    return mask | ~outside[lab]


def body_mask(array: np.ndarray, geometry: Geometry, threshold_hu: float = BODY_THRESHOLD_HU,
              step: int | None = 1) -> np.ndarray:
    """Patient body mask (bool, same shape): voxels above ``threshold_hu``, largest
    3D connected component (drops the couch and noise), holes filled per slice.

    ``step`` > 1 (or ``None``: about 2 mm in-plane) computes it on a sub-sampled
    grid and expands it back by nearest neighbour (fast, enough for the midline).
    """
    array = np.asarray(array)
    step = _default_step(geometry) if step is None else max(1, int(step))
    sub = _body_mask_sub(array, threshold_hu, step)
    if step == 1:
        return sub
    full = np.repeat(np.repeat(sub, step, axis=1), step, axis=2)
    return np.ascontiguousarray(full[:, :array.shape[1], :array.shape[2]])


def body_midline_x(array: np.ndarray, geometry: Geometry, body: np.ndarray | None = None) -> float:
    """LPS x (mm) of the patient's sagittal midline (see :func:`body_midline`)."""
    return body_midline(array, geometry, body)[0]


def body_midline(array: np.ndarray, geometry: Geometry, body: np.ndarray | None = None) -> tuple[float, dict]:
    """LPS x (mm) of the patient's sagittal midline, and how it was found.

    The median, over axial slices with a sizeable body cross-section whose body
    does not touch the image's left or right border, of the centre of the body's
    left-right extent. Robust to a resected (flatter) side and to a patient who
    is not centred in the field of view. Without ``body`` the mask is computed
    on a ~2 mm in-plane grid.

    If the body is cut by the field of view on one side in every slice (a scan
    centred on one side of the head), the true midline lies beyond that border:
    the border itself is returned (``method`` = ``"fov-edge"``), so the complete
    side keeps the whole image and the cut-off side is reported as absent.
    """
    if body is None:
        step = _default_step(geometry)
        body_sub = _body_mask_sub(array, BODY_THRESHOLD_HU, step)
    else:
        step = 1
        body_sub = np.asarray(body, dtype=bool)
        if body_sub.shape != tuple(geometry.shape):
            raise InputError(f"Body mask shape {body_sub.shape} does not match the image {geometry.shape}.")
    ox, g = _lps_x_coefficients(geometry)
    nk, nj, ni = body_sub.shape
    areas = body_sub.sum(axis=(1, 2))
    if areas.max() == 0:
        raise EmptyStructureError("The body mask is empty; cannot find the patient's midline.")
    # in-plane index axis closest to LPS x: 0 → i (columns, numpy axis 2), 1 → j (rows, numpy axis 1)
    x_axis = 0 if abs(g[0]) >= abs(g[1]) else 1
    x_plane = g[0] * (np.arange(ni) * step)[None, :] + g[1] * (np.arange(nj) * step)[:, None]
    centres, cut_lo, cut_hi, edges = [], 0, 0, []
    for k in np.nonzero(areas >= 0.25 * areas.max())[0]:
        sl = body_sub[k]
        xs = x_plane[sl]
        lo_x, hi_x = ox + g[2] * k + xs.min(), ox + g[2] * k + xs.max()
        first = sl[:, 0].any() if x_axis == 0 else sl[0, :].any()
        last = sl[:, -1].any() if x_axis == 0 else sl[-1, :].any()
        # which LPS-x end is cut: the first index column is the low-x end when g[x_axis] > 0
        cut_low_x = first if g[x_axis] > 0 else last
        cut_high_x = last if g[x_axis] > 0 else first
        if not cut_low_x and not cut_high_x:
            centres.append(0.5 * (lo_x + hi_x))
        elif cut_low_x and not cut_high_x:
            cut_lo += 1
            edges.append(("lo", lo_x))
        elif cut_high_x and not cut_low_x:
            cut_hi += 1
            edges.append(("hi", hi_x))
    # the body's bounding box (LPS, voxel edges) — lets callers skip the air around the patient
    from .roi import bounding_box

    blo, bhi = bounding_box(body_sub)
    full_shape = np.asarray(geometry.shape)
    lo_full = np.array([blo[0], blo[1] * step, blo[2] * step])
    hi_full = np.minimum(np.array([bhi[0], bhi[1] * step, bhi[2] * step]), full_shape)
    box = [v.tolist() for v in lps_bounds(geometry, lo_full, hi_full)]
    if centres:
        return float(np.median(centres)), {"method": "body", "slices": len(centres), "body_box_lps": box}
    if cut_lo or cut_hi:
        which = "lo" if cut_lo >= cut_hi else "hi"
        xs = [x for w, x in edges if w == which]
        x = float(min(xs) - 1e-3) if which == "lo" else float(max(xs) + 1e-3)
        return x, {"method": "fov-edge", "cut": "right" if which == "lo" else "left", "slices": len(xs),
                   "body_box_lps": box}
    # body wider than the field of view on both sides: fall back to the image centre
    lo, hi = lps_bounds(geometry)
    return float(0.5 * (lo[0] + hi[0])), {"method": "image-centre", "body_box_lps": box}


def side_halfspace_box(geometry: Geometry, side: str, midline_x: float) -> tuple[tuple, tuple]:
    """Index bounding box (lo_zyx, hi_zyx; hi exclusive) of the voxels on ``side`` of ``x = midline_x``.

    Left = LPS x > midline (patient Left); right = x < midline. Exact for any
    direction matrix (the half-space is linear in the voxel index).
    """
    side = check_side(side)
    ox, g = _lps_x_coefficients(geometry)
    sign = 1.0 if side == "left" else -1.0
    gs = sign * g  # condition: gs · ijk > t
    t = sign * (midline_x - ox)
    n = np.asarray(geometry.size)
    lo = np.zeros(3, int)
    hi = n.copy()
    for a in range(3):
        others = sum(max(0.0, gs[b] * (n[b] - 1)) for b in range(3) if b != a)
        if abs(gs[a]) < 1e-9:
            if others <= t:
                hi[:] = lo  # empty
            continue
        bound = (t - others) / gs[a]
        if gs[a] > 0:
            lo[a] = max(0, int(math.floor(bound)))  # conservative by one voxel
        else:
            hi[a] = min(n[a], int(math.ceil(bound)) + 1)
    if np.any(hi <= lo):
        raise InputError(f"No part of the image lies on the patient's {side} side of the midline "
                         f"(x = {midline_x:.1f} mm LPS). Check --side and the image orientation.")
    return tuple(int(v) for v in lo[::-1]), tuple(int(v) for v in hi[::-1])


def check_side(side: str) -> str:
    s = str(side).lower()
    if s in ("l", "lt", "left"):
        return "left"
    if s in ("r", "rt", "right"):
        return "right"
    raise InputError(f"Unknown side {side!r}; use 'left' or 'right'.")


def side_crop(array: np.ndarray, geometry: Geometry, side: str, body: np.ndarray | None = None,
              midline_x: float | None = None):
    """Keep the operated side: crop at the body midline in LPS x.

    Returns ``(cropped array (a view), cropped Geometry, (lo_zyx, hi_zyx))``.
    For oblique direction matrices the crop is the index box enclosing the
    half-space; use :func:`side_halfspace_mask` to mask the other side exactly.
    """
    if midline_x is None:
        midline_x = body_midline_x(array, geometry, body)
    lo, hi = side_halfspace_box(geometry, side, midline_x)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    return array[sl], geometry.crop(lo, hi), (lo, hi)


def side_halfspace_mask(geometry: Geometry, side: str, midline_x: float) -> np.ndarray:
    """Bool ``[k, j, i]`` mask of voxels whose centre lies on ``side`` of ``x = midline_x``."""
    side = check_side(side)
    ox, g = _lps_x_coefficients(geometry)
    nk, nj, ni = geometry.shape
    x = (ox + g[0] * np.arange(ni)[None, None, :] + g[1] * np.arange(nj)[None, :, None]
         + g[2] * np.arange(nk)[:, None, None])
    x = np.broadcast_to(x, geometry.shape)
    return (x > midline_x) if side == "left" else (x < midline_x)


# --------------------------------------------------------------------------- resampling
def _interp(interpolator: str):
    import SimpleITK as sitk

    table = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}
    try:
        return table[interpolator]
    except KeyError:
        raise ValueError(f"interpolator must be one of {sorted(table)}") from None


def resampled_geometry(geometry: Geometry, spacing_xyz) -> Geometry:
    """Grid with ``spacing_xyz`` covering the same physical box as ``geometry`` (same direction)."""
    new_sp = np.asarray(spacing_xyz, dtype=float)
    old_sp = np.asarray(geometry.spacing)
    extent = np.asarray(geometry.size) * old_sp
    size = np.maximum(1, np.round(extent / new_sp)).astype(int)
    # keep the box centred: first voxel centre at (box start + new_sp/2)
    start_idx = -0.5 + (new_sp / old_sp) * 0.5 + (extent - size * new_sp) / (2 * old_sp)
    origin = geometry.index_to_lps(start_idx)
    return Geometry(tuple(size), tuple(new_sp), tuple(origin), geometry.direction)


def resample_to(array: np.ndarray, geometry: Geometry, target_geometry: Geometry,
                interpolator: str = "linear", default_value: float | None = None,
                output_dtype=None) -> np.ndarray:
    """Resample ``array`` (on ``geometry``) onto ``target_geometry``; returns the ``[k, j, i]`` array.

    Outside the source image the value is ``default_value`` (air, −1024, for an
    int16 CT; 0 otherwise). bool input is resampled as uint8 (nearest recommended).
    """
    import SimpleITK as sitk

    from .imageio import to_sitk

    array = np.asarray(array)
    is_bool = array.dtype == bool
    if default_value is None:
        default_value = AIR_HU if array.dtype == np.int16 else 0.0
    img = to_sitk(array.astype(np.uint8) if is_bool else array, geometry)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(v) for v in target_geometry.size])
    f.SetOutputSpacing(target_geometry.spacing)
    f.SetOutputOrigin(target_geometry.origin)
    f.SetOutputDirection(target_geometry.direction)
    f.SetInterpolator(_interp(interpolator))
    f.SetDefaultPixelValue(float(default_value))
    round_back = None
    if output_dtype is None and interpolator != "nearest" and array.dtype.kind in "iu" and not is_bool:
        output_dtype, round_back = np.float32, array.dtype  # interpolate in float, round (not truncate) back
    if output_dtype is not None:
        f.SetOutputPixelType(sitk.GetImageFromArray(np.zeros((1, 1, 1), output_dtype)).GetPixelID())
    out = sitk.GetArrayFromImage(f.Execute(img))
    if round_back is not None:
        info = np.iinfo(round_back)
        return np.clip(np.rint(out), info.min, info.max).astype(round_back)
    return out.astype(bool) if is_bool and output_dtype is None else out


def resample(array: np.ndarray, geometry: Geometry, spacing_xyz, interpolator: str = "linear",
             **kwargs) -> tuple[np.ndarray, Geometry]:
    """Resample to a new spacing over the same physical box → ``(array, Geometry)``."""
    target = resampled_geometry(geometry, spacing_xyz)
    if target.same_grid(geometry):
        return np.asarray(array), geometry
    return resample_to(array, geometry, target, interpolator, **kwargs), target


# --------------------------------------------------------------------------- intensities
def normalise(array: np.ndarray, norm: dict) -> np.ndarray:
    """Clip to ``norm["clip"]`` then z-score with ``norm["mean"]``, ``norm["std"]`` → float32."""
    lo, hi = (float(v) for v in norm["clip"])
    mean = float(norm["mean"])
    std = float(norm["std"]) or 1.0
    out = np.asarray(array, dtype=np.float32).copy() if np.asarray(array).dtype == np.float32 \
        else np.asarray(array).astype(np.float32)
    np.clip(out, lo, hi, out=out)
    out -= mean
    out *= 1.0 / std
    return out


def intensity_statistics(values: np.ndarray, lower_pct: float = 0.5, upper_pct: float = 99.5) -> dict:
    """nnU-Net-style CT normalisation values from foreground intensities → ``{"clip", "mean", "std"}``."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise EmptyStructureError("No foreground voxels to compute intensity statistics from.")
    lo, hi = np.percentile(values, [lower_pct, upper_pct])
    clipped = np.clip(values, lo, hi)
    return {"clip": [float(lo), float(hi)], "mean": float(clipped.mean()), "std": float(clipped.std() or 1.0)}


# --------------------------------------------------------------------------- axis-aligned stage grids
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def lps_bounds(geometry: Geometry, lo_zyx=None, hi_zyx=None) -> tuple[np.ndarray, np.ndarray]:
    """LPS min/max corners of the voxel box ``[lo, hi)`` (voxel edges, i.e. half a voxel outside the centres)."""
    lo = np.zeros(3) if lo_zyx is None else np.asarray(lo_zyx, float)[::-1]
    hi = np.asarray(geometry.size, float) if hi_zyx is None else np.asarray(hi_zyx, float)[::-1]
    corners = np.array([[a, b, c] for a in (lo[0] - 0.5, hi[0] - 0.5) for b in (lo[1] - 0.5, hi[1] - 0.5)
                        for c in (lo[2] - 0.5, hi[2] - 0.5)])
    pts = geometry.index_to_lps(corners)
    return pts.min(axis=0), pts.max(axis=0)


def axis_aligned_grid(spacing_xyz, lo_lps, hi_lps, min_size_zyx=None) -> Geometry:
    """Identity-direction (LPS-aligned) grid at ``spacing_xyz`` covering the box ``[lo_lps, hi_lps]``.

    Same convention as training (``stageprep.canonical_grid``): ``size = round(extent / spacing)``,
    first voxel centre at ``lo + spacing / 2``. With ``min_size_zyx`` the grid is grown
    symmetrically about the box centre to at least that size (e.g. the network patch).
    """
    sp = np.asarray(spacing_xyz, float)
    lo = np.asarray(lo_lps, float)
    hi = np.asarray(hi_lps, float)
    size = np.maximum(1, np.round((hi - lo) / sp).astype(int))
    if min_size_zyx is not None:
        want = np.maximum(size, np.asarray(min_size_zyx, int)[::-1])
        lo = lo - (want - size) * sp / 2.0
        size = want
    origin = lo + sp / 2.0
    return Geometry(tuple(int(s) for s in size), tuple(sp), tuple(origin), IDENTITY)


def source_index_box(source: Geometry, target: Geometry, pad: int = 1) -> tuple[tuple, tuple] | None:
    """Index box (lo_zyx, hi_zyx) of ``source`` voxels needed to interpolate onto ``target`` (+``pad``).

    None if the two do not overlap.
    """
    lo_t, hi_t = lps_bounds(target)
    corners = np.array([[x, y, z] for x in (lo_t[0], hi_t[0]) for y in (lo_t[1], hi_t[1]) for z in (lo_t[2], hi_t[2])])
    idx = source.lps_to_index(corners)
    lo = np.floor(idx.min(axis=0)).astype(int) - pad
    hi = np.ceil(idx.max(axis=0)).astype(int) + 1 + pad
    n = np.asarray(source.size)
    lo = np.clip(lo, 0, n)
    hi = np.clip(hi, 0, n)
    if np.any(hi <= lo):
        return None
    return tuple(int(v) for v in lo[::-1]), tuple(int(v) for v in hi[::-1])


def resample_region(array: np.ndarray, geometry: Geometry, target: Geometry, interpolator: str = "linear",
                    default_value: float | None = None, output_dtype=None) -> np.ndarray:
    """:func:`resample_to`, reading only the part of ``array`` that ``target`` covers (fast on big CTs)."""
    box = source_index_box(geometry, target)
    if box is None:
        array = np.asarray(array)
        fill = (AIR_HU if array.dtype == np.int16 else 0) if default_value is None else default_value
        return np.full(target.shape, fill, dtype=output_dtype or array.dtype)
    lo, hi = box
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    return resample_to(np.asarray(array)[sl], geometry.crop(lo, hi), target, interpolator,
                       default_value=default_value, output_dtype=output_dtype)
