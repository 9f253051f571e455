"""Fine-tuning of HRMedSegSAM / HRMedSegSAM2 (box prompts) and HRMedSeg (prompt-free, C2 classes).

The paper's recipe by default: Adam lr 1e-4, exponential decay 0.98 per epoch, loss
0.8 * Dice + 0.2 * focal. Box models also train their decoder's IoU prediction head as SAM
does: MSE between the predicted IoU of each output mask and its actual IoU with the target
(``iou_loss_weight``, 1.0 by default; ``train_only="iou-head"`` trains that head alone, leaving
the masks exactly as they were). ``clicks=N`` (``--clicks N``) adds SAM's interactive recipe to box
fine-tuning: after each box prediction, N simulated clicks with the previous logits as mask
prompt (plus ``click_mask_only`` mask-only iterations), a loss on every iteration
(:mod:`hrmedseg.training.clicks`). Each epoch ends with a validation pass on held-out images; the best
model is written to ``out`` (an hrmedseg bundle that ``hrmedseg segment`` and the annotator
load), the resumable state to ``<out stem>.state.pt`` and a line to ``<out stem>.log.csv`` (and
TensorBoard scalars to the ``tensorboard`` folder, when set).

Runs on one GPU, several (``torchrun --nproc-per-node N -m hrmedseg.training.cli finetune``) or
the CPU.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from hrmedseg.engine.prompts import NEGATIVE, POSITIVE
from hrmedseg.errors import HRMedSegError, InputError
from hrmedseg.models.fast_decoder import FastMaskDecoder
from hrmedseg.models.neck import EncoderConfig, HRMedSegEncoder
from hrmedseg.models.preprocessing import Preprocessing
from hrmedseg.models.prompting import prompt_geometry
from hrmedseg.models.training_views import BoxPromptedSegmenter, Sam2BoxPromptedSegmenter

from . import distributed as dist_utils
from .checkpointing import log_path_for, save_state, state_path_for, unwrap
from .clicks import ClickSchedule, InteractiveRefinement
from .data import (
    CropSettings, DatasetInfo, SegmentationCrops, collate, discover_samples, parse_classes, split_samples, store_class_rules,
)
from .epoch_log import EpochLog, require_tensorboard
from .loop import EpochRunner, default_workers, loader_options, progress_bar, restore, train_loader, wrap_ddp
from .losses import segmentation_loss
from .metrics import dice_per_mask, iou_per_mask

log = logging.getLogger(__name__)

MODELS = ("hrmedseg-sam", "hrmedseg-sam2", "hrmedseg")
BOX_MODELS = ("hrmedseg-sam", "hrmedseg-sam2")
TRAIN_ONLY = ("iou-head",)
# The decoders' IoU prediction heads (SAM's MaskDecoder, SAM2's MaskDecoder), relative to the model.
IOU_HEAD_PREFIXES = ("mask_decoder.iou_prediction_head.", "sam_mask_decoder.iou_prediction_head.")
ENCODER_PRESETS = {
    "paper": EncoderConfig(),
    "small": EncoderConfig(embed_dim=48, depths=(2, 2), num_heads=(3, 6)),
    "tiny": EncoderConfig(embed_dim=48, conv_depth=1, depths=(1, 1), num_heads=(3, 6)),
}

Event = dict[str, Any]


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (stored in the state file and the model's provenance)."""

    model: str = "hrmedseg"
    data: str = ""
    out: str = "model.pt"
    val_data: str | None = None
    classes: str | None = None  # e.g. "disc:>=1,cup:2"; None: instances / foreground
    epochs: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    lr_decay: float = 0.98
    weight_decay: float = 0.0
    img_size: int = 1024
    input_mode: str | None = None  # 'crop' (native resolution) or 'fit'; default by model
    scale: float = 1.0
    repeats: int = 1
    max_boxes: int = 16
    box_jitter: float = 0.1
    val_fraction: float = 0.15
    patience: int = 20
    amp: bool = False
    amp_dtype: str = "bf16"
    grad_checkpointing: bool = False
    freeze_encoder: bool = False
    box_prior: str | None = None  # hrmedseg-sam: "ellipse" or "none"; None keeps --init's (else none)
    device: str | None = None
    num_workers: int | None = None
    seed: int = 0
    resume: bool = False
    time_limit_min: float | None = None
    init: str | None = None
    init_encoder: str | None = None
    init_decoder: str | None = None
    encoder_preset: str = "paper"
    log_every: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps (tests, benchmarks)
    provenance_note: str | None = None
    tensorboard: str | None = None  # a folder for TensorBoard scalars, besides the CSV log
    iou_loss_weight: float = 1.0  # box models: weight of SAM's IoU-prediction MSE (0: off)
    train_only: str | None = None  # "iou-head": freeze everything but the decoder's IoU prediction head
    clicks: int = 0  # box models: SAM's click iterations after the box per step (training/clicks.py); 0: boxes only
    click_mask_only: int = 2  # with --clicks: iterations that feed only the previous mask (SAM: 2)

    def check(self) -> None:
        if self.model not in MODELS:
            raise InputError(f"--model must be one of {', '.join(MODELS)}, not '{self.model}'")
        if self.img_size % 16 or self.img_size < 64:
            raise InputError(f"--img-size must be a multiple of 16 and at least 64, got {self.img_size}")
        if self.batch_size < 1 or self.epochs < 1:
            raise InputError("--batch-size and --epochs must be at least 1")
        if self.input_mode not in (None, "crop", "fit"):
            raise InputError(f"--input-mode must be 'crop' or 'fit', not '{self.input_mode}'")
        if self.encoder_preset not in ENCODER_PRESETS:
            raise InputError(f"--encoder-preset must be one of {', '.join(ENCODER_PRESETS)}")
        if self.amp_dtype not in ("bf16", "fp16"):
            raise InputError("--amp-dtype must be bf16 or fp16")
        if self.scale != 1.0 and self.resolved_input_mode == "fit":
            log.warning("--scale %g has no effect with --input-mode fit (whole images are resized to --img-size %d); "
                        "use --input-mode crop for native-resolution crops at that scale", self.scale, self.img_size)
        if self.model == "hrmedseg" and self.init_decoder:
            raise InputError("--init-decoder applies to hrmedseg-sam / hrmedseg-sam2 (a SAM / SAM2 checkpoint); use "
                             "--init for a whole HRMedSeg")
        if self.model == "hrmedseg-sam2" and self.box_prior not in (None, "none"):
            raise InputError("--box-prior applies to hrmedseg-sam only (HRMedSegSAM2 bundles have no box prior)")
        if not (self.iou_loss_weight >= 0 and math.isfinite(self.iou_loss_weight)):
            raise InputError(f"--iou-loss-weight must be 0 or more, not {self.iou_loss_weight}")
        if self.train_only not in (None, *TRAIN_ONLY):
            raise InputError(f"--train-only must be one of {', '.join(TRAIN_ONLY)}, not '{self.train_only}'")
        if self.train_only == "iou-head":
            if self.task != "box":
                raise InputError("--train-only iou-head applies to the box models (hrmedseg-sam, hrmedseg-sam2)")
            if self.iou_loss_weight == 0:
                raise InputError("--train-only iou-head needs the IoU loss: --iou-loss-weight above 0")
        if self.clicks < 0 or self.click_mask_only < 0:
            raise InputError("--clicks and --click-mask-only must be 0 or more")
        if self.clicks and self.task != "box":
            raise InputError("--clicks applies to the box models (hrmedseg-sam, hrmedseg-sam2)")
        if self.clicks and self.train_only:
            raise InputError("--clicks trains the mask decoder; it cannot go with --train-only iou-head")
        if self.tensorboard:
            require_tensorboard()  # fail now, not after loading data and models

    @property
    def task(self) -> str:
        return "box" if self.model in BOX_MODELS else "semantic"

    @property
    def resolved_input_mode(self) -> str:
        # The box model is used through SamPredictor, which resizes the longest side to its input
        # size; the prompt-free model runs on native-resolution tiles.
        return self.input_mode or ("fit" if self.task == "box" else "crop")


