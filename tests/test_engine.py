"""Engine: rolling cache exactness, greedy equality with transformers, batching, sampling."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from model.engine import Engine, EngineRequestError
from model.engine_args import EngineArgs
from model.kv_cache import CacheGeometry, KVCachePool, SequenceChunk
from model.requests import GenerationChunk, GenerationRequest
from model.sampling_params import SamplingParams
from model.scheduler import ScheduledChunk
from model.transformer import Transformer
from model.weights import load_weights
from tests.checkpoints import make_tiny_swa_checkpoint

WINDOW = 16


@pytest.fixture(scope="module")
def swa_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_swa_checkpoint(tmp_path_factory.mktemp("swa"), WINDOW)


@pytest.fixture(scope="module")
def hf_model(swa_checkpoint: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(swa_checkpoint, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="module")
def engine(swa_checkpoint: Path) -> Engine:
    return Engine.from_args(EngineArgs(model=str(swa_checkpoint), max_model_len=256,
                                       max_num_seqs=16, max_num_batched_tokens=64,
                                       prefill_chunk=24, progress=False))


def prompt(n: int, seed: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(3, 32000, (n,), generator=gen).tolist())


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def test_rolling_cache_logits_equal_full_windowed_forward(swa_checkpoint: Path, hf_model) -> None:
    loaded = load_weights(swa_checkpoint, progress=False)
    model = Transformer.from_tensors(loaded.config, loaded.tensors)
    pool = KVCachePool(CacheGeometry.for_model(loaded.config, 512, torch.float32), 2,
                       torch.float32)
    assert pool.k[0].shape[2] == WINDOW  # a slot never holds more than W positions
    tokens = list(prompt(40, 1))
    step_logits = []
    for start in range(0, 40, 12):  # chunked prefill: 12, 12, 12, 4 tokens
        count = min(12, 40 - start)
        ids = torch.tensor(tokens[start:start + count])
        step_logits.append(model(ids, [SequenceChunk(1, start, count)], pool, all_logits=True))
    for _ in range(60):  # 60 decode steps wrap the 16-row buffer several times
        next_id = int(step_logits[-1][-1].argmax())
        tokens.append(next_id)
        step_logits.append(model(torch.tensor([next_id]),
                                 [SequenceChunk(1, len(tokens) - 1, 1)], pool))
    ours = torch.cat(step_logits)  # [100, V]
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens)[None]).logits[0]  # explicit sliding-window mask
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt_len", [10, 40])
def test_greedy_equals_transformers_generate(engine: Engine, hf_model, prompt_len: int) -> None:
    ids = prompt(prompt_len, prompt_len)
    (choice,) = engine.run_to_completion([GenerationRequest("g", ids, greedy(50))])
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=50, do_sample=False)
    assert list(choice.token_ids) == ref[0, prompt_len:].tolist()
    assert choice.finish_reason == "length"


def test_batch_equals_each_request_alone(engine: Engine) -> None:
    requests = [GenerationRequest(f"r{i}", prompt(5 + 7 * i, 100 + i), greedy(12 + i))
                for i in range(16)]
    together = engine.run_to_completion(requests)
    alone = [engine.run_to_completion([r])[0] for r in requests]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [len(c.token_ids) for c in together] == [12 + i for i in range(16)]


def test_same_seed_same_output_whatever_the_batch(engine: Engine) -> None:
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    target = GenerationRequest("seeded", prompt(9, 5), params)
    alone = engine.run_to_completion([target])[0]
    noise = [GenerationRequest(f"n{i}", prompt(6 + i, 50 + i),
                               SamplingParams(max_tokens=15, temperature=1.2, ignore_eos=True))
             for i in range(5)]
    in_batch = engine.run_to_completion(noise[:2] + [target] + noise[2:])[2]
    assert in_batch.token_ids == alone.token_ids
    other_seed = engine.run_to_completion([GenerationRequest(
        "seeded", target.prompt_token_ids, SamplingParams(
            max_tokens=20, temperature=1.0, top_p=0.9, seed=8, ignore_eos=True))])[0]
    assert other_seed.token_ids != alone.token_ids


def test_stop_string_cuts_exactly(engine: Engine) -> None:
    ids = prompt(12, 9)
    full = engine.run_to_completion([GenerationRequest("s", ids, greedy(40))])[0]
    assert len(full.text) > 20
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    expected = full.text[:full.text.find(stop)]
    cut = engine.run_to_completion([GenerationRequest("s", ids, greedy(40, stop=(stop,)))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == expected
    assert stop not in cut.text


def test_n_choices_are_sampled_independently(engine: Engine) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=3, ignore_eos=True)
    choices = engine.run_to_completion([GenerationRequest("multi", prompt(8, 2), params)])
    assert [c.index for c in choices] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 for c in choices)
    assert len({c.token_ids for c in choices}) == 3


def test_request_over_the_limit_is_refused_before_taking_a_slot(engine: Engine) -> None:
    free = engine.cache.pool.num_free
    with pytest.raises(EngineRequestError, match="exceeds the model's limit of 256"):
        engine.add(GenerationRequest("big", prompt(250, 0), greedy(10)))
    with pytest.raises(EngineRequestError, match="empty"):
        engine.add(GenerationRequest("empty", (), greedy(10)))
    assert engine.cache.pool.num_free == free
    assert not engine.scheduler.has_work


def test_streaming_and_cancel_free_the_slot_within_one_step(engine: Engine) -> None:
    async def scenario() -> tuple[list[str], int, int]:
        total = engine.cache.num_blocks
        texts = []
        stream = engine.generate(GenerationRequest("stream", prompt(6, 4), greedy(200)))
        async for chunk in stream:
            texts.append(chunk.text)
            if len(texts) == 3:
                break
        await stream.aclose()
        busy = engine.stats().free_blocks
        # one more step of any request is enough for the abort to free the slot
        async for _ in engine.generate(GenerationRequest("next", prompt(4, 3), greedy(1))):
            pass
        return texts, busy, engine.stats().free_blocks - total

    texts, _, leaked = asyncio.run(scenario())
    assert len(texts) == 3
    assert leaked == 0


def test_abort_frees_the_slot_at_the_very_next_step(engine: Engine) -> None:
    total = engine.cache.num_blocks
    engine.add(GenerationRequest("doomed", prompt(6, 5), greedy(200)))
    for _ in range(3):  # prefill, then decodes: the request holds one block (8 positions)
        engine.step()
    assert engine.stats().free_blocks == total - 1
    assert engine.stats().free_slots == engine.stats().total_slots - 1
    engine.abort("doomed")
    assert engine.stats().free_blocks == total - 1  # nothing happens until a step runs
    outputs = engine.step()
    assert [(c.request_id, c.finish_reason) for c in outputs
            if isinstance(c, GenerationChunk)] == [("doomed", "abort")]
    assert len(outputs) == 1
    assert engine.stats().free_blocks == total and not engine.has_work


def test_waiting_counts_sequences_also_before_a_step_takes_the_request(engine: Engine) -> None:
    """A request of n choices waits as n sequences, queued for the next step or scheduled."""
    engine.add_at_next_step(GenerationRequest("three", prompt(10, 9), greedy(2, n=3)))
    assert engine.stats().waiting_sequences == 3 and engine.stats().waiting_tokens == 30
    engine.add(GenerationRequest("two", prompt(10, 8), greedy(2, n=2)))
    assert engine.stats().waiting_sequences == 5
    while engine.has_work:
        engine.step()
    assert engine.stats().waiting_sequences == 0


def test_stats_report_load_and_a_busy_time_drain_rate(engine: Engine) -> None:
    requests = [GenerationRequest(f"load{i}", prompt(30, 200 + i), greedy(4)) for i in range(3)]
    for request in requests:
        engine.add(request)
    before = engine.stats()
    assert before.waiting_sequences == 3 and before.waiting_tokens == 90
    assert before.free_slots == before.total_slots
    engine.step()
    during = engine.stats()
    assert during.running_sequences == 3 and during.waiting_sequences == 0
    assert during.free_slots == during.total_slots - 3
    per_block = during.kv_cache_bytes // during.total_blocks
    blocks_each = -(-30 // during.block_size)  # a 30-token prompt's blocks
    assert during.total_blocks - during.free_blocks == 3 * blocks_each
    assert during.kv_cache_used_bytes == 3 * blocks_each * per_block
    while engine.scheduler.has_work:
        engine.step()
    after = engine.stats()
    assert after.tokens_per_s > 0 and after.free_slots == after.total_slots
    assert after.free_blocks == after.total_blocks


class FakeClock:
    """``time.monotonic`` for the engine module: moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_rates_count_busy_time_and_outlive_idle_spells(engine: Engine, monkeypatch) -> None:
    """Drain rate = tokens / busy seconds of recent steps; prefill rate = prompt tokens /
    seconds of the steps that ran prompt chunks; the last RATE_MIN_STEPS steps of each are
    kept whatever their age, so an idle spell neither dilutes nor forgets them."""
    import model.engine.step_metrics as step_metrics_module

    clock = FakeClock()
    monkeypatch.setattr(step_metrics_module, "time", clock)
    monkeypatch.setattr(engine, "step_metrics", step_metrics_module.StepMetrics())

    def step(start_pos: int, num_tokens: int, seconds: float) -> None:
        started = clock.now
        clock.now += seconds
        engine.step_metrics.record_throughput(
            started, [ScheduledChunk("s", (), start_pos, num_tokens, samples=True)])

    step(0, 48, 0.05)  # a 48-token prompt chunk
    for i in range(24):  # then 24 decode steps
        step(48 + i, 1, 0.04)
    stats = engine.stats()
    assert stats.prefill_tokens_per_s == pytest.approx(48 / 0.05)
    assert stats.tokens_per_s == pytest.approx((48 + 24) / (0.05 + 24 * 0.04))
    clock.now += 10 * step_metrics_module.THROUGHPUT_WINDOW_S  # idle: no steps at all
    assert engine.stats().tokens_per_s == pytest.approx(stats.tokens_per_s)
    step(0, 2, 0.04)  # a tiny prompt step after the idle spell
    keep = step_metrics_module.RATE_MIN_STEPS
    after = engine.stats()
    # both prompt steps are within the last RATE_MIN_STEPS prompt steps: the rate blends them
    assert after.prefill_tokens_per_s == pytest.approx((48 + 2) / (0.05 + 0.04))
    # the drain rate keeps the newest RATE_MIN_STEPS steps: keep - 1 decodes and the tiny one
    assert after.tokens_per_s == pytest.approx((keep - 1 + 2) / (keep * 0.04))


