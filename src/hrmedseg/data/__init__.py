"""Sample images that ship with the package (see README.md here for sources and terms).

All are real, openly licensed (CC0) photographs; nothing here is synthetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError

_HERE = Path(__file__).resolve().parent

#: name -> (file in this folder, one-line description for menus)
SAMPLES: dict[str, tuple[str, str]] = {
    "fundus": ("fundus_haggstrom_cc0.jpg", "Fundus photograph, normal left eye (CC0, Häggström)"),
    "nuclei_fluorescence": (
        "nuclei_fluorescence_dsb2018_4e1c889de3764694.png",
        "Fluorescent nuclei, DSB 2018 (CC0)",
    ),
    "nuclei_stained": ("nuclei_stained_dsb2018_4e92129f4e8066d6.png", "Stained tissue nuclei, DSB 2018 (CC0)"),
}


def sample_names() -> list[str]:
    """The names ``sample_path`` and ``load_sample`` accept."""
    return list(SAMPLES)


def sample_path(name: str) -> Path:
    """Path of a shipped sample image; InputError naming the valid names for an unknown one."""
    if name not in SAMPLES:
        raise InputError(f"unknown sample '{name}'; known samples: {', '.join(SAMPLES)}")
    return _HERE / SAMPLES[name][0]


def load_sample(name: str) -> np.ndarray:
    """The sample's pixels: (H, W) uint8 for grey images, (H, W, 3) uint8 for colour ones."""
    from PIL import Image

    with Image.open(sample_path(name)) as im:
        return np.asarray(im)


def sample_boxes(name: str) -> Path | None:
    """CSV of tight boxes (x0,y0,x1,y1) around the objects of a sample, from its annotation, or None."""
    path = sample_path(name).with_suffix(".boxes.csv")
    return path if path.is_file() else None
