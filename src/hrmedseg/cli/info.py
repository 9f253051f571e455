"""``hrmedseg info``: versions, devices and where weights are looked for."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show versions, devices and the weights cache folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__

    print(f"hrmedseg {__version__}, torch {torch.__version__}")
    print(f"CUDA: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    from ..weights.registry import cache_dir

    print(f"weights cache: {cache_dir()}")
    return 0
