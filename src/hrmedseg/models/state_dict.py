"""Matching checkpoint tensors to a model, with errors that say what did not match."""

from __future__ import annotations

from typing import Iterable, Mapping

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


def compare_state(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], required: Iterable[str]
) -> tuple[list[str], list[str], list[str]]:
    """What of ``state`` does not fit ``own`` (the model tensors it may fill), for :func:`describe_mismatch`.

    Returns (missing: the ``required`` keys ``state`` lacks, in their order; unexpected: sorted
    keys of ``state`` that ``own`` lacks; mismatched: "key: file (shape) vs model (shape)" for
    shared keys of another shape, in ``own``'s order).
    """
    missing = [k for k in required if k not in state]
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, mismatched


def load_matching(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model``, requiring every learned tensor to match by name and shape.

    Raises:
        WeightsError: naming ``source``, the missing and unexpected keys and any shape mismatches.
    """
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(RECOMPUTED_SUFFIXES)}
    own = model.state_dict()
    missing, unexpected, mismatched = compare_state(own, state_dict, sorted(own))
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{source} does not fit {type(model).__name__}: " + describe_mismatch(missing, unexpected, mismatched)
            + ". Is it a checkpoint for another architecture or width?"
        )
    model.load_state_dict(state_dict, strict=True)
