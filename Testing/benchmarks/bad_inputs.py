"""Bad-input benchmark (issue #15): try the CLI as a careless or hostile user would.

    nice -n 19 .venv/bin/python Testing/benchmarks/bad_inputs.py [--only NAME ...] [--out FILE]

Each case builds its inputs in a fresh temporary folder, runs ``python -m ParotidOARLib …`` as a separate
process (or a short engine snippet, for the review log), and records the exit code, the last line of
stderr, any warning lines and the leftovers. A case is **clean** when

* no traceback was printed;
* the exit code is the expected one (2 for a user error, 130 for a cancel, 0 for a run that should
  succeed) and an error is one line starting with ``error:`` that contains the expected words;
* nothing was lost or overwritten: every file the "user" had (the inputs, a file in the way, one saved
  during the run) is byte-for-byte unchanged, unless the case passes ``--force``;
* nothing was left behind: no output of a failed run and no temporary file (a SIGKILL cannot clean up
  after itself: a later run removes what a killed one left, which a case checks);
* a run that should warn printed the expected warning.

Inputs are small: the small phantom (``phantom.generate_case(3, 'left', size='small')``, 160×160×60 at
0.98×0.98×2 mm) and small synthetic head CTs, segmented with tiny random-weight bundles
(``Testing/bundle_utils.py``): these cases test input handling, not the model.

Writes ``Testing/benchmarks/results/bad_inputs.json``: one row per case and a summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))

import numpy as np  # noqa: E402

from bundle_utils import make_tiny_bundle, synthetic_ct  # noqa: E402
from ParotidOARLib import labels, phantom, segio  # noqa: E402
from ParotidOARLib.imageio import Geometry, write_image  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
CODE = REPO  # the checkout whose ParotidOARLib is run (--code: e.g. an older commit, to see the faults)
TIMEOUT_S = 300
APPEARED_TEXT = "the user's file, saved during the run"


@dataclass
class Case:
    name: str
    fault: str  # "" (already behaved well before #15) or the #15 fault it covers
    expect: str  # "error" (exit 2) | "usage" (bad arguments, exit 64) | "ok" | "cancel"
    words: tuple = ()  # must appear in the error line / a warning (case-insensitive)
    warn: tuple = ()  # words a warning line must hold (expect "ok")
    force: bool = False  # user files may be replaced
    outputs: tuple = ()  # files that must exist afterwards (expect "ok")


@dataclass
class Setup:
    argv: list
    user_files: list = field(default_factory=list)  # files the user had (must survive)
    signal_at: tuple | None = None  # (progress step, signal) to send mid-run
    appear_at: tuple | None = None  # (progress step, path) a file the user creates mid-run
    snippet: str | None = None  # python code instead of a CLI call
    max_file_bytes: int | None = None  # RLIMIT_FSIZE for the run: a write past it fails (EFBIG), like a full disk


# --------------------------------------------------------------------------- shared inputs
class Inputs:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.bundle = make_tiny_bundle(root / "bundle", seed=0, stage1_bias=-1.0, force=True)
        self.everywhere = make_tiny_bundle(root / "everywhere", seed=0, stage1_bias=50.0, force=True)
        self.slow = make_tiny_bundle(root / "slow", seed=0, stage1_bias=-1.0, stage1_patch=(16, 16, 16),
                                     stage1_spacing=(2.0, 2.0, 3.0), force=True)
        case = phantom.generate_case(3, side="left", size="small")
        self.ct_array, self.geometry = case.ct, case.geometry
        self.ct = write_image(root / "phantom.nrrd", case.ct, case.geometry)
        self.parotid = case.labels[labels.PAROTID]
        ct, g = synthetic_ct(size=(120, 110, 40), spacing=(2.0, 2.0, 3.0), body_centre_lps=(10.0, 0, 0))
        self.big = write_image(root / "big.nrrd", ct, g)  # for the signal cases (a run of several seconds)
        # a DICOM series (20 slices of the phantom) and a segmentation on it, for export-rtstruct
        from dicom_utils import write_ct_series

        g20 = Geometry((160, 160, 20), case.geometry.spacing, case.geometry.origin)
        write_ct_series(root / "dicom", case.ct[:20], g20)
        self.dicom = root / "dicom"
        self.seg20 = segio.write_seg(root / "on-dicom.seg.nrrd", {labels.PAROTID: case.labels[labels.PAROTID][:20]}, g20)
        # a valid review log
        from ParotidOARLib.review import ReviewLog, ReviewRecord

        ReviewLog(root / "log").append([ReviewRecord("P1", "automatic", "Parotid", 3, "", "dr_a",
                                                     "2026-11-23T10:00:00Z")])
        self.log = root / "log"

    def segment(self, *extra, model=None):
        return ["segment", str(self.ct), "--side", "left", "--model", str(model or self.bundle),
                "--device", "cpu", *map(str, extra)]


def _snapshot(paths) -> dict:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).is_file()}


def _small_mask(d: Path, two_labels: bool = False) -> Path:
    """``d/m.nrrd``: a 20x20x10 mask (label 1; with ``two_labels`` also a label 2) for the evaluate cases."""
    g = Geometry((20, 20, 10), (1.0, 1.0, 2.0))
    m = np.zeros(g.shape, np.uint8)
    m[2:6, 5:10, 5:10] = 1
    if two_labels:
        m[2:6, 12:15, 5:10] = 2
    return write_image(d / "m.nrrd", m, g)


# --------------------------------------------------------------------------- the cases
def cases(inp: Inputs):
    """Yield (Case, setup function(tmp) -> Setup)."""
    seg = inp.segment

    def simple(argv_fn):
        return lambda d: Setup(argv_fn(d))

    # ---- segment: inputs that already failed cleanly
    yield Case("missing input", "", "error", ("not found",)), simple(
        lambda d: ["segment", str(d / "nope.nrrd"), "--side", "left", "--out", str(d / "o.seg.nrrd")])

    def folder_no_dicom(d):
        (d / "empty").mkdir()
        return Setup(["segment", str(d / "empty"), "--side", "left", "--out", str(d / "o.seg.nrrd"),
                      "--model", str(inp.bundle)])
    yield Case("folder without DICOM", "", "error", ("dicom",)), folder_no_dicom

    def non3d(d):
        import SimpleITK as sitk

        sitk.WriteImage(sitk.GetImageFromArray(inp.ct_array[10]), str(d / "slice.nrrd"))
        return Setup(["segment", str(d / "slice.nrrd"), "--side", "left", "--out", str(d / "o.seg.nrrd"),
                      "--model", str(inp.bundle)])
    yield Case("2D image", "", "error", ("3d",)), non3d

    def mr(d):
        arr = (inp.ct_array.astype(np.int32) + 1024).clip(0, 1500).astype(np.int16)
        p = write_image(d / "mr.nrrd", arr, inp.geometry)
        return Setup(["segment", str(p), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model", str(inp.bundle)])
    yield Case("MR-like image", "", "error", ("does not look like a ct",)), mr

    def tiny(d):
        ct, g = synthetic_ct(size=(20, 20, 10), spacing=(2.0, 2.0, 2.0))
        p = write_image(d / "tiny.nrrd", ct, g)
        return Setup(["segment", str(p), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model", str(inp.bundle)])
    yield Case("scan too small", "", "error", ("too small",)), tiny

    def zero_spacing(d):
        import nrrd

        nrrd.write(str(d / "zero.nrrd"), inp.ct_array.transpose(2, 1, 0).copy(),
                   {"space": "left-posterior-superior", "space directions": np.diag([1.0, 1.0, 0.0]),
                    "space origin": np.zeros(3)})
        return Setup(["segment", str(d / "zero.nrrd"), "--side", "left", "--out", str(d / "o.seg.nrrd"),
                      "--model", str(inp.bundle)])
    yield Case("zero spacing", "", "error", ("spacing",)), zero_spacing

    def seg_as_input(d):
        p = segio.write_seg(d / "in.seg.nrrd", {labels.PAROTID: inp.parotid}, inp.geometry)
        return Setup(["segment", str(p), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model", str(inp.bundle)])
    yield Case(".seg.nrrd as the CT", "", "error", ("segmentation",)), seg_as_input

    def text_file(d):
        (d / "ct.txt").write_text("hello")
        return Setup(["segment", str(d / "ct.txt"), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model",
                      str(inp.bundle)])
    yield Case("unsupported file type", "", "error", ("unsupported",)), text_file

    def garbage(d):
        (d / "ct.nrrd").write_bytes(os.urandom(4096))
        return Setup(["segment", str(d / "ct.nrrd"), "--side", "left", "--out", str(d / "o.seg.nrrd"),
                      "--model", str(inp.bundle)])
    yield Case("corrupt NRRD (random bytes)", "", "error", ("cannot read",)), garbage

    def empty_file(d):
        (d / "ct.nrrd").write_bytes(b"")
        return Setup(["segment", str(d / "ct.nrrd"), "--side", "left", "--out", str(d / "o.seg.nrrd"),
                      "--model", str(inp.bundle)])
    yield Case("empty file", "", "error", ("cannot read",)), empty_file

    yield Case("output not .seg.nrrd or a label map", "", "error", (".seg.nrrd",)), \
        simple(lambda d: seg("--out", d / "o.png"))

    def exists(d):
        (d / "o.seg.nrrd").write_text("the user's segmentation")
        return Setup(seg("--out", d / "o.seg.nrrd"), user_files=[d / "o.seg.nrrd"])
    yield Case("output exists, no --force", "", "error", ("already exists",)), exists

    def exists_force(d):
        (d / "o.seg.nrrd").write_text("old")
        return Setup(seg("--out", d / "o.seg.nrrd", "--force"), user_files=[d / "o.seg.nrrd"])
    yield Case("output exists, --force", "", "ok", force=True, outputs=("o.seg.nrrd",)), exists_force

    yield Case("output folder missing", "", "error", ("does not exist",)), simple(
        lambda d: seg("--out", d / "no" / "o.seg.nrrd"))
    yield Case("--side up", "", "usage", ("invalid choice",)), simple(
        lambda d: ["segment", str(inp.ct), "--side", "up", "--out", str(d / "o.seg.nrrd")])
    yield Case("--roi-margin-mm -5", "", "error", ("roi-margin",)), simple(
        lambda d: seg("--out", d / "o.seg.nrrd", "--roi-margin-mm", "-5"))
    yield Case("--roi-margin-mm nan", "", "error", ("roi-margin",)), simple(
        lambda d: seg("--out", d / "o.seg.nrrd", "--roi-margin-mm", "nan"))
    yield Case("--step 0", "", "error", ("--step",)), simple(lambda d: seg("--out", d / "o.seg.nrrd", "--step", "0"))
    yield Case("--model missing", "", "error", ("bundle",)), simple(
        lambda d: ["segment", str(inp.ct), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model",
                   str(d / "no-model")])

    def tampered(d):
        import shutil

        shutil.copytree(inp.bundle, d / "bad")
        data = bytearray((d / "bad" / "stage1.pt").read_bytes())
        data[100] ^= 0xFF
        (d / "bad" / "stage1.pt").write_bytes(bytes(data))
        return Setup(seg("--out", d / "o.seg.nrrd", model=d / "bad"))
    yield Case("tampered weights", "", "error", ("stage1.pt",)), tampered

    yield Case("--device cuda without a GPU", "", "error", ("cuda",)), simple(
        lambda d: ["segment", str(inp.ct), "--side", "left", "--model", str(inp.bundle), "--device", "cuda",
                   "--out", str(d / "o.seg.nrrd")])
    yield Case("--parotid missing", "", "error", ("parotid contour not found",)), simple(
        lambda d: seg("--out", d / "o.seg.nrrd", "--parotid", d / "none.seg.nrrd"))
    yield Case("--rtstruct with a NRRD input", "", "error", ("dicom",)), simple(
        lambda d: seg("--out", d / "o.seg.nrrd", "--rtstruct", d / "rs.dcm"))

    def parotid_wrong_side(d):
        flipped = inp.parotid[:, :, ::-1].copy()
        p = segio.write_seg(d / "p.seg.nrrd", {labels.PAROTID: flipped}, inp.geometry)
        return Setup(seg("--out", d / "o.seg.nrrd", "--side", "right", "--parotid", p), user_files=[p])
    yield Case("--parotid on the other side", "", "error", ("side",)), \
        parotid_wrong_side

    # ---- interruptions
    def interrupt(sig):
        def setup(d):
            argv = ["segment", str(inp.big), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--report",
                    str(d / "r.json"), "--model", str(inp.slow), "--device", "cpu", "--progress-lines", "--tta"]
            return Setup(argv, signal_at=("stage1", sig))
        return setup
    yield Case("SIGTERM during stage 1", "", "cancel", ("cancelled",)), interrupt(signal.SIGTERM)
    yield Case("SIGINT during stage 1", "", "cancel", ("cancelled",)), interrupt(signal.SIGINT)
    yield Case("SIGKILL during stage 1", "", "killed"), interrupt(signal.SIGKILL)

    # ---- #15 fault 1: a file that appears during the run
    def appears(name):
        def setup(d):
            return Setup(seg("--out", d / "o.seg.nrrd", "--report", d / "r.json", "--progress-lines"),
                         appear_at=("stage2", d / name))
        return setup
    yield Case("seg file appears during the run", "1", "error", ("appeared while this run",)), appears("o.seg.nrrd")
    yield Case("report appears during the run", "1", "error", ("appeared while this run",)), appears("r.json")

    # ---- #15 fault 2: evaluate across grids that do not overlap
    def eval_far(d):
        g = Geometry((40, 40, 20), (1.0, 1.0, 2.0))
        m = np.zeros(g.shape, np.uint8)
        m[5:15, 10:30, 10:30] = 1
        write_image(d / "ref.nrrd", m, g)
        write_image(d / "pred.nrrd", m, Geometry(g.size, g.spacing, (300.0, 0.0, 0.0)))
        return Setup(["evaluate", "--pred", str(d / "pred.nrrd"), "--ref", str(d / "ref.nrrd"), "--json",
                      str(d / "m.json")], user_files=[d / "ref.nrrd", d / "pred.nrrd"])
    yield Case("evaluate: grids do not overlap", "2", "error", ("do not overlap",)), eval_far

    def eval_other_case(d):
        other = phantom.generate_case(4, side="left", size="small")
        p = segio.write_seg(d / "pred.seg.nrrd", {labels.PAROTID: inp.parotid}, inp.geometry)
        r = segio.write_seg(d / "ref.seg.nrrd", {labels.PAROTID: other.labels[labels.PAROTID]},
                            Geometry(other.geometry.size, other.geometry.spacing,
                                     tuple(np.asarray(other.geometry.origin) + [0, 0, 250.0]),
                                     other.geometry.direction))
        return Setup(["evaluate", "--pred", str(p), "--ref", str(r), "--json", str(d / "m.json")], user_files=[p, r])
    yield Case("evaluate: another case's prediction, 250 mm away", "2", "error", ("do not overlap",)), eval_other_case

    def eval_outside(d):
        g = Geometry((40, 40, 20), (1.0, 1.0, 2.0))
        m = np.zeros(g.shape, np.uint8)
        m[5:15, 10:30, 10:30] = 1
        write_image(d / "ref.nrrd", m, g)
        wide = Geometry((80, 40, 20), g.spacing, (-40.0, 0.0, 0.0))
        pm = np.zeros(wide.shape, np.uint8)
        pm[5:15, 10:30, 5:25] = 1
        write_image(d / "pred.nrrd", pm, wide)
        return Setup(["evaluate", "--pred", str(d / "pred.nrrd"), "--ref", str(d / "ref.nrrd"), "--json",
                      str(d / "m.json")])
    yield Case("evaluate: structure outside the reference grid", "2", "error", ("outside the grid",)), eval_outside

    # ---- #15 fault 3: unwritable outputs
    def file_in_the_way(d):
        (d / "f").write_text("x")
        return d / "f"
    yield Case("--out under a file", "3", "error", ("is a file",)), simple(
        lambda d: seg("--out", file_in_the_way(d) / "o.seg.nrrd"))
    yield Case("--out in /proc", "3", "error", ("cannot write",)), simple(
        lambda d: seg("--out", "/proc/parotidoar-bench.seg.nrrd"))
    yield Case("--out is a folder", "3", "error", ("is a folder",)), simple(lambda d: seg("--out", d))
    yield Case("--report under a file", "3", "error", ("is a file",)), simple(
        lambda d: seg("--out", d / "o.seg.nrrd", "--report", file_in_the_way(d) / "r.json"))
    yield Case("--report in /sys", "3", "error", ("cannot write",)), simple(
        lambda d: seg("--out", d / "o.seg.nrrd", "--report", "/sys/parotidoar-bench.json"))
    yield Case("--out and --report the same file", "3", "error", ("same file",)), simple(
        lambda d: seg("--out", d / "o.seg.nrrd", "--report", d / "o.seg.nrrd"))

    def batch_out_file(d):
        (d / "in").mkdir()
        os.link(inp.ct, d / "in" / "case1.nrrd")
        (d / "f").write_text("x")
        return Setup(["batch", "--input", str(d / "in"), "--out", str(d / "f"), "--side", "left"],
                     user_files=[d / "f"])
    yield Case("batch --out is a file", "3", "error", ("is a file",)), batch_out_file

    def batch_out_proc(d):
        (d / "in").mkdir()
        os.link(inp.ct, d / "in" / "case1.nrrd")
        return Setup(["batch", "--input", str(d / "in"), "--out", "/proc/parotidoar-bench", "--side", "left"])
    yield Case("batch --out in /proc", "3", "error", ("cannot",)), batch_out_proc

    def eval_json_bad(target):
        def setup(d):
            _small_mask(d)
            (d / "f").write_text("x")
            out = d / "f" / "m.json" if target == "file" else Path("/proc/parotidoar-bench.json")
            return Setup(["evaluate", "--pred", str(d / "m.nrrd"), "--ref", str(d / "m.nrrd"), "--json", str(out)])
        return setup
    yield Case("evaluate --json under a file", "3", "error", ("is a file",)), \
        eval_json_bad("file")
    yield Case("evaluate --json in /proc", "3", "error", ("cannot write",)), \
        eval_json_bad("proc")

    def review_json_bad(d):
        (d / "f").write_text("x")
        return Setup(["review-report", str(inp.log), "--json", str(d / "f" / "s.json")])
    yield Case("review-report --json under a file", "3", "error", ("is a file",)), review_json_bad

    def rtstruct_bad(d):
        (d / "f").write_text("x")
        return Setup(["export-rtstruct", "--seg", str(inp.seg20), "--dicom", str(inp.dicom), "--out",
                      str(d / "f" / "rs.dcm")])
    yield Case("export-rtstruct --out under a file", "3", "error", ("is a file",)), \
        rtstruct_bad

    def full_disk(d):
        return Setup(seg("--out", d / "o.seg.nrrd", "--report", d / "r.json"), max_file_bytes=1000)
    yield Case("disk full while writing (a 1000-byte file size limit)", "3", "error", ("cannot write",)), full_disk

    def after_kill(d):  # what a SIGKILL while writing leaves: temporary files of a process that is gone
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        (d / f".o.seg.nrrd.part-{dead}").write_bytes(b"half-written")
        (d / f".r.json.part-{dead}").write_text("{")
        return Setup(seg("--out", d / "o.seg.nrrd", "--report", d / "r.json"))
    yield Case("rerun after a SIGKILL while writing removes its temporary files", "3", "ok",
               outputs=("o.seg.nrrd", "r.json")), after_kill

    # ---- #15 fault 4: field of view
    def huge(d):
        ct, g = synthetic_ct(size=(100, 100, 40), spacing=(10.0, 10.0, 10.0))
        p = write_image(d / "huge.nrrd", ct, g)
        return Setup(["segment", str(p), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model", str(inp.bundle)])
    yield Case("10 mm isotropic, 1 m field of view", "4", "error", ("far beyond",)), huge

    # ---- #15 fault 5: review log
    snippet5 = ("import sys\nfrom ParotidOARLib.review import ReviewLog, ReviewRecord\nfrom ParotidOARLib.errors import "
                "ReviewError\nlog = ReviewLog(sys.argv[1])\nr = ReviewRecord('P1', 'auto', 'Parotid', 3, '', 'dr_a', "
                "'2026-11-23T10:00:00Z')\nlog.append([r])\nlog.jsonl_path.rename(log.folder / 'moved')\n"
                "log.jsonl_path.mkdir()\ntry:\n    log.append([r])\nexcept ReviewError as e:\n    print('error:', e, "
                "file=sys.stderr)\nlog.jsonl_path.rmdir()\n(log.folder / 'moved').rename(log.jsonl_path)\nlog.append([r])\n"
                "n_csv = len(log.read()[0])\nassert n_csv == 2, n_csv\nsys.exit(2)\n")
    yield Case("review log: JSONL append fails", "5", "error", ("cannot append",), outputs=("log",)), lambda d: Setup([str(d / "log")], snippet=snippet5)

    # ---- #15 fault 6: threads
    yield Case("--threads -1", "6", "error", ("--threads",)), simple(
        lambda d: seg("--out", d / "o.seg.nrrd", "--threads", "-1"))
    yield Case("--threads 0 (now refused; before #15 it meant all cores)", "6", "error", ("--threads",)), simple(
        lambda d: seg("--out", d / "o.seg.nrrd", "--threads", "0"))
    yield Case("train --threads -1", "6", "error", ("--threads",)), simple(
        lambda d: ["train", "--threads", "-1", "--data", str(d), "--out", str(d / "b")])

    # ---- #15 fault 7: questionable inputs
    def nan_ct(value):
        def setup(d):
            arr = inp.ct_array.astype(np.float32)
            arr[30, 80, 80:85] = value
            p = write_image(d / "nan.nrrd", arr, inp.geometry)
            return Setup(["segment", str(p), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model",
                          str(inp.bundle)])
        return setup
    yield Case("NaN voxels", "7", "error", ("nan",)), nan_ct(np.nan)
    yield Case("infinite voxels", "7", "error", ("infinite",)), nan_ct(np.inf)

    def sheared(d):
        c, s = np.cos(np.radians(80)), np.sin(np.radians(80))
        g = inp.geometry
        p = write_image(d / "sheared.nrrd", inp.ct_array, Geometry(g.size, g.spacing, g.origin, (1, c, 0, 0, s, 0, 0, 0, 1)))
        return Setup(["segment", str(p), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model", str(inp.bundle)])
    yield Case("sheared direction matrix", "7", "error", ("sheared",)), sheared

    def negative_spacing(d):  # the antero-posterior spacing negated: ITK flips that axis
        import re

        p = write_image(d / "ct.mha", inp.ct_array, inp.geometry, compress=False)
        head, sep, body = p.read_bytes().partition(b"ElementDataFile")
        head = re.sub(rb"ElementSpacing = (\S+) (\S+)", rb"ElementSpacing = \1 -\2", head, count=1)
        p.write_bytes(head + sep + body)
        return Setup(["segment", str(p), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model",
                      str(inp.bundle), "--device", "cpu"])
    yield Case("negative spacing in an MHA header", "7", "ok", warn=("negative value",), outputs=("o.seg.nrrd",)), negative_spacing

    def thick(d):
        ct, g = synthetic_ct(size=(64, 60, 14), spacing=(3.0, 3.0, 10.0))
        p = write_image(d / "thick.nrrd", ct, g)
        return Setup(["segment", str(p), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model",
                      str(inp.bundle), "--device", "cpu"])
    yield Case("10 mm slices", "7", "ok", warn=("10 mm slices",),
               outputs=("o.seg.nrrd",)), thick

    def wrong_side(d):
        ct, g = synthetic_ct(size=(70, 60, 24), spacing=(3.0, 3.0, 3.0), semi_axes_mm=(35.0, 60.0))
        x = g.index_to_lps(np.stack(np.meshgrid(np.arange(70), [0], [0], indexing="ij"), -1).reshape(-1, 3))[:, 0]
        ct[2:5, 20:40, x > 0] = 40
        p = write_image(d / "ct.nrrd", ct, g)
        return Setup(["segment", str(p), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model",
                      str(inp.everywhere), "--device", "cpu"])
    yield Case("chosen side larger than the other (wrong side)", "7", "ok", warn=("looks resected",), outputs=("o.seg.nrrd",)), wrong_side

    # ---- #15 fault 8: messages
    def truncated_dicom(d):
        from dicom_utils import write_ct_series

        info = write_ct_series(d / "dicom", inp.ct_array[20:40], Geometry(
            (160, 160, 20), inp.geometry.spacing, inp.geometry.origin))
        victim = Path(sorted(info["paths"])[5])
        victim.write_bytes(victim.read_bytes()[:-5000])
        return Setup(["segment", str(d / "dicom"), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model",
                      str(inp.bundle)])
    yield Case("truncated DICOM slice", "8", "error", ("truncated",)), truncated_dicom

    def parotid_outside(d):
        g = inp.geometry
        far = Geometry(g.size, g.spacing, tuple(np.asarray(g.origin) + [400.0, 0, 0]), g.direction)
        p = segio.write_seg(d / "p.seg.nrrd", {labels.PAROTID: inp.parotid}, far)
        return Setup(seg("--out", d / "o.seg.nrrd", "--parotid", p))
    yield Case("--parotid contour outside the CT", "8", "error", ("does not lie on the ct",)), parotid_outside

    # ---- other commands that already behaved
    def eval_exists(d):
        _small_mask(d)
        (d / "m.json").write_text("{}")
        return Setup(["evaluate", "--pred", str(d / "m.nrrd"), "--ref", str(d / "m.nrrd"), "--json",
                      str(d / "m.json")], user_files=[d / "m.json"])
    yield Case("evaluate --json exists", "", "error", ("already exists",)), \
        eval_exists

    def eval_labelmap(d):
        _small_mask(d, two_labels=True)
        return Setup(["evaluate", "--pred", str(d / "m.nrrd"), "--ref", str(d / "m.nrrd"), "--json", str(d / "x.json")])
    yield Case("evaluate: label map without --name-map", "", "error", ("--name-map",)), eval_labelmap
    yield Case("evaluate: missing prediction", "", "error", ("not found",)), simple(
        lambda d: ["evaluate", "--pred", str(d / "p.nrrd"), "--ref", str(d / "r.nrrd"), "--json", str(d / "m.json")])
    yield Case("evaluate: bad --name-map", "", "error", ("--name-map",)), simple(
        lambda d: ["evaluate", "--pred", str(inp.ct), "--ref", str(inp.ct), "--json", str(d / "m.json"),
                   "--name-map", "{not json"])

    def review_empty(d):
        (d / "log.csv").write_text("")
        return Setup(["review-report", str(d / "log.csv")])
    yield Case("review-report: empty log", "", "error", ("no valid records",)), review_empty
    yield Case("review-report: missing log", "", "error", ("not",)), simple(
        lambda d: ["review-report", str(d / "none.csv")])

    def batch_empty(d):
        (d / "in").mkdir()
        return Setup(["batch", "--input", str(d / "in"), "--out", str(d / "out"), "--side", "left"])
    yield Case("batch: empty input folder", "", "error", ("no",)), batch_empty

    def models_verify_tampered(d):
        import shutil

        shutil.copytree(inp.bundle, d / "bad")
        data = bytearray((d / "bad" / "stage2.pt").read_bytes())
        data[200] ^= 0xFF
        (d / "bad" / "stage2.pt").write_bytes(bytes(data))
        return Setup(["models", "verify", str(d / "bad")])
    yield Case("models verify: tampered bundle", "", "error", ("stage2.pt",)), \
        models_verify_tampered

    def dicom_missing_slice(d):
        from dicom_utils import write_ct_series

        write_ct_series(d / "dicom", inp.ct_array[20:40], Geometry((160, 160, 20), inp.geometry.spacing,
                                                                   inp.geometry.origin), drop_slices=(7,))
        return Setup(["segment", str(d / "dicom"), "--side", "left", "--out", str(d / "o.seg.nrrd"), "--model",
                      str(inp.bundle)])
    yield Case("DICOM: missing slice", "", "error", ("missing slice",)), dicom_missing_slice

    def rtstruct_exists(d):
        (d / "rs.dcm").write_text("theirs")
        return Setup(["export-rtstruct", "--seg", str(inp.seg20), "--dicom", str(inp.dicom), "--out",
                      str(d / "rs.dcm")], user_files=[d / "rs.dcm"])
    yield Case("export-rtstruct --out exists", "", "error", ("already exists",)), \
        rtstruct_exists

    def rtstruct_ok(d):
        return Setup(["export-rtstruct", "--seg", str(inp.seg20), "--dicom", str(inp.dicom), "--out", str(d / "rs.dcm")])
    yield Case("export-rtstruct, a normal run", "", "ok", outputs=("rs.dcm",)), rtstruct_ok

    def review_ok(d):
        return Setup(["review-report", str(inp.log), "--json", str(d / "s.json")])
    yield Case("review-report, a normal run", "", "ok", outputs=("s.json",)), review_ok

    # ---- a normal run, for reference
    def normal(d):
        return Setup(seg("--out", d / "o.seg.nrrd", "--report", d / "r.json"))
    yield Case("normal run", "", "ok", outputs=("o.seg.nrrd", "r.json")), normal


# --------------------------------------------------------------------------- running one case
def _run(setup: Setup) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    if setup.snippet is not None:
        cmd = [sys.executable, "-c", setup.snippet, *setup.argv]
    else:
        cmd = [sys.executable, "-m", "ParotidOARLib", *setup.argv]
    def preexec():
        # SIGINT back to its default in the child: a shell's background job starts with it ignored, and Python
        # then installs no KeyboardInterrupt handler
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if setup.max_file_bytes:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (setup.max_file_bytes, setup.max_file_bytes))

    if setup.signal_at is None and setup.appear_at is None:
        p = subprocess.run(cmd, cwd=CODE, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S,
                           preexec_fn=preexec)
        return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0
    proc = subprocess.Popen(cmd, cwd=CODE, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec)
    out_lines = []
    for line in proc.stdout:
        out_lines.append(line)
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "PROGRESS":
            if setup.signal_at and parts[2] == setup.signal_at[0]:
                proc.send_signal(setup.signal_at[1])
                break
            if setup.appear_at and parts[2] == setup.appear_at[0] and not setup.appear_at[1].exists():
                setup.appear_at[1].write_text(APPEARED_TEXT)
                setup.user_files.append(setup.appear_at[1])
    rest, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, "".join(out_lines) + (rest or ""), err, time.perf_counter() - t0


def run_case(case: Case, make, root: Path) -> dict:
    d = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    setup = make(d)
    had = sorted(p.name for p in d.iterdir())  # what the "user" had before the run: inputs, files in the way
    # (a killed run's temporary files are not the user's: a later run may remove them)
    watched = list(setup.user_files) + [d / n for n in had if ".part-" not in n]
    before = _snapshot(watched)
    rc, out, err, seconds = _run(setup)
    err_lines = [ln for ln in err.splitlines() if ln.strip()]
    # ours: "error: ..."; argparse's: "python -m ParotidOARLib segment: error: ..." after its usage line
    errors = [ln for ln in err_lines if ln.startswith("error:") or ": error: " in ln]
    warnings = [ln for ln in err_lines if ln.startswith("warning:")]
    traceback = "Traceback (most recent call last)" in err
    after = _snapshot(watched)
    lost = [Path(p).name for p, h in before.items() if after.get(p) != h]
    if case.force:
        lost = []
    lost += [Path(p).name for p in before if not Path(p).exists()]
    if setup.appear_at and not case.force:  # the file the user saved during the run must still be theirs
        p = setup.appear_at[1]
        if p.exists() and p.read_bytes() != APPEARED_TEXT.encode():
            lost.append(p.name)
    appeared = {Path(p).name for p in setup.user_files}
    present = sorted(p.name for p in d.iterdir())
    allowed = set(case.outputs) | appeared | {n for n in had if ".part-" not in n}
    leftovers = [n for n in present if n not in allowed]
    problems = []
    if traceback:
        problems.append("traceback")
    if lost:
        problems.append(f"lost or overwritten: {lost}")
    if leftovers:
        problems.append(f"left behind: {leftovers}")
    message = errors[-1] if errors else (err_lines[-1] if err_lines else "")
    if case.expect in ("error", "usage"):
        expected = 64 if case.expect == "usage" else 2
        if rc != expected:
            problems.append(f"exit {rc}, expected {expected}" + (" (a wrong answer with exit 0)" if rc == 0 else ""))
        if len(errors) != 1:
            problems.append(f"{len(errors)} error lines")
        elif not all(w.lower() in errors[0].lower() for w in case.words):
            problems.append(f"message lacks {case.words}")
    elif case.expect == "cancel":
        if rc != 130:
            problems.append(f"exit {rc}, expected 130")
    elif case.expect == "killed":
        if rc != -signal.SIGKILL:
            problems.append(f"exit {rc}, expected -9")
        if any(n in present for n in ("o.seg.nrrd", "r.json")):
            problems.append("a partial output is visible")
    elif case.expect == "ok":
        if rc != 0:
            problems.append(f"exit {rc}, expected 0")
        missing = [o for o in case.outputs if not (d / o).exists()]
        if missing:
            problems.append(f"missing outputs {missing}")
        if case.warn and not any(all(w.lower() in ln.lower() for w in case.warn) for ln in warnings):
            problems.append(f"no warning with {case.warn}")
        if any(".part-" in n for n in present):
            problems.append("temporary files remain")
    return {"case": case.name, "fault": case.fault, "expect": case.expect, "exit_code": rc,
            "message": message[:400], "warnings": [w[:300] for w in warnings], "traceback": traceback,
            "leftovers": leftovers, "lost_or_overwritten": lost, "seconds": round(seconds, 2),
            "clean": not problems, "problems": problems}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results" / "bad_inputs.json"))
    ap.add_argument("--only", nargs="*", help="run only the cases whose name contains one of these words")
    ap.add_argument("--code", default=None, help="a checkout whose ParotidOARLib to run instead of this one "
                                                 "(e.g. `git archive <commit>` unpacked), to see the faults it has")
    args = ap.parse_args(argv)
    if args.code:
        global CODE
        CODE = Path(args.code).resolve()
        ENV["PYTHONPATH"] = str(CODE)
    rows = []
    with tempfile.TemporaryDirectory(prefix="parotidoar-bad-inputs-") as tmp:
        root = Path(tmp)
        inp = Inputs(root / "inputs")
        for case, make in cases(inp):
            if args.only and not any(w.lower() in case.name.lower() for w in args.only):
                continue
            row = run_case(case, make, root)
            rows.append(row)
            mark = "ok  " if row["clean"] else "FAIL"
            print(f"{mark} [{row['fault'] or '-'}] {case.name}: exit {row['exit_code']}; {row['message'][:110]}"
                  + (f"  <- {row['problems']}" if row["problems"] else ""), flush=True)
    clean = sum(r["clean"] for r in rows)
    result = {
        "benchmark": "bad inputs (issue #15): python -m ParotidOARLib as a careless or hostile user would use it",
        "inputs": "small phantom (seed 3, left, size='small': 160x160x60 at 0.98x0.98x2 mm) and small synthetic "
                  "head CTs; tiny random-weight bundles (Testing/bundle_utils.py)",
        "code": str(CODE),
        "python": platform.python_version(), "platform": platform.platform(),
        "summary": {"cases": len(rows), "clean": clean, "not_clean": [r["case"] for r in rows if not r["clean"]],
                    "by_fault": {f: sum(1 for r in rows if r["fault"] == f) for f in sorted({r["fault"] for r in rows})}},
        "cases": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{clean}/{len(rows)} clean; wrote {out}")
    return 0 if clean == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
