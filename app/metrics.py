"""Every metric ringserve records, named once (Ray exports them with a ``ray_`` prefix).

Dashboards are generated from, and checked against, :data:`METRICS`. Router-side metrics are
recorded by :class:`RouterMetrics`, replica-side ones by :class:`ReplicaMetrics` (engine
figures arrive as plain data: :class:`EngineStats` at every stats poll, :class:`SequenceTiming`
on a choice's last chunk). Every metric carries the served model's name in the ``model`` tag;
Ray Serve adds ``deployment``, ``replica`` and ``application`` itself. Prometheus names: a
counter gets ``_total``, a histogram ``_bucket``/``_sum``/``_count`` (:func:`exported_names`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from model.requests import EngineStats, GenerationChunk

Kind = Literal["counter", "gauge", "histogram"]
Side = Literal["router", "replica", "both"]

PROMETHEUS_PREFIX = "ray_"  # Ray's exporter prefixes every custom metric
MODEL_TAG = "model"

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
                           0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
TOKEN_COUNT_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0,
                       5000.0, 10000.0, 20000.0, 50000.0)
STEP_TOKEN_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
                      4096.0, 8192.0)
WINDOW_RATIO_BUCKETS = (0.125, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0)

SHED_REASONS = ("queue_full", "predicted_wait", "queue_wait_exceeded", "deadline", "no_replica")
FINISH_REASONS = ("stop", "length", "abort", "error")
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/load")
OTHER_ROUTE = "other"  # any other path (bounded label values: 404s must not grow series)
# The admission controller's names for a 429, as the metric's reasons name them.
_SHED_REASON_OF = {"queue_full": "queue_full", "queue_wait": "predicted_wait"}


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its Ray name (exported as ``ray_<name>[_suffix]``), meaning and labels."""

    name: str
    kind: Kind
    description: str
    side: Side
    unit: str  # Grafana unit of the metric's natural panel: s, short, bytes, percentunit
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()  # histogram buckets

    @property
    def all_tag_keys(self) -> tuple[str, ...]:
        return (MODEL_TAG, *self.tag_keys)

    @property
    def prometheus_name(self) -> str:
        """The series name a query uses (counters: the ``_total`` one)."""
        base = PROMETHEUS_PREFIX + self.name
        return base + "_total" if self.kind == "counter" else base


def exported_names(spec: MetricSpec) -> tuple[str, ...]:
    """Every series name Ray exports for ``spec``."""
    base = PROMETHEUS_PREFIX + spec.name
    if spec.kind == "counter":
        return (base + "_total",)
    if spec.kind == "histogram":
        return (base + "_bucket", base + "_sum", base + "_count")
    return (base,)


# Router ---------------------------------------------------------------------------------------
REQUESTS = MetricSpec("ringserve_requests", "counter",
                      "HTTP requests answered by the router, by route and status code",
                      "router", "reqps", ("route", "status"))
SHED = MetricSpec("ringserve_shed_requests", "counter",
                  "Requests refused before they ran, by reason: queue_full and predicted_wait "
                  "(429 on arrival), queue_wait_exceeded (429: accepted, but not started within "
                  "max_queue_wait_s), deadline (504, still queued at its deadline), no_replica "
                  "(503)",
                  "router", "reqps", ("reason",))
DEADLINE_EXCEEDED = MetricSpec("ringserve_deadline_exceeded", "counter",
                               "Requests answered 504: still queued at their deadline",
                               "router", "reqps")
CANCELLED = MetricSpec("ringserve_cancelled_requests", "counter",
                       "Requests the router ended early: the client disconnected, or another "
                       "prompt of the same HTTP request failed", "router", "reqps")
TTFT = MetricSpec("ringserve_time_to_first_token_seconds", "histogram",
                  "Time to first token: side=router from arrival at the router, side=replica "
                  "from arrival at the replica, to the first generated token", "both", "s",
                  ("side",), LATENCY_BUCKETS_S)
