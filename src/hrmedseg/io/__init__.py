"""Lazy reading and atomic writing of large images, and box and point files."""

from .boxes import BoxClippedWarning, check_boxes, read_boxes
from .points import PointPrompts, prompts_for_objects, read_points
from .readers import ArrayImage, DecodedFileImage, LazyImage, TiffImage, open_image
from .writers import label_dtype, write_label_tiff, write_object_table

__all__ = [
    "ArrayImage",
    "BoxClippedWarning",
    "DecodedFileImage",
    "LazyImage",
    "PointPrompts",
    "TiffImage",
    "check_boxes",
    "label_dtype",
    "open_image",
    "prompts_for_objects",
    "read_boxes",
    "read_points",
    "write_label_tiff",
    "write_object_table",
]
