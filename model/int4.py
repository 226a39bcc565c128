"""Int4 weights on CPU: group-wise 4-bit codes, fp32 activations through our kernel.

A weight [out, in] is stored in groups of :data:`GROUP_SIZE` inputs per output row: 4-bit
codes q in 0..15, one scale s and one zero z per group, ``W ≈ (q - 8) * s + z``. The form,
:func:`quantize_int4`, is asymmetric 4 bits per group (``s = (max - min) / 15``,
``z = min + 8 s``): the form of GGUF's ``Q4_1`` (groups of 32, ``w = d q + m``), which it
reproduces exactly from the dequantized values, since Q4_1 maps each group's min to code 0
and its max to code 15.

The matmul is ours, ``ringserve::int4_linear`` (model/csrc/group_linear.cpp, built by
model/cpu_kernels.py), over :class:`KernelInt4`: ``W = d * q + m`` with fp16 d and m (a Q4_1
file's own, so its weights come through exactly), fp32 activations and results, each output
summed in a fixed order (batch-invariant). Where our kernels are not built it is PyTorch's
``_weight_int4pack_mm_for_cpu``, which rounds inputs, outputs, scales and zeros to bf16 (its
AVX-512 BF16 path; fp32 activations there run ~25x slower). Prompt tokens can take a bf16
dense copy of the weight instead (:class:`Int4Projection` ``dense``; faster at prefill
sizes). The model's LM head is not int4 but Q8_0-form int8 (model/q8.py; fbgemm int8 without
our kernels).

Accuracy against the fp32 model (bench/quant_accuracy_bench.py, default model, greedy 32-token
continuations identical of 20, perplexity on 2048 tokens): with our kernels (int4 decoder
projections, Q8_0 head, bf16 dense prompt copies) 20/20, perplexity -0.06%. With PyTorch's
kernels and fbgemm's int8 head: 17/20 on 2026-12-02, 14/20 after the decode attention moved to
per-sequence SDPA and 15/20 with our attention kernel (2026-12-03): bf16 rounding and the int8
head's quantized activations left near-ties to whichever attention rounding came along; with
the fp32 head instead of fbgemm's, 20/20 again. Speed: bench/paged_decode_kernel_bench.py and
bench/README.md.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from model import cpu_kernels
from model.quantization import QuantizationError

GROUP_SIZE = 32  # inputs per scale/zero group: GGUF's Q4_1 / Q8_0 block size
ROW_MULTIPLE = 16  # the packing needs the output dimension in whole tiles of 16 rows
_INNER_K_TILES = 2  # the packing's inner tile count (CPU kernel: any of 2, 4, 8)
INT4_LEVELS = 15


@dataclass(frozen=True)
class Int4Weight:
    """A weight [out, in] as 4-bit codes [out, in] (uint8, 0..15) and per-group fp32 scales
    and zeros [out, in / GROUP_SIZE]: ``W = (codes - 8) * scale + zero`` group by group."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight this stands for, [out, in]."""
        out, in_features = self.codes.shape
        grouped = (self.codes.float() - 8).view(out, in_features // GROUP_SIZE, GROUP_SIZE)
        return (grouped * self.scale[..., None] + self.zero[..., None]).view(out, in_features)


class Int4ShapeError(QuantizationError):
    """A weight whose shape the int4 kernel cannot take (see :func:`check_groupable`)."""


def check_groupable(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise Int4ShapeError (a QuantizationError) unless the weight [out, in] splits into whole
    groups of inputs and whole tiles of rows."""
    if weight.dim() != 2 or weight.shape[1] % GROUP_SIZE or weight.shape[0] % ROW_MULTIPLE:
        raise Int4ShapeError(f"int4 quantization needs a 2-D {name} [out, in] with in a multiple "
                         f"of {GROUP_SIZE} and out a multiple of {ROW_MULTIPLE}; got shape "
                         f"{list(weight.shape)}")


def _groups(weight: torch.Tensor) -> torch.Tensor:
    check_groupable(weight)
    out, in_features = weight.shape
    return weight.float().reshape(out, in_features // GROUP_SIZE, GROUP_SIZE)


def quantize_int4(weight: torch.Tensor) -> Int4Weight:
    """Asymmetric 4-bit groups: code = round((w - min) / s), s = (max - min) / 15 (1 for a
    constant group, whose codes are then 0), zero = min + 8 s."""
    groups = _groups(weight)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scale = (high - low) / INT4_LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, INT4_LEVELS)
    return Int4Weight(codes.to(torch.uint8).reshape(weight.shape).contiguous(),
                      scale.contiguous(), (low + 8 * scale).contiguous())


def concat_rows(parts: Sequence[Int4Weight]) -> Int4Weight:
    """Fuse int4 weights along the output dimension (q/k/v, gate/up)."""
    return Int4Weight(torch.cat([p.codes for p in parts]).contiguous(),
                      torch.cat([p.scale for p in parts]).contiguous(),
                      torch.cat([p.zero for p in parts]).contiguous())


@functools.cache
def int4_kernel_available() -> bool:
    """Whether this torch build has the CPU int4 matmul (and it runs here)."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_weight_int4pack_mm_for_cpu")
            and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")):
        return False
    try:
        probe = Int4Projection(quantize_int4(torch.ones(ROW_MULTIPLE, GROUP_SIZE)))
        probe(torch.ones(1, GROUP_SIZE))
    except RuntimeError:
        return False
    return True


KERNEL_BLOCK = 16  # outputs per block of ringserve::int4_linear's layout


@dataclass(frozen=True)
class KernelInt4:
    """An :class:`Int4Weight` in the layout of our kernel ``ringserve::int4_linear``
    (model/csrc/group_linear.cpp): codes [N / 16, K / 2, 16] uint8 (byte j of block b, input
    pair p: output 16 b + j's codes of inputs 2 p, low nibble, and 2 p + 1, high nibble) and
    d, m [N / 16, K / 32, 16] fp16 with ``W = d * code + m`` (GGUF Q4_1's form: a Q4_1 file's
    fp16 d and m come through exactly)."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    @classmethod
    def pack(cls, weight: Int4Weight) -> KernelInt4:
        out, in_features = weight.codes.shape
        blocks, groups = out // KERNEL_BLOCK, in_features // GROUP_SIZE
        codes = weight.codes.view(blocks, KERNEL_BLOCK, in_features).permute(0, 2, 1)  # [NB, K, 16]
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()  # [NB, K / 2, 16]

        def per_block(t: torch.Tensor) -> torch.Tensor:  # [N, K / G] -> [NB, K / G, 16] fp16
            return t.view(blocks, KERNEL_BLOCK, groups).permute(0, 2, 1).to(
                torch.float16).contiguous()

        return cls(packed, per_block(weight.scale), per_block(weight.zero - 8 * weight.scale))

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K] the kernel computes with (d and m as fp16)."""
        blocks, pairs, _ = self.codes.shape
        out, in_features = blocks * KERNEL_BLOCK, 2 * pairs
        codes = torch.stack((self.codes & 15, self.codes >> 4), dim=2)  # [NB, K / 2, 2, 16]
        codes = codes.reshape(blocks, in_features, KERNEL_BLOCK).permute(0, 2, 1)  # [NB, 16, K]
        codes = codes.reshape(out, in_features // GROUP_SIZE, GROUP_SIZE)

        def per_row(t: torch.Tensor) -> torch.Tensor:  # [NB, K / G, 16] -> [N, K / G, 1]
            return t.permute(0, 2, 1).reshape(out, -1, 1).float()

        return (codes.float() * per_row(self.d) + per_row(self.m)).view(out, in_features)


class PromptRows:
    """Which rows of the step's activations are prompt tokens (set by the model per forward,
    shared by its projections): those go through a projection's bf16 dense copy, if it has
    one. ``rows`` is None (no prompt rows, or no split), a slice, or an index tensor [P]
    (``rest`` then indexes the other rows)."""

    def __init__(self) -> None:
        self.wanted = False  # some projection has a dense copy: worth marking the rows
        self.rows: slice | torch.Tensor | None = None
        self.rest: slice | torch.Tensor | None = None


class Int4Projection(nn.Module):
    """``x @ W_t`` with W as packed int4; x and the result fp32.

    x is rounded to bf16 for the kernel and its bf16 result widened to fp32.

    With ``dense=True`` the projection also keeps W as a bf16 matrix [in, out] and runs the
    rows ``prompt_rows`` names through it (bf16 GEMM, 2-3x the int4 kernel's speed at prefill
    sizes on AVX-512 BF16; 2 bytes per weight more). Generated tokens always take the int4
    kernel, so a sequence's decode does not depend on what else is in the step.
    """

    def __init__(self, weight: Int4Weight, dense: bool = False,
                 prompt_rows: PromptRows | None = None) -> None:
        super().__init__()
        check_groupable(weight.codes)
        self.out_features, self.in_features = weight.codes.shape
        # our kernel where it is built (fp32 in and out); else PyTorch's (bf16 in and out)
        self._kernel = cpu_kernels.int4_linear()
        self._kernel_weight: KernelInt4 | None = None
        self._packed: torch.Tensor | None = None
        self._scales_and_zeros: torch.Tensor | None = None
        if self._kernel is not None:
            self._kernel_weight = KernelInt4.pack(weight)
        else:
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                weight.codes.to(torch.int32), _INNER_K_TILES)
            # [in / G, out, 2]: the kernel's scale-and-zero layout
            self._scales_and_zeros = torch.stack(
                (weight.scale.t(), weight.zero.t()), dim=-1).to(torch.bfloat16).contiguous()
        self.prompt_rows = prompt_rows or PromptRows()
        self._dense_t: torch.Tensor | None = None  # [in, out] bf16
        if dense:
            self._dense_t = weight.dequantize().t().to(torch.bfloat16).contiguous()

    @property
    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(codes, d, m) in our kernel's layout (:class:`KernelInt4`), or None where PyTorch's
        kernel holds the weight."""
        w = self._kernel_weight
        return None if w is None else (w.codes, w.d, w.m)

    @property
    def dense(self) -> bool:
        """Whether prompt rows run through a bf16 dense copy of the weight."""
        return self._dense_t is not None

    def _int4(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_weight is not None:
            assert self._kernel is not None  # set together in __init__
            w = self._kernel_weight
            return self._kernel(x, w.codes, w.d, w.m)
        assert self._packed is not None and self._scales_and_zeros is not None
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self._packed, GROUP_SIZE, self._scales_and_zeros).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, rest = self.prompt_rows.rows, self.prompt_rows.rest
        if self._dense_t is None or rows is None:
            return self._int4(x)
        dense_t = self._dense_t
        if rest is None:  # every row is a prompt token
            return (x.to(torch.bfloat16) @ dense_t).float()
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        out[rows] = (x[rows].to(torch.bfloat16) @ dense_t).float()
        out[rest] = self._int4(x[rest])
        return out

    def extra_repr(self) -> str:
        dense = ", bf16 dense copy for prompt rows" if self.dense else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 groups of {GROUP_SIZE}{dense}")