# --------------------------------------------------------------------------------------------
# Models as the training loop sees them (the wrappers live in hrmedseg.models.training_views)
# --------------------------------------------------------------------------------------------


def _find_encoder(model: nn.Module) -> HRMedSegEncoder:
    for m in model.modules():
        if isinstance(m, HRMedSegEncoder):
            return m
    raise TypeError("the model has no HRMedSegEncoder")


def _encoder_parts(model: nn.Module) -> tuple[nn.Module, Preprocessing, Callable[[bool], None]]:
    """(the encoder to freeze with --freeze-encoder, the input normalisation, its grad-checkpointing switch)."""
    inner = unwrap(model)
    if isinstance(inner, Sam2BoxPromptedSegmenter):
        image_encoder = inner.sam.image_encoder
        return image_encoder, image_encoder.input_preprocessing, image_encoder.trunk.set_grad_checkpointing
    encoder = _find_encoder(inner)
    switch = inner.set_grad_checkpointing if hasattr(inner, "set_grad_checkpointing") else encoder.set_grad_checkpointing
    return encoder, encoder.preprocessing, switch


def _prompt_encoder(model: nn.Module) -> nn.Module:
    inner = unwrap(model)
    return inner.sam.sam_prompt_encoder if isinstance(inner, Sam2BoxPromptedSegmenter) else inner.sam.prompt_encoder


