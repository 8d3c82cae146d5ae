"""Model bundles as the module sees them: by **name**, from two folders. Qt-free.

* The **user's models folder** (:func:`user_models_dir`): per user, outside the
  extension, so an extension update does not wipe installed models and a
  read-only extension install still works. ``$PAROTIDOAR_USER_MODELS`` if set,
  else ``%LOCALAPPDATA%\\ParotidOAR\\Models`` (Windows),
  ``~/Library/Application Support/ParotidOAR/Models`` (macOS) or
  ``$XDG_DATA_HOME/ParotidOAR/Models`` (``~/.local/share``; Linux).
* The **extension's models** (``bundle.models_root()``): the bundled research
  model, shipped read-only with the extension.

A bundle of the same name in the user's folder wins. The parameter node
stores the bundle's **name** (``""`` = the default bundle), never a path: a
path into the extension folder is stale after an extension update.
:func:`stored_name` also reads the absolute paths older scenes stored.
"""

from __future__ import annotations

import os
from pathlib import Path

from ParotidOARLib import bundle
from ParotidOARLib.errors import ModelError

USER_MODELS_ENV = bundle.USER_MODELS_ENV


def user_models_dir() -> Path:
    """The user's models folder; the engine's (``bundle.user_models_dir``), so that the CLI's
    ``models install`` and this module see the same bundles."""
    return bundle.user_models_dir()


def list_models(user_dir=None, extension_dir=None) -> list[dict]:
    """Installed bundles (``bundle.list_bundles`` entries plus ``source``: ``"user"`` or ``"extension"``),
    one per name (the user's copy wins), the default bundle first, then by name."""
    return bundle.list_installed(user_dir, extension_dir, root_source="extension")


def stored_name(value) -> str:
    """The bundle name for a parameter-node value: a name stays a name; an absolute path (older scenes)
    becomes the name of the bundle folder it pointed to."""
    text = str(value or "").strip()
    if not text:
        return ""
    if os.sep in text or "/" in text or (os.altsep and os.altsep in text):
        path = Path(text)
        try:
            return bundle.read_manifest(path).name
        except (ModelError, OSError, ValueError):
            return path.name
    return text


def index_of(models: list[dict], name) -> int:
    """Position of the bundle called ``name`` in ``models`` (``""``: the default, i.e. 0), or -1."""
    name = stored_name(name)
    if not name:
        return 0 if models else -1
    for i, model in enumerate(models):
        if model.get("name") == name:
            return i
    return -1


def resolve(name, user_dir=None, extension_dir=None) -> str | None:
    """The bundle folder for a stored name; None for ``""`` (the engine's default bundle).
    Raises ModelError naming both folders when no bundle of that name is installed."""
    name = stored_name(name)
    if not name:
        return None
    models = list_models(user_dir, extension_dir)
    i = index_of(models, name)
    if i < 0:
        raise ModelError(f"The model {name!r} is not installed (looked in {user_dir or user_models_dir()} and "
                         f"{extension_dir or bundle.models_root()}). Choose another model, or install it with "
                         f"`python -m ParotidOARLib models install PATH --root \"{user_dir or user_models_dir()}\"`.")
    return models[i]["path"]


def install(path, user_dir=None, force: bool = False) -> Path:
    """Verify a bundle folder and copy it into the user's models folder."""
    return bundle.install(path, root=Path(user_dir) if user_dir else user_models_dir(), force=force)
