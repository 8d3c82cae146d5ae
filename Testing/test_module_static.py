"""Static checks of the Slicer module (no Slicer application here).

* the module's Python files compile;
* every ``self.ui.<name>`` used by ParotidOAR.py / SegmentTab.py is a widget in the .ui;
* every ``SlicerParameterName`` in the .ui is a field of the ``@parameterNodeWrapper``
  class, bound to a widget type Slicer's GUI connectors accept for that field's type;
* module metadata (title, category, "not for clinical use", paper citation);
* the engine's scene glue never imports Slicer at module level and never uses the
  application singletons;
* the CMake lists name every module file and install ParotidOARLib as a package.
"""

from __future__ import annotations

import ast
import py_compile
import re
import xml.etree.ElementTree as ET

import pytest

from conftest import REPO

MODULE = REPO / "ParotidOAR"
MODULE_PY = MODULE / "ParotidOAR.py"
UI_FILE = MODULE / "Resources" / "UI" / "ParotidOAR.ui"
GUI = MODULE / "ParotidOARGui"
#: every module file that reads widgets from the .ui (self.ui.<name>)
UI_USERS = sorted(p for p in [MODULE_PY, *GUI.glob("*.py")] if "self.ui." in p.read_text(encoding="utf-8"))


def _module_ast() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"))


def _ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _prop(widget: ET.Element, name: str):
    for p in widget.findall("property"):
        if p.get("name") == name:
            child = list(p)[0]
            if child.tag == "stringlist":
                return [s.text for s in child.findall("string")]
            return child.text
    return None


