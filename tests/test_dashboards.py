"""Dashboards: generated from app/metrics.py, committed JSON up to date, queries name only
defined metrics, every panel has a unit and a description."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.metrics import METRICS, exported_names
from dashboards import build
from dashboards.build import JSON_DIR, all_dashboards, metric_names, panel_queries, to_json
from dashboards.cli import main as dashboards_main

RINGSERVE_NAMES = {name for spec in METRICS for name in exported_names(spec)}
SUFFIXES = re.compile(r"_(total|bucket|sum|count)$")


def _ray_serve_metric_names() -> set[str]:
    """Every metric name Ray Serve's own code defines (as Prometheus sees it, ray_ prefixed)."""
    import ray.serve

    root = Path(ray.serve.__file__).parent
    names = set()
    for source in root.rglob("*.py"):
        names.update(re.findall(r"[\"'](serve_[a-z0-9_]+)[\"']", source.read_text()))
    return {f"ray_{n}" for n in names}


def _panels(dashboard_json: dict) -> list[dict]:
    return [p for p in dashboard_json["panels"] if p["type"] != "row"]


def test_committed_json_is_what_the_generator_writes(tmp_path: Path) -> None:
    first = build.write(tmp_path / "a")
    second = build.write(tmp_path / "b")
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()  # deterministic
        committed = JSON_DIR / a.name
        assert committed.exists(), f"{committed} missing: run `python -m dashboards`"
        assert committed.read_text() == a.read_text(), (
            f"{committed} is stale: run `python -m dashboards` and commit the result")
    assert build.stale() == []


def test_check_flag_fails_on_stale_files(tmp_path: Path) -> None:
    assert dashboards_main(["build", "--check", "--out", str(tmp_path)]) == 1  # missing
    assert dashboards_main(["build", "--out", str(tmp_path)]) == 0
    assert dashboards_main(["build", "--check", "--out", str(tmp_path)]) == 0
    path = tmp_path / "overview.json"
    path.write_text(path.read_text().replace("ringserve", "edited", 1))
    assert dashboards_main(["build", "--check", "--out", str(tmp_path)]) == 1


def test_metric_name_parser_sees_selectors_only() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, replica) (rate(ray_a_bucket{model=~"$m", '
            'side="router"}[$__rate_interval]))) / on (replica) group_left up '
            '+ clamp_min(sum without (le) (ray_b), 1) > bool 0')
    assert metric_names(expr) == {"ray_a_bucket", "up", "ray_b"}


def test_queries_name_only_metrics_ringserve_or_ray_serve_define() -> None:
    serve_names = _ray_serve_metric_names()
    assert "ray_serve_deployment_replica_healthy" in serve_names
    unknown = []
    for dashboard in all_dashboards():
        for title, expr in panel_queries(to_json(dashboard)):
            names = metric_names(expr)
            assert names, (title, expr)
            for name in names:
                known = (name in RINGSERVE_NAMES
                         or (name.startswith("ray_serve_")
                             and SUFFIXES.sub("", name) in serve_names))
                if not known:
                    unknown.append((dashboard.name, title, name))
    assert not unknown


def test_every_panel_has_a_unit_a_description_and_queries() -> None:
    for dashboard in all_dashboards():
        for panel in _panels(to_json(dashboard)):
            assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
            assert panel["description"].strip(), panel["title"]
            assert panel["targets"] and all(t["expr"] for t in panel["targets"])
            assert panel["datasource"]["uid"] == build.DATASOURCE_UID


def test_every_metric_is_shown_by_some_panel() -> None:
    used = {name for d in all_dashboards() for _, expr in panel_queries(to_json(d))
            for name in metric_names(expr)}
    unshown = [spec.name for spec in METRICS if not set(exported_names(spec)) & used]
    assert not unshown


def test_descriptions_quote_the_metrics_they_read() -> None:
    overview = to_json(build.overview())
    (kv,) = [p for p in _panels(overview) if p["title"] == "KV cache usage"]
    assert "ray_ringserve_kv_cache_used_bytes: KV cache bytes in use" in kv["description"]


def test_per_replica_view_filters_on_its_replica_variable() -> None:
    replica = to_json(build.per_replica())
    assert [v["name"] for v in replica["templating"]["list"]] == ["model", "replica"]
    for title, expr in panel_queries(replica):
        assert 'replica=~"$replica"' in expr, title


@pytest.mark.parametrize("name", ["overview", "replica"])
def test_json_files_are_grafana_dashboards(name: str) -> None:
    data = json.loads((JSON_DIR / f"{name}.json").read_text())
    assert data["uid"] == f"ringserve-{name}" and data["panels"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24


def test_docs_list_every_metric() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "monitoring.md").read_text()
    missing = [spec.name for spec in METRICS if f"`ray_{spec.name}" not in text]
    assert not missing, "docs/monitoring.md does not list these metrics"
