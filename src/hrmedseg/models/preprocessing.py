"""Pixel normalisation that belongs to a set of weights, so no caller has to know it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Preprocessing:
    """Pixels in 0..255 (RGB) become ``(x - pixel_mean) / pixel_std``."""

    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD

    @classmethod
    def sam(cls) -> "Preprocessing":
        """SAM's own normalisation (ImageNet statistics in 0..255)."""
        return cls(SAM_PIXEL_MEAN, SAM_PIXEL_STD)

    @classmethod
    def hrmedseg_release(cls) -> "Preprocessing":
        """The authors' released checkpoint: their loader divides by the mean, not the std."""
        return cls(SAM_PIXEL_MEAN, SAM_PIXEL_MEAN)

    @property
    def pad_value(self) -> tuple[int, int, int]:
        """The uint8 RGB colour that pads images before normalisation (the rounded mean: about 0 after).

        Training pads its crops with it, and the engine pads its crops with the same colour.
        """
        return tuple(int(round(v)) for v in self.pixel_mean)  # type: ignore[return-value]

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in 0..255 -> normalised (B, 3, H, W)."""
        mean = torch.tensor(self.pixel_mean, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        return (image - mean) / std

    def to_dict(self) -> dict:
        return {"pixel_mean": list(self.pixel_mean), "pixel_std": list(self.pixel_std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(tuple(d["pixel_mean"]), tuple(d["pixel_std"]))

    @classmethod
    def recorded(cls, d: dict) -> "Preprocessing":
        """A bundle's recorded normalisation; SAM's own when the bundle records none."""
        return cls.from_dict(d) if d else cls.sam()
