"""Where downloaded and imported weights are kept on this computer."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "HRMEDSEG_CACHE_DIR"


def user_cache_root() -> Path:
    """``$HRMEDSEG_CACHE_DIR`` if set, else ``platformdirs.user_cache_dir("hrmedseg")`` (e.g. ``~/.cache/hrmedseg``)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("hrmedseg", appauthor=False))


def cache_dir() -> Path:
    """Folder where downloaded and imported weights are kept (created on demand, not here).

    ``$HRMEDSEG_CACHE_DIR/weights`` if that variable is set, else
    ``platformdirs.user_cache_dir("hrmedseg")/weights`` (e.g. ``~/.cache/hrmedseg/weights``).
    """
    return user_cache_root() / "weights"
