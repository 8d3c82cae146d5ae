"""Model bundles: a folder with ``manifest.json``, ``stage1.pt`` and ``stage2.pt``.

``manifest.json`` describes everything needed to run the cascade reproducibly::

    {
      "format": "parotidoar-bundle/1",
      "name": "parotid-oar-research-v1", "version": "1.0.0",
      "clinical_use": false, "description": "...", "license": "...",
      "data": {"description": "...", "sources": ["..."]},
      "stages": {
        "stage1": {"labels": ["background", "Parotid"], "spacing": [x, y, z],
                   "normalisation": {"clip": [lo, hi], "mean": m, "std": s},
                   "patch_size": [z, y, x], "architecture": {UNetConfig.to_dict()},
                   "file": "stage1.pt", "sha256": "...", "dtype": "float16"},
        "stage2": {"labels": ["background", "Auricula", ...6 OARs], ...}
      },
      "training": {...}, "roi_margin_mm": 17.0, "created": "2026-11-23"
    }

Weights are plain ``state_dict`` files (``torch.save``; loaded with
``weights_only=True``), stored as float16 by default (half the size, no loss
that matters for inference) and loaded back as float32. The SHA-256 of every
weight file is checked on load; a mismatch or an unreadable file raises
:class:`ModelError` naming the file and what to do.

Bundles are looked up by name in two folders:

* the **user's models folder** (:func:`user_models_dir`, shared with the Slicer module):
  ``$PAROTIDOAR_USER_MODELS`` if set, else ``%LOCALAPPDATA%\\ParotidOAR\\Models`` (Windows),
  ``~/Library/Application Support/ParotidOAR/Models`` (macOS) or
  ``$XDG_DATA_HOME/ParotidOAR/Models`` (``~/.local/share``; Linux). ``models install``
  writes here, never into site-packages. A bundle of the same name here wins.
* the **models root** (:func:`models_root`): ``$PAROTIDOAR_MODELS`` if set, else the
  shipped models (:func:`shipped_models_dir`: ``ParotidOARLib/shipped_models`` inside an
  installed wheel, ``<repo>/Resources/Models`` in a source checkout).

The default bundle is ``parotid-oar-research-v1``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelError, OutputExistsError
from .imageio import atomic_folder

FORMAT = "parotidoar-bundle/1"
MANIFEST = "manifest.json"
STAGES = ("stage1", "stage2")
DEFAULT_BUNDLE_NAME = "parotid-oar-research-v1"
MODELS_ENV = "PAROTIDOAR_MODELS"
USER_MODELS_ENV = "PAROTIDOAR_USER_MODELS"
#: where the wheel puts Resources/Models (pyproject.toml maps the package to that folder)
PACKAGED_MODELS = Path(__file__).resolve().parent / "shipped_models"
REPO_ROOT = Path(__file__).resolve().parents[1]

_VERIFY_HINT = "Run `python -m ParotidOARLib models verify {dir}` and reinstall the bundle " \
               "(`python -m ParotidOARLib models install PATH`) or retrain it."


@dataclass
class Manifest:
    name: str
    version: str
    clinical_use: bool = False
    description: str = ""
    license: str = ""
    #: {"description": free text, "sources": [str, ...]}
    data: dict = field(default_factory=lambda: {"description": "", "sources": []})
    #: {"stage1": {...}, "stage2": {...}} — see the module docstring / :func:`stage_spec`
    stages: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    roi_margin_mm: float = 17.0
    created: str = ""
    format: str = FORMAT

    # convenience accessors -------------------------------------------------------
    def stage(self, stage: str) -> dict:
        try:
            return self.stages[stage]
        except KeyError:
            raise ModelError(f"The bundle manifest has no {stage!r} entry. The bundle is incomplete; "
                             "reinstall or retrain it.") from None

    def labels(self, stage: str) -> list[str]:
        return list(self.stage(stage)["labels"])

    def spacing(self, stage: str) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.stage(stage)["spacing"])

    def patch_size(self, stage: str) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.stage(stage)["patch_size"])

    def normalisation(self, stage: str) -> dict:
        return dict(self.stage(stage)["normalisation"])

    def architecture(self, stage: str):
        from .netconfig import UNetConfig

        return UNetConfig.from_dict(self.stage(stage)["architecture"])

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        missing = [k for k in ("name", "version", "stages") if k not in known]
        if missing:
            raise ModelError(f"The bundle manifest lacks {', '.join(missing)}.")
        return cls(**known)


def stage_spec(labels, spacing, normalisation: dict, patch_size, architecture, context_mm=None,
               inference_patch_size=None) -> dict:
    """One ``stages`` entry; ``architecture`` is a :class:`UNetConfig` or its dict.

    ``context_mm`` (stage 2): tissue kept around the ROI box in the stage-2 crop
    (default 8 mm when absent, as in training). ``inference_patch_size`` (z, y, x): an
    optional larger sliding window for inference (must be a multiple of the network divisor).
    """
    if hasattr(architecture, "to_dict"):
        architecture = architecture.to_dict()
    extra = {} if context_mm is None else {"context_mm": float(context_mm)}
    if inference_patch_size is not None:
        extra["inference_patch_size"] = [int(v) for v in inference_patch_size]
    return {**extra, "labels": list(labels), "spacing": [float(v) for v in spacing],
            "normalisation": {"clip": [float(v) for v in normalisation["clip"]],
                              "mean": float(normalisation["mean"]), "std": float(normalisation["std"])},
            "patch_size": [int(v) for v in patch_size], "architecture": dict(architecture)}


# --------------------------------------------------------------------------- paths
def shipped_models_dir() -> Path:
    """The models shipped with the code: ``ParotidOARLib/shipped_models`` in an installed wheel,
    else ``<repo>/Resources/Models`` (a source checkout or the Slicer extension)."""
    if PACKAGED_MODELS.is_dir():
        return PACKAGED_MODELS
    return REPO_ROOT / "Resources" / "Models"


def models_root() -> Path:
    """``$PAROTIDOAR_MODELS`` if set, else the shipped models (:func:`shipped_models_dir`)."""
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser() if env else shipped_models_dir()


def user_models_dir() -> Path:
    """The per-user models folder (see the module docstring); the Slicer module uses the same one.

    Follows the platformdirs ``user_data_dir`` convention by hand (no extra dependency)."""
    env = os.environ.get(USER_MODELS_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "ParotidOAR" / "Models"


def install_root() -> Path:
    """Where ``models install`` writes by default: ``$PAROTIDOAR_MODELS`` if set, else the user's folder
    (never the shipped, possibly read-only, package folder)."""
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser() if env else user_models_dir()


def search_roots() -> list[Path]:
    """Folders a bundle *name* is looked up in, first match wins: the user's folder, then the models root."""
    roots = [user_models_dir(), models_root()]
    return [r for i, r in enumerate(roots) if r not in roots[:i]]


