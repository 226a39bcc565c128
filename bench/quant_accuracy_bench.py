"""Accuracy of int8 weights vs fp32 on the embedded default model (printed, never asserted).

Two checks from issue #13, both against the fp32 model built from the same checkpoint:

* perplexity on a fixed text of at least 2000 tokens (bench/data/gpl-3.0.txt, the GNU GPL v3
  as Debian ships it in /usr/share/common-licenses/GPL-3; verbatim copies are permitted),
  scored in independent windows of ``--window`` tokens from position 0; goal: int8 within
  1.5% of fp32;
* greedy 32-token continuations of 20 fixed prompts through the engine (all 20 in one
  batch); goal: identical for at least 16 of 20.

Variants (``--variants``): ``int8`` is what ``--quantization int8`` serves (int8 weights and
int8 activations, fbgemm); ``int4`` what ``--quantization int4`` serves (4-bit groups, bf16
activations, prompt tokens through bf16 dense copies; see model/int4.py), ``int4-no-dense``
the same with ``dense_prefill`` off (the int4 kernel for prompt tokens too); ``int8x2`` what
``--quantization int8x2`` serves (two int8 planes per weight, ~15-bit weights, same kernel);
``int8-weights`` runs fp32 matmuls over the int8-rounded weights (isolates the weight rounding
from the activation rounding);
``int8-fp32-head`` is int8 with the LM head left in fp32, ``int4-fp32-head`` and
``int4-no-dense-fp32-head`` the same for int4 (they isolate the int8 head's rounding).

    python -m bench.quant_accuracy_bench [--tokens 2048] [--window 512] [--threads N]
                                         [--variants int8,int8x2,int8-weights]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

CORPUS = Path(__file__).parent / "data" / "gpl-3.0.txt"
GOAL_PPL_REL = 0.015
GOAL_GREEDY = 16
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "import numpy as np\n\ndef normalize(x):\n",
    "The theory of relativity states that",
    "My favorite book is",
    "Water boils at",
    "The best way to learn a new language is",
    "In 1969, the first humans",
    "SELECT name, age FROM users WHERE",
    "The mitochondria is",
    "A haiku about autumn:\n",
    "The main difference between a cat and a dog is",
    "Here is a list of fruits: apple, banana,",
    "The weather today is",
    "Photosynthesis is the process by which",
    "class Stack:\n    def __init__(self):\n",
    "The GNU General Public License is",
)


def perplexity(model, token_ids: list[int], window: int) -> float:
    """exp(mean next-token NLL) over ``token_ids``, scored in independent windows."""
    from model.kv_cache import SequenceChunk

    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start:start + window + 1]
        ids = torch.tensor(chunk[:-1])
        logits = model(ids, [SequenceChunk(0, 0, len(ids))], None, all_logits=True)  # [T, V]
        targets = torch.tensor(chunk[1:])
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += len(targets)
    return math.exp(nll / count)


def greedy_texts(engine, max_tokens: int) -> list[tuple[int, ...]]:
    """Greedy continuations of PROMPTS, all in one engine batch."""
    from model.requests import GenerationRequest
    from model.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    requests = [GenerationRequest(str(i), tuple(engine.tokenizer.encode(p)), params)
                for i, p in enumerate(PROMPTS)]
    return [choice.token_ids for choice in engine.run_to_completion(requests)]


def _engine(quantization: str, weights_only: bool, fp32_head: bool = False,
            dense_prefill: bool = True):
    from model.engine import Engine
    from model.engine_args import EngineArgs
    from model.transformer import Transformer

    engine = Engine.from_args(EngineArgs(max_model_len=1024, max_num_seqs=len(PROMPTS),
                                         progress=False, quantization=quantization,
                                         dense_prefill=dense_prefill))
    if weights_only:  # fp32 matmuls over the int8-rounded weights
        from model.weights import load_weights

        loaded = load_weights(None, progress=False, quantization="int8")
        engine.model = Transformer.from_tensors(loaded.config, loaded.tensors,
                                                scales=loaded.scales)
    if fp32_head:
        from model.transformer import Projection
        from model.weights import load_weights

        embed = engine.model.embed_tokens.weight  # the default model ties its head
        head = Projection(embed.shape[1], embed.shape[0])
        head.weight_t.data = embed.T.contiguous()
        engine.model.lm_head = head
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of text scored")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default="int8,int8x2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    reference = _engine("none", False)
    text_ids = reference.tokenizer.encode(CORPUS.read_text(encoding="utf-8"))[:args.tokens + 1]
    if len(text_ids) < args.tokens + 1:
        raise SystemExit(f"{CORPUS} has only {len(text_ids)} tokens")
    ref_ppl = perplexity(reference.model, text_ids, args.window)
    ref_greedy = greedy_texts(reference, args.max_tokens)
    rows = [("fp32", ref_ppl, len(PROMPTS))]
    for variant in args.variants.split(","):
        if variant not in ("int8", "int8x2", "int4", "int4-no-dense", "int8-weights",
                           "int8-fp32-head", "int4-fp32-head", "int4-no-dense-fp32-head"):
            raise SystemExit(f"unknown variant {variant!r}")
        quantization = {"int8-weights": "none", "int8x2": "int8x2",
                        }.get(variant, "int4" if variant.startswith("int4") else "int8")
        engine = _engine(quantization, variant == "int8-weights", variant.endswith("fp32-head"),
                         dense_prefill="no-dense" not in variant)
        ppl = perplexity(engine.model, text_ids, args.window)
        same = sum(a == b for a, b in zip(greedy_texts(engine, args.max_tokens), ref_greedy,
                                          strict=True))
        rows.append((variant, ppl, same))
        del engine
    print(f"int8 accuracy, embedded default model, {torch.get_num_threads()} threads, "
          f"{time.monotonic() - started:.0f}s")
    print(f"perplexity: {args.tokens} tokens of {CORPUS.name}, windows of {args.window}; "
          f"greedy: {len(PROMPTS)} prompts x {args.max_tokens} tokens, one batch")
    print(f"{'variant':<14}{'perplexity':>11}{'vs fp32':>10}{'greedy same':>13}   goal")
    for name, ppl, same in rows:
        rel = ppl / ref_ppl - 1
        goal = "" if name == "fp32" else (
            f"ppl {'ok' if abs(rel) <= GOAL_PPL_REL else 'MISSED'} (<= 1.5%), greedy "
            f"{'ok' if same >= GOAL_GREEDY else 'MISSED'} (>= {GOAL_GREEDY})")
        print(f"{name:<14}{ppl:>11.3f}{rel:>+10.2%}{same:>8}/{len(PROMPTS):<4}   {goal}")


if __name__ == "__main__":
    main()
