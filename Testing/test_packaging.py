"""The installable package: the wheel builds from the repository, installs into a fresh venv,
has a ``parotid-oar`` command, ships the default model, and installs user models outside
site-packages (in the per-user folder the Slicer module also reads).

The fresh venv reuses the test venv's third-party packages through a ``.pth`` file (so torch is
not downloaded again); the wheel itself is installed with ``--no-deps --no-index``, and the
commands run from a folder outside the repository, so ``ParotidOARLib`` can only come from the
wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

from ParotidOARLib import bundle

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env=None, timeout=600):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources (the build leaves nothing in the repository)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE.txt"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "ParotidOARLib", src / "ParotidOARLib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(REPO / "Resources" / "Models", src / "Resources" / "Models")
    dist = tmp_path_factory.mktemp("dist")
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
              "-w", dist, src], cwd=src)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = dist.glob("parotidoar-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; third-party packages come from this venv via a .pth."""
    root = tmp_path_factory.mktemp("venv") / "v"
    r = _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent)
    assert r.returncode == 0, r.stderr
    py = root / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root.parent).stdout.strip())
    (site / "shared-test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = _run([py, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=root.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", bundle.MODELS_ENV)}
    env["PAROTIDOAR_USER_MODELS"] = str(tmp_path / "user-models")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_wheel_contains_the_command_the_model_and_the_license(wheel):
    z = zipfile.ZipFile(wheel)
    names = set(z.namelist())
    for f in ("manifest.json", "stage1.pt", "stage2.pt"):
        assert f"ParotidOARLib/shipped_models/{bundle.DEFAULT_BUNDLE_NAME}/{f}" in names
    ep = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "parotid-oar = ParotidOARLib.__main__:cli" in z.read(ep).decode()
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Provides-Extra: dicom-seg" in meta and "Provides-Extra: dask" in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE.txt") for n in names)
    assert not any("Testing/" in n or n.startswith("ParotidOAR/") for n in names)


def test_installed_command_help_and_models_list_from_another_folder(venv, tmp_path):
    exe = venv / "bin" / "parotid-oar"
    assert exe.is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(tmp_path)
    r = _run([exe, "--help"], cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr
    assert "usage: parotid-oar" in r.stdout and "not for clinical use" in r.stdout.lower()
    r = _run([exe, "models", "list", "--json"], cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    entries = json.loads(r.stdout)["bundles"]
    default = [e for e in entries if e["name"] == bundle.DEFAULT_BUNDLE_NAME]
    assert default and default[0]["ok"] and default[0]["default"] and default[0]["source"] == "shipped"
    # the shipped model comes from the installed package, not from the repository
    assert Path(default[0]["path"]).resolve().is_relative_to(venv.resolve()), default[0]["path"]
    r = _run([exe, "models", "list"], cwd=elsewhere, env=env)
    assert r.returncode == 0 and f"{bundle.DEFAULT_BUNDLE_NAME} " in r.stdout and "(default)" in r.stdout
    # python -m works the same way from the installed package
    r = _run([venv / "bin" / "python", "-m", "ParotidOARLib", "--version"], cwd=elsewhere, env=env)
    assert r.returncode == 0 and "ParotidOAR" in r.stdout


def test_installed_models_install_goes_to_the_user_folder(venv, tiny_bundle, tmp_path):
    exe = venv / "bin" / "parotid-oar"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(tmp_path)
    r = _run([exe, "models", "install", tiny_bundle], cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "user-models" / "tiny-test" / "manifest.json").is_file()
    assert not list(venv.rglob("tiny-test"))  # nothing written into site-packages
    r = _run([exe, "models", "list", "--json"], cwd=elsewhere, env=env)
    names = {e["name"]: e["source"] for e in json.loads(r.stdout)["bundles"]}
    assert names == {bundle.DEFAULT_BUNDLE_NAME: "shipped", "tiny-test": "user"}
    # installing again without --force is refused with a one-line error, exit 2
    r = _run([exe, "models", "install", tiny_bundle], cwd=elsewhere, env=env)
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr


def test_engine_and_slicer_module_share_the_user_models_folder(monkeypatch, tmp_path):
    sys.path.insert(0, str(REPO / "ParotidOAR"))
    try:
        from ParotidOARGui import Models
    finally:
        sys.path.remove(str(REPO / "ParotidOAR"))
    monkeypatch.setenv(bundle.USER_MODELS_ENV, str(tmp_path / "u"))
    assert Models.user_models_dir() == bundle.user_models_dir() == tmp_path / "u"
    monkeypatch.delenv(bundle.USER_MODELS_ENV)
    monkeypatch.delenv(bundle.MODELS_ENV, raising=False)
    assert bundle.install_root() == bundle.user_models_dir()
    assert not bundle.install_root().is_relative_to(REPO)


def test_installed_demo_runs_from_another_folder_with_the_shipped_model(venv, tmp_path):
    """`pip install .` then `parotid-oar demo` from any folder: the shipped model segments the phantom."""
    exe = venv / "bin" / "parotid-oar"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _run([exe, "demo", "--out", "demo-output", "--size", "small", "--device", "cpu"], cwd=elsewhere,
             env=_env(tmp_path), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Segmenting with the model bundle" in r.stdout and str(venv.resolve()) in r.stdout
    assert "not for clinical use" in r.stdout.lower()
    seg = next((elsewhere / "demo-output").glob("*/segmentation.seg.nrrd"))
    from ParotidOARLib import segio

    masks, _, _ = segio.read_seg(seg)
    assert masks["Parotid"].sum() > 100
