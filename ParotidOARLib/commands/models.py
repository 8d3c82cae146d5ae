"""``python -m ParotidOARLib models list|verify|install|import-nnunet`` — manage model bundles.

Examples::

    parotid-oar models list
    parotid-oar models verify parotid-oar-research-v1
    parotid-oar models install path/to/bundle [--force]
    # an nnU-Net v2 model as stage 2 (stage 1 from the default bundle), then its stage 1 into the same bundle
    parotid-oar models import-nnunet nnUNet_results/Dataset502_ParotidOARStage2/nnUNetTrainer__nnUNetPlans__3d_fullres \
        --stage 2 --folds 0 1 2 3 4 --out my-nnunet-bundle
    parotid-oar models import-nnunet nnUNet_results/Dataset501_Parotid/nnUNetTrainer__nnUNetPlans__3d_fullres \
        --stage 1 --label-map names.json --out my-nnunet-bundle --force

See docs/nnunet.md.

Bundles are found in the user's models folder (``$PAROTIDOAR_USER_MODELS``, default
``~/.local/share/ParotidOAR/Models`` on Linux; shared with the Slicer module) and in
``$PAROTIDOAR_MODELS`` (default: the models shipped with the package). ``install`` writes to
``$PAROTIDOAR_MODELS`` if set, else to the user's folder.
"""

from __future__ import annotations

import json


def add_arguments(p):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="list installed bundles and whether they verify")
    ls.add_argument("--root", default=None, help="list only this models folder (default: the user's models "
                    "folder and $PAROTIDOAR_MODELS or the shipped models)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    v = sub.add_parser("verify", help="check a bundle's manifest and SHA-256 of every weight file")
    v.add_argument("path", nargs="?", default=None, help="bundle folder or installed bundle name "
                   "(default: the default bundle)")
    i = sub.add_parser("install", help="verify a bundle and copy it into the models folder")
    i.add_argument("path", help="bundle folder to install")
    i.add_argument("--root", default=None, help="models folder to install into (default: $PAROTIDOAR_MODELS "
                   "if set, else the user's models folder)")
    i.add_argument("--force", action="store_true", help="replace an installed bundle of the same name")
    n = sub.add_parser("import-nnunet", help="import an nnU-Net v2 trained model as stage 1 or 2 of a bundle")
    n.add_argument("results_dir", metavar="RESULTS_DIR",
                   help="nnU-Net v2 trained-model folder (<trainer>__<plans>__<configuration>, with plans.json, "
                        "dataset.json and fold_*/)")
    n.add_argument("--stage", required=True, choices=["1", "2"], help="which cascade stage the model becomes")
    n.add_argument("--folds", nargs="+", default=None, metavar="FOLD",
                   help="folds to import, averaged (default: every fold_N with the checkpoint; 'all' = fold_all/)")
    n.add_argument("--checkpoint", choices=["final", "best"], default="final",
                   help="checkpoint_final.pth (default, as nnU-Net) or checkpoint_best.pth")
    n.add_argument("--label-map", default=None, metavar="JSON",
                   help='JSON mapping dataset.json label names to ParotidOAR names, e.g. {"parotid_res": "Parotid"} '
                        "(not needed for names that already are canonical)")
    n.add_argument("--out", required=True, help="bundle folder: an existing bundle gets this stage replaced (with "
                                                "--force); a new one takes the other stage from --base")
    n.add_argument("--force", action="store_true", help="replace this stage of an existing --out bundle")
    n.add_argument("--base", default=None, help="bundle (folder or name) for the other stage of a new bundle "
                                                "(default: the default bundle)")
    n.add_argument("--input-region", choices=["side", "whole", "roi"], default=None,
                   help="what the model was trained on: stage 1 'side' (default) or 'whole' CT; stage 2 'roi'")
    n.add_argument("--context-mm", type=float, default=8.0,
                   help="stage 2: tissue around the ROI box in the crop (default 8, as train --export-nnunet)")
    n.add_argument("--flip", nargs="+", choices=["z", "y", "x"], default=None,
                   help="axes the training images were flipped along relative to an LPS-aligned grid (default none)")
    n.add_argument("--name", default=None, help="bundle name (default: the --out folder name, or the existing one)")
    n.add_argument("--version", default=None, help="bundle version (default 1.0.0, or the existing one)")


def run(args) -> int:
    from .. import bundle

    if args.action == "list":
        if args.root:
            roots = [str(args.root)]
            entries = bundle.list_bundles(args.root)
        else:
            roots = [str(r) for r in bundle.search_roots()]
            entries = bundle.list_installed()
        if args.json:
            print(json.dumps({"root": roots[-1], "roots": roots, "bundles": entries}, indent=2))
            return 0 if all(e["ok"] for e in entries) else 1
        if not entries:
            print(f"No model bundles in {' or '.join(roots)}. Train one (parotid-oar train ...) or install one "
                  "(parotid-oar models install PATH).")
            return 0
        for e in entries:
            status = "ok" if e["ok"] else "BROKEN"
            use = "clinical" if e["clinical_use"] else "research only - not for clinical use"
            star = " (default)" if e["default"] else ""
            print(f"{e['name']} {e['version']}{star}  [{status}; {use}]  {e['path']}")
            if e["error"]:
                print(f"    {e['error']}")
        return 0 if all(e["ok"] for e in entries) else 1
    if args.action == "verify":
        path = bundle.resolve_bundle_dir(args.path)
        m = bundle.verify(path)
        print(f"{path}: OK ({m.name} {m.version}; "
              + ", ".join(f"{s} sha256 {m.stage(s)['sha256'][:12]}…" for s in bundle.STAGES) + ")")
        if not m.clinical_use:
            print("Research use only - NOT FOR CLINICAL USE.")
        return 0
    if args.action == "import-nnunet":
        from .. import nnunet

        flip = [{"z": 0, "y": 1, "x": 2}[a] for a in args.flip] if args.flip else None
        out, summary = nnunet.import_stage(args.results_dir, int(args.stage), args.out, folds=args.folds,
                                           label_map=args.label_map, checkpoint=args.checkpoint, base=args.base,
                                           input_region=args.input_region, context_mm=args.context_mm, flip=flip,
                                           name=args.name, version=args.version, force=args.force)
        how = "replaced in" if summary["replaced_in_existing_bundle"] else "written to new bundle"
        print(f"{summary['stage']} {how} {out}: nnU-Net {summary['configuration']}, fold(s) "
              f"{' '.join(summary['folds'])}; labels {', '.join(summary['labels'][1:])}; spacing "
              f"{summary['spacing_xyz']} mm (x, y, z); patch {summary['patch_size_zyx']} (z, y, x); input "
              f"{summary['input_region']}; other stage from {summary['other_stage_from']}.")
        print("Research use only - NOT FOR CLINICAL USE.")
        return 0
    if args.action == "install":
        dest = bundle.install(args.path, root=args.root, force=args.force)
        print(f"installed {args.path} → {dest}")
        return 0
    return 2
