"""ECM-Decoder: HRMedSeg's prompt-free mask decoder (Xu et al. 2025, Eqs. 6-8).

Learned class queries talk to the image embedding ``H`` through a SAM-style two-way transformer
whose image side is enriched by a parameter-free multiscale pooling ``delta``; one dynamic kernel
per query, applied to a 4x upscaled ``H``, gives per-class logits that are resized bilinearly to
the input size. No skip connections, no pyramid: the whole decoder sees one 1/16-scale map.

Building blocks are segment-anything's own (``Attention``, ``MLPBlock``, the hypernetwork
``MLP`` and the random-Fourier ``PositionEmbeddingRandom``), so the decoder is SAM's mask decoder
re-wired, not a re-implementation of it.

Reading of the paper, and sizes (one class, 1024 x 1024 input, 64 x 64 grid):

- A separate self-attention layer (+ LayerNorm) over the queries precedes the two-way transformer,
  whose first block then starts with its own query self-attention, as in SAM. With this extra
  layer HRMedSeg has 3,503,440 parameters (paper 3.53 M, -0.75 %); without it 3,239,760 (-8.2 %).
- Everything else follows SAM's mask decoder with ``mlp_dim = 256``: MLPs (ReLU) on the queries
  only, a final token-to-image attention + LayerNorm, output upscaling 256 -> 64 -> 32 channels
  (ConvTranspose 2x2 stride 2, LayerNorm2d + GELU, ConvTranspose 2x2 stride 2, GELU), a 3-layer
  hypernetwork MLP 256 -> 256 -> 256 -> 32 per query, and no IoU head (nothing to rank).
  Readings that miss 3.53 M: adding SAM's IoU head 3,635,281 (+3.0 %); upscaling to 128 -> 64
  channels 3,602,000 (+2.0 %); a 2-layer hypernetwork 3,437,648 (-2.6 %); 4x4 transposed
  convolutions (which would match the paper's MACs for real) 3,724,624 (+5.5 %).
- MACs: ``torch.utils.flop_counter.FlopCounterMode`` gives 1.755 G for this decoder and 8.207 G
  for the whole model. The paper's 9.39 G (decoder 9.39 - 6.43 = 2.96 G) comes out only when each
  transposed convolution is charged ``output elements x in_channels x k^2`` MACs, as thop 0.1.1
  (``thop.profile``) does: 9.415 G with that rule, and ``thop.profile`` itself gives 9.389 G
  (and 6.426 G for LGViT + neck, the paper's 6.43 G). For a 2x2 stride-2 transposed convolution
  that rule is 4x the real work (each output pixel gets one kernel tap per input channel), so
  the paper over-counts the upscaling by 1.21 G. We keep SAM's upscaling as it is and report
  both counts (``bench/model_sizes.py``, ``docs/benchmarks.md``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from segment_anything.modeling.transformer import Attention
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import LayerNorm2d


class MultiscalePooling(nn.Module):
    """delta: parameter-free multiscale context, PoolFormer style.

    ``delta(H) = H + sum_k (AvgPool_k(H) - H)`` with stride 1, same padding and padding excluded
    from the averages, so borders are not darkened. An empty ``pool_sizes`` makes it the identity.

    (B, C, h, w) -> (B, C, h, w), for any h and w.
    """

    def __init__(self, pool_sizes: Sequence[int] = (5, 9, 13)) -> None:
        super().__init__()
        pool_sizes = tuple(int(k) for k in pool_sizes)
        if any(k < 1 or k % 2 == 0 for k in pool_sizes):
            # An even kernel with stride 1 and padding k // 2 would grow the map by one pixel.
            raise ValueError(f"pool sizes must be odd positive integers, got {pool_sizes}")
        self.pool_sizes = pool_sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for k in self.pool_sizes:
            out = out + (box_mean(x, k) - x)
        return out

    def extra_repr(self) -> str:
        return f"pool_sizes={self.pool_sizes}"


def box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h, w): mean over the k x k window around each pixel (stride 1, the
    window clipped at the borders), as ``avg_pool2d(x, k, 1, k // 2, count_include_pad=False)``.

    Computed as a k x 1 then a 1 x k average: the clipped window's sum and count are products of
    a row and a column part, so the result is the same (up to float rounding), at 2k instead of
    k^2 additions per pixel. On channels-last maps (``apply_on_grid``'s) PyTorch's CPU pooling is
    vectorised over channels: both together make the ECM-Decoder's pooling about 13x faster on
    a 64 x 64 x 256 map (it was most of the prompt-free model's CPU time).
    """
    rows = F.avg_pool2d(x, (k, 1), stride=1, padding=(k // 2, 0), count_include_pad=False)
    return F.avg_pool2d(rows, (1, k), stride=1, padding=(0, k // 2), count_include_pad=False)


class ECMTwoWayBlock(nn.Module):
    """One two-way block of the ECM-Decoder (SAM's ``TwoWayAttentionBlock`` plus ``delta``).

    1. query self-attention (residual, LayerNorm); the first block skips the query PE and the
       residual, as SAM's does;
    2. queries attend to the image: keys ``H + psi``, values ``delta(H)`` (Eq. 6);
    3. query MLP (residual, LayerNorm);
    4. the image attends to the queries: ``delta(H) + psi`` asks, the residual is ``delta(H)``
       (Eq. 7), then LayerNorm.

    Args are as in SAM's block. Tensors: queries (B, Q, C), image tokens (B, N, C) on an (h, w)
    grid, query PE (B, Q, C), image PE ``psi`` (B, N, C).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int,
        delta: MultiscalePooling,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.delta = delta
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        image: torch.Tensor,
        query_pe: torch.Tensor,
        image_pe: torch.Tensor,
        grid: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns updated queries (B, Q, C) and image tokens (B, N, C)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        # H does not change between Eq. 6 and Eq. 7 of one block, so delta(H) is computed once.
        image_ms = apply_on_grid(self.delta, image, grid)

        q = queries + query_pe
        queries = queries + self.cross_attn_token_to_image(q=q, k=image + image_pe, v=image_ms)
        queries = self.norm2(queries)

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        image = image_ms + self.cross_attn_image_to_token(q=image_ms + image_pe, k=q, v=queries)
        image = self.norm4(image)
        return queries, image


def apply_on_grid(module: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Run a (B, C, h, w) module on (B, N, C) tokens laid out row-major on ``grid``.

    The map is a channels-last view of the tokens (no copy; strides PyTorch recognises as
    channels-last even for B = 1, which ``transpose(1, 2).reshape`` does not give), and a
    channels-last result flattens back to tokens as a view.
    """
    b, n, c = tokens.shape
    h, w = grid
    maps = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
    return module(maps).flatten(2).transpose(1, 2)


class ECMDecoder(nn.Module):
    """HRMedSeg's prompt-free decoder: an image embedding -> per-class mask logits.

    Args:
        num_classes: C2, the number of learned class queries (one output channel each).
        transformer_dim: width of the image embedding and of the queries (256).
        depth: two-way blocks (2).
        num_heads: attention heads (8).
        mlp_dim: hidden width of the query MLPs (256).
        attention_downsample_rate: internal width divisor of the cross-attentions (2).
        pool_sizes: average-pooling kernels of delta; ``()`` turns delta off.

    Input (B, 256, h, w) for any grid h x w; output (B, C2, out_h, out_w) logits, by default
    (B, C2, 16 h, 16 w), i.e. the size of the image that gave the embedding.
    """

    def __init__(
        self,
        num_classes: int = 1,
        transformer_dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 256,
        attention_downsample_rate: int = 2,
        pool_sizes: Sequence[int] = (5, 9, 13),
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.transformer_dim = transformer_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.attention_downsample_rate = attention_downsample_rate
        self.grad_checkpointing = False

        self.class_queries = nn.Embedding(num_classes, transformer_dim)
        self.pe_layer = PositionEmbeddingRandom(transformer_dim // 2)
        self.delta = MultiscalePooling(pool_sizes)

        self.query_self_attn = Attention(transformer_dim, num_heads)
        self.query_norm = nn.LayerNorm(transformer_dim)
        self.layers = nn.ModuleList(
            ECMTwoWayBlock(
                transformer_dim, num_heads, mlp_dim, attention_downsample_rate, self.delta, skip_first_layer_pe=(i == 0)
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(transformer_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(transformer_dim)

        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(num_classes)
        )

    @property
    def pool_sizes(self) -> tuple[int, ...]:
        return self.delta.pool_sizes

    def config_dict(self) -> dict:
        """Constructor arguments, for checkpoint metadata."""
        return {
            "num_classes": self.num_classes,
            "transformer_dim": self.transformer_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "attention_downsample_rate": self.attention_downsample_rate,
            "pool_sizes": list(self.pool_sizes),
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the two-way blocks and the upscaling in the backward pass."""
        self.grad_checkpointing = enable

    def dense_pe(self, grid: tuple[int, int], batch: int, dtype: torch.dtype) -> torch.Tensor:
        """psi for an (h, w) grid as (B, h*w, C) tokens.

        Computed in float32 outside autocast: sin/cos of 2 pi x (coords @ Gaussian) loses its
        phase in bfloat16. Coordinates are normalised per axis, so any h x w grid works.
        """
        device_type = self.pe_layer.positional_encoding_gaussian_matrix.device.type
        # Only real devices have an autocast state to switch off (not e.g. "meta").
        guard = torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else nullcontext()
        with guard:
            pe = self.pe_layer(grid)  # (C, h, w)
        return pe.flatten(1).transpose(0, 1).to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def _run(self, fn, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, image_embedding: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, C, h, w) embedding -> (B, C2, out_h, out_w) logits (default out = 16 h x 16 w)."""
        b, c, h, w = image_embedding.shape
        if c != self.transformer_dim:
            raise ValueError(f"ECMDecoder expects a {self.transformer_dim}-channel embedding, got {c} channels")
        if output_size is None:
            output_size = (16 * h, 16 * w)
        grid = (h, w)

        image = image_embedding.flatten(2).transpose(1, 2)  # (B, N, C)
        image_pe = self.dense_pe(grid, b, image.dtype)  # (B, N, C)
        # repeat, not expand: a view of a parameter made under no_grad has requires_grad but no
        # grad_fn, which trips module hooks (e.g. FlopCounterMode's module tracker).
        query_pe = self.class_queries.weight.unsqueeze(0).repeat(b, 1, 1)  # (B, Q, C)

        queries = self.query_norm(query_pe + self.query_self_attn(q=query_pe, k=query_pe, v=query_pe))
        for layer in self.layers:
            queries, image = self._run(layer, queries, image, query_pe, image_pe, grid)

        q = queries + query_pe
        image_ms = apply_on_grid(self.delta, image, grid)
        queries = self.norm_final_attn(
            queries + self.final_attn_token_to_image(q=q, k=image + image_pe, v=image_ms)
        )

        image_map = image.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self._run(self.output_upscaling, image_map)  # (B, C/8, 4h, 4w)
        kernels = torch.stack(
            [mlp(queries[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, Q, C/8)
        low_res = (kernels @ upscaled.flatten(2)).view(b, self.num_classes, 4 * h, 4 * w)
        return F.interpolate(low_res, size=tuple(output_size), mode="bilinear", align_corners=False)


__all__ = ["ECMDecoder", "ECMTwoWayBlock", "MultiscalePooling"]
