"""Lazy reading and atomic writing of large images, and box and point files."""

from .boxes import BoxClippedWarning, box_label, check_boxes, read_boxes
from .points import PointPrompts, prompts_for_objects, read_points
from .readers import ArrayImage, DecodedFileImage, LazyImage, TiffImage, image_shape_yx, open_image
from .ome_zarr import open_ome_zarr, write_label_image
from .writers import check_free_space, label_dtype, label_tiff_bytes, write_label_tiff, write_object_table

__all__ = [
    "ArrayImage",
    "BoxClippedWarning",
    "DecodedFileImage",
    "LazyImage",
    "PointPrompts",
    "TiffImage",
    "box_label",
    "check_boxes",
    "check_free_space",
    "label_dtype",
    "label_tiff_bytes",
    "image_shape_yx",
    "open_image",
    "open_ome_zarr",
    "prompts_for_objects",
    "read_boxes",
    "read_points",
    "write_label_image",
    "write_label_tiff",
    "write_object_table",
]
