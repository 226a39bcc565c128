"""Q8_0-form int8 weights on CPU: groups of 32 inputs, one fp16 scale each, fp32 activations.

``W = d * code`` per output row and group of 32 inputs, code in -127..127: GGUF's Q8_0 form
(the embedded default model's tied embedding and LM head are Q8_0). Quantizing the fp32
values of a Q8_0 tensor again gives back its own codes and scales exactly (each group's
largest code is +-127, so ``d = max|w| / 127`` is the stored d), so the LM head built from the
dequantized embedding computes what the file holds. The matmul is our kernel
``ringserve::q8_linear`` (model/csrc/group_linear.cpp): fp32 in and out, a fixed summation
order per output, so logits do not depend on the batch; it replaced an fbgemm int8 head whose
dynamically quantized activations were the last source of greedy flips against fp32
(bench/quant_accuracy_bench.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model import cpu_kernels
from model.int4 import GROUP_SIZE  # GGUF's block size, Q8_0's as Q4_1's
from model.int4 import KERNEL_BLOCK as BLOCK  # outputs per block, both kernels' layout

Q8_LEVELS = 127


@dataclass(frozen=True)
class Q8Weight:
    """A weight [N, K] in the kernel's layout: codes [N / 16, K, 16] int8 (block b, input k,
    byte j: output 16 b + j) and d [N / 16, K / 32, 16] fp16."""

    codes: torch.Tensor
    d: torch.Tensor

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Q8Weight:
        """Groups of 32 inputs per output row: d = max|w| / 127 (as fp16), code = round(w / d)."""
        out, in_features = weight.shape
        if out % BLOCK or in_features % GROUP_SIZE:
            raise ValueError(f"q8 needs [out, in] with out a multiple of {BLOCK} and in of "
                             f"{GROUP_SIZE}; got {list(weight.shape)}")
        groups = weight.float().reshape(out, in_features // GROUP_SIZE, GROUP_SIZE)
        d = (groups.abs().amax(dim=2) / Q8_LEVELS).to(torch.float16)  # [N, K / G]
        d_fp32 = d.float()
        safe = torch.where(d_fp32 > 0, d_fp32, torch.ones_like(d_fp32))
        codes = torch.round(groups / safe[..., None]).clamp_(-Q8_LEVELS, Q8_LEVELS)
        codes = codes.to(torch.int8).reshape(out // BLOCK, BLOCK, in_features)
        blocks = out // BLOCK
        return cls(codes.permute(0, 2, 1).contiguous(),  # [NB, K, 16]
                   d.view(blocks, BLOCK, -1).permute(0, 2, 1).contiguous())  # [NB, K / G, 16]

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K] this stands for."""
        blocks, in_features, _ = self.codes.shape
        codes = self.codes.permute(0, 2, 1).reshape(blocks * BLOCK, in_features).float()
        d = self.d.permute(0, 2, 1).reshape(blocks * BLOCK, -1).float()
        return (codes.view(codes.shape[0], -1, GROUP_SIZE) * d[..., None]).view(codes.shape)


def q8_supported(weight: torch.Tensor) -> bool:
    """Whether the kernel is built here and takes this weight's shape."""
    return (weight.dim() == 2 and weight.shape[0] % BLOCK == 0
            and weight.shape[1] % GROUP_SIZE == 0 and cpu_kernels.q8_linear() is not None)


class Q8Projection(nn.Module):
    """``x @ W_t`` with W as Q8_0-form groups; x and the result fp32 (CPU)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        kernel = cpu_kernels.q8_linear()
        if kernel is None:
            raise RuntimeError("the q8 kernel is not built here (model/cpu_kernels.py)")
        self._kernel = kernel
        self.out_features, self.in_features = weight.shape
        self.weight = Q8Weight.quantize(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # the kernel makes it contiguous
        out = self._kernel(flat, self.weight.codes, self.weight.d)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"Q8_0 groups of {GROUP_SIZE}")
