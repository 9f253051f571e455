"""What every benchmark prints and saves: the result as JSON, and the CPU it ran on."""

from __future__ import annotations

import json
from pathlib import Path


def cpu_name() -> str:
    """The CPU model (sessions land on Intel and AMD CPUs alike): :func:`hrmedseg.models.calibration.cpu_model`."""
    from hrmedseg.models.calibration import cpu_model

    return cpu_model()


def cpu_summary() -> dict:
    """The CPU model, its bf16 flags and the backend "auto" picks on it (measured once, cached)."""
    import torch

    from hrmedseg.models.calibration import BF16_FLAGS, cpu_flags
    from hrmedseg.models.runtime import select_backend

    return {"cpu": cpu_name(), "bf16_flags": sorted(BF16_FLAGS & cpu_flags()), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "auto_backend": select_backend("cpu")}


def print_and_save(result: dict, json_path: str | None) -> None:
    """Print ``result`` as indented JSON, and write the same text to ``json_path`` when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if json_path:
        Path(json_path).write_text(text)
