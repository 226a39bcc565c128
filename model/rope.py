"""Rotary position embeddings in Hugging Face's rotate-half layout (loaders convert to it)."""

from __future__ import annotations

import torch

from model import cpu_kernels

# Positions the cos/sin table covers at first; it doubles whenever a step goes past it.
_INITIAL_TABLE_POSITIONS = 4096


class RotaryEmbedding:
    """cos/sin tables for arbitrary positions; ``theta`` comes from the checkpoint's config.

    The tables are computed once per position (and per dtype) and then looked up, so a
    decode step costs two row gathers instead of five elementwise ops; the values are the
    ones computing them per step would give (same fp32 formula, then cast).
    """

    def __init__(self, head_dim: int, theta: float, device: torch.device | str = "cpu") -> None:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
        self.inv_freq = 1.0 / (theta ** (exponents / head_dim))  # [D/2]
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, dtype: torch.dtype, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[P, 1, D] cos and sin for positions 0 .. P-1, P >= needed."""
        table = self._tables.get(dtype)
        if table is None or table[0].shape[0] < needed:
            size = _INITIAL_TABLE_POSITIONS
            while size < needed:
                size *= 2
            table = self._compute(torch.arange(size, device=self.inv_freq.device), dtype)
            self._tables[dtype] = table
        return table

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, max_position: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, D] cos and sin for positions [T] (computed in fp32, then cast).

        ``max_position`` (the largest of ``positions``, when the caller knows it without a
        device sync) sizes the table; otherwise it is read from ``positions``.
        """
        if positions.numel() == 0:
            return self._compute(positions, dtype)
        top = int(positions.max()) if max_position is None else max_position
        cos, sin = self._table(dtype, top + 1)
        return cos[positions], sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by cos/sin [T, 1, D] (rotate-half convention).

    On CPU with fp32 tensors and a head dim that is a multiple of 32 this is one call of
    ``ringserve::rotary`` (model/csrc/decode_layer.cpp, the code the fused decode layer runs)
    where the kernels are built. (Through PyTorch: fused multiply-adds into the two halves,
    in place, measured slower at batch 1 than this rotated copy: ops over half-row strided
    views vectorize poorly.)
    """
    if rotary_kernel_takes(x, cos):
        kernel = cpu_kernels.rotary()
        if kernel is not None:
            return kernel(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [T, heads, D]
    return x * cos + rotated * sin


def rotary_kernel_takes(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether ``ringserve::rotary`` takes these tensors (CPU, fp32, head dim a multiple of
    32, dense heads, contiguous tables)."""
    return (not x.is_cuda and x.dtype == torch.float32 and cos.dtype == torch.float32
            and x.dim() == 3 and x.shape[-1] % 32 == 0 and x.stride(-1) == 1
            and cos.is_contiguous())
