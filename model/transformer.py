"""The Mistral-family decoder: RMSNorm, rotary, grouped-query sliding-window attention, SwiGLU.

The model knows nothing of requests: a forward pass takes flat token ids and, per sequence, a
:class:`~model.paged_cache.PagedChunk` (its block table, the position of its first token, how
many tokens) against the paged cache the engine uses, or a :class:`SequenceChunk` (a slot)
against the slot pool of :mod:`model.kv_cache`, the design the paged cache is measured and
tested against.
Sequences with one token and a cache are decodes and run batched; longer chunks are
prefills that attend to their cached window plus themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model import cpu_kernels, int4, q8
from model.attention import decode_attention, decode_attention_per_slot, prefill_attention
from model.config import ModelConfig
from model.kv_cache import (
    CachePlan,
    DecodePlan,
    KVCachePool,
    PrefillPlan,
    SequenceChunk,
    plan_cache_access,
)
from model.paged_cache import (
    PagedChunk,
    PagedDecode,
    PagedKVCache,
    PagedPlan,
    paged_layer_attention,
    plan_paged_access,
)
from model.quantization import (
    INT8_PLANES,
    Int8Projection,
    Int8Weight,
    Quantization,
    QuantizationError,
    concat_rows,
    quantize_planes,
)
from model.rope import RotaryEmbedding, apply_rotary

_UNKNOWN = object()  # a DecoderLayer's fused weights before its first decode step


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the halves of a [N, 2 I] gate/up result -> [N, I].

    On CPU in fp32 one ``ringserve::silu_mul`` call (the code the fused decode layer runs)
    where the kernels are built; else one new [N, I] buffer (silu's) multiplied in place (an
    in-place silu on the strided half-view measured slower at batch 1).
    """
    if (not gate_up.is_cuda and gate_up.dtype == torch.float32 and gate_up.dim() == 2
            and gate_up.shape[-1] % 32 == 0 and gate_up.stride(-1) == 1):
        kernel = cpu_kernels.silu_mul()
        if kernel is not None:
            return kernel(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 as the reference implementation does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if not x.is_cuda and x.dim() == 2 and x.shape[-1] % 16 == 0:
                # ours (the code the fused decode layer runs): ~1 us where F.rms_norm's CPU
                # form is five ops, ~13 us at batch 1
                kernel = cpu_kernels.rms_norm()
                if kernel is not None:
                    return kernel(x, self.weight, self.eps)
            # one fused kernel, weight included, no dtype round trip
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Projection(nn.Module):
    """A bias-free linear layer whose weight is stored input-major: ``weight_t`` [in, out].

    ``x @ weight_t`` streams the weight row by row, which on CPU runs the batch-1 decode
    matmuls (matrix-vector products, memory-bound) ~1.6x faster than ``F.linear`` over the
    usual [out, in] layout, and costs the same for larger batches (bench/decode_bench.py).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t  # [N, in] @ [in, out] -> [N, out]


class DecoderLayer(nn.Module):
    """Pre-norm attention block and SwiGLU block; q/k/v and gate/up projections are fused.

    A decode-only step on CPU with int4 projections on our kernel runs the whole layer as one
    ``ringserve::decode_layer`` call (``fuse_decode``; False runs the same kernels op by op,
    for benchmarks: the results are the same bit for bit).
    """

    fuse_decode = True

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        hidden = config.hidden_size
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.qkv_proj = Projection(hidden, config.q_size + 2 * config.kv_size)
        self.o_proj = Projection(config.q_size, hidden)
        self.gate_up_proj = Projection(hidden, 2 * config.intermediate_size)
        self.down_proj = Projection(config.intermediate_size, hidden)
        # fused_weights() once the weights are final (the loaders replace the projections)
        self._fused: tuple[list[torch.Tensor], ...] | None | object = _UNKNOWN

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                plan: CachePlan | PagedPlan | None, cache: KVCachePool | PagedKVCache | None
                ) -> torch.Tensor:
        """x: [N, hidden] for all chunks' tokens, concatenated in chunk order."""
        if (self.fuse_decode and isinstance(plan, PagedPlan) and plan.decode is not None
                and plan.decode.covers_batch and x.dtype == torch.float32 and not x.is_cuda):
            assert isinstance(cache, PagedKVCache)
            fused = self._fused_decode(x, cos, sin, plan.decode, cache)
            if fused is not None:
                return fused
        cfg = self.config
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(x))  # [N, (H + 2 KVH) D]
        qk, v = qkv.split([cfg.q_size + cfg.kv_size, cfg.kv_size], dim=-1)
        # q and k rotate together: [N, H + KVH, D]
        qk = apply_rotary(qk.view(num_tokens, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim),
                          cos, sin)
        q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)  # [N, H, D], [N, KVH, D]
        v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)  # [N, KVH, D]
        attn = self._attention(q, k, v, plan, cache)  # [N, H, D]
        x = self.o_proj(attn.reshape(num_tokens, cfg.q_size)).add_(x)  # residual
        gate_up = self.gate_up_proj(self.post_attention_layernorm(x))  # [N, 2 I]
        return self.down_proj(swiglu(gate_up)).add_(x)

    def fused_weights(self) -> tuple[list[torch.Tensor], ...] | None:
        """The int4 kernel weights of (q/k/v, o, gate/up, down) when every projection has them
        and the layer's shapes suit ``ringserve::decode_layer``; else None."""
        cfg = self.config
        projections = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
        weights = [p.kernel_weights if isinstance(p, int4.Int4Projection) else None
                   for p in projections]
        norms = (self.input_layernorm.weight, self.post_attention_layernorm.weight)
        if (any(w is None for w in weights) or cfg.head_dim % 32 or cfg.hidden_size % 16
                or cfg.intermediate_size % 16
                or any(n.dtype != torch.float32 or n.is_cuda for n in norms)):
            return None
        return tuple(list(w) for w in weights if w is not None)

    def _fused_decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      decode: PagedDecode, cache: PagedKVCache) -> torch.Tensor | None:
        """A decode-only step's layer in one ``ringserve::decode_layer`` call (CPU, fp32, int4
        projections on our kernel, paged cache); None where it does not apply. Its result is
        bit for bit the one the layer's ops give one by one (the same kernels)."""
        kernel = cpu_kernels.decode_layer()
        if kernel is None:
            return None
        if self._fused is _UNKNOWN:
            self._fused = self.fused_weights()
        weights = self._fused
        if not isinstance(weights, tuple) or not cos.is_contiguous():
            return None
        qkv, o, gate_up, down = weights
        k_rows, v_rows = cache.rows(self.layer_index)
        bounds, offsets = decode.run_table
        return kernel(x, self.input_layernorm.weight, self.post_attention_layernorm.weight,
                      self.input_layernorm.eps, qkv, o, gate_up, down, cos, sin, k_rows, v_rows,
                      decode.write_rows, bounds, offsets, self.config.num_heads,
                      1.0 / math.sqrt(self.config.head_dim))

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   plan: CachePlan | PagedPlan | None, cache: KVCachePool | PagedKVCache | None
                   ) -> torch.Tensor:
        window = self.config.sliding_window
        if plan is None:  # no cache: one fresh sequence attends to itself
            return prefill_attention(q, k, v, 0, window)
        if isinstance(plan, PagedPlan):
            assert isinstance(cache, PagedKVCache)
            return paged_layer_attention(q, k, v, plan, cache, self.layer_index, window)
        assert isinstance(cache, KVCachePool)
        k_cache, v_cache = cache.k[self.layer_index], cache.v[self.layer_index]
        decode = plan.decode
        if decode is not None and decode.covers_batch:
            return self._decode(q, k, v, decode, k_cache, v_cache)
        out = torch.empty_like(q)  # [N, H, D]
        for prefill in plan.prefills:
            lo, hi = prefill.token_lo, prefill.token_hi
            out[lo:hi] = self._prefill(q[lo:hi], k[lo:hi], v[lo:hi], prefill, k_cache, v_cache,
                                       window)
        if decode is not None:
            index = decode.token_index
            out[index] = self._decode(q[index], k[index], v[index], decode, k_cache, v_cache)
        return out

    @staticmethod
    def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None
                 ) -> torch.Tensor:
        """A chunk attends to its visible cached history plus itself, then is cached."""
        slot = plan.chunk.slot
        if plan.history_rows is not None:
            k_hist = k_cache[slot][:, plan.history_rows].transpose(0, 1)  # [hist, KVH, D]
            v_hist = v_cache[slot][:, plan.history_rows].transpose(0, 1)
            keys, values = torch.cat((k_hist, k)), torch.cat((v_hist, v))
        else:
            keys, values = k, v
        out = prefill_attention(q, keys, values, plan.chunk.start_pos, window)
        keep = plan.write_rows.numel()
        k_cache[slot][:, plan.write_rows] = k[-keep:].transpose(0, 1)  # [KVH, keep, D]
        v_cache[slot][:, plan.write_rows] = v[-keep:].transpose(0, 1)
        return out

    @staticmethod
    def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: DecodePlan,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Batched single-token steps: write each new K/V at pos % W, attend to valid rows."""
        k_cache[plan.slots, :, plan.write_rows] = k  # k: [B, KVH, D]
        v_cache[plan.slots, :, plan.write_rows] = v
        if not k_cache.is_cuda:  # CPU: each sequence's valid rows in place, no padded gather
            return decode_attention_per_slot(q, k_cache, v_cache, plan.slot_ids,
                                             plan.valid_lens)
        length = plan.valid.shape[1]
        if plan.slot_range is not None:  # consecutive slots: a view, no gather copy
            first, last = plan.slot_range
            k_seq = k_cache[first:last, :, :length]  # [B, KVH, L, D]
            v_seq = v_cache[first:last, :, :length]
        else:
            k_seq = k_cache[plan.slots, :, :length]
            v_seq = v_cache[plan.slots, :, :length]
        return decode_attention(q, k_seq, v_seq, plan.valid)


class Transformer(nn.Module):
    """Embedding, decoder layers, final norm and (tied or untied) output projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # _weight skips the random init (slow on a large vocab); weights are assigned on load
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size,
                                                             config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Projection(config.hidden_size, config.vocab_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        # which rows of a step are prompt tokens, for int4 projections with a dense copy
        self.prompt_rows = int4.PromptRows()
        self.requires_grad_(False)

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: Mapping[str, torch.Tensor],
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     quantization: Quantization = "none",
                     scales: Mapping[str, torch.Tensor] | None = None,
                     zeros: Mapping[str, torch.Tensor] | None = None,
                     dense_prefill: bool = False) -> Transformer:
        """Build from canonical (HF-layout) tensors, fusing q/k/v and gate/up projections.

        Projection weights are stored transposed (see :class:`Projection`); a tied output
        layer therefore gets its own transposed copy of the embedding. With
        ``quantization="int8"`` (or ``"int8x2"``: two int8 planes per weight) every
        projection and the LM head is an :class:`~model.quantization.Int8Projection` (CPU,
        fp32 activations); tensors already int8 (their row scales in ``scales``, as
        ``load_weights`` returns them) are used as they are under int8, fp32 ones are
        quantized here. Unquantized, int8 inputs are dequantized. ``quantization="int4"``
        makes every projection an :class:`~model.int4.Int4Projection` (4-bit groups, as loaded
        when ``zeros`` holds the weight's group zeros, else quantized here); its LM head is
        Q8_0-form int8 through our kernel (:class:`~model.q8.Q8Projection`, fp32 activations
        and logits; a Q8_0 embedding's own weights), or where our kernels are not built
        fbgemm's int8 (:class:`~model.quantization.Int8Projection`, one plane, fp32 output):
        an int4 head's bf16 logits moved greedy near-ties (bench/quant_accuracy_bench.py,
        model/int4.py has the figures). ``dense_prefill`` (int4 only)
        gives every decoder projection a bf16 dense copy for prompt tokens (see
        :class:`~model.int4.Int4Projection`).
        """
        scales, zeros = scales or {}, zeros or {}
        planes = INT8_PLANES.get(quantization, 0)
        if (planes or quantization == "int4") and (torch.device(device).type != "cpu"
                                                   or dtype != torch.float32):
            raise QuantizationError(f"{quantization} projections run on CPU with float32 "
                                    "activations")
        model = cls(config)  # parameters are uninitialized (torch.empty) until assigned below

        def fp32(name: str) -> torch.Tensor:
            if name in zeros:
                return int4.Int4Weight(tensors[name], scales[name], zeros[name]).dequantize()
            if name in scales:
                return Int8Weight(tensors[name], scales[name]).dequantize()
            return tensors[name]

        def int8(name: str) -> list[Int8Weight]:
            if name in scales:  # one plane as loaded; further planes need the fp32 weight
                if planes > 1:
                    raise QuantizationError(f"{quantization} needs float32 weights to build "
                                            f"its planes; {name} is already int8")
                return [Int8Weight(tensors[name], scales[name])]
            return quantize_planes(tensors[name], planes)

        fused = fused_projections(config, tied="lm_head.weight" not in tensors)
        state: dict[str, torch.Tensor] = {
            "embed_tokens.weight": fp32("embed_tokens.weight"),
            "norm.weight": tensors["norm.weight"],
        }
        for i in range(config.num_layers):
            p = f"layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                state[p + norm + ".weight"] = tensors[p + norm + ".weight"]
        for module_name, parts in fused.items():
            if quantization == "int4":
                projection: nn.Module
                if module_name == "lm_head":  # int8, fp32 logits: see the docstring
                    head = fp32(parts[0])
                    projection = (q8.Q8Projection(head) if q8.q8_supported(head)
                                  else Int8Projection(quantize_planes(head, 1)))
                else:
                    projection = int4.Int4Projection(int4.concat_rows([
                        int4.Int4Weight(tensors[n], scales[n], zeros[n]) if n in zeros
                        else int4.quantize_int4(fp32(n)) for n in parts]),
                        dense=dense_prefill, prompt_rows=model.prompt_rows)
                model.set_submodule(module_name, projection)
            elif planes:
                per_part = [int8(n) for n in parts]  # [part][plane]
                model.set_submodule(module_name, Int8Projection(
                    [concat_rows([p[k] for p in per_part]) for k in range(planes)]))
            else:
                weights = [fp32(n) for n in parts]
                state[module_name + ".weight_t"] = (weights[0] if len(weights) == 1
                                                    else torch.cat(weights)).T
        state = {name: t.to(device=device, dtype=dtype).contiguous()
                 for name, t in state.items()}
        model.load_state_dict(state, assign=True)
        model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, device=device)
        model.prompt_rows.wanted = quantization == "int4" and dense_prefill
        model.eval()
        return model

    def _mark_prompt_rows(self, chunks: Sequence[SequenceChunk | PagedChunk]) -> None:
        """Tell the projections which rows are prompt tokens (a slice when they are one
        run, as the scheduler's decode-first order makes them)."""
        split = self.prompt_rows
        split.rows = split.rest = None
        if not split.wanted:
            return
        mask = prompt_row_mask(chunks)
        if not any(mask):  # a decode step
            return
        if all(mask):
            split.rows = slice(None)
            return
        first = mask.index(True)
        if all(mask[first:]) and not any(mask[:first]):  # decodes, then prompt chunks
            split.rows, split.rest = slice(first, None), slice(0, first)
            return
        device = self.device
        split.rows = torch.tensor([i for i, m in enumerate(mask) if m], device=device)
        split.rest = torch.tensor([i for i, m in enumerate(mask) if not m], device=device)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (and of the KV cache the engine allocates for them)."""
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device holding the weights."""
        return self.embed_tokens.weight.device

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, chunks: Sequence[SequenceChunk | PagedChunk],
                cache: KVCachePool | PagedKVCache | None = None, all_logits: bool = False
                ) -> torch.Tensor:
        """Run chunks of several sequences in one pass.

        token_ids: [N] flat, chunk after chunk. Returns logits [len(chunks), V] for each chunk's
        last token, or [N, V] for every token when ``all_logits``.
        """
        if all(c.num_tokens == 1 for c in chunks):  # a decode step: one position each
            position_list = [c.start_pos for c in chunks]
        else:
            position_list = [p for c in chunks for p in range(c.start_pos,
                                                               c.start_pos + c.num_tokens)]
        if len(position_list) != token_ids.numel():
            raise ValueError("token_ids and chunks disagree on the number of tokens")
        positions = torch.tensor(position_list, device=token_ids.device)  # [N]
        cos, sin = self.rotary.cos_sin(positions, self.dtype,
                                       max(position_list, default=0))  # [N, 1, D]
        plan: CachePlan | PagedPlan | None
        if cache is None:
            if len(chunks) != 1 or chunks[0].start_pos != 0:
                raise ValueError("without a KV cache, run one sequence from position 0")
            plan = None
        elif isinstance(cache, PagedKVCache):
            paged = [c for c in chunks if isinstance(c, PagedChunk)]
            if len(paged) != len(chunks):
                raise TypeError("a paged cache takes PagedChunk chunks (block tables)")
            plan = plan_paged_access(paged, cache.block_size, cache.table_len,
                                     self.config.sliding_window, token_ids.device)
        else:
            slotted = [c for c in chunks if isinstance(c, SequenceChunk)]
            if len(slotted) != len(chunks):
                raise TypeError("a slot cache takes SequenceChunk chunks (slots)")
            plan = plan_cache_access(slotted, cache.buffer_len, self.config.sliding_window,
                                     token_ids.device)
        x = self.embed_tokens(token_ids)  # [N, hidden]
        self._mark_prompt_rows(chunks)
        try:
            for layer in self.layers:
                x = layer(x, cos, sin, plan, cache)
        finally:
            self.prompt_rows.rows = self.prompt_rows.rest = None
        if not all_logits and len(chunks) != x.shape[0]:  # some chunk has several tokens
            last = torch.tensor(list(_cumulative_ends(chunks)), device=x.device) - 1
            x = x[last]  # [num_chunks, hidden]
        return self.lm_head(self.norm(x)).float()


