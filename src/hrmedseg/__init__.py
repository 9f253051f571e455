"""hrmedseg: HRMedSeg models, weights, large-image inference and a CLI (no Qt, no napari)."""

__version__ = "0.1.0"
