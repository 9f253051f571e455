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
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import HRMedSegError, WeightsError

OPSET = 17


class SamBoxDecoder(nn.Module):
    """(1, 256, h, w) embedding + (N, 4) boxes in input pixels -> (N, 1, 4h, 4w) logits, (N, 1) IoU."""

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor):
        pe = self.prompt_encoder
        corners = boxes.reshape(-1, 2, 2) + 0.5  # pixel centres, as PromptEncoder._embed_boxes
        sparse = pe.pe_layer.forward_with_coords(corners, pe.input_image_size)
        sparse = torch.stack(
            [sparse[:, 0] + pe.point_embeddings[2].weight[0], sparse[:, 1] + pe.point_embeddings[3].weight[0]], dim=1
        )
        n = boxes.shape[0]
        h, w = embedding.shape[-2:]
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        return self.mask_decoder(embedding, pe.get_dense_pe(), sparse, dense, False)


class _ExportLayerNorm2d(nn.Module):
    """LayerNorm2d with its channel count fixed, which the TorchScript ONNX exporter needs."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.channels = int(norm.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (self.channels,), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def _export_friendly(encoder: nn.Module) -> nn.Module:
    """A copy of the encoder whose LayerNorm2d layers export (same weights, same function)."""
    import copy

    from ..models.layers import LayerNorm2d

    encoder = copy.deepcopy(encoder).eval()
    for name, module in list(encoder.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LayerNorm2d):
                setattr(module, child_name, _ExportLayerNorm2d(child))
    return encoder


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes) -> None:
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter warns about traced shape checks and its own deprecation.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module, args, str(tmp), input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False,
        )
        _check(tmp, module, args, input_names, output_names)


def _check(path: Path, module: nn.Module, args: tuple, input_names, output_names) -> float:
    """Run the file in onnxruntime and compare with PyTorch; raise if they differ."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise HRMedSegError("onnxruntime is needed to check the export: pip install onnxruntime") from err
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: a.numpy() for name, a in zip(input_names, args)}
    got = session.run(output_names, feeds)
    with torch.no_grad():
        expected = module(*args)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    worst = 0.0
    for name, g, e in zip(output_names, got, expected):
        err = float((torch.from_numpy(g) - e).abs().max())
        scale = float(e.abs().max()) or 1.0
        print(f"  {name}: max abs error {err:.2e} (max |value| {scale:.2e})")
        if not err <= 1e-3 * scale:
            raise HRMedSegError(f"ONNX export of {name} differs from PyTorch by {err:.2e}; file not written")
        worst = max(worst, err)
    return worst


def export_encoder(encoder: nn.Module, path: str | os.PathLike, size: int = 1024) -> Path:
    """Export an ``HRMedSegEncoder`` (the plain reference graph) to ``path``."""
    path = Path(path)
    example = torch.randn(1, 3, size, size)
    print(f"{path}: encoder, input (B, 3, {size}, {size})")
    _export(_export_friendly(encoder), (example,), path, ["image"], ["embedding"], {"image": {0: "batch"}, "embedding": {0: "batch"}})
    return path


def export_decoder(prompt_encoder: nn.Module, mask_decoder: nn.Module, path: str | os.PathLike) -> Path:
    """Export SAM's box prompt encoder + mask decoder (single-mask output) to ``path``."""
    path = Path(path)
    module = SamBoxDecoder(prompt_encoder, mask_decoder).eval()
    h, w = prompt_encoder.image_embedding_size
    embedding = torch.randn(1, 256, h, w)
    boxes = torch.tensor([[100.0, 120.0, 400.0, 380.0], [600.0, 500.0, 900.0, 1000.0], [0.0, 0.0, 64.0, 48.0]])
    print(f"{path}: box decoder, embedding (1, 256, {h}, {w}), boxes (N, 4)")
    _export(
        module, (embedding, boxes), path, ["embedding", "boxes"], ["low_res_masks", "iou_predictions"],
        {"boxes": {0: "boxes"}, "low_res_masks": {0: "boxes"}, "iou_predictions": {0: "boxes"}},
    )
    return path


class OnnxEncoder:
    """An exported encoder in an ONNX Runtime CPU session, called like the PyTorch module."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(["embedding"], {"image": image.detach().cpu().float().numpy()})
        return torch.from_numpy(out)


def _load_parts(path: Path, part: str):
    """(encoder or None, (prompt_encoder, mask_decoder) or None) from a weights file."""
    from ..models.encoder_loading import load_encoder
    from ..models.sam import HRMEDSEG_SAM_ARCHITECTURE, build_sam_prompt_decoder, hrmedseg_sam_from_bundle, read_sam_decoder
    from ..weights.bundle import is_bundle, read_checkpoint

    obj = read_checkpoint(path)
    if is_bundle(obj) and obj["architecture"] == HRMEDSEG_SAM_ARCHITECTURE:
        model = hrmedseg_sam_from_bundle(obj, str(path))
        return model.image_encoder, (model.prompt_encoder, model.mask_decoder)
    encoder = decoder = None
    if part in ("encoder", "both"):
        encoder = load_encoder(path)
    if part in ("decoder", "both"):
        from ..models.sam import _decoder_container
        from ..models.state_dict import load_matching

        prompt_encoder, mask_decoder = build_sam_prompt_decoder()
        load_matching(_decoder_container(prompt_encoder, mask_decoder), read_sam_decoder(path), str(path))
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
