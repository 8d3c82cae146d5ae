"""Python dependencies of the module: what is installed, and installing it when asked.

* **torch** comes from the PyTorch Utils extension
  (``PyTorchUtils.PyTorchUtilsLogic().installTorch(...)``), as
  SlicerTotalSegmentator and SlicerMONAIAuto3DSeg do: it chooses the CPU or
  CUDA build for this computer. An installed torch older than
  :data:`TORCH_MIN_VERSION` counts as missing.
* Everything else is listed in ``Resources/requirements.txt`` and installed
  with ``slicer.packaging.pip_ensure(..., prompt_install=False)`` where
  ``import slicer.packaging`` works (Slicer 5.12 and later; it must be
  imported explicitly), else with ``slicer.util.pip_install``.
* The user is asked **once**, by :func:`ensure`, for everything that is
  missing; the installers are then told not to ask again.
* Nothing is ever installed while Slicer runs self-tests
  (``slicer.app.testingEnabled()``), nor when the caller says ``install=False``
  (the headless batch script without ``--install-dependencies``): then
  :class:`DependencyError` is raised at once, and no dialog is opened.

:func:`status`, :func:`describe` and :func:`version_satisfies` work anywhere
(no Slicer, no torch import); only the installing part of :func:`ensure`
touches Slicer.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
TORCH_MIN_VERSION = "2.1"
TORCH_REQUIREMENT = f">={TORCH_MIN_VERSION}"

#: distribution name → import name, where they differ
IMPORT_NAMES = {"pynrrd": "nrrd", "SimpleITK": "SimpleITK", "scikit-image": "skimage", "pydicom": "pydicom"}

INSTALL_HINT = ("Install the dependencies from the module first: open Modules > Segmentation > Parotid OAR and "
                "click 'Install / update' next to 'Dependencies' (or run the batch script with "
                "--install-dependencies).")


class DependencyError(RuntimeError):
    """A dependency is missing and could not (or must not) be installed."""


# --------------------------------------------------------------------------- versions
def parse_version(text: str | None) -> tuple[int, ...]:
    """``"2.5.1+cu121"`` → ``(2, 5, 1)``; the leading numeric release only (enough for ``>=`` checks)."""
    parts = []
    for piece in re.split(r"[.]", str(text or "").strip()):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group(0)))
        if match.group(0) != piece:
            break
    return tuple(parts)


def version_satisfies(version: str | None, requirement: str) -> bool:
    """Whether ``version`` meets ``requirement`` (``">=1.2"``, ``">=1.2,<3"``, ``"==2.0"`` or ``""``)."""
    if version is None:
        return False
    have = parse_version(version)
    for clause in [c.strip() for c in requirement.split(",") if c.strip()]:
        match = re.match(r"(>=|<=|==|!=|>|<|~=)\s*(.+)$", clause)
        if not match:
            continue
        op, want_text = match.groups()
        want = parse_version(want_text)
        n = max(len(have), len(want))
        a, b = have + (0,) * (n - len(have)), want + (0,) * (n - len(want))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b,
              "~=": a >= b and a[:max(1, len(want) - 1)] == b[:max(1, len(want) - 1)]}[op]
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------- requirements
def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def installed_version(distribution: str, module: str | None = None) -> str | None:
    """The installed version of ``distribution`` (None when its module cannot be imported)."""
    module = module or IMPORT_NAMES.get(distribution, distribution.replace("-", "_"))
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__version__", None):  # e.g. torch.__version__ once imported
        return str(loaded.__version__)
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def torch_version() -> str | None:
    """``torch.__version__`` (read from the package metadata if torch is not imported yet), or None."""
    return installed_version("torch", "torch")


def torch_available() -> bool:
    return torch_version() is not None


def status(requirements: Path = REQUIREMENTS) -> list[dict]:
    """One entry per dependency, torch first: ``name``, ``required``, ``installed`` (or None), ``ok``."""
    version = torch_version()
    rows = [{"name": "torch", "required": TORCH_REQUIREMENT, "installed": version,
             "ok": version is not None and (version == "unknown version"
                                            or version_satisfies(version, TORCH_REQUIREMENT))}]
    for requirement in read_requirements(requirements):
        name = requirement_name(requirement)
        spec = requirement[len(name):].split(";", 1)[0].strip()
        have = installed_version(name)
        rows.append({"name": name, "required": spec, "installed": have,
                     "ok": have is not None and (have == "unknown version" or version_satisfies(have, spec))})
    return rows


def problems(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r["ok"]]


def describe(rows: list[dict]) -> str:
    """One line for the module's 'Dependencies' row, e.g. ``torch 2.5.1, scipy 1.11.4 - ready``."""
    def one(r):
        if r["installed"] is None:
            return f"{r['name']} missing"
        text = f"{r['name']} {r['installed']}"
        return text if r["ok"] else f"{text} (needs {r['required']})"

    bad = problems(rows)
    return ", ".join(one(r) for r in rows) + (" - ready" if not bad else " - install or update needed")


