"""The Segment tab's logic without a GUI: real subprocesses, real engine CLI, real slicer-core scene.

``ParotidOARGui.Process`` and ``ParotidOARGui.SegmentLogic`` are Qt-free; the
logic takes its process runner as an argument (here the default, real one).
"""

from __future__ import annotations

import os
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "ParotidOAR"))

from ParotidOARGui.Process import ProcessRunner, parse_progress  # noqa: E402
from ParotidOARGui.Signal import Signal  # noqa: E402

from ParotidOARLib import labels, scene  # noqa: E402
from ParotidOARLib.errors import Cancelled, OutputExistsError  # noqa: E402


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except OSError:
        return True


def test_signal_and_progress_parsing():
    sig, got = Signal("a, b"), []
    sig.connect(lambda a, b: got.append((a, b)))
    sig.emit(1, "x")
    assert got == [(1, "x")] and len(sig) == 1
    sig.disconnect()
    sig.emit(2, "y")
    assert got == [(1, "x")]
    assert parse_progress("PROGRESS 42.5 stage 2") == (42.5, "stage 2")
    assert parse_progress("PROGRESS 120 write") == (100.0, "write")
    assert parse_progress("error: no parotid") is None


def test_process_progress_output_and_exit_code(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys
        print("PROGRESS 10 read", flush=True)
        print("working", flush=True)
        print("PROGRESS 60 stage 2", flush=True)
        print("error: something the user can fix", file=sys.stderr, flush=True)
        sys.exit(3)
    """))
    runner, progress, finished = ProcessRunner(), [], []
    runner.progress.connect(lambda p, s: progress.append((p, s)))
    runner.finished.connect(lambda rc, cancelled: finished.append((rc, cancelled)))
    runner.start([sys.executable, str(script)])
    assert runner.wait(timeout=60) == 3
    assert progress == [(10.0, "read"), (60.0, "stage 2")]
    assert finished == [(3, False)]
    assert "working" in runner.output
    assert runner.error_text() == "error: something the user can fix"


def test_cancel_kills_the_whole_process_tree(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("PROGRESS 5 started", flush=True)
        time.sleep(120)
    """))
    runner, finished = ProcessRunner(), []
    runner.finished.connect(lambda rc, cancelled: finished.append(cancelled))
    runner.start([sys.executable, str(script)])
    deadline = time.monotonic() + 30
    while runner.last_progress[0] < 5 and time.monotonic() < deadline:
        runner.poll()
        time.sleep(0.02)
    child_pid = int(pid_file.read_text())
    parent_pid = runner._proc.pid
    assert _alive(child_pid) and _alive(parent_pid)
    t0 = time.monotonic()
    runner.cancel()
    runner.wait(timeout=30)
    assert time.monotonic() - t0 < 10
    assert finished == [True] and runner.cancelled
    deadline = time.monotonic() + 5
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid), "the grandchild survived the cancel"
    assert not _alive(parent_pid)