def _wrapper_fields() -> dict[str, ast.AnnAssign]:
    for node in _module_ast().body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {n.target.id: n for n in node.body if isinstance(n, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in ParotidOAR.py")


@pytest.mark.parametrize("path", sorted([MODULE_PY, *GUI.glob("*.py"), *(MODULE / "Scripts").glob("*.py"),
                                         *(MODULE / "Testing" / "Python").glob("*.py")]), ids=lambda p: p.name)
def test_module_files_compile(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_every_ui_name_used_exists_in_ui_file():
    widgets = _ui_widgets()
    assert {p.name for p in UI_USERS} >= {"ParotidOAR.py", "SegmentTab.py"}
    used = set()
    for path in UI_USERS:
        used |= {(path.name, m) for m in re.findall(r"\bself\.ui\.(\w+)", path.read_text(encoding="utf-8"))}
    assert used, "no self.ui.<name> found - has the module changed its naming?"
    missing = sorted(f"{f}: {name}" for f, name in used if name not in widgets)
    assert not missing, f"widgets used in code but absent from {UI_FILE.name}: {missing}"
    # widget names are unique (childWidgetVariables would silently keep one of two)
    names = [w.get("name") for w in ET.parse(UI_FILE).getroot().iter("widget")]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    # every parameter-node field is bound by the .ui, or synced by hand in the code (the model combo box)
    bound = {_prop(w, "SlicerParameterName") for w in widgets.values()} - {None}
    by_hand = {m for p in UI_USERS for m in re.findall(r"\bnode\.(\w+)\s*=", p.read_text(encoding="utf-8"))}
    unbound = set(_wrapper_fields()) - bound - by_hand
    assert not unbound, f"parameter-node fields neither in the .ui nor set in code: {sorted(unbound)}"


def test_required_widgets_and_tabs():
    widgets = _ui_widgets()
    for name in ("tabWidget", "segmentTab", "reviewTab", "inputVolumeSelector", "sideComboBox", "deviceComboBox",
                 "modelComboBox", "roiMarginSpinBox", "outputSegmentationSelector", "showRoiCheckBox",
                 "segmentButton", "progressBar", "statusLabel", "summaryTable", "exportRtstructButton",
                 "advancedCollapsibleButton"):
        assert name in widgets, name
    tabs = [w for w in widgets["tabWidget"].findall("widget")]
    titles = [t.find("attribute/string").text for t in tabs]
    assert titles == ["Segment", "Review"]
    assert widgets["roiMarginSpinBox"].get("class") == "QDoubleSpinBox"
    assert float(_prop(widgets["roiMarginSpinBox"], "value")) == 17.0
    out = widgets["outputSegmentationSelector"]
    assert _prop(out, "nodeTypes") == ["vtkMRMLSegmentationNode"]
    assert _prop(out, "noneEnabled") == "true" and _prop(out, "addEnabled") == "true"
    assert _prop(out, "renameEnabled") == "true" and _prop(out, "noneDisplay") == "Create new"
    assert _prop(widgets["inputVolumeSelector"], "nodeTypes") == ["vtkMRMLScalarVolumeNode"]
    assert _prop(widgets["showRoiCheckBox"], "checked") == "true"
    # the advanced box really holds the margin
    advanced = widgets["advancedCollapsibleButton"]
    assert any(w.get("name") == "roiMarginSpinBox" for w in advanced.iter("widget"))


def test_parameter_names_are_wrapper_fields_with_compatible_widgets():
    widgets = _ui_widgets()
    fields = _wrapper_fields()
    bound = {name: _prop(w, "SlicerParameterName") for name, w in widgets.items()
             if _prop(w, "SlicerParameterName") is not None}
    assert bound, "no SlicerParameterName in the .ui"
    for widget_name, param in bound.items():
        assert param in fields, f"{widget_name}: SlicerParameterName {param!r} is not a parameter-node field"
        annotation = ast.unparse(fields[param].annotation)
        cls = widgets[widget_name].get("class")
        if cls == "QComboBox":  # Slicer's QComboBoxToStringableConnector needs a Choice annotation
            choice = re.search(r"Choice\((\[.*?\])\)", annotation)
            assert choice, f"{param}: a QComboBox needs Annotated[str, Choice([...])]"
            items = [i.find("property/string").text for i in widgets[widget_name].findall("item")]
            assert ast.literal_eval(choice.group(1)) == items, f"{param}: Choice differs from the .ui items"
            default = ast.literal_eval(fields[param].value)
            assert default in items
        elif cls == "QDoubleSpinBox":
            assert annotation.startswith("Annotated[float") or annotation == "float", param
        elif cls == "QCheckBox":
            assert annotation == "bool", param
        elif cls == "qMRMLNodeComboBox":
            assert annotation in _prop(widgets[widget_name], "nodeTypes"), f"{param}: {annotation}"
        else:
            raise AssertionError(f"{widget_name}: no parameter-node connector for {cls}")
    assert ast.literal_eval(fields["roiMarginMm"].value) == 17.0
    assert ast.literal_eval(fields["showRoi"].value) is True
    assert {"inputVolume", "outputSegmentation", "side", "device", "roiMarginMm", "showRoi", "model"} <= set(fields)


def test_module_metadata():
    source = MODULE_PY.read_text(encoding="utf-8")
    assert 'self.parent.title = _("Parot' + 'id OAR")' in source
    assert '"Segmentation")]' in source
    tree = _module_ast()
    texts = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            attr = node.targets[0].attr
            if attr in ("helpText", "acknowledgementText"):
                texts[attr] = ast.literal_eval(node.value.args[0])
    help_text = " ".join(texts["helpText"].split())
    assert "not for clinical use" in help_text.lower()
    assert "two-step" in help_text.lower() and "17 mm" in help_text
    ack = " ".join(texts["acknowledgementText"].split())
    assert "2022;14(6)" in ack and "Brachytherapy" in ack and "nnU-Net" in ack
    for name in ("ParotidOAR", "ParotidOARWidget", "ParotidOARLogic", "ParotidOARTest", "ParotidOARParameterNode"):
        assert any(isinstance(n, ast.ClassDef) and n.name == name for n in tree.body), name
    assert "tryWithErrorDisplay" in (GUI / "SegmentTab.py").read_text(encoding="utf-8")
    assert "from slicer.i18n import tr as _" in source


def test_self_test_skips_only_without_dependencies_and_runs_segment():
    tree = _module_ast()
    test_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ParotidOARTest")
    text = MODULE_PY.read_text(encoding="utf-8")
    src = ast.get_source_segment(text, test_cls)
    assert "generate_case(" in src and "size=\"small\"" in src and "metrics.compare(" in src
    methods = {n.name: n for n in test_cls.body if isinstance(n, ast.FunctionDef)}
    run_test = methods["runTest"]
    called = {n.func.attr for n in ast.walk(run_test) if isinstance(n, ast.Attribute) for n in [n]
              if False} | {n.attr for n in ast.walk(run_test) if isinstance(n, ast.Attribute)}
    tests = {name for name in methods if name.startswith("test_")}
    assert tests and tests <= called, f"runTest does not call {tests - called}"
    # the only skip: inference without its dependencies (torch), decided by Dependencies, with a message
    skips = [name for name, fn in methods.items() if "skipTest" in ast.get_source_segment(text, fn)]
    assert skips == ["_skipUnlessInferenceCanRun"], skips
    skip_src = ast.get_source_segment(text, methods["_skipUnlessInferenceCanRun"])
    assert "Dependencies.status()" in skip_src
    segment_src = ast.get_source_segment(text, methods["test_SegmentPhantom"])
    assert segment_src.split("\n")[1].strip() == "self._skipUnlessInferenceCanRun()"
    assert "_skipUnlessInferenceCanRun" not in ast.get_source_segment(text, methods["test_EditedSegmentationIsProtected"])


def test_segment_button_cannot_be_reentered():
    """Issue 14, defect 9: slicer.app.processEvents() inside the click handler used to deliver a fast second click
    into the same handler ("already running"). The button is disabled, and a guard set, before any event can be
    processed."""
    source = (GUI / "SegmentTab.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentTab")
    methods = {n.name: ast.get_source_segment(source, n) for n in cls.body if isinstance(n, ast.FunctionDef)}
    click = methods["onSegmentButton"]
    guard = click.index("if self._starting:")
    disable = click.index("self.ui.segmentButton.enabled = False")
    start = click.index("self._startSegmentation()")
    assert guard < disable < start
    assert "self._starting = False" in click.split("finally:", 1)[1]
    assert "processEvents" not in click and "processEvents" in methods["_startSegmentation"]
    assert "not self._starting" in methods["updateFromParameterNode"]


def test_on_reload_reloads_the_helper_packages():
    tree = _module_ast()
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ParotidOARWidget")
    reload = next((n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "onReload"), None)
    assert reload is not None, "ParotidOARWidget.onReload is missing"
    src = ast.get_source_segment(MODULE_PY.read_text(encoding="utf-8"), reload)
    assert '"ParotidOARGui", "ParotidOARLib"' in src and "del sys.modules[name]" in src
    assert "ScriptedLoadableModuleWidget.onReload(self)" in src


def test_extension_urls_point_to_files_in_the_repository():
    """The Extensions Index checks the icon and screenshot URLs: each must name a file that exists here."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    base = re.search(r'set\(PAROTIDOAR_RAW_URL "([^"]+)"\)', text).group(1)
    for var in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        value = re.search(rf'set\({var} "([^"]+)"\)', text).group(1)
        urls = value.replace("${PAROTIDOAR_RAW_URL}", base).split()
        assert urls, var
        for url in urls:
            assert url.startswith(base + "/"), url
            path = REPO / url[len(base) + 1:]
            assert path.is_file(), f"{var}: {url} -> {path} does not exist"
            assert path.stat().st_size > 10_000 or path.suffix == ".png" and path.stat().st_size > 1000
    help_text = MODULE_PY.read_text(encoding="utf-8").split("self.parent.helpText", 1)[1].split('""")', 1)[0]
    assert "github.com/ParotidOAR" not in help_text  # the repository it linked to does not exist


def test_terminology_file_covers_every_code_and_loads_in_slicer():
    """ParotidOAR.term.json holds every code the segments carry (SNOMED CT and the private 99POAR), and Slicer's
    terminology logic resolves each segment's entry from it (it could not before: the private codes are in no
    terminology Slicer ships)."""
    import json

    pytest.importorskip("slicer")
    import slicer

    from ParotidOARLib import labels

    path = MODULE / "Resources" / "ParotidOAR.term.json"
    content = json.loads(path.read_text(encoding="utf-8"))
    assert content["SegmentationCategoryTypeContextName"] == labels.CONTEXT
    logic = slicer.vtkSlicerTerminologiesModuleLogic()

    def resolved(name, side):
        """The entry as Slicer's terminology logic completes it from the loaded terminologies: our file sets
        the recommended colour and the 3D Slicer label; without it the type stays grey and unnamed."""
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(labels.terminology_string(name, side), entry)
        logic.UpdateEntryFromLoadedTerminologies(entry, [], [])
        t = entry.GetTypeObject()
        return (tuple(t.GetRecommendedDisplayRGBValue()) == labels.color_255(name)
                and t.GetCodeValue() == labels.info(name).type_code[1])

    names = list(labels.STRUCTURES) + [labels.ROI]
    assert not any(resolved(name, "left") for name in names)
    assert logic.LoadTerminologyFromFile(str(path)) == labels.CONTEXT
    for name in names:
        for side in ("left", "right"):
            assert resolved(name, side), (name, side)
    module_src = MODULE_PY.read_text(encoding="utf-8")
    assert "LoadTerminologyFromFile(self.terminologyPath())" in module_src
    assert 'Resources", "ParotidOAR.term.json"' in module_src


def test_scene_glue_never_uses_app_singletons():
    path = REPO / "ParotidOARLib" / "scene.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:  # module level: no slicer / qt / vtk imports
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.split(".")[0] in ("slicer", "qt", "vtk", "ctk") for n in names), ast.unparse(node)
    text = path.read_text(encoding="utf-8")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("#", "*", "``")))
    for forbidden in ("slicer.mrmlScene", "slicer.modules", "slicer.app", "slicer.util."):
        assert forbidden not in code.split('"""', 2)[-1], forbidden


