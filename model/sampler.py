"""Batched next-token sampler: penalties, temperature, min-p / top-k / top-p, seeded draws.

One call of :func:`sample` picks the next token of every running sequence of an engine step.
The order follows vLLM: penalties (repetition, then frequency and presence) on the raw logits;
greedy rows take the argmax of those; random rows divide by their temperature, drop tokens
with min-p, top-k and top-p (one top-1024 selection, and one full descending sort for the rows
that keep more than that) and draw with the "exponential race" ``argmax(probs / q)``,
``q ~ Exp(1)`` per vocabulary entry. The noise of a seeded row comes from that row's own
generator alone, so its tokens do not depend on which other rows share the batch.
Log-probabilities are always those of the raw (unpenalized, untempered) distribution, as
OpenAI reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.requests import TokenLogprob
from model.sampling_params import SamplingParams

# Temperatures below this are divided as if they were this, so logits / T stays finite.
_MIN_TEMPERATURE = 1e-5
# Filtering first looks at this many most likely tokens per row (see _apply_filters).
_CANDIDATES = 1024


@dataclass(frozen=True)
class SamplingRow:
    """One sequence's row of the batch: how to sample it and what it has produced so far."""

    params: SamplingParams
    # Owned by the caller and kept for the request's lifetime (see make_generator); None draws
    # from a fresh, unseeded generator each step. Best on the logits' device; another device
    # works (the draw is copied over) at the cost of one small copy per step.
    generator: torch.Generator | None = None
    output_token_ids: Sequence[int] = ()  # generated so far: presence / frequency penalties
    prompt_token_ids: Sequence[int] = ()  # with the output: repetition penalty


@dataclass(frozen=True)
class SamplerOutput:
    """The chosen token of every row, in row order, with log-probabilities when requested."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None where params.logprobs is None
    top_logprobs: list[tuple[TokenLogprob, ...]] = field(default_factory=list)  # most likely first


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one sequence: seeded from ``params.seed``, else from OS entropy."""
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
    """Pick one token per row of ``logits`` [B, V] (float32, not modified)."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [B, V] with B = len(rows); got {tuple(logits.shape)}")
    batch, vocab = logits.shape
    device = logits.device
    if batch == 0:
        return SamplerOutput(token_ids=[], logprobs=[], top_logprobs=[])

    penalized = apply_penalties(logits, rows)  # [B, V]
    token_ids = torch.empty(batch, dtype=torch.long, device=device)  # [B]

    greedy = [i for i, row in enumerate(rows) if row.params.greedy]
    if len(greedy) == batch:  # no index copy of the logits (a parallel gather of B x V)
        token_ids = penalized.argmax(dim=-1)
    elif greedy:
        greedy_idx = torch.tensor(greedy, device=device)  # [G]
        token_ids[greedy_idx] = penalized[greedy_idx].argmax(dim=-1)

    random = [i for i, row in enumerate(rows) if not row.params.greedy]
    if random:
        random_idx = torch.tensor(random, device=device)  # [R]
        random_rows = [rows[i] for i in random]
        temperature = torch.tensor(
            [max(row.params.temperature, _MIN_TEMPERATURE) for row in random_rows],
            dtype=logits.dtype,
            device=device,
        )  # [R]
        scaled = penalized[random_idx] / temperature[:, None]  # [R, V] (a copy)
        _apply_filters(scaled, random_rows)
        probs = torch.softmax(scaled, dim=-1)  # [R, V]
        noise = _exponential_noise(random_rows, vocab, device)  # [R, V]
        token_ids[random_idx] = (probs / noise).argmax(dim=-1)

    chosen = token_ids.tolist()
    logprobs, top_logprobs = _logprobs(logits, rows, token_ids)
    return SamplerOutput(token_ids=chosen, logprobs=logprobs, top_logprobs=top_logprobs)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition (HF), then frequency and presence (OpenAI) penalties on ``logits`` [B, V].

    Returns a new tensor, or ``logits`` itself when no row has a penalty.

    Token ids of the penalized rows go into padded index tensors whose padding points at an
    extra column V, so counts and masks come from one scatter each, never a loop over tokens.
    """
    penalized_rows = [
        i
        for i, row in enumerate(rows)
        if row.params.repetition_penalty != 1.0
        or row.params.frequency_penalty != 0.0
        or row.params.presence_penalty != 0.0
    ]
    if not penalized_rows:
        return logits
    vocab = logits.shape[1]
    device = logits.device
    sub = [rows[i] for i in penalized_rows]
    idx = torch.tensor(penalized_rows, device=device)  # [P]
    x = logits[idx]  # [P, V] (a copy)

    rep = torch.tensor([r.params.repetition_penalty for r in sub], dtype=x.dtype, device=device)
    if bool((rep != 1.0).any()):
        # Rows without a repetition penalty contribute no ids, so their prompts are not copied.
        seen_ids = _padded(
            [
                [*r.prompt_token_ids, *r.output_token_ids]
                if r.params.repetition_penalty != 1.0
                else []
                for r in sub
            ],
            pad=vocab,
            device=device,
        )  # [P, Ls]
        seen = torch.zeros(len(sub), vocab + 1, dtype=torch.bool, device=device)  # [P, V+1]
        seen.scatter_(1, seen_ids, True)
        seen = seen[:, :vocab]  # [P, V]
        rep_b = rep[:, None].expand_as(x)  # [P, V]
        x = torch.where(seen, torch.where(x > 0, x / rep_b, x * rep_b), x)

    freq = torch.tensor([r.params.frequency_penalty for r in sub], dtype=x.dtype, device=device)
    pres = torch.tensor([r.params.presence_penalty for r in sub], dtype=x.dtype, device=device)
    if bool((freq != 0.0).any() or (pres != 0.0).any()):
        out_ids = _padded([list(r.output_token_ids) for r in sub], pad=vocab, device=device)
        counts = torch.zeros(len(sub), vocab + 1, dtype=x.dtype, device=device)  # [P, V+1]
        counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=x.dtype))
        counts = counts[:, :vocab]  # [P, V]
        x = x - freq[:, None] * counts - pres[:, None] * (counts > 0).to(x.dtype)

    out = logits.clone()  # [B, V]
    out[idx] = x
    return out


