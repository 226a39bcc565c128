"""The dashboards as data: panels whose queries are built from app/metrics.py's MetricSpecs.

:func:`dashboards` returns every dashboard as plain Grafana JSON (dicts); :func:`write` writes
them to ``dashboards/json/<name>.json`` deterministically (sorted keys, fixed ids), so running
it twice gives identical files. A panel's description ends with the descriptions of the
metrics its queries read, and its unit comes with it; queries use Grafana's ``$model``,
``$replica`` and ``$__rate_interval`` variables (:func:`concrete` fills them in for running a
query on Prometheus directly, as the integration test and ``ringserve dashboards render`` do).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app import metrics as m
from app.metrics import MetricSpec

DATASOURCE_UID = "ringserve-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
JSON_DIR = Path(__file__).resolve().parent / "json"
QUANTILES = (0.5, 0.9, 0.99)
LLM_DEPLOYMENT = "LLMServer"  # app.main's deployment names (Ray Serve's deployment label)
ROUTER_DEPLOYMENT = "Router"


@dataclass(frozen=True)
class Query:
    """One PromQL query of a panel and the ringserve metrics it reads."""

    expr: str
    legend: str
    specs: tuple[MetricSpec, ...] = ()


@dataclass(frozen=True)
class Panel:
    title: str
    text: str  # what the panel shows, for its description
    unit: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # or "stat"
    width: int = 8


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    name: str  # file name and uid suffix
    title: str
    description: str
    rows: tuple[Row, ...]
    per_replica: bool = False
    variables: tuple[str, ...] = field(default=("model",))


# Query builders ------------------------------------------------------------------------------
class Scope:
    """Label filters every ringserve selector of a dashboard carries."""

    def __init__(self, per_replica: bool) -> None:
        self.filters = 'model=~"$model"' + (', replica=~"$replica"' if per_replica else "")

    def sel(self, spec: MetricSpec, suffix: str = "", extra: str = "") -> str:
        name = m.PROMETHEUS_PREFIX + spec.name + suffix
        if spec.kind == "counter":
            name += "_total"
        labels = self.filters + (f", {extra}" if extra else "")
        return f"{name}{{{labels}}}"

    def rate(self, spec: MetricSpec, by: str = "", legend: str = "", extra: str = "") -> Query:
        grouping = f"sum by ({by}) " if by else "sum "
        expr = f"{grouping}(rate({self.sel(spec, extra=extra)}[$__rate_interval]))"
        return Query(expr, legend or (_legend(by) if by else spec.name), (spec,))

    def gauge(self, spec: MetricSpec, by: str = "", legend: str = "", agg: str = "sum"
              ) -> Query:
        grouping = f"{agg} by ({by}) " if by else f"{agg} "
        return Query(f"{grouping}({self.sel(spec)})",
                     legend or (_legend(by) if by else spec.name), (spec,))

    def quantiles(self, spec: MetricSpec, label: str = "", by: str = "", extra: str = "",
                  qs: Sequence[float] = QUANTILES) -> tuple[Query, ...]:
        keys = "le" + (f", {by}" if by else "")
        bucket = f"rate({self.sel(spec, '_bucket', extra)}[$__rate_interval])"
        prefix = f"{label} " if label else ""
        group = (_legend(by) + " ") if by else ""
        return tuple(Query(f"histogram_quantile({q:g}, sum by ({keys}) ({bucket}))",
                           f"{group}{prefix}p{round(q * 100):d}", (spec,)) for q in qs)

    def mean(self, spec: MetricSpec, by: str = "", legend: str = "") -> Query:
        grouping = f"sum by ({by}) " if by else "sum "
        total = f"{grouping}(rate({self.sel(spec, '_sum')}[$__rate_interval]))"
        count = f"{grouping}(rate({self.sel(spec, '_count')}[$__rate_interval]))"
        return Query(f"{total} / {count}",
                     legend or ((_legend(by) + " mean") if by else "mean"), (spec,))


def _legend(by: str) -> str:
    return " ".join("{{" + label.strip() + "}}" for label in by.split(","))


def serve_query(expr: str, legend: str) -> Query:
    """A query on Ray Serve's own ``ray_serve_*`` metrics (no ringserve spec)."""
    return Query(expr, legend)


