"""Matching checkpoint tensors to a model, with errors that say what did not match."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..weights.bundle import WeightsError

# Buffers the authors' files carry that we recompute (RoPE tables) and may ignore.
RECOMPUTED_SUFFIXES = (".rope.rotations",)


def describe_mismatch(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    """'3 missing (e.g. a, b, c), 1 unexpected (e.g. d)': what did not match, with examples."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        parts.append(f"{len(mismatched)} of another shape (e.g. {'; '.join(mismatched[:3])})")
    return ", ".join(parts)


def load_matching(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model``, requiring every learned tensor to match by name and shape.

    Raises:
        WeightsError: naming ``source``, the missing and unexpected keys and any shape mismatches.
    """
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(RECOMPUTED_SUFFIXES)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{source} does not fit {type(model).__name__}: " + describe_mismatch(missing, unexpected, mismatched)
            + ". Is it a checkpoint for another architecture or width?"
        )
    model.load_state_dict(state_dict, strict=True)
