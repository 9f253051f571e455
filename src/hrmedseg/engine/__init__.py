"""Box-prompted segmentation of images of any size at native resolution.

    from hrmedseg.engine import BoxPredictor
    predictor = BoxPredictor(model)                     # a Sam-like or SAM2Base module, or a name/path
    labels, records = predictor.segment("slide.ome.tif", boxes)
"""

from .cache import EmbeddingCache
from .crops import INTERACTIVE_MAX_UPSCALE, Crop, CropPolicy, interactive_policy, logits_to_native, plan_crops, read_crop
from .decoder import BoxDecoder, Sam2BoxDecoder, Sam2Features, Sam2ImageEncoder, SamBoxDecoder, SamImageEncoder
from .intensity import ChannelScaling, IntensityOptions, compute_scaling
from .labels import OVERLAP_POLICIES, ObjectMask, ObjectRecord, SparseLabels, paste_object
from .predictor import DEFAULT_BOX_MODEL, BoxPredictor, resolve_device, resolve_model

__all__ = [
    "DEFAULT_BOX_MODEL",
    "INTERACTIVE_MAX_UPSCALE",
    "OVERLAP_POLICIES",
    "BoxDecoder",
    "BoxPredictor",
    "ChannelScaling",
    "Crop",
    "CropPolicy",
    "EmbeddingCache",
    "IntensityOptions",
    "ObjectMask",
    "ObjectRecord",
    "Sam2BoxDecoder",
    "Sam2Features",
    "Sam2ImageEncoder",
    "SamBoxDecoder",
    "SamImageEncoder",
    "SparseLabels",
    "compute_scaling",
    "interactive_policy",
    "logits_to_native",
    "paste_object",
    "plan_crops",
    "read_crop",
    "resolve_device",
    "resolve_model",
]

# Prompt-free HRMedSeg (no boxes): tiles or fits images as the model was trained.
from .semantic import Cancelled, InputGeometry, SemanticPredictor  # noqa: E402

__all__ += ["Cancelled", "InputGeometry", "SemanticPredictor"]