def _padded(ids: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Ragged id lists as one [N, Lmax] long tensor (at least one column), padded with ``pad``."""
    width = max(1, max(len(row) for row in ids))
    return torch.tensor(
        [row + [pad] * (width - len(row)) for row in ids], dtype=torch.long, device=device
    )


def _apply_filters(scaled: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Set to -inf, in place, the tokens that min-p, top-k or top-p drop from ``scaled`` [R, V].

    All three keep a prefix of the tokens sorted by logit (the most likely token always
    stays), so the rows that filter share one descending sort. Real distributions keep far
    fewer than V tokens, so that sort is first a top-``_CANDIDATES`` selection; only rows whose
    kept prefix may run past it are sorted in full.
    """
    vocab = scaled.shape[1]
    filtered = [
        i
        for i, row in enumerate(rows)
        if 0 < row.params.top_k < vocab or row.params.top_p < 1.0 or row.params.min_p > 0.0
    ]
    if not filtered:
        return
    device = scaled.device
    idx = torch.tensor(filtered, device=device)  # [F]
    x = scaled[idx]  # [F, V]
    cut = _Cutoffs.of([rows[i].params for i in filtered], vocab, x.dtype, device)

    width = min(vocab, _CANDIDATES)
    top_vals, top_ids = x.topk(width, dim=-1)  # [F, K] each, descending
    drop, complete = _drop_sorted(x, top_vals, cut)  # [F, K], [F]
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(1, top_ids, ~drop)  # [F, V]

    if not bool(complete.all()):
        rest = (~complete).nonzero()[:, 0]  # [F'] rows whose kept prefix may pass K
        sorted_vals, order = x[rest].sort(dim=-1, descending=True)  # [F', V] each
        drop_rest, _ = _drop_sorted(x[rest], sorted_vals, cut.select(rest))  # [F', V]
        keep[rest] = torch.zeros_like(drop_rest).scatter_(1, order, ~drop_rest)

    scaled[idx] = x.masked_fill(~keep, float("-inf"))


@dataclass(frozen=True)
class _Cutoffs:
    """The filter parameters of F rows as [F, 1] tensors; switched-off filters keep all."""

    log_min_p: torch.Tensor  # [F, 1]; log 0 = -inf keeps all
    top_k: torch.Tensor  # [F, 1]; V when off
    top_p: torch.Tensor  # [F, 1]; 1 when off

    @staticmethod
    def of(
        params: Sequence[SamplingParams], vocab: int, dtype: torch.dtype, device: torch.device
    ) -> _Cutoffs:
        def column(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        return _Cutoffs(
            log_min_p=column([p.min_p for p in params], dtype).log(),
            top_k=column([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long),
            top_p=column([p.top_p for p in params], dtype),
        )

    def select(self, rows: torch.Tensor) -> _Cutoffs:
        return _Cutoffs(self.log_min_p[rows], self.top_k[rows], self.top_p[rows])


def _drop_sorted(
    x: torch.Tensor, sorted_vals: torch.Tensor, cut: _Cutoffs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the K largest logits ``sorted_vals`` [F, K] (of ``x`` [F, V]) the filters drop.

    Order as vLLM: min-p keeps p >= min_p * p_max, i.e. logit >= max + log(min_p); top-k keeps
    the first k; top-p then keeps the shortest prefix whose mass, renormalized over what min-p
    and top-k kept, reaches top_p (a token stays while the mass before it is < top_p).
    Returns the drop mask [F, K] and, per row, whether the kept prefix ends within the K
    (always so when K = V); the mask of an incomplete row means nothing.
    """
    width, vocab = sorted_vals.shape[1], x.shape[1]
    max_logit = sorted_vals[:, :1]  # [F, 1]
    floor = max_logit + cut.log_min_p  # [F, 1]
    rank = torch.arange(width, device=x.device)[None, :]  # [1, K]
    drop = (sorted_vals < floor) | (rank >= cut.top_k)  # [F, K]

    weights = torch.exp(sorted_vals - max_logit).masked_fill(drop, 0.0)  # [F, K]
    mass = weights.sum(dim=-1, keepdim=True)  # [F, 1]
    # within: min-p and top-k keep nothing past the K, so mass is their kept set's mass.
    within = drop[:, -1:] | (cut.top_k <= width)  # [F, 1]
    known = within  # [F, 1]: is mass right?
    if not bool(within.all()):
        # Past the K only min-p cuts when top-k is off, so the mass is a sum over the row;
        # a top-k between K and V needs the full sort.
        row_mass = torch.exp(x - max_logit).masked_fill(x < floor, 0.0).sum(-1, keepdim=True)
        mass = torch.where(within, mass, row_mass)
        known = within | (cut.top_k >= vocab)

    probs = weights / mass  # [F, K]
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [F, K]
    drop |= (mass_before >= cut.top_p) & (cut.top_p < 1.0)
    drop[:, 0] = False
    complete = (known & (within | drop[:, -1:]))[:, 0]  # [F]
    return drop, complete


def _exponential_noise(
    rows: Sequence[SamplingRow], vocab: int, device: torch.device
) -> torch.Tensor:
    """Exp(1) noise [R, V] as -log(U): seeded rows from their own generator, the rest fresh.

    (-log of torch.rand is ~3x faster on CPU than Tensor.exponential_.)
    """
    uniform = torch.empty(len(rows), vocab, device=device)  # [R, V]
    unseeded = []
    for i, row in enumerate(rows):
        if row.generator is None:
            unseeded.append(i)
        elif row.generator.device == uniform.device:
            torch.rand(vocab, generator=row.generator, device=device, out=uniform[i])
        else:  # e.g. a CPU generator for CUDA logits: draw where the generator lives
            g = row.generator
            uniform[i].copy_(torch.rand(vocab, generator=g, device=g.device))
    if unseeded:
        fresh = torch.Generator(device=device)
        fresh.seed()
        uniform[unseeded] = torch.rand(len(unseeded), vocab, generator=fresh, device=device)
    # U in [0, 1) gives noise in (0, inf]: an infinite q only removes that one token's chance
    # (2**-24). The floor guards a backend whose U reaches 1, where q = 0 would make a dropped
    # token's 0 / q a NaN that argmax would pick.
    return uniform.log_().neg_().clamp_min_(torch.finfo(uniform.dtype).tiny)


def _logprobs(
    logits: torch.Tensor, rows: Sequence[SamplingRow], token_ids: torch.Tensor
) -> tuple[list[TokenLogprob | None], list[tuple[TokenLogprob, ...]]]:
    """Chosen-token and top-k log-probabilities of the raw distribution, for rows that ask."""
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    top: list[tuple[TokenLogprob, ...]] = [() for _ in rows]
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return logprobs, top
    idx = torch.tensor(wanted, device=logits.device)  # [L]
    log_probs = torch.log_softmax(logits[idx].float(), dim=-1)  # [L, V]
    chosen_ids = token_ids[idx]  # [L]
    chosen = log_probs.gather(1, chosen_ids[:, None])[:, 0].tolist()
    k_max = max(rows[i].params.logprobs or 0 for i in wanted)
    k_max = min(k_max, logits.shape[1])
    top_vals, top_ids = log_probs.topk(k_max, dim=-1)  # [L, k_max] each, descending
    top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
    for j, (i, token) in enumerate(zip(wanted, chosen_ids.tolist(), strict=True)):
        logprobs[i] = TokenLogprob(token_id=token, logprob=chosen[j])
        k = min(rows[i].params.logprobs or 0, k_max)
        top[i] = tuple(
            TokenLogprob(token_id=t, logprob=v)
            for t, v in zip(top_ids_l[j][:k], top_vals_l[j][:k], strict=True)
        )
    return logprobs, top