E2E = MetricSpec("ringserve_e2e_request_latency_seconds", "histogram",
                 "Arrival at the router to the request's last token (finished requests)",
                 "router", "s", (), LATENCY_BUCKETS_S)
QUEUE_WAIT = MetricSpec("ringserve_queue_wait_seconds", "histogram",
                        "Arrival at the router to the first engine event of the request "
                        "(router batch window + replica queue + first step)", "router", "s",
                        (), LATENCY_BUCKETS_S)
PREDICTED_WAIT = MetricSpec("ringserve_predicted_queue_wait_seconds", "histogram",
                            "Queue wait the admission controller predicted at arrival "
                            "(admitted requests)", "router", "s", (), LATENCY_BUCKETS_S)
BATCH_SIZE = MetricSpec("ringserve_batch_size", "histogram",
                        "Requests per router-to-replica batch call (router micro-batch size)",
                        "router", "short", (), BATCH_BUCKETS)

# Replica: per request -------------------------------------------------------------------------
TPOT = MetricSpec("ringserve_time_per_output_token_seconds", "histogram",
                  "Per finished sequence: decode time / (output tokens - 1)", "replica", "s",
                  (), TOKEN_LATENCY_BUCKETS_S)
ITL = MetricSpec("ringserve_inter_token_latency_seconds", "histogram",
                 "Time between consecutive output tokens of a sequence, as the replica receives "
                 "them from the engine", "replica", "s", (), TOKEN_LATENCY_BUCKETS_S)
REQUEST_QUEUE_TIME = MetricSpec("ringserve_request_queue_time_seconds", "histogram",
                                "Time a sequence waited in the engine's queue for cache blocks",
                                "replica", "s", (), LATENCY_BUCKETS_S)
PREFILL_TIME = MetricSpec("ringserve_request_prefill_time_seconds", "histogram",
                          "First scheduled to first token: the sequence's (chunked) prefill",
                          "replica", "s", (), LATENCY_BUCKETS_S)
DECODE_TIME = MetricSpec("ringserve_request_decode_time_seconds", "histogram",
                         "First token to last token of a sequence", "replica", "s", (),
                         LATENCY_BUCKETS_S)
PROMPT_LENGTH = MetricSpec("ringserve_request_prompt_tokens", "histogram",
                           "Prompt length of each finished sequence (tokens)", "replica",
                           "short", (), TOKEN_COUNT_BUCKETS)
GENERATION_LENGTH = MetricSpec("ringserve_request_generation_tokens", "histogram",
                               "Output length of each finished sequence (tokens)", "replica",
                               "short", (), TOKEN_COUNT_BUCKETS)
FINISHED = MetricSpec("ringserve_finished_requests", "counter",
                      "Sequences (request choices) that ended on a replica, by reason: stop, "
                      "length, abort (cancelled), error", "replica", "reqps", ("reason",))
PROMPT_TOKENS = MetricSpec("ringserve_prompt_tokens", "counter",
                           "Prompt tokens the engine prefilled", "replica", "short")
GENERATED_TOKENS = MetricSpec("ringserve_generated_tokens", "counter",
                              "Output tokens the engine generated", "replica", "short")
CONTEXT_WINDOW_RATIO = MetricSpec("ringserve_context_window_ratio", "histogram",
                                  "Context length / W of each finished sequence (> 1: attention "
                                  "saw only its last W tokens)", "replica",
                                  "short", (), WINDOW_RATIO_BUCKETS)

# Replica: engine steps ------------------------------------------------------------------------
STEP_BATCH_SIZE = MetricSpec("ringserve_engine_step_batch_size", "histogram",
                             "Sequences in one engine step (continuous batch size)", "replica",
                             "short", (), BATCH_BUCKETS)
