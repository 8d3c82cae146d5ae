"""``parotid-oar <command> …`` (the same as ``python -m ParotidOARLib <command> …``) — the
headless entry point.

Each command lives in ``ParotidOARLib/commands/<module>.py`` and defines
``add_arguments(parser)`` (argument parsing only) and ``run(args) -> int``
(which calls one public engine function). Commands are imported lazily so
``--help`` is instant and a missing optional dependency only affects its
own command.

Errors the user can fix (:class:`ParotidOARError`) print one clear line and
exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import ParotidOARError

#: command name → (module in ParotidOARLib.commands, one-line help)
COMMANDS = {
    "phantom": ("phantom", "Generate synthetic post-operative head-and-neck CT phantom cases."),
    "segment": ("segment", "Run the two-stage cascade on one CT."),
    "batch": ("batch", "Segment a folder (or CSV) of CTs, skipping finished cases."),
    "models": ("models", "List, verify or install model bundles."),
    "train": ("train", "Train stage 1 and/or stage 2 and write a model bundle."),
    "evaluate": ("evaluate", "Compare a segmentation with a reference (DSC, HD95, surface DSC...)."),
    "evaluate-cohort": ("evaluate_cohort", "Per-case and per-OAR summary over a cohort (paper's Table 1)."),
    "review-report": ("review_report", "Summarise clinical review logs (paper's Table 2)."),
    "demo": ("demo", "Generate a phantom case and segment it end to end (the `make demo` job)."),
    "export-rtstruct": ("export_rtstruct", "Convert a .seg.nrrd into a DICOM RT Structure Set."),
}


#: exit codes, listed in every --help
EXIT_OK = 0
EXIT_SOME_FAILED = 1   # the command ran, but some results failed (batch cases, broken bundles); also a bug
EXIT_USER_ERROR = 2    # bad input, model or output (ParotidOARError): one line, nothing written
EXIT_USAGE = 64        # bad command-line arguments (BSD sysexits EX_USAGE)
EXIT_CANCELLED = 130   # Ctrl-C / SIGTERM: nothing partial left

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}    success
  {EXIT_SOME_FAILED}    finished, but some results failed (batch: a case failed; models list: a broken bundle)
  {EXIT_USER_ERROR}    user error: bad input, model or output (one 'error:' line; nothing half-written)
  {EXIT_USAGE}   usage error: bad command-line arguments
  {EXIT_CANCELLED}  cancelled (Ctrl-C / SIGTERM); no partial output left"""

NOTICE = "Research use only - not for clinical use."

#: commands after which :func:`cli` ends the process at once (``os._exit``) instead of tearing the interpreter
#: down: ``segment`` in a fresh process spent about 0.45 s freeing torch and its libraries after its outputs
#: were already published (issue 18). Only commands that start no child process and leave no temporary file
#: to an ``atexit`` handler belong here.
FAST_EXIT_COMMANDS = frozenset({"segment"})

#: command → example command lines (after the program name)
EXAMPLES = {
    "phantom": ["phantom --out phantoms --cases 3 --seed 1 --side random",
                "phantom --out small --cases 1 --size small --metal"],
    "segment": ["segment ct.nrrd --side left --out ct.seg.nrrd --report report.json",
                "segment ct.nrrd --side left --out ct.nii.gz          # label map + ct.labels.json",
                "segment dicom_ct/ --side right --out out.seg.nrrd --rtstruct rs.dcm",
                "segment ct.nrrd --side left --out redo.seg.nrrd --parotid edited.seg.nrrd",
                "-v --log-file run.log segment ct.nrrd --side left --out ct.seg.nrrd"],
    "batch": ["batch --input cts/ --out results/ --side left",
              "batch --input phantoms/ --out results/ --side-from-json",
              "batch --input cases.csv --out results/      # CSV: input,side[,case_id,series_uid]",
              "batch --input cts/ --out results/ --side left --workers 4 # local Dask cluster, 4 processes",
              "batch --input cts/ --out results/ --side left --scheduler tcp://head:8786  # a running cluster"],
    "models": ["models list", "models list --json", "models verify parotid-oar-research-v1",
               "models install path/to/bundle --force"],
    "train": ["train --data my_cases --label-map names.json --stage both --out my-bundle",
              "train --stage 2 --phantom-cases 60 --work-dir runs/x --out my-bundle --force",
              "train --format openkbp --data openkbp/ --stage 1 --work-dir runs/x --epochs 40"],
    "evaluate": ["evaluate --pred ct.seg.nrrd --ref reference.seg.nrrd --json metrics.json",
                 "evaluate --pred ct.nii.gz --pred-name-map ct.labels.json --ref ref.seg.nrrd --json m.json"],
    "evaluate-cohort": ["evaluate-cohort results/ --json table1.json --csv per-case.csv",
                        "evaluate-cohort results.csv --json table1.json"],
    "review-report": ["review-report reviews/ --json table2.json --png table2.png"],
    "demo": ["demo --out demo-output", "demo --out quick --size small --device cpu"],
    "export-rtstruct": ["export-rtstruct --seg edited.seg.nrrd --dicom dicom_ct/ --out rs.dcm"],
}


def prog_name() -> str:
    """``parotid-oar`` when run as the console command, else ``python -m ParotidOARLib``."""
    base = os.path.basename(sys.argv[0] or "")
    return "parotid-oar" if base.startswith("parotid-oar") else "python -m ParotidOARLib"


