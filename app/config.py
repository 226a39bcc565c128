"""Application config: every serving knob in one pydantic model (Serve YAML args or CLI args)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from app.edge import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_STALL_TIMEOUT_S,
    EdgeLimits,
)
from app.llm_server import DEFAULT_ORPHAN_TIMEOUT_S
from model.engine_args import SERVING_QUANTIZATION, EngineArgs


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask; the whole node outside containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class AutoscalingSettings(BaseModel):
    """Serve autoscaling for the LLM replicas (used instead of a fixed ``num_replicas``)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Fewest LLM replicas kept running.")
    max_replicas: int = Field(2, ge=1, description="Most LLM replicas started.")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Ongoing batch calls per replica Serve aims for when scaling."
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Seconds of overload before adding.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Idle seconds before removing.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError("autoscaling.max_replicas must be >= min_replicas")
        return self


class AppConfig(BaseModel):
    """Everything ``build_app`` accepts. Unknown keys are an error, so typos surface at once."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # Engine -------------------------------------------------------------------------
    model: str | None = Field(
        None, description="Checkpoint folder or .gguf file; empty for the embedded default model."
    )
    served_model_name: str | None = Field(
        None, description="Name clients use in the `model` field; default the checkpoint's name."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and KV cache dtype; auto is bf16 on GPU, fp32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Engine device; auto picks CUDA when the replica has a GPU."
    )
    quantization: Literal["none", "int8", "int8x2", "int4", "auto"] = Field(
        SERVING_QUANTIZATION, description="int8: projections and LM head as int8 (CPU, fbgemm); "
        "int8x2: as two int8 planes each (~15-bit weights, CPU, fbgemm); int4: projections as "
        "4-bit groups of 32 (CPU with AVX-512 BF16 speed, bf16 activations; a GGUF Q4_1 "
        "file's own weights exactly), the LM head int8; auto: on CPU the fastest form that "
        "meets the accuracy goals (int4, else int8x2), bf16 unquantized on CUDA; "
        "none: weights in `dtype`.",
    )
    dense_prefill: bool = Field(
        True, description="int4 only: prompt tokens run through a bf16 copy of each decoder "
        "projection (2-3x faster prefill on AVX-512 BF16; 2 bytes per weight more, ~210 MB "
        "for the default model); generated tokens always take the int4 kernel. false: int4 "
        "weights only (the smallest memory)."
    )
    window: int | None = Field(
        None, ge=1, description="Override the checkpoint's sliding-window size (tokens)."
    )
    full_attention: bool = Field(False, description="Ignore any sliding window (full attention).")
    max_model_len: int | None = Field(
        None, ge=2, description="Prompt + output token limit; default min(model limit, 4096)."
    )
    kv_cache_memory: int | None = Field(
        None, ge=1, description="KV cache bytes per replica; default 2 GiB CPU, 90% free GPU."
    )
    kv_block_size: int | None = Field(
        None, ge=1, description="Positions per block of the paged KV cache; default 16."
    )
    max_num_seqs: int = Field(32, ge=1, description="Sequences one replica runs at once.")
    max_num_batched_tokens: int = Field(512, ge=1, description="Tokens per engine step.")
    prefill_chunk: int | None = Field(
        None, ge=1, description="Max prompt tokens of one sequence per step (chunked prefill)."
    )

    # Replicas -----------------------------------------------------------------------
    num_replicas: int = Field(1, ge=1, description="LLM replicas when autoscaling is off.")
    autoscaling: AutoscalingSettings | None = Field(
        None, description="Autoscale LLM replicas between min and max instead of num_replicas."
    )
    replica_num_gpus: float | None = Field(
        None, ge=0, description="GPUs per LLM replica; default 1 when the cluster has GPUs, else 0."
    )
    replica_num_cpus: float = Field(
        0.5, gt=0, description="CPUs reserved per LLM replica (fractions are fine)."
    )
    replica_torch_threads: int | None = Field(
        None, ge=1, description="torch threads per LLM replica on CPU; default the node's cores "
        "the router does not need, split between the replicas (see `replica_threads`).",
    )
    router_num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per router replica.")
    router_replicas: int = Field(1, ge=1, description="Router (HTTP ingress) replicas.")
    health_check_period_s: float = Field(5.0, gt=0, description="Replica health check period.")
    orphan_timeout_s: float | None = Field(
        DEFAULT_ORPHAN_TIMEOUT_S, gt=0, description="An LLM replica aborts the requests of a "
        "router replica that has not called it (its load polls are the heartbeat) for this "
        "long: the router died and nobody reads those streams; null: never."
    )
    graceful_shutdown_timeout_s: float = Field(
        60.0, ge=0, description="How long a stopping replica lets running requests finish."
    )

    # Router: batching, dispatch, shedding -------------------------------------------
    batch_window_ms: float = Field(
        5.0, ge=0, description="Requests arriving within this window go to a replica in one call."
    )
    max_batch_size: int = Field(32, ge=1, description="Most requests sent in one batch call.")
    stats_interval_s: float = Field(
        0.2, gt=0, description="How often the router polls each replica's load."
    )
    max_queue_wait_s: float = Field(
        60.0, gt=0, description="Shed (429) when a request's predicted queue wait exceeds this "
        "(60 s queues a closed-loop client at concurrency 16 on a 2-core box; see README); an "
        "accepted request not started this long after arrival is refused (429) then."
    )
    max_waiting_per_replica: int | None = Field(
        None, ge=0, description="Shed (429) when every replica has this many queued sequences; "
        "default the replica's slot count.",
    )
    default_tokens_per_s: float = Field(
        50.0, gt=0, description="Drain-rate prior (tokens/s) until a replica has measured one."
    )
    default_deadline_s: float | None = Field(
        None, gt=0, description="Deadline for requests that carry none (504 if still queued)."
    )

    # HTTP ---------------------------------------------------------------------------
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Accepted bearer keys; empty means no authentication. "
        "Every route but /health then needs one (they print as '**********')."
    )
    api_keys_file: str | None = Field(
        None, description="File of accepted keys, one per line ('#' comments), read by each "
        "router replica at start: keys kept off command lines and config files."
    )
    max_concurrent_per_key: int | None = Field(
        32, ge=1, description="With api_keys: most requests one key may have in flight per "
        "router replica (429 beyond); null for no cap."
    )
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1024, description="Largest request body (413 beyond), "
        "refused before it is read."
    )
    max_header_bytes: int = Field(
        DEFAULT_MAX_HEADER_BYTES, ge=1024, description="Largest total size of a request's "
        "header names and values (431 beyond)."
    )
    stream_stall_timeout_s: float | None = Field(
        DEFAULT_STALL_TIMEOUT_S, gt=0, description="A client that accepts no response data "
        "for this long (it stopped reading; every buffer on the way is full) is disconnected "
        "and its request cancelled, freeing its cache slot; null: never."
    )
    host: str | None = Field(
        None, description="HTTP proxy host when `serve run` starts Serve (default 127.0.0.1)."
    )
    port: int | None = Field(
        None, ge=1, le=65535, description="HTTP proxy port when `serve run` starts Serve."
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        """`serve run ... api_keys=a,b` passes one string; accept a comma-separated list."""
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("model", "served_model_name", "api_keys_file", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if value in ("", "default") else value

    @field_validator("stream_stall_timeout_s", "orphan_timeout_s", mode="before")
    @classmethod
    def _never(cls, value: Any) -> Any:
        """`serve run ... stream_stall_timeout_s=none` (or 0) turns the check off."""
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null", "0"):
            return None
        return None if value == 0 else value

    @field_validator("autoscaling", mode="before")
    @classmethod
    def _parse_autoscaling(cls, value: Any) -> Any:
        """`serve run ... 'autoscaling={"max_replicas": 4}'` passes JSON text."""
        if isinstance(value, str):
            return json.loads(value) if value.strip() else None
        return value

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> AppConfig:
        """A live router polls every stats_interval_s; a timeout near that aborts live work."""
        if (self.orphan_timeout_s is not None
                and self.orphan_timeout_s < 5 * self.stats_interval_s):
            raise ValueError("orphan_timeout_s must be at least 5 x stats_interval_s (the "
                             "router's load polls are its heartbeat)")
        return self

    def accepted_keys(self) -> tuple[str, ...]:
        """``api_keys`` and the keys of ``api_keys_file`` (read now)."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file:
            try:
                lines = Path(self.api_keys_file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:  # the message names the file, never a key
                raise ValueError(f"cannot read api_keys_file {self.api_keys_file}: "
                                 f"{exc.strerror}") from None
            keys += [line.strip() for line in lines
                     if line.strip() and not line.lstrip().startswith("#")]
            if not keys:
                raise ValueError(f"api_keys_file {self.api_keys_file} holds no key")
        return tuple(dict.fromkeys(keys))

    def edge_limits(self) -> EdgeLimits:
        """What the router's EdgeGuard enforces (app/edge.py)."""
        return EdgeLimits(max_body_bytes=self.max_body_bytes,
                          max_header_bytes=self.max_header_bytes,
                          api_keys=self.accepted_keys(),
                          max_concurrent_per_key=self.max_concurrent_per_key,
                          stall_timeout_s=self.stream_stall_timeout_s)

    def replica_threads(self, cpus: int) -> int:
        """torch threads per CPU replica on a node of ``cpus`` cores.

        ``replica_torch_threads`` when set; else the cores left after the router's whole
        reserved CPUs (0.25 each by default: the router mostly waits on sockets, so none),
        split evenly between the replicas (``autoscaling.max_replicas`` when autoscaling),
        at least 1. A 2-core box with one replica: 2; with two replicas: 1 each.
        """
        if self.replica_torch_threads is not None:
            return self.replica_torch_threads
        replicas = self.autoscaling.max_replicas if self.autoscaling else self.num_replicas
        router_cores = math.floor(self.router_num_cpus * self.router_replicas)
        return max(1, (cpus - router_cores) // max(1, replicas))

    def engine_args(self) -> EngineArgs:
        """The engine settings each LLM replica builds its engine from."""
        return EngineArgs(
            model=self.model,
            dtype=self.dtype,
            quantization=self.quantization,
            dense_prefill=self.dense_prefill,
            device=self.device,
            window=self.window,
            full_attention=self.full_attention,
            max_model_len=self.max_model_len,
            kv_cache_memory=self.kv_cache_memory,
            block_size=self.kv_block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            prefill_chunk=self.prefill_chunk,
            torch_threads=self.replica_torch_threads,
            progress=False,
        )