def test_async_loop_survives_a_failed_step_and_drains_on_shutdown(swa_checkpoint: Path,
                                                                  monkeypatch) -> None:
    from model.engine import EngineShuttingDown

    fresh = Engine.from_args(EngineArgs(model=str(swa_checkpoint), max_model_len=128,
                                        max_num_seqs=4, max_num_batched_tokens=32,
                                        progress=False))
    real_forward = fresh.model.forward
    alone = fresh.run_to_completion([GenerationRequest("ref", prompt(6, 9), greedy(20))])[0]

    async def collect(request: GenerationRequest) -> list[int]:
        return [t async for chunk in fresh.generate(request) for t in chunk.token_ids]

    async def scenario() -> tuple[list[int], list[int], bool, bool]:
        def broken(*args, **kwargs):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(fresh.model, "forward", broken)
        with pytest.raises(RuntimeError, match="injected failure"):
            await collect(GenerationRequest("doomed", prompt(6, 9), greedy(20)))
        healthy_after_failure = fresh.healthy
        monkeypatch.setattr(fresh.model, "forward", real_forward)
        again = await collect(GenerationRequest("again", prompt(6, 9), greedy(20)))
        # shutdown with a request still running: it completes (drain), then the loop stops
        running = asyncio.ensure_future(
            collect(GenerationRequest("last", prompt(6, 9), greedy(20))))
        await asyncio.sleep(0.05)
        await fresh.shutdown(drain=True, timeout_s=60)
        last = await running
        with pytest.raises(EngineShuttingDown):
            await collect(GenerationRequest("late", prompt(6, 9), greedy(2)))
        all_free = fresh.cache.pool.num_free == fresh.cache.num_blocks
        return again, last, healthy_after_failure, all_free

    again, last, healthy_after_failure, all_free = asyncio.run(scenario())
    assert healthy_after_failure
    assert again == list(alone.token_ids) and last == list(alone.token_ids)
    assert all_free
