"""Turn a checkpoint the user downloaded into a compact hrmedseg bundle.

Recognised inputs (by their keys, not their file names):

- SAM (segment-anything) checkpoint: a plain state dict with ``image_encoder.*``,
  ``prompt_encoder.*`` and ``mask_decoder.*``. Only the prompt encoder and mask decoder are
  kept (about 16 MB of the 0.4 to 2.5 GB file): architecture ``sam_prompt_decoder``.
- SAM2 / SAM2.1 checkpoint: ``{"model": {...}}`` with ``sam_prompt_encoder.*``,
  ``sam_mask_decoder.*`` and ``image_encoder.trunk.*``: the decoder part, extracted by
  :func:`hrmedseg.models.sam2.extract_sam2_decoder_state`: architecture ``sam2_prompt_decoder``.
- The HRMedSeg authors' LGViT + neck checkpoint (``SAM_PFD_10K.pth``): architecture ``lgvit_neck``.
- An hrmedseg bundle: validated and copied.

The file is read once, by :func:`hrmedseg.weights.checkpoint.read_checkpoint`. SAM2 and LGViT
sources are checked against the models they feed (``hrmedseg.models``, imported only when such a
file is imported), so a bundle that would not load is never written.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..errors import WeightsError
from ..weights.bundle import save_bundle
from ..weights.cache import cache_dir
from ..weights.checkpoint import (
    LGVIT_NECK,
    SAM,
    SAM2,
    SAM_PATCH_EMBED_KEY,
    SAM_VARIANT_BY_WIDTH,
    UNKNOWN,
    Checkpoint,
    extract_sam_decoder_state,
    read_checkpoint,
)

log = logging.getLogger(__name__)

SAM_PROMPT_DECODER = "sam_prompt_decoder"
SAM2_PROMPT_DECODER = "sam2_prompt_decoder"
SAM_LICENCE = "Apache-2.0"

EXPECTED_KEYS_TEXT = (
    "a SAM checkpoint (keys image_encoder.*, prompt_encoder.*, mask_decoder.*), a SAM2/SAM2.1 checkpoint "
    "({'model': {...}} with sam_prompt_encoder.*, sam_mask_decoder.*, image_encoder.trunk.*), the HRMedSeg "
    "authors' LGViT checkpoint (image_encoder.layers.*, neck.*) or an hrmedseg bundle"
)


def _source_provenance(src: Path, digest: str, holds: str, licence: str) -> dict:
    return {
        "source": src.name,
        "source_sha256": digest,
        "source_size": src.stat().st_size,
        "licence": licence,
        "holds": holds,
        "imported_by": "hrmedseg weights import",
    }


def sam_decoder_bundle_parts(checkpoint: Checkpoint) -> tuple[dict, dict]:
    """(tensors, config) of the "sam_prompt_decoder" bundle made from a SAM checkpoint.

    config is ``{"variant": "vit_h" | "vit_l" | "vit_b"}`` (None, with the encoder width
    recorded, for non-standard widths).
    """
    source, state = checkpoint.source, checkpoint.state
    if SAM_PATCH_EMBED_KEY not in state:
        raise WeightsError(f"{source} looks like SAM but has no '{SAM_PATCH_EMBED_KEY}' to tell ViT-H/L/B apart")
    width = int(state[SAM_PATCH_EMBED_KEY].shape[0])
    variant = SAM_VARIANT_BY_WIDTH.get(width)
    config: dict[str, Any] = {"variant": variant}
    if variant is None:
        log.warning("%s: SAM image encoder width %d is not ViT-H/L/B; variant left unset", source, width)
        config["encoder_embed_dim"] = width
    return extract_sam_decoder_state(state, source), config


def default_name(kind: str, src: Path, config: dict | None = None) -> str:
    """Registry-style name of the bundle imported from a foreign ``src`` of ``kind`` (matches the 'derived' entries)."""
    if kind == SAM and config and config.get("variant"):
        return f"sam_{config['variant']}_prompt_decoder"
    if kind in (SAM, SAM2):
        return f"{src.stem}_prompt_decoder"
    if kind == LGVIT_NECK:
        return f"{src.stem}_lgvit_neck"
    return src.stem


def import_checkpoint(
    src_path: str | os.PathLike, dest_path: str | os.PathLike | None = None, name: str | None = None
) -> Path:
    """Detect what ``src_path`` holds and write it as an hrmedseg bundle (atomic).

    Args:
        src_path: a SAM, SAM2/SAM2.1, HRMedSeg-authors' or hrmedseg-bundle file.
        dest_path: where to write; default ``cache_dir() / f"{name}.pt"``.
        name: bundle name (default derived from the source, e.g. ``sam_vit_h_prompt_decoder``).

    Returns:
        The path written.

    Raises:
        WeightsError: the file is unreadable, or holds none of the recognised layouts (the
            message names the file and the keys expected).
    """
    from ..hashing import sha256_file

    src = Path(src_path).expanduser()
    checkpoint = read_checkpoint(src)
    kind = checkpoint.kind
    if kind == UNKNOWN:
        raise WeightsError(
            f"{src} is not a checkpoint hrmedseg can import (found {checkpoint.contents}); expected {EXPECTED_KEYS_TEXT}"
        )

    def destination(config: dict | None = None) -> Path:
        if dest_path is not None:
            return Path(dest_path).expanduser()
        return cache_dir() / f"{name or (src.stem if checkpoint.is_bundle else default_name(kind, src, config))}.pt"

    if checkpoint.is_bundle:
        dest = destination()
        del checkpoint  # copied as a file, byte for byte
        if dest.resolve() != src.resolve():
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
        log.info("copied %s bundle %s to %s", kind, src, dest)
        return dest

    digest = sha256_file(src)
    if kind == SAM:
        kept, config = sam_decoder_bundle_parts(checkpoint)
        dest = destination(config)
        holds = f"SAM {config.get('variant') or 'custom'} prompt encoder + mask decoder (image encoder dropped)"
        save_bundle(
            dest, SAM_PROMPT_DECODER, kept, config=config,
            provenance=_source_provenance(src, digest, holds, SAM_LICENCE),
        )
    elif kind == SAM2:
        # Checked against sam2's own configs.
        from .sam2 import extract_sam2_decoder_state

        kept, config = extract_sam2_decoder_state(checkpoint.state, str(src))
        dest = destination(config)
        holds = f"SAM2 {config.get('sam2_config', '')} prompt encoder + mask decoder (image encoder and memory dropped)".replace("  ", " ")
        save_bundle(
            dest, SAM2_PROMPT_DECODER, kept, config=config,
            provenance=_source_provenance(src, digest, holds, SAM_LICENCE),
        )
    else:  # the authors' LGViT + neck: rebuilt once, so the bundle records its config and normalisation
        from .encoder_loading import encoder_from_checkpoint, save_encoder

        encoder = encoder_from_checkpoint(checkpoint)
        del checkpoint  # do not hold two copies of the tensors
        dest = destination()
        save_encoder(
            encoder, dest,
            provenance=_source_provenance(
                src, digest,
                "HRMedSeg LGViT + neck image encoder (the authors' pretraining release)",
                "not stated by the authors",
            ),
        )
    log.info("imported %s (%s) as %s", src, kind, dest)
    return dest


def resolve_weights(
    name: str, weights_dir: str | os.PathLike | None = None, download: bool = False, registry: Any = None
) -> Path:
    """A verified local file for the registry name ``name``, making a derived entry when it is missing.

    Derived entries (``derived_from`` in ``registry.json``, e.g. ``sam_vit_h_prompt_decoder``)
    are compact bundles made on this computer from another entry by :func:`import_checkpoint`;
    this is where that happens, so the registry (``hrmedseg.weights``) only finds and checks
    files and never builds a model. ``registry`` defaults to the package's.

    Raises:
        WeightsError: as :meth:`Registry.resolve`, or naming the entry a derived one is made from
            when that is not available.
    """
    from ..weights.registry import default_registry

    registry = registry or default_registry()
    entry = registry.get(name)
    if entry.derived_from and registry.locate(name, weights_dir) is None:
        return _derive(registry, entry, weights_dir, download)
    return registry.resolve(name, weights_dir, download)


def _derive(registry: Any, entry: Any, weights_dir: str | os.PathLike | None, download: bool) -> Path:
    parent = registry.get(entry.derived_from)
    try:
        source = registry.resolve(parent.name, weights_dir, download=download)
    except WeightsError as err:
        raise WeightsError(
            f"{entry.name} ({entry.file}) is made from {parent.name}, which is not available. Run "
            f"`hrmedseg weights fetch {entry.name}` (downloads {parent.file} and keeps what hrmedseg "
            f"needs), or `hrmedseg weights import {parent.file}` on a copy you have. {err}"
        ) from err
    folder = Path(weights_dir).expanduser() if weights_dir is not None else cache_dir()
    dest = folder / entry.file
    log.warning("making %s from %s (one-off; keeps only what hrmedseg needs)", dest, source)
    import_checkpoint(source, dest_path=dest, name=entry.name)
    return registry.resolve(entry.name, weights_dir)
