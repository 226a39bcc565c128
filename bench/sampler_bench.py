"""Batched sampler: ringserve's one-call ``sample()`` vs transformers' logits processors, per row.

One engine step at B=32 rows over the default model's vocabulary (V=49152), a mixed batch
(greedy; top-p; top-k + min-p + repetition penalty; frequency/presence penalties). The
reference is what ``generate()`` does for each sequence: transformers' LogitsProcessorList
(repetition penalty, temperature, top-k, top-p, min-p) and a softmax + ``torch.multinomial``
draw, row by row, each row with its own processors (a batch of different requests has
different settings). "flat" logits (N(0, 1)) make top-p keep thousands of tokens (the full-sort
path); "peaked" ones (N(0, 4)) are closer to a trained model's. Best call of several, side by
side in one run; prints times and the ratio; asserts nothing.

    python -m bench.sampler_bench [--batch 32] [--vocab 49152] [--rounds 6]
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import cast

import torch

from bench.timing import best_ms
from model.sampler import SamplingRow, make_generator, sample
from model.sampling_params import SamplingParams

KINDS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_p=0.95, seed=1),
    SamplingParams(temperature=0.7, top_k=50, min_p=0.05, repetition_penalty=1.1),
    SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.5, logprobs=5),
]


def _rows(batch: int) -> list[SamplingRow]:
    return [SamplingRow(KINDS[i % 4], make_generator(KINDS[i % 4]),
                        list(range(i, i + 256)),  # output so far
                        list(range(1000, 1512)))  # prompt
            for i in range(batch)]


def _reference(rows: list[SamplingRow]) -> Callable[[torch.Tensor], list[int]]:
    """transformers' per-sequence processing: one LogitsProcessorList per row."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    per_row = []
    for row in rows:
        p = row.params
        procs = LogitsProcessorList()
        if p.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
        if not p.greedy:
            procs.append(TemperatureLogitsWarper(p.temperature))
            if p.top_k:
                procs.append(TopKLogitsWarper(p.top_k))
            if p.top_p < 1.0:
                procs.append(TopPLogitsWarper(p.top_p))
            if p.min_p:
                procs.append(MinPLogitsWarper(p.min_p))
        history = cast(torch.LongTensor,
                       torch.tensor([[*row.prompt_token_ids, *row.output_token_ids]]))
        per_row.append((p, procs, history))

    def run(logits: torch.Tensor) -> list[int]:
        out = []
        for i, (p, procs, history) in enumerate(per_row):
            scores = procs(history, logits[i:i + 1].clone())
            if p.frequency_penalty or p.presence_penalty:  # as OpenAI defines them
                counts = torch.bincount(history[0], minlength=scores.shape[-1]).float()
                scores -= counts * p.frequency_penalty + (counts > 0) * p.presence_penalty
            if p.greedy:
                out.append(int(scores.argmax()))
            else:
                out.append(int(torch.multinomial(scores.softmax(-1), 1)))
            if p.logprobs:
                logits[i].log_softmax(-1).topk(p.logprobs)
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    rows = _rows(args.batch)
    reference = _reference(rows)
    randn = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(10))
    print(f"sampler, B={args.batch} V={args.vocab} mixed batch, torch threads "
          f"{torch.get_num_threads()}, best of {args.rounds}")
    print(f"{'logits':8} {'ringserve ms':>13} {'transformers ms':>16} {'ratio':>7}")
    for name, logits in (("flat", randn), ("peaked", randn * 4)):
        ours = best_ms(functools.partial(sample, logits, rows), args.rounds)
        theirs = best_ms(functools.partial(reference, logits), args.rounds)
        print(f"{name:8} {ours:13.1f} {theirs:16.1f} {theirs / ours:6.2f}x")


if __name__ == "__main__":
    main()
