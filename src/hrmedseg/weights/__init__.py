"""Weights: checkpoint formats, our compact bundles, and the registry of named downloads."""

from .bundle import BUNDLE_FORMAT, WeightsError, load_bundle, save_bundle

__all__ = ["BUNDLE_FORMAT", "WeightsError", "load_bundle", "save_bundle"]
from .importing import import_checkpoint
from .registry import WeightsEntry, cache_dir, fetch, get_entry, list_weights, resolve

__all__ += ["WeightsEntry", "cache_dir", "fetch", "get_entry", "import_checkpoint", "list_weights", "resolve"]