def test_gui_logic_files_are_qt_free():
    for name in ("Signal.py", "Process.py", "SegmentLogic.py"):
        tree = ast.parse((GUI / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("qt", "slicer", "ctk") for n in names), (name, ast.unparse(node))


def test_cmake_lists_module_files_and_packages_engine():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1)
    scripts = [s for s in block.split() if not s.startswith("#")]
    for s in scripts:
        path = MODULE / s.replace("${MODULE_NAME}", "ParotidOAR")
        assert path.exists(), f"listed in MODULE_PYTHON_SCRIPTS but missing: {s}"
    listed = {s.replace("${MODULE_NAME}", "ParotidOAR") for s in scripts}
    for py in sorted(GUI.glob("*.py")):
        assert f"ParotidOARGui/{py.name}" in listed, py.name
    assert "Scripts/batch_segment.py" in listed
    for name in ("scene.py", "batch.py", "commands/batch.py"):
        assert f"../ParotidOARLib/{name}" in listed, name
    resources = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", text, re.S).group(1).split()
    assert "Resources/UI/${MODULE_NAME}.ui" in resources and "Resources/requirements.txt" in resources
    assert "Resources/${MODULE_NAME}.term.json" in resources
    # the engine is copied as a package folder next to ParotidOAR.py, not to ../ (outside the module dir)
    assert "ctkMacroCompilePythonScript" in text and "SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/.." in text
    tests = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^\s*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}ModuleTest.py\)", tests, re.M)


def _imported_modules(tree: ast.AST, package: str) -> list[str]:
    """Every module an AST imports (at any depth), relative imports resolved against ``package``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names]  # `from . import commands`
    return out


def test_engine_never_imports_the_command_layer():
    """ParotidOARLib/ is the engine: only __main__.py and commands/ may import commands/ (issue #15)."""
    lib = REPO / "ParotidOARLib"
    offenders = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if rel.parts[0] == "commands" or rel.name == "__main__.py":
            continue
        package = ".".join(("ParotidOARLib",) + rel.parts[:-1])
        for name in _imported_modules(ast.parse(path.read_text(encoding="utf-8")), package):
            if name == "ParotidOARLib.commands" or name.startswith("ParotidOARLib.commands."):
                offenders.append(f"{rel}: {name}")
    assert not offenders, offenders
