"""``hrmedseg info``: versions, devices and where weights are looked for."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show versions, devices, the CPU backend chosen and the weights cache folder")
    p.add_argument("--no-calibrate", action="store_true", help="do not time the CPU backends if no choice is cached yet")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__

    print(f"hrmedseg {__version__}, torch {torch.__version__}")
    print(f"CUDA: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    from ..weights.registry import cache_dir

    print(f"weights cache: {cache_dir()}")
    print_cpu_backend(calibrate=not args.no_calibrate)
    print(aot_summary())
    from ..models.malloc_tuning import keep_freed_memory

    print(f"CPU memory reuse (malloc tuning, as the engine applies it): {keep_freed_memory()}")
    return 0


def aot_summary() -> str:
    """One line: whether CPU encoders are compiled ahead of time, for the annotator and for CLI calls."""
    from ..models.aot_cache import aot_cache_dir, aot_enabled, aot_setting

    setting = aot_setting()
    if setting is not None:
        state = f"{'on' if setting else 'off'} everywhere (HRMEDSEG_AOT={int(setting)})"
    elif aot_enabled(default=True):
        state = ("compiled in the napari annotator; batch workers use a package compiled earlier and compile none;"
                 " off for other CLI calls (HRMEDSEG_AOT=1 / 0: compile everywhere / off)")
    else:
        state = "none compiled (no C++ compiler found: AOTInductor needs one); the annotator and batch workers use packages compiled earlier"
    return f"ahead-of-time compiled CPU encoder: {state}; packages in {aot_cache_dir()}"


def print_cpu_backend(calibrate: bool = True) -> None:
    """The CPU, its bf16 flags, and the backend "auto" picks on it, with the reason."""
    import os

    from ..models.calibration import (
        BF16_FLAGS, calibration_enabled, calibration_key, calibration_path, cpu_choice, cpu_flags, cpu_model, load_choice,
    )

    bf16 = sorted(BF16_FLAGS & cpu_flags())
    print(f"CPU: {cpu_model()}, bf16 instructions: {', '.join(bf16) if bf16 else 'none'}")
    forced = os.environ.get("HRMEDSEG_BACKEND")
    if forced:
        print(f"CPU backend: {forced} (set by HRMEDSEG_BACKEND)")
        return
    if not calibration_enabled():
        from ..models.runtime import select_backend

        print(f"CPU backend: {select_backend('cpu')} (HRMEDSEG_CALIBRATE=0: static rule, bf16 only with AMX)")
        return
    choice = cpu_choice() if calibrate else load_choice(calibration_key())
    if choice is None:
        print("CPU backend: not measured yet on this machine (measured on first use; run `hrmedseg info` to measure now)")
        return
    print(f"CPU backend: {choice.backend}: {choice.reason()}")
    print(f"backend choices cached in: {calibration_path()}")
