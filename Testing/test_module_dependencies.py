"""The module's dependency handling (ParotidOARGui/Dependencies.py) and the headless batch script's
non-interactive path (issue 14, defects 3 and 7). No Slicer application: the installing branch is
not reached here, and these tests check that it is not reached when it must not be."""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "ParotidOAR"))

from ParotidOARGui import Dependencies  # noqa: E402

BATCH_SCRIPT = REPO / "ParotidOAR" / "Scripts" / "batch_segment.py"


@pytest.mark.parametrize("version, requirement, ok", [
    ("2.5.1+cu121", ">=2.1", True), ("2.1.0", ">=2.1", True), ("2.0.1+cpu", ">=2.1", False),
    ("1.13.1", ">=2.1", False), ("10.0", ">=2.1", True), ("1.4.0", ">=1.4", True), ("1.10.1", ">=1.10", True),
    ("1.9.3", ">=1.10", False), ("2.0", ">=1.0,<3", True), ("3.1", ">=1.0,<3", False), (None, ">=1", False),
    ("0.5", "", True)])
def test_version_satisfies(version, requirement, ok):
    assert Dependencies.version_satisfies(version, requirement) is ok


def test_status_reports_versions_and_an_old_torch(monkeypatch):
    """The torch version is checked even when torch is installed (it used to count as fine at any version)."""
    rows = {r["name"]: r for r in Dependencies.status()}
    assert list(rows)[0] == "torch" and {"scipy", "slicerio", "pynrrd"} <= set(rows)
    assert rows["scipy"]["installed"] and rows["scipy"]["ok"]
    monkeypatch.setattr(Dependencies, "torch_version", lambda: "2.0.1+cu118")
    torch = Dependencies.status()[0]
    assert torch["installed"] == "2.0.1+cu118" and not torch["ok"]
    line = Dependencies.describe(Dependencies.status())
    assert "torch 2.0.1+cu118 (needs >=2.1)" in line and line.endswith("install or update needed")


def test_torch_absent_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as where torch is not installed
    assert Dependencies.torch_version() is None and not Dependencies.torch_available()
    assert Dependencies.describe(Dependencies.status()).startswith("torch missing")


def test_never_installs_when_told_not_to(monkeypatch, tmp_path):
    """install=False raises at once with what to do, before any Slicer call (no dialog, no pip)."""
    monkeypatch.setitem(sys.modules, "torch", None)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("scipy>=1.0\nparotidoar-no-such-package>=1.0\n")
    with pytest.raises(Dependencies.DependencyError, match="(?i)install the dependencies from the module first") as e:
        Dependencies.ensure(confirm=True, install=False, requirements=requirements)
    assert "torch>=2.1" in str(e.value) and "parotidoar-no-such-package" in str(e.value)
    assert "scipy" not in str(e.value)


def test_no_slicer_pydeps_and_packaging_imported_explicitly():
    """slicer.pydeps exists in no Slicer release; slicer.packaging (5.12+) is not imported by `import slicer`."""
    source = (REPO / "ParotidOAR" / "ParotidOARGui" / "Dependencies.py").read_text(encoding="utf-8")
    code = source.split('"""', 2)[2]
    assert "pydeps" not in code
    assert "import slicer.packaging" in code and "prompt_install=False" in code
    assert "askConfirmation=False" in code  # the user was asked once, by ensure()


def _load_batch_script():
    spec = importlib.util.spec_from_file_location("batch_segment_under_test", BATCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch_script_fails_at_once_without_dependencies(monkeypatch, tmp_path, capsys):
    """Headless (`Slicer --no-main-window`) nobody can answer a dialog: a missing package must stop the batch at
    once with what to do, instead of opening confirmOkCancelDisplay / installTorch(askConfirmation=True)."""
    monkeypatch.setitem(sys.modules, "torch", None)
    batch_segment = _load_batch_script()
    (tmp_path / "in").mkdir()
    t0 = time.monotonic()
    code = batch_segment.main(["--", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                               "--side", "left"])
    assert code == 2 and time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    assert "install the dependencies from the module first" in err.lower() and "--install-dependencies" in err
    assert not (tmp_path / "out").exists()  # nothing was started
    assert batch_segment.parse_args(["--input", "x", "--out", "y", "--install-dependencies"]).install_dependencies