def click_prompt_parts(prompt_encoder: nn.Module) -> list[nn.Module]:
    """The parts of SAM's / SAM2's prompt encoder that ``--clicks`` trains: the negative and
    positive point embeddings and the mask prompt's downscaling convolutions.

    The box-corner embeddings and ``no_mask_embed`` stay frozen, so a box alone is embedded as
    before the run.
    """
    points = prompt_encoder.point_embeddings
    return [points[NEGATIVE], points[POSITIVE], prompt_encoder.mask_downscaling]


def iou_head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The decoder's IoU prediction head (SAM's or SAM2's), by parameter name of the wrapped model."""
    inner = unwrap(model)
    sam = getattr(inner, "sam", inner)
    return {name: p for name, p in sam.named_parameters() if name.startswith(IOU_HEAD_PREFIXES)}


def freeze_all_but_iou_head(model: nn.Module) -> int:
    """``--train-only iou-head``: only the IoU prediction head keeps ``requires_grad``; returns its size.

    Nothing upstream of the head's output changes, so the masks stay exactly as they were.
    """
    head = iou_head_parameters(model)
    if not head:
        raise HRMedSegError("--train-only iou-head: the model's mask decoder has no iou_prediction_head")
    head_ids = {id(p) for p in head.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head_ids)
    return sum(p.numel() for p in head.values())


def set_train_mode(model: nn.Module, cfg: FinetuneConfig) -> None:
    """Training mode for a training step; with ``--train-only iou-head`` the whole model stays in eval mode.

    The frozen network then computes the masks exactly as at inference (BatchNorm with its running
    statistics, which are not updated; SAM2's decoder picks its single mask as at inference), and
    the IoU head (linear layers only) learns the quality of those masks.
    """
    model.train(cfg.train_only != "iou-head")


