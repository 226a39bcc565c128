"""Rotary position embeddings in Hugging Face's rotate-half layout (loaders convert to it)."""

from __future__ import annotations

import torch


class RotaryEmbedding:
    """cos/sin tables for arbitrary positions; ``theta`` comes from the checkpoint's config."""

    def __init__(self, head_dim: int, theta: float, device: torch.device | str = "cpu") -> None:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
        self.inv_freq = 1.0 / (theta ** (exponents / head_dim))  # [D/2]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, D] cos and sin for positions [T] (computed in fp32, then cast)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by cos/sin [T, 1, D] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [T, heads, D]
    return x * cos + rotated * sin