def default_bundle_dir() -> Path | None:
    """The default bundle (``parotid-oar-research-v1``): the user's copy, else the models root's,
    else the shipped one; None if absent everywhere."""
    candidates = [r / DEFAULT_BUNDLE_NAME for r in search_roots()] + [shipped_models_dir() / DEFAULT_BUNDLE_NAME]
    for c in candidates:
        if (c / MANIFEST).is_file():
            return c
    return None


def resolve_bundle_dir(model_dir=None) -> Path:
    """``model_dir`` if given (a bundle folder, or a bundle name in the user's folder or the models root),
    else the default."""
    if model_dir:
        p = Path(model_dir).expanduser()
        if not p.exists():
            for root in search_roots():
                if (root / str(model_dir) / MANIFEST).is_file():
                    p = root / str(model_dir)
                    break
        if not (p / MANIFEST).is_file():
            raise ModelError(f"No model bundle at {p} (no {MANIFEST}). Pass a bundle folder to --model, or "
                             "see `parotid-oar models list`.")
        return p
    d = default_bundle_dir()
    if d is None:
        raise ModelError(f"No model bundle found: the default bundle {DEFAULT_BUNDLE_NAME} is not in "
                         f"{' or '.join(str(r) for r in search_roots())}. Train one (`parotid-oar train ...`), "
                         "install one (`parotid-oar models install PATH`), or pass --model DIR.")
    return d


