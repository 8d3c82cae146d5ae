"""The Review tab: 0–3 clinical scoring per segment (open or blinded), metrics against a reference, dose.

Built programmatically (qt/ctk/slicer). All logic lives in the engine:
``ParotidOARLib.review`` (records, append-only log, blinded assignment,
summaries, table nodes), ``ParotidOARLib.metrics`` and ``ParotidOARLib.dose``;
MRML → numpy goes through ``ParotidOARLib.scene``. This file only wires widgets.

Usage (from ParotidOAR.py)::

    ReviewTab(parent, scene_or_logic=None)

``parent`` is a ``QWidget`` (its layout is used, a ``QVBoxLayout`` is created if
it has none) or a ``QLayout``. ``scene_or_logic`` is a ``vtkMRMLScene``, or a
module logic object (its optional ``modelId()``/``model_id`` names the model in
records), or None (``slicer.mrmlScene``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import ctk
import qt
import slicer

from ParotidOARLib import review

SETTINGS_REVIEWER = "ParotidOAR/ReviewerName"
SETTINGS_LOG_FOLDER = "ParotidOAR/ReviewLogFolder"
SETTINGS_BLINDED_FILE = "ParotidOAR/BlindedAssignmentFile"


def _tr(text):
    try:
        from slicer.i18n import tr

        return tr(text)
    except ImportError:  # older Slicer
        return text


def _case_id_of(volume_node, segmentation_node) -> str:
    """DICOM PatientID/StudyInstanceUID of the CT when loaded from DICOM, else the volume (or segmentation) name."""
    meta = {}
    if volume_node is not None:
        uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
        db = getattr(slicer, "dicomDatabase", None)
        if uids and db is not None:
            try:
                meta = {"PatientID": db.instanceValue(uids[0], "0010,0020"),
                        "StudyInstanceUID": db.instanceValue(uids[0], "0020,000D")}
            except Exception:  # a database without these tags: fall back to the name
                meta = {}
    name = volume_node.GetName() if volume_node is not None else segmentation_node.GetName()
    return review.case_id_from(meta, name)


class _SegmentRow:
    """Widgets for one segment: score radio buttons 0–3, comment, jump button."""

    def __init__(self, grid, row, name, segment_id, on_jump):
        self.name = name
        self.segment_id = segment_id
        self.label = qt.QLabel(name)
        grid.addWidget(self.label, row, 0)
        self.group = qt.QButtonGroup()
        self.buttons = []
        for score in sorted(review.SCORE_DEFINITIONS):
            b = qt.QRadioButton(str(score))
            b.setToolTip(f"{score}: {review.SCORE_DEFINITIONS[score]}")
            self.group.addButton(b, score)
            grid.addWidget(b, row, 1 + score)
            self.buttons.append(b)
        self.comment = qt.QLineEdit()
        self.comment.setPlaceholderText(_tr("optional comment"))
        grid.addWidget(self.comment, row, 5)
        self.jump = qt.QPushButton(_tr("Jump"))
        self.jump.setToolTip(_tr("Centre the slice views on this segment"))
        self.jump.clicked.connect(lambda: on_jump(self.segment_id))
        grid.addWidget(self.jump, row, 6)

    def score(self):
        s = self.group.checkedId()
        return None if s < 0 else int(s)

    def widgets(self):
        return [self.label, *self.buttons, self.comment, self.jump]


class ReviewTab:
    def __init__(self, parent, scene_or_logic=None):
        if isinstance(parent, qt.QLayout):
            self.layout = parent
        else:
            self.layout = parent.layout()
            if self.layout is None:
                self.layout = qt.QVBoxLayout(parent)
        if scene_or_logic is None or isinstance(scene_or_logic, slicer.vtkMRMLScene):
            self.scene = scene_or_logic or slicer.mrmlScene
            self.logic = None
        else:
            self.logic = scene_or_logic
            self.scene = slicer.mrmlScene
        self.rows: list[_SegmentRow] = []
        self.assignment = None  # review.BlindedAssignment in blinded mode
        self.settings = qt.QSettings()
        self._build()

    # ------------------------------------------------------------------ UI
    def _node_combo(self, class_names, none_enabled=False, tooltip=""):
        combo = slicer.qMRMLNodeComboBox()
        combo.nodeTypes = class_names
        combo.selectNodeUponCreation = False
        combo.addEnabled = False
        combo.removeEnabled = False
        combo.noneEnabled = none_enabled
        combo.showHidden = False
        combo.setMRMLScene(self.scene)
        combo.setToolTip(tooltip)
        return combo

    def _build(self):
        # --- what to review
        box = ctk.ctkCollapsibleButton()
        box.text = _tr("Clinical review (0-3)")
        form = qt.QFormLayout(box)
        self.volumeSelector = self._node_combo(["vtkMRMLScalarVolumeNode"], True,
                                               _tr("The CT: case id and common grid for metrics and dose"))
        form.addRow(_tr("CT volume:"), self.volumeSelector)
        self.segmentationSelector = self._node_combo(["vtkMRMLSegmentationNode"], False,
                                                     _tr("The segmentation to score"))
        form.addRow(_tr("Segmentation:"), self.segmentationSelector)
        self.blindedCheck = qt.QCheckBox(_tr("Blinded: compare two segmentations as Set A / Set B"))
        form.addRow(self.blindedCheck)
        self.secondSelector = self._node_combo(["vtkMRMLSegmentationNode"], True,
                                               _tr("The other segmentation of the same CT (e.g. manual)"))
        self.sourceA = qt.QLineEdit("automatic")
        self.sourceB = qt.QLineEdit("manual")
        self.setCombo = qt.QComboBox()
        self.setCombo.addItems(list(review.SET_LABELS))
        self.blindedWidgets = [self.secondSelector, self.sourceA, self.sourceB, self.setCombo]
        form.addRow(_tr("Second segmentation:"), self.secondSelector)
        form.addRow(_tr("Source labels (first, second):"), self._hbox(self.sourceA, self.sourceB))
        form.addRow(_tr("Showing:"), self.setCombo)
        self.reviewerEdit = qt.QLineEdit(self.settings.value(SETTINGS_REVIEWER, ""))
        self.reviewerEdit.setPlaceholderText(_tr("your name or initials (remembered)"))
        form.addRow(_tr("Reviewer:"), self.reviewerEdit)
        self.logFolderEdit = ctk.ctkPathLineEdit()
        self.logFolderEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.logFolderEdit.currentPath = self.settings.value(SETTINGS_LOG_FOLDER, "")
        self.logFolderEdit.setToolTip(_tr("Folder of the append-only review log (review-log.csv / .jsonl)"))
        form.addRow(_tr("Review log folder:"), self.logFolderEdit)
        self.loadButton = qt.QPushButton(_tr("Show segments"))
        form.addRow(self.loadButton)

        legend = qt.QLabel("<br>".join(f"<b>{k}</b>: {v}" for k, v in review.SCORE_DEFINITIONS.items())
                           + f"<br>Acceptable: score ≥ {review.ACCEPTABLE_MIN_SCORE}")
        legend.wordWrap = True
        form.addRow(legend)
        self.scoreBox = qt.QWidget()
        self.scoreGrid = qt.QGridLayout(self.scoreBox)
        form.addRow(self.scoreBox)
        self.saveButton = qt.QPushButton(_tr("Save review"))
        self.saveButton.toolTip = _tr("Append the scores to the scene table and the review log")
        form.addRow(self.saveButton)
        self.summaryLabel = qt.QLabel("")
        self.summaryLabel.wordWrap = True
        self.summaryLabel.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)
        form.addRow(self.summaryLabel)
        self.layout.addWidget(box)

        # --- metrics and dose
        mbox = ctk.ctkCollapsibleButton()
        mbox.text = _tr("Comparison with a reference")
        mform = qt.QFormLayout(mbox)
        self.referenceSelector = self._node_combo(["vtkMRMLSegmentationNode"], True,
                                                  _tr("Reference (expert) segmentation"))
        mform.addRow(_tr("Reference:"), self.referenceSelector)
        self.doseSelector = self._node_combo(["vtkMRMLScalarVolumeNode"], True,
                                             _tr("Optional dose volume in Gy (any grid)"))
        mform.addRow(_tr("Dose (Gy):"), self.doseSelector)
        self.metricsButton = qt.QPushButton(_tr("Compute metrics"))
        self.exportButton = qt.QPushButton(_tr("Export metrics CSV..."))
        mform.addRow(self._hbox(self.metricsButton, self.exportButton))
        self.metricsView = slicer.qMRMLTableView()
        self.metricsView.setMRMLScene(self.scene)
        self.metricsView.setMinimumHeight(150)
        mform.addRow(self.metricsView)
        self.layout.addWidget(mbox)
        self.layout.addStretch(1)

        self.blindedCheck.toggled.connect(self._updateBlinded)
        self.setCombo.currentIndexChanged.connect(lambda _i: self._showSet())
        self.loadButton.clicked.connect(self.onShowSegments)
        self.saveButton.clicked.connect(self.onSave)
        self.metricsButton.clicked.connect(self.onComputeMetrics)
        self.exportButton.clicked.connect(self.onExportMetrics)
        self.reviewerEdit.editingFinished.connect(
            lambda: self.settings.setValue(SETTINGS_REVIEWER, self.reviewerEdit.text.strip()))
        self._updateBlinded(False)

    @staticmethod
    def _hbox(*widgets):
        w = qt.QWidget()
        h = qt.QHBoxLayout(w)
        h.setContentsMargins(0, 0, 0, 0)
        for x in widgets:
            h.addWidget(x)
        return w

    def _updateBlinded(self, blinded):
        for w in self.blindedWidgets:
            w.setEnabled(bool(blinded))
        self.assignment = None

    # ------------------------------------------------------------------ helpers
    def _modelId(self, segmentation_node) -> str:
        report_model = ""
        try:
            from ParotidOARLib import scene as mrml_scene

            rep = mrml_scene.report_of(segmentation_node) or {}
            model = rep.get("model") or {}
            report_model = model.get("name", "") + (f" {model.get('version')}" if model.get("version") else "") \
                if isinstance(model, dict) else str(model)
        except Exception:  # segmentations not made by ParotidOAR have no report
            report_model = ""
        if report_model:
            return report_model.strip()
        for attr in ("modelId", "model_id"):
            value = getattr(self.logic, attr, None) if self.logic is not None else None
            if callable(value):
                value = value()
            if value:
                return str(value)
        return ""

    def _caseId(self):
        return _case_id_of(self.volumeSelector.currentNode(), self.segmentationSelector.currentNode())

    def _currentSegmentation(self):
        """The node being scored (in blinded mode: the one behind the chosen set)."""
        if not self.blindedCheck.checked:
            return self.segmentationSelector.currentNode()
        if self.assignment is None:
            return None
        name = self.assignment.segmentation_for(self.setCombo.currentText)
        return self.scene.GetFirstNodeByName(name)

    def _error(self, text):
        slicer.util.errorDisplay(text, windowTitle="ParotidOAR")

    # ------------------------------------------------------------------ actions
    def onShowSegments(self):
        first = self.segmentationSelector.currentNode()
        if first is None:
            self._error(_tr("Pick the segmentation to review."))
            return
        try:
            if self.blindedCheck.checked:
                second = self.secondSelector.currentNode()
                if second is None or second is first:
                    self._error(_tr("Blinded mode needs a second, different segmentation of the same CT."))
                    return
                folder = self._logFolder()
                if folder is None:
                    return
                self.assignment = review.assign_blinded(
                    self._caseId(), {self.sourceA.text.strip() or "first": first.GetName(),
                                     self.sourceB.text.strip() or "second": second.GetName()},
                    assignment_file=Path(folder) / "blinded-assignment.json")
                self._showSet()
            else:
                self._buildRows(first)
        except review.ReviewError as exc:
            self._error(str(exc))

    def _showSet(self):
        """Blinded: show only the chosen set, hide both nodes' names."""
        if self.assignment is None:
            return
        node = self._currentSegmentation()
        for label in review.SET_LABELS:
            other = self.scene.GetFirstNodeByName(self.assignment.segmentation_for(label))
            if other is not None and other.GetDisplayNode() is not None:
                other.GetDisplayNode().SetVisibility(other is node)
        if node is not None:
            self._buildRows(node)

    def _buildRows(self, segmentation_node):
        for row in self.rows:
            for w in row.widgets():
                self.scoreGrid.removeWidget(w)
                w.deleteLater()
        self.rows = []
        seg = segmentation_node.GetSegmentation()
        header = [_tr("Segment"), "0", "1", "2", "3", _tr("Comment"), ""]
        for c, text in enumerate(header):
            if self.scoreGrid.itemAtPosition(0, c) is None:
                self.scoreGrid.addWidget(qt.QLabel(f"<b>{text}</b>"), 0, c)
        for i in range(seg.GetNumberOfSegments()):
            segment_id = seg.GetNthSegmentID(i)
            name = seg.GetSegment(segment_id).GetName()
            if name.startswith("ROI (parotid +"):
                continue  # the ROI is a control structure, not an OAR to score
            self.rows.append(_SegmentRow(self.scoreGrid, len(self.rows) + 1, name, segment_id, self.onJump))
        self._updateSummary()

    def onJump(self, segment_id):
        node = self._currentSegmentation()
        if node is None:
            return
        center = node.GetSegmentCenterRAS(segment_id)
        if center is None:
            return
        slicer.modules.markups.logic().JumpSlicesToLocation(center[0], center[1], center[2], True)

    def _logFolder(self):
        folder = self.logFolderEdit.currentPath.strip()
        if not folder:
            self._error(_tr("Pick a folder for the review log."))
            return None
        self.settings.setValue(SETTINGS_LOG_FOLDER, folder)
        return folder

    def onSave(self):
        node = self._currentSegmentation()
        reviewer = self.reviewerEdit.text.strip()
        if node is None or not self.rows:
            self._error(_tr("Click 'Show segments' and score them first."))
            return
        if not reviewer:
            self._error(_tr("Enter your reviewer name."))
            return
        self.settings.setValue(SETTINGS_REVIEWER, reviewer)
        folder = self._logFolder()
        if folder is None:
            return
        scores = {r.name: r.score() for r in self.rows}
        comments = {r.name: r.comment.text for r in self.rows}
        blinded = self.blindedCheck.checked and self.assignment is not None
        try:
            if blinded:
                label = self.setCombo.currentText
                missing = [n for n, s in scores.items() if s is None]
                records = [self.assignment.record(label, n, s, reviewer, comments.get(n, ""), self._modelId(node))
                           for n, s in scores.items() if s is not None]
            else:
                records, missing = review.build_records(self._caseId(), node.GetName(), scores, reviewer,
                                                        comments, model=self._modelId(node), mode="open",
                                                        source=node.GetName(), segments=[r.name for r in self.rows])
            if not records:
                self._error(_tr("No segment has a score yet."))
                return
            if missing and not slicer.util.confirmYesNoDisplay(
                    _tr("These segments have no score:") + "\n" + "\n".join(missing) + "\n\n"
                    + _tr("Save the incomplete review anyway?"), windowTitle="ParotidOAR"):
                return
            log = review.ReviewLog(folder)
            if blinded:
                self.assignment.submit(log, records)
            else:
                log.append(records)
            table = self.scene.GetFirstNodeByName(review.TABLE_NODE_NAME)
            review.records_to_table_node(self.scene, records, table_node=table)
        except review.ReviewError as exc:
            self._error(str(exc))
            return
        except OSError as exc:
            self._error(_tr("Cannot write the review log: ") + str(exc))
            return
        text = _tr("Saved {n} score(s) to {folder}.").format(n=len(records), folder=folder)
        if blinded:
            revealed = self.assignment.reveal()
            text += " " + ", ".join(f"{k} = {v}" for k, v in revealed.items())
        slicer.util.showStatusMessage(text, 5000)
        self._updateSummary(extra=text)

    def _updateSummary(self, extra=""):
        table = self.scene.GetFirstNodeByName(review.TABLE_NODE_NAME)
        lines = [extra] if extra else []
        if table is not None:
            try:
                records = review.table_node_to_records(table)
                s = review.summarise(records, case_id=self._caseId())
                for name, st in s["segments"].items():
                    lines.append(f"{name}: mean {st['mean_score']:.2f}, {st['acceptable_pct']:.0f}% acceptable "
                                 f"(n={st['n']})")
            except review.ReviewError as exc:
                lines.append(str(exc))
        self.summaryLabel.text = "\n".join(lines) if lines else _tr("No scores for this case yet.")

    def onComputeMetrics(self):
        from ParotidOARLib import dose, metrics
        from ParotidOARLib import scene as mrml_scene

        pred = self.segmentationSelector.currentNode()
        ref = self.referenceSelector.currentNode()
        volume = self.volumeSelector.currentNode()
        if pred is None or ref is None or volume is None:
            self._error(_tr("Pick the CT volume, the segmentation and the reference segmentation."))
            return
        try:
            with slicer.util.tryWithErrorDisplay(_tr("Metrics failed."), waitCursor=True):
                geometry = mrml_scene.volume_geometry(volume)
                pred_masks = mrml_scene.segment_arrays(pred, volume)
                ref_masks = mrml_scene.segment_arrays(ref, volume)
                result = metrics.compare_segmentations(pred_masks, ref_masks, geometry)
                table = self.scene.GetFirstNodeByName(review.METRICS_TABLE_NODE_NAME)
                table = review.metrics_to_table_node(self.scene, result, table_node=table)
                self.metricsView.setMRMLTableNode(table)
                dose_node = self.doseSelector.currentNode()
                if dose_node is not None:
                    import numpy as np

                    dose_result = dose.compare_dose(slicer.util.arrayFromVolume(dose_node).astype(np.float32),
                                                    mrml_scene.volume_geometry(dose_node), geometry,
                                                    pred_masks, ref_masks, names=list(result["segments"]))
                    dose_table = self.scene.GetFirstNodeByName("ParotidOAR dose")
                    review.rows_to_table_node(self.scene, dose.dose_rows(dose_result), name="ParotidOAR dose",
                                              table_node=dose_table)
                for note in result["notes"]:
                    logging.info(f"ParotidOAR metrics: {note}")
        except Exception as exc:  # already shown by tryWithErrorDisplay
            logging.error(f"ParotidOAR metrics: {exc}")

    def onExportMetrics(self):
        table = self.scene.GetFirstNodeByName(review.METRICS_TABLE_NODE_NAME)
        if table is None:
            self._error(_tr("Compute the metrics first."))
            return
        path = qt.QFileDialog.getSaveFileName(None, _tr("Export metrics"), "metrics.csv", "CSV (*.csv)")
        if not path:
            return
        storage = self.scene.AddNewNodeByClass("vtkMRMLTableStorageNode")
        try:
            storage.SetFileName(path)
            if not storage.WriteData(table):
                self._error(_tr("Could not write ") + path)
        finally:
            self.scene.RemoveNode(storage)

    def cleanup(self):
        self.rows = []
