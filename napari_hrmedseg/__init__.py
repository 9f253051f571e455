"""napari-hrmedseg: the napari plugin (Qt and napari only, over the hrmedseg API).

Importing this package is cheap: no torch, no Qt. napari loads the dock (``_widget``) and the
sample data (``_sample_data``) through ``napari.yaml`` only when they are used.
"""

__all__ = ["AnnotatorWidget", "Annotator"]


def __getattr__(name: str):
    if name == "AnnotatorWidget":
        from ._widget import AnnotatorWidget

        return AnnotatorWidget
    if name == "Annotator":
        from ._annotator import Annotator

        return Annotator
    raise AttributeError(f"module 'napari_hrmedseg' has no attribute '{name}'")
