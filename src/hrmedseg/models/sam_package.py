"""segment-anything's model modules without running its package ``__init__``.

``import segment_anything.modeling`` first runs ``segment_anything/__init__.py``, which imports
``SamPredictor`` and through it torchvision (and with it sympy and triton): about 160 MiB of
resident memory in every process that loads a model, none of it used by this project (each Dask
worker of ``hrmedseg batch`` paid it; docs/benchmarks.md, issue 14). :func:`register_light_package`
registers the package without its ``__init__``; its submodules import as usual, and the package's
own names (``sam_model_registry``, ``SamPredictor``, ...) still work: the first lookup of one
runs the real ``__init__`` (a module ``__getattr__``, PEP 562).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

PACKAGE = "segment_anything"


def register_light_package() -> None:
    """Make ``import segment_anything.<submodule>`` skip the package ``__init__`` until a
    package-level name is used. Does nothing when the package is already imported or missing."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed (or not a package): the real import raises its own error later
    package = importlib.util.module_from_spec(spec)

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):  # dunder probes (copy, pickle, inspect) need not load torchvision
            raise AttributeError(name)
        del package.__dict__["__getattr__"]
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules[PACKAGE] = package
