"""``ringserve dashboards build|push|render`` (and ``python -m dashboards``).

build: regenerate dashboards/json/*.json (``--check``: exit 1 when the committed files are
stale). push: upload datasource + dashboards to a running Grafana (cluster/grafana.py).
render: draw every panel of a dashboard from a Prometheus into one PNG (no Grafana needed).
Failures a user can cause print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_FAILED = 1


def add_dashboards_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``dashboards`` and its subcommands on the CLI's subparsers."""
    p = sub.add_parser("dashboards", help="build, push or render the Grafana dashboards",
                       description=__doc__)
    _add_subcommands(p)


def _add_subcommands(p: argparse.ArgumentParser) -> None:
    from dashboards.build import JSON_DIR

    sub = p.add_subparsers(dest="dashboards_command", required=True)
    build = sub.add_parser("build", help="regenerate dashboards/json/*.json")
    build.add_argument("--out", type=Path, default=JSON_DIR, help=f"default {JSON_DIR}")
    build.add_argument("--check", action="store_true",
                       help="write nothing; exit 1 when a file differs from what build writes")
    push = sub.add_parser("push", help="upload the datasource and dashboards to Grafana")
    push.add_argument("--url", required=True, help="Grafana's URL, e.g. http://127.0.0.1:3000")
    push.add_argument("--token", default=None,
                      help="a Grafana service-account token (Editor or Admin)")
    push.add_argument("--prometheus-url", default=None,
                      help="the Prometheus Grafana should query (default http://127.0.0.1:9090)")
    render = sub.add_parser("render", help="draw a dashboard's panels from Prometheus to a PNG")
    render.add_argument("--prometheus-url", default="http://127.0.0.1:9090")
    render.add_argument("--dashboard", default="overview", help="overview or replica")
    render.add_argument("--minutes", type=float, default=15.0, help="time range to draw")
    render.add_argument("--out", type=Path, default=Path("ringserve-dashboard.png"))


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``dashboards`` subcommand."""
    command = args.dashboards_command
    if command == "build":
        from dashboards.build import stale, write

        if args.check:
            old = stale(args.out)
            for path in old:
                print(f"ringserve: stale dashboard {path} (run `python -m dashboards`)",
                      file=sys.stderr)
            return EXIT_FAILED if old else 0
        for path in write(args.out):
            print(path)
        return 0
    if command == "push":
        return _push(args)
    return _render(args)


def _push(args: argparse.Namespace) -> int:
    from cluster.grafana import DEFAULT_PROMETHEUS_URL, PushError, push
    from dashboards.build import JSON_DIR, all_dashboards, write

    files = [JSON_DIR / f"{d.name}.json" for d in all_dashboards()]
    if not all(f.exists() for f in files):
        files = write()
    try:
        result = push(args.url, args.token, files, args.prometheus_url or DEFAULT_PROMETHEUS_URL)
    except PushError as exc:
        print(f"ringserve: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"ringserve: datasource {result.datasource}; dashboards saved: "
          f"{', '.join(result.dashboards)}")
    return 0


def _render(args: argparse.Namespace) -> int:
    from dashboards.build import all_dashboards, to_json
    from dashboards.render import PrometheusError, render

    chosen = [d for d in all_dashboards() if d.name == args.dashboard]
    if not chosen:
        print(f"ringserve: error: no dashboard {args.dashboard!r} (overview or replica)",
              file=sys.stderr)
        return EXIT_FAILED
    try:
        path = render(to_json(chosen[0]), args.prometheus_url, args.out,
                      minutes=args.minutes)
    except PrometheusError as exc:
        print(f"ringserve: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dashboards [build|push|render] ...``."""
    parser = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__)
    _add_subcommands(parser)
    return run(parser.parse_args(argv))
