"""The decoder against transformers: tiny random checkpoints and the embedded default model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from model.kv_cache import SequenceChunk
from model.transformer import Transformer
from model.weights import load_weights
from tests.checkpoints import make_tiny_hf_checkpoint

SIZES: dict[str, Any] = dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
                             num_kv_heads=2)


@pytest.mark.parametrize(("model_type", "window"), [("mistral", 16), ("llama", None)])
def test_logits_match_transformers(tmp_path: Path, model_type: str, window: int | None) -> None:
    from transformers import AutoModelForCausalLM

    folder = make_tiny_hf_checkpoint(tmp_path, model_type=model_type, sliding_window=window,
                                     **SIZES)
    loaded = load_weights(folder, progress=False)
    assert loaded.config.sliding_window == window
    ours_model = Transformer.from_tensors(loaded.config, loaded.tensors)
    ref_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, loaded.config.vocab_size, (100,),
                        generator=torch.Generator().manual_seed(0))
    ours = ours_model(ids, [SequenceChunk(0, 0, 100)], None, all_logits=True)
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    if window is not None:  # the window matters: full attention gives other logits past it
        full = Transformer.from_tensors(loaded.config.with_window(None), loaded.tensors)
        diff = (full(ids, [SequenceChunk(0, 0, 100)], None, all_logits=True) - ref).abs()
        assert diff[:window].max() < 1e-4 and diff[window:].max() > 1e-3


@pytest.mark.slow
def test_default_model_greedy_matches_transformers_gguf() -> None:
    from transformers import AutoModelForCausalLM

    from model.default_model import default_model_path
    from model.engine import Engine
    from model.engine_args import EngineArgs
    from model.requests import GenerationRequest
    from model.sampling_params import SamplingParams

    engine = Engine.from_args(EngineArgs(max_model_len=512, max_num_seqs=4, progress=False))
    path = default_model_path()
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                               dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):\n",
               "Once upon a time, in a land far away,"]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    requests = [GenerationRequest(str(i), tuple(engine.tokenizer.encode(p)), params)
                for i, p in enumerate(prompts)]
    ours = engine.run_to_completion(requests)
    for request, choice in zip(requests, ours, strict=True):
        ids = torch.tensor([request.prompt_token_ids])
        with torch.no_grad():
            out = ref.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        assert list(choice.token_ids) == out[0, ids.shape[1]:].tolist()
