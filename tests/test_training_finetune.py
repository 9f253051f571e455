"""Fine-tuning end to end on the CPU with tiny models: checkpoints load in the core, resume, bad input, logs."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hrmedseg.errors import HRMedSegError, InputError
from hrmedseg.training.checkpointing import load_state, log_path_for, state_path_for
from hrmedseg.training.epoch_log import EpochLog
from hrmedseg.training.finetune import FinetuneConfig, _oom_message, finetune
from test_training_data import disks, write_pair

REAL_NUCLEI = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuclei_dsb2018"
# The CSV log's columns, in order, for a prompt-free run with classes (as before TensorBoard came).
FINETUNE_CSV_COLUMNS = ["epoch", "step", "train_loss", "lr", "images_per_s", "time_s", "val_loss", "val_dice",
                        "val_masks", "val_dice_per_class", "best_val_dice"]


def tiny(tmp_path, **kw) -> FinetuneConfig:
    base = dict(data=str(tmp_path / "data"), out=str(tmp_path / "model.pt"), encoder_preset="tiny", img_size=64,
                batch_size=2, epochs=1, num_workers=0, device="cpu", log_every=1)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture()
def disk_data(tmp_path):
    for i in range(5):
        labels = disks((80, 90), n=4, seed=i)
        fundus_like = np.where(labels > 0, 1 + (labels % 2), 0).astype(np.uint8)  # classes 1 and 2
        write_pair(tmp_path / "data", f"im{i}", labels)
        write_pair(tmp_path / "classes", f"im{i}", fundus_like)
    return tmp_path


def test_prompt_free_run_writes_a_model_the_core_loads(disk_data):
    from hrmedseg.models.hrmedseg_model import load_hrmedseg
    from hrmedseg.weights.bundle import load_bundle

    events = []
    cfg = tiny(disk_data, data=str(disk_data / "classes"), classes="disc:>=1,cup:2", epochs=2)
    result = finetune(cfg, events.append)
    model = load_hrmedseg(cfg.out)
    assert model.num_classes == 2 and model.class_names == ("disc", "cup")
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    prov = load_bundle(cfg.out)["provenance"]
    assert prov["classes"] == "disc:>=1,cup:2" and prov["img_size"] == 64 and prov["input_mode"] == "crop"
    assert prov["val_dice"] == pytest.approx(result.best_val_dice)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and "baseline" in kinds and kinds.count("epoch") == 2 and kinds[-1] == "done"
    assert all(np.isfinite(e["loss"]) for e in events if e["event"] == "step")
    with open(log_path_for(cfg.out), newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == FINETUNE_CSV_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert not (disk_data / "tb").exists()  # no TensorBoard unless asked


def test_box_run_writes_an_hrmedseg_sam_bundle(disk_data):
    from hrmedseg.models.sam import load_hrmedseg_sam

    cfg = tiny(disk_data, model="hrmedseg-sam", max_boxes=3)
    result = finetune(cfg)
    sam = load_hrmedseg_sam(cfg.out)
    # Trained at 64 px, saved with SAM's own 1024 geometry for SamPredictor.
    assert sam.prompt_encoder.input_image_size == (1024, 1024)
    assert 0.0 <= result.best_val_dice <= 1.0 and result.history[0]["val_masks"] > 0


def test_killed_run_resumes_from_the_last_epoch(disk_data):
    cfg = tiny(disk_data, epochs=1)
    finetune(cfg)
    state = load_state(state_path_for(cfg.out))
    assert state["epoch"] == 1
    first_weights = {k: v.clone() for k, v in state["model"].items()}
    events = []
    result = finetune(tiny(disk_data, epochs=3, resume=True), events.append)
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["epoch"] == 1
    assert "baseline" not in [e["event"] for e in events]  # the 'before' score is kept from the first run
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.val_dice_before == state["val_dice_before"]
    after = load_state(state_path_for(cfg.out))
    assert after["epoch"] == 3 and after["scheduler"]["last_epoch"] == 3
    assert any(not torch.equal(first_weights[k], after["model"][k]) for k in first_weights)


def test_early_stopping_and_step_limit(disk_data):
    result = finetune(tiny(disk_data, epochs=30, patience=1, lr=1e-7))  # a tiny lr: Dice soon stops rising
    assert result.stopped == "early stopping" and result.epochs_run < 30
    last = result.history[-1]
    assert last["val_dice"] <= last["best_val_dice"] == max(r["val_dice"] for r in result.history)
    result = finetune(tiny(disk_data, out=str(disk_data / "m2.pt"), epochs=50, max_steps=1))
    assert result.stopped == "max steps" and result.history[0]["step"] == 1


def test_bad_input_errors(disk_data, tmp_path):
    with pytest.raises(InputError, match="no image/mask pairs"):
        finetune(tiny(disk_data, data=str(tmp_path / "classes" / "images")))
    with pytest.raises(InputError, match="multiple of 16"):
        finetune(tiny(disk_data, img_size=100))
    msg = _oom_message(tiny(disk_data, batch_size=16, img_size=1024))
    assert "--batch-size (now 16)" in msg and "--amp" in msg and "--grad-checkpointing" in msg


def test_single_image_still_trains_and_validates_on_it(disk_data, tmp_path):
    one = tmp_path / "one"
    (one / "images").mkdir(parents=True)
    (one / "masks").mkdir()
    shutil.copy(disk_data / "data" / "images" / "im0.png", one / "images")
    shutil.copy(disk_data / "data" / "masks" / "im0.png", one / "masks")
    result = finetune(tiny(disk_data, data=str(one), out=str(tmp_path / "one.pt")))
    assert Path(result.out).exists() and result.history[0]["val_masks"] == 1


def test_cli_runs_and_reports_errors_without_traceback(disk_data, capsys):
    from hrmedseg.training.cli import main

    code = main(["finetune", "--data", str(disk_data / "data"), "--out", str(disk_data / "cli.pt"),
                 "--encoder-preset", "tiny", "--img-size", "64", "--batch-size", "2", "--epochs", "1",
                 "--num-workers", "0", "--device", "cpu", "--events"])
    out = capsys.readouterr()
    assert code == 0 and (disk_data / "cli.pt").exists()
    events = [json.loads(line.split(" ", 1)[1]) for line in out.out.splitlines() if line.startswith("@hrmedseg-event")]
    assert events[-1]["event"] == "done"
    code = main(["finetune", "--data", str(disk_data / "nowhere"), "--out", str(disk_data / "x.pt"), "--events"])
    out = capsys.readouterr()
    assert code == 2 and "training data not found" in out.err and "Traceback" not in out.err
    assert '"event": "error"' in out.out


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``log_dir``: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def same_number(logged: float, csv_value: str, abs_tol: float = 0.0) -> bool:
    """A float32 TensorBoard scalar against the CSV's text of the same value (NaN equals NaN)."""
    expected = float(csv_value)
    if math.isnan(expected):
        return math.isnan(logged)
    return logged == pytest.approx(expected, rel=1e-6, abs=abs_tol)


