"""The Serve application: ``build_app(args)`` binds Router -> LLMServer; ``app`` is that builder.

``serve run app.main:app`` serves the embedded model on CPU; ``serve run app.main:app
num_replicas=2 batch_window_ms=3 ...`` sets any :class:`AppConfig` knob (Serve calls the
builder with the CLI's args, so importing this module builds nothing); a Serve config YAML
(cluster/serve_config.yaml) passes the same knobs as ``args``. Building loads nothing: engines
are built inside the LLM replicas, the tokenizer inside the router replicas.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from app.config import AppConfig, available_cpus
from app.edge import PROXY_CALLBACK, PROXY_CALLBACK_ENV, proxy_env
from app.llm_server import EngineLike, LLMServer
from app.replica_client import ServeReplicaClient
from app.replica_router import TargetedRequestRouter
from app.router import Router
from model.engine_args import EngineArgs

logger = logging.getLogger(__name__)

LLM_DEPLOYMENT = "LLMServer"
ROUTER_DEPLOYMENT = "Router"
LLM_MAX_ONGOING = 1024  # batch calls + polls per replica; the router does the real admission
ROUTER_MAX_ONGOING = 4096


def build_engine(args: EngineArgs, app_config: AppConfig | None = None) -> EngineLike:
    """Runs inside an LLM replica: load weights and tokenizer, then warm the engine up so its
    first load report carries measured rates (admission predicts queue waits from them).

    On CPU the torch threads default to the replica's share of the node's cores
    (:meth:`AppConfig.replica_threads`), not Ray's ``OMP_NUM_THREADS`` (1 for 0.5 CPUs)."""
    from model.engine import Engine, resolve_device

    if (app_config is not None and args.torch_threads is None
            and resolve_device(args.device).type == "cpu"):
        args = dataclasses.replace(args, torch_threads=app_config.replica_threads(
            available_cpus()))
    engine = Engine.from_args(args)
    engine.warm_up()
    return engine


class LLMServerDeployment(LLMServer):
    """LLMServer as Serve runs it: Serve awaits ``__del__`` after draining ongoing calls."""

    async def __del__(self) -> None:
        await self.shutdown()


class RouterDeployment(Router):
    """Router as Serve runs it: Serve hands it the LLM deployment's handle, which it reaches
    through a :class:`ServeReplicaClient` (tests give the Router an in-process client)."""

    def __init__(self, llm: DeploymentHandle, config: dict[str, Any]) -> None:
        super().__init__(ServeReplicaClient(llm), config)

    async def __del__(self) -> None:
        await self.shutdown()


def _gpus_per_replica(config: AppConfig) -> float:
    if config.replica_num_gpus is not None:
        return config.replica_num_gpus
    import ray

    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return 1.0 if os.path.exists("/proc/driver/nvidia/version") else 0.0


def _guard_the_proxy(config: AppConfig) -> None:
    """Make Serve's HTTP proxy enforce the size limits (app/edge.py) before it forwards.

    Only where this process is the one that starts Ray (``serve run app.main:...`` calls the
    builder first): Ray's workers, the proxy among them, inherit this environment. A cluster
    started otherwise sets the variables itself (docs/serving.md); the router's own check
    stays in force either way.
    """
    import ray

    if ray.is_initialized():
        return
    current = os.environ.get(PROXY_CALLBACK_ENV, "")
    if current not in ("", PROXY_CALLBACK):
        logger.warning("%s is set to %s: Serve's proxy will not enforce ringserve's size "
                       "limits (the router still does)", PROXY_CALLBACK_ENV, current)
        return
    os.environ.update(proxy_env(config.max_body_bytes, config.max_header_bytes,
                                config.stream_stall_timeout_s))


def _start_serve_if_asked(config: AppConfig) -> None:
    """`serve run app.main:build_app host=... port=...`: start Serve's proxy there.

    Only possible before Serve starts (the CLI calls the builder first). Inside a config-file
    deploy Ray is already up and the YAML's ``http_options`` decide.
    """
    if config.host is None and config.port is None:
        return
    import ray

    if ray.is_initialized():
        logger.warning("host/port app args are ignored here; set http_options in the config")
        return
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, namespace="serve")
    serve.start(http_options={"host": config.host or "127.0.0.1", "port": config.port or 8000})


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Bind the application from app args (every AppConfig field; strings are parsed)."""
    config = AppConfig.model_validate(dict(args or {}))
    _guard_the_proxy(config)
    _start_serve_if_asked(config)
    scaling: dict[str, Any] = {"num_replicas": config.num_replicas}
    if config.autoscaling is not None:
        a = config.autoscaling
        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=a.min_replicas, max_replicas=a.max_replicas,
            target_ongoing_requests=a.target_ongoing_requests,
            upscale_delay_s=a.upscale_delay_s, downscale_delay_s=a.downscale_delay_s)}
    # serve.deployment(**options)(cls): the form Ray's annotations type as a Deployment
    llm = serve.deployment(
        name=LLM_DEPLOYMENT,
        ray_actor_options={"num_cpus": config.replica_num_cpus,
                           "num_gpus": _gpus_per_replica(config)},
        max_ongoing_requests=LLM_MAX_ONGOING,
        health_check_period_s=config.health_check_period_s,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        # Ray annotates RequestRouterConfig's **kwargs as dicts; a class is what it takes here
        request_router_config=RequestRouterConfig(
            request_router_class=TargetedRequestRouter),  # type: ignore[arg-type]
        **scaling,
    )(LLMServerDeployment)
    router = serve.deployment(
        name=ROUTER_DEPLOYMENT,
        num_replicas=config.router_replicas,
        ray_actor_options={"num_cpus": config.router_num_cpus},
        max_ongoing_requests=ROUTER_MAX_ONGOING,
    )(serve.ingress()(RouterDeployment))
    engine_factory = functools.partial(build_engine, config.engine_args(), config)
    server = llm.bind(engine_factory, None, config.graceful_shutdown_timeout_s,
                      config.orphan_timeout_s)
    return router.bind(server, config.model_dump())


# `serve run app.main:app [k=v ...]`: Serve calls a builder function with the app args.
app = build_app
