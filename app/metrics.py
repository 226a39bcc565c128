"""Every metric ringserve records, named once (Ray exports them with a ``ray_`` prefix).

Dashboards are generated from, or checked against, :data:`METRICS`. Router-side metrics are
recorded by :class:`RouterMetrics`, replica-side ones by :class:`ReplicaMetrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ray.serve import metrics as serve_metrics

from model.requests import EngineStats

Kind = Literal["counter", "gauge", "histogram"]

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    description: str
    tag_keys: tuple[str, ...] = ()


REQUESTS = MetricSpec("ringserve_requests", "counter",
                      "HTTP requests answered, by route and status code", ("route", "status"))
SHED = MetricSpec("ringserve_shed_requests", "counter",
                  "Requests refused with 429 for load, by reason", ("reason",))
DEADLINE_EXCEEDED = MetricSpec("ringserve_deadline_exceeded", "counter",
                               "Requests answered 504: still queued at their deadline")
CANCELLED = MetricSpec("ringserve_cancelled_requests", "counter",
                       "Requests whose client disconnected before the end")
TTFT = MetricSpec("ringserve_time_to_first_token_seconds", "histogram",
                  "Arrival at the router to the first generated token", ("side",))
TPOT = MetricSpec("ringserve_time_per_output_token_seconds", "histogram",
                  "Mean time between output tokens of a request after the first")
QUEUE_WAIT = MetricSpec("ringserve_queue_wait_seconds", "histogram",
                        "Arrival at the router to the first engine event of the request")
PREDICTED_WAIT = MetricSpec("ringserve_predicted_queue_wait_seconds", "histogram",
                            "Queue wait the admission controller predicted at arrival")
BATCH_SIZE = MetricSpec("ringserve_batch_size", "histogram",
                        "Requests per router-to-replica batch call")
RUNNING = MetricSpec("ringserve_running_sequences", "gauge",
                     "Sequences holding a cache slot on a replica")
WAITING = MetricSpec("ringserve_waiting_requests", "gauge",
                     "Requests queued for a slot on a replica")
WAITING_TOKENS = MetricSpec("ringserve_waiting_tokens", "gauge",
                            "Prompt tokens not yet prefilled on a replica")
TOKENS_PER_S = MetricSpec("ringserve_tokens_per_second", "gauge",
                          "Tokens (prefill + decode) a replica processes per second")
PREFILL_TOKENS_PER_S = MetricSpec("ringserve_prefill_tokens_per_second", "gauge",
                                  "Prompt tokens a replica prefills per second of prompt steps")
KV_USED = MetricSpec("ringserve_kv_cache_used_bytes", "gauge",
                     "KV cache bytes in use on a replica")
KV_TOTAL = MetricSpec("ringserve_kv_cache_bytes", "gauge",
                      "KV cache bytes allocated on a replica")
GENERATED_TOKENS = MetricSpec("ringserve_generated_tokens", "counter",
                              "Output tokens streamed to clients")

METRICS: tuple[MetricSpec, ...] = (
    REQUESTS, SHED, DEADLINE_EXCEEDED, CANCELLED, TTFT, TPOT, QUEUE_WAIT, PREDICTED_WAIT,
    BATCH_SIZE, RUNNING, WAITING, WAITING_TOKENS, TOKENS_PER_S, PREFILL_TOKENS_PER_S, KV_USED,
    KV_TOTAL, GENERATED_TOKENS,
)


def _make(spec: MetricSpec, boundaries: list[float] | None = None) -> object:
    if spec.kind == "counter":
        return serve_metrics.Counter(spec.name, description=spec.description,
                                     tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return serve_metrics.Gauge(spec.name, description=spec.description,
                                   tag_keys=spec.tag_keys)
    return serve_metrics.Histogram(spec.name, description=spec.description,
                                   boundaries=boundaries or LATENCY_BUCKETS_S,
                                   tag_keys=spec.tag_keys)


class RouterMetrics:
    """Metrics the HTTP router records."""

    def __init__(self) -> None:
        self.requests = _make(REQUESTS)
        self.shed = _make(SHED)
        self.deadline = _make(DEADLINE_EXCEEDED)
        self.cancelled = _make(CANCELLED)
        self.ttft = _make(TTFT)
        self.tpot = _make(TPOT)
        self.queue_wait = _make(QUEUE_WAIT)
        self.predicted_wait = _make(PREDICTED_WAIT)
        self.batch_size = _make(BATCH_SIZE, [float(b) for b in BATCH_BUCKETS])
        self.generated = _make(GENERATED_TOKENS)

    def request(self, route: str, status: int) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status)})  # type: ignore[attr-defined]

    def shed_request(self, reason: str) -> None:
        self.shed.inc(1, tags={"reason": reason})  # type: ignore[attr-defined]

    def observe(self, metric: object, value: float, **tags: str) -> None:
        metric.observe(value, tags=tags or None)  # type: ignore[attr-defined]

    def count(self, metric: object, value: float = 1.0) -> None:
        if value > 0:
            metric.inc(value)  # type: ignore[attr-defined]


class ReplicaMetrics:
    """Metrics an LLM replica records (its engine's load, refreshed at every stats poll)."""

    def __init__(self) -> None:
        self.ttft = _make(TTFT)
        self.gauges = {spec.name: _make(spec) for spec in
                       (RUNNING, WAITING, WAITING_TOKENS, TOKENS_PER_S, PREFILL_TOKENS_PER_S,
                        KV_USED, KV_TOTAL)}

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"side": "replica"})  # type: ignore[attr-defined]

    def record_stats(self, stats: EngineStats) -> None:
        # Serve tags every replica metric with its replica id itself ("replica" is reserved).
        values = {RUNNING.name: stats.running_sequences, WAITING.name: stats.waiting_requests,
                  WAITING_TOKENS.name: stats.waiting_tokens, TOKENS_PER_S.name: stats.tokens_per_s,
                  PREFILL_TOKENS_PER_S.name: stats.prefill_tokens_per_s,
                  KV_USED.name: stats.kv_cache_used_bytes, KV_TOTAL.name: stats.kv_cache_bytes}
        for name, value in values.items():
            self.gauges[name].set(float(value))  # type: ignore[attr-defined]
