"""Propagating objects prompted on one slice through a stack (Z or T as the leading axis).

This module holds the types shared by the propagation methods: the prompt of one object on one
slice, and the result of propagating a set of objects through a stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class SlicePrompt:
    """One object prompted on one slice of a stack, in native pixels of that slice.

    slice_index: index along the stack's leading axis. box: (x0, y0, x1, y1) or None.
    points: (P, 2) xy clicks (may be empty); point_labels: (P,) 1 positive / 0 negative.
    object_id: the label the object gets in the result (>= 1).
    """

    slice_index: int
    object_id: int
    box: Sequence[float] | None = None
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class PropagationResult:
    """Objects segmented through a stack.

    labels: (Z, H, W) uint32 label volume, 0 background, object ids from the prompts.
    scores: {object_id: {slice_index: predicted IoU}} for every slice the object was found on.
    extents: {object_id: (first_slice, last_slice)} inclusive range where the object was found.
    """

    labels: np.ndarray
    scores: dict[int, dict[int, float]]
    extents: dict[int, tuple[int, int]]