# The dashboards --------------------------------------------------------------------------------
def overview() -> Dashboard:
    s = Scope(per_replica=False)
    llm = f'deployment="{LLM_DEPLOYMENT}"'
    return Dashboard("overview", "ringserve / overview",
                     "The whole service: traffic, shedding, latency, tokens, scheduler and "
                     "KV cache, the sliding window, and Ray Serve's replicas.", (
        Row("Traffic", (
            Panel("HTTP requests by route and status", "Answers per second from the router.",
                  "reqps", (s.rate(m.REQUESTS, "route, status"),)),
            Panel("Shed requests by reason",
                  "Requests refused before they ran, per second, and why.", "reqps",
                  (s.rate(m.SHED, "reason"),)),
            Panel("Finished sequences by reason",
                  "How sequences ended on the replicas, per second.", "reqps",
                  (s.rate(m.FINISHED, "reason"),)),
            Panel("Cancelled and deadline-exceeded requests",
                  "Requests ended early by the client, and 504s.", "reqps",
                  (s.rate(m.CANCELLED, legend="cancelled"),
                   s.rate(m.DEADLINE_EXCEEDED, legend="deadline exceeded (504)"))),
        )),
        Row("Latency", (
            Panel("Time to first token (router)", "p50 / p90 / p99 seen at the router.", "s",
                  s.quantiles(m.TTFT, extra='side="router"')),
            Panel("Inter-token latency", "p50 / p90 / p99 gap between output tokens.", "s",
                  s.quantiles(m.ITL)),
            Panel("End-to-end request latency", "p50 / p90 / p99, arrival to last token.",
                  "s", s.quantiles(m.E2E)),
            Panel("Time per output token", "p50 / p90 / p99 of decode time per token, per "
                  "sequence.", "s", s.quantiles(m.TPOT)),
            Panel("Queue time", "Router: arrival to first engine event; engine: waiting for "
                  "a cache slot (p50 / p99).", "s",
                  s.quantiles(m.QUEUE_WAIT, "router", qs=(0.5, 0.99))
                  + s.quantiles(m.REQUEST_QUEUE_TIME, "engine", qs=(0.5, 0.99))),
            Panel("Prefill and decode time", "Per sequence, p50 / p99.", "s",
                  s.quantiles(m.PREFILL_TIME, "prefill", qs=(0.5, 0.99))
                  + s.quantiles(m.DECODE_TIME, "decode", qs=(0.5, 0.99))),
        )),
        Row("Tokens", (
            Panel("Tokens per second in and out", "Prompt tokens prefilled and output tokens "
                  "generated, per second.", "short",
                  (s.rate(m.PROMPT_TOKENS, legend="prompt (in)"),
                   s.rate(m.GENERATED_TOKENS, legend="generated (out)"))),
            Panel("Prompt and generation length", "Tokens per finished sequence, p50 / p90.",
                  "short", s.quantiles(m.PROMPT_LENGTH, "prompt", qs=(0.5, 0.9))
                  + s.quantiles(m.GENERATION_LENGTH, "generation", qs=(0.5, 0.9))),
            Panel("Tokens in the last hour and day", "Prompt and output tokens over the "
                  "last 1 h and 24 h.", "short",
                  (Query(f"sum(increase({s.sel(m.PROMPT_TOKENS)}[1h]))", "prompt, 1 h",
                         (m.PROMPT_TOKENS,)),
                   Query(f"sum(increase({s.sel(m.GENERATED_TOKENS)}[1h]))", "generated, 1 h",
                         (m.GENERATED_TOKENS,)),
                   Query(f"sum(increase({s.sel(m.PROMPT_TOKENS)}[1d]))", "prompt, 24 h",
                         (m.PROMPT_TOKENS,)),
                   Query(f"sum(increase({s.sel(m.GENERATED_TOKENS)}[1d]))", "generated, 24 h",
                         (m.GENERATED_TOKENS,))), kind="stat"),
            Panel("Drain rate", "Tokens per busy second the replicas report (the router "
                  "sheds from these).", "short",
                  (s.gauge(m.TOKENS_PER_S, legend="prefill + decode"),
                   s.gauge(m.PREFILL_TOKENS_PER_S, legend="prefill"))),
        )),
        Row("Scheduler and KV cache", (
            Panel("Running and waiting", "Sequences holding cache blocks, sequences waiting "
                  "for them, over all replicas.", "short",
                  (s.gauge(m.RUNNING, legend="running"), s.gauge(m.WAITING, legend="waiting"))),
            Panel("Waiting prompt tokens", "Prompt tokens not yet prefilled.", "short",
                  (s.gauge(m.WAITING_TOKENS, legend="waiting tokens"),)),
            Panel("KV cache usage", "Share of the KV cache bytes in use, over all replicas.",
                  "percentunit", (Query(f"sum({s.sel(m.KV_USED)}) / sum({s.sel(m.KV_TOTAL)})",
                                        "used / allocated", (m.KV_USED, m.KV_TOTAL)),)),
            Panel("KV cache blocks", "Blocks of the paged cache held by sequences, and the "
                  "pool's size, over all replicas.", "short",
                  (s.gauge(m.KV_BLOCKS_USED, legend="used"),
                   s.gauge(m.KV_BLOCKS_TOTAL, legend="total"))),
            Panel("Preemptions per second", "Sequences preempted per second, over all "
                  "replicas: a decoding sequence found no free block, so the newest one gave "
                  "its blocks back to be recomputed (steadily above 0: the pool is too small "
                  "for the load).", "short", (s.rate(m.PREEMPTIONS, legend="preemptions/s"),)),
            Panel("Engine batch size", "Sequences per engine step: mean and p90.", "short",
                  (s.mean(m.STEP_BATCH_SIZE),
                   *s.quantiles(m.STEP_BATCH_SIZE, qs=(0.9,)))),
            Panel("Engine step time", "Duration of one engine step, p50 / p99.", "s",
                  s.quantiles(m.STEP_TIME, qs=(0.5, 0.99))),
            Panel("Tokens per engine step", "Mean and p90 tokens one step ran.", "short",
                  (s.mean(m.STEP_TOKENS), *s.quantiles(m.STEP_TOKENS, qs=(0.9,)))),
            Panel("Router micro-batch size", "Requests per router-to-replica call: mean and "
                  "p90.", "short", (s.mean(m.BATCH_SIZE), *s.quantiles(m.BATCH_SIZE, qs=(0.9,)))),
            Panel("Predicted queue wait", "What admission control predicted for the requests "
                  "it admitted, p50 / p99.", "s", s.quantiles(m.PREDICTED_WAIT, qs=(0.5, 0.99))),
        )),
        Row("Sliding window and rolling cache", (
            Panel("Sequences past the window", "Share of running sequences whose context "
                  "has passed W (attention sees only their last W tokens).", "percentunit",
                  (Query(f"sum({s.sel(m.PAST_WINDOW)}) / clamp_min(sum({s.sel(m.RUNNING)}), 1)",
                         "past W / running", (m.PAST_WINDOW, m.RUNNING)),)),
            Panel("Ring overwrites per second", "KV rows the rolling buffer overwrote per "
                  "second.", "short", (s.rate(m.RING_OVERWRITES, legend="rows/s"),)),
            Panel("Context length relative to W", "Finished sequences' context / W, p50 / "
                  "p90 / p99 (above 1: attention saw only the last W tokens).", "short",
                  s.quantiles(m.CONTEXT_WINDOW_RATIO)),
            Panel("Window W", "Rows per sequence of the rolling buffer.", "short",
                  (s.gauge(m.WINDOW, legend="W", agg="max"),), kind="stat"),
        )),
        Row("Replicas (Ray Serve)", (
            Panel("Replicas and healthy replicas", "Ray Serve's replica count and how many "
                  "pass their health check, per deployment.", "short",
                  (serve_query("count by (deployment) (ray_serve_deployment_replica_healthy)",
                               "{{deployment}} replicas"),
                   serve_query("sum by (deployment) (ray_serve_deployment_replica_healthy)",
                               "{{deployment}} healthy"))),
            Panel("Serve requests per replica", "Calls Ray Serve handled per second, per "
                  "LLM replica (batch calls, polls, aborts).", "reqps",
                  (serve_query("sum by (replica) (rate(ray_serve_deployment_request_counter_"
                               f"total{{{llm}}}[$__rate_interval]))", "{{replica}}"),)),
            Panel("Serve processing latency", "Ray Serve's p99 time per call, per deployment.",
                  "ms", (serve_query(
                      "histogram_quantile(0.99, sum by (le, deployment) (rate(ray_serve_"
                      "deployment_processing_latency_ms_bucket[$__rate_interval])))",
                      "{{deployment}} p99"),)),
        )),
    ))


