"""Lazy reading and atomic writing of large images, and box files."""

from .boxes import BoxClippedWarning, box_label, check_boxes, read_boxes
from .readers import ArrayImage, DecodedFileImage, LazyImage, TiffImage, open_image
from .writers import label_dtype, write_label_tiff, write_object_table

__all__ = [
    "ArrayImage",
    "BoxClippedWarning",
    "DecodedFileImage",
    "LazyImage",
    "TiffImage",
    "box_label",
    "check_boxes",
    "label_dtype",
    "open_image",
    "read_boxes",
    "write_label_tiff",
    "write_object_table",
]
