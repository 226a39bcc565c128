"""Checks on a built engine shared by the quantization tests (int8, int4)."""

from __future__ import annotations

import torch

from model.engine import Engine
from model.requests import GenerationChunk, GenerationRequest
from model.sampling_params import SamplingParams


def assert_greedy_stable_across_batch_compositions(engine: Engine, max_tokens: int) -> None:
    """Six seeded greedy prompts give the same tokens alone, all together, and staggered
    (later requests join while earlier ones decode: mixed prefill + decode steps)."""
    gen = torch.Generator().manual_seed(7)
    prompts = [tuple(torch.randint(3, 32000, (n,), generator=gen).tolist())
               for n in (5, 37, 12, 60, 1, 25)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def requests(tag: str) -> list[GenerationRequest]:
        return [GenerationRequest(f"{tag}{i}", p, params) for i, p in enumerate(prompts)]

    alone = [engine.run_to_completion([r])[0].token_ids for r in requests("a")]
    together = [c.token_ids for c in engine.run_to_completion(requests("b"))]
    assert together == alone
    staggered: dict[str, tuple[int, ...]] = {}
    pending = requests("c")
    engine.add(pending.pop(0))
    while engine.has_work or pending:
        if pending:
            engine.add(pending.pop(0))
        for out in engine.step():
            assert isinstance(out, GenerationChunk), out
            staggered[out.request_id] = staggered.get(out.request_id, ()) + out.token_ids
    assert [staggered[f"c{i}"] for i in range(len(prompts))] == alone
