"""Metric recording without Ray: app/metrics.py's recorders over fake Ray metrics, and the
engine's plain-data figures (steps, tokens, the rolling window) on a tiny SWA checkpoint."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

import app.metrics as metrics
from app.metrics import METRICS, MetricSpec, ReplicaMetrics, RouterMetrics, exported_names
from model.requests import (
    EngineStats,
    FinishReason,
    GenerationChunk,
    SequenceTiming,
    StepRecord,
)


class FakeMetric:
    """Records what a Ray Serve metric was asked to record."""

    def __init__(self, spec: MetricSpec, model: str) -> None:
        self.spec = spec
        self.default_tags = {"model": model}
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def _add(self, kind: str, value: float, tags: dict[str, str] | None) -> None:
        merged = {**self.default_tags, **(tags or {})}
        assert set(merged) == set(self.spec.all_tag_keys), (self.spec.name, merged)
        self.calls.append((kind, value, merged))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert self.spec.kind == "counter" and value > 0
        self._add("inc", value, tags)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        assert self.spec.kind == "gauge"
        self._add("set", value, tags)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        assert self.spec.kind == "histogram" and value >= 0
        self._add("observe", value, tags)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[FakeMetric]]:
    made: dict[str, list[FakeMetric]] = defaultdict(list)

    def make(spec: MetricSpec, model_name: str) -> FakeMetric:
        fake = FakeMetric(spec, model_name)
        made[spec.name].append(fake)
        return fake

    monkeypatch.setattr(metrics, "_make", make)
    return made


def calls(made: dict[str, list[FakeMetric]], spec: MetricSpec) -> list[tuple[str, float, dict]]:
    return [c for fake in made[spec.name] for c in fake.calls]


def stats(**overrides: Any) -> EngineStats:
    base: dict[str, Any] = dict(
        waiting_sequences=1, waiting_tokens=30, running_sequences=2, free_slots=2,
        total_slots=4, tokens_per_s=100.0, prefill_tokens_per_s=400.0, kv_cache_bytes=4096,
        kv_cache_used_bytes=2048, healthy=True, window_tokens=32, sequences_past_window=1,
        ring_rows_overwritten_total=5, prompt_tokens_total=60, generated_tokens_total=7,
        preemptions_total=0,
        recent_steps=(StepRecord(1, 2, 40, 0.02), StepRecord(2, 2, 2, 0.01)))
    base.update(overrides)
    return EngineStats(**base)


def test_names_are_unique_and_exported_with_prometheus_suffixes() -> None:
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names))
    assert all(n.startswith("ringserve_") and not n.endswith("_total") for n in names)
    assert exported_names(metrics.REQUESTS) == ("ray_ringserve_requests_total",)
    assert exported_names(metrics.TTFT)[0] == "ray_ringserve_time_to_first_token_seconds_bucket"
    assert all(spec.boundaries for spec in METRICS if spec.kind == "histogram")
    assert all(spec.unit and spec.description for spec in METRICS)


def test_replica_poll_sets_every_gauge_and_counts_growth_once(recorded) -> None:
    replica = ReplicaMetrics("m")
    replica.record_stats(stats())
    replica.record_stats(stats())  # same totals, same steps: nothing counted twice
    gauges = [s for s in METRICS if s.kind == "gauge"]
    for spec in gauges:
        assert [c[0] for c in calls(recorded, spec)] == ["set", "set"], spec.name
    assert calls(recorded, metrics.PAST_WINDOW)[0][1] == 1.0
    assert calls(recorded, metrics.WINDOW)[0][1] == 32.0
    assert calls(recorded, metrics.WAITING)[0][1] == 1.0  # EngineStats.waiting_sequences
    assert [c[1] for c in calls(recorded, metrics.RING_OVERWRITES)] == [5.0]
    assert [c[1] for c in calls(recorded, metrics.PROMPT_TOKENS)] == [60.0]
    assert calls(recorded, metrics.PREEMPTIONS) == []  # never preempted: never exported
    assert [c[1] for c in calls(recorded, metrics.STEP_BATCH_SIZE)] == [2.0, 2.0]
    assert [c[1] for c in calls(recorded, metrics.STEP_TOKENS)] == [40.0, 2.0]
    replica.record_stats(stats(generated_tokens_total=10, preemptions_total=2, recent_steps=(
        StepRecord(2, 2, 2, 0.01), StepRecord(3, 1, 1, 0.01))))
    assert [c[1] for c in calls(recorded, metrics.GENERATED_TOKENS)] == [7.0, 3.0]
    assert [c[1] for c in calls(recorded, metrics.PREEMPTIONS)] == [2.0]
    replica.record_stats(stats(generated_tokens_total=10, preemptions_total=3))
    assert [c[1] for c in calls(recorded, metrics.PREEMPTIONS)] == [2.0, 1.0]
    assert [c[1] for c in calls(recorded, metrics.STEP_TOKENS)] == [40.0, 2.0, 1.0]
    assert all(c[2]["model"] == "m" for spec in METRICS for c in calls(recorded, spec))


def _chunk(index: int, tokens: int, done: int, finish: FinishReason | None = None,
           timing: SequenceTiming | None = None) -> GenerationChunk:
    return GenerationChunk("r", index, "x", tuple(range(tokens)), finish_reason=finish,
                           prompt_tokens=40, completion_tokens=done, timing=timing)


def test_request_tracker_records_latencies_lengths_and_reasons(recorded) -> None:
    tracker = ReplicaMetrics("m").track()
    timing = SequenceTiming(queue_s=0.5, prefill_s=0.2, decode_s=0.3, context_tokens=44,
                            window_tokens=32)
    for chunk in (_chunk(0, 1, 1), _chunk(1, 1, 1), _chunk(0, 1, 2), _chunk(0, 2, 4),
                  _chunk(0, 0, 4, "length", timing)):
        tracker.chunk(chunk)
    tracker.ended("abort", choices=2)  # choice 1 never finished
    assert len(calls(recorded, metrics.TTFT)) == 1
    assert calls(recorded, metrics.TTFT)[0][2]["side"] == "replica"
    assert len(calls(recorded, metrics.ITL)) == 3  # tokens after each choice's first
    finished = [(c[1], c[2]["reason"]) for c in calls(recorded, metrics.FINISHED)]
    assert finished == [(1.0, "length"), (1.0, "abort")]
    assert [c[1] for c in calls(recorded, metrics.GENERATION_LENGTH)] == [4.0]
    assert [c[1] for c in calls(recorded, metrics.REQUEST_QUEUE_TIME)] == [0.5]
    assert calls(recorded, metrics.TPOT)[0][1] == pytest.approx(0.1)
    assert calls(recorded, metrics.CONTEXT_WINDOW_RATIO)[0][1] == pytest.approx(44 / 32)


def test_router_labels_stay_bounded_and_504_is_a_deadline_shed(recorded) -> None:
    router = RouterMetrics("m")
    router.request("/v1/completions", 200)
    router.request("/no/such/path/123", 404)
    router.request("/v1/chat/completions", 504)
    router.shed_request("queue_wait")
    router.shed_request("queue_full")
    router.shed_request("no_replica")
    router.shed_request("queue_wait_exceeded")  # accepted, not started in time: 429 late
    routes = [(c[2]["route"], c[2]["status"]) for c in calls(recorded, metrics.REQUESTS)]
    assert routes == [("/v1/completions", "200"), ("other", "404"),
                      ("/v1/chat/completions", "504")]
    assert len(calls(recorded, metrics.DEADLINE_EXCEEDED)) == 1
    reasons = [c[2]["reason"] for c in calls(recorded, metrics.SHED)]
    assert reasons == ["deadline", "predicted_wait", "queue_full", "no_replica",
                       "queue_wait_exceeded"]
    assert set(reasons) == set(metrics.SHED_REASONS)


# Engine figures (plain data, no Ray) -----------------------------------------------------------
WINDOW = 16
BLOCK = 4  # R = ceil((W - 1) / B) + 1 = 5 blocks: a sequence's ring is R*B = 20 rows


@pytest.fixture(scope="module")
def swa_engine(tmp_path_factory: pytest.TempPathFactory):
    from model.engine import Engine
    from model.engine_args import EngineArgs
    from tests.checkpoints import make_tiny_hf_checkpoint

    folder: Path = make_tiny_hf_checkpoint(
        tmp_path_factory.mktemp("swa-metrics"), model_type="mistral", sliding_window=WINDOW,
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    return Engine.from_args(EngineArgs(model=str(folder), max_model_len=128, max_num_seqs=4,
                                       max_num_batched_tokens=64, block_size=BLOCK,
                                       progress=False))


def test_engine_reports_steps_tokens_and_the_ring(swa_engine) -> None:
    from model.requests import GenerationRequest
    from model.sampling_params import SamplingParams

    engine = swa_engine
    before = engine.stats()
    assert before.window_tokens == WINDOW
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine.add(GenerationRequest("ring", tuple(range(3, 13)), params))  # 10 prompt tokens
    finals: list[GenerationChunk] = []
    past_window_seen = 0
    while engine.has_work:
        finals += [c for c in engine.step()
                   if isinstance(c, GenerationChunk) and c.finish_reason is not None]
        past_window_seen = max(past_window_seen, engine.stats().sequences_past_window)
    after = engine.stats()
    assert after.prompt_tokens_total - before.prompt_tokens_total == 10
    assert after.generated_tokens_total - before.generated_tokens_total == 12
    # positions 0..20 ran through the model (the 12th token is never fed back): 16..20 pushed
    # one out of the window W = 16, but only position 20 reused a row of the 20-row ring
    assert after.ring_rows_overwritten_total - before.ring_rows_overwritten_total == 1
    assert past_window_seen == 1 and after.sequences_past_window == 0
    steps = [s for s in after.recent_steps if s.index > (before.recent_steps or
                                                          (StepRecord(0, 0, 0, 0),))[-1].index]
    assert [s.tokens for s in steps] == [10] + [1] * 11
    assert all(s.batch_size == 1 and s.seconds > 0 for s in steps)
    (final,) = finals
    assert final.timing is not None
    assert final.timing.context_tokens == 22 and final.timing.window_tokens == WINDOW
    assert min(final.timing.queue_s, final.timing.prefill_s, final.timing.decode_s) >= 0
    assert final.timing.decode_s > 0


def test_router_and_replica_record_one_request_end_to_end(recorded) -> None:
    """A real Router over an in-process LLMServer (fake engine): what one request records."""
    import asyncio

    from app.llm_server import LLMServer
    from app.router import load_router_tokenizer
    from tests.conftest import FakeEngine, LocalClient, fake_status
    from tests.test_app_router import call, make_router

    async def scenario() -> tuple[int, int]:
        server = LLMServer(lambda: FakeEngine(max_model_len=256), "r0", status_of=fake_status)
        router = make_router(LocalClient({"r0": server}), load_router_tokenizer(None))
        ok = await call(router, "POST", "/v1/completions",
                        json={"model": "fake-model", "prompt": "Hello", "max_tokens": 5})
        bad = await call(router, "POST", "/v1/completions",
                         json={"model": "fake-model", "prompt": 123})
        await router.shutdown()
        return ok.status_code, bad.status_code

    assert asyncio.run(scenario()) == (200, 400)
    sides = sorted(c[2]["side"] for c in calls(recorded, metrics.TTFT))
    assert sides == ["replica", "router"]
    assert len(calls(recorded, metrics.E2E)) == 1 and len(calls(recorded, metrics.QUEUE_WAIT)) == 1
    assert [c[1] for c in calls(recorded, metrics.BATCH_SIZE)] == [1.0]
    assert len(calls(recorded, metrics.PREDICTED_WAIT)) == 1
    assert [c[2]["reason"] for c in calls(recorded, metrics.FINISHED)] == ["length"]
    assert len(calls(recorded, metrics.ITL)) == 4
    statuses = {(c[2]["route"], c[2]["status"]) for c in calls(recorded, metrics.REQUESTS)}
    assert {("/v1/completions", "200"), ("/v1/completions", "400")} <= statuses
    assert calls(recorded, metrics.RUNNING)  # the router's polls set the replica's gauges
    # the router tags with the configured checkpoint's name (here the default model's), the
    # name a real engine gives the same checkpoint (model_name_for)
    assert {c[2]["model"] for c in calls(recorded, metrics.REQUESTS)} == {"SmolLM2-135M-Instruct"}
