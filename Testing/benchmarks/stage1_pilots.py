"""Stage-1 architecture pilots (issue 12): short trainings of a few candidate networks and grids, each scored on
whole OpenKBP validation volumes through the ``segment`` code path.

Each pilot trains stage 1 from scratch on OpenKBP (recipe v2, the learning rate decaying over the pilot's wall
clock, ``--lr-schedule time``) for ``--minutes`` minutes, in its own work folder under ``runs/pilots/``. A
stopped pilot continues where it stopped when the script is run again (``train --resume``; the budget counts
the training time already spent). Then its last checkpoint segments every validation side whole
(``training.Stage1VolumeValidator``: ``cascade.run(parotid_only=True)``, the side cut, grid, sliding window and
post-processing of ``segment``) and the mean, median and SD of the parotid DSC are written, with the training
speed and the validation time per side (a proxy for the pilot's inference cost).

Pilots (``--pilots`` picks some):

* ``4stage_4x4x3``: models 1.2.0/1.3.0's stage 1: 4 resolution stages, 4×4×3 mm, patch 32×48×40 (z, y, x);
* ``5stage_4x4x3``: 5 stages, a patch of 32×64×48 covering most of a side crop;
* ``4stage_3.9x3.9x2.5``: the data's median grid, patch 48×48×40 (the same millimetres in z);
* ``5stage_3.9x3.9x2.5``: both, patch 48×64×48.

All use 32 base features (the cap is 128) and batch 2. Run it alone on the machine, one pilot after the other
(``--threads 2``)::

    .venv/bin/python Testing/benchmarks/stage1_pilots.py [--minutes 20] [--pilots NAME ...] [--onednn]

Writes Testing/benchmarks/results/stage1_pilots.json after every pilot. Research use only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

EXCLUDE = ("pt_221", "pt_131", "pt_143", "pt_38", "pt_89", "pt_94")  # pt_221: masks off the CT; others: no parotid
PILOTS = {
    "4stage_4x4x3": {"stages1": 4, "spacing1": (4.0, 4.0, 3.0), "patch1": (32, 48, 40)},
    "5stage_4x4x3": {"stages1": 5, "spacing1": (4.0, 4.0, 3.0), "patch1": (32, 64, 48)},
    "4stage_3.9x3.9x2.5": {"stages1": 4, "spacing1": (3.906, 3.906, 2.5), "patch1": (48, 48, 40)},
    "5stage_3.9x3.9x2.5": {"stages1": 5, "spacing1": (3.906, 3.906, 2.5), "patch1": (48, 64, 48)},
}


def train_command(name: str, spec: dict, args) -> list[str]:
    cmd = [sys.executable, "-m", "ParotidOARLib", "train", "--format", "openkbp", "--data", str(args.data),
           "--exclude", *EXCLUDE, "--stage", "1", "--work-dir", str(Path(args.work_root) / name),
           "--base-features", "32", "--stages1", str(spec["stages1"]),
           "--spacing1", *[f"{v:g}" for v in spec["spacing1"]], "--patch1", *[str(v) for v in spec["patch1"]],
           "--epochs", "400", "--iterations-per-epoch", "50", "--lr-schedule", "time",
           "--max-minutes", f"{args.minutes:g}", "--threads", str(args.threads), "--no-progress", "--resume"]
    if args.onednn:
        cmd.append("--onednn")
    return cmd


def evaluate(run_dir: Path, samples, threads: int) -> dict:
    import torch

    from ParotidOARLib import training
    from ParotidOARLib.network import UNetConfig, build

    ck = training.load_checkpoint(run_dir, "last")
    net = build(UNetConfig.from_dict(ck["network"]))
    net.load_state_dict(ck["model"])
    val = training.Stage1VolumeValidator(samples, ck["spacing"], ck["patch"], threads=threads, log=lambda m: None)
    t = time.perf_counter()
    with torch.no_grad():
        res = val(net, ck["normalisation"])
    st = ck["state"]
    return {"iterations": st["iteration"], "train_minutes": round(st["elapsed_s"] / 60, 1),
            "seconds_per_iteration": round(st["elapsed_s"] / max(st["iteration"], 1), 3),
            "network": ck["network"], "spacing": ck["spacing"], "patch_zyx": ck["patch"],
            "parameters": int(sum(p.numel() for p in net.parameters())),
            "validation_seconds_per_side": round((time.perf_counter() - t) / max(res["n"], 1), 2),
            "mean_dsc": round(res["mean_dsc"], 4), "median_dsc": round(res["median_dsc"], 4),
            "sd_dsc": round(res["sd_dsc"], 4), "n": res["n"], "rows": res["rows"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "openkbp"))
    ap.add_argument("--pilots", nargs="+", choices=list(PILOTS), default=list(PILOTS))
    ap.add_argument("--minutes", type=float, default=20.0, help="training minutes per pilot (default 20)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onednn", action="store_true", help="train with every convolution through oneDNN")
    ap.add_argument("--work-root", default=str(REPO / "runs" / "pilots"))
    ap.add_argument("--dry-run", action="store_true", help="print the training commands and stop")
    ap.add_argument("--out", default=str(HERE / "results" / "stage1_pilots.json"))
    args = ap.parse_args(argv)
    val_root = Path(args.data) / "validation"
    if not val_root.is_dir() and not args.dry_run:
        print(f"OpenKBP data not found at {val_root}; nothing to do.")
        return 0
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update({"what": "stage-1 pilots (issue 12): from scratch on OpenKBP, recipe v2, lr decaying over the "
                           "pilot's wall clock; last checkpoint on whole validation volumes (segment's path)",
                   "minutes_per_pilot": args.minutes, "threads": args.threads, "onednn": bool(args.onednn),
                   "validation": f"OpenKBP validation minus {', '.join(EXCLUDE)}"})
    result.setdefault("pilots", {})
    samples = None
    for name in args.pilots:
        cmd = train_command(name, PILOTS[name], args)
        print(" ".join(cmd), flush=True)
        if args.dry_run:
            continue
        t = time.time()
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        if proc.returncode != 0:
            print(f"{name}: training failed ({proc.returncode}); stopping", flush=True)
            return 1
        if samples is None:
            from ParotidOARLib import dataset

            samples, _ = dataset.discover(val_root, "openkbp", exclude=("pt_221",))
        r = evaluate(Path(args.work_root) / name / "stage1", samples, args.threads)
        r["command"] = " ".join(["python", *cmd[1:]]).replace(str(REPO) + "/", "")
        r["wall_minutes"] = round((time.time() - t) / 60, 1)
        result["pilots"][name] = r
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"{name}: {r['iterations']} iterations in {r['train_minutes']} min ({r['seconds_per_iteration']} s/it), "
              f"whole-volume validation DSC {r['mean_dsc']:.3f} (median {r['median_dsc']:.3f}, n {r['n']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