def missing_requirements(path: Path = REQUIREMENTS) -> list[str]:
    """Requirements (from requirements.txt, not torch) that are absent or too old."""
    return [r["name"] + r["required"] for r in problems(status(path)) if r["name"] != "torch"]


# --------------------------------------------------------------------------- installing (Slicer)
def _testing() -> bool:
    import slicer

    return bool(slicer.app.testingEnabled())


def _install_torch() -> None:
    import slicer

    if not hasattr(slicer.modules, "pytorchutils"):
        raise DependencyError("This module needs the 'PyTorch' extension. Install it from the Extensions "
                              "Manager, restart Slicer and try again.")
    import PyTorchUtils

    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                          torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise DependencyError("PyTorch was not installed. ParotidOAR needs PyTorch to segment.")


def _install_packages(requirements: Path, names: list[str]) -> None:
    import slicer

    try:
        import slicer.packaging as packaging  # Slicer >= 5.12; not imported by `import slicer`
    except ImportError:
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        wanted = packaging.load_requirements(str(requirements)) if hasattr(packaging, "load_requirements") \
            else [r for r in read_requirements(requirements) if requirement_name(r) in names]
        packaging.pip_ensure(wanted, prompt_install=False, requester="ParotidOAR")  # the user was asked once
    else:
        slicer.util.pip_install(" ".join(r for r in read_requirements(requirements) if requirement_name(r) in names))


def ensure(confirm: bool = True, install: bool = True, requirements: Path = REQUIREMENTS) -> list[dict]:
    """Make sure torch and the requirements are importable at the needed versions; returns :func:`status`.

    ``install=False``: never install and never open a dialog; raise :class:`DependencyError` (with
    :data:`INSTALL_HINT`) if anything is missing. ``confirm``: ask the user once before installing.
    Self-tests never install.
    """
    rows = status(requirements)
    bad = problems(rows)
    if not bad:
        return rows
    what = ", ".join(f"{r['name']}{r['required']}" + ("" if r["installed"] is None else f" (have {r['installed']})")
                     for r in bad)
    if not install:
        raise DependencyError(f"ParotidOAR is missing Python packages: {what}. {INSTALL_HINT}")
    if _testing():
        raise DependencyError(f"Missing Python packages ({what}); self-tests never install packages. "
                              "Open the module once outside testing to install them.")
    import slicer

    if confirm and not slicer.util.confirmOkCancelDisplay(
            "ParotidOAR needs these Python packages, which will be downloaded and installed now "
            "(this can take several minutes):\n" + "\n".join(f"- {r['name']}{r['required']}" for r in bad),
            "ParotidOAR: install Python packages"):
        raise DependencyError(f"Installation of {what} was cancelled.")
    if any(r["name"] == "torch" for r in bad):
        _install_torch()
    others = [r["name"] for r in bad if r["name"] != "torch"]
    if others:
        _install_packages(requirements, others)
    importlib.invalidate_caches()
    still = problems(status(requirements))
    if still:
        raise DependencyError("Could not install " + ", ".join(r["name"] for r in still)
                              + "; see the Python console for the installer's output. If a package was updated "
                              "while an older version was in use, restart Slicer.")
    return status(requirements)