class _Parser(argparse.ArgumentParser):
    """argparse with the usage-error exit code (:data:`EXIT_USAGE`) instead of 2 (2 is a user error)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _logging_options(parser, quiet_flags=("-q", "--quiet")):
    g = parser.add_argument_group("logging")
    g.add_argument("-v", "--verbose", dest="log_verbose", action="count", default=0,
                   help="more log messages on stderr (-v: info, -vv: debug)")
    g.add_argument(*quiet_flags, dest="log_quiet", action="store_true",
                   help="only errors on stderr (no progress bar, no warnings from the log)")
    g.add_argument("--log-file", dest="log_file", default=None, metavar="FILE",
                   help="also append every log message (debug level, with times) to FILE")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog_name(),
        description="ParotidOAR: two-stage parotid and organ-at-risk segmentation for parotid brachytherapy. "
                    "Research use only - not for clinical use.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"examples:\n  {prog_name()} demo --out demo-output\n  {prog_name()} COMMAND --help\n\n"
               f"{EXIT_CODES_HELP}\n\n{NOTICE}")
    parser.add_argument("--version", action="version", version=f"ParotidOAR {__version__}")
    _logging_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _split_global_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """Leading logging options (before the command) and the rest."""
    lead = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-q", "--quiet", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"}) \
                or a.startswith("--log-file="):
            lead.append(a)
            i += 1
        elif a == "--log-file" and i + 1 < len(argv):
            lead += argv[i:i + 2]
            i += 2
        else:
            break
    return lead, argv[i:]


def _stderr_handler():
    import logging

    class Handler(logging.StreamHandler):
        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value):
            pass

    return Handler()


def teardown_logging() -> None:
    """Remove (and close) the handlers :func:`setup_logging` added; the logger propagates again."""
    import logging

    log = logging.getLogger("ParotidOARLib")
    for h in list(log.handlers):
        if getattr(h, "_parotidoar", False):
            log.removeHandler(h)
            h.close()
    log.propagate = True
    log.setLevel(logging.NOTSET)


def setup_logging(verbose: int = 0, quiet: bool = False, log_file=None) -> None:
    """The ``ParotidOARLib`` logger: WARNING on stderr (INFO with -v, DEBUG with -vv, ERROR with -q),
    and everything (DEBUG, with times) appended to ``log_file``."""
    import logging

    teardown_logging()
    log = logging.getLogger("ParotidOARLib")
    level = logging.ERROR if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO if verbose else
                                         logging.WARNING)
    err = _stderr_handler()
    err.setLevel(level)
    err.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    err._parotidoar = True
    log.addHandler(err)
    log.setLevel(min(level, logging.DEBUG if log_file else level))
    log.propagate = False
    if log_file:
        from .errors import OutputError

        try:
            fh = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"Cannot write the log file {log_file}: {exc.strerror or exc}.") from None
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh._parotidoar = True
        log.addHandler(fh)


def main(argv: list[str] | None = None) -> int:
    import logging

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    lead, argv = _split_global_options(argv)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(lead + (argv or ["--help"]))  # prints help / error and exits
        return EXIT_USAGE
    global_args = parser.parse_args(lead + [argv[0]])
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(f".commands.{module_name}", __package__)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith(f"commands.{module_name}"):
            print(f"error: the '{name}' command is not available in this version.", file=sys.stderr)
            return EXIT_USAGE
        raise
    examples = "\n".join(f"  {prog_name()} {e}" for e in EXAMPLES.get(name, []))
    sub = _Parser(prog=f"{prog_name()} {name}", description=f"{help_text} {NOTICE}",
                  formatter_class=argparse.RawDescriptionHelpFormatter,
                  epilog=(f"examples:\n{examples}\n\n" if examples else "") + EXIT_CODES_HELP)
    module.add_arguments(sub)
    taken = {o for a in sub._actions for o in a.option_strings}
    _logging_options(sub, tuple(f for f in ("-q", "--quiet") if f not in taken))
    args = sub.parse_args(argv[1:])
    log = logging.getLogger("ParotidOARLib")
    try:
        setup_logging(global_args.log_verbose + args.log_verbose, global_args.log_quiet or args.log_quiet,
                      args.log_file or global_args.log_file)
        args.quiet_progress = global_args.log_quiet or args.log_quiet
        log.info("ParotidOAR %s: %s %s", __version__, name, " ".join(argv[1:]))
        rc = int(module.run(args) or 0)
        log.debug("%s finished with exit code %d", name, rc)
        return rc
    except ParotidOARError as exc:
        log.debug("%s failed: %s", name, exc)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        log.debug("%s cancelled", name)
        print("error: cancelled; no partial output was left.", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        teardown_logging()  # main() called in-process (tests, scripts) leaves logging as it found it


def cli() -> None:
    """The process entry point (``python -m ParotidOARLib``, the ``parotid-oar`` script): :func:`main`, then
    the exit. After a command in :data:`FAST_EXIT_COMMANDS` the output streams are flushed and the process
    ends without the interpreter's teardown; every file it wrote is already complete and renamed into place
    (``imageio.staged_outputs``), and ``main`` has closed its log file."""
    rc = main()
    command = _split_global_options(sys.argv[1:])[1][:1]  # as main() found it
    if command and command[0] in FAST_EXIT_COMMANDS:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    cli()
