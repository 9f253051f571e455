"""Interchange with the tools labs already use: QuPath GeoJSON, COCO, label images, bioimage.io.

Annotations leave a project through :func:`export_annotations` and come in through
:func:`import_annotations`; the prompt-free models leave as bioimage.io packages
(``hrmedseg.interchange.bioimageio``, which needs torch).
"""

from .project import EXPORT_FORMATS, ExportFormat, export_annotations, import_annotations

__all__ = ["EXPORT_FORMATS", "ExportFormat", "export_annotations", "import_annotations"]
