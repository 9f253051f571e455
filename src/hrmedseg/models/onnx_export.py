"""ONNX export of the encoder and the box-prompt decoder, checked in ONNX Runtime, and a runner.

- :func:`export_encoder`: ``image`` (B, 3, S, S) normalised pixels -> ``embedding``
  (B, 256, S/16, S/16); the batch is dynamic, the size is fixed at export.
- :func:`export_decoder`: ``embedding`` (1, 256, 64, 64), ``boxes`` (N, 4) x0, y0, x1, y1 in the
  1024 x 1024 model input -> ``low_res_masks`` (N, 1, 256, 256) logits, ``iou_predictions``
  (N, 1); N is dynamic. SAM's prompt encoder (box corners) and mask decoder, single-mask output.
- :func:`cached_onnx_encoder`: the engine's "onnxruntime" backend: an encoder exported once per
  set of weights into the user cache, run by :class:`OnnxEncoder`.

Each file is written to a temporary name and renamed once ONNX Runtime has reproduced the
PyTorch output on a random input; the largest absolute difference is printed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import HRMedSegError

OPSET = 17
log = logging.getLogger(__name__)


class BoxDecoderGraph(nn.Module):
    """SAM box prompt -> mask as one traceable graph: (1, 256, h, w) embedding + (N, 4) boxes in
    input pixels -> (N, 1, 4h, 4w) logits, (N, 1) IoU."""

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

    from .layers import LayerNorm2d

    encoder = copy.deepcopy(encoder).eval()
    for name, module in list(encoder.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LayerNorm2d):
                setattr(module, child_name, _ExportLayerNorm2d(child))
    return encoder


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes, report: Callable[[str], None] = print) -> None:
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter warns about traced shape checks and its own deprecation.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module, args, str(tmp), input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False,
        )
        _check(tmp, module, args, input_names, output_names, report)


def _check(path: Path, module: nn.Module, args: tuple, input_names, output_names, report: Callable[[str], None] = print) -> float:
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
        report(f"  {name}: max abs error {err:.2e} (max |value| {scale:.2e})")
        if not err <= 1e-3 * scale:
            raise HRMedSegError(f"ONNX export of {name} differs from PyTorch by {err:.2e}; file not written")
        worst = max(worst, err)
    return worst


def export_encoder(encoder: nn.Module, path: str | os.PathLike, size: int = 1024, report: Callable[[str], None] = print) -> Path:
    """Export an ``HRMedSegEncoder`` (the plain reference graph) to ``path``; ``report`` gets the check's lines."""
    path = Path(path)
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    report(f"{path}: encoder, input (B, 3, {size}, {size})")
    _export(_export_friendly(encoder), (example,), path, ["image"], ["embedding"], {"image": {0: "batch"}, "embedding": {0: "batch"}}, report)
    return path


def export_decoder(prompt_encoder: nn.Module, mask_decoder: nn.Module, path: str | os.PathLike) -> Path:
    """Export SAM's box prompt encoder + mask decoder (single-mask output) to ``path``."""
    path = Path(path)
    module = BoxDecoderGraph(prompt_encoder, mask_decoder).eval()
    h, w = prompt_encoder.image_embedding_size
    embedding = torch.randn(1, 256, h, w, generator=torch.Generator().manual_seed(0))
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


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, shapes, dtypes, values): names an export."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def onnx_cache_dir() -> Path:
    """Folder of the engine's ONNX exports: ``onnx/`` next to the weights cache."""
    from ..weights.registry import cache_dir

    return cache_dir().parent / "onnx"


def cached_onnx_path(encoder: nn.Module, size: int | None = None) -> Path:
    """Where :func:`cached_onnx_encoder` keeps ``encoder``'s export at ``size`` (named by its weights)."""
    return onnx_cache_dir() / f"encoder-{weights_digest(encoder)[:20]}-{size or encoder.img_size}.onnx"


def cached_onnx_encoder(encoder: nn.Module, size: int | None = None, threads: int | None = None) -> "OnnxEncoder":
    """``encoder`` exported once per weights and size into :func:`onnx_cache_dir`, in ONNX Runtime.

    The file is named by :func:`weights_digest`, so other weights never reuse a stale export; a
    cached file ONNX Runtime cannot load is exported again. ``threads``: default torch's.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise HRMedSegError(
            f"backend 'onnxruntime' needs onnx and onnxruntime ({err.name} is missing): pip install 'napari-hrmedseg[onnx]'"
        ) from err
    size = size or encoder.img_size
    path = cached_onnx_path(encoder, size)
    threads = threads or torch.get_num_threads()
    if path.exists():
        try:
            return OnnxEncoder(path, threads)
        except Exception as err:  # a truncated or foreign file: export again below
            warnings.warn(f"{path} could not be loaded ({err}); exporting the encoder again", stacklevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting the encoder for backend 'onnxruntime' to %s (once per weights)", path)
    export_encoder(encoder, path, size, report=log.info)
    return OnnxEncoder(path, threads)


__all__ = ["OPSET", "OnnxEncoder", "cached_onnx_encoder", "cached_onnx_path", "export_decoder", "export_encoder", "onnx_cache_dir", "weights_digest"]
