"""The run manifest: what a batch run was asked to do and how far it got, per image.

``<out>/manifest.json`` (rewritten atomically after every image)::

    {"format": "hrmedseg-batch", "version": 1, "hrmedseg": "0.1.0", "mode": "boxes",
     "model": {"spec": ..., "sha256": ...[, "proposer": ..., "proposer_sha256": ...]}, "output_format": "ome-zarr", "created", "modified",
     "images": {key: {"image", "boxes", "status": "pending" | "done" | "failed",
                      "error", "seconds", "write_seconds", "objects", "worker", "peak_rss_mib", ...}}}

An image is complete when its status is "done" and its output folder exists (folders appear
whole, :func:`hrmedseg.atomic.atomic_dir`); a re-run skips exactly those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import atomic_path
from ..errors import InputError
from ..store import now_iso
from .inputs import ImageJob

MANIFEST = "manifest.json"
FORMAT = "hrmedseg-batch"


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, out: Path, mode: str, model: dict[str, Any], output_format: str) -> "Manifest":
        """The manifest of ``out``, new or from an earlier run of the same mode, model and format."""
        path = Path(out) / MANIFEST
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except ValueError as err:
                raise InputError(f"{path} is not a batch manifest (invalid JSON: {err}); use another --out") from err
            if data.get("format") != FORMAT:
                raise InputError(f"{path} is not a batch manifest (format {data.get('format')!r}); use another --out")
            old_model = data.get("model", {})
            was = (data.get("mode"), old_model.get("sha256"), data.get("output_format"), old_model.get("proposer_sha256"))
            now = (mode, model.get("sha256"), output_format, model.get("proposer_sha256"))
            if was != now:
                raise InputError(
                    f"{out} holds a run with mode {was[0]}, model sha256 {str(was[1])[:12]}, format {was[2]}"
                    f"{_proposer_note(was[3])}; this run is {now[0]}, {str(now[1])[:12]}, {now[2]}{_proposer_note(now[3])}: "
                    "use another --out (or delete it) so results are not mixed"
                )
            return cls(path, data)
        return cls(path, {"format": FORMAT, "version": 1, "hrmedseg": __version__, "mode": mode, "model": model,
                          "output_format": output_format, "created": now_iso(), "images": {}})

    @property
    def images(self) -> dict[str, dict[str, Any]]:
        return self.data["images"]

    def is_complete(self, job: ImageJob) -> bool:
        entry = self.images.get(job.key)
        return bool(entry and entry.get("status") == "done" and entry.get("image") == job.image
                    and (self.path.parent / job.key).is_dir())

    def add(self, job: ImageJob) -> None:
        if not self.is_complete(job):
            self.images[job.key] = {"image": job.image, "boxes": job.boxes, "status": "pending"}

    def record(self, image_key: str, /, **fields: Any) -> None:
        self.images[image_key].update(fields)

    def save(self) -> None:
        self.data["modified"] = now_iso()
        text = json.dumps(self.data, indent=1)
        with atomic_path(self.path) as tmp:
            tmp.write_text(text)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for entry in self.images.values():
            out[entry["status"]] = out.get(entry["status"], 0) + 1
        return out


def _proposer_note(sha256: str | None) -> str:
    return f", proposer sha256 {sha256[:12]}" if sha256 else ""
