"""Python dependencies of the module, checked at first use (not at module load).

* **torch** comes from the PyTorch Utils extension
  (``PyTorchUtils.PyTorchUtilsLogic().installTorch(...)``), as
  SlicerTotalSegmentator and SlicerMONAIAuto3DSeg do: it chooses the CPU or
  CUDA build for this computer.
* Everything else is listed in ``Resources/requirements.txt`` and installed
  with ``slicer.pydeps.pip_ensure`` (Slicer >= 5.11; ``slicer.packaging`` on
  builds that named it so) or, on older Slicer, ``slicer.util.pip_install``.
* Nothing is ever installed while Slicer runs self-tests
  (``slicer.app.testingEnabled()``): a missing package is an error there.

Only :func:`ensure` touches Slicer; :func:`missing_requirements` works anywhere.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = ">=2.1"

#: distribution name → import name, where they differ
IMPORT_NAMES = {"pynrrd": "nrrd", "SimpleITK": "SimpleITK", "scikit-image": "skimage", "pydicom": "pydicom"}


def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def missing_requirements(path: Path = REQUIREMENTS) -> list[str]:
    """Requirements whose package cannot be imported (version pins are left to pip)."""
    missing = []
    for requirement in read_requirements(path):
        name = requirement_name(requirement)
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if importlib.util.find_spec(module) is None:
            missing.append(requirement)
    return missing


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


class DependencyError(RuntimeError):
    """A dependency is missing and could not (or must not) be installed."""


def _testing() -> bool:
    import slicer

    return bool(slicer.app.testingEnabled())


def _ensure_torch(confirm: bool) -> None:
    if torch_available():
        return
    import slicer

    if _testing():
        raise DependencyError("PyTorch is not installed; self-tests never install packages. "
                              "Install PyTorch with the PyTorch Utils module first.")
    if not hasattr(slicer.modules, "pytorchutils"):
        raise DependencyError("This module needs the 'PyTorch' extension. Install it from the Extensions "
                              "Manager, restart Slicer and try again.")
    import PyTorchUtils

    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if not torch_logic.torchInstalled():
        torch = torch_logic.installTorch(askConfirmation=confirm, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise DependencyError("PyTorch was not installed. ParotidOAR needs PyTorch to segment.")


def _ensure_packages(confirm: bool) -> None:
    missing = missing_requirements()
    if not missing:
        return
    import slicer

    if _testing():
        raise DependencyError(f"Missing Python packages ({', '.join(missing)}); self-tests never install "
                              "packages. Open the module once outside testing to install them.")
    if confirm and not slicer.util.confirmOkCancelDisplay(
            "ParotidOAR needs these Python packages, which will be downloaded and installed now:\n"
            + "\n".join(missing), "ParotidOAR: install Python packages"):
        raise DependencyError(f"Installation of {', '.join(missing)} was cancelled.")
    pydeps = getattr(slicer, "pydeps", None) or getattr(slicer, "packaging", None)
    if pydeps is not None and hasattr(pydeps, "pip_ensure"):
        requirements = pydeps.load_requirements(str(REQUIREMENTS)) if hasattr(pydeps, "load_requirements") \
            else missing
        pydeps.pip_ensure(requirements, requester="ParotidOAR")
    else:
        slicer.util.pip_install(" ".join(missing))
    still = missing_requirements()
    if still:
        raise DependencyError(f"Could not install {', '.join(still)}; see the Python console for pip output.")


def ensure(confirm: bool = True) -> None:
    """Make sure torch and the requirements are importable (installing them outside self-tests)."""
    _ensure_torch(confirm)
    _ensure_packages(confirm)
