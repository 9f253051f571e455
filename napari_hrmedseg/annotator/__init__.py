"""The annotator, Qt-free: layer binding (``layers``), a job queue (``jobs``), store I/O (``store_io``).

``Annotator`` (``annotator.py``) joins them; the dock (``napari_hrmedseg.annotator_widget``)
is a thin layer of controls over it.
"""

from .annotator import Annotator
from .jobs import JobQueue
from .layers import LayerBinding
from .store_io import ProjectStore

__all__ = ["Annotator", "JobQueue", "LayerBinding", "ProjectStore"]