STEP_TOKENS = MetricSpec("ringserve_engine_step_tokens", "histogram",
                         "Tokens one engine step ran (prompt chunks + decodes)", "replica",
                         "short", (), STEP_TOKEN_BUCKETS)
STEP_TIME = MetricSpec("ringserve_engine_step_seconds", "histogram",
                       "Duration of one engine step (model run, sampling, bookkeeping)",
                       "replica", "s", (), STEP_BUCKETS_S)
RING_OVERWRITES = MetricSpec("ringserve_ring_overwritten_rows", "counter",
                             "KV cache rows the rolling buffer reused: positions >= R*B (a "
                             "sequence's ring of R blocks of B rows) run, each in the row of "
                             "the position R*B before it; counted once per sequence (not per "
                             "layer)", "replica", "short")
PREEMPTIONS = MetricSpec("ringserve_preemptions", "counter",
                         "Sequences preempted: a decoding sequence found no free KV cache "
                         "block, so the newest running one gave its blocks back and was "
                         "requeued at the front, to be recomputed", "replica", "short")

# Replica: gauges, re-set at every stats poll ---------------------------------------------------
RUNNING = MetricSpec("ringserve_running_sequences", "gauge",
                     "Sequences holding KV cache blocks (running) on a replica", "replica",
                     "short")
WAITING = MetricSpec("ringserve_waiting_sequences", "gauge",
                     "Sequences queued for KV cache blocks on a replica (a request of n "
                     "choices is n sequences)", "replica", "short")
WAITING_TOKENS = MetricSpec("ringserve_waiting_tokens", "gauge",
                            "Prompt tokens not yet prefilled on a replica", "replica", "short")
TOKENS_PER_S = MetricSpec("ringserve_tokens_per_second", "gauge",
                          "Tokens (prefill + decode) a replica processes per busy second",
                          "replica", "short")
PREFILL_TOKENS_PER_S = MetricSpec("ringserve_prefill_tokens_per_second", "gauge",
                                  "Prompt tokens a replica prefills per second of prompt steps",
                                  "replica", "short")
KV_USED = MetricSpec("ringserve_kv_cache_used_bytes", "gauge",
                     "KV cache bytes in use on a replica", "replica", "bytes")
KV_TOTAL = MetricSpec("ringserve_kv_cache_bytes", "gauge",
                      "KV cache bytes allocated on a replica", "replica", "bytes")
KV_BLOCKS_USED = MetricSpec("ringserve_kv_cache_used_blocks", "gauge",
                            "KV cache blocks held by sequences on a replica", "replica",
                            "short")
KV_BLOCKS_TOTAL = MetricSpec("ringserve_kv_cache_blocks", "gauge",
                             "KV cache blocks in a replica's pool (block_size positions each)",
                             "replica", "short")
WINDOW = MetricSpec("ringserve_window_tokens", "gauge",
                    "W: rows per sequence of the rolling KV buffer (min(sliding window, "
                    "max_model_len))", "replica", "short")
PAST_WINDOW = MetricSpec("ringserve_sequences_past_window", "gauge",
                         "Running sequences whose cached context has passed W (attention "
                         "sees only their last W tokens)", "replica", "short")

METRICS: tuple[MetricSpec, ...] = (
    REQUESTS, SHED, DEADLINE_EXCEEDED, CANCELLED, TTFT, E2E, QUEUE_WAIT, PREDICTED_WAIT,
    BATCH_SIZE, TPOT, ITL, REQUEST_QUEUE_TIME, PREFILL_TIME, DECODE_TIME, PROMPT_LENGTH,
    GENERATION_LENGTH, FINISHED, PROMPT_TOKENS, GENERATED_TOKENS, CONTEXT_WINDOW_RATIO,
    STEP_BATCH_SIZE, STEP_TOKENS, STEP_TIME, RING_OVERWRITES, PREEMPTIONS, RUNNING, WAITING,
    WAITING_TOKENS, TOKENS_PER_S, PREFILL_TOKENS_PER_S, KV_USED, KV_TOTAL, KV_BLOCKS_USED,
    KV_BLOCKS_TOTAL, WINDOW, PAST_WINDOW,
)

