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

        self.segmentLogic.progress.connect(self.onProgress)
        self.segmentLogic.finished.connect(self.onFinished)

        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.exportRtstructButton.clicked.connect(self.onExportRtstruct)
        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.summaryTable.setHorizontalHeaderLabels([_("Item"), _("Value")])
        self.ui.progressBar.setValue(0)
        self.refreshModels()

    # ------------------------------------------------------------------ models
    def refreshModels(self) -> None:
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        try:
            models = self.logic.listModels()
        except Exception as exc:  # a broken models folder must not break the module
            logging.warning(f"ParotidOAR: cannot list models: {exc}")
            models = []
        for model in models:
            text = f"{model.get('name')} {model.get('version') or ''}".strip()
            if not model.get("clinical_use"):
                text += " - " + _("not for clinical use")
            if not model.get("ok", True):
                text += " - " + _("INVALID")
            combo.addItem(text, model.get("path"))
            combo.setItemData(combo.count - 1, model.get("error") or model.get("description") or "",
                              qt.Qt.ToolTipRole)
        if not models:
            combo.addItem(_("No model installed"), "")
        combo.blockSignals(False)
        self.onModelChanged()

    def onModelChanged(self, index=None) -> None:
        node = self.parameterNode()
        if node is not None and not self._updating:
            node.model = self.ui.modelComboBox.currentData or ""

    # ------------------------------------------------------------------ state
    def updateFromParameterNode(self, node) -> None:
        if node is None:
            return
        self._updating = True
        try:
            running = self.segmentLogic.is_running
            hasModel = bool(self.ui.modelComboBox.currentData)
            if running:
                self.ui.segmentButton.text = _("Cancel")
                self.ui.segmentButton.toolTip = _("Stop the segmentation process.")
                self.ui.segmentButton.enabled = True
            else:
                self.ui.segmentButton.text = _("Segment")
                self.ui.segmentButton.enabled = bool(node.inputVolume) and hasModel
                self.ui.segmentButton.toolTip = (
                    _("Run the two-step segmentation in a separate process.") if hasModel
                    else _("Install a model bundle first (python -m ParotidOARLib models install PATH)."))
            for widget in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector, self.ui.sideComboBox,
                           self.ui.deviceComboBox, self.ui.modelComboBox, self.ui.roiMarginSpinBox,
                           self.ui.useEditedParotidCheckBox):
                widget.enabled = not running
            output = node.outputSegmentation
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
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            node = self.parameterNode()
            self.logic.ensureDependencies()
            output = node.outputSegmentation
            if node.useEditedParotid and output is None:
                raise ValueError(_("'Redo OARs' uses the Parotid segment of the output segmentation: choose that "
                                   "segmentation as output, or untick 'Redo OARs'."))
            force = False
            if output is not None and mrml_scene.has_user_edits(output):
                if not slicer.util.confirmYesNoDisplay(
                        _("The segmentation '{name}' has segments or edits that ParotidOAR did not make. "
                          "Replace all its segments with the new result?").format(name=output.GetName()),
                        windowTitle=_("Replace edited segmentation?")):
                    self.ui.statusLabel.text = _("Not started: choose 'Create new' as output to keep the edits.")
                    return
                force = True
            request = SegmentRequest(
                volume_node=node.inputVolume, side=node.side.lower(), segmentation_node=output,
                device=node.device.lower(), model_dir=node.model or None, roi_margin_mm=node.roiMarginMm,
                show_roi=node.showRoi, force=force,
                parotid_segmentation=output if node.useEditedParotid else None)
            self.ui.statusLabel.text = _("Writing the input volume...")
            slicer.app.processEvents()
            self.segmentLogic.start(request)
            self._startTime = time.monotonic()
            self.timer.start()
            self.updateFromParameterNode(node)

    def _poll(self) -> None:
        if not self.segmentLogic.poll():
            self.timer.stop()

    def cancel(self) -> None:
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
        if self.segmentLogic.is_running:
            self.segmentLogic.cancel()
            self.segmentLogic.process.wait(timeout=10)  # fires finished (cancelled): temp files removed
