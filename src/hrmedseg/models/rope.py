"""2D rotary position embedding (RoPE) in real arithmetic.

The authors' code rotates with complex numbers, which PyTorch does not support under bf16
autocast; cos/sin arithmetic gives the same result and works in every dtype. Tables are
computed for whatever token grid arrives and cached, so any input size works.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_angles(height: int, width: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotation angle of every channel pair at every grid position.

    With ``m = dim / 4`` and ``theta_j = base ** (-j / m)``, pair ``p < m`` turns by
    ``row * theta_p`` and pair ``p >= m`` by ``col * theta_(p - m)``.

    Returns:
        (height, width, dim / 2) float32 angles.
    """
    if dim % 4:
        raise ValueError(f"RoPE width must be a multiple of 4, got {dim}")
    m = dim // 4
    theta = 1.0 / (base ** (torch.arange(m, dtype=torch.float32) / m))
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing="ij",
    )
    return torch.cat([rows[..., None] * theta, cols[..., None] * theta], dim=-1)


class RotaryEmbedding2d(nn.Module):
    """Applies 2D RoPE to (B, H, W, C) features; consecutive channels (2i, 2i+1) form a pair."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, height: int, width: int, device: torch.device, dtype: torch.dtype):
        key = (height, width, device, dtype)
        if key not in self._tables:
            angles = rope_angles(height, width, self.dim, self.base).to(device)
            self._tables[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
        return self._tables[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C), rotated."""
        b, h, w, c = x.shape
        cos, sin = self._cos_sin(h, w, x.device, x.dtype)
        pairs = x.reshape(b, h, w, c // 2, 2)
        x0, x1 = pairs.unbind(-1)
        rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return rotated.reshape(b, h, w, c)
