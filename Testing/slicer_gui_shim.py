"""The smallest stand-in for the parts of a Slicer *application* that the slicer-core wheel lacks.

slicer-core gives real MRML (scene, nodes, segmentations and terminologies logic) and the real
``slicer.util`` (``VTKObservationMixin``), but no Qt, no ``slicer.app``, no
``slicer.ScriptedLoadableModule``, ``slicer.i18n`` or ``slicer.parameterNodeWrapper``. To run the
module's own self-test class (``ParotidOARTest``) outside Slicer, :func:`install` adds only those
names, with the behaviour Slicer has in ``--testing`` mode; the scene is a real ``vtkMRMLScene``.
Nothing of ParotidOAR is replaced. Use it in a subprocess (it changes ``sys.modules``).
"""

from __future__ import annotations

import sys
import types
import unittest


def install(scene, testing: bool = True, messages: list | None = None):
    import slicer

    messages = messages if messages is not None else []
    for name in ("qt", "ctk"):
        sys.modules.setdefault(name, types.ModuleType(name))

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    sys.modules["slicer.i18n"] = i18n

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda *args, **kwargs: ("Choice", args)
    wrapper.WithinRange = lambda *args, **kwargs: ("WithinRange", args)
    sys.modules["slicer.parameterNodeWrapper"] = wrapper

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.parent = parent

        def getParameterNode(self):
            node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
            node.SetModuleName("ParotidOAR")
            return node

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def onReload(self):
            messages.append("module reloaded")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=1000):
            messages.append(str(message))

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = slm

    slicer.app = types.SimpleNamespace(testingEnabled=lambda: testing)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace()
    return messages
