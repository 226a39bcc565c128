"""Decode tokens/s at batch 1 on the embedded default model: ringserve vs transformers.

Both run greedy decoding of the same prompt for the same number of new tokens, fp32 on CPU,
in this one process, alternating rounds so machine noise hits both alike. Prints a table and
the ratio; asserts nothing.

    python -m bench.decode_bench [--new-tokens 64] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPT = "The rolling buffer cache keeps position i at slot i mod W, so that"


def _time_ours(engine, prompt_ids: list[int], new_tokens: int) -> float:
    from model.requests import GenerationRequest
    from model.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    request = GenerationRequest("bench", tuple(prompt_ids), params)
    # Time the decode phase only: prefill plus first token first, then the rest.
    engine.add(request)
    engine.step()  # prefill + first token
    started = time.perf_counter()
    steps = 0
    while engine.scheduler.has_work:
        engine.step()
        steps += 1
    return steps / (time.perf_counter() - started)


def _time_transformers(hf_model, prompt_ids: list[int], new_tokens: int) -> float:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = hf_model(ids, use_cache=True)
        past = out.past_key_values
        next_id = out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = hf_model(next_id, past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_id = out.logits[:, -1:].argmax(-1)
        return (new_tokens - 1) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from model.default_model import default_model_path
    from model.engine import Engine
    from model.engine_args import EngineArgs

    engine = Engine.from_args(EngineArgs(max_model_len=1024, max_num_seqs=1, progress=False))
    path = default_model_path()
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=torch.float32).eval()
    prompt_ids = engine.tokenizer.encode(PROMPT)
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(_time_ours(engine, prompt_ids, args.new_tokens))
        theirs.append(_time_transformers(hf_model, prompt_ids, args.new_tokens))
    best_ours, best_theirs = max(ours), max(theirs)
    print(f"decode, batch 1, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"fp32 CPU, best of {args.rounds}")
    print(f"{'engine':<14}{'tok/s':>10}")
    print(f"{'ringserve':<14}{best_ours:>10.1f}")
    print(f"{'transformers':<14}{best_theirs:>10.1f}")
    print(f"ratio ringserve/transformers: {best_ours / best_theirs:.2f}x")


if __name__ == "__main__":
    main()