# Each gauge and counter is one EngineStats figure (the record the replica reports).
_GAUGE_VALUES: dict[MetricSpec, Callable[[EngineStats], float]] = {
    RUNNING: lambda s: s.running_sequences, WAITING: lambda s: s.waiting_sequences,
    WAITING_TOKENS: lambda s: s.waiting_tokens, TOKENS_PER_S: lambda s: s.tokens_per_s,
    PREFILL_TOKENS_PER_S: lambda s: s.prefill_tokens_per_s,
    KV_USED: lambda s: s.kv_cache_used_bytes, KV_TOTAL: lambda s: s.kv_cache_bytes,
    KV_BLOCKS_USED: lambda s: s.total_blocks - s.free_blocks,
    KV_BLOCKS_TOTAL: lambda s: s.total_blocks,
    WINDOW: lambda s: s.window_tokens, PAST_WINDOW: lambda s: s.sequences_past_window,
}
_COUNTER_TOTALS: dict[MetricSpec, Callable[[EngineStats], int]] = {
    PROMPT_TOKENS: lambda s: s.prompt_tokens_total,
    GENERATED_TOKENS: lambda s: s.generated_tokens_total,
    RING_OVERWRITES: lambda s: s.ring_rows_overwritten_total,
    PREEMPTIONS: lambda s: s.preemptions_total,
}


def _make(spec: MetricSpec, model_name: str) -> Any:
    """The Ray Serve metric for ``spec``, its model tag set once."""
    from ray.serve import metrics as serve_metrics

    # Ray annotates tag_keys as Tuple[str] (one name); it takes a tuple of any length.
    tag_keys: Any = spec.all_tag_keys
    if spec.kind == "counter":
        metric: Any = serve_metrics.Counter(spec.name, description=spec.description,
                                            tag_keys=tag_keys)
    elif spec.kind == "gauge":
        metric = serve_metrics.Gauge(spec.name, description=spec.description,
                                     tag_keys=tag_keys)
    else:
        metric = serve_metrics.Histogram(spec.name, description=spec.description,
                                         boundaries=list(spec.boundaries), tag_keys=tag_keys)
    metric.set_default_tags({MODEL_TAG: model_name})
    return metric


def _metrics_for(side: Side, model_name: str) -> dict[MetricSpec, Any]:
    return {spec: _make(spec, model_name) for spec in METRICS if spec.side in (side, "both")}


def route_label(path: str) -> str:
    """The ``route`` label of a request path (unknown paths share one label)."""
    return path if path in ROUTES else OTHER_ROUTE


def shed_reason(admission_reason: str) -> str:
    """The ``reason`` label of a 429 for the admission controller's reason."""
    return _SHED_REASON_OF.get(admission_reason, admission_reason)


class RouterMetrics:
    """Metrics the HTTP router records (the model tag: the name it serves)."""

    def __init__(self, model_name: str) -> None:
        self._m = _metrics_for("router", model_name)

    def request(self, route: str, status: int) -> None:
        """One HTTP answer; a 504 is also a deadline shed."""
        self._m[REQUESTS].inc(1, tags={"route": route_label(route), "status": str(status)})
        if status == 504:
            self._m[DEADLINE_EXCEEDED].inc(1)
            self.shed_request("deadline")

    def shed_request(self, reason: str) -> None:
        self._m[SHED].inc(1, tags={"reason": shed_reason(reason)})

    def admitted(self, predicted_wait_s: float) -> None:
        self._m[PREDICTED_WAIT].observe(predicted_wait_s)

    def batch_sent(self, size: int) -> None:
        self._m[BATCH_SIZE].observe(float(size))

    def cancelled(self) -> None:
        self._m[CANCELLED].inc(1)

    def first_event(self, arrival: float, now: float) -> None:
        self._m[QUEUE_WAIT].observe(now - arrival)

    def first_token(self, arrival: float, now: float) -> None:
        self._m[TTFT].observe(now - arrival, tags={"side": "router"})

    def finished(self, arrival: float, now: float) -> None:
        self._m[E2E].observe(now - arrival)