# --------------------------------------------------------------------------- hashing
def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- save
def save_bundle(directory, manifest: Manifest, state_dicts: dict, half: bool = True, force: bool = False) -> Path:
    """Write a bundle: ``stageN.pt`` (float16 if ``half``) + ``manifest.json`` with their SHA-256.

    The folder is assembled in a temporary sibling and renamed into place, so a
    failed save leaves nothing behind. ``manifest`` is not modified (a copy
    with ``file``/``sha256``/``dtype`` filled in is written). Deterministic:
    the same weights and manifest give byte-identical files.
    """
    import torch

    directory = Path(directory)
    if directory.exists() and not force:
        raise OutputExistsError(f"{directory} already exists. Choose another folder or pass force=True / --force.")
    missing = [s for s in STAGES if s not in state_dicts]
    if missing:
        raise ModelError(f"save_bundle needs state dicts for {', '.join(STAGES)}; missing {', '.join(missing)}.")
    m = copy.deepcopy(manifest)
    for s in STAGES:
        m.stage(s)
    with atomic_folder(directory, force=True) as tmp:  # existence checked above, with its own message
        for s in STAGES:
            sd = {}
            for k, v in state_dicts[s].items():
                v = v.detach().cpu()
                if half and v.is_floating_point():
                    v = v.half()
                sd[k] = v.contiguous().clone()
            fname = f"{s}.pt"
            torch.save(sd, tmp / fname)
            m.stages[s]["file"] = fname
            m.stages[s]["sha256"] = sha256_file(tmp / fname)
            m.stages[s]["dtype"] = "float16" if half else "float32"
        (tmp / MANIFEST).write_text(json.dumps(m.to_dict(), indent=2, sort_keys=False) + "\n")
    return directory


# --------------------------------------------------------------------------- load / verify
def read_manifest(directory) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ModelError(f"No model bundle at {directory} ({MANIFEST} not found). Pass a bundle folder, or "
                         "train/install one (`python -m ParotidOARLib models install PATH`).")
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}). " + _VERIFY_HINT.format(dir=directory)) from None
    if not isinstance(d, dict):
        raise ModelError(f"{path} is not a bundle manifest. " + _VERIFY_HINT.format(dir=directory))
    return Manifest.from_dict(d)


def verify(directory) -> Manifest:
    """Check that the manifest is complete and every weight file matches its SHA-256.

    Returns the manifest; raises :class:`ModelError` naming the bad file otherwise.
    """
    directory = Path(directory)
    m = read_manifest(directory)
    for s in STAGES:
        spec = m.stage(s)
        for key in ("labels", "spacing", "normalisation", "patch_size", "architecture", "file", "sha256"):
            if key not in spec:
                raise ModelError(f"{directory / MANIFEST}: {s} lacks {key!r}. " + _VERIFY_HINT.format(dir=directory))
        f = directory / spec["file"]
        if not f.is_file():
            raise ModelError(f"Weight file {f} is missing. " + _VERIFY_HINT.format(dir=directory))
        digest = sha256_file(f)
        if digest != spec["sha256"]:
            raise ModelError(f"Weight file {f} is corrupt or was modified: SHA-256 {digest[:12]}… does not match "
                             f"the manifest ({str(spec['sha256'])[:12]}…). " + _VERIFY_HINT.format(dir=directory))
    return m


_verify = verify


class Bundle:
    """A loaded bundle: ``.manifest``, ``.directory``, ``.model(stage, device)``."""

    def __init__(self, directory, manifest: Manifest):
        self.directory = Path(directory)
        self.manifest = manifest
        self._models = {}
        #: networks of other inference backends (cascade._network), made once per bundle
        self.backend_models = {}

    @property
    def sha256(self) -> dict:
        return {s: self.manifest.stage(s).get("sha256") for s in STAGES}

    def state_dict(self, stage: str) -> dict:
        import torch

        f = self.directory / self.manifest.stage(stage)["file"]
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt zip/pickle
            raise ModelError(f"Cannot load weight file {f} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
                             + _VERIFY_HINT.format(dir=self.directory)) from None
        if not isinstance(sd, dict):
            raise ModelError(f"Weight file {f} does not hold a state dict. " + _VERIFY_HINT.format(dir=self.directory))
        return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}

    def model(self, stage: str, device="cpu"):
        """The stage's network in eval mode, float32, on ``device`` (cached per device)."""
        from .network import build

        key = (stage, str(device))
        if key not in self._models:
            net = build(self.manifest.architecture(stage))
            sd = self.state_dict(stage)
            try:
                net.load_state_dict(sd, strict=True)
            except RuntimeError as exc:
                raise ModelError(f"Weights in {self.directory / self.manifest.stage(stage)['file']} do not fit the "
                                 f"architecture in the manifest ({str(exc).splitlines()[0][:200]}). "
                                 + _VERIFY_HINT.format(dir=self.directory)) from None
            net.eval()
            self._models[key] = net.to(device)
        return self._models[key]


