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


def prog_name() -> str:
    """``parotid-oar`` when run as the console command, else ``python -m ParotidOARLib``."""
    base = os.path.basename(sys.argv[0] or "")
    return "parotid-oar" if base.startswith("parotid-oar") else "python -m ParotidOARLib"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog_name(),
        description="ParotidOAR: two-stage parotid and organ-at-risk segmentation for parotid brachytherapy. "
                    "Research use only - not for clinical use.")
    parser.add_argument("--version", action="version", version=f"ParotidOAR {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])  # prints help / error and exits
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(f".commands.{module_name}", __package__)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith(f"commands.{module_name}"):
            print(f"error: the '{name}' command is not available in this version.", file=sys.stderr)
            return 2
        raise
    sub = argparse.ArgumentParser(prog=f"{prog_name()} {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except ParotidOARError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: cancelled; no partial output was left.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