def per_replica() -> Dashboard:
    s = Scope(per_replica=True)
    llm = f'deployment="{LLM_DEPLOYMENT}"'
    return Dashboard("replica", "ringserve / per replica",
                     "One LLM replica at a time (or several): pick them with the replica "
                     "variable.", (
        Row("Load", (
            Panel("Running and waiting", "Per replica.", "short",
                  (s.gauge(m.RUNNING, "replica", "{{replica}} running"),
                   s.gauge(m.WAITING, "replica", "{{replica}} waiting"))),
            Panel("Finished sequences per second", "QPS per replica, by finish reason.",
                  "reqps", (s.rate(m.FINISHED, "replica, reason"),)),
            Panel("Tokens per second out", "Output tokens generated per second, per replica.",
                  "short", (s.rate(m.GENERATED_TOKENS, "replica", "{{replica}}"),)),
            Panel("KV cache usage", "Share of the replica's KV cache bytes in use.",
                  "percentunit", (Query(f"sum by (replica) ({s.sel(m.KV_USED)}) / sum by "
                                        f"(replica) ({s.sel(m.KV_TOTAL)})", "{{replica}}",
                                        (m.KV_USED, m.KV_TOTAL)),)),
            Panel("Drain rate", "Tokens per busy second, per replica.", "short",
                  (s.gauge(m.TOKENS_PER_S, "replica", "{{replica}}"),)),
            Panel("Waiting prompt tokens", "Per replica.", "short",
                  (s.gauge(m.WAITING_TOKENS, "replica", "{{replica}}"),)),
            Panel("Preemptions per second", "Sequences sent back for recompute per second, "
                  "per replica (no free KV cache block).", "short",
                  (s.rate(m.PREEMPTIONS, "replica", "{{replica}}"),)),
        )),
        Row("Latency and steps", (
            Panel("Time to first token (replica)", "p50 / p99 from arrival at the replica.",
                  "s", s.quantiles(m.TTFT, by="replica", extra='side="replica"',
                                   qs=(0.5, 0.99))),
            Panel("Inter-token latency", "p50 / p99 per replica.", "s",
                  s.quantiles(m.ITL, by="replica", qs=(0.5, 0.99))),
            Panel("Engine step time", "p50 / p99 per replica.", "s",
                  s.quantiles(m.STEP_TIME, by="replica", qs=(0.5, 0.99))),
            Panel("Engine batch size", "Mean sequences per step, per replica.", "short",
                  (s.mean(m.STEP_BATCH_SIZE, "replica"),)),
        )),
        Row("Sliding window", (
            Panel("Sequences past the window", "Running sequences whose context has passed W.",
                  "short", (s.gauge(m.PAST_WINDOW, "replica", "{{replica}}"),)),
            Panel("Ring overwrites per second", "Per replica.", "short",
                  (s.rate(m.RING_OVERWRITES, "replica", "{{replica}}"),)),
        )),
        Row("Ray Serve", (
            Panel("Replica health", "1 when the replica passes Ray Serve's health check.",
                  "short", (serve_query('max by (replica) (ray_serve_deployment_replica_'
                                        f'healthy{{{llm}, replica=~"$replica"}})',
                                        "{{replica}}"),)),
            Panel("Calls in flight", "Calls the replica is processing (Ray Serve).", "short",
                  (serve_query('sum by (replica) (ray_serve_replica_processing_queries'
                               f'{{{llm}, replica=~"$replica"}})', "{{replica}}"),)),
        )),
    ), per_replica=True, variables=("model", "replica"))