def test_cancel_does_not_block_and_wait_is_a_hard_bound(tmp_path):
    """Issue 14, defect 6: a child that ignores SIGTERM, and a grandchild that escaped the process group, ignores
    SIGTERM and holds the output pipe open. cancel() must return at once (it used to block for seconds), and
    wait(timeout) must return within its bound (it used to poll forever once the deadline had passed)."""
    import signal
    import threading

    escaped_pid_file = tmp_path / "escaped.pid"
    script = tmp_path / "stubborn.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # a descendant in its own session (outside our process group), deaf to SIGTERM, holding stdout open
        code = "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
        escaped = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        open({str(escaped_pid_file)!r}, "w").write(str(escaped.pid))
        print("PROGRESS 5 started", flush=True)
        while True:
            time.sleep(0.1)
    """))
    runner = ProcessRunner(terminate_grace=1.0, drain_grace=1.0)
    finished = []
    runner.finished.connect(lambda rc, cancelled: finished.append((rc, cancelled)))
    runner.start([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 30
        while runner.last_progress[0] < 5 and time.monotonic() < deadline:
            runner.poll()
            time.sleep(0.02)
        parent_pid = runner._proc.pid
        escaped_pid = int(escaped_pid_file.read_text())

        t0 = time.monotonic()
        runner.cancel()
        assert time.monotonic() - t0 < 0.5, "cancel() blocked the caller (the GUI thread)"
        assert runner.is_running  # finished comes from a later poll

        waiter = threading.Thread(target=runner.wait, kwargs={"timeout": 1.0}, daemon=True)
        t0 = time.monotonic()
        waiter.start()
        waiter.join(20)
        assert not waiter.is_alive(), "wait(timeout) did not return: it is not a bound"
        assert time.monotonic() - t0 < 1.0 + 1.0 + 1.0 + 2.0
        assert finished == [(runner.returncode, True)] and runner.cancelled
        try:
            import psutil  # noqa: F401  (distributed, installed for the tests, brings it)
        except ImportError:  # os.killpg cannot reach the escaped session: the run is abandoned within bound
            assert runner.abandoned
        else:  # psutil finds the escaped descendant as well: it is killed and the pipe closes
            assert not runner.abandoned
            deadline = time.monotonic() + 5
            while _alive(escaped_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(escaped_pid), "psutil found the escaped grandchild but it survived"
        deadline = time.monotonic() + 5
        while _alive(parent_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(parent_pid), "the SIGTERM-deaf child was not killed"
    finally:
        if escaped_pid_file.exists():
            try:
                os.kill(int(escaped_pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_wait_timeout_kills_a_child_that_ignores_sigterm(tmp_path):
    """The batch's --timeout and Slicer's exit rely on wait(timeout): a SIGTERM-deaf child is killed in bound."""
    script = tmp_path / "deaf.py"
    script.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "print('PROGRESS 1 x', flush=True)\ntime.sleep(120)\n")
    runner = ProcessRunner(terminate_grace=1.0, drain_grace=1.0)
    runner.start([sys.executable, str(script)])
    t0 = time.monotonic()
    runner.wait(timeout=1.0)
    assert time.monotonic() - t0 < 6.0
    assert runner.cancelled and not runner.is_running and runner.returncode is not None
    assert not _alive(runner._proc.pid)


# ---------------------------------------------------------------------------- SegmentLogic end to end
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from bundle_utils import make_tiny_bundle

    root = tmp_path_factory.mktemp("bundles")
    fast = make_tiny_bundle(root / "tiny", stage1_bias=1.0, stage1_spacing=(6.0, 6.0, 6.0),
                            stage2_spacing=(4.0, 4.0, 4.0))
    empty = make_tiny_bundle(root / "empty-parotid", stage1_bias=-50.0, stage1_spacing=(6.0, 6.0, 6.0),
                             stage2_spacing=(4.0, 4.0, 4.0))
    return {"fast": fast, "empty": empty}


@pytest.fixture()
def oblique_volume(mrml):
    from bundle_utils import rotation_direction, synthetic_ct

    ct, geometry = synthetic_ct(size=(48, 48, 16), spacing=(3.0, 3.0, 4.0), semi_axes_mm=(60, 65),
                                direction=rotation_direction(15.0))
    return scene.add_volume(mrml.scene, ct, geometry, "oblique CT"), geometry


def _segmentation_nodes(mrml_scene) -> int:
    return mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")


def test_segment_logic_runs_the_cli_and_loads_the_result(mrml, bundles, oblique_volume):
    from ParotidOARGui.SegmentLogic import SegmentLogic, SegmentRequest

    volume, geometry = oblique_volume
    logic = SegmentLogic(mrml.scene)  # the default, real process runner
    steps = []
    logic.progress.connect(lambda pct, step: steps.append((pct, step)))
    node = logic.run(SegmentRequest(volume, side="Left", device="CPU", model_dir=str(bundles["fast"])), timeout=300)
    assert node is not None and logic.error is None
    names = [node.GetSegmentation().GetNthSegment(i).GetName() for i in range(node.GetSegmentation().GetNumberOfSegments())]
    assert names == list(labels.STRUCTURES) + [labels.ROI]
    # progress went up to 100 through the engine's steps
    assert steps[0] == (0.0, "Starting") and steps[-1] == (100.0, "Done")
    assert {"stage1", "stage2"} <= {s for _p, s in steps}
    pcts = [p for p, _s in steps]
    assert pcts == sorted(pcts)
    # result on the oblique input grid, crop box, summary
    masks = scene.segment_arrays(node, volume)
    assert masks[labels.PAROTID].shape == geometry.shape and masks[labels.PAROTID].any()
    report = scene.report_of(node)
    assert report["volumes_cc"][labels.PAROTID] == pytest.approx(
        masks[labels.PAROTID].sum() * geometry.voxel_volume_cc, rel=1e-3)
    assert node.GetNodeReference(scene.CROP_BOX_ROLE) is not None
    rows = dict(scene.summary_rows(report))
    assert rows["Device"] == "cpu" and "Time: stage1" in rows and "Volume: Parotid" in rows
    assert logic._tmp is None  # temp folder removed

    # the node now belongs to ParotidOAR: a re-run into it is allowed; after a user edit it is refused
    node.GetSegmentation().AddEmptySegment("user", "my structure")
    with pytest.raises(OutputExistsError):
        logic.run(SegmentRequest(volume, side="left", segmentation_node=node, model_dir=str(bundles["fast"])))
    assert not logic.is_running


def test_segment_logic_failure_leaves_scene_unchanged(mrml, bundles, oblique_volume):
    from ParotidOARGui.SegmentLogic import SegmentationFailed, SegmentLogic, SegmentRequest

    volume, _geometry = oblique_volume
    before = _segmentation_nodes(mrml.scene)
    logic = SegmentLogic(mrml.scene)
    finished = []
    logic.finished.connect(lambda node, error: finished.append((node, error)))
    with pytest.raises(SegmentationFailed, match="(?i)parotid"):
        logic.run(SegmentRequest(volume, side="right", model_dir=str(bundles["empty"])), timeout=300)
    assert finished and finished[0][0] is None and finished[0][1].startswith("error:")
    assert _segmentation_nodes(mrml.scene) == before
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == 0


def test_segment_logic_cancel(mrml, bundles, oblique_volume):
    from ParotidOARGui.SegmentLogic import SegmentLogic, SegmentRequest

    volume, _geometry = oblique_volume
    before = _segmentation_nodes(mrml.scene)
    logic = SegmentLogic(mrml.scene)
    logic.progress.connect(lambda pct, step: logic.cancel() if step == "read" else None)
    with pytest.raises(Cancelled):
        logic.run(SegmentRequest(volume, side="left", model_dir=str(bundles["fast"])), timeout=300)
    assert "cancelled" in logic.error
    assert _segmentation_nodes(mrml.scene) == before
    assert logic._tmp is None


def test_request_validation(mrml, oblique_volume):
    from ParotidOARGui.SegmentLogic import SegmentLogic, SegmentRequest
    from ParotidOARLib.errors import InputError

    volume, _geometry = oblique_volume
    logic = SegmentLogic(mrml.scene)
    for bad in (dict(side="up"), dict(device="tpu"), dict(roi_margin_mm=0)):
        with pytest.raises(InputError):
            logic.start(SegmentRequest(volume, **{"side": "left", **bad}))
    empty_volume = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(InputError, match="image data"):
        logic.start(SegmentRequest(empty_volume, side="left"))
    cmd = logic.build_command("in.nrrd", "out.seg.nrrd", "r.json",
                              SegmentRequest(volume, side="right", device="gpu", model_dir="/m", roi_margin_mm=12.5))
    assert cmd[1:5] == ["-m", "ParotidOARLib", "segment", "in.nrrd"]
    assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--model") + 1] == "/m"
    assert cmd[cmd.index("--roi-margin-mm") + 1] == "12.5" and cmd[-1] == "--progress-lines"
    assert np.isfinite(float(cmd[cmd.index("--roi-margin-mm") + 1]))


def test_segment_logic_redoes_the_oars_from_a_corrected_parotid(mrml, bundles, oblique_volume, tmp_path):
    """'Redo OARs': the Parotid segment of a segmentation node replaces stage 1 (passed as `--parotid`)."""
    import slicer

    from ParotidOARGui.SegmentLogic import SegmentLogic, SegmentRequest
    from ParotidOARLib import segio
    from ParotidOARLib.errors import InputError

    volume, geometry = oblique_volume
    idx = np.argwhere(np.ones(geometry.shape, bool))[:, ::-1]
    lps = geometry.index_to_lps(idx).reshape(*geometry.shape, 3)
    centre = geometry.index_to_lps(np.array(geometry.size) / 2.0 - 0.5)
    blob = np.linalg.norm(lps - (centre + np.array([30.0, 0.0, 0.0])), axis=-1) <= 15.0
    assert blob.sum() > 30
    seg_path = segio.write_seg(tmp_path / "corrected.seg.nrrd", {labels.PAROTID: blob}, geometry, side="left")
    corrected = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "corrected")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(seg_path))
    assert storage.ReadData(corrected)

    logic = SegmentLogic(mrml.scene)
    node = logic.run(SegmentRequest(volume, side="left", model_dir=str(bundles["fast"]),
                                    parotid_segmentation=corrected), timeout=300)
    masks = scene.segment_arrays(node, volume)
    assert np.array_equal(masks[labels.PAROTID], blob)  # the corrected parotid, not stage 1's
    assert scene.report_of(node)["parotid_source"].startswith("given (")
    assert dict(scene.summary_rows(scene.report_of(node)))["Parotid"] == "given contour (stage 1 skipped)"
    assert logic._tmp is None

    # a node without a Parotid segment: refused before any process starts, scene unchanged
    other = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no parotid")
    other.GetSegmentation().AddEmptySegment("x", "Skin")
    before = _segmentation_nodes(mrml.scene)
    with pytest.raises(InputError, match="no segment.* named 'Parotid'"):
        logic.start(SegmentRequest(volume, side="left", model_dir=str(bundles["fast"]), parotid_segmentation=other))
    assert not logic.is_running and logic._tmp is None and _segmentation_nodes(mrml.scene) == before


def test_new_input_volume_never_overwrites_the_previous_result(mrml, bundles, oblique_volume, tmp_path):
    """Issue 14, defect 8: the output node of the last patient stays selected when a new CT is chosen. A run for
    the new CT must create a new node, leaving the previous result (segments, name, place, hash) untouched."""
    from bundle_utils import synthetic_ct

    from ParotidOARGui.SegmentLogic import SegmentLogic, SegmentRequest
    from ParotidOARLib import segio

    volume_b, _geometry_b = oblique_volume
    ct_a, geometry_a = synthetic_ct(size=(40, 40, 12), spacing=(3.0, 3.0, 4.0), semi_axes_mm=(50, 55))
    volume_a = scene.add_volume(mrml.scene, ct_a, geometry_a, "patient A CT")
    mask = np.zeros(geometry_a.shape, bool)
    mask[4:8, 10:20, 10:20] = True
    seg_path = segio.write_seg(tmp_path / "a.seg.nrrd", {labels.PAROTID: mask}, geometry_a, side="left")
    previous = scene.load_result(mrml.scene, seg_path, volume_a, side="left", closed_surface=False)
    assert scene.input_volume_of(previous) is volume_a
    before = (previous.GetName(), scene.segment_content_hash(previous), previous.GetAttribute(scene.ATTR_HASH),
              previous.GetSegmentation().GetNumberOfSegments())

    logic = SegmentLogic(mrml.scene)
    node = logic.run(SegmentRequest(volume_b, side="left", segmentation_node=previous,
                                    model_dir=str(bundles["fast"])), timeout=300)
    assert node is not None and node is not previous
    assert node.GetName() == "oblique CT OARs" and scene.input_volume_of(node) is volume_b
    assert (previous.GetName(), scene.segment_content_hash(previous), previous.GetAttribute(scene.ATTR_HASH),
            previous.GetSegmentation().GetNumberOfSegments()) == before
    assert scene.input_volume_of(previous) is volume_a

    # the same CT again: its own result node is reused (no pile of nodes)
    again = logic.run(SegmentRequest(volume_b, side="left", segmentation_node=node, model_dir=str(bundles["fast"])),
                      timeout=300)
    assert again is node
    assert not scene.made_for_other_volume(node, volume_b) and scene.made_for_other_volume(previous, volume_b)


def test_redo_oars_from_another_cts_result_is_refused(mrml, oblique_volume, tmp_path):
    """'Redo OARs' with the previous patient's segmentation as output: refused before any work (no process)."""
    from bundle_utils import synthetic_ct

    from ParotidOARGui.SegmentLogic import SegmentLogic, SegmentRequest
    from ParotidOARLib import segio
    from ParotidOARLib.errors import InputError

    volume_b, _geometry_b = oblique_volume
    ct_a, geometry_a = synthetic_ct(size=(32, 32, 8), spacing=(3.0, 3.0, 4.0), semi_axes_mm=(40, 45))
    volume_a = scene.add_volume(mrml.scene, ct_a, geometry_a, "patient A CT")
    mask = np.zeros(geometry_a.shape, bool)
    mask[2:6, 10:20, 10:20] = True
    previous = scene.load_result(mrml.scene, segio.write_seg(tmp_path / "a.seg.nrrd", {labels.PAROTID: mask},
                                                             geometry_a, side="left"),
                                 volume_a, side="left", closed_surface=False)
    logic = SegmentLogic(mrml.scene)
    with pytest.raises(InputError, match="another CT"):
        logic.start(SegmentRequest(volume_b, side="left", segmentation_node=previous, parotid_segmentation=previous))
    assert not logic.is_running and logic._tmp is None
    # the CT of a result removed from the scene: the result still counts as another CT's
    mrml.scene.RemoveNode(volume_a)
    assert scene.input_volume_of(previous) is None and scene.made_for_other_volume(previous, volume_b)
