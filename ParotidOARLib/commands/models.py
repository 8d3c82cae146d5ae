"""``python -m ParotidOARLib models list|verify|install`` — manage model bundles.

Examples::

    parotid-oar models list
    parotid-oar models verify parotid-oar-research-v1
    parotid-oar models install path/to/bundle [--force]

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
    if args.action == "install":
        dest = bundle.install(args.path, root=args.root, force=args.force)
        print(f"installed {args.path} → {dest}")
        return 0
    return 2