def load_bundle(directory, verify: bool = True) -> Bundle:
    """Load a bundle folder (checking SHA-256 unless ``verify=False``)."""
    directory = Path(directory)
    m = _verify(directory) if verify else read_manifest(directory)
    return Bundle(directory, m)


# --------------------------------------------------------------------------- list / install
def list_bundles(root=None) -> list[dict]:
    """Bundles (sub-folders with a manifest) under ``root`` (default: the models root).

    Each entry: ``path``, ``name``, ``version``, ``clinical_use``, ``description``, ``ok``
    (SHA-256 verified), ``error`` (message or None), ``default`` (is the default bundle).
    """
    root = Path(root) if root else models_root()
    out = []
    if not root.is_dir():
        return out
    default = default_bundle_dir()
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (d / MANIFEST).is_file():
            continue
        entry = {"path": str(d), "name": d.name, "version": None, "clinical_use": None, "description": "",
                 "ok": False, "error": None,
                 "default": default is not None and d.resolve() == Path(default).resolve()}
        try:
            m = read_manifest(d)
            entry.update(name=m.name, version=m.version, clinical_use=bool(m.clinical_use),
                         description=m.description)
            verify(d)
            entry["ok"] = True
        except ModelError as exc:
            entry["error"] = str(exc)
        out.append(entry)
    return out


def list_installed(user_dir=None, root=None, root_source: str = "shipped") -> list[dict]:
    """Bundles in the user's folder and the models root, one per name (the user's copy wins), the
    default bundle first, then by name. Each is a :func:`list_bundles` entry plus ``source``
    (``"user"`` or ``root_source``)."""
    user_dir = Path(user_dir) if user_dir else user_models_dir()
    root = Path(root) if root else models_root()
    by_name: dict[str, dict] = {}
    for source, folder in ((root_source, root), ("user", user_dir)):
        if source != "user" and folder == user_dir:
            continue
        for entry in list_bundles(folder):
            entry = dict(entry, source=source)
            if entry["name"] == DEFAULT_BUNDLE_NAME:
                entry["default"] = True
            by_name[entry["name"]] = entry  # user after root: the user's copy replaces it
    return sorted(by_name.values(), key=lambda m: (not m.get("default"), m.get("name") or ""))


def install(path, root=None, force: bool = False) -> Path:
    """Verify the bundle at ``path`` and copy it to ``<root>/<manifest name>`` (default root:
    :func:`install_root`, i.e. ``$PAROTIDOAR_MODELS`` or the user's models folder).

    Refuses to replace an installed bundle unless ``force``. The copy goes to a
    temporary folder first, is verified again, then renamed into place.
    """
    src = Path(path)
    m = verify(src)
    root = Path(root) if root else install_root()
    name = str(m.name)
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ModelError(f"Bundle name {name!r} in {src / MANIFEST} is not a valid folder name.")
    dest = root / name
    if dest.exists() and not force:
        raise OutputExistsError(f"A bundle is already installed at {dest}. Pass --force to replace it.")
    with atomic_folder(dest, force=True) as tmp:  # existence checked above, with its own message
        files = [MANIFEST] + [m.stage(s)["file"] for s in STAGES]
        for extra in sorted(src.iterdir()):  # keep READMEs/model cards, not sub-folders
            if extra.is_file() and extra.name not in files and not extra.name.startswith("."):
                files.append(extra.name)
        for f in files:
            shutil.copy2(src / f, tmp / f)
        verify(tmp)
    return dest
