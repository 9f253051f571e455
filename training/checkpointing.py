"""Resumable training state, written atomically so a killed run never leaves a broken file.

The state file (``<out>.state.pt``) holds everything needed to continue: model, optimiser,
scheduler and grad-scaler states, the epoch reached, the best score so far and the history.
It is separate from the model bundle (``<out>``), which is what the annotator and the CLI load.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from hrmedseg.atomic import atomic_path
from hrmedseg.errors import WeightsError

STATE_FORMAT = "hrmedseg-training-state"


def state_path_for(out: str | os.PathLike) -> Path:
    """``model.pt`` -> ``model.state.pt`` (beside the weights it belongs to)."""
    out = Path(out)
    return out.with_name(out.stem + ".state" + (out.suffix or ".pt"))


def log_path_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".log.csv")


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a training state atomically (the previous file stays until the new one is complete)."""
    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)
    return Path(path)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state; errors name the file and say what to do."""
    path = Path(path)
    try:
        # Our own file: optimiser states hold plain Python containers and numbers only.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise WeightsError(
            f"cannot resume from {path}: the file is unreadable ({type(err).__name__}); delete it to start afresh"
        ) from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise WeightsError(f"{path} is not a training state written by hrmedseg.training")
    return state


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
