"""``hrmedseg export-onnx``: the encoder and the box-prompt decoder as ONNX files, checked against PyTorch.

Files written to ``--out``:

- ``encoder.onnx``: ``image`` (B, 3, S, S) normalised pixels -> ``embedding`` (B, 256, S/16, S/16);
  the batch is dynamic, the size is fixed at export (``--size``, default the model's 1024).
- ``decoder.onnx``: ``embedding`` (1, 256, 64, 64), ``boxes`` (N, 4) x0, y0, x1, y1 in the
  1024 x 1024 model input -> ``low_res_masks`` (N, 1, 256, 256) logits, ``iou_predictions`` (N, 1);
  N is dynamic. SAM's prompt encoder (box corners) and mask decoder, single-mask output.

Each file is written to a temporary name and renamed once onnxruntime has reproduced the
PyTorch output on a random input; the largest absolute difference is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import WeightsError
from ..models.onnx_export import export_decoder, export_encoder


def _load_parts(path: Path, part: str):
    """(encoder or None, (prompt_encoder, mask_decoder) or None) from a weights file."""
    from ..models.encoder_loading import encoder_from_checkpoint
    from ..models.sam import (
        HRMEDSEG_SAM_ARCHITECTURE, build_sam_prompt_decoder, hrmedseg_sam_from_checkpoint, sam_decoder_from_checkpoint,
    )
    from ..weights.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    if checkpoint.kind == HRMEDSEG_SAM_ARCHITECTURE:
        model = hrmedseg_sam_from_checkpoint(checkpoint).module
        return model.image_encoder, (model.prompt_encoder, model.mask_decoder)
    encoder = decoder = None
    if part in ("encoder", "both"):
        encoder = encoder_from_checkpoint(checkpoint)
    if part in ("decoder", "both"):
        from ..models.sam import _decoder_container
        from ..models.state_dict import load_matching

        prompt_encoder, mask_decoder = build_sam_prompt_decoder()
        load_matching(_decoder_container(prompt_encoder, mask_decoder), sam_decoder_from_checkpoint(checkpoint), str(path))
        decoder = (prompt_encoder.eval(), mask_decoder.eval())
    return encoder, decoder


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx", help="write the encoder and/or box decoder as ONNX files, checked against PyTorch",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--model", required=True, type=Path,
                   help="weights: an hrmedseg_sam bundle (both parts), an encoder file, or a SAM checkpoint (decoder)")
    p.add_argument("--out", required=True, type=Path, help="folder for encoder.onnx / decoder.onnx")
    p.add_argument("--part", choices=("encoder", "decoder", "both"), default="both")
    p.add_argument("--size", type=int, default=None, help="encoder input size (default: the model's, 1024)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    encoder, decoder = _load_parts(args.model, args.part)
    if args.part in ("encoder", "both"):
        if encoder is None:
            raise WeightsError(f"{args.model} holds no LGViT + neck encoder")
        export_encoder(encoder, args.out / "encoder.onnx", size=args.size or encoder.img_size)
    if args.part in ("decoder", "both"):
        if decoder is None:
            raise WeightsError(f"{args.model} holds no SAM prompt encoder / mask decoder")
        export_decoder(*decoder, args.out / "decoder.onnx")
    return 0
