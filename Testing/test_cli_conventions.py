"""CLI conventions: every subcommand's --help has examples, the exit codes and the research notice;
usage errors (bad arguments) and user errors (bad input) have distinct exit codes; -v / -q /
--log-file work, before or after the command; the PROGRESS line protocol is unchanged."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from ParotidOARLib.__main__ import COMMANDS, EXIT_USAGE, EXIT_USER_ERROR, main


def _cli(*args, cwd=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "ParotidOARLib", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=timeout)


def test_top_level_help_lists_exit_codes_and_notice():
    r = _cli("--help")
    assert r.returncode == 0
    assert "exit codes:" in r.stdout and f"  {EXIT_USAGE}   usage error" in r.stdout
    assert f"  {EXIT_USER_ERROR}    user error" in r.stdout
    assert "not for clinical use" in r.stdout.lower()
    assert "--log-file" in r.stdout and "--verbose" in r.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_help_has_examples_and_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    examples = out.split("examples:", 1)[1].split("exit codes:", 1)[0]
    lines = [ln.strip() for ln in examples.splitlines() if ln.strip()]
    assert lines and all(re.match(rf"(python -m ParotidOARLib|parotid-oar) .*{re.escape(command)}\b", ln)
                         for ln in lines), lines
    assert "exit codes:" in out and "not for clinical use" in out.lower()
    assert "--log-file" in out and "-v" in out


def test_device_format_and_stage_have_help(capsys):
    for command, options in (("segment", ["--device"]), ("batch", ["--device"]), ("demo", ["--device"]),
                             ("train", ["--device", "--format", "--stage"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        for option in options:
            text = out.split(option, 2)[-1][:400]  # the option's entry in the options list
            assert len(re.sub(r"\s+", " ", text.split("\n  -", 1)[0])) > 40, (command, option, text)


def test_usage_and_user_errors_have_distinct_codes(tmp_path):
    r = _cli("segment", tmp_path / "ct.nrrd", "--side", "up", "--out", tmp_path / "o.seg.nrrd")
    assert r.returncode == EXIT_USAGE and "invalid choice" in r.stderr
    r = _cli("no-such-command")
    assert r.returncode == EXIT_USAGE
    r = _cli("segment", tmp_path / "missing.nrrd", "--side", "left", "--out", tmp_path / "o.seg.nrrd")
    assert r.returncode == EXIT_USER_ERROR and r.stderr.strip().startswith("error:")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_segment_process_ends_without_teardown_and_loses_nothing(tmp_path, tiny_bundle):
    """`segment` ends its process with os._exit after its outputs are published (issue 18): the exit code, the
    summary line on a piped stdout, the notice on stderr, the log file and the outputs are all still there.
    Other commands keep the normal exit."""
    from bundle_utils import synthetic_ct
    from ParotidOARLib import __main__ as cli_module
    from ParotidOARLib.imageio import write_image

    assert cli_module.FAST_EXIT_COMMANDS == {"segment"}
    ct, g = synthetic_ct(size=(64, 60, 24), spacing=(3.0, 3.0, 4.0))
    ct_path = write_image(tmp_path / "ct.nrrd", ct, g)
    out, rep, log_file = tmp_path / "a.seg.nrrd", tmp_path / "r.json", tmp_path / "run.log"
    r = _cli("--log-file", log_file, "segment", ct_path, "--side", "left", "--out", out, "--report", rep,
             "--model", tiny_bundle, "--device", "cpu", "--threads", "1", "--no-side-check")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out} (left side") and r.stdout.endswith("on cpu\n")
    assert "NOT FOR CLINICAL USE" in r.stderr
    assert out.is_file() and json.loads(rep.read_text())["volumes_cc"]
    assert "segment finished with exit code 0" in log_file.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.seg.nrrd", "ct.nrrd", "r.json", "run.log"]
    r = _cli("segment", ct_path, "--side", "left", "--out", out, "--model", tiny_bundle)  # exists: user error
    assert r.returncode == EXIT_USER_ERROR and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_verbose_quiet_and_log_file(tmp_path, tiny_bundle):
    from bundle_utils import synthetic_ct
    from ParotidOARLib.imageio import write_image

    ct, g = synthetic_ct(size=(64, 60, 24), spacing=(3.0, 3.0, 4.0))
    ct_path = write_image(tmp_path / "ct.nrrd", ct, g)
    log_file = tmp_path / "run.log"
    r = _cli("-v", "--log-file", log_file, "segment", ct_path, "--side", "left", "--out", tmp_path / "a.seg.nrrd",
             "--model", tiny_bundle, "--device", "cpu", "--threads", "1", "--no-side-check", "--progress-lines")
    assert r.returncode == 0, r.stderr
    assert "INFO: model tiny-test@0.0.1" in r.stderr and "INFO: wrote" in r.stderr
    assert "NOT FOR CLINICAL USE" in r.stderr  # the notice is not a log message: -q cannot hide it
    text = log_file.read_text()
    assert "DEBUG" in text and "timings (s)" in text and "segment finished with exit code 0" in text
    # the PROGRESS protocol the Slicer module reads: unchanged, on stdout only
    progress = [ln for ln in r.stdout.splitlines() if ln.startswith("PROGRESS ")]
    assert progress[0] == "PROGRESS 0 read" and progress[-1] == "PROGRESS 100 write"
    assert all(re.fullmatch(r"PROGRESS \d{1,3} \w+", ln) for ln in progress)
    # -q after the command: no INFO, no WARNING lines
    r = _cli("segment", ct_path, "--side", "left", "--out", tmp_path / "b.seg.nrrd", "--model", tiny_bundle,
             "--device", "cpu", "--threads", "1", "--no-side-check", "-q")
    assert r.returncode == 0, r.stderr
    assert "INFO:" not in r.stderr and "NOT FOR CLINICAL USE" in r.stderr
    # an unwritable log file is a user error, before any work
    r = _cli("--log-file", tmp_path / "no" / "x.log", "models", "list")
    assert r.returncode == EXIT_USER_ERROR and "log file" in r.stderr and "Traceback" not in r.stderr


def test_in_process_main_leaves_logging_as_it_was(tmp_path, capsys):
    import logging

    log = logging.getLogger("ParotidOARLib")
    before = (list(log.handlers), log.propagate, log.level)
    assert main(["-v", "--log-file", str(tmp_path / "x.log"), "models", "list", "--root", str(tmp_path)]) == 0
    assert (list(log.handlers), log.propagate, log.level) == before
    assert "models list" in (tmp_path / "x.log").read_text()
    # a later message goes to whatever stderr is current, not to a stream a finished run captured
    logging.getLogger("ParotidOARLib.test").warning("after the run")
    assert "Logging error" not in capsys.readouterr().err
