"""napari-hrmedseg: the napari plugin (Qt and napari only, over the hrmedseg API)."""
