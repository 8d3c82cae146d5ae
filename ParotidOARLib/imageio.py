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

import errno
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


_TEMP_TAG = ".part-"


def temp_sibling(path, suffix: str = "") -> Path:
    """This process's hidden temporary name for ``path``: ``.<name>.part-<pid><suffix>`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}{_TEMP_TAG}{os.getpid()}{suffix}")


def _is_own_temp(path: Path) -> bool:
    import re

    return bool(re.fullmatch(rf"\..+{re.escape(_TEMP_TAG)}{os.getpid()}(\D.*)?", path.name))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or no way to tell: keep its file
    return True


def remove_stale_temps(path) -> list[Path]:
    """Delete the temporary siblings of ``path`` left by a killed run (``.<name>.part-<pid>…`` whose process is
    gone). Returns what was removed. A running process's temporary file is never touched."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}{_TEMP_TAG}"
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for p in candidates:
        digits = ""
        for ch in p.name[len(prefix):]:
            if not ch.isdigit():
                break
            digits += ch
        if not digits or _pid_alive(int(digits)) or not p.is_file():
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def check_output(path, force: bool = False, what: str = "output") -> Path:
    """Fail at once, with one line, if ``path`` cannot be written as a new file: it exists (and not
    ``force``), it is a folder, its folder is missing or is a file, or the folder is not writable
    (read-only, no permission, a virtual file system). Writes and removes a probe file; removes
    temporary files left there by a killed run (:func:`remove_stale_temps`)."""
    from .errors import OutputError, OutputExistsError

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"The {what} {path} is a folder; give a file name.")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists. Choose another output or pass --force to replace it.")
    parent = path.parent
    if not parent.exists():
        blocker = next((p for p in parent.parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise OutputError(f"Cannot write the {what} {path}: {blocker} is a file, not a folder.")
        raise OutputError(f"Output folder {parent} does not exist. Create it first.")
    if not parent.is_dir():
        raise OutputError(f"Cannot write the {what} {path}: {parent} is a file, not a folder.")
    remove_stale_temps(path)
    probe = temp_sibling(path, ".probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        try:
            probe.unlink()
        except OSError:
            pass
        raise OutputError(f"Cannot write the {what} {path}: {exc.strerror or exc}. Pick a writable folder.") from None
    return path


def check_outputs(paths, force: bool = False) -> list[Path]:
    """:func:`check_output` for every path that is not None; two outputs may not share one path."""
    from .errors import OutputError

    seen: dict[str, Path] = {}
    checked = []
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        key = os.path.normcase(os.path.abspath(p))
        if key in seen:
            raise OutputError(f"Two outputs are the same file ({p}); give each output its own name.")
        seen[key] = p
        checked.append(check_output(p, force))
    return checked


def publish(tmp, path, force: bool = False) -> Path:
    """Move the finished temporary file ``tmp`` onto ``path``.

    Without ``force`` an existing ``path`` is never replaced, even one that appeared while the
    run was writing: the file is published with a hard link (which fails if ``path`` exists), or
    where links are not supported with an exclusive create then a rename. Raises
    :class:`OutputExistsError` and leaves both files (the caller removes ``tmp``).
    """
    from .errors import OutputError, OutputExistsError

    tmp, path = Path(tmp), Path(path)
    appeared = (f"{path} appeared while this run was writing it and was left as it is. Choose another output "
                "or pass --force to replace it.")
    try:
        if force:
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise OutputExistsError(appeared) from None
        except OSError:  # no hard links on this file system: reserve the name, then rename onto it
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                raise OutputExistsError(appeared) from None
            os.replace(tmp, path)
            return path
        os.unlink(tmp)
    except OutputExistsError:
        raise
    except OSError as exc:
        raise OutputError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    return path


#: errno values that mean "this output cannot be written here" (disk or quota full, file too large,
#: read-only, no permission, I/O error): a one-line :class:`OutputError`, not a traceback
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _output_error(exc: OSError, path: Path):
    from .errors import OutputError

    return OutputError(f"Cannot write {path}: {exc.strerror or exc}. Nothing was written; free some space or "
                       "pick another folder.")


@contextmanager
def atomic_folder(directory, force: bool = False, exists_hint: str = "Choose another folder or pass --force."):
    """Build a folder in a hidden sibling (``.<name>.part-<pid>``), yielded, and move it onto ``directory``
    when the block ends without error, by renames only (an existing folder, allowed only with ``force``,
    is replaced after the new one is complete). On any error nothing is left behind."""
    import shutil

    from .errors import OutputExistsError

    directory = Path(directory)
    if directory.exists() and not force:
        raise OutputExistsError(f"{directory} already exists. {exists_hint}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.part-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path, suffix: str = "", force: bool = True):
    """Yield a hidden temporary sibling of ``path``; on success publish it as ``path`` (:func:`publish`).

    Whatever happens, no temporary file is left behind and ``path`` is either the old
    file or the complete new one. Without ``force`` an existing ``path`` (even one that
    appeared meanwhile) is never replaced: :class:`OutputExistsError`. ``suffix`` is
    appended for writers that pick the format from the file name (e.g. ``".nrrd"``).

    A ``path`` that is itself one of this process's temporary files (see :func:`staged_outputs`)
    is private until published, so it is written in place.
    """
    path = Path(path)
    if _is_own_temp(path) and not suffix:
        yield path
        return
    tmp = temp_sibling(path, suffix)
    try:
        yield tmp
        publish(tmp, path, force)
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise _output_error(exc, path) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def staged_outputs(paths, force: bool = False):
    """All-or-nothing writing of several outputs: yields one temporary path per entry of ``paths``
    (None stays None). When the block succeeds every file is published (:func:`publish`: never
    over an existing file without ``force``); if one cannot be, those already published by this
    call are removed again. On any error no temporary file is left."""
    paths = [None if p is None else Path(p) for p in paths]
    temps = [None if p is None else temp_sibling(p) for p in paths]
    done: list[Path] = []
    try:
        yield temps
        for tmp, final in zip(temps, paths):
            if tmp is not None:
                publish(tmp, final, force)
                done.append(final)
    except BaseException as exc:
        if not force:
            for final in done:  # created by this call (publish never replaces without force)
                try:
                    final.unlink()
                except OSError:
                    pass
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            where = next((p for p, t in zip(paths, temps) if t is not None and exc.filename
                          and Path(exc.filename) == t), None) or next(p for p in paths if p is not None)
            raise _output_error(exc, where) from None
        raise
    finally:
        for tmp in temps:
            if tmp is not None:
                try:
                    tmp.unlink()
                except FileNotFoundError:
                    pass


def write_image(path, array: np.ndarray, geometry: Geometry, compress: bool = True) -> Path:
    """Write atomically (temp file + rename) as NRRD/NIfTI/MHA chosen by suffix."""
    import SimpleITK as sitk

    path = Path(path)
    img = to_sitk(array, geometry)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with atomic_file(path, suffix) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=compress)
    return path
