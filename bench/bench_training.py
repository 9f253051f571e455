"""Fine-tuning cost: peak GPU memory and images/s of HRMedSeg vs MONAI's BasicUNet, in one run.

Each configuration trains for --steps optimiser steps (after --warmup) on random images and
masks with the recipe's loss (0.8 Dice + 0.2 focal) and Adam, and reports peak allocated GPU
memory (torch.cuda.max_memory_allocated) and images per second:

- HRMedSeg (paper size, 1 class) fp32; HRMedSeg with bf16 autocast + activation checkpointing;
- BasicUNet(features=(32, 32, 64, 128, 256, 32)) fp32 and bf16 autocast (the baseline).

GPU (paper setting): python bench/bench_training.py --img-size 1024 --batch-size 16
CPU smoke test:      python bench/bench_training.py --img-size 128 --batch-size 2 --steps 2
Two GPUs (DDP):      torchrun --nproc-per-node 2 bench/bench_training.py --ddp --only hrmedseg-amp-ckpt
Prints a Markdown table (and --json FILE writes the rows).

End to end on real data (held-out Dice of a fine-tuned prompt-free model vs an Otsu threshold):
    python bench/bench_training.py --e2e-train DIR --e2e-val DIR --e2e-minutes 8 [--img-size 512 --batch-size 16 --amp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date

import torch

from hrmedseg.training.losses import segmentation_loss


def build(name: str, num_classes: int):
    if name.startswith("hrmedseg"):
        from hrmedseg.models.hrmedseg_model import build_hrmedseg

        model = build_hrmedseg(num_classes)
        if "ckpt" in name:
            model.set_grad_checkpointing(True)
        return model
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=3, out_channels=num_classes, features=(32, 32, 64, 128, 256, 32))


CONFIGS = {  # name: (model, autocast)
    "hrmedseg-fp32": ("hrmedseg", False),
    "hrmedseg-amp-ckpt": ("hrmedseg-ckpt", True),
    "basicunet-fp32": ("basicunet", False),
    "basicunet-amp": ("basicunet", True),
}


def measure(name: str, args, device: torch.device, rank: int, world: int) -> dict:
    model_name, amp = CONFIGS[name]
    torch.manual_seed(0)
    model = build(model_name, 1).to(device).train()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    b, s = args.batch_size, args.img_size
    images = torch.randn(b, 3, s, s, device=device)
    masks = (torch.rand(b, 1, s, s, device=device) > 0.7).float()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    status = "ok"
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = segmentation_loss(model(images).flatten(0, 1), masks.flatten(0, 1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        status, elapsed = "out of memory", float("nan")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, optimizer
    return {
        "config": name, "img_size": s, "batch_per_gpu": b, "gpus": world, "precision": "bf16 autocast" if amp else "fp32",
        "grad_checkpointing": "ckpt" in model_name, "peak_alloc_gib": round(peak, 2),
        "images_per_s": round(b * world * args.steps / elapsed, 2) if status == "ok" else None, "status": status,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", nargs="*", choices=list(CONFIGS), help="a subset of the configurations")
    p.add_argument("--ddp", action="store_true", help="under torchrun: one process per GPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--e2e-train", help="folder of real image/mask pairs: fine-tune, then evaluate on --e2e-val")
    p.add_argument("--e2e-val")
    p.add_argument("--e2e-minutes", type=float, default=8)
    p.add_argument("--e2e-preset", default="paper")
    p.add_argument("--e2e-lr", type=float, default=1e-4)
    p.add_argument("--amp", action="store_true", help="--e2e: mixed precision")
    args = p.parse_args()
    if args.e2e_train:
        return end_to_end(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = 0, 1
    if args.ddp and "WORLD_SIZE" in os.environ:
        from hrmedseg.training.distributed import init_distributed

        env, device = init_distributed()
        rank, world = env.rank, env.world_size
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    rows = [measure(name, args, device, rank, world) for name in (args.only or CONFIGS)]
    if rank == 0:
        print(f"# fine-tuning cost, {machine}, torch {torch.__version__}, {date.today()}, "
              f"{args.steps} timed steps after {args.warmup} warm-up, random data, 1 class\n")
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for r in rows:
            print("| " + " | ".join(str(r[k]) for k in keys) + " |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine, "torch": torch.__version__, "date": str(date.today()), "rows": rows}, f, indent=1)
    if world > 1:
        torch.distributed.destroy_process_group()


def end_to_end(args) -> None:
    """Fine-tune HRMedSeg on real pairs for a few minutes; held-out Dice vs the Otsu baseline."""
    import tempfile

    from hrmedseg.training.evaluate import evaluate_prompt_free
    from hrmedseg.training.finetune import FinetuneConfig, finetune

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/e2e.pt"
        result = finetune(FinetuneConfig(model="hrmedseg", data=args.e2e_train, val_data=args.e2e_val, out=out,
                                         img_size=args.img_size, batch_size=args.batch_size, amp=args.amp,
                                         encoder_preset=args.e2e_preset, lr=args.e2e_lr, epochs=10000, patience=0,
                                         time_limit_min=args.e2e_minutes, device=device))
        scores = evaluate_prompt_free(out, args.e2e_val, device)
    losses = [row["train_loss"] for row in result.history]
    machine = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"# end to end, {machine}, {date.today()}: HRMedSeg ({args.e2e_preset}) fine-tuned {args.e2e_minutes} min "
          f"from random weights, {args.img_size} px crops, batch {args.batch_size}, lr {args.e2e_lr}\n")
    print(f"epochs {len(losses)}, train loss first/last epoch {losses[0]:.4f} / {losses[-1]:.4f}")
    print(f"held-out whole-image foreground Dice on {scores['images']} images: HRMedSeg {scores['model_dice']:.4f}, "
          f"Otsu threshold {scores['otsu_dice']:.4f}")


if __name__ == "__main__":
    main()
