"""SAM's mask decoder for many box prompts on one image embedding, computed with less work.

``FastMaskDecoder`` computes what segment-anything's ``MaskDecoder`` computes (same weights,
equal to rounding) but is organised for the way box prompting is used: one image embedding
(a "crop"), then many prompts.

- ``prepare`` runs once per crop: without a mask input the dense prompt is one learned vector,
  so the image side of the first block (keys/values of the first token-to-image attention and
  queries of the first image-to-token attention, 3 x 134 M MACs) is the same for every box. It
  is projected once the crop serves more than one box (a call with several, or a second call);
  a crop's first single box takes block 0 re-associated like block 1 (3 x 59 M MACs), so the
  first box on a crop does not pay for projections only later boxes use.
- Attention between the 7 prompt tokens and the 4096 image tokens is re-associated so that
  nothing of width 4096 x 128 is ever projected: the token side is folded into the projection
  matrices (``q (W x + b) = (W^T q) x + q b``; value projections applied after the weighted sum,
  because softmax rows sum to one), which cuts the per-box cost of the two-way transformer from
  about 1.3 G to 0.35 G MACs. All boxes of a batch share one product where the crop is shared.
- The output upscaling (two 2 x 2 stride-2 transposed convolutions, LayerNorm2d, GELU) and the
  mask product act on each embedding position alone, so with ``regions`` they are computed only
  under each box's region of the 256 x 256 low-resolution grid (the region's logits are the
  same as in the full-grid result).

``FastMaskDecoder.from_sam(mask_decoder, prompt_encoder)`` copies nothing: it keeps references to
the decoder's modules and snapshots the upscaling weights and block 0's key and query projections
(fused into one product); build it again after loading new weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .prompting import prompt_tensors, sam_prompt


@dataclass
class PreparedCrop:
    """Per-crop tensors of the first transformer block (image side), from ``FastMaskDecoder.prepare``.

    Shapes with n = h * w image tokens: ``image`` (the embedding), ``src`` (embedding + dense
    prompt), ``pe``, ``src_pe`` (``src + pe``): (1, n, 256); ``dense``: the dense prompt, (1, 256, 1, 1)
    or (1, 256, h, w); ``grid``: (h, w); ``calls``: prompt batches served so far. Projected when
    the crop serves a second box (None before): ``k0``, ``v0``: (1, heads, n, d) keys/values of
    the first token-to-image attention; ``q0``: (1, heads, d, n) queries of the first
    image-to-token attention, stored transposed (each box's product then reads them in place).
    """

    image: torch.Tensor
    dense: torch.Tensor
    src: torch.Tensor
    pe: torch.Tensor
    src_pe: torch.Tensor
    grid: tuple[int, int]
    k0: torch.Tensor | None = None
    v0: torch.Tensor | None = None
    q0: torch.Tensor | None = None
    calls: int = 0


@dataclass
class DecoderOutput:
    """Result of ``FastMaskDecoder.predict``.

    masks: (B, M, 4h, 4w) low-resolution logits on the full grid (``regions`` None), or a list of
        B tensors (M, y1 - y0, x1 - x0): logits inside each box's region only.
    iou_predictions: (B, M) predicted mask quality.
    regions: (B, 4) long tensor (x0, y0, x1, y1) on the low-resolution grid, end exclusive.
    """

    masks: torch.Tensor | list[torch.Tensor]
    iou_predictions: torch.Tensor
    regions: torch.Tensor


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., T, C) -> (..., heads, T, C / heads)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, T, d) -> (..., T, heads * d)."""
    return x.transpose(-3, -2).flatten(-2)


def softmax_over_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim -2 of (..., T, n) logits, written as whole-row operations.

    Returns a contiguous tensor of the broadcast shape, in ``logits``' dimension order.
    """
    shifted = logits - logits.amax(dim=-2, keepdim=True)
    weights = shifted.exp_()
    return weights.div_(weights.sum(dim=-2, keepdim=True))


def regions_from_boxes(
    boxes: torch.Tensor, input_size: int | tuple[int, int] = 1024, low_res_size: int | tuple[int, int] = 256,
    margin: int = 4,
) -> torch.Tensor:
    """Low-resolution regions that cover boxes plus a margin.

    Args:
        boxes: (B, 4) x0, y0, x1, y1 in the decoder's input coordinates (SAM: 1024 x 1024).
        input_size: (H, W) of that input.
        low_res_size: (H, W) of the low-resolution mask grid (SAM: 256 x 256).
        margin: low-resolution pixels added on every side (a mask may leave its box a little).

    Returns:
        (B, 4) long (x0, y0, x1, y1), end exclusive, clipped to the grid.
    """
    in_h, in_w = (input_size, input_size) if isinstance(input_size, int) else input_size
    lr_h, lr_w = (low_res_size, low_res_size) if isinstance(low_res_size, int) else low_res_size
    scale = boxes.new_tensor([lr_w / in_w, lr_h / in_h, lr_w / in_w, lr_h / in_h], dtype=torch.float64)
    scaled = boxes.to(torch.float64) * scale
    lo = torch.floor(scaled[:, :2]).long() - margin
    hi = torch.ceil(scaled[:, 2:]).long() + margin
    lo = torch.maximum(lo, torch.zeros_like(lo))
    hi = torch.minimum(hi, torch.tensor([lr_w, lr_h]))
    hi = torch.maximum(hi, lo + 1)
    return torch.cat([lo, hi], dim=1)


def paste_regions(masks: list[torch.Tensor], regions: torch.Tensor, size: tuple[int, int], fill: float = -1e4):
    """Region logits (from ``predict`` with regions) -> (B, M, H, W) full-grid logits, ``fill`` elsewhere."""
    out = masks[0].new_full((len(masks), masks[0].shape[0], *size), fill)
    for i, (mask, (x0, y0, x1, y1)) in enumerate(zip(masks, regions.tolist())):
        out[i, :, y0:y1, x0:x1] = mask
    return out


class FastMaskDecoder(nn.Module):
    """Prompt-batched, region-limited evaluation of a segment-anything ``MaskDecoder``.

    Usage::

        fast = FastMaskDecoder.from_sam(sam.mask_decoder, sam.prompt_encoder)
        fast.prepare(image_embedding, sam.prompt_encoder.get_dense_pe())   # once per crop
        sparse, _ = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        out = fast.predict(sparse, regions=regions_from_boxes(boxes), multimask_output=False)
    """

    @staticmethod
    def supports(mask_decoder: nn.Module) -> bool:
        """True for SAM's mask decoder with its 2-block two-way transformer (what this class computes)."""
        return len(getattr(getattr(mask_decoder, "transformer", None), "layers", ())) == 2

    def __init__(self, mask_decoder: nn.Module, no_mask_embed: torch.Tensor | None = None) -> None:
        super().__init__()
        transformer = mask_decoder.transformer
        if not self.supports(mask_decoder):
            raise ValueError(f"FastMaskDecoder supports SAM's 2-block two-way transformer, not {len(transformer.layers)} blocks")
        self.decoder = mask_decoder
        self.transformer = transformer
        self.num_mask_tokens = mask_decoder.num_mask_tokens
        self.dim = mask_decoder.transformer_dim
        if no_mask_embed is not None:
            self.register_buffer("no_mask_embed", no_mask_embed.detach().reshape(-1).clone())
        else:
            self.no_mask_embed = None
        up1, norm, _, up2, _ = mask_decoder.output_upscaling
        # ConvTranspose2d(k=2, s=2) weight (in, out, 2, 2) -> (in, 2 * 2 * out): one product per
        # position gives its four output pixels, channel last (for LayerNorm over channels).
        self.register_buffer("up1_w", up1.weight.detach().permute(0, 2, 3, 1).flatten(1).clone())
        self.register_buffer("up1_b", up1.bias.detach().repeat(4).clone())
        self.register_buffer("norm_w", norm.weight.detach().clone())
        self.register_buffer("norm_b", norm.bias.detach().clone())
        self.norm_eps = norm.eps
        self.register_buffer("up2_w", up2.weight.detach().permute(0, 2, 3, 1).flatten(1).clone())
        self.register_buffer("up2_b", up2.bias.detach().repeat(4).clone())
        # Block 0's token->image keys and image->token queries both project src + pe: one
        # (C -> 2 * internal) product for the two (rows: keys, then queries).
        t2i, i2t = transformer.layers[0].cross_attn_token_to_image, transformer.layers[0].cross_attn_image_to_token
        self.register_buffer("block0_kq_w", torch.cat([t2i.k_proj.weight, i2t.q_proj.weight]).detach().clone())
        self.register_buffer("block0_kq_b", torch.cat([t2i.k_proj.bias, i2t.q_proj.bias]).detach().clone())
        self.crop: PreparedCrop | None = None

    @classmethod
    def from_sam(cls, mask_decoder: nn.Module, prompt_encoder: nn.Module | None = None,
                 dtype: torch.dtype = torch.float32) -> "FastMaskDecoder":
        """Wrap a segment-anything ``MaskDecoder``; the ``PromptEncoder`` supplies the no-mask embedding.

        float32 wraps ``mask_decoder`` itself; another ``dtype`` wraps a cast copy (``mask_decoder``
        stays as it is) whose heads stay float32 (:meth:`float32_heads`).
        """
        if dtype != torch.float32:
            return cls.from_sam(copy.deepcopy(mask_decoder), prompt_encoder).to(dtype).float32_heads()
        no_mask = prompt_encoder.no_mask_embed.weight if prompt_encoder is not None else None
        param = next(mask_decoder.parameters())
        return cls(mask_decoder, no_mask).to(param.device).eval()

    def float32_heads(self) -> "FastMaskDecoder":
        """Keep what turns the final tokens into logits in float32 (the output upscaling, the
        hypernetwork MLPs and the IoU head) after a cast of the rest to another dtype: they cost
        little on region-limited masks, and the logits keep float32's resolution for the native
        threshold and the click fix (on the shipped model's agreement sample it raised the bf16
        decoder's mask Dice to float32's from 0.9967 to 0.9970; the transformer is the rest)."""
        for name in ("up1_w", "up1_b", "norm_w", "norm_b", "up2_w", "up2_b"):
            setattr(self, name, getattr(self, name).float())
        self.decoder.output_hypernetworks_mlps.float()
        self.decoder.iou_prediction_head.float()
        return self

    # ----------------------------------------------------------------------------------- crop
    def _image_side_block0(self, src: torch.Tensor, src_pe: torch.Tensor):
        """Keys/values of block 0's token->image and queries of its image->token attention.

        src, src_pe (``src + pe``): (1 or B, n, C) -> k0, v0: (1 or B, heads, n, d) (views into one
        product); q0: (1 or B, heads, d, n), contiguous: the per-box products with the tokens' keys
        read it in place (a transposed view of the product made batched matmuls copy it every box).
        """
        layer = self.transformer.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        k0, q0 = F.linear(src_pe, self.block0_kq_w, self.block0_kq_b).split([t2i.internal_dim, i2t.internal_dim], dim=-1)
        v0 = t2i.v_proj(src)
        q0_t = split_heads(q0, i2t.num_heads).transpose(-1, -2).contiguous()
        return split_heads(k0, t2i.num_heads), split_heads(v0, t2i.num_heads), q0_t

    @torch.no_grad()
    def prepare(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, dense_embedding: torch.Tensor | None = None
    ) -> PreparedCrop:
        """Compute and keep the per-crop tensors.

        Args:
            image_embedding: (1, 256, h, w) image embedding of one crop.
            image_pe: (1, 256, h, w) dense positional encoding (``prompt_encoder.get_dense_pe()``).
            dense_embedding: the dense prompt shared by all boxes, (1, 256, h, w) or (256,);
                default: the prompt encoder's no-mask embedding.
        """
        if image_embedding.shape[0] != 1:
            raise ValueError(f"prepare takes one crop's embedding (1, C, h, w), got {tuple(image_embedding.shape)}")
        if dense_embedding is None:
            if self.no_mask_embed is None:
                raise ValueError("no dense embedding given and no prompt encoder's no-mask embedding known")
            dense_embedding = self.no_mask_embed
        if dense_embedding.dim() == 1:
            dense_embedding = dense_embedding.view(1, -1, 1, 1)
        h, w = image_embedding.shape[-2:]
        image = image_embedding.flatten(2).transpose(1, 2)
        # src and pe as (1, n, C) rows in memory: an add or product between a (C, n) embedding
        # seen transposed and (n, C) rows (get_dense_pe's layout, and every later image-side
        # tensor) is a strided transpose, several times slower than the copy made here once.
        dense_rows = dense_embedding.flatten(2).transpose(1, 2)
        src = image.new_empty(image.shape, dtype=torch.result_type(image, dense_rows))  # a bf16 embedding: float32
        torch.add(image, dense_rows, out=src)
        # A clone with computed strides, not .contiguous(): that keeps get_dense_pe's size-1 batch
        # dim's odd stride (256), and batched products then copy the (n, C) operand on every box.
        pe = image_pe.flatten(2).transpose(1, 2).clone(memory_format=torch.contiguous_format)
        self.crop = PreparedCrop(image, dense_embedding, src, pe, src + pe, (h, w))
        return self.crop

    def _project_block0(self, crop: PreparedCrop) -> None:
        """Fill ``crop``'s shared block-0 projections (k0, v0, q0), once."""
        if crop.k0 is None:
            crop.k0, crop.v0, crop.q0 = self._image_side_block0(crop.src, crop.src_pe)

    # ------------------------------------------------------------------------- attentions
    @staticmethod
    def _softmax_scale(attn: nn.Module) -> float:
        return 1.0 / math.sqrt(attn.internal_dim // attn.num_heads)

    def _tokens_to_shared_image(self, attn: nn.Module, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Token->image attention with keys/values (1 or B, heads, n, d) already projected."""
        heads = attn.num_heads
        q = split_heads(attn.q_proj(q_in), heads)  # (B, heads, T, d)
        if k.shape[0] == 1:  # all boxes share the crop: the boxes' tokens are just more query rows
            b, _, t, d = q.shape
            rows = q.transpose(0, 1).reshape(1, heads, b * t, d)
            out = F.scaled_dot_product_attention(rows, k, v)  # (1, heads, B * T, d)
            out = out.reshape(heads, b, t, d).transpose(0, 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return attn.out_proj(merge_heads(out))

    def _tokens_to_image(self, attn: nn.Module, q_in: torch.Tensor, keys: torch.Tensor, pe: torch.Tensor,
                         keys_pe: torch.Tensor | None = None):
        """Token->image attention without projecting the n image tokens.

        ``softmax((q Wk_h) . x) (x Wv_h^T + bv_h) = (softmax(...) x) Wv_h^T + bv_h``: the key bias adds
        the same logit to every image token and cancels in the softmax.
        keys, pe: (B, n, C); keys_pe: ``keys + pe`` where the caller has it, else the logits are
        ``q . keys + q . pe`` (a few rows of q: cheaper than forming the (B, n, C) sum);
        q_in: (B, T, C) -> (B, T, C).
        """
        heads = attn.num_heads
        d = attn.internal_dim // heads
        q = split_heads(attn.q_proj(q_in), heads)  # (B, heads, T, d)
        wk = attn.k_proj.weight.view(heads, d, -1)  # (heads, d, C)
        wv = attn.v_proj.weight.view(heads, d, -1)
        b, _, t, _ = q.shape
        q_img = torch.matmul(q, wk).mul_(self._softmax_scale(attn)).reshape(b, heads * t, -1)  # (B, heads*T, C)
        if keys_pe is not None:
            logits = torch.bmm(q_img, keys_pe.transpose(1, 2))  # (B, heads*T, n)
        else:
            logits = torch.baddbmm(torch.bmm(q_img, pe.expand_as(keys).transpose(1, 2)), q_img, keys.transpose(1, 2))
        mixed = torch.matmul(logits.softmax(dim=-1), keys).view(b, heads, t, -1)  # (B, heads, T, C)
        out = torch.matmul(mixed, wv.transpose(1, 2)) + attn.v_proj.bias.view(heads, 1, d)
        return attn.out_proj(merge_heads(out))

    def _image_to_tokens(self, attn: nn.Module, q_img: torch.Tensor, tokens: torch.Tensor, tokens_pe: torch.Tensor,
                         keys: torch.Tensor, projected: bool, in_place: bool = False) -> torch.Tensor:
        """``keys`` + image->token attention: (B, n, C) image tokens attend to their box's T tokens.

        With ``projected`` q_img is (1 or B, heads, d, n) (block 0's, transposed); otherwise it is
        the (B, n, C) un-projected ``keys + pe`` and the query projection is folded into the
        tokens' keys. The value and output projections are folded into one (heads*T, C) matrix
        per box, so the n x 128 values are never formed; the output bias joins that matrix
        (each head's weights sum to one) and the residual ``keys`` is the product's initial value:
        with ``in_place`` the product accumulates into ``keys`` itself (no copy of n x C; only for
        keys the caller no longer needs).
        """
        heads = attn.num_heads
        d = attn.internal_dim // heads
        scale = self._softmax_scale(attn)
        k = split_heads(attn.k_proj(tokens_pe), heads).mul_(scale)  # (B, heads, T, d)
        v = split_heads(attn.v_proj(tokens), heads)
        b, _, t, _ = k.shape
        # Logits laid out (B, heads, T, n): the softmax over the T tokens then works on whole
        # n-long rows (PyTorch's softmax over a last dimension of 7 is very slow on CPUs).
        if projected and q_img.shape[0] == 1:
            # Shared crop: one product per head for all boxes.
            k_rows = k.transpose(0, 1).reshape(heads, b * t, d)
            logits = torch.bmm(k_rows, q_img[0]).view(heads, b, t, -1).transpose(0, 1)
        elif projected:
            logits = torch.matmul(k, q_img)
        else:
            wq = attn.q_proj.weight.view(heads, d, -1)  # (heads, d, C)
            k_img = torch.matmul(k, wq).reshape(b, heads * t, -1)  # x . (Wq^T k) = (Wq x) . k
            k_bias = torch.matmul(k, attn.q_proj.bias.view(heads, d, 1)).view(b, heads * t, 1)
            logits = torch.baddbmm(k_bias, k_img, q_img.transpose(1, 2)).view(b, heads, t, -1)
        weights = softmax_over_tokens(logits).reshape(b, heads * t, -1)  # (B, heads*T, n)
        # Per box: (heads*T, C) = each head's values through its slice of out_proj, + bias / heads.
        wo = attn.out_proj.weight.view(-1, heads, d).permute(1, 2, 0)  # (heads, d, C)
        value_out = torch.matmul(v, wo).add_(attn.out_proj.bias / heads).reshape(b, heads * t, -1)
        if in_place:
            return keys.baddbmm_(weights.transpose(1, 2), value_out)
        return torch.baddbmm(keys, weights.transpose(1, 2), value_out)  # (B, n, C)

    # ---------------------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(
        self,
        sparse_embeddings: torch.Tensor,
        dense_embeddings: torch.Tensor | None = None,
        regions: torch.Tensor | None = None,
        multimask_output: bool = False,
        chunk_size: int | None = None,
    ) -> DecoderOutput:
        """Masks and IoU scores for B prompts on the prepared crop.

        Args:
            sparse_embeddings: (B, T, 256) from the prompt encoder (a box: T = 2).
            dense_embeddings: None, or (B, 256, h, w) from the prompt encoder: the shared
                per-crop path is used when it is the dense prompt given to ``prepare`` (no mask
                input, SAM's usual case), else each box gets its own image side (slower).
            regions: None for full-grid masks, or (B, 4) (x0, y0, x1, y1) on the low-resolution
                grid (``regions_from_boxes``): logits are computed only there.
            multimask_output: SAM's three masks (True) or its single-mask output (False).
            chunk_size: boxes computed together; bounds memory (each box holds a few
                n x 256 float tensors, 4 MB each at n = 4096). Default: 1 on CPUs, where a
                box's tensors then stay in cache (measured fastest, docs/benchmarks.md),
                256 on GPUs.
        """
        b = sparse_embeddings.shape[0]
        if chunk_size is None:
            chunk_size = 1 if sparse_embeddings.device.type == "cpu" else 256
        if regions is not None:
            regions = torch.as_tensor(regions, dtype=torch.long).cpu()
            if regions.shape != (b, 4):
                raise ValueError(f"regions must be (B, 4) = ({b}, 4), got {tuple(regions.shape)}")
        if self.crop is None:
            raise RuntimeError("FastMaskDecoder.predict called before prepare(image_embedding, image_pe)")
        # The shared block-0 projections pay for themselves from the second box on a crop. The
        # first box's re-associated path equals them to float32 rounding only: in bf16 a mask
        # would then depend on whether its box came first on its crop, so bf16 always shares
        # (a crop's first box in bf16 is still faster than float32's lazy one where bf16 is chosen).
        share_block0 = b > 1 or self.crop.calls > 0 or self.crop.src.dtype != torch.float32
        self.crop.calls += 1
        if b <= chunk_size:
            return self._predict(sparse_embeddings, dense_embeddings, regions, multimask_output, share_block0)
        parts = [
            self._predict(
                sparse_embeddings[i : i + chunk_size],
                None if dense_embeddings is None else dense_embeddings[i : i + chunk_size],
                None if regions is None else regions[i : i + chunk_size],
                multimask_output,
                share_block0,
            )
            for i in range(0, b, chunk_size)
        ]
        if regions is None:
            masks = torch.cat([p.masks for p in parts])
        else:
            masks = [m for p in parts for m in p.masks]
        return DecoderOutput(
            masks, torch.cat([p.iou_predictions for p in parts]), torch.cat([p.regions for p in parts])
        )

    def _predict(self, sparse_embeddings, dense_embeddings, regions, multimask_output, share_block0) -> DecoderOutput:
        crop = self.crop
        b = sparse_embeddings.shape[0]
        src, pe = crop.src, crop.pe
        if dense_embeddings is not None and not self._is_shared_dense(dense_embeddings):
            # A mask input: every box has its own dense prompt, so its own image side.
            src = crop.image + dense_embeddings.flatten(2).transpose(1, 2)
            pe = crop.pe.expand(b, -1, -1)
            k0, v0, q0 = self._image_side_block0(src, src + pe)
        else:
            if share_block0:
                self._project_block0(crop)
            k0, v0, q0 = crop.k0, crop.v0, crop.q0

        decoder, layers = self.decoder, self.transformer.layers
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_embeddings], dim=1)
        tokens_pe = tokens

        # Block 0 (no PE in its self-attention; image side from prepare).
        layer = layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))
        if k0 is None:  # a crop's first single box: block 0 re-associated, as block 1 below
            attended = self._tokens_to_image(t2i, queries + tokens_pe, src, pe, crop.src_pe)
        else:
            attended = self._tokens_to_shared_image(t2i, queries + tokens_pe, k0, v0)
        queries = layer.norm2(queries + attended)
        queries = layer.norm3(queries + layer.mlp(queries))
        if k0 is None:
            keys = self._image_to_tokens(i2t, crop.src_pe, queries, queries + tokens_pe, src, False)
        else:
            keys = self._image_to_tokens(i2t, q0, queries, queries + tokens_pe, src, True)
        keys = layer.norm4(keys)  # (B, n, C)

        # Block 1.
        layer = layers[1]
        q = queries + tokens_pe
        queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
        keys_pe = keys + pe
        queries = layer.norm2(queries + self._tokens_to_image(layer.cross_attn_token_to_image, queries + tokens_pe, keys, pe, keys_pe))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(
            self._image_to_tokens(layer.cross_attn_image_to_token, keys_pe, queries, queries + tokens_pe, keys, False, in_place=True)
        )

        # Final token->image attention: only the IoU token and the wanted mask tokens matter.
        mask_ids = list(range(1, self.num_mask_tokens)) if multimask_output else [0]
        used = [0] + [1 + i for i in mask_ids]
        q_used = queries[:, used]
        final = self.transformer.final_attn_token_to_image
        q_used = q_used + self._tokens_to_image(final, q_used + tokens_pe[:, used], keys, pe)
        hs = self.transformer.norm_final_attn(q_used).to(self.up1_w.dtype)  # the heads' dtype (float32_heads)

        iou = decoder.iou_prediction_head(hs[:, 0])[:, mask_ids]
        hyper = torch.stack(
            [decoder.output_hypernetworks_mlps[i](hs[:, 1 + j]) for j, i in enumerate(mask_ids)], dim=1
        )  # (B, M, C/8)
        h, w = crop.grid
        full = (0, 0, 4 * w, 4 * h)
        if regions is None:
            masks = self._upscale_full(keys, hyper, crop.grid)
            region_tensor = torch.tensor([full] * b, dtype=torch.long)
        else:
            region_tensor = regions
            masks = self._upscale_regions(keys, hyper, crop.grid, region_tensor)
        return DecoderOutput(masks, iou, region_tensor)

    def _is_shared_dense(self, dense: torch.Tensor) -> bool:
        """True when every box's dense prompt is the one ``prepare`` used (checked exactly)."""
        shared = self.crop.dense
        if shared.shape[-2:] == (1, 1) and dense.stride(-1) == 0 and dense.stride(-2) == 0:
            # The prompt encoder's no-mask output: one vector expanded over the grid.
            return bool((dense[:, :, :1, :1] == shared).all())
        return bool((dense == shared).all())

    # ---------------------------------------------------------------------------- upscale
    def _upscale_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(P, C) embedding positions -> (P, 16, C/8): their 4 x 4 upscaled feature pixels.

        Pixel order (a, b, c, d): row 2a + c, column 2b + d inside the position's 4 x 4 patch.
        """
        p = tokens.shape[0]
        x = torch.addmm(self.up1_b, tokens.to(self.up1_w.dtype), self.up1_w).view(p * 4, -1)  # (P*4, C/4), (a, b) order
        x = F.gelu(F.layer_norm(x, (x.shape[-1],), self.norm_w, self.norm_b, self.norm_eps))
        x = F.gelu(torch.addmm(self.up2_b, x, self.up2_w))  # (P*4, 4 * C/8), (c, d) order
        return x.view(p, 16, -1)

    @staticmethod
    def _to_image(masks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(rows*cols, 16, M) per-position 4 x 4 logits -> (M, 4 rows, 4 cols)."""
        m = masks.shape[-1]
        x = masks.view(rows, cols, 2, 2, 2, 2, m)  # (i, j, a, b, c, d, M)
        return x.permute(6, 0, 2, 4, 1, 3, 5).reshape(m, 4 * rows, 4 * cols)

    def _upscale_full(self, keys: torch.Tensor, hyper: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, c = keys.shape
        h, w = grid
        feats = self._upscale_positions(keys.reshape(b * n, c)).view(b, n * 16, -1)
        masks = torch.matmul(feats.float(), hyper.float().transpose(1, 2))  # (B, n*16, M), float32 logits whatever the dtype
        return torch.stack([self._to_image(m.view(n, 16, -1), h, w) for m in masks])

    def _upscale_regions(self, keys, hyper, grid, regions: torch.Tensor) -> list[torch.Tensor]:
        h, w = grid
        spans, index = [], []
        for x0, y0, x1, y1 in regions.tolist():
            if not (0 <= x0 < x1 <= 4 * w and 0 <= y0 < y1 <= 4 * h):
                raise ValueError(f"region {(x0, y0, x1, y1)} is empty or outside the {4 * w} x {4 * h} grid")
            r0, r1, c0, c1 = y0 // 4, -(-y1 // 4), x0 // 4, -(-x1 // 4)
            spans.append((r0, r1, c0, c1))
            rows = torch.arange(r0, r1).view(-1, 1) * w + torch.arange(c0, c1).view(1, -1)
            index.append(rows.flatten())
        counts = [len(i) for i in index]
        flat = torch.cat([i + k * h * w for k, i in enumerate(index)]).to(keys.device)
        feats = self._upscale_positions(keys.reshape(-1, keys.shape[-1]).index_select(0, flat))
        out = []
        for k, (part, (r0, r1, c0, c1), (x0, y0, x1, y1)) in enumerate(zip(feats.split(counts), spans, regions.tolist())):
            logits = torch.matmul(part.float(), hyper[k].float().T)  # (P, 16, M), float32 logits whatever the dtype
            image = self._to_image(logits, r1 - r0, c1 - c0)
            out.append(image[:, y0 - 4 * r0 : y1 - 4 * r0, x0 - 4 * c0 : x1 - 4 * c0])
        return out


class FastSamBoxDecoder:
    """The engine's box-decoder call on ``FastMaskDecoder``: a drop-in for ``engine.decoder.SamBoxDecoder``
    (clicks and mask prompts too; a mask prompt takes the slower per-object image side).

    ``decoder(embedding (1, 256, h, w), boxes (N, 4) xyxy input px) -> (logits (N, 1, 4h, 4w), scores (N,))``.
    The per-crop work runs once per embedding tensor (recognised by identity and version), so
    calling it chunk after chunk on one crop pays it once.

    Args:
        model: a segment_anything ``Sam``-like module (``prompt_encoder``, ``mask_decoder``).
        multimask: SAM's three masks, keeping the one with the best predicted IoU per box.
        margin: None computes the full 256 x 256 logits (identical to SAM's). An int computes
            them only within the box plus ``margin`` low-res pixels (4 input px each) and fills
            the rest with -1e4 (background): several times less work for small boxes, and the same
            mask wherever SAM's mask does not extend beyond that margin.
        dtype: the decoder's weights and activations (its prompt encoder stays float32, and the
            logits come out float32). torch.bfloat16 runs the two-way transformer in bf16 on a
            copy of the mask decoder (the heads stay float32: ``FastMaskDecoder.float32_heads``):
            a quarter less time per box on an AVX-512 EPYC, more on an AMX Xeon
            (docs/benchmarks.md): the engine uses it under "fast-bf16" where calibration measured
            it faster (``hrmedseg.models.runtime.decoder_dtype``).
    """

    def __init__(self, model: nn.Module, multimask: bool = False, margin: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.prompt_encoder = model.prompt_encoder
        self.dtype = dtype
        self.fast = FastMaskDecoder.from_sam(model.mask_decoder, model.prompt_encoder, dtype)  # another dtype: a copy
        self.multimask = multimask
        self.margin = margin
        # The embedding last prepared for; holding the tensor itself (not its id) means a new
        # tensor can never be mistaken for it. Works for inference-mode tensors too.
        self._prepared_for: torch.Tensor | None = None
        self._dense_pe_of: tuple | None = None  # (Gaussian matrix, (grid, its version), dense PE)
        with torch.no_grad():  # per model, not per crop: computed here rather than on the first box
            self.dense_pe()

    def dense_pe(self) -> torch.Tensor:
        """``prompt_encoder.get_dense_pe()``, (1, C, h, w): the same for every crop, so computed again
        only when the encoder's grid or its Gaussian matrix (new weights) changed."""
        matrix = getattr(getattr(self.prompt_encoder, "pe_layer", None), "positional_encoding_gaussian_matrix", None)
        if not isinstance(matrix, torch.Tensor):
            return self.prompt_encoder.get_dense_pe()
        state = (tuple(self.prompt_encoder.image_embedding_size), matrix._version)
        cached = self._dense_pe_of
        if cached is None or cached[0] is not matrix or cached[1] != state:
            self._dense_pe_of = cached = (matrix, state, self.prompt_encoder.get_dense_pe())
        return cached[2]

    @torch.inference_mode()
    def __call__(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        extent: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts as ``hrmedseg.models.prompting.sam_prompt`` (input px); ``extent`` (N, 4): the
        boxes whose regions are computed with a margin (default ``boxes``; with neither, the full grid)."""
        if embedding is not self._prepared_for:
            self.fast.prepare(embedding.to(self.dtype), self.dense_pe().to(self.dtype))
            self._prepared_for = embedding
        p = prompt_tensors(embedding.device, boxes, points, point_labels, mask_inputs)
        sparse, dense = sam_prompt(self.prompt_encoder, **p)
        sparse = sparse.to(self.dtype)
        h, w = embedding.shape[-2:]
        input_size = self.prompt_encoder.input_image_size
        regions = None
        extent = p["boxes"] if extent is None else extent
        if self.margin is not None and extent is not None:
            regions = regions_from_boxes(extent.cpu(), input_size, (4 * h, 4 * w), self.margin)
        # Without a mask prompt every object shares the crop's dense prompt (the fast path).
        dense = None if mask_inputs is None else dense.to(self.dtype)
        out = self.fast.predict(sparse, dense, regions, multimask_output=self.multimask)
        logits = out.masks if regions is None else paste_regions(out.masks, regions, (4 * h, 4 * w))
        iou = out.iou_predictions.float()
        if self.multimask:  # keep the best of the three, as the engine's SamBoxDecoder does
            best = iou.argmax(dim=1)
            idx = torch.arange(len(best), device=best.device)
            return logits[idx, best][:, None], iou[idx, best]
        return logits, iou[:, 0]


__all__ = ["FastMaskDecoder", "FastSamBoxDecoder", "PreparedCrop", "DecoderOutput", "regions_from_boxes", "paste_regions"]
