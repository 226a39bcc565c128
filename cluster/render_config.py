"""Write the Serve config a cluster deploys: cluster/serve_config.yaml with this cluster's
address, replica count and model filled in, every knob checked by AppConfig first.

    python -m cluster.render_config --out /tmp/serve.yaml --replicas 2 --host 0.0.0.0 \\
        --model /models/mistral --set max_model_len=8192

API keys come from the environment (``RINGSERVE_API_KEYS``, comma-separated), never from
the command line (a process list shows arguments). The file is written mode 600.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

BASE_CONFIG = Path(__file__).with_name("serve_config.yaml")
APP_IMPORT_PATH = "app.main:build_app"
API_KEYS_ENV = "RINGSERVE_API_KEYS"


class ConfigError(Exception):
    """A knob the user set is wrong: one line."""


def render(base: dict[str, Any], replicas: int, host: str, port: int, gpus_per_replica: float,
           overrides: dict[str, str]) -> dict[str, Any]:
    """``base`` with the HTTP address and the ringserve application's args set; validated."""
    from app.config import AppConfig
    from app.launch_plan import check_app_args

    config = dict(base)
    config["http_options"] = {**(base.get("http_options") or {}), "host": host, "port": port}
    apps = [a for a in config.get("applications") or [] if a.get("import_path") == APP_IMPORT_PATH]
    if len(apps) != 1:
        raise ConfigError(f"the base config needs exactly one {APP_IMPORT_PATH} application")
    args: dict[str, Any] = {**(apps[0].get("args") or {}), "num_replicas": replicas,
                            "replica_num_gpus": gpus_per_replica}
    args.update({key: value for key, value in overrides.items() if value != ""})
    keys = os.environ.get(API_KEYS_ENV, "")
    if keys:
        args["api_keys"] = keys
    check_app_args(args)  # the first problem as one line (ServeCliError)
    checked = AppConfig.model_validate(args)
    # Write back what was checked (strings parsed: "8192" -> 8192, "a,b" -> [a, b]).
    dumped = checked.model_dump()
    # keys are secret strings (they print masked); the file (mode 0600) needs their values
    dumped["api_keys"] = [key.get_secret_value() for key in checked.api_keys]
    apps[0]["args"] = {key: dumped[key] for key in args}
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the config")
    parser.add_argument("--base", default=str(BASE_CONFIG), help="config to start from")
    parser.add_argument("--replicas", type=int, required=True, help="LLM replicas")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--host", default="127.0.0.1", help="Serve HTTP proxy host")
    parser.add_argument("--port", type=int, default=8000, help="Serve HTTP proxy port")
    parser.add_argument("--set", action="append", default=[],
                        metavar="KNOB=VALUE", help="an AppConfig knob; empty VALUE: unchanged")
    args = parser.parse_args(argv)
    from app.launch_plan import ServeCliError, parse_app_args

    try:
        base = yaml.safe_load(Path(args.base).read_text())
        config = render(base, args.replicas, args.host, args.port, args.gpus_per_replica,
                        parse_app_args(args.set))
    except (OSError, yaml.YAMLError, ConfigError, ServeCliError) as exc:
        print(f"render_config: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
