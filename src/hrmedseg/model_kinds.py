"""The kinds of model HRMedSeg trains and loads, and the one spelling of each for each role.

A kind has three names, each with one job:

- ``architecture`` (``hrmedseg_sam``): the bundle's "architecture" and the weights registry's
  "kind", written into files; never changes.
- ``option`` (``hrmedseg-sam``): the value of the training command line's ``--model`` (and what
  the napari Train dock passes to it), kept as it is so existing commands keep working.
- ``display`` (``HRMedSegSAM``): what people read, and the model's class name.

Standard library only, so the napari plugin reads it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelKind:
    """One kind of model under its three names (see the module docstring)."""

    architecture: str
    option: str
    display: str
    box_prompted: bool


MODEL_KINDS: tuple[ModelKind, ...] = (
    ModelKind("hrmedseg_sam", "hrmedseg-sam", "HRMedSegSAM", box_prompted=True),
    ModelKind("hrmedseg_sam2", "hrmedseg-sam2", "HRMedSegSAM2", box_prompted=True),
    ModelKind("hrmedseg", "hrmedseg", "HRMedSeg", box_prompted=False),
)


def model_kind(architecture: str) -> ModelKind:
    """The kind whose architecture is ``architecture`` (KeyError names the known ones)."""
    for kind in MODEL_KINDS:
        if kind.architecture == architecture:
            return kind
    raise KeyError(f"unknown model kind {architecture!r}; known: {[k.architecture for k in MODEL_KINDS]}")