def prompt_row_mask(chunks: Sequence[SequenceChunk | PagedChunk]) -> list[bool]:
    """Per token row of a step, whether it is a prompt token: the chunk's positions below
    its ``prompt_len``; a chunk without one counts as prompt when it has several tokens or
    starts at 0 (a decode is one token past the start)."""
    mask: list[bool] = []
    for c in chunks:
        if c.prompt_len is None:
            mask.extend([c.num_tokens > 1 or c.start_pos == 0] * c.num_tokens)
        else:
            inside = max(0, min(c.num_tokens, c.prompt_len - c.start_pos))
            mask.extend([True] * inside + [False] * (c.num_tokens - inside))
    return mask


def fused_projections(config: ModelConfig, tied: bool) -> dict[str, list[str]]:
    """Each projection module -> the canonical weights it fuses, in output-row order (a tied
    LM head reads the embedding)."""
    fused: dict[str, list[str]] = {
        "lm_head": ["embed_tokens.weight" if tied else "lm_head.weight"]}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        fused[p + "qkv_proj"] = [p + f"self_attn.{n}_proj.weight" for n in ("q", "k", "v")]
        fused[p + "o_proj"] = [p + "self_attn.o_proj.weight"]
        fused[p + "gate_up_proj"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        fused[p + "down_proj"] = [p + "mlp.down_proj.weight"]
    return fused


def _cumulative_ends(chunks: Sequence[SequenceChunk | PagedChunk]) -> list[int]:
    ends, total = [], 0
    for chunk in chunks:
        total += chunk.num_tokens
        ends.append(total)
    return ends
