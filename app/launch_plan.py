"""The launch plan of ``ringserve serve``: what ``serve run`` runs, where, with which limits.

Bad knobs are caught here, before Ray starts: app args (``key=value``) or a Serve config file
are checked with :class:`~app.config.AppConfig` as ``app.main:build_app`` will check them; the
address comes from the flags, then the args or config, then 127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
BUILDER = "app.main:build_app"


class ServeCliError(Exception):
    """A problem the user can fix (port taken, bad flag, bad config): reported in one line."""


def _serve_executable() -> str:
    beside = Path(sys.executable).parent / "serve"
    found = str(beside) if beside.exists() else shutil.which("serve")
    if not found:
        raise ServeCliError("the Ray Serve CLI (`serve`) is not installed next to this Python")
    return found


def parse_app_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ServeCliError(f"app args are key=value, got {item!r}")
        out[key] = value
    return out


@dataclass(frozen=True)
class Launch:
    """What ``serve run`` runs: app args for ``app.main:build_app`` or a Serve config mapping,
    and the address the API is offered at (host/port are not part of the app args)."""

    app_args: dict[str, str]
    config: dict[str, Any] | None
    host: str
    port: int


def plan_launch(args: argparse.Namespace) -> Launch:
    """Read and check the app args or config file; address: flags, then args/config, then
    127.0.0.1:8000. Bad knobs are caught here, before Ray starts."""
    if args.config and args.app_args:
        raise ServeCliError("give either --config or app args, not both")
    host, port = DEFAULT_HOST, str(DEFAULT_PORT)
    config: dict[str, Any] | None = None
    app_args = parse_app_args(args.app_args)
    if args.config:
        import yaml

        try:
            config = yaml.safe_load(Path(args.config).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ServeCliError(f"cannot read --config {args.config}: {exc}") from None
        if not isinstance(config, dict):
            raise ServeCliError(f"--config {args.config} is not a Serve config mapping")
        http = config.get("http_options") or {}
        host, port = str(http.get("host") or host), str(http.get("port") or port)
        for values in _builder_args(config):
            check_app_args(values)
    else:
        host = app_args.pop("host", "") or host
        port = app_args.pop("port", "") or port
        check_app_args(app_args)
    host = args.host or host
    try:
        number = args.port or int(port)
    except ValueError:
        raise ServeCliError(f"port {port!r} is not a number") from None
    if not 1 <= number <= 65535:
        raise ServeCliError(f"port {number} is not in 1..65535")
    return Launch(app_args, config, host, number)


def _builder_args(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The args of each application of a Serve config that ringserve's builder builds."""
    return [dict(application.get("args") or {})
            for application in config.get("applications") or []
            if isinstance(application, dict) and application.get("import_path") == BUILDER]


def edge_env(launch: Launch) -> dict[str, str]:
    """Environment for Serve's proxy to enforce the apps' size limits and stall timeout
    (app/edge.py); with a config file, the largest of its applications' (each router checks
    its own)."""
    from app.config import AppConfig
    from app.edge import proxy_env

    arg_sets = ([dict(a.get("args") or {}) for a in launch.config.get("applications") or []]
                if launch.config is not None else [dict(launch.app_args)])
    configs = [AppConfig.model_validate(args) for args in arg_sets] or [AppConfig()]
    stalls = [c.stream_stall_timeout_s for c in configs]  # the most patient app's (None: never)
    return proxy_env(max(c.max_body_bytes for c in configs),
                     max(c.max_header_bytes for c in configs),
                     None if None in stalls else max(s for s in stalls if s is not None))


def check_app_args(values: dict[str, Any]) -> None:
    """Validate knobs with AppConfig (as build_app will); the first problem as ServeCliError."""
    from pydantic import ValidationError

    from app.config import AppConfig

    try:
        AppConfig.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "app args"
        raise ServeCliError(f"bad app arg {where}: {first['msg']}") from None


def thread_split(launch: Launch) -> str:
    """The torch threads each CPU replica will use on this machine (printed at start)."""
    from app.config import AppConfig, available_cpus

    values = (_builder_args(launch.config or {}) or [dict(launch.app_args)])[-1]
    config = AppConfig.model_validate(values)
    cpus = available_cpus()
    replicas = config.autoscaling.max_replicas if config.autoscaling else config.num_replicas
    threads = config.replica_threads(cpus)
    how = "replica_torch_threads" if config.replica_torch_threads else (
        f"{cpus} cores, router {config.router_num_cpus * config.router_replicas:g} CPU")
    return (f"{replicas} LLM replica(s) x {threads} torch thread(s) each on CPU ({how}; "
            "set replica_torch_threads=N to change)")


def serve_command(launch: Launch, host: str, port: int, tmp: Path) -> list[str]:
    """``serve run`` for the app args or the config file, its HTTP proxy at host:port."""
    if launch.config is not None:
        import yaml

        config = {**launch.config, "http_options": {
            **(launch.config.get("http_options") or {}), "host": host, "port": port}}
        path = tmp / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return [_serve_executable(), "run", str(path)]
    app_args = {**launch.app_args, "host": host, "port": str(port)}
    return [_serve_executable(), "run", BUILDER,
            *(f"{k}={v}" for k, v in app_args.items())]
