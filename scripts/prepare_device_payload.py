"""Copy what a GPU run needs into the git-ignored device_payload/ folder (it travels with `carry`).

- wheels/: dependencies the GPU image lacks, for Python 3.12 (pip download; needs PyPI).
- data/<dataset>_{train,val}/{images,masks}: the real annotated images of ../shared/data with a
  fixed held-out split (every image whose name hashes into the last 15% goes to val), fundus
  photos downscaled so their long side is at most --fundus-size (they never enter the repo).
- data/box_{train,val}/manifest.json: both datasets as box-prompt training pairs for one model:
  nuclei masks as they are (one object per label), and per fundus photo two binary masks, the
  optic disc (label >= 1) and the cup (label 2), since the cup lies inside the disc and one label
  image cannot hold both objects.

Usage: python scripts/prepare_device_payload.py [--shared ../shared] [--out device_payload]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
from PIL import Image

VAL_FRACTION = 0.15


def is_val(name: str) -> bool:
    """Deterministic split by name, independent of file order and machine."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF >= 1 - VAL_FRACTION


def copy_split(src: Path, dest: Path, resize_long_side: int | None) -> dict[str, list[str]]:
    manifest = json.loads((src / "manifest.json").read_text())
    split: dict[str, list[str]] = {"train": [], "val": []}
    for item in manifest["items"]:
        part = "val" if is_val(item["name"]) else "train"
        split[part].append(item["name"])
        out = dest.parent / f"{dest.name}_{part}"
        for kind in ("images", "masks"):
            (out / kind).mkdir(parents=True, exist_ok=True)
        image_src, mask_src = src / item["image"], src / item["mask"]
        if resize_long_side is None:
            shutil.copy2(image_src, out / "images" / image_src.name)
            shutil.copy2(mask_src, out / "masks" / mask_src.name)
            continue
        image, mask = Image.open(image_src), Image.open(mask_src)
        scale = resize_long_side / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image.resize(size, Image.BICUBIC).save(out / "images" / image_src.name, quality=92)
        Image.fromarray(np.asarray(mask)).resize(size, Image.NEAREST).save(out / "masks" / mask_src.name)
    return split


def write_box_manifests(data: Path, splits: dict[str, dict[str, list[str]]]) -> None:
    for part in ("train", "val"):
        root = data / f"box_{part}"
        (root / "masks").mkdir(parents=True, exist_ok=True)
        items = []
        for name in splits["nuclei"][part]:
            items.append({"name": name, "image": f"../nuclei_{part}/images/{name}.png",
                          "mask": f"../nuclei_{part}/masks/{name}.png"})
        for name in splits["fundus"][part]:
            labels = np.asarray(Image.open(data / f"fundus_{part}" / "masks" / f"{name}.png"))
            for target, binary in (("disc", labels >= 1), ("cup", labels == 2)):
                mask_name = f"{name}_{target}.png"
                Image.fromarray(binary.astype(np.uint8)).save(root / "masks" / mask_name)
                items.append({"name": f"{name}_{target}", "image": f"../fundus_{part}/images/{name}.jpg",
                              "mask": f"masks/{mask_name}"})
        (root / "manifest.json").write_text(json.dumps({"items": items}, indent=1))


# What the GPU image (torch 2.11, Python 3.12; device/KINDS.md lists its packages) lacks of this
# package's dependencies and the benchmarks' baselines. Versions are this environment's own.
WHEELS = ("segment-anything", "hydra-core", "omegaconf", "imagecodecs", "zarr", "numcodecs", "donfig",
          "google-crc32c", "dask", "partd", "locket", "pooch", "platformdirs")
# Published as source only: built into wheels here (pure Python; sam2 without its CUDA extension).
SDISTS = ("sam2", "antlr4-python3-runtime", "iopath")
EXTRA = ("monai==1.6.1",)  # BasicUNet, the training benchmark's baseline


def download_wheels(dest: Path) -> None:
    """Wheels for Python 3.12 on x86_64 Linux of everything in WHEELS, SDISTS and EXTRA."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    pinned = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64") for a in ("--platform", p)]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", *platforms,
                    "-d", str(dest), *pinned, *EXTRA], check=True)
    env = {**os.environ, "SAM2_BUILD_CUDA": "0"}
    sdists = [f"{name}=={version(name)}" for name in SDISTS]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), *sdists], check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=Path("device_payload"))
    parser.add_argument("--fundus-size", type=int, default=1024)
    parser.add_argument("--no-wheels", action="store_true", help="only the data (no PyPI access needed)")
    args = parser.parse_args()
    if not args.no_wheels:
        download_wheels(args.out / "wheels")
    data = args.out / "data"
    splits = {
        "nuclei": copy_split(args.shared / "data" / "nuclei_dsb2018", data / "nuclei", None),
        "fundus": copy_split(args.shared / "data" / "fundus_drishtigs", data / "fundus", args.fundus_size),
    }
    (data / "splits.json").write_text(json.dumps(splits, indent=1))
    write_box_manifests(data, splits)
    for name, split in splits.items():
        print(f"{name}: {len(split['train'])} train, {len(split['val'])} val")


if __name__ == "__main__":
    main()