def all_dashboards() -> tuple[Dashboard, ...]:
    return (overview(), per_replica())


# JSON --------------------------------------------------------------------------------------------
def _variable(name: str) -> dict[str, Any]:
    anchor = m.PROMETHEUS_PREFIX + m.RUNNING.name
    query = (f"label_values({anchor}, model)" if name == "model"
             else f'label_values({anchor}{{model=~"$model"}}, replica)')
    return {"name": name, "label": name, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-values"}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1, "hide": 0, "options": []}


def description(panel: Panel) -> str:
    """The panel's text, then each metric it reads with that metric's own description."""
    lines = [panel.text]
    seen: list[MetricSpec] = []
    for query in panel.queries:
        seen.extend(spec for spec in query.specs if spec not in seen)
    if seen:
        lines.append("")
        lines.extend(f"{spec.prometheus_name}: {spec.description}." for spec in seen)
    elif any("ray_serve_" in q.expr for q in panel.queries):
        lines.append("")
        lines.append("From Ray Serve's own ray_serve_* metrics.")
    return "\n".join(lines)


def to_json(dashboard: Dashboard) -> dict[str, Any]:
    """Grafana's dashboard model for ``dashboard`` (ids and positions fixed by order)."""
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for row in dashboard.rows:
        panels.append({"type": "row", "title": row.title, "id": next_id, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        x = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel_json(panel, next_id, x, y))
            next_id += 1
            x += panel.width
        y += 8
    return {
        "uid": f"ringserve-{dashboard.name}", "title": dashboard.title,
        "description": dashboard.description, "tags": ["ringserve", "llm"],
        "editable": True, "graphTooltip": 1, "refresh": "10s", "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"}, "timezone": "browser", "version": 1,
        "templating": {"list": [_variable(v) for v in dashboard.variables]},
        "annotations": {"list": []}, "links": [], "panels": panels,
    }


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [{"refId": chr(ord("A") + i), "expr": q.expr, "legendFormat": q.legend,
                "datasource": DATASOURCE, "range": True}
               for i, q in enumerate(panel.queries)]
    out: dict[str, Any] = {
        "id": panel_id, "type": panel.kind, "title": panel.title,
        "description": description(panel), "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": targets,
    }
    if panel.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom",
                                     "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "none"}}
    else:
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                            "values": False}}
    return out


