"""The epoch runner fine-tuning and distillation share: steps, events, the non-finite guard, rows."""

from __future__ import annotations

import pytest
import torch

from hrmedseg.errors import HRMedSegError
from hrmedseg.training.distributed import DistEnv
from hrmedseg.training.loop import EpochRunner


def runner(events: list, batches: int = 5, **kw) -> tuple[EpochRunner, torch.nn.Parameter]:
    weight = torch.nn.Parameter(torch.tensor(2.0))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
    loader = [{"x": torch.tensor(float(i))} for i in range(batches)]
    options = dict(
        non_finite_message=lambda value, epoch, step: f"loss {value} at epoch {epoch + 1}, step {step}",
        step_event=lambda epoch, step, value: {"event": "step", "epoch": epoch + 1, "step": step, "loss": value},
        log_every=2,
    )
    options.update(kw)
    return EpochRunner(loader, None, optimizer, scheduler, None, DistEnv(), torch.device("cpu"), events.append,
                       **options), weight


def test_steps_events_scheduler_and_row():
    events: list = []
    loop, weight = runner(events)
    totals = loop.run(0, lambda batch: None if batch["x"] == 1 else ((weight - batch["x"]) ** 2, 3))
    assert loop.step == 4 and totals.steps == 4 and totals.images == 12 and not totals.interrupted
    assert [e["step"] for e in events] == [2, 4] and all(e["epoch"] == 1 for e in events)
    row = loop.row(0, totals, extra_loss=0.5)
    assert list(row) == ["epoch", "step", "train_loss", "extra_loss", "lr", "images_per_s", "time_s"]
    assert row["epoch"] == 1 and row["step"] == 4 and row["lr"] == pytest.approx(0.05)  # scheduler stepped once
    assert row["train_loss"] == pytest.approx(totals.loss_sum / 4)


def test_stop_now_ends_the_epoch_after_that_step():
    loop, weight = runner([], stop_now=lambda step: step >= 3)
    totals = loop.run(0, lambda batch: (weight * 1.0, 1))
    assert totals.interrupted and loop.step == 3 and totals.steps == 3


def test_a_non_finite_loss_is_an_error_naming_the_step():
    loop, weight = runner([])
    with pytest.raises(HRMedSegError, match="loss nan at epoch 2, step 1"):
        loop.run(1, lambda batch: (weight * float("nan"), 1))
