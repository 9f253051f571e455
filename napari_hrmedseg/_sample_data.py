"""Sample-data contributions: images shipped inside ``hrmedseg.data`` (no download)."""

from __future__ import annotations

from typing import Any

from hrmedseg.data import SAMPLES, load_sample, sample_path


def _layer(name: str) -> list[tuple[Any, dict, str]]:
    pixels = load_sample(name)
    meta = {
        "name": name.replace("_", " "),
        "rgb": pixels.ndim == 3,
        # tells the annotator (and the annotation store) which file the pixels came from
        "metadata": {"hrmedseg_source": str(sample_path(name)), "description": SAMPLES[name][1]},
    }
    return [(pixels, meta, "image")]


def fundus() -> list[tuple[Any, dict, str]]:
    """Colour fundus photograph of a normal left eye (CC0, M. Häggström via scikit-image)."""
    return _layer("fundus")


def nuclei_fluorescence() -> list[tuple[Any, dict, str]]:
    """Fluorescent nuclei, DSB 2018 (CC0)."""
    return _layer("nuclei_fluorescence")


def nuclei_stained() -> list[tuple[Any, dict, str]]:
    """Stained tissue with nuclei, DSB 2018 (CC0)."""
    return _layer("nuclei_stained")
