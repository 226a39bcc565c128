"""The batched sampler: greedy, filters, distribution, seeds, penalties, log-probabilities."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from model import sampler
from model.sampler import SamplingRow, apply_penalties, make_generator, sample
from model.sampling_params import SamplingParams

# Probabilities with a known order: min_p, top_k and top_p cut predictable prefixes of it.
PROBS = [0.4, 0.3, 0.15, 0.1, 0.05]


def _logits(probs: list[float], perm: list[int] | None = None) -> torch.Tensor:
    """[V] logits whose softmax is ``probs``, optionally permuted so order != vocab id."""
    x = torch.tensor(probs).log()
    return x if perm is None else x[torch.tensor(perm)]


def _draw_many(params: SamplingParams, logits: torch.Tensor, n: int, seed: int = 0) -> list[int]:
    """n draws from one [V] row: n identical rows sharing one seeded generator, one call."""
    g = make_generator(SamplingParams(seed=seed))
    rows = [SamplingRow(params=params, generator=g)] * n
    return sample(logits[None, :].expand(n, -1).contiguous(), rows).token_ids


def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    out = sample(logits, [SamplingRow(SamplingParams(temperature=0.0))] * 6)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6 and out.top_logprobs == [()] * 6


def test_input_logits_are_not_modified() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    before = logits.clone()
    params = SamplingParams(
        temperature=0.7,
        top_k=5,
        top_p=0.8,
        min_p=0.1,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.5,
    )
    sample(logits, [SamplingRow(params, output_token_ids=[1, 2, 2], prompt_token_ids=[3])] * 3)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature: float) -> None:
    logits = torch.randn(16, 200, generator=torch.Generator().manual_seed(3))
    rows = [SamplingRow(SamplingParams(temperature=temperature, top_k=1))] * 16
    assert sample(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_is_greedy() -> None:
    logits = torch.randn(16, 200, generator=torch.Generator().manual_seed(4))
    rows = [SamplingRow(SamplingParams(temperature=2.0, top_p=1e-6))] * 16
    assert sample(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


# perm puts the probabilities at scrambled vocab ids; kept sets are named by probability index.
PERM = [3, 0, 4, 1, 2]


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        (SamplingParams(min_p=0.3), {0, 1, 2}),  # p >= 0.12
        (SamplingParams(min_p=0.7), {0, 1}),  # p >= 0.28
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_k=4), {0, 1, 2, 3}),
        (SamplingParams(top_p=0.75), {0, 1, 2}),  # 0.4 + 0.3 < 0.75 <= 0.85
        (SamplingParams(top_p=0.35), {0}),
        (SamplingParams(top_k=3, top_p=0.8), {0, 1}),  # renormalized: 0.47, 0.35, 0.18
        # min_p first (vLLM order) keeps 0..3, renormalized .42 .32 .16 .11: top_p cuts 3; top_p
        # first would keep 0..3 (0.85 < 0.87).
        (SamplingParams(min_p=0.2, top_p=0.87), {0, 1, 2}),
    ],
)
def test_filters_never_sample_outside_the_kept_set(params: SamplingParams, kept: set[int]) -> None:
    logits = _logits(PROBS)[torch.tensor(PERM)]  # logits[i] = log PROBS[PERM[i]]
    vocab_ids = {i for i in range(5) if PERM[i] in kept}
    counts = Counter(_draw_many(params, logits, 3000, seed=5))
    assert set(counts) == vocab_ids  # never outside, and every kept token does occur


def _naive_kept(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Reference filter for one [V] row, in float64: min-p, top-k, then top-p (vLLM order)."""
    probs = torch.softmax(logits.double(), dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    kept = [t for t in order if probs[t] >= p.min_p * probs[order[0]]]
    if p.top_k > 0:
        kept = kept[: p.top_k]
    total, mass = sum(probs[t] for t in kept), 0.0
    out: list[int] = []
    for t in kept:
        if out and p.top_p < 1.0 and mass >= p.top_p:
            break
        out.append(t)
        mass += probs[t] / total
    return set(out)


@pytest.mark.parametrize("candidates", [3, 64, 10**9])
def test_filters_match_naive_reference(candidates: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The top-candidates fast path and the full-sort fallback keep exactly the naive set."""
    monkeypatch.setattr(sampler, "_CANDIDATES", candidates)
    vocab = 500
    g = torch.Generator().manual_seed(11)
    logits = torch.cat([torch.randn(7, vocab, generator=g) * s for s in (0.5, 3.0, 8.0)])
    params = [
        SamplingParams(min_p=0.05),
        SamplingParams(top_k=2),
        SamplingParams(top_k=100),  # between the candidates and V: needs the full sort
        SamplingParams(top_p=0.9),
        SamplingParams(top_k=40, top_p=0.8, min_p=0.01),
        SamplingParams(top_p=0.5, min_p=0.2),
        SamplingParams(top_k=64, top_p=0.95),  # exactly the 64 candidates
    ] * 3
    rows = [SamplingRow(p) for p in params]
    scaled = logits.clone()
    sampler._apply_filters(scaled, rows)
    for b, p in enumerate(params):
        got = set(torch.isfinite(scaled[b]).nonzero()[:, 0].tolist())
        assert got == _naive_kept(logits[b], p), (b, p)
    assert torch.equal(scaled[torch.isfinite(scaled)], logits[torch.isfinite(scaled)])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("seeded", [True, False])
def test_empirical_distribution_matches_softmax(temperature: float, seeded: bool) -> None:
    logits = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0])
    n = 20_000
    params = SamplingParams(temperature=temperature)
    if seeded:
        draws = _draw_many(params, logits, n, seed=6)
    else:
        draws = sample(logits[None].expand(n, -1).contiguous(), [SamplingRow(params)] * n).token_ids
    expected = torch.softmax(logits / temperature, dim=-1).tolist()
    counts = Counter(draws)
    for token, p in enumerate(expected):
        # 5 standard deviations of a binomial proportion.
        assert abs(counts[token] / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-3


def test_same_seed_same_tokens_alone_or_in_a_batch() -> None:
    vocab, steps = 1000, 12
    data = torch.Generator().manual_seed(7)
    step_logits = [torch.randn(8, vocab, generator=data) * 3 for _ in range(steps)]
    mine = SamplingParams(temperature=0.9, top_p=0.95, top_k=200, seed=1234)
    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, seed=99),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.5, min_p=0.05, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, top_k=3, frequency_penalty=1.0, seed=5),
        SamplingParams(temperature=1.2, presence_penalty=0.5, logprobs=3),
        SamplingParams(temperature=0.5, seed=1234),  # same seed, its own generator
    ]
    position = 3

    alone_g = make_generator(mine)
    alone: list[int] = []
    for logits in step_logits:
        row = logits[position : position + 1]
        alone.extend(sample(row, [SamplingRow(mine, alone_g, tuple(alone))]).token_ids)

    gens = [make_generator(p) for p in others]
    mine_g = make_generator(mine)
    outputs: list[list[int]] = [[] for _ in range(8)]
    for logits in step_logits:
        params = others[:position] + [mine] + others[position:]
        gs = gens[:position] + [mine_g] + gens[position:]
        rows = [
            SamplingRow(p, g, tuple(outputs[i]), prompt_token_ids=(1, 2, 3))
            for i, (p, g) in enumerate(zip(params, gs, strict=True))
        ]
        for i, token in enumerate(sample(logits, rows).token_ids):
            outputs[i].append(token)

    assert outputs[position] == alone
    assert len(set(alone)) > 1  # really random, not stuck on one token


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, 1000)
    draws = {
        seed: [
            sample(logits, [SamplingRow(p, g)]).token_ids[0]
            for p in [SamplingParams(seed=seed)]
            for g in [make_generator(p)]
            for _ in range(5)
        ]
        for seed in (1, 2)
    }
    assert draws[1] != draws[2]


def _naive_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Reference: one token at a time, straight from the definitions."""
    out = logits.clone()
    for b, row in enumerate(rows):
        p = row.params
        for token in set(row.prompt_token_ids) | set(row.output_token_ids):
            x = float(out[b, token])
            out[b, token] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for token, count in Counter(row.output_token_ids).items():
            out[b, token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalties_match_naive_reference() -> None:
    vocab = 64
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(5, vocab, generator=g) * 4
    rows = [
        SamplingRow(SamplingParams(repetition_penalty=1.3), None, [1, 1, 5], [5, 7, 9, 63]),
        SamplingRow(SamplingParams(frequency_penalty=0.7), None, [2, 2, 2, 3], [2, 4]),
        SamplingRow(SamplingParams(presence_penalty=-1.1), None, [0, 0, 8], [9]),
        SamplingRow(
            SamplingParams(repetition_penalty=0.8, frequency_penalty=0.5, presence_penalty=1.5),
            None,
            [10, 11, 10, 10, 12, 63],
            list(range(20, 40)),
        ),
        SamplingRow(SamplingParams(), None, [1, 2, 3], [4, 5]),  # no penalty at all
    ]
    got = apply_penalties(logits, rows)
    torch.testing.assert_close(got, _naive_penalties(logits, rows), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[4], logits[4])
    assert not torch.equal(got[3], logits[3])


def test_frequency_penalty_moves_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    greedy = SamplingParams(temperature=0.0, frequency_penalty=0.3)
    assert sample(logits, [SamplingRow(greedy, None, [0])]).token_ids == [0]  # 2.7 > 2.5
    assert sample(logits, [SamplingRow(greedy, None, [0, 0])]).token_ids == [1]  # 2.4 < 2.5


def test_no_penalty_returns_logits_unchanged() -> None:
    logits = torch.randn(2, 10)
    assert apply_penalties(logits, [SamplingRow(SamplingParams(), None, [1], [2])] * 2) is logits


def test_logprobs_are_of_the_raw_distribution() -> None:
    vocab = 300
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(9)) * 2
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logprobs=5)),
        SamplingRow(
            SamplingParams(temperature=0.6, top_k=20, repetition_penalty=1.5, logprobs=3, seed=1),
            make_generator(SamplingParams(seed=1)),
            [0, 1],
            [2],
        ),
        SamplingRow(SamplingParams(temperature=1.0)),  # no logprobs asked
        SamplingRow(SamplingParams(temperature=1.0, logprobs=0)),  # chosen token only
    ]
    out = sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    for b in (0, 1, 3):
        lp = out.logprobs[b]
        assert lp is not None and lp.token_id == out.token_ids[b]
        assert lp.logprob == pytest.approx(float(raw[b, lp.token_id]), abs=1e-5)
    assert out.logprobs[2] is None and out.top_logprobs[2] == ()
    assert out.top_logprobs[3] == ()
    for b, k in ((0, 5), (1, 3)):
        top = out.top_logprobs[b]
        assert len(top) == k
        values = [t.logprob for t in top]
        assert values == sorted(values, reverse=True)
        expected = torch.topk(raw[b], k)
        assert [t.token_id for t in top] == expected.indices.tolist()
        assert values == pytest.approx(expected.values.tolist(), abs=1e-5)
    assert out.top_logprobs[0][0].token_id == out.token_ids[0]  # greedy picks the top one


def test_rejects_mismatched_rows_and_handles_empty_batch() -> None:
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 5), [SamplingRow(SamplingParams())])
    out = sample(torch.zeros(0, 5), [])
    assert out.token_ids == [] and out.logprobs == [] and out.top_logprobs == []