def actual_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each thresholded predicted mask (logits > 0) with its target (>= 0.5), no gradient.

    logits, target: (N, 1, h, w) at the same resolution (the loss's); -> (N,) float32 in 0..1.
    """
    with torch.no_grad():
        return iou_per_mask(logits.detach()[:, 0] > 0, target[:, 0] >= 0.5)


def iou_loss(pred_iou: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SAM's IoU-prediction loss: MSE between the predicted and the actual IoU of each output mask."""
    return F.mse_loss(pred_iou.float(), actual_iou(logits, target).to(pred_iou.device))


def build_model(cfg: FinetuneConfig, num_classes: int, class_names: list[str] | None) -> nn.Module:
    """The model to train, from scratch or from --init / --init-encoder / --init-decoder files."""
    from hrmedseg.weights.checkpoint import read_checkpoint

    encoder_config = ENCODER_PRESETS[cfg.encoder_preset]
    if cfg.model == "hrmedseg-sam2":
        from hrmedseg.models.sam2 import build_hrmedseg_sam2_with_metadata, hrmedseg_sam2_from_checkpoint

        if cfg.init:
            sam2, metadata = hrmedseg_sam2_from_checkpoint(read_checkpoint(cfg.init))
        else:
            sam2, metadata = build_hrmedseg_sam2_with_metadata(
                encoder=cfg.init_encoder or HRMedSegEncoder(encoder_config), decoder=cfg.init_decoder)
        # Only the single-image path is trained; the video-memory modules (if loaded) stay as they are.
        for name, param in sam2.named_parameters():
            if not name.startswith(("image_encoder.", "sam_mask_decoder.", "sam_prompt_encoder.", "no_mem_embed")):
                param.requires_grad_(False)
        return Sam2BoxPromptedSegmenter(sam2.train(), cfg.img_size, metadata.sam2)
    if cfg.model == "hrmedseg-sam":
        from hrmedseg.models.sam import build_hrmedseg_sam, hrmedseg_sam_from_checkpoint

        init_prior = "none"
        if cfg.init:
            sam, metadata = hrmedseg_sam_from_checkpoint(read_checkpoint(cfg.init))
            init_prior = metadata.box_prior
        else:
            encoder = cfg.init_encoder or HRMedSegEncoder(encoder_config)
            sam = build_hrmedseg_sam(encoder=encoder, decoder=cfg.init_decoder)
        box_prior = cfg.box_prior if cfg.box_prior is not None else init_prior
        return BoxPromptedSegmenter(sam.train(), cfg.img_size, box_prior)
    from hrmedseg.models.hrmedseg_model import HRMedSeg, build_hrmedseg, load_hrmedseg

    if cfg.init:
        model = load_hrmedseg(cfg.init)
        if model.num_classes != num_classes:
            # Keep the encoder, start a new decoder for the new classes.
            log.warning("%s has %d classes, the data %d: its decoder is replaced", cfg.init, model.num_classes, num_classes)
            model = HRMedSeg(num_classes, model.encoder, model.decoder.pool_sizes, class_names)
        elif class_names:
            model.class_names = tuple(class_names)
        return model.train()
    return build_hrmedseg(
        num_classes,
        encoder_config=None if cfg.init_encoder else encoder_config,
        encoder_weights=cfg.init_encoder,
        class_names=class_names,
    )


def save_model(model: nn.Module, cfg: FinetuneConfig, path: str | os.PathLike, provenance: dict) -> Path:
    model = unwrap(model)
    if isinstance(model, Sam2BoxPromptedSegmenter):
        from hrmedseg.models.sam2 import save_hrmedseg_sam2

        with prompt_geometry(model.sam.sam_prompt_encoder, model.sam.image_size, model.sam.backbone_stride):
            return save_hrmedseg_sam2(model.sam, path, provenance=provenance, settings=model.settings)
    if isinstance(model, BoxPromptedSegmenter):
        from hrmedseg.models.sam import IMAGE_SIZE, save_hrmedseg_sam

        with prompt_geometry(model.sam.prompt_encoder, IMAGE_SIZE):
            return save_hrmedseg_sam(model.sam, path, provenance=provenance, box_prior=model.box_prior)
    from hrmedseg.models.hrmedseg_model import save_hrmedseg

    return save_hrmedseg(model, path, provenance=provenance)


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------


def normalize(images: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> normalised float32 on the same device."""
    return preprocessing.normalize(images.float())


def batch_loss(model: nn.Module, batch: dict, preprocessing: Preprocessing, device: torch.device,
               iou_loss_weight: float = 0.0, parts: dict[str, torch.Tensor] | None = None,
               click_plan: list[bool] | None = None) -> tuple[torch.Tensor | None, int]:
    """Loss of one batch and the number of masks it covered (None when it has no object).

    Box models: the mask loss plus ``iou_loss_weight`` times SAM's IoU-prediction MSE; with
    ``parts`` (a dict) the two terms are stored there, detached, as ``mask_loss`` / ``iou_loss``
    (tensors: reading them is left to the caller, so the step does not wait for the device).
    With ``click_plan`` (:meth:`ClickSchedule.plan`) the box prediction is refined by SAM's click
    iterations (training/clicks.py) and the loss is the mean over the box and every iteration.
    """
    images = normalize(batch["image"].to(device, non_blocking=True), preprocessing)
    if "target" in batch:
        logits = model(images)
        target = batch["target"].to(device, non_blocking=True)
        return segmentation_loss(logits.flatten(0, 1), target.flatten(0, 1)), target.shape[0] * target.shape[1]
    boxes = [b.to(device) for b in batch["boxes"]]
    if sum(len(b) for b in boxes) == 0:
        return None, 0
    per_image_masks = [m.to(device, non_blocking=True) for m in batch["masks"]]
    masks = torch.cat([m for m in per_image_masks if len(m)])
    if click_plan is None:
        outputs, ious = model(images, boxes, return_iou=True)
        iterations = [(torch.cat([o for o in outputs if len(o)]), torch.cat([p for p in ious if len(p)]))]
    else:
        refine = InteractiveRefinement(boxes, per_image_masks, click_plan, unwrap(model).input_size)
        iterations = model(images, boxes, refine=refine)
    # Loss at the decoder's 1/4 resolution: soft (area-averaged) targets, cheap for many masks.
    target = F.adaptive_avg_pool2d(masks[:, None].float(), iterations[0][0].shape[-2:])
    mask_terms = [segmentation_loss(logits, target) for logits, _ in iterations]
    loss = torch.stack(mask_terms).mean()
    if parts is not None:
        parts["mask_loss"] = loss.detach()
    if iou_loss_weight > 0:
        # The box prior is already in the logits (the wrapper adds it), so the actual IoU is that of
        # the mask inference returns.
        term = torch.stack([iou_loss(pred_iou, logits, target) for logits, pred_iou in iterations]).mean()
        loss = loss + iou_loss_weight * term
        if parts is not None:
            parts["iou_loss"] = term.detach()
    return loss, len(masks)


def _dice_at_mask_size(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(K,) Dice on the CPU of (K, 1, h, w) low-res ``logits``, upsampled bilinearly, against (K, H, W) ``masks``."""
    up = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return dice_per_mask(up[:, 0] > 0, masks).cpu()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, preprocessing: Preprocessing, device: torch.device,
             autocast: Callable, clicks: int = 0) -> dict[str, float]:
    """Mean validation loss and Dice (per object for box prompts; per image and class otherwise).

    ``clicks`` (box models): also ``val_dice_clicks``, the Dice after that many simulated clicks
    with mask prompts (training/clicks.py's annotator, no mask-only iterations).
    """
    model.eval()
    losses, dices, per_class, iou_errors, click_dices = [], [], [], [], []
    for batch in loader:
        images = normalize(batch["image"].to(device), preprocessing)
        if "target" in batch:
            target = batch["target"].to(device)
            with autocast():
                logits = model(images)
            losses.append((segmentation_loss(logits.flatten(0, 1), target.flatten(0, 1)).item(), target[:, 0].numel()))
            # A class absent from both the crop and the prediction says nothing: NaN, left out of means.
            d = dice_per_mask((logits > 0).flatten(0, 1), target.flatten(0, 1), empty_score=float("nan"))
            d = d.view(target.shape[:2]).cpu()
            per_class.append(d)
            dices.append(d.flatten()[~d.flatten().isnan()])
            continue
        boxes = [b.to(device) for b in batch["boxes"]]
        if sum(len(b) for b in boxes) == 0:
            continue
        with autocast():
            outputs, pred_ious = model(images, boxes, return_iou=True)
        for logits, pred_iou, masks in zip(outputs, pred_ious, batch["masks"]):
            if len(masks) == 0:
                continue
            masks = masks.to(device)
            low_target = F.adaptive_avg_pool2d(masks[:, None].float(), logits.shape[-2:])
            losses.append((segmentation_loss(logits, low_target).item(), len(masks)))
            dices.append(_dice_at_mask_size(logits, masks))
            # The IoU head's error against the IoU the loss trains it on (the thresholded mask at the
            # loss's resolution).
            iou_errors.append((pred_iou.float() - actual_iou(logits, low_target)).abs().cpu())
        if clicks:
            masks = [m.to(device) for m in batch["masks"]]
            with autocast():
                last, _ = model(images, boxes, refine=InteractiveRefinement(
                    boxes, masks, [True] * clicks, unwrap(model).input_size))[-1]
            click_dices.append(_dice_at_mask_size(last, torch.cat([m for m in masks if len(m)])))
    model.train()
    result: dict = {"val_loss": float("nan"), "val_dice": float("nan"), "val_masks": 0}
    if dices and sum(len(d) for d in dices):
        all_dice = torch.cat(dices)
        total = sum(n for _, n in losses)
        result = {"val_loss": sum(v * n for v, n in losses) / max(total, 1), "val_dice": all_dice.mean().item(),
                  "val_masks": int(all_dice.numel())}
    if isinstance(unwrap(model), (BoxPromptedSegmenter, Sam2BoxPromptedSegmenter)):
        result["val_iou_mae"] = float("nan")  # a column in every row of a box run's log
    if per_class:
        result["val_dice_per_class"] = torch.cat(per_class).nanmean(0).tolist()
    if iou_errors and sum(len(e) for e in iou_errors):
        result["val_iou_mae"] = torch.cat(iou_errors).mean().item()
    if clicks:
        result["val_dice_clicks"] = torch.cat(click_dices).mean().item() if click_dices else float("nan")
    return result


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    out: Path
    best_val_dice: float
    val_dice_before: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    stopped: str = "epochs"


def _amp_settings(cfg: FinetuneConfig, device: torch.device) -> tuple[Callable, torch.amp.GradScaler | None]:
    if not cfg.amp:
        return (lambda: torch.autocast(device.type, enabled=False)), None
    dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and dtype == torch.float16) else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _oom_message(cfg: FinetuneConfig) -> str:
    hints = [f"--batch-size (now {cfg.batch_size})", f"--img-size (now {cfg.img_size})"]
    if not cfg.amp:
        hints.append("add --amp")
    if not cfg.grad_checkpointing:
        hints.append("add --grad-checkpointing")
    if cfg.task == "box":
        hints.append(f"--max-boxes (now {cfg.max_boxes})")
    return "out of GPU memory while training; lower " + ", ".join(hints)


