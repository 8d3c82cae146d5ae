"""``python -m ParotidOARLib phantom`` — write synthetic post-operative head-and-neck CT cases."""

from __future__ import annotations

import argparse
import time

from ..errors import InputError

BANNER = "Synthetic phantom data \u2013 research use only"


def _spacing(text: str):
    parts = [p for p in text.replace(";", ",").split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(v > 0 and v == v and v != float("inf") for v in values):
        raise argparse.ArgumentTypeError(
            f"expected three positive numbers X,Y,Z in mm (for example 0.98,0.98,2), got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder; each case goes to OUT/<case-id>/")
    parser.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="run seed S; case i uses seed S*1000+i and is named phantom-sS-iii (default 0)")
    parser.add_argument("--side", choices=("left", "right", "random"), default="random",
                        help="operated side (default random per case)")
    parser.add_argument("--spacing", type=_spacing, default=(0.98, 0.98, 2.0), metavar="X,Y,Z",
                        help="voxel spacing in mm (default 0.98,0.98,2)")
    parser.add_argument("--size", choices=("full", "small"), default="full",
                        help="full: 512x512 in-plane, 200 mm cranio-caudal; small: ~160x160x60 around the "
                             "operated ear and parotid")
    parser.add_argument("--metal", action="store_true", help="add dental fillings with streak artefacts to every case")
    parser.add_argument("--force", action="store_true", help="replace existing case folders")


def run(args) -> int:
    from .. import phantom

    if args.cases < 1:
        raise InputError(f"--cases must be at least 1, got {args.cases}.")
    print(BANNER, flush=True)
    overrides = {"metal": True} if args.metal else {}
    t0 = time.perf_counter()

    def progress(done, total, path):
        print(f"[{done}/{total}] {path}", flush=True)

    paths = phantom.generate(args.out, cases=args.cases, seed=args.seed, side=args.side, spacing=args.spacing,
                             size=args.size, force=args.force, progress=progress, **overrides)
    print(f"Wrote {len(paths)} case(s) in {time.perf_counter() - t0:.1f} s: ct.nrrd, reference.seg.nrrd, "
          "reference-full.seg.nrrd, case.json per case.")
    return 0
