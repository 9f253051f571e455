"""Lazy reading and atomic writing of large images, and box files."""

from .boxes import BoxClippedWarning, box_label, check_boxes, read_boxes
from .readers import ArrayImage, DecodedFileImage, LazyImage, TiffImage, open_image
from .ome_zarr import open_ome_zarr, write_label_image
from .writers import check_free_space, label_dtype, label_tiff_bytes, write_label_tiff, write_object_table

__all__ = [
    "ArrayImage",
    "BoxClippedWarning",
    "DecodedFileImage",
    "LazyImage",
    "TiffImage",
    "box_label",
    "check_boxes",
    "check_free_space",
    "label_dtype",
    "label_tiff_bytes",
    "open_image",
    "open_ome_zarr",
    "read_boxes",
    "write_label_image",
    "write_label_tiff",
    "write_object_table",
]
