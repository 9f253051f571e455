"""``hrmedseg weights``: list, fetch, import and locate named weights."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="list, download (only when asked), import and locate weights",
        description="Named weights: nothing is downloaded unless you run `hrmedseg weights fetch`.",
    )
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")

    ls = wsub.add_parser("list", help="show every named weights file and whether it is on this computer")
    ls.add_argument("--weights-dir", metavar="DIR", help="also look in this folder")
    ls.set_defaults(func=run_list)

    fe = wsub.add_parser("fetch", help="download NAME if it is not already here (verified by sha256)")
    fe.add_argument("name", metavar="NAME")
    fe.add_argument("--weights-dir", metavar="DIR", help="look here first and download into this folder instead of the cache")
    fe.set_defaults(func=run_fetch)

    im = wsub.add_parser("import", help="make a compact hrmedseg bundle from a SAM/SAM2/HRMedSeg checkpoint file")
    im.add_argument("path", metavar="PATH", help="checkpoint file, e.g. sam_vit_h_4b8939.pth")
    im.add_argument("--name", help="bundle name (default: from the file, e.g. sam_vit_h_prompt_decoder)")
    im.add_argument("--out", metavar="FILE", help="write here instead of the cache")
    im.set_defaults(func=run_import)

    pa = wsub.add_parser("path", help="print the verified local path of NAME (never downloads)")
    pa.add_argument("name", metavar="NAME")
    pa.add_argument("--weights-dir", metavar="DIR", help="look in this folder first")
    pa.set_defaults(func=run_path)


def run_list(args: argparse.Namespace) -> int:
    from ..weights.registry import cache_dir, default_registry

    registry = default_registry()
    rows = [("NAME", "KIND", "SIZE", "STATUS", "LICENCE")]
    for e in registry.list():
        status = registry.status(e.name, args.weights_dir)
        if status == "missing" and e.url is None and not e.derived_from:
            status = "missing (no public URL)"
        if status == "missing" and e.derived_from:
            status = f"missing (made from {e.derived_from})"
        rows.append((e.name, e.kind, e.size_text, status, e.licence.split(";")[0]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    print(f"\ncache: {cache_dir()}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from ..models.importing import resolve_weights

    print(resolve_weights(args.name, args.weights_dir, download=True))
    return 0


def run_import(args: argparse.Namespace) -> int:
    from ..weights.bundle import load_bundle
    from ..models.importing import import_checkpoint
    from ..weights.registry import human_size

    dest = import_checkpoint(args.path, dest_path=args.out, name=args.name)
    bundle = load_bundle(dest)
    n = sum(t.numel() for t in bundle["state_dict"].values())
    print(
        f"{dest}: {bundle['architecture']} {bundle['config']}, {len(bundle['state_dict'])} tensors, "
        f"{n / 1e6:.2f} M parameters, {human_size(dest.stat().st_size)}"
    )
    return 0


def run_path(args: argparse.Namespace) -> int:
    from ..models.importing import resolve_weights

    print(resolve_weights(args.name, args.weights_dir, download=False))
    return 0
