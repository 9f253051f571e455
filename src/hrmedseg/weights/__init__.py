"""Weights: checkpoint formats, our compact bundles, and the registry of named downloads."""

from .bundle import BUNDLE_FORMAT, WeightsError, load_bundle, save_bundle

__all__ = ["BUNDLE_FORMAT", "WeightsError", "load_bundle", "save_bundle"]
from .registry import WeightsEntry, cache_dir, fetch, get_entry, list_weights, resolve

__all__ += ["WeightsEntry", "cache_dir", "fetch", "get_entry", "list_weights", "resolve"]
