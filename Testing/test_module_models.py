"""Model choice in the module (issue 14, defect 5, and the per-user models folder).

The parameter node stores the bundle's *name*; ParotidOARGui/Models.py maps it to a folder in the user's
models folder or the extension's. The round trip goes through a real MRML parameter node
(``vtkMRMLScriptedModuleNode``, what ``@parameterNodeWrapper`` stores a ``str`` field in), saved to and
read back from an MRML scene, across an extension update (the extension folder moves).
"""

from __future__ import annotations

import shutil
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "ParotidOAR"))

from ParotidOARGui import Models  # noqa: E402

from ParotidOARLib.errors import ModelError  # noqa: E402

pytest.importorskip("slicer", reason="slicer-core is part of the test install (make test)")


@pytest.fixture()
def folders(tmp_path):
    from bundle_utils import make_tiny_bundle

    extension_v1 = tmp_path / "Extensions-1" / "ParotidOAR" / "Models"
    make_tiny_bundle(extension_v1 / "parotid-oar-research-v1", name="parotid-oar-research-v1")
    user = tmp_path / "user-data" / "ParotidOAR" / "Models"
    mine = make_tiny_bundle(tmp_path / "downloads" / "my-model", name="my-clinic-model", seed=1)
    return {"extension_v1": extension_v1, "user": user, "mine": mine, "tmp": tmp_path}


def _round_trip_through_scene(value: str) -> str:
    """Write ``value`` as the module's 'model' parameter, save the scene to MRML, load it into a new scene."""
    import slicer

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "ParotidOAR")
    node.SetModuleName("ParotidOAR")
    node.SetParameter("model", value)
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()
    loaded = slicer.vtkMRMLScene()
    loaded.SetLoadFromXMLString(1)
    loaded.SetSceneXMLString(xml)
    loaded.Import()
    return loaded.GetFirstNodeByClass("vtkMRMLScriptedModuleNode").GetParameter("model")


def test_model_name_round_trip_through_the_parameter_node(folders, tmp_path):
    installed = Models.install(folders["mine"], user_dir=folders["user"])
    assert installed.parent == folders["user"]  # outside the extension folder
    models = Models.list_models(folders["user"], folders["extension_v1"])
    assert [m["name"] for m in models] == ["parotid-oar-research-v1", "my-clinic-model"]
    assert [m["source"] for m in models] == ["extension", "user"]

    stored = _round_trip_through_scene(models[1]["name"])  # what the combo box writes: the name
    assert stored == "my-clinic-model"
    # an extension update moves (and replaces) the extension folder; the stored name still selects the model
    extension_v2 = tmp_path / "Extensions-2" / "ParotidOAR" / "Models"
    shutil.move(str(folders["extension_v1"]), str(extension_v2))
    models = Models.list_models(folders["user"], extension_v2)
    assert Models.index_of(models, stored) == 1
    assert Models.resolve(stored, folders["user"], extension_v2) == str(installed)
    assert Models.resolve("parotid-oar-research-v1", folders["user"], extension_v2) == \
        str(extension_v2 / "parotid-oar-research-v1")
    assert Models.resolve("", folders["user"], extension_v2) is None  # "" = the engine's default bundle


def test_paths_stored_by_older_versions_are_read_as_names(folders, tmp_path):
    """Older scenes stored an absolute path into the extension folder, stale after an update."""
    old_path = str(folders["extension_v1"] / "parotid-oar-research-v1")
    stored = _round_trip_through_scene(old_path)
    extension_v2 = tmp_path / "Extensions-2" / "Models"
    shutil.move(str(folders["extension_v1"]), str(extension_v2))
    assert Models.stored_name(stored) == "parotid-oar-research-v1"
    models = Models.list_models(folders["user"], extension_v2)
    assert Models.index_of(models, stored) == 0
    assert Models.resolve(stored, folders["user"], extension_v2) == str(extension_v2 / "parotid-oar-research-v1")


def test_user_copy_wins_and_unknown_names_are_refused(folders):
    from bundle_utils import make_tiny_bundle

    newer = make_tiny_bundle(folders["tmp"] / "newer", name="parotid-oar-research-v1", seed=2)
    Models.install(newer, user_dir=folders["user"])
    models = Models.list_models(folders["user"], folders["extension_v1"])
    assert len(models) == 1 and models[0]["source"] == "user" and models[0]["default"]
    with pytest.raises(ModelError, match="not installed"):
        Models.resolve("no-such-model", folders["user"], folders["extension_v1"])
    assert Models.index_of(models, "no-such-model") == -1


def test_user_models_dir_is_per_user_and_outside_the_extension(monkeypatch, tmp_path):
    monkeypatch.setenv(Models.USER_MODELS_ENV, str(tmp_path / "x"))
    assert Models.user_models_dir() == tmp_path / "x"
    monkeypatch.delenv(Models.USER_MODELS_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    if sys.platform.startswith("linux"):
        assert Models.user_models_dir() == tmp_path / "share" / "ParotidOAR" / "Models"
    assert REPO not in Models.user_models_dir().parents


def test_segment_tab_stores_names_not_paths():
    """The combo box's item data is what onModelChanged writes into the node: it must be the name."""
    source = (REPO / "ParotidOAR" / "ParotidOARGui" / "SegmentTab.py").read_text(encoding="utf-8")
    assert 'combo.addItem(text, model.get("name"))' in source
    assert 'model.get("path")' not in source
    assert "node.model = self.ui.modelComboBox.currentData" in source
    assert "self._selectModel(node)" in source.split("def updateFromParameterNode", 1)[1]  # node -> combo
