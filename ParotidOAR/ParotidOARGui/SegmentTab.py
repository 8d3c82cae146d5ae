"""The Segment tab: widgets ↔ :class:`SegmentLogic`, a QTimer polling the process.

Kept out of ParotidOAR.py so the module file stays thin. Everything that
changes MRML nodes goes through ``ParotidOARLib.scene``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

import qt
import slicer
from slicer.i18n import tr as _

from ParotidOARLib import scene as mrml_scene

from .SegmentLogic import SegmentRequest

POLL_INTERVAL_MS = 100


class SegmentTab:
    def __init__(self, ui, logic, parameterNodeGetter):
        """``ui``: the module's widget variables; ``logic``: ParotidOARLogic; ``parameterNodeGetter()``."""
        self.ui = ui
        self.logic = logic
        self.segmentLogic = logic.segmentLogic
        self.parameterNode = parameterNodeGetter
        self._startTime = None
        self._updating = False

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.timeout.connect(self._poll)

        self._starting = False  # re-entrance guard of onSegmentButton (processEvents inside it)
        self.models = []

        self.segmentLogic.progress.connect(self.onProgress)
        self.segmentLogic.finished.connect(self.onFinished)
        self.segmentLogic.process.line.connect(self.onProcessLine)

        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.exportRtstructButton.clicked.connect(self.onExportRtstruct)
        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)
        self.ui.installModelButton.clicked.connect(self.onInstallModel)
        self.ui.summaryTable.setHorizontalHeaderLabels([_("Item"), _("Value")])
        self.ui.progressBar.setValue(0)
        self.ui.processLogTextEdit.setMaximumBlockCount(20000)
        self.refreshModels()  # the parameter node may not exist yet: updateFromParameterNode selects its model
        self.refreshDependencies()

    # ------------------------------------------------------------------ models
    def refreshModels(self) -> None:
        """Fill the model box (item data: the bundle *name*) and select the parameter node's model."""
        from . import Models

        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        try:
            combo.clear()
            try:
                self.models = self.logic.listModels()
            except Exception as exc:  # a broken models folder must not break the module
                logging.warning(f"ParotidOAR: cannot list models: {exc}")
                self.models = []
            for model in self.models:
                text = f"{model.get('name')} {model.get('version') or ''}".strip()
                if model.get("source") == "user":
                    text += " (" + _("yours") + ")"
                if not model.get("clinical_use"):
                    text += " - " + _("not for clinical use")
                if not model.get("ok", True):
                    text += " - " + _("INVALID")
                combo.addItem(text, model.get("name"))
                combo.setItemData(combo.count - 1, model.get("error") or model.get("description") or "",
                                  qt.Qt.ToolTipRole)
            if not self.models:
                combo.addItem(_("No model installed"), "")
            self.ui.modelsFolderPathLabel.text = str(Models.user_models_dir())
        finally:
            combo.blockSignals(False)
        node = self.parameterNode()
        if node is not None:
            self._selectModel(node)

    def _selectModel(self, node) -> None:
        """Parameter node → combo box: select the stored bundle name (a stored path from an older scene is read
        as its bundle's name). A name that is not installed is kept in the node and shown as missing."""
        from . import Models

        combo = self.ui.modelComboBox
        index = Models.index_of(self.models, node.model)
        combo.blockSignals(True)
        try:
            if index < 0:
                missing = Models.stored_name(node.model)
                existing = combo.findData(missing)
                if existing < 0:
                    combo.addItem(_("{name} - not installed").format(name=missing), missing)
                    existing = combo.count - 1
                index = existing
            combo.currentIndex = index
        finally:
            combo.blockSignals(False)
        stored = Models.stored_name(node.model)
        if stored != node.model:  # migrate an absolute path stored by an older version
            node.model = stored

    def onModelChanged(self, index=None) -> None:
        """Combo box → parameter node: store the bundle's name ("" for the default bundle)."""
        node = self.parameterNode()
        if node is None or self._updating:
            return
        node.model = self.ui.modelComboBox.currentData or ""

    def onInstallModel(self, checked=False) -> None:
        from . import Models

        folder = qt.QFileDialog.getExistingDirectory(None, _("Choose a model bundle folder (with manifest.json)"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not install the model."), waitCursor=True):
            try:
                dest = Models.install(folder)
            except Exception as exc:
                if "already installed" not in str(exc) or not slicer.util.confirmYesNoDisplay(
                        _("A model of that name is already installed in your models folder. Replace it?")):
                    raise
                dest = Models.install(folder, force=True)
            self.refreshModels()
            node = self.parameterNode()
            if node is not None:
                node.model = dest.name
            self.ui.statusLabel.text = _("Installed the model in {path}").format(path=str(dest))

    # ------------------------------------------------------------------ dependencies
    def refreshDependencies(self) -> None:
        from . import Dependencies

        try:
            rows = Dependencies.status()
            self.ui.dependenciesStatusLabel.text = Dependencies.describe(rows)
            missing = Dependencies.problems(rows)
        except Exception as exc:  # a broken requirements file must not break the module
            self.ui.dependenciesStatusLabel.text = str(exc)
            missing = True
        self.ui.installDependenciesButton.text = _("Install / update") if missing else _("Check again")

    def onInstallDependencies(self, checked=False) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not install the dependencies."), waitCursor=True):
            try:
                self.logic._dependenciesChecked = False
                self.logic.ensureDependencies(confirm=True, install=True)
            finally:
                self.refreshDependencies()

    # ------------------------------------------------------------------ state
    def updateFromParameterNode(self, node) -> None:
        if node is None:
            return
        self._updating = True
        try:
            self._selectModel(node)  # node -> combo box, before anything reads the combo box
            running = self.segmentLogic.is_running
            hasModel = bool(self.ui.modelComboBox.currentData)
            if running:
                self.ui.segmentButton.text = _("Cancel")
                self.ui.segmentButton.toolTip = _("Stop the segmentation process.")
                self.ui.segmentButton.enabled = True
            else:
                self.ui.segmentButton.text = _("Segment")
                self.ui.segmentButton.enabled = bool(node.inputVolume) and hasModel and not self._starting
                self.ui.segmentButton.toolTip = (
                    _("Run the two-step segmentation in a separate process.") if hasModel
                    else _("Install a model bundle first (python -m ParotidOARLib models install PATH)."))
            for widget in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector, self.ui.sideComboBox,
                           self.ui.deviceComboBox, self.ui.modelComboBox, self.ui.roiMarginSpinBox,
                           self.ui.useEditedParotidCheckBox):
                widget.enabled = not running
            output = node.outputSegmentation
            if output is not None and not running and mrml_scene.made_for_other_volume(output, node.inputVolume):
                # a new CT: do not offer to overwrite the previous patient's result ("Create new")
                node.outputSegmentation = None
                output = None
            if output is not None:
                mrml_scene.set_roi_visible(output, node.showRoi)
            report = mrml_scene.report_of(output) if output is not None else None
            self.showSummary(report)
            self.ui.exportRtstructButton.enabled = bool(output is not None and node.inputVolume and not running
                                                        and node.inputVolume.GetAttribute("DICOM.instanceUIDs"))
        finally:
            self._updating = False

    def showSummary(self, report) -> None:
        rows = mrml_scene.summary_rows(report)
        table = self.ui.summaryTable
        table.setRowCount(len(rows))
        for row, (item, value) in enumerate(rows):
            table.setItem(row, 0, qt.QTableWidgetItem(item))
            table.setItem(row, 1, qt.QTableWidgetItem(value))
        table.resizeColumnToContents(0)

    # ------------------------------------------------------------------ run
    def onSegmentButton(self, checked=False) -> None:
        if self.segmentLogic.is_running:
            self.cancel()
            return
        if self._starting:  # a second click, delivered by the event processing below while this one starts
            return
        self._starting = True
        self.ui.segmentButton.enabled = False  # before anything that can process events
        try:
            self._startSegmentation()
        finally:
            self._starting = False
            node = self.parameterNode()
            if node is not None:
                self.updateFromParameterNode(node)

    def _startSegmentation(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            node = self.parameterNode()
            output = node.outputSegmentation
            if output is not None and mrml_scene.made_for_other_volume(output, node.inputVolume):
                output = None  # the previous CT's result is kept; SegmentLogic would do the same
            if node.useEditedParotid and output is None:
                raise ValueError(_("'Redo OARs' uses the Parotid segment of the output segmentation: choose that "
                                   "segmentation (made for this CT) as output, or untick 'Redo OARs'."))
            force = False
            if output is not None and mrml_scene.has_user_edits(output):
                if not slicer.util.confirmYesNoDisplay(
                        _("The segmentation '{name}' has segments or edits that ParotidOAR did not make. "
                          "Replace all its segments with the new result?").format(name=output.GetName()),
                        windowTitle=_("Replace edited segmentation?")):
                    self.ui.statusLabel.text = _("Not started: choose 'Create new' as output to keep the edits.")
                    return
                force = True
            self.logic.ensureDependencies(confirm=True, install=True)
            self.refreshDependencies()
            request = SegmentRequest(
                volume_node=node.inputVolume, side=node.side.lower(), segmentation_node=output,
                device=node.device.lower(), model_dir=self.logic.resolveModel(node.model),
                roi_margin_mm=node.roiMarginMm, show_roi=node.showRoi, force=force,
                parotid_segmentation=output if node.useEditedParotid else None)
            self.ui.processLogTextEdit.clear()
            self.ui.statusLabel.text = _("Writing the input volume...")
            slicer.app.processEvents()
            self.segmentLogic.start(request)
            self._startTime = time.monotonic()
            self.timer.start()

    def onProcessLine(self, text) -> None:
        self.ui.processLogTextEdit.appendPlainText(text)

    def _poll(self) -> None:
        if not self.segmentLogic.poll():
            self.timer.stop()

    def cancel(self) -> None:
        """Ask the process tree to stop; returns at once (the QTimer's polls kill it after a grace period)."""
        if self.segmentLogic.is_running:
            self.ui.statusLabel.text = _("Cancelling...")
            self.segmentLogic.cancel()

    def onProgress(self, pct, step) -> None:
        self.ui.progressBar.setValue(int(round(pct)))
        self.ui.progressBar.setFormat(f"{step} %p%")
        self.ui.statusLabel.text = _("Running: {step}").format(step=step)

    def onFinished(self, segmentationNode, error) -> None:
        self.timer.stop()
        node = self.parameterNode()
        elapsed = time.monotonic() - self._startTime if self._startTime else 0.0
        if error:
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.setFormat("%p%")
            self.ui.statusLabel.text = error
            if not self.segmentLogic.process.cancelled:
                slicer.util.errorDisplay(_("Segmentation failed; the scene was not changed."),
                                         detailedText=error)
        else:
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s. Research use only - not for clinical use.").format(
                seconds=elapsed)
            if node is not None:
                node.outputSegmentation = segmentationNode
                slicer.util.setSliceViewerLayers(background=node.inputVolume)
        if node is not None:
            self.updateFromParameterNode(node)

    # ------------------------------------------------------------------ export
    def onExportRtstruct(self, checked=False) -> None:
        node = self.parameterNode()
        with slicer.util.tryWithErrorDisplay(_("RTSTRUCT export failed."), waitCursor=True):
            volume, segmentation = node.inputVolume, node.outputSegmentation
            instanceUids = (volume.GetAttribute("DICOM.instanceUIDs") or "").split()
            files = [slicer.dicomDatabase.fileForInstance(uid) for uid in instanceUids]
            files = [f for f in files if f]
            if not files:
                raise ValueError(_("The input volume was not loaded from the DICOM database; "
                                   "RTSTRUCT export needs its DICOM CT series."))
            if self._slicerRtExporter() is not None:
                directory = qt.QFileDialog.getExistingDirectory(None, _("Export RT Structure Set to folder"))
                if not directory:
                    return
                self._exportWithSlicerRt(segmentation, directory)
                self.ui.statusLabel.text = _("SlicerRT exported the study to {path}").format(path=directory)
                return
            path = qt.QFileDialog.getSaveFileName(None, _("Save RT Structure Set"),
                                                  f"{segmentation.GetName()}-RTSTRUCT.dcm", "DICOM (*.dcm)")
            if not path:
                return
            from ParotidOARLib import rtstruct

            masks = mrml_scene.segment_arrays(segmentation, volume)
            geometry = mrml_scene.volume_geometry(volume)
            series = tempfile.mkdtemp(prefix="ParotidOAR-series-")
            try:
                for i, f in enumerate(files):
                    shutil.copy(f, os.path.join(series, f"{i:05d}.dcm"))
                rtstruct.write_rtstruct(path, masks, geometry, series, force=True)
            finally:
                shutil.rmtree(series, ignore_errors=True)
            self.ui.statusLabel.text = _("Wrote {path}").format(path=path)

    @staticmethod
    def _slicerRtExporter():
        """SlicerRT's DICOM-RT exporter plugin class, or None when SlicerRT is not installed."""
        plugins = getattr(slicer.modules, "dicomPlugins", None) or {}
        return plugins.get("DicomRtImportExportPlugin")

    def _exportWithSlicerRt(self, segmentation, directory: str) -> None:
        """Export through SlicerRT (preferred when installed): it writes the RTSTRUCT with the study's
        references from the DICOM database. The engine's exporter is the fallback."""
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        plugin = self._slicerRtExporter()()
        exportables = plugin.examineForExport(shNode.GetItemByDataNode(segmentation))
        if not exportables:
            raise ValueError(_("SlicerRT cannot export this segmentation: it must be in the same DICOM study "
                               "as its CT (subject hierarchy)."))
        for exportable in exportables:
            exportable.directory = directory
        error = plugin.export(exportables)
        if error:
            raise RuntimeError(_("SlicerRT export failed: {error}").format(error=error))

    def cleanup(self) -> None:
        """Module closed/reloaded: stop polling, kill a running process and let the logic clean up."""
        self.timer.stop()
        self.segmentLogic.progress.disconnect(self.onProgress)
        self.segmentLogic.finished.disconnect(self.onFinished)
        self.segmentLogic.process.line.disconnect(self.onProcessLine)
        if self.segmentLogic.is_running:
            self.segmentLogic.cancel()
            # bounded (ProcessRunner.wait: grace + drain, about 5 s): fires finished (cancelled), temp files removed
            self.segmentLogic.process.wait(timeout=0)
