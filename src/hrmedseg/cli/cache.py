"""``hrmedseg cache``: the crop embeddings kept on disk (``hrmedseg.engine.disk_cache``).

    hrmedseg cache info [--dir DIR]      # where, how many entries, how many bytes
    hrmedseg cache clear [--dir DIR]     # remove every entry (recomputed when next needed)
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="show or clear the crop embeddings kept on disk", description=__doc__.splitlines()[0])
    csub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    for name, func, text in (("info", run_info, "show the cache folder, its entries and size"), ("clear", run_clear, "remove every entry")):
        c = csub.add_parser(name, help=text)
        c.add_argument("--dir", metavar="DIR", help="cache folder (default: embeddings in the user cache)")
        c.set_defaults(func=func)


def run_info(args: argparse.Namespace) -> int:
    from ..engine.disk_cache import DiskEmbeddingCache

    info = DiskEmbeddingCache(args.dir).info()
    print(f"embedding cache: {info['root']}")
    print(f"entries: {info['entries']}, {info['bytes'] / 2**20:.1f} MiB of at most {info['max_bytes'] / 2**20:.0f} MiB")
    return 0


def run_clear(args: argparse.Namespace) -> int:
    from ..engine.disk_cache import DiskEmbeddingCache

    cache = DiskEmbeddingCache(args.dir)
    print(f"removed {cache.clear()} entries from {cache.root}")
    return 0