def test_tensorboard_scalars_match_the_csv_log(disk_data, capsys):
    from hrmedseg.training.cli import main

    pytest.importorskip("tensorboard")
    out, tb = disk_data / "tb_model.pt", disk_data / "tb"
    code = main(["finetune", "--data", str(disk_data / "classes"), "--classes", "disc:>=1,cup:2", "--out", str(out),
                 "--encoder-preset", "tiny", "--img-size", "64", "--batch-size", "2", "--epochs", "2",
                 "--num-workers", "0", "--device", "cpu", "--tensorboard", str(tb)])
    assert code == 0, capsys.readouterr().err
    assert list(tb.glob("events.out.tfevents.*"))
    with open(log_path_for(out), newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == FINETUNE_CSV_COLUMNS  # the CSV is as without --tensorboard
    assert all(len(r["val_dice_per_class"].split(";")) == 2 for r in rows)

    scalars = tensorboard_scalars(tb)
    assert set(scalars) == {"step", "train/loss", "lr", "images_per_s", "time_s", "val/loss", "val/dice",
                            "val/masks", "val/dice_per_class/0", "val/dice_per_class/1", "best_val_dice"}
    for tag, points in scalars.items():
        assert [step for step, _ in points] == [1, 2], tag  # one point per epoch, at the epoch
    columns = {"step": "step", "train/loss": "train_loss", "lr": "lr", "images_per_s": "images_per_s",
               "time_s": "time_s", "val/loss": "val_loss", "val/dice": "val_dice", "val/masks": "val_masks",
               "best_val_dice": "best_val_dice"}
    for row, epoch in zip(rows, (0, 1)):
        for tag, column in columns.items():
            assert same_number(scalars[tag][epoch][1], row[column]), (tag, row)
        for i, text in enumerate(row["val_dice_per_class"].split(";")):  # the CSV keeps 4 decimals
            assert same_number(scalars[f"val/dice_per_class/{i}"][epoch][1], text, abs_tol=6e-5), (i, row)


def test_tensorboard_flag_without_tensorboard_fails_before_training(disk_data, monkeypatch, capsys):
    from hrmedseg.training.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # "import tensorboard" raises ImportError
    out, tb = disk_data / "no_tb.pt", disk_data / "tb"
    events = []
    with pytest.raises(HRMedSegError, match="pip install tensorboard"):
        finetune(tiny(disk_data, out=str(out), tensorboard=str(tb)), events.append)
    assert events == [] and not out.exists() and not log_path_for(out).exists() and not tb.exists()

    code = main(["finetune", "--data", str(disk_data / "data"), "--out", str(out), "--device", "cpu",
                 "--tensorboard", str(tb), "--events"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert "--tensorboard needs the 'tensorboard' package" in captured.err and "pip install tensorboard" in captured.err
    assert '"event": "start"' not in captured.out and '"event": "error"' in captured.out


def test_epoch_log_is_closed_when_training_raises(tmp_path):
    pytest.importorskip("tensorboard")
    with pytest.raises(RuntimeError, match="boom"), EpochLog(tmp_path / "x.log.csv", tmp_path / "tb") as log:
        log.write({"epoch": 1, "train_loss": 0.5, "name": "not a number", "per_class": [0.25, 0.75]}, step=1)
        raise RuntimeError("boom")
    assert log._writer is None  # closed: its events are on disk
    assert (tmp_path / "x.log.csv").read_text().splitlines() == ["epoch,train_loss,name,per_class",
                                                                "1,0.5,not a number,0.2500;0.7500"]
    assert tensorboard_scalars(tmp_path / "tb") == {"train/loss": [(1, 0.5)], "per_class/0": [(1, 0.25)],
                                                    "per_class/1": [(1, 0.75)]}


def test_train_subcommand_plugs_into_the_core_cli():
    import argparse
    import importlib
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    target = pyproject["project"]["entry-points"]["hrmedseg.commands"]["train"]
    module, func = target.split(":")
    parser = argparse.ArgumentParser()
    getattr(importlib.import_module(module), func)(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "finetune", "--data", "d", "--out", "o.pt", "--model", "hrmedseg-sam"])
    assert args.model == "hrmedseg-sam" and args.img_size == 1024 and args.lr == 1e-4 and callable(args.func)
    assert args.tensorboard is None
    args = parser.parse_args(["train", "distill", "--teacher", "t.pth", "--images", "i", "--out", "e.pt",
                              "--tensorboard", "runs/a"])
    assert args.tensorboard == "runs/a"


@pytest.mark.slow
@pytest.mark.skipif(not REAL_NUCLEI.exists(), reason="real DSB 2018 nuclei not available")
def test_loss_falls_on_real_nuclei(tmp_path):
    """A short CPU fine-tune on real annotated DSB 2018 crops: the training loss goes down."""
    meta = json.loads((REAL_NUCLEI / "manifest.json").read_text())
    items = [it for it in meta["items"] if it["height"] == 256 and it["width"] == 256][:8]
    for kind in ("images", "masks"):
        (tmp_path / "nuc" / kind).mkdir(parents=True)
    for it in items:
        shutil.copy(REAL_NUCLEI / it["image"], tmp_path / "nuc" / "images")
        shutil.copy(REAL_NUCLEI / it["mask"], tmp_path / "nuc" / "masks")
    events = []
    cfg = FinetuneConfig(data=str(tmp_path / "nuc"), out=str(tmp_path / "nuc.pt"), encoder_preset="tiny",
                         img_size=128, batch_size=4, epochs=20, repeats=4, max_steps=36, lr=1e-3, num_workers=0,
                         device="cpu", log_every=1, patience=0, seed=1)
    finetune(cfg, events.append)
    losses = [e["loss"] for e in events if e["event"] == "step"]
    print("losses", [round(v, 3) for v in losses])
    assert len(losses) == 36
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
