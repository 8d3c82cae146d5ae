"""Cohort batches on Dask (issue #17): ``batch --workers N`` and ``batch --scheduler ADDRESS`` give the same
claims, failure records and summary as the sequential loop; a missing Dask is one clear line; the
sequential path never imports Dask; the tqdm bar keeps the ``PROGRESS`` line protocol."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys

import pytest

from ParotidOARLib import batch, phantom
from ParotidOARLib.__main__ import main
from ParotidOARLib.progress import Progress

from conftest import REPO

pytest.importorskip("torch")

SEEDS = (21, 22, 23, 24)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    for seed in SEEDS:
        case = phantom.generate_case(seed, side="left" if seed % 2 else "right", size="small",
                                     spacing=(2.0, 2.0, 4.0))
        phantom.write_case(case, root / f"phantom-{seed}")
    (root / "corrupt.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10\n\nnot an image")
    (root / "corrupt.json").write_text(json.dumps({"side": "left"}))
    return root


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _argv(cohort, out, bundle, *extra):
    return ["batch", "--input", str(cohort), "--out", str(out), "--side-from-json", "--model", str(bundle),
            "--device", "cpu", "--threads", "1", *extra]


def _summary(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {row["case_id"]: row for row in csv.DictReader(f)}


def _ok_lines(log, case_id):
    return [ln for ln in log.splitlines() if f"] {case_id}: ok in" in ln]


def test_workers_do_each_case_once_and_report_the_corrupt_one(cohort, fast_bundle, tmp_path):
    pytest.importorskip("distributed")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ParotidOARLib", *_argv(cohort, out, fast_bundle, "--workers", "2")],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r  # the corrupt case failed; every other case still ran
    assert "local Dask cluster of 2 worker processes" in r.stdout and "Traceback" not in r.stderr, r
    for seed in SEEDS:
        assert len(_ok_lines(r.stdout, f"phantom-{seed}")) == 1, r.stdout
        assert batch.output_paths(out, f"phantom-{seed}")[1].is_file()
    assert "retrying" not in r.stdout
    loads = int(re.search(r"model loaded and verified (\d+) times", r.stdout).group(1))
    assert 1 <= loads <= 2, r.stdout  # once per worker process, not once per case
    summary = _summary(out / batch.SUMMARY_NAME)
    assert list(summary) == ["corrupt"] + [f"phantom-{s}" for s in SEEDS]  # complete, in case order
    assert summary["corrupt"]["status"] == "failed" and "corrupt.nrrd" in summary["corrupt"]["error"]
    assert "corrupt.nrrd" in json.loads(batch.failure_path(out, "corrupt").read_text())["error"]
    for seed in SEEDS:
        row = summary[f"phantom-{seed}"]
        assert row["status"] == "ok" and row["Parotid cc"] != "" and float(row["seconds"]) > 0, row
    assert not list(out.glob(".*.claim")) and not list(out.glob("*.part-*")) and not list(out.glob(".*.part-*"))
    assert "4 ok, 0 skipped, 1 failed of 5" in r.stdout


def test_sequential_and_dask_batches_together_do_each_case_once(cohort, fast_bundle, tmp_path, capsys):
    """A sequential batch (another process) and a batch on a running Dask cluster (``--scheduler``) share one
    list and one output folder: the claims make each case run exactly once."""
    distributed = pytest.importorskip("distributed")
    import logging

    out = tmp_path / "out"
    seq = subprocess.Popen([sys.executable, "-m", "ParotidOARLib", *_argv(cohort, out, fast_bundle)], cwd=REPO,
                           env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                      silence_logs=logging.ERROR) as cluster:
            rc = main(_argv(cohort, out, fast_bundle, "--scheduler", cluster.scheduler_address))
    finally:
        seq_out, seq_err = seq.communicate(timeout=600)
    dask_out = capsys.readouterr().out
    assert "the Dask cluster at tcp://" in dask_out
    logs = seq_out + "\n" + dask_out
    for seed in SEEDS:
        assert len(_ok_lines(logs, f"phantom-{seed}")) == 1, logs
    assert {rc, seq.returncode} <= {0, 1} and 1 in (rc, seq.returncode), (rc, seq_err)
    summary = _summary(out / batch.SUMMARY_NAME)  # whichever batch wrote it last: every case
    assert set(summary) == {"corrupt"} | {f"phantom-{s}" for s in SEEDS}
    assert summary["corrupt"]["status"] == "failed"
    assert all(summary[f"phantom-{s}"]["status"] in ("ok", "skipped") for s in SEEDS)
    assert not list(out.glob(".*.claim"))


def test_missing_dask_is_one_line_and_sequential_never_imports_it(cohort, fast_bundle, tmp_path):
    one = tmp_path / "one.csv"
    one.write_text(f"case_id,input,side\nphantom-{SEEDS[0]},{cohort / f'phantom-{SEEDS[0]}' / 'ct.nrrd'},left\n")
    # Dask made unimportable (as if not installed): --workers fails at once, one line, user-error exit code
    code = ("import sys; sys.modules['dask'] = sys.modules['distributed'] = None\n"
            "from ParotidOARLib.__main__ import main\n"
            f"sys.exit(main({_argv(one, tmp_path / 'a', fast_bundle, '--workers', '2')!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert 'pip install "parotidoar[dask]"' in r.stderr and r.stderr.startswith("error:")
    assert not (tmp_path / "a").exists()  # nothing was started
    # the sequential default: the case runs without importing Dask, and without a bar (stderr is no terminal)
    code = ("import json, sys\nfrom ParotidOARLib.__main__ import main\n"
            f"rc = main({_argv(one, tmp_path / 'b', fast_bundle)!r})\n"
            "print(json.dumps({'rc': rc, 'imported': sorted(m for m in ('dask', 'distributed') "
            "if m in sys.modules)}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r
    assert json.loads(r.stdout.splitlines()[-1]) == {"rc": 0, "imported": []}, r.stdout
    assert batch.output_paths(tmp_path / "b", f"phantom-{SEEDS[0]}")[1].is_file()
    assert "cases |" not in r.stderr and "\r" not in r.stderr


@pytest.mark.parametrize("extra", [["--workers", "0"], ["--workers", "2", "--scheduler", "tcp://x:1"],
                                   ["--threads", "0"]])
def test_bad_worker_options_are_usage_errors(cohort, tmp_path, extra, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["batch", "--input", str(cohort), "--out", str(tmp_path / "o"), "--side", "left", *extra])
    assert exc.value.code == 64
    assert not (tmp_path / "o").exists()


def test_worker_loads_the_model_once(fast_bundle):
    from ParotidOARLib import cohort as cohort_mod

    cohort_mod._BUNDLES.clear()
    first, load_s = cohort_mod.worker_bundle(str(fast_bundle))
    again, again_s = cohort_mod.worker_bundle(fast_bundle)  # the same folder, however it is spelled
    assert again is first and load_s > 0 and again_s == 0.0
    assert cohort_mod._threads_here({"threads": 3}) == 3
    assert cohort_mod._threads_here({}) >= 1  # not on a worker: the usable cores


def test_progress_bar_shows_time_left_and_lines_protocol_is_unchanged():
    pytest.importorskip("tqdm")
    err = io.StringIO()
    bar = Progress(bar=True, stream_err=err, stream_out=io.StringIO())
    for pct, step in ((0, "read"), (45, "stage1"), (100, "write")):
        bar(pct, step)
    bar.close()
    assert "left" in err.getvalue() and "stage1" in err.getvalue() and "100%" in err.getvalue()
    err = io.StringIO()
    cases = Progress(bar=True, stream_err=err, stream_out=io.StringIO())
    cases.advance(1, 4, "phantom-1")
    cases.write("[1/4] phantom-1: ok")
    cases.close()
    assert "1/4 cases" in err.getvalue() and "left" in err.getvalue()
    assert cases.out.getvalue() == "[1/4] phantom-1: ok\n"
    # the Slicer module's protocol: PROGRESS lines on stdout, nothing on stderr
    out, err = io.StringIO(), io.StringIO()
    lines = Progress(lines=True, stream_out=out, stream_err=err)
    lines(10, "stage1")
    lines(10, "stage1")  # repeats suppressed
    lines.advance(1, 4, "phantom 1")
    lines.close()
    assert out.getvalue() == "PROGRESS 10 stage1\nPROGRESS 25 phantom_1\n" and err.getvalue() == ""
    sys.path.insert(0, str(REPO / "ParotidOAR"))  # as Slicer loads the module's GUI package
    from ParotidOARGui.Process import parse_progress

    assert parse_progress("PROGRESS 25 phantom_1") == (25.0, "phantom_1")