def _load_data(cfg: FinetuneConfig) -> tuple[DatasetInfo, list, list]:
    info = discover_samples(cfg.data)
    if cfg.val_data:
        val = discover_samples(cfg.val_data).samples
        train = info.samples
    else:
        train, val = split_samples(info.samples, cfg.val_fraction, cfg.seed)
        if not val:
            log.warning("only %d annotated image(s): validating on the training images (no held-out Dice)",
                        len(info.samples))
            val = list(train)
    return info, train, val


def finetune(cfg: FinetuneConfig, on_event: Callable[[Event], None] | None = None) -> FinetuneResult:
    """Train, validate every epoch, keep the best model at ``cfg.out``; see the module docstring."""
    cfg.check()
    emit = on_event or (lambda e: None)
    env, device = dist_utils.init_distributed(cfg.device)
    try:
        # Main process only; closed (TensorBoard flushed) however the run ends.
        with (EpochLog(log_path_for(cfg.out), cfg.tensorboard) if env.is_main else nullcontext()) as epoch_log:
            return _finetune(cfg, env, device, emit, epoch_log)
    except torch.OutOfMemoryError as err:
        raise HRMedSegError(_oom_message(cfg)) from err
    finally:
        dist_utils.cleanup(env)


def _prepare_for_training(model: nn.Module, cfg: FinetuneConfig) -> Preprocessing:
    """Apply --grad-checkpointing, --freeze-encoder and --train-only to ``model``; return its input normalisation."""
    encoder, preprocessing, set_grad_checkpointing = _encoder_parts(model)
    if cfg.grad_checkpointing:
        set_grad_checkpointing(True)
    if cfg.freeze_encoder:
        encoder.requires_grad_(False)
    if cfg.task == "box":
        _prompt_encoder(model).requires_grad_(False)  # boxes keep SAM's / SAM2's prompt embedding
        if cfg.clicks:
            for part in click_prompt_parts(_prompt_encoder(model)):
                part.requires_grad_(True)
    if cfg.train_only == "iou-head":
        log.info("--train-only iou-head: training %d parameters of the IoU prediction head, nothing else",
                 freeze_all_but_iou_head(model))
        if isinstance(model, BoxPromptedSegmenter):
            model.frozen_fast = FastMaskDecoder.supports(model.sam.mask_decoder)
    return preprocessing


