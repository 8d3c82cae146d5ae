"""Output safety (issue #15 faults 1 and 3): nothing a user has is replaced without --force, even a file
that appears while a run is writing; every output is checked writable before any work, and an unwritable
one is a one-line error; temporary files have one plain name and a killed run's are cleaned up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bundle_utils import synthetic_ct
from conftest import REPO
from ParotidOARLib import cascade, imageio, metrics, segio
from ParotidOARLib.__main__ import main
from ParotidOARLib.errors import OutputError, OutputExistsError
from ParotidOARLib.imageio import Geometry, write_image


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    d = tmp_path_factory.mktemp("ct")
    ct, g = synthetic_ct(size=(64, 60, 24), spacing=(3.0, 3.0, 4.0))
    return write_image(d / "ct.nrrd", ct, g)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


# --------------------------------------------------------------------------- fault 1: no overwrite without --force
@pytest.mark.parametrize("appears", ["seg", "report"])
def test_a_file_that_appears_during_the_run_is_not_replaced(small_ct, tiny_bundle, tmp_path, appears):
    out, rep = tmp_path / "x.seg.nrrd", tmp_path / "x.json"
    target = out if appears == "seg" else rep

    def progress(pct, step):  # the user saves a file under the output's name while stage 2 runs
        if step == "stage2" and not target.exists():
            target.write_text("the user's file")

    opts = cascade.SegmentOptions(side="left", model_dir=tiny_bundle, device="cpu")
    with pytest.raises(OutputExistsError, match="appeared while this run was writing it"):
        cascade.segment(small_ct, out, opts, progress=progress, report_path=rep, warn=False)
    assert target.read_text() == "the user's file"
    # all or nothing: the other output was not left behind either, and no temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_force_still_replaces(small_ct, tiny_bundle, tmp_path):
    out = tmp_path / "x.seg.nrrd"
    out.write_text("old")
    opts = cascade.SegmentOptions(side="left", model_dir=tiny_bundle, device="cpu", force=True)
    cascade.segment(small_ct, out, opts, warn=False)
    assert segio.read_seg(out)[0]


def test_publish_never_replaces_without_force(tmp_path):
    final = tmp_path / "a.json"
    with pytest.raises(OutputExistsError):
        with imageio.atomic_file(final, force=False) as tmp:
            tmp.write_text("new")
            final.write_text("theirs")  # appears between the start and the end of the write
    assert final.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with imageio.atomic_file(final, force=True) as tmp:
        tmp.write_text("new")
    assert final.read_text() == "new"
    # the metrics writers go through the same path
    final.unlink()
    metrics.write_json(final, {"a": 1})
    with pytest.raises(OutputExistsError):
        metrics.write_json(final, {"a": 2})
    assert json.loads(final.read_text()) == {"a": 1}


# --------------------------------------------------------------------------- fault 3: unwritable outputs
def test_unwritable_outputs_fail_before_any_work(small_ct, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    missing_model = tmp_path / "no-such-bundle"  # the model would fail later: the output error comes first
    bad_outputs = [(a_file / "x.seg.nrrd", "is a file, not a folder"),
                   ("/proc/parotidoar-test.seg.nrrd", "Cannot write"),
                   (tmp_path, "is a folder")]
    for out, message in bad_outputs:
        rc = main(["segment", str(small_ct), "--side", "left", "--out", str(out), "--model", str(missing_model)])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    ok = tmp_path / "ok.seg.nrrd"
    for report in (a_file / "r.json", "/sys/parotidoar-test.json"):
        rc = main(["segment", str(small_ct), "--side", "left", "--out", str(ok), "--report", str(report),
                   "--model", str(missing_model)])
        err = capsys.readouterr().err
        assert rc == 2 and "Cannot write" in err and len(err.strip().splitlines()) == 1, err
    rc = main(["segment", str(small_ct), "--side", "left", "--out", str(ok), "--report", str(ok),
               "--model", str(missing_model)])
    assert rc == 2 and "same file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_unwritable_outputs_of_the_other_commands(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    g = Geometry((20, 20, 10), (1.0, 1.0, 2.0))
    m = np.zeros(g.shape, np.uint8)
    m[2:6, 5:10, 5:10] = 1
    mask = write_image(tmp_path / "m.nrrd", m, g)
    log = tmp_path / "log.csv"
    log.write_text("")
    commands = [
        ["evaluate", "--pred", str(mask), "--ref", str(mask), "--json", str(a_file / "m.json")],
        ["evaluate", "--pred", str(mask), "--ref", str(mask), "--json", "/proc/parotidoar-test.json"],
        ["review-report", str(log), "--json", str(a_file / "s.json")],
        ["export-rtstruct", "--seg", str(tmp_path / "none.seg.nrrd"), "--dicom", str(tmp_path),
         "--out", str(a_file / "rs.dcm")],
        ["batch", "--input", str(tmp_path), "--out", str(a_file), "--side", "left"],
        ["batch", "--input", str(tmp_path), "--out", str(a_file / "sub"), "--side", "left"],
    ]
    for argv in commands:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, (argv, err)
        assert "a_file" in err or "/proc" in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "log.csv", "m.nrrd"]


def test_one_plain_temporary_name_and_stale_ones_cleaned(small_ct, tiny_bundle, tmp_path, monkeypatch):
    import slicerio

    written = []
    real = slicerio.write_segmentation

    def spy(path, *a, **k):
        written.append(os.path.basename(path))
        return real(path, *a, **k)

    monkeypatch.setattr(slicerio, "write_segmentation", spy)
    out = tmp_path / "x.seg.nrrd"
    dead = tmp_path / f".x.seg.nrrd.part-{_dead_pid()}"  # left by a killed run
    dead.write_text("half")
    alive = tmp_path / f".x.seg.nrrd.part-{os.getppid()}"  # a running process's: never touched
    alive.write_text("busy")
    cascade.segment(small_ct, out, cascade.SegmentOptions(side="left", model_dir=tiny_bundle, device="cpu"),
                    warn=False)
    assert written == [f".x.seg.nrrd.part-{os.getpid()}"]
    assert not dead.exists() and alive.read_text() == "busy"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "x.seg.nrrd"])


def test_a_full_disk_is_one_line_and_leaves_nothing(small_ct, tiny_bundle, tmp_path):
    """A write that fails half-way (here: a 1000-byte file size limit, EFBIG, as a full disk gives ENOSPC) is a
    one-line error, not a traceback, and leaves no output and no temporary file."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    out = tmp_path / "o.seg.nrrd"
    p = subprocess.run([sys.executable, "-m", "ParotidOARLib", "segment", str(small_ct), "--side", "left", "--out",
                        str(out), "--report", str(tmp_path / "r.json"), "--model", str(tiny_bundle), "--device",
                        "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and f"error: Cannot write {out}: File too large" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []
