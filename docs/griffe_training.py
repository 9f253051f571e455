"""Griffe extension for the API reference: show ``training/`` under its import path.

setuptools installs the top-level ``training/`` folder as ``hrmedseg.training``
(``package-dir`` in pyproject.toml). mkdocstrings reads sources statically and would not find
``hrmedseg.training`` inside ``src/hrmedseg/``, so once ``hrmedseg`` is loaded this extension
loads ``training`` (found through the ``.`` entry of the handler's ``paths``) and attaches it
as the member ``hrmedseg.training``.
"""

from __future__ import annotations

from typing import Any

import griffe


class HrmedsegTraining(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "hrmedseg" or "training" in pkg.members:
            return
        training = loader.load("training")
        pkg.set_member("training", training)

    # Older griffe (1.x) calls the same hook by this name.
    def on_package_loaded(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self.on_package(pkg=pkg, loader=loader)
