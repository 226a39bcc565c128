"""Draw a dashboard without Grafana: every panel's queries run on Prometheus's HTTP API
(``query_range``) and drawn as one small matplotlib chart per panel, in one PNG.

For machines where no Grafana server can run; the integration test uses it to show what the
panels show on real data. matplotlib is imported only when drawing.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from dashboards.build import concrete

COLUMNS = 4
TIMEOUT_S = 10.0


class PrometheusError(Exception):
    """Prometheus could not be reached or refused a query, or matplotlib is missing (one line)."""


def prometheus_get(base_url: str, path: str, params: dict[str, str]) -> Any:
    """GET ``/api/v1/<path>``; the ``data`` member of a successful answer."""
    url = f"{base_url.rstrip('/')}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback
    try:
        with opener.open(url, timeout=TIMEOUT_S) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:200]
        raise PrometheusError(f"Prometheus answered {exc.code} for {params}: {detail}") from None
    except (OSError, ValueError) as exc:
        raise PrometheusError(f"cannot query Prometheus at {base_url}: {exc}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus refused {params}: {body.get('error')}")
    return body["data"]


def query_range(base_url: str, expr: str, start: float, end: float, step_s: float
                ) -> list[dict[str, Any]]:
    """The matrix result of a range query (one entry per series)."""
    data = prometheus_get(base_url, "query_range", {
        "query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"})
    return list(data["result"])


def legend_text(template: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend format filled in from a series' labels."""
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out or ",".join(f"{k}={v}" for k, v in labels.items()) or "value"


def render(dashboard: dict[str, Any], prometheus_url: str, out: Path, minutes: float = 15.0,
           end: float | None = None, rate_interval: str = "1m") -> Path:
    """Draw every panel of ``dashboard`` over the last ``minutes`` into ``out`` (PNG)."""
    try:
        import matplotlib
    except ImportError:
        raise PrometheusError("matplotlib is not installed: pip install "
                              "'ringserve[monitoring]' (or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = end if end is not None else time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 240)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    rows = math.ceil(len(panels) / COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(4.2 * COLUMNS, 2.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        drawn = 0
        for target in panel["targets"]:
            expr = concrete(target["expr"], rate_interval)
            for series in query_range(prometheus_url, expr, start, end, step):
                points = [(float(t) - end, float(v)) for t, v in series["values"]
                          if math.isfinite(float(v))]
                if not points:
                    continue
                xs, ys = zip(*points, strict=True)
                ax.plot([x / 60 for x in xs], ys, linewidth=1.2,
                        label=legend_text(target.get("legendFormat", ""), series["metric"])[:40])
                drawn += 1
        unit = panel["fieldConfig"]["defaults"]["unit"]
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylabel(unit, fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_xlim(-minutes, 0)
        if drawn:
            ax.legend(fontsize=6, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{dashboard['title']} (last {minutes:.3g} min, x: minutes ago)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
