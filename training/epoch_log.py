"""The per-epoch log of a training run: a CSV line per epoch, and optionally TensorBoard scalars.

The CSV (``<out stem>.log.csv``) is always written; list values (per-class Dice) are joined with
';'. With a TensorBoard folder every numeric value of the row is also written as a scalar, at
the epoch as global step: ``train_loss`` as ``train/loss``, ``val_dice`` as ``val/dice``, the
other columns under their own name, and list values as ``tag/0``, ``tag/1`` ...

TensorBoard is optional (``pip install tensorboard``); :func:`require_tensorboard` says so before
a run starts rather than after its first epoch.
"""

from __future__ import annotations

import csv
import numbers
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from hrmedseg.errors import HRMedSegError

# Columns that are the x axis in TensorBoard, not a curve of their own.
_AXIS_COLUMNS = ("epoch",)


def require_tensorboard() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or an error that says how to install TensorBoard."""
    try:
        # Imported first and by name: torch.utils.tensorboard may already sit in sys.modules from
        # an earlier import, and would then hide a missing (or deliberately blocked) tensorboard.
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise HRMedSegError("--tensorboard needs the 'tensorboard' package, which is not installed: "
                            "pip install tensorboard") from err
    return SummaryWriter


def tensorboard_tag(column: str) -> str:
    """``train_loss`` -> ``train/loss``, ``val_dice`` -> ``val/dice``; other columns keep their name."""
    for group in ("train", "val"):
        if column.startswith(group + "_"):
            return f"{group}/{column[len(group) + 1:]}"
    return column


class EpochLog:
    """Appends one row per epoch to ``csv_path`` and, with ``tensorboard_dir``, writes its scalars there.

    Use it as a context manager (or call :meth:`close`) so the TensorBoard events are flushed
    also when a run stops early or fails.
    """

    def __init__(self, csv_path: str | os.PathLike, tensorboard_dir: str | os.PathLike | None = None) -> None:
        self.csv_path = Path(csv_path)
        self._writer: Any = None
        if tensorboard_dir is not None:
            self._writer = require_tensorboard()(log_dir=str(tensorboard_dir))

    def write(self, row: dict[str, Any], step: int) -> None:
        """Append ``row`` to the CSV and, with TensorBoard, its numeric values at global step ``step``."""
        flat = {k: (";".join(f"{x:.4f}" for x in v) if isinstance(v, list) else v) for k, v in row.items()}
        # A file left empty (a run killed before its first line) still gets the header.
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(flat))
            if new:
                writer.writeheader()
            writer.writerow(flat)
        if self._writer is None:
            return
        for column, value in row.items():
            if column in _AXIS_COLUMNS:
                continue
            tag = tensorboard_tag(column)
            if isinstance(value, list):
                for i, x in enumerate(value):
                    if isinstance(x, numbers.Real):
                        self._writer.add_scalar(f"{tag}/{i}", float(x), global_step=step)
            elif isinstance(value, numbers.Real):
                self._writer.add_scalar(tag, float(value), global_step=step)
        # One flush per epoch: a TensorBoard watching the folder sees each epoch as it ends.
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> EpochLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