def _finetune(cfg: FinetuneConfig, env: dist_utils.DistEnv, device: torch.device, emit: Callable,
              epoch_log: EpochLog | None) -> FinetuneResult:
    torch.manual_seed(cfg.seed + env.rank)
    out = Path(cfg.out)
    state_file = state_path_for(out)
    info, train_samples, val_samples = _load_data(cfg)
    rules = parse_classes(cfg.classes)
    if rules is None and cfg.task == "semantic":  # an annotation store's object classes, if it has any
        rules = store_class_rules(train_samples, val_samples)
    class_names = [r.name for r in rules] if rules else None
    num_classes = len(rules) if rules else 1

    model = build_model(cfg, num_classes, class_names).to(device)
    preprocessing = _prepare_for_training(model, cfg)
    iou_weight = cfg.iou_loss_weight if cfg.task == "box" else 0.0
    schedule = ClickSchedule(cfg.clicks, cfg.click_mask_only) if cfg.clicks else None
    plan_rng = random.Random(cfg.seed + env.rank)  # where the mask-only iterations go, step by step

    crop = CropSettings(size=cfg.img_size, mode=cfg.resolved_input_mode, scale=cfg.scale,
                        pad_value=preprocessing.pad_value)
    common = dict(task=cfg.task, crop=crop, classes=rules, max_boxes=cfg.max_boxes, seed=cfg.seed)
    train_set = SegmentationCrops(train_samples, train=True, repeats=cfg.repeats, box_jitter=cfg.box_jitter, **common)
    val_set = SegmentationCrops(val_samples, train=False, **common)
    workers = default_workers(cfg.num_workers)
    train_batches, sampler = train_loader(train_set, cfg.batch_size, workers, collate, env, device, cfg.seed)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False,
                            **loader_options(workers, collate, device))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    autocast, scaler = _amp_settings(cfg, device)

    # best: the best selection score so far (val Dice; minus val_iou_mae with --train-only iou-head,
    # whose masks cannot change); best_dice: the val Dice of the model kept at --out.
    start_epoch, best, before, bad_epochs, history, step = 0, -math.inf, float("nan"), 0, [], 0
    best_dice = -math.inf
    if cfg.resume and state_file.exists():
        state = restore(state_file, unwrap(model), optimizer, scheduler, scaler)
        start_epoch, best_dice, before = state["epoch"], state["best_val_dice"], state["val_dice_before"]
        best = state.get("best_score", best_dice)
        bad_epochs, history, step = state["bad_epochs"], state["history"], state.get("step", 0)
        log.info("resuming %s at epoch %d (best val Dice %.4f)", state_file, start_epoch, best_dice)
        emit({"event": "resumed", "epoch": start_epoch, "best_val_dice": best_dice, "state": str(state_file)})
    elif cfg.resume:
        log.info("no state at %s: starting a new run", state_file)

    # SAM's decoder has outputs unused in single-mask mode (other mask tokens, IoU head).
    train_model = wrap_ddp(model, env, device, find_unused_parameters=cfg.task == "box")

    emit({"event": "start", "model": cfg.model, "train_images": len(train_samples), "val_images": len(val_samples),
          "epochs": cfg.epochs, "steps_per_epoch": len(train_batches), "device": str(device),
          "world_size": env.world_size})
    if start_epoch == 0 and env.is_main:
        first = evaluate(model, val_loader, preprocessing, device, autocast, cfg.clicks)
        before = first["val_dice"]
        emit({"event": "baseline", "val_dice": before, **{k: v for k, v in first.items() if k != "val_dice"}})
    dist_utils.barrier(env)

    t_start = time.monotonic()
    deadline = t_start + cfg.time_limit_min * 60 if cfg.time_limit_min else None
    stopped = "epochs"
    runner = EpochRunner(
        train_batches, sampler, optimizer, scheduler, scaler, env, device, emit,
        non_finite_message=lambda value, epoch, step: (
            f"the training loss became {value} at epoch {epoch + 1}, step {step}: lower --lr (now {cfg.lr}) "
            f"or use --amp-dtype bf16"),
        step_event=lambda epoch, step, value: {"event": "step", "epoch": epoch + 1, "step": step, "loss": value,
                                               "lr": optimizer.param_groups[0]["lr"]},
        log_every=cfg.log_every,
        stop_now=lambda step: bool((deadline and time.monotonic() > deadline) or (cfg.max_steps and step >= cfg.max_steps)),
        step=step,
        progress=progress_bar(env, (cfg.epochs - start_epoch) * len(train_batches), "fine-tuning"),
    )
    for epoch in range(start_epoch, cfg.epochs):
        set_train_mode(train_model, cfg)
        iou_loss_sum: float | torch.Tensor = 0.0  # summed on the device, read once per epoch

        def step_loss(batch: dict) -> tuple[torch.Tensor, int] | None:
            nonlocal iou_loss_sum
            parts: dict[str, torch.Tensor] = {}
            with autocast():
                loss, _ = batch_loss(train_model, batch, preprocessing, device, iou_weight, parts,
                                     schedule.plan(plan_rng) if schedule else None)
            if loss is None:
                return None
            iou_loss_sum += parts.get("iou_loss", 0.0)
            return loss, len(batch["image"])

        totals = runner.run(epoch, step_loss)
        step = runner.step
        extra = {"train_iou_loss": runner.mean_over_ranks(iou_loss_sum, totals)} if iou_weight > 0 else {}
        row = runner.row(epoch, totals, **extra)
        if env.is_main:
            row.update(evaluate(model, val_loader, preprocessing, device, autocast, cfg.clicks))
            score = _selection_score(cfg, row)
            improved = score > best or not out.exists() or (best == -math.inf and epoch == start_epoch)
            if improved:
                best, bad_epochs = max(score, best), 0
                best_dice = row["val_dice"] if math.isfinite(row["val_dice"]) else -math.inf
                save_model(model, cfg, out, _provenance(cfg, info, len(train_samples), len(val_samples), row, before))
            else:
                bad_epochs += 1
            row["best_val_dice"] = best_dice
            history.append(row)
            epoch_log.write(row, step=row["epoch"])
            save_state(state_file, {
                "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "epoch": epoch + 1, "step": step, "best_val_dice": best_dice, "best_score": best,
                "val_dice_before": before,
                "bad_epochs": bad_epochs, "history": history, "config": asdict(cfg),
            })
            emit({"event": "epoch", **row, "improved": improved})
        stop = torch.tensor([0], device=device)
        if env.is_main:
            if cfg.patience and bad_epochs >= cfg.patience:
                stopped, stop[0] = "early stopping", 1
            elif deadline and time.monotonic() > deadline:
                stopped, stop[0] = "time limit", 1
            elif cfg.max_steps and step >= cfg.max_steps:
                stopped, stop[0] = "max steps", 1
        if env.enabled:
            torch.distributed.broadcast(stop, 0)
        if stop.item():
            break
    runner.progress.close()
    epochs_run = len(history)
    result = FinetuneResult(out, best_dice, before, epochs_run, history, stopped)
    if env.is_main:
        emit({"event": "done", "out": str(out), "best_val_dice": best_dice, "val_dice_before": before,
              "epochs": epochs_run, "stopped": stopped, "minutes": (time.monotonic() - t_start) / 60})
    return result


