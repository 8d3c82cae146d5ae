"""Shared pytest fixtures.

* ``mrml`` — a real Slicer MRML scene from the ``slicer-core`` wheel, with the
  application logic and the Segmentations module logic attached (the way
  trame-slicer's ``SlicerApp`` sets up a scene without the Slicer GUI).
* ``shared_data`` — ``../shared/data`` if present, else the test is skipped
  with a reason (the copied fixtures in ``Testing/Data`` cover a fresh clone).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATA = Path(__file__).resolve().parent / "Data"
SHARED = Path(os.environ.get("PAROTIDOAR_SHARED", REPO.parent / "shared" / "data"))

# keep the suite polite on the 2-core CI machine
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _isolated_user_models(monkeypatch, tmp_path_factory):
    """Every test (and every CLI it starts) sees an empty per-user models folder of its own, never
    the real ``~/.local/share/ParotidOAR/Models`` (whose bundles would win over the shipped ones)."""
    monkeypatch.setenv("PAROTIDOAR_USER_MODELS", str(tmp_path_factory.mktemp("user-models")))


class MRMLApp:
    """A headless scene with the logics our MRML glue needs."""

    def __init__(self):
        import slicer

        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentations_logic.SetMRMLApplicationLogic(self.app_logic)
        self.segmentations_logic.SetMRMLScene(self.scene)
        self.app_logic.SetModuleLogic("Segmentations", self.segmentations_logic)


@pytest.fixture()
def mrml():
    pytest.importorskip("slicer", reason="slicer-core is part of the test install (make test)")
    return MRMLApp()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


# --- model bundles (helper C): a tiny random-weight bundle, built once per session --------------
@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A valid bundle with 3-stage, 4-feature U-Nets and random weights (see Testing/bundle_utils.py).

    Read-only for tests: copy it (shutil.copytree) before tampering with it.
    """
    from bundle_utils import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny-test", seed=0, stage1_bias=-1.0)


@pytest.fixture(scope="session")
def fast_bundle(tmp_path_factory) -> Path:
    """A tiny bundle for batch runs: coarse spacings keep the sliding windows few, and the positive
    stage-1 bias guarantees a non-empty parotid. Read-only for tests."""
    from bundle_utils import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", stage1_bias=1.0,
                            stage1_spacing=(6.0, 6.0, 6.0), stage2_spacing=(4.0, 4.0, 4.0))
