"""Weights: checkpoint formats, our compact bundles, and the registry of named downloads."""

from .bundle import BUNDLE_FORMAT, WeightsError, load_bundle, save_bundle

__all__ = ["BUNDLE_FORMAT", "WeightsError", "load_bundle", "save_bundle"]
