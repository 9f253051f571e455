"""Feature distillation: LGViT + neck learns to reproduce a SAM image encoder's embedding.

The authors' recipe: MSE between the (B, 256, 64, 64) embeddings, no labels, Adam lr 1e-3,
exponential decay 0.98 per epoch, batch 4, 20 epochs, images resized (longest side) and padded
to 1024 x 1024 as SAM expects. The teacher's embeddings are cached on disk after the first pass.
Writes the student as an "lgvit_neck" bundle (``--out``) every epoch, a resumable state beside it
and a CSV log (and TensorBoard scalars with ``tensorboard``); ``torchrun --nproc-per-node N -m
hrmedseg.training.cli distill ...`` uses N GPUs.

With a SAM2/SAM2.1 teacher (a SAM2 checkpoint or ``random:sam2.1_hiera_t``) the student is
``HRMedSegSam2ImageEncoder`` (LGViT + ``Sam2Neck``), the targets are the teacher's three
``backbone_fpn`` levels (strides 4, 8, 16) and the loss is the sum of the three MSEs. The output
is then an "hrmedseg_sam2" bundle (the student as image encoder, the teacher's prompt encoder,
mask decoder and memory modules as the rest), loadable with
``hrmedseg.models.sam2.load_hrmedseg_sam2(out)``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from hrmedseg.errors import HRMedSegError, InputError
from hrmedseg.models.encoder_loading import load_encoder, save_encoder
from hrmedseg.models.info import Sam2Settings
from hrmedseg.models.neck import HRMedSegEncoder
from hrmedseg.models.preprocessing import Preprocessing
from hrmedseg.models.sam2 import (
    SAM2_PREDICTOR_PREPROCESSING,
    HRMedSegSam2ImageEncoder,
    _config_path,
    _load_decoder_state,
    build_sam2_base,
    save_hrmedseg_sam2,
)

from . import distributed as dist_utils
from .checkpointing import log_path_for, save_state, state_path_for, unwrap
from .data import IMAGE_EXTENSIONS, CropSettings, place
from .epoch_log import EpochLog, require_tensorboard
from .finetune import ENCODER_PRESETS
from .loop import EpochRunner, default_workers, progress_bar, restore, train_loader, wrap_ddp
from .losses import embedding_mse
from .distill_views import DistillItems, DistillViews, ViewSettings
from .teacher_cache import LiteMedSamTeacher, Sam2Teacher, TeacherCache, build_teacher

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    teacher: str = ""
    images: str = ""
    out: str = "encoder.pt"
    cache_dir: str | None = None  # None: <out stem>.teacher_cache; "none": no cache
    epochs: int = 20
    batch_size: int = 4
    lr: float = 1e-3
    lr_decay: float = 0.98
    img_size: int = 1024
    amp: bool = False
    amp_dtype: str = "bf16"
    grad_checkpointing: bool = False
    device: str | None = None
    num_workers: int | None = None
    seed: int = 0
    resume: bool = False
    max_steps: int | None = None
    init_encoder: str | None = None
    encoder_preset: str = "paper"
    log_every: int = 10
    tensorboard: str | None = None  # a folder for TensorBoard scalars, besides the CSV log
    views_per_image: int = 0  # 0: each image once per epoch, whole; N: N fixed augmented views of each
    view_min_scale: float = 0.25  # smallest view crop, as a fraction of the image's shorter side
    time_limit_min: float | None = None  # stop (after saving the epoch) once an epoch ends past this

    @property
    def cache_root(self) -> Path | None:
        if self.cache_dir and self.cache_dir.lower() == "none":
            return None
        out = Path(self.out)
        return Path(self.cache_dir) if self.cache_dir else out.with_name(out.stem + ".teacher_cache")


def find_images(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not p.name.startswith("."))
    if not images:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return images


class DistillImages(DistillItems):
    """Whole images resized (longest side) and padded to S x S, one item each (see :class:`DistillItems`)."""

    def __init__(self, paths: list[Path], img_size: int, pad_value: tuple[int, int, int],
                 cache: TeacherCache | None = None) -> None:
        self.paths, self.cache = paths, cache
        self.crop = CropSettings(size=img_size, mode="fit", pad_value=pad_value)

    def __len__(self) -> int:
        return len(self.paths)

    def cache_key(self, index: int) -> tuple[Path, None]:
        return self.paths[index], None

    def render(self, image: np.ndarray, index: int) -> np.ndarray:
        placed, _, _ = place(image, np.zeros(image.shape[:2], np.int32), self.crop, np.random.default_rng(0))
        return placed


def distill_dataset(cfg: DistillConfig, paths: list[Path], cache: TeacherCache | None) -> DistillItems:
    """Whole images (``views_per_image`` 0), or that many augmented views of each image."""
    if cfg.views_per_image:
        settings = ViewSettings(size=cfg.img_size, min_scale=cfg.view_min_scale)
        return DistillViews(paths, cfg.views_per_image, settings, cfg.seed, cache)
    return DistillImages(paths, cfg.img_size, Preprocessing.sam().pad_value, cache)


def collate_distill(items: list[dict]) -> dict | None:
    items = [it for it in items if it["image"] is not None]
    if not items:
        return None
    batch = {"image": torch.stack([it["image"] for it in items]), "index": [it["index"] for it in items]}
    if "teacher" in items[0]:
        teachers = [it["teacher"] for it in items]
        if not all(isinstance(t, (tuple, list)) or t.numel() for t in teachers):
            batch["teacher"] = None
        elif isinstance(teachers[0], (tuple, list)):  # SAM2: one stack per level
            batch["teacher"] = tuple(torch.stack(level) for level in zip(*teachers))
        else:
            batch["teacher"] = torch.stack(teachers)
    return batch


def _autocast(cfg: DistillConfig, device: torch.device):
    if not cfg.amp:
        return lambda: torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def teacher_embed(teacher: torch.nn.Module, images: torch.Tensor, autocast) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """(B, 3, S, S) uint8 on device -> (B, 256, S/16, S/16) float32 teacher embedding (SAM normalisation).

    A ``Sam2Teacher`` (ImageNet normalisation, the same numbers in 0..255) gives a tuple of its three
    levels, (B, 256, S/4, S/4), (B, 256, S/8, S/8), (B, 256, S/16, S/16).
    """
    if isinstance(teacher, Sam2Teacher):
        with autocast():
            return tuple(level.float() for level in teacher(SAM2_PREDICTOR_PREPROCESSING.normalize(images.float())))
    if isinstance(teacher, LiteMedSamTeacher):  # normalises (and resizes) its own input
        with autocast():
            return teacher(images.float()).float()
    with autocast():
        return teacher(Preprocessing.sam().normalize(images.float())).float()


def _per_image(embeddings: torch.Tensor | tuple[torch.Tensor, ...]) -> list:
    """A batch of teacher outputs -> one entry per image (a tensor, or a tuple of levels)."""
    if isinstance(embeddings, (tuple, list)):
        return list(zip(*embeddings))
    return list(embeddings)


def _to_device(target, device: torch.device):
    if isinstance(target, (tuple, list)):
        return tuple(t.to(device, non_blocking=True).float() for t in target)
    return target.to(device, non_blocking=True).float()


def fill_cache(teacher, dataset: DistillItems, cache: TeacherCache, device, autocast, batch_size: int,
               env: dist_utils.DistEnv, workers: int) -> int:
    """Run the teacher once on every image (or view) that has no cache entry yet (each rank on its share)."""
    missing = [i for i in range(len(dataset)) if dataset.cache_key(i) not in cache][env.rank :: env.world_size]
    if not missing:
        return 0
    subset = torch.utils.data.Subset(dataset, missing)
    loader = DataLoader(subset, batch_size=batch_size, num_workers=workers, collate_fn=collate_distill)
    from tqdm.auto import tqdm

    done = 0
    for batch in tqdm(loader, desc="teacher cache", unit="batch", disable=not env.is_main):
        if batch is None:
            continue
        embeddings = teacher_embed(teacher, batch["image"].to(device), autocast)
        for index, emb in zip(batch["index"], _per_image(embeddings)):
            path, view = dataset.cache_key(index)
            cache.put(path, emb, view)
        done += len(batch["index"])
    return done


def distill(cfg: DistillConfig, on_event: Callable[[dict], None] | None = None) -> dict:
    emit = on_event or (lambda e: None)
    if cfg.img_size % 16:
        raise InputError(f"--img-size must be a multiple of 16, got {cfg.img_size}")
    if cfg.tensorboard:
        require_tensorboard()  # fail now, not after building the teacher and filling its cache
    env, device = dist_utils.init_distributed(cfg.device)
    try:
        # Main process only; closed (TensorBoard flushed) however the run ends.
        with (EpochLog(log_path_for(cfg.out), cfg.tensorboard) if env.is_main else nullcontext()) as epoch_log:
            return _distill(cfg, env, device, emit, epoch_log)
    except torch.OutOfMemoryError as err:
        raise HRMedSegError(
            f"out of GPU memory while distilling; lower --batch-size (now {cfg.batch_size})"
            + ("" if cfg.amp else ", add --amp") + ("" if cfg.grad_checkpointing else ", add --grad-checkpointing")
        ) from err
    finally:
        dist_utils.cleanup(env)


@dataclass
class Student:
    """What distillation trains (``module``) and how its output is scored and saved.

    module: the encoder trained to match the teacher: an ``HRMedSegEncoder`` (SAM teacher,
        (B, 256, S/16, S/16) output) or an ``HRMedSegSam2ImageEncoder`` (SAM2 teacher, whose
        ``backbone_fpn`` holds three levels).
    preprocessing: how its (B, 3, S, S) uint8 input is normalised.
    sam2_model: for a SAM2 teacher, the saved model: the student inside ``SAM2Base`` with the
        teacher's heads (sharing the student's modules); None otherwise.
    """

    module: torch.nn.Module
    preprocessing: Preprocessing
    sam2_model: torch.nn.Module | None = None
    sam2_settings: Sam2Settings | None = None  # saved with sam2_model

    def loss(self, output, target) -> torch.Tensor:
        """MSE to the teacher's embedding; the sum of the three levels' MSEs for a SAM2 teacher."""
        if self.sam2_model is not None:
            return sum(embedding_mse(s, t) for s, t in zip(output["backbone_fpn"], target, strict=True))
        return embedding_mse(output, target)

    def save(self, trained: torch.nn.Module, out: Path, provenance: dict) -> None:
        """Write the bundle: "hrmedseg_sam2" for a SAM2 teacher, "lgvit_neck" otherwise."""
        if self.sam2_model is not None:
            save_hrmedseg_sam2(self.sam2_model, out, provenance=provenance, settings=self.sam2_settings)
        else:
            save_encoder(unwrap(trained), out, provenance=provenance)


def _past(deadline: float | None, env: dist_utils.DistEnv, device: torch.device) -> bool:
    """Whether the time limit has passed; the main process decides, so every rank stops at the same epoch."""
    if deadline is None:
        return False
    late = torch.tensor([int(env.is_main and time.monotonic() > deadline)], device=device)
    if env.enabled:
        torch.distributed.broadcast(late, 0)
    return bool(late.item())


def build_student(cfg: DistillConfig, teacher: torch.nn.Module) -> Student:
    """The student for ``teacher``: a new (or ``--init-encoder``) LGViT + neck, shaped as the teacher's output."""
    encoder: HRMedSegEncoder = (load_encoder(cfg.init_encoder) if cfg.init_encoder
                                else HRMedSegEncoder(ENCODER_PRESETS[cfg.encoder_preset]))
    if cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    if not isinstance(teacher, Sam2Teacher):
        return Student(encoder, encoder.preprocessing)
    # LGViT + Sam2Neck; it takes SAM2-normalised input and re-normalises to its encoder's own.
    student = HRMedSegSam2ImageEncoder(encoder)
    sam2_model = build_sam2_base(student, teacher.sam2_config)
    _load_decoder_state(sam2_model, teacher.decoder_state, cfg.teacher)
    settings = Sam2Settings(_config_path(teacher.sam2_config)[0], True, student.neck.config.to_dict())
    return Student(student, SAM2_PREDICTOR_PREPROCESSING, sam2_model, settings)