def render_json(dashboard: Dashboard) -> str:
    return json.dumps(to_json(dashboard), indent=2, sort_keys=True) + "\n"


def write(out_dir: Path = JSON_DIR) -> list[Path]:
    """Write every dashboard's JSON file into ``out_dir``; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for dashboard in all_dashboards():
        path = out_dir / f"{dashboard.name}.json"
        path.write_text(render_json(dashboard))
        paths.append(path)
    return paths


def stale(out_dir: Path = JSON_DIR) -> list[Path]:
    """Committed files that differ from what :func:`write` would write (or are missing)."""
    return [out_dir / f"{d.name}.json" for d in all_dashboards()
            if not (out_dir / f"{d.name}.json").exists()
            or (out_dir / f"{d.name}.json").read_text() != render_json(d)]


# Running panel queries outside Grafana ----------------------------------------------------------
def concrete(expr: str, rate_interval: str = "1m", model: str = ".*", replica: str = ".*"
             ) -> str:
    """``expr`` with Grafana's variables filled in, for Prometheus's own API."""
    return (expr.replace("$__rate_interval", rate_interval)
            .replace("$model", model).replace("$replica", replica))


def panel_queries(dashboard_json: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel of a dashboard JSON."""
    return [(p["title"], t["expr"]) for p in dashboard_json["panels"] if p["type"] != "row"
            for t in p["targets"]]


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACES = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: every identifier that is not a function,
    keyword, label (in a matcher or a grouping) or duration."""
    text = _STRINGS.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name, call in _IDENTIFIER.findall(text)
            if not call and name.lower() not in _KEYWORDS}
