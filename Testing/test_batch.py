"""``python -m ParotidOARLib batch``: real cascade (tiny random-weight bundle), small phantoms, a corrupt file."""

from __future__ import annotations

import csv
import json

import pytest

from ParotidOARLib import batch, labels, phantom, segio
from ParotidOARLib.__main__ import main
from ParotidOARLib.errors import InputError

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def batch_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-in")
    for seed, side in ((1, "left"), (2, "right")):
        case = phantom.generate_case(seed, side=side, size="small", spacing=(2.0, 2.0, 4.0))
        phantom.write_case(case, root / f"phantom-{seed}")
    (root / "broken.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10\n\nnot an image")
    (root / "broken.json").write_text(json.dumps({"side": "left"}))
    (root / "notes.txt").write_text("not a CT; ignored")
    return root


def _summary(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {row["case_id"]: row for row in csv.DictReader(f)}


def test_discover_folder_and_sides(batch_input):
    cases = batch.discover_cases(batch_input, side_from_json=True)
    assert [c.case_id for c in cases] == ["broken", "phantom-1", "phantom-2"]
    sides = {c.case_id: c.side for c in cases}
    assert sides == {"broken": "left", "phantom-1": "left", "phantom-2": "right"}
    assert all(c.error is None for c in cases)
    assert cases[1].input.name == "ct.nrrd"
    # no side at all: each case carries a clear error instead of stopping discovery
    no_side = batch.discover_cases(batch_input)
    assert all("No side" in c.error for c in no_side)
    # --side wins over nothing; CSV rows carry their own side
    assert {c.side for c in batch.discover_cases(batch_input, side="right")} == {"right"}


def test_discover_csv_and_errors(batch_input, tmp_path):
    table = tmp_path / "cases.csv"
    table.write_text(f"case_id,input,side\nA,{batch_input / 'phantom-1' / 'ct.nrrd'},LEFT\n"
                     f"A,{batch_input / 'phantom-2' / 'ct.nrrd'},right\n")
    cases = batch.discover_cases(table)
    assert [c.side for c in cases] == ["left", "right"]
    assert cases[0].error is None and "Duplicate" in cases[1].error
    bad = tmp_path / "bad.csv"
    bad.write_text("file,side\nx.nrrd,left\n")
    with pytest.raises(InputError, match="'input'"):
        batch.discover_cases(bad)
    with pytest.raises(InputError, match="not found"):
        batch.discover_cases(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="No CT found"):
        batch.discover_cases(empty)
    with pytest.raises(InputError):
        batch.discover_cases(batch_input, side="up")


def test_batch_runs_skips_and_reports_failures(batch_input, fast_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["batch", "--input", str(batch_input), "--out", str(out), "--side-from-json",
            "--model", str(fast_bundle), "--device", "cpu"]
    assert main(argv) == 1  # one case failed → non-zero exit, after all cases ran
    summary = _summary(out / batch.SUMMARY_NAME)
    assert set(summary) == {"broken", "phantom-1", "phantom-2"}
    assert summary["broken"]["status"] == "failed"
    assert "broken.nrrd" in summary["broken"]["error"]
    assert not (out / "broken.seg.nrrd").exists() and not (out / "broken.report.json").exists()
    for case_id, side in (("phantom-1", "left"), ("phantom-2", "right")):
        row = summary[case_id]
        assert row["status"] == "ok", row
        assert row["side"] == side and row["model"] == "tiny-test@0.0.1" and row["device"] == "cpu"
        seg, report_path = batch.output_paths(out, case_id)
        report = json.loads(report_path.read_text())
        masks, geometry, _segments = segio.read_seg(seg)
        assert set(masks) == set(labels.STRUCTURES) | {labels.ROI}
        for name in labels.STRUCTURES:
            assert float(row[f"{name} cc"]) == pytest.approx(report["volumes_cc"][name])
            assert report["volumes_cc"][name] == pytest.approx(masks[name].sum() * geometry.voxel_volume_cc,
                                                               rel=1e-3, abs=1e-3)
        assert float(row["seconds"]) > 0 and float(row["time total s"]) > 0
    log = capsys.readouterr().out
    assert "FAILED" in log and "2 ok, 0 skipped, 1 failed of 3" in log

    # a second run skips what is done (files untouched) and still reports the bad case
    seg1 = batch.output_paths(out, "phantom-1")[0]
    stamp = seg1.stat().st_mtime_ns
    assert main(argv) == 1
    summary = _summary(out / batch.SUMMARY_NAME)
    assert summary["phantom-1"]["status"] == "skipped" and summary["phantom-2"]["status"] == "skipped"
    assert summary["phantom-1"]["Parotid cc"] != ""  # volumes come from the existing report
    assert summary["broken"]["status"] == "failed"
    assert seg1.stat().st_mtime_ns == stamp

    # --force redoes a case (one-row CSV keeps it quick); exit 0 when nothing failed
    table = tmp_path / "one.csv"
    table.write_text(f"case_id,input,side\nphantom-1,{batch_input / 'phantom-1' / 'ct.nrrd'},left\n")
    assert main(["batch", "--input", str(table), "--out", str(out), "--model", str(fast_bundle),
                 "--device", "cpu", "--force", "--summary", str(tmp_path / "one-summary.csv")]) == 0
    assert seg1.stat().st_mtime_ns != stamp
    assert _summary(tmp_path / "one-summary.csv")["phantom-1"]["status"] == "ok"


# --- claims, one model load, retry, and two batches on one list (issue #17) ---------------------------
@pytest.fixture(scope="module")
def four_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-4")
    for seed, side in ((11, "left"), (12, "right"), (13, "left"), (14, "right")):
        case = phantom.generate_case(seed, side=side, size="small", spacing=(2.0, 2.0, 4.0))
        phantom.write_case(case, root / f"phantom-{seed}")
    (root / "corrupt.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10\n\nnot an image")
    (root / "corrupt.json").write_text(json.dumps({"side": "left"}))
    return root


def test_two_batches_on_one_list_do_each_case_exactly_once(four_cases, fast_bundle, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "ParotidOARLib", "batch", "--input", str(four_cases), "--out", str(out),
            "--side-from-json", "--model", str(fast_bundle), "--device", "cpu"]
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    logs = "\n".join(r[0] for r in results)
    for seed in (11, 12, 13, 14):
        assert len([ln for ln in logs.splitlines() if f"] phantom-{seed}: ok in" in ln]) == 1, logs
        assert batch.output_paths(out, f"phantom-{seed}")[1].is_file()
    # the corrupt case is tried by one batch (exit 1) and reported; the other may find it claimed
    assert len([ln for ln in logs.splitlines() if "] corrupt: FAILED" in ln and "corrupt.nrrd" in ln]) >= 1, logs
    assert 1 in [p.returncode for p in procs] and set(p.returncode for p in procs) <= {0, 1}, results
    assert not batch.output_paths(out, "corrupt")[0].exists()
    assert "corrupt.nrrd" in json.loads(batch.failure_path(out, "corrupt").read_text())["error"]
    assert not list(out.glob(".*.claim")) and not list(out.glob(".*.part-*"))
    # the summary (whichever batch wrote it last) covers every case, with volumes for the finished ones
    summary = _summary(out / batch.SUMMARY_NAME)
    assert set(summary) == {"corrupt", "phantom-11", "phantom-12", "phantom-13", "phantom-14"}
    assert summary["corrupt"]["status"] == "failed" and "corrupt.nrrd" in summary["corrupt"]["error"]
    for seed in (11, 12, 13, 14):
        row = summary[f"phantom-{seed}"]
        assert row["status"] in ("ok", "skipped") and row["Parotid cc"] != "", row


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    import subprocess
    import sys

    assert batch.claim(tmp_path, "a") is True
    assert batch.claim(tmp_path, "a") is False  # this process already holds it (a live pid)
    batch.release(tmp_path, "a")
    assert not batch.claim_path(tmp_path, "a").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    batch.claim_path(tmp_path, "b").write_text(f"{socket.gethostname()} {dead.pid}\n")
    assert batch.claim(tmp_path, "b") is True  # the owner is gone: taken over
    batch.claim_path(tmp_path, "c").write_text("another-host 1\n")
    assert batch.claim(tmp_path, "c") is False  # another host's claim is never guessed stale


def test_model_loaded_once_and_unexpected_failures_retried_once(batch_input, fast_bundle, tmp_path, monkeypatch):
    from ParotidOARLib import cascade

    loads, calls = [], []
    real_load, real_segment = cascade.load_model_bundle, cascade.segment

    def counting_load(model_dir=None):
        loads.append(model_dir)
        return real_load(model_dir)

    def flaky_segment(input_path, *a, **kw):
        calls.append(str(input_path))
        if "phantom-1" in str(input_path) and calls.count(str(input_path)) == 1:
            raise RuntimeError("a transient failure")
        return real_segment(input_path, *a, **kw)

    monkeypatch.setattr(cascade, "load_model_bundle", counting_load)
    monkeypatch.setattr(cascade, "segment", flaky_segment)
    cases = [c for c in batch.discover_cases(batch_input, side_from_json=True) if c.case_id != "broken"]
    lines = []
    rows = batch.run_batch(cases, tmp_path / "out", model_dir=str(fast_bundle), device="cpu", log=lines.append)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert len(loads) == 1  # verified once for the whole batch
    assert sum("phantom-1" in c for c in calls) == 2 and any("retrying once" in ln for ln in lines)
