"""LGViT: the linear-attention image encoder of HRMedSeg (Xu et al. 2025).

State-dict names follow the authors' released checkpoint (``image_encoder.*`` there), so their
``SAM_PFD_10K.pth`` loads with no renaming. Widths and depths are configurable as in timm.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Mlp
from .rope import RotaryEmbedding2d


class PatchEmbed(nn.Module):
    """Non-overlapping 16 x 16 patches: (B, 3, H, W) -> (B, C, H/16, W/16)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, patch_size: int = 16) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ConvBN(nn.Sequential):
    """Bias-free convolution followed by BatchNorm (named ``c`` and ``bn`` as in the checkpoint)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
        )
        self.add_module("bn", nn.BatchNorm2d(out_ch))


class MBConv(nn.Module):
    """Inverted residual block of the channel-interactive stage (paper Eq. 1).

    (B, C, H, W) -> (B, C, H, W): 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU.
    """

    def __init__(self, dim: int, expand_ratio: int = 2) -> None:
        super().__init__()
        hidden = dim * expand_ratio
        self.conv1 = ConvBN(dim, hidden, 1)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        y = self.conv3(y)
        return F.gelu(x + y)


class DualGatedLinearAttention(nn.Module):
    """DGLA: ELU+1 kernel linear attention with 2D RoPE, an inter-gated value path and LePE.

    Tokens (B, N, C) on an (H, W) grid -> (B, N, C). Cost is linear in N.
    """

    def __init__(self, dim: int, num_heads: int, value_ratio: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qk = nn.Linear(dim, dim * 2)
        self.up_proj = nn.Linear(dim, dim // value_ratio)
        self.down_proj = nn.Linear(dim // value_ratio, dim)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.rope = RotaryEmbedding2d(dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C / heads)."""
        b, n, c = t.shape
        return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        h, w = grid
        q, k = self.qk(x).chunk(2, dim=-1)
        v = self.down_proj(F.silu(self.up_proj(x)))
        q = F.elu(q) + 1.0
        k = F.elu(k) + 1.0
        q_rot = self._heads(self.rope(q.reshape(b, h, w, c)).reshape(b, n, c))
        k_rot = self._heads(self.rope(k.reshape(b, h, w, c)).reshape(b, n, c))
        q, k, v_heads = self._heads(q), self._heads(k), self._heads(v)

        # Normaliser from the un-rotated kernels keeps it positive (the authors' choice).
        z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        scale = n**-0.5
        kv = (k_rot.transpose(-2, -1) * scale) @ (v_heads * scale)
        out = (q_rot @ kv) * z
        out = out.transpose(1, 2).reshape(b, n, c)

        v_grid = v.transpose(1, 2).reshape(b, c, h, w)
        return out + self.lepe(v_grid).flatten(2).transpose(1, 2)


class LinearAttentionBlock(nn.Module):
    """Token-interactive block: gated DGLA then an MLP, each with a pre-norm residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.act_proj = nn.Linear(dim, dim)
        self.attn = DualGatedLinearAttention(dim, num_heads)
        self.out_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        h = self.norm1(x)
        gate = F.silu(self.act_proj(h))
        x = x + self.out_proj(self.attn(h, grid) * gate)
        return x + self.mlp(self.norm2(x))


class ConvStage(nn.Module):
    """Channel-interactive stage on a (B, C, H, W) grid."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class AttentionStage(nn.Module):
    """Token-interactive stage on (B, N, C) tokens, with optional activation checkpointing."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LinearAttentionBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(block, x, grid, use_reentrant=False)
            else:
                x = block(x, grid)
        return x


class LGViT(nn.Module):
    """Lightweight gated vision transformer at a single 1/16 scale (no downsampling).

    Args:
        embed_dim: token width C (96 in the paper).
        conv_depth: MBConv blocks in the channel-interactive stage.
        depths: blocks per token-interactive stage (2, 6, 2: L = 10 in all).
        num_heads: heads per token-interactive stage.
        mlp_ratio: MLP hidden width as a multiple of C.

    Maps (B, 3, H, W), H and W multiples of 16, to (B, C, H/16, W/16).
    """

    def __init__(
        self,
        embed_dim: int = 96,
        conv_depth: int = 2,
        depths: Sequence[int] = (2, 6, 2),
        num_heads: Sequence[int] = (6, 12, 24),
        mlp_ratio: float = 2.0,
        in_chans: int = 3,
        patch_size: int = 16,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads must have the same length")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        stages: list[nn.Module] = [ConvStage(embed_dim, conv_depth)]
        stages += [AttentionStage(embed_dim, d, h, mlp_ratio) for d, h in zip(depths, num_heads)]
        self.layers = nn.ModuleList(stages)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute attention blocks in the backward pass to save activation memory."""
        for stage in self.layers[1:]:
            stage.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"LGViT input height and width must be multiples of {self.patch_size}, got {height} x {width}"
            )
        x = self.layers[0](self.patch_embed(x))
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for stage in self.layers[1:]:
            tokens = stage(tokens, (h, w))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["LGViT", "MBConv", "LinearAttentionBlock", "DualGatedLinearAttention", "count_parameters"]
