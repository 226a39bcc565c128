"""App config and builder: defaults, CLI-style string args, the cluster YAML (no Ray started)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from app.config import AppConfig
from app.main import build_app

ROOT = Path(__file__).resolve().parents[1]


def test_cli_style_string_args_parse() -> None:
    config = AppConfig.model_validate({"num_replicas": "2", "api_keys": "sk-one, sk-two",
                                       "batch_window_ms": "3", "model": "",
                                       "autoscaling": '{"min_replicas": 1, "max_replicas": 3}'})
    assert config.num_replicas == 2
    assert [k.get_secret_value() for k in config.api_keys] == ["sk-one", "sk-two"]
    for shown in (repr(config), str(config.api_keys), repr(config.edge_limits())):
        assert "sk-one" not in shown and "sk-two" not in shown
    # the Serve builder hands the router `model_dump()`: the keys survive the round trip
    again = AppConfig.model_validate(config.model_dump())
    assert again.edge_limits().api_keys == ("sk-one", "sk-two")
    assert config.model is None and config.autoscaling is not None
    assert config.autoscaling.max_replicas == 3
    assert config.engine_args().max_num_seqs == 32


def test_unknown_or_bad_knobs_are_rejected() -> None:
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"num_replica": 2})
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"max_queue_wait_s": -1})


def test_builder_binds_the_configured_deployments() -> None:
    app = build_app({"num_replicas": 2, "replica_num_gpus": 0, "replica_num_cpus": 0.25,
                     "router_num_cpus": 0.1, "max_num_seqs": 7})
    router = app._bound_deployment
    assert router.ray_actor_options is not None
    router_args: tuple[Any, ...] = router.init_args
    llm_app = router_args[0]
    llm = llm_app._bound_deployment
    assert (router.name, llm.name) == ("Router", "LLMServer")
    assert router.ray_actor_options["num_cpus"] == 0.1
    assert llm.num_replicas == 2
    assert llm.ray_actor_options == {"num_cpus": 0.25, "num_gpus": 0.0}
    assert router_args[1]["max_num_seqs"] == 7  # the router gets the whole config
    assert llm.init_args[0].args[0].max_num_seqs == 7  # and the engine factory its args
    scaled = build_app({"autoscaling": {"min_replicas": 1, "max_replicas": 3},
                        "replica_num_gpus": 0})._bound_deployment.init_args[0]._bound_deployment
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 3)


def test_importing_and_building_the_app_loads_nothing() -> None:
    """`serve run app.main:app` imports the module and calls the builder: no model, no
    tokenizer, no Ray start; the heavy libraries stay unimported."""
    code = ("import sys; import app.main as m; assert m.app is m.build_app; "
            "m.build_app({'replica_num_gpus': 0}); "
            "print(sorted(k for k in ('model.weights', 'model.transformer', 'tokenizers', "
            "'sentencepiece', 'transformers') if k in sys.modules)); "
            "import ray; print(ray.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "False"]


def test_cluster_yaml_is_a_valid_serve_config_with_valid_args() -> None:
    raw = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    for app in schema.applications:
        assert app.import_path == "app.main:build_app"
        AppConfig.model_validate(app.args)


def test_proxy_enforces_the_limits_of_the_app_it_serves(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """`serve run app.main:build_app ...` and `ringserve serve` put the proxy hook (app/edge.py)
    and the app's limits in the environment Ray will start with."""
    from app.edge import PROXY_CALLBACK, PROXY_CALLBACK_ENV, limits_from_env, proxy_middlewares
    from app.launch_plan import Launch, edge_env

    for name in (PROXY_CALLBACK_ENV, "RINGSERVE_MAX_BODY_BYTES", "RINGSERVE_MAX_HEADER_BYTES"):
        monkeypatch.delenv(name, raising=False)
    build_app({"max_body_bytes": 123456, "max_header_bytes": 7777, "replica_num_gpus": 0})
    assert os.environ[PROXY_CALLBACK_ENV] == PROXY_CALLBACK
    limits = limits_from_env()
    assert (limits.max_body_bytes, limits.max_header_bytes) == (123456, 7777)
    (middleware,) = proxy_middlewares()
    assert middleware.kwargs["limits"] == limits
    # a config file with several applications: the proxy takes the largest limits
    config = {"applications": [{"args": {"max_body_bytes": 2048}},
                               {"args": {"max_body_bytes": 9999, "max_header_bytes": 4096}}]}
    env = edge_env(Launch({}, config, "127.0.0.1", 8000))
    assert env == {PROXY_CALLBACK_ENV: PROXY_CALLBACK, "RINGSERVE_MAX_BODY_BYTES": "9999",
                   "RINGSERVE_MAX_HEADER_BYTES": "32768"}
    assert edge_env(Launch({"max_body_bytes": "5000"}, None, "127.0.0.1", 8000))[
        "RINGSERVE_MAX_BODY_BYTES"] == "5000"