def _selection_score(cfg: FinetuneConfig, row: dict) -> float:
    """Higher is better: val Dice, or minus the IoU head's val error when only that head trains.

    With ``--clicks``: the mean of the box's val Dice and the val Dice after the clicks (a model
    that refines well but lost its box masks is no better than one that never refines).
    """
    value = -row.get("val_iou_mae", math.nan) if cfg.train_only == "iou-head" else row["val_dice"]
    if cfg.clicks:
        value = (value + row.get("val_dice_clicks", math.nan)) / 2
    return value if math.isfinite(value) else -math.inf


def _provenance(cfg: FinetuneConfig, info: DatasetInfo, n_train: int, n_val: int, row: dict, before: float) -> dict:
    """What the model card needs: data, licence, recipe, input geometry and validation scores."""
    return {
        "source": "hrmedseg.training finetune",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.model,
        "data": str(cfg.data),
        "data_layout": info.layout,
        "data_licence": info.licence,
        "data_citation": info.citation,
        "note": cfg.provenance_note,
        "train_images": n_train,
        "val_images": n_val,
        "classes": cfg.classes,
        "img_size": cfg.img_size,
        "input_mode": cfg.resolved_input_mode,
        "scale": cfg.scale,
        "epoch": row["epoch"],
        "val_dice": row["val_dice"],
        "val_dice_before": before,
        **({"val_iou_mae": row["val_iou_mae"]} if "val_iou_mae" in row else {}),
        **({"val_dice_clicks": row["val_dice_clicks"]} if "val_dice_clicks" in row else {}),
        "recipe": {k: getattr(cfg, k) for k in ("lr", "lr_decay", "batch_size", "amp", "amp_dtype", "box_jitter",
                                                "init", "init_encoder", "init_decoder", "encoder_preset",
                                                "iou_loss_weight", "train_only", "clicks", "click_mask_only")},
    }