def _distill(cfg: DistillConfig, env: dist_utils.DistEnv, device: torch.device, emit,
             epoch_log: EpochLog | None) -> dict:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    state_file = state_path_for(out)
    paths = find_images(cfg.images)
    teacher, teacher_id = build_teacher(cfg.teacher, cfg.img_size)
    teacher = teacher.to(device)
    student = build_student(cfg, teacher)
    student.module.to(device).train()
    autocast = _autocast(cfg, device)
    workers = default_workers(cfg.num_workers)

    cache = TeacherCache(cfg.cache_root, teacher_id) if cfg.cache_root else None
    dataset = distill_dataset(cfg, paths, cache)
    t0 = time.monotonic()
    if cache is not None:
        n = fill_cache(teacher, dataset, cache, device, autocast, cfg.batch_size, env, workers)
        dist_utils.barrier(env)
        emit({"event": "cache", "computed": n, "images": len(paths), "seconds": time.monotonic() - t0})
        teacher = teacher.cpu()  # no longer needed on the GPU
        del teacher
        teacher = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    loader, sampler = train_loader(dataset, cfg.batch_size, workers, collate_distill, env, device, cfg.seed)
    optimizer = torch.optim.Adam(student.module.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and cfg.amp_dtype == "fp16" and device.type == "cuda") else None
    start_epoch, step, history = 0, 0, []
    if cfg.resume and state_file.exists():
        state = restore(state_file, student.module, optimizer, scheduler)
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        emit({"event": "resumed", "epoch": start_epoch, "state": str(state_file)})
    model = wrap_ddp(student.module, env, device)

    def step_loss(batch: dict | None) -> tuple[torch.Tensor, int] | None:
        nonlocal teacher
        if batch is None:
            return None
        images = batch["image"].to(device, non_blocking=True)
        target = batch.get("teacher")
        if target is None:  # no cache (or an entry missing): run the teacher now
            if teacher is None:
                teacher, _ = build_teacher(cfg.teacher, cfg.img_size)
                teacher = teacher.to(device)
            target = teacher_embed(teacher, images, autocast)
        target = _to_device(target, device)
        with autocast():
            loss = student.loss(model(student.preprocessing.normalize(images.float())), target)
        return loss, len(images)

    runner = EpochRunner(
        loader, sampler, optimizer, scheduler, scaler, env, device, emit,
        non_finite_message=lambda value, epoch, step: (
            f"the distillation loss became {value} at step {step}: lower --lr (now {cfg.lr})"),
        step_event=lambda epoch, step, value: {"event": "step", "epoch": epoch + 1, "step": step, "loss": value},
        progress_label=("mse", ".5f"),
        log_every=cfg.log_every,
        stop_now=lambda step: bool(cfg.max_steps and step >= cfg.max_steps),
        step=step,
        progress=progress_bar(env, (cfg.epochs - start_epoch) * len(loader), "distilling"),
    )
    emit({"event": "start", "images": len(paths), "steps_per_epoch": len(loader), "teacher": teacher_id,
          "cache": str(cfg.cache_root) if cache else None, "world_size": env.world_size})
    deadline = time.monotonic() + cfg.time_limit_min * 60 if cfg.time_limit_min else None
    for epoch in range(start_epoch, cfg.epochs):
        totals = runner.run(epoch, step_loss)
        row = runner.row(epoch, totals)
        if env.is_main:
            history.append(row)
            provenance = {
                "source": "hrmedseg.training distill", "teacher": teacher_id, "images": str(cfg.images),
                "n_images": len(paths), "epoch": epoch + 1, "mse": row["train_loss"],
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            student.save(model, out, provenance)
            epoch_log.write(row, step=row["epoch"])
            save_state(state_file, {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": runner.step,
                                    "history": history, "config": asdict(cfg)})
            emit({"event": "epoch", **row})
        if totals.interrupted:
            break
        if _past(deadline, env, device):
            emit({"event": "time_limit", "epoch": epoch + 1})
            break
    runner.progress.close()
    result = {"out": str(out), "history": history, "steps": runner.step}
    if env.is_main:
        emit({"event": "done", "out": str(out), "epochs": len(history),
              "mse": history[-1]["train_loss"] if history else float("nan")})
    return result
