"""napari-hrmedseg: the napari plugin (Qt and napari only, over the hrmedseg API).

Importing this package is cheap: no torch, no Qt. napari loads the docks (``annotator_widget``,
``train_widget``) and the sample data (``_sample_data``) through ``napari.yaml`` only when used.
The Qt-free annotator is ``napari_hrmedseg.annotator``; ``annotator_widget_for(viewer)`` is the
annotator dock open in a viewer (how the Train dock hands it trained weights).
"""

__all__ = ["Annotator", "AnnotatorWidget", "TrainWidget", "annotator_widget_for"]

_HOMES = {
    "Annotator": ".annotator",
    "AnnotatorWidget": ".annotator_widget",
    "annotator_widget_for": ".annotator_widget",
    "TrainWidget": ".train_widget",
}


def __getattr__(name: str):
    # lazy: importing a dock imports Qt
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module 'napari_hrmedseg' has no attribute '{name}'")
