"""What a loaded model is, beside its tensors: one typed record returned with the module.

segment-anything's ``Sam`` and sam2's ``SAM2Base`` are third-party classes; hrmedseg does not
hang its own attributes on them. Loaders return :class:`LoadedModel` ``(module, metadata)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

from torch import nn

from .prior_gate import PriorGate


@dataclass(frozen=True)
class Sam2Settings:
    """What an HRMedSegSAM2 is rebuilt from beside its tensors (kept in its bundle's config).

    Attributes:
        sam2_config: the sam2 config its heads follow ("sam2.1_hiera_t", "sam2_hiera_l", ...).
        memory: whether the video-memory tensors were loaded (False: left random).
        neck: ``Sam2NeckConfig.to_dict()`` of its neck (channel widths).
    """

    sam2_config: str
    memory: bool = False
    neck: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"sam2_config": self.sam2_config, "memory": self.memory, "neck": dict(self.neck)}


def says_untrained(provenance: Mapping[str, Any]) -> bool:
    """True when a provenance record says its weights are not trained (``trained: False`` or ``untrained: True``)."""
    return provenance.get("trained") is False or provenance.get("untrained") is True


@dataclass(frozen=True)
class ModelMetadata:
    """Where a model's weights come from and how it is fed.

    Attributes:
        kind: "hrmedseg_sam" (segment-anything ``Sam``), "hrmedseg_sam2" (sam2 ``SAM2Base``),
            "hrmedseg" (prompt-free HRMedSeg) or "litemedsam" (LiteMedSAM as a ``Sam``, 256 input).
        source: the file or name it was loaded from ("" when built in memory).
        provenance: the bundle's provenance record ({} when none was given).
        input_size: side S of the square (B, 3, S, S) input the image encoder takes (1024).
        box_prior: shape prior added to the mask decoder's low-res logits ("none" or
            "ellipse", see ``hrmedseg.models.box_prior``); "none" for SAM2 and prompt-free models.
        sam2: for "hrmedseg_sam2", its sam2 config, memory flag and neck widths; else None.
        max_upscale: the largest enlargement of small objects the box engine's crops should use
            (``CropPolicy.max_upscale``) when the weights were made for another than its default
            2: a student distilled from a 256-input teacher at 4x its resolution sees small
            objects as the teacher did at 4 x 2 = 8. None: the engine's default.
        prior_gate: the fitted per-object choice between the model's mask and the ellipse
            (``hrmedseg.models.prior_gate.PriorGate``, the box prior rule "gate"); None when
            the weights come without one.
        click_fix: the "pixel" click update's settings chosen for these weights (fields of
            ``hrmedseg.engine.click_update.ClickFix``, from the bundle's ``config["click_fix"]``
            or a ``<weights>.click_fix.json`` beside the file); None: the engine's defaults.
        click_fix_source: where ``click_fix`` was read from (for error messages).
    """

    kind: str
    source: str = ""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    input_size: int = 1024
    box_prior: str = "none"
    sam2: Sam2Settings | None = None
    max_upscale: float | None = None
    prior_gate: PriorGate | None = None
    click_fix: Mapping[str, Any] | None = None
    click_fix_source: str = ""

    @property
    def untrained(self) -> bool:
        """The provenance records random / untrained weights (masks are meaningless)."""
        return says_untrained(self.provenance)


class LoadedModel(NamedTuple):
    """A model in eval mode and its :class:`ModelMetadata`."""

    module: nn.Module
    metadata: ModelMetadata


__all__ = ["LoadedModel", "ModelMetadata", "Sam2Settings", "says_untrained"]
