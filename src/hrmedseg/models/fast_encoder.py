"""Inference-only LGViT + neck, built from a reference ``HRMedSegEncoder``'s weights.

Same function as ``hrmedseg.models.neck.HRMedSegEncoder`` (the plain reference, which keeps
the authors' state-dict names and stays the model for training and tests), computed with
fewer passes over memory:

- tokens stay channels-last, (B, N, C), from the patch embedding to the neck; 1x1 convs are
  matrix products and the 3x3 (depthwise) convs run on channels-last views, so no layout copies;
- BatchNorm is folded into the MBConv convolutions;
- on the CPU, the bias, GELU and residual adds after matrix products run inside them (oneDNN
  post-ops, :mod:`hrmedseg.models.fused_linear`): one pass over the activations instead of three;
- in the linear attention every element-wise op reads a contiguous tensor (a bf16 op on a
  strided slice is 3-4x slower on the CPU): gate, q, k and the value path are separate products,
  q token-major (N, C) and k channel-major (C, N), so ``rope(k)^T v`` for all heads is one
  product of two operands contiguous along the tokens (the off-head blocks masked out);
- RoPE is never materialised as a rotation: with ``rope(q) = q * cos + swap(q * sin')`` (``swap``
  exchanges the channels of each rotation pair, ``sin'`` carries the signs) the swap moves into
  the small ``kv`` matrix, and ``rope(k) = k * cos + swap(k) * swap(sin')`` on the channel-major
  k, where ``swap`` copies whole rows;
- the neck's 1x1 conv and first LayerNorm2d fold into its 3x3 conv: the 1x1 conv has only C = 96
  inputs, so the normalised 256-channel map is an affine function of ``x / sigma(x)`` and the
  3x3 conv runs on 96 channels instead of 256 (0.91 instead of 2.5 GMACs at 1024 x 1024); zero
  padding of the 3x3 conv is honoured by a precomputed bias map.

The fp32 result equals the reference to rounding (relative L2 error about 1e-6). ``bf16=True``
casts the folded weights to bfloat16 once and runs everything in bfloat16 (AMX on recent Xeons,
tensor cores on GPUs), the same as ``.to(torch.bfloat16)`` of a float32-built module, with a
measured relative error of about 1e-2 (docs/engine.md). Autocast would cast every weight again
in every call and mix float32 biases into bf16 element-wise ops (a slow path on the CPU); the
activations are bf16 either way, so the error is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused_linear import linear, linear_add, linear_gelu, linear_silu, matmul_nt
from .lgvit import LinearAttentionBlock, MBConv
from .neck import HRMedSegEncoder
from .rope import rope_angles


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to ``bn(conv(x))`` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight.detach().clone(), bias.detach().clone()


def rope_tables(height: int, width: int, dim: int) -> torch.Tensor:
    """Interleaved cos/sin table for RoPE on (N, C) tokens.

    Returns:
        (N, 2, C) float32: ``[:, 0]`` is the cosine of each channel's pair angle, ``[:, 1]`` is
        ``sin'``, the sine with the sign of the pair-swapped channel (``+sin`` on even channels,
        ``-sin`` on odd ones), so that ``rope(q) = q * cos + swap(q * sin')``.
    """
    angles = rope_angles(height, width, dim).reshape(height * width, dim // 2)
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = angles.sin().repeat_interleave(2, dim=-1)
    sign = torch.tensor([1.0, -1.0]).repeat(dim // 2)
    return torch.stack((cos, sin * sign), dim=1)  # (N, 2, C)


def swap_pairs(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Exchange entries 2i and 2i+1 along ``dim`` (the channels of each rotation pair)."""
    dim = dim % t.dim()
    shape = t.shape
    return t.unflatten(dim, (shape[dim] // 2, 2)).flip(dim + 1).flatten(dim, dim + 1)


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``ELU(x) + 1 = exp(min(x, 0)) + max(x, 0)``, a few times faster than ``F.elu`` (which uses expm1)."""
    pos = F.relu(x)
    return torch.sub(x, pos).exp_().add_(pos)


class FastMBConv(nn.Module):
    """MBConv with BatchNorm folded in, on channels-last tokens (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, block: MBConv) -> None:
        super().__init__()
        w1, b1 = fold_conv_bn(block.conv1.c, block.conv1.bn)
        w2, b2 = fold_conv_bn(block.conv2.c, block.conv2.bn)
        w3, b3 = fold_conv_bn(block.conv3.c, block.conv3.bn)
        self.register_buffer("w1", w1.flatten(1))
        self.register_buffer("b1", b1)
        self.register_buffer("w2", w2)
        self.register_buffer("b2", b2)
        self.register_buffer("w3", w3.flatten(1))
        self.register_buffer("b3", b3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_gelu(x, self.w1, self.b1)
        # A (B, H, W, C) tensor is a channels-last (B, C, H, W) one: no copy either way.
        y = F.conv2d(y.permute(0, 3, 1, 2), self.w2, self.b2, padding=1, groups=self.w2.shape[0])
        y = F.gelu(y.permute(0, 2, 3, 1))
        return F.gelu(linear_add(y, self.w3, self.b3, x))


class FastAttentionBlock(nn.Module):
    """A ``LinearAttentionBlock`` (gated DGLA + MLP) on (B, N, C) tokens of an (H, W) grid.

    Layouts are chosen so that every element-wise op reads contiguous memory (a bf16 op on a
    strided slice is 3-4x slower on the CPU than on a contiguous tensor) and every matrix product
    has a long contiguous dimension: the gate, q and the value path are token-major (N, C);
    k is computed channel-major (C, N), so the reduction over tokens in ``k^T v`` is a product
    of two operands contiguous along N (3x faster than reducing a token-major k).
    """

    def __init__(self, block: LinearAttentionBlock) -> None:
        super().__init__()
        attn = block.attn
        dim = block.norm1.normalized_shape[0]
        self.dim = dim
        self.num_heads = attn.num_heads
        self.head_dim = dim // attn.num_heads
        for name, norm in (("norm1", block.norm1), ("norm2", block.norm2)):
            self.register_buffer(f"{name}_w", norm.weight.detach().clone())
            self.register_buffer(f"{name}_b", norm.bias.detach().clone())
        self.eps1, self.eps2 = block.norm1.eps, block.norm2.eps
        w_q, w_k = attn.qk.weight.detach().chunk(2)
        b_q, b_k = attn.qk.bias.detach().chunk(2)
        weights = {
            "gate": (block.act_proj.weight, block.act_proj.bias), "q": (w_q, b_q), "up": (attn.up_proj.weight, attn.up_proj.bias),
            "down": (attn.down_proj.weight, attn.down_proj.bias), "lepe": (attn.lepe.weight, attn.lepe.bias),
            "out": (block.out_proj.weight, block.out_proj.bias), "fc1": (block.mlp.fc1.weight, block.mlp.fc1.bias),
            "fc2": (block.mlp.fc2.weight, block.mlp.fc2.bias),
        }
        for name, (weight, bias) in weights.items():
            self.register_buffer(f"w_{name}", weight.detach().clone())
            self.register_buffer(f"b_{name}", bias.detach().clone())
        self.register_buffer("w_k", w_k.clone())
        self.register_buffer("b_k", b_k.clone().view(dim, 1))  # added to (C, N) columns
        heads = torch.arange(dim) // self.head_dim
        self.register_buffer("head_mask", (heads[:, None] == heads[None, :]).float())  # (C, C) block diagonal

    def attention(self, h: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """DGLA(h) * gate for normalised tokens h (B, N, C); ``tables`` from ``FastHRMedSegEncoder.rope_table``."""
        b, n, c = h.shape
        table, table_t = tables  # (N, 2, C) [cos | sin'] per token; (2, C, N) [cos ; swap_rows(sin')] per channel
        gate = linear_silu(h, self.w_gate, self.b_gate)
        q = elu_plus_one(linear(h, self.w_q, self.b_q))  # (B, N, C)
        k_t = elu_plus_one(matmul_nt(self.w_k, h).add_(self.b_k))  # (B, C, N)
        v = linear(linear_silu(h, self.w_up, self.b_up), self.w_down, self.b_down)  # (B, N, C)

        # kv = rope(k)^T v / n per head, with rope(k) = k cos + swap(k) swap(sin') channel-major
        # (swapping rows of a (C, N) tensor is a contiguous copy): one (C, N) @ (N, C) product for
        # all heads, the off-head blocks masked out.
        rope_k = (k_t * table_t[0]).addcmul_(swap_pairs(k_t, -2), table_t[1])  # (B, C, N)
        mask = self.head_mask.to(q.dtype)
        kv = torch.matmul(rope_k, v).mul_(mask / n)  # (B, C, C), block diagonal

        # rope(q) kv = [q cos | q sin'] @ [kv ; swap_rows(kv)]: contiguous (N, C) output.
        q_rot = (q.unsqueeze(-2) * table).view(b, n, 2 * c)
        out = torch.matmul(q_rot, torch.cat([kv, swap_pairs(kv, -2)], dim=-2))

        # Normaliser from the un-rotated kernels, z = 1 / (q . mean(k) + 1e-6) per head, as a
        # product with a block-diagonal matrix so it comes out already spread over each head.
        k_mean = k_t.sum(dim=-1).mul_(1 / n)  # (B, C); bf16 sums accumulate in float32
        z_den = torch.matmul(q, k_mean.unsqueeze(-1) * mask).add_(1e-6)  # (B, N, C)

        lepe = F.conv2d(v.view(b, *grid, c).permute(0, 3, 1, 2), self.w_lepe, self.b_lepe, padding=1, groups=c)
        y = torch.addcdiv(lepe.permute(0, 2, 3, 1).reshape(b, n, c), out, z_den)
        return y.mul_(gate)

    def forward(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        c = self.dim
        h = F.layer_norm(x, (c,), self.norm1_w, self.norm1_b, self.eps1)
        x = linear_add(self.attention(h, tables, grid), self.w_out, self.b_out, x)
        h = F.layer_norm(x, (c,), self.norm2_w, self.norm2_b, self.eps2)
        return linear_add(linear_gelu(h, self.w_fc1, self.b_fc1), self.w_fc2, self.b_fc2, x)


class FastNeck(nn.Module):
    """SAM neck (1x1 conv, LN2d, 3x3 conv, LN2d) with the first two folded into the 3x3 conv.

    With ``y = W1 x`` (no bias), LayerNorm over y's channels is ``g * (W1c x) / sigma + b`` where
    ``W1c = W1 - mean_rows(W1)`` and ``sigma^2 = x^T (W1c^T W1c / out) x + eps``. A 3x3 conv of that
    is a 3x3 conv with weight ``W3 g W1c`` of ``x / sigma`` (C_in = 96 channels) plus the 3x3 conv
    of the constant map ``b`` under zero padding (a bias that differs on the border).
    """

    def __init__(self, neck: nn.Sequential) -> None:
        super().__init__()
        conv1, norm1, conv3, norm2 = neck
        w1 = conv1.weight.detach().flatten(1).double()  # (out, C)
        w1c = w1 - w1.mean(dim=0, keepdim=True)
        self.out_chans = w1.shape[0]
        self.register_buffer("var_form", (w1c.T @ w1c / self.out_chans).float())  # (C, C)
        w3 = conv3.weight.detach().double()  # (out, out, 3, 3)
        fused = torch.einsum("okyx,k,kc->ocyx", w3, norm1.weight.detach().double(), w1c)
        self.register_buffer("w_fused", fused.float())
        self.register_buffer("w3", conv3.weight.detach().clone())
        self.register_buffer("b_norm1", norm1.bias.detach().clone())
        self.register_buffer("norm2_w", norm2.weight.detach().clone())
        self.register_buffer("norm2_b", norm2.bias.detach().clone())
        self.eps1, self.eps2 = norm1.eps, norm2.eps
        self._bias_maps: dict[tuple, torch.Tensor] = {}

    def bias_map(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(H, W, out) contribution of norm1's bias through the zero-padded 3x3 conv (cached)."""
        key = (grid, device, dtype)
        if key not in self._bias_maps:
            const = self.b_norm1.view(1, -1, 1, 1).expand(1, -1, *grid).float()
            bias = F.conv2d(const, self.w3.float(), padding=1)[0].permute(1, 2, 0)
            self._bias_maps[key] = bias.to(device=device, dtype=dtype).contiguous()
        return self._bias_maps[key]

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) tokens -> (B, N, out) normalised embedding tokens."""
        b, n, c = x.shape
        var = torch.linalg.vecdot(x @ self.var_form.to(x.dtype), x)  # (B, N)
        x_scaled = x * torch.rsqrt(var.float().add_(self.eps1)).to(x.dtype).unsqueeze(-1)
        y = F.conv2d(x_scaled.view(b, *grid, c).permute(0, 3, 1, 2), self.w_fused, padding=1)
        y = y.permute(0, 2, 3, 1).reshape(b, n, self.out_chans)
        y = y + self.bias_map(grid, x.device, y.dtype).view(n, self.out_chans)
        return F.layer_norm(y, (self.out_chans,), self.norm2_w, self.norm2_b, self.eps2)


class FastHRMedSegEncoder(nn.Module):
    """Inference-only twin of ``HRMedSegEncoder``: (B, 3, H, W) -> (B, 256, H/16, W/16).

    Build it with ``FastHRMedSegEncoder.from_reference(encoder)``; it copies (and folds) the
    reference's weights, so later changes to the reference are not seen. The output is a
    channels-last (B, 256, h, w) tensor (``.contiguous()`` gives NCHW memory if needed).

    Args of ``from_reference``:
        bf16: run in bfloat16 (weights cast once, activations bf16) — several times faster
            on CPUs with AMX and on GPUs, relative error about 1e-2 instead of 1e-6.
    """

    def __init__(self, reference: HRMedSegEncoder, bf16: bool = False) -> None:
        super().__init__()
        lgvit = reference.image_encoder
        self.config = reference.config
        self.preprocessing = reference.preprocessing
        self.img_size = reference.img_size
        self.patch_size = lgvit.patch_size
        self.embed_dim = lgvit.embed_dim
        self.bf16 = bf16
        proj = lgvit.patch_embed.proj
        self.register_buffer("w_patch", proj.weight.detach().flatten(1).clone())  # (C, 3 * p * p)
        self.register_buffer("b_patch", proj.bias.detach().clone())
        self.conv_blocks = nn.ModuleList(FastMBConv(blk) for blk in lgvit.layers[0].blocks)
        self.attn_blocks = nn.ModuleList(
            FastAttentionBlock(blk) for stage in lgvit.layers[1:] for blk in stage.blocks
        )
        self.neck = FastNeck(reference.neck)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_reference(cls, reference: HRMedSegEncoder, bf16: bool = False) -> "FastHRMedSegEncoder":
        """Build from ``reference`` (left unchanged) on its device; weights are folded in float64."""
        param = next(reference.parameters())
        if param.dtype != torch.float32:
            raise ValueError(f"build the fast encoder from a float32 reference, not {param.dtype} (use bf16=True for bf16)")
        with torch.no_grad():
            fast = cls(reference, bf16=bf16)
        fast = fast.to(param.device)
        return (fast.to(torch.bfloat16) if bf16 else fast).eval()

    def rope_table(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for ``grid`` (cached): (N, 2, C) ``[cos | sin']`` token-major (``rope_tables``)
        and (2, C, N) ``[cos ; swap_rows(sin')]`` channel-major, so that ``rope(k) = k cos + swap(k) swap(sin')``."""
        key = (grid, device, dtype)
        if key not in self._tables:
            table = rope_tables(*grid, self.embed_dim)  # (N, 2, C)
            table_t = table.permute(1, 2, 0).contiguous()  # (2, C, N)
            table_t[1] = swap_pairs(table_t[1], 0)
            self._tables[key] = (table.to(device=device, dtype=dtype), table_t.to(device=device, dtype=dtype))
        return self._tables[key]

    def patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h, w, C) tokens: a matrix product of the unfolded patches."""
        b, ch, height, width = x.shape
        p = self.patch_size
        h, w = height // p, width // p
        # One pass casts to the weights' dtype and unfolds (a bf16 cast after it would be a second).
        patches = x.view(b, ch, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.to(self.w_patch.dtype, memory_format=torch.contiguous_format)
        return linear(patches.reshape(b, h, w, ch * p * p), self.w_patch, self.b_patch)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"LGViT input height and width must be multiples of {self.patch_size}, got {height} x {width}"
            )
        tokens = self.patch_embed(x)  # in the weights' dtype from here on
        for block in self.conv_blocks:
            tokens = block(tokens)
        b, h, w, c = tokens.shape
        grid = (h, w)
        tokens = tokens.reshape(b, h * w, c)
        tables = self.rope_table(grid, x.device, tokens.dtype)
        for block in self.attn_blocks:
            tokens = block(tokens, tables, grid)
        out = self.neck(tokens, grid)
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)


__all__ = ["FastHRMedSegEncoder", "fold_conv_bn", "rope_tables"]