class ReplicaMetrics:
    """Metrics an LLM replica records: its engine's figures, refreshed at every stats poll,
    and per-request figures from the chunks it forwards (:meth:`track`)."""

    def __init__(self, model_name: str) -> None:
        self._m = _metrics_for("replica", model_name)
        self._totals = {spec: 0 for spec in _COUNTER_TOTALS}
        self._last_step = 0

    def record_stats(self, stats: EngineStats) -> None:
        """Set every gauge (Ray drops a gauge that is not re-set), add the counters' growth
        since the last poll and observe the steps run since then."""
        for spec, value in _GAUGE_VALUES.items():
            self._m[spec].set(float(value(stats)))
        for spec, total in _COUNTER_TOTALS.items():
            grown = total(stats) - self._totals[spec]
            if grown > 0:
                self._m[spec].inc(float(grown))
                self._totals[spec] = total(stats)
        for step in stats.recent_steps:
            if step.index <= self._last_step:
                continue
            self._m[STEP_BATCH_SIZE].observe(float(step.batch_size))
            self._m[STEP_TOKENS].observe(float(step.tokens))
            self._m[STEP_TIME].observe(step.seconds)
            self._last_step = step.index

    def track(self) -> RequestTracker:
        """A tracker for one request's chunks (started now, as the replica received it)."""
        return RequestTracker(self._m)


class RequestTracker:
    """Per-request figures at the replica: TTFT, inter-token gaps, and on each choice's end
    its finish reason, lengths and engine timing."""

    def __init__(self, metrics: dict[MetricSpec, Any]) -> None:
        self._m = metrics
        self._started = time.monotonic()
        self._last_token: dict[int, float] = {}  # choice index -> when its last token came
        self._open: set[int] = set()  # choices seen and not finished
        self._done: set[int] = set()

    def chunk(self, chunk: GenerationChunk) -> None:
        now = time.monotonic()
        if chunk.token_ids:
            if not self._last_token:
                self._m[TTFT].observe(now - self._started, tags={"side": "replica"})
            previous = self._last_token.get(chunk.index)
            if previous is not None:
                gap = (now - previous) / len(chunk.token_ids)
                for _ in chunk.token_ids:
                    self._m[ITL].observe(gap)
            self._last_token[chunk.index] = now
        if chunk.finish_reason is None:
            self._open.add(chunk.index)
            return
        self._open.discard(chunk.index)
        self._done.add(chunk.index)
        self._m[FINISHED].inc(1, tags={"reason": chunk.finish_reason})
        self._m[PROMPT_LENGTH].observe(float(chunk.prompt_tokens))
        self._m[GENERATION_LENGTH].observe(float(chunk.completion_tokens))
        timing = chunk.timing
        if timing is None:
            return
        self._m[REQUEST_QUEUE_TIME].observe(timing.queue_s)
        self._m[PREFILL_TIME].observe(timing.prefill_s)
        self._m[DECODE_TIME].observe(timing.decode_s)
        if chunk.completion_tokens > 1:
            self._m[TPOT].observe(timing.decode_s / (chunk.completion_tokens - 1))
        if timing.window_tokens > 0:
            self._m[CONTEXT_WINDOW_RATIO].observe(timing.context_tokens / timing.window_tokens)

    def ended(self, reason: Literal["abort", "error"], choices: int) -> None:
        """The request ended without its last chunks: its ``choices`` not finished count."""
        unfinished = max(0, choices - len(self._done))
        if unfinished:
            self._m[FINISHED].inc(float(unfinished), tags={"reason": reason})
