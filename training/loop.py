"""The training loop skeleton that fine-tuning and distillation share.

What differs between them (the model, the loss of a batch, validation, what is saved) stays
with each; this module holds what they do alike:

- :func:`default_workers`, :func:`train_loader`: DataLoader workers and the (distributed)
  training loader, with its sampler;
- :func:`wrap_ddp`: DistributedDataParallel around the model when torchrun launched the run;
- :func:`restore`: resume from a state file (model, optimiser, scheduler, fp16 scaler);
- :func:`progress_bar`: one bar on the main process (a line every 30 s when not on a terminal);
- :class:`EpochRunner`: one epoch of optimiser steps (non-finite guard, progress, ``step``
  events), then :meth:`EpochRunner.row`, the epoch's losses reduced over all ranks.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hrmedseg.errors import HRMedSegError

from . import distributed as dist_utils
from .checkpointing import load_state
from .steps import backward_and_step

Event = dict[str, Any]
# (loss, images in the batch), or None for a batch with nothing to learn from.
BatchLoss = Callable[[dict], "tuple[torch.Tensor, int] | None"]


def default_workers(num_workers: int | None) -> int:
    """``num_workers``, or all CPUs but one (at most 8) when it is None."""
    return num_workers if num_workers is not None else min(8, max(0, (os.cpu_count() or 1) - 1))


def loader_options(workers: int, collate_fn: Callable, device: torch.device) -> dict[str, Any]:
    """DataLoader keywords every loader of a run shares."""
    return dict(num_workers=workers, collate_fn=collate_fn, pin_memory=device.type == "cuda",
                persistent_workers=workers > 0)


def train_loader(dataset: Dataset, batch_size: int, workers: int, collate_fn: Callable, env: dist_utils.DistEnv,
                 device: torch.device, seed: int) -> tuple[DataLoader, DistributedSampler | None]:
    """The shuffled training loader (one shard per rank under torchrun) and its sampler, if any.

    Full batches only (``drop_last``) when the data fill at least one batch on every rank.
    """
    sampler = DistributedSampler(dataset, env.world_size, env.rank, seed=seed) if env.enabled else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=len(dataset) >= batch_size * env.world_size,
                        **loader_options(workers, collate_fn, device))
    return loader, sampler


def wrap_ddp(model: nn.Module, env: dist_utils.DistEnv, device: torch.device,
             find_unused_parameters: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun; the model itself otherwise."""
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def restore(state_file: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None = None) -> dict:
    """Load a state file into the (unwrapped) model, optimiser, scheduler and scaler; return the state."""
    state = load_state(state_file)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


def progress_bar(env: dist_utils.DistEnv, total: int, desc: str):
    """A tqdm bar of ``total`` steps, shown by the main process only."""
    from tqdm.auto import tqdm

    # Redirected to a file (GPU jobs, the widget): a line every 30 s instead of a redraw per step.
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=not env.is_main,
                mininterval=0.5 if sys.stderr.isatty() else 30)


@dataclass
class EpochTotals:
    """What one epoch's steps add up to on this rank."""

    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    interrupted: bool = False  # ``stop_now`` ended the epoch early


@dataclass
class EpochRunner:
    """Runs the optimiser steps of each epoch; the caller supplies the loss of a batch.

    batch_loss(batch) -> (loss, images) or None (the batch is skipped, no step).
    non_finite_message(value, epoch, step) -> the error raised when a loss is NaN or infinite.
    step_event(epoch, step, value) -> the ``step`` event emitted every ``log_every`` steps.
    progress_label: (name, format) of the loss on the progress bar, e.g. ("loss", ".4f").
    stop_now(step) -> True ends the epoch after that step (time limit, ``max_steps``).
    """

    loader: DataLoader
    sampler: DistributedSampler | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    env: dist_utils.DistEnv
    device: torch.device
    emit: Callable[[Event], None]
    non_finite_message: Callable[[float, int, int], str]
    step_event: Callable[[int, int, float], Event]
    progress_label: tuple[str, str] = ("loss", ".4f")
    log_every: int = 10
    stop_now: Callable[[int], bool] = lambda step: False
    step: int = 0
    progress: Any = field(default=None, repr=False)

    def run(self, epoch: int, batch_loss: BatchLoss) -> EpochTotals:
        """One pass over the loader (epoch is 0-based), then a scheduler step."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        totals, started = EpochTotals(), time.monotonic()
        name, fmt = self.progress_label
        for batch in self.loader:
            result = batch_loss(batch)
            if result is None:
                continue
            loss, images = result
            backward_and_step(loss, self.optimizer, self.scaler)
            self.step += 1
            value = loss.item()
            if not math.isfinite(value):
                raise HRMedSegError(self.non_finite_message(value, epoch, self.step))
            totals.loss_sum, totals.steps, totals.images = totals.loss_sum + value, totals.steps + 1, totals.images + images
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix(**{"epoch": epoch + 1, name: format(value, fmt)})
            if self.step % self.log_every == 0:
                self.emit(self.step_event(epoch, self.step, value))
            if self.stop_now(self.step):
                totals.interrupted = True
                break
        self.scheduler.step()
        totals.seconds = time.monotonic() - started
        return totals

    def mean_over_ranks(self, total: float | torch.Tensor, totals: EpochTotals) -> float:
        """A per-step sum on this rank -> its per-step mean over all ranks."""
        return dist_utils.all_reduce_mean(float(total) / max(totals.steps, 1), self.env, self.device)

    def row(self, epoch: int, totals: EpochTotals, **losses: float) -> dict:
        """The epoch's log row: epoch (1-based), step, train_loss, ``losses``, lr, images_per_s, time_s."""
        images = dist_utils.all_reduce_sum([totals.images], self.env, self.device)[0]
        return {"epoch": epoch + 1, "step": self.step, "train_loss": self.mean_over_ranks(totals.loss_sum, totals),
                **losses, "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": images / max(totals.seconds, 1e-9), "time_s": totals.seconds}
