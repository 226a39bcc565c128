"""App config and builder: defaults, CLI-style string args, the cluster YAML (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from app.config import AppConfig
from app.main import build_app

ROOT = Path(__file__).resolve().parents[1]


def test_cli_style_string_args_parse() -> None:
    config = AppConfig.model_validate({"num_replicas": "2", "api_keys": "a, b",
                                       "batch_window_ms": "3", "model": "",
                                       "autoscaling": '{"min_replicas": 1, "max_replicas": 3}'})
    assert config.num_replicas == 2 and config.api_keys == ["a", "b"]
    assert config.model is None and config.autoscaling is not None
    assert config.autoscaling.max_replicas == 3
    assert config.engine_args().max_num_seqs == 32


def test_unknown_or_bad_knobs_are_rejected() -> None:
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"num_replica": 2})
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"max_queue_wait_s": -1})


def test_builder_binds_without_loading_anything() -> None:
    app = build_app({"num_replicas": 2, "replica_num_gpus": 0})
    assert app is not None
    build_app({"autoscaling": {"min_replicas": 1, "max_replicas": 2}, "replica_num_gpus": 0})


def test_cluster_yaml_is_a_valid_serve_config_with_valid_args() -> None:
    raw = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    for app in schema.applications:
        assert app.import_path == "app.main:build_app"
        AppConfig.model_validate(app.args)
