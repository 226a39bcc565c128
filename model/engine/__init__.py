"""The engine, in vLLM v1's parts (kept small, one concept per file):

- :mod:`~model.engine.core` ``EngineCore``: synchronous ``add`` / ``abort`` / ``step``; owns
  the scheduler, the KV cache pool, the model runner and the output processor.
- :mod:`~model.engine.model_runner` ``ModelRunner``: a step's chunks in, one forward pass and
  a ``ModelRunnerOutput`` of sampled tokens out.
- :mod:`~model.engine.output_processor` ``OutputProcessor``: incremental detokenizing, stop
  strings, finish reasons.
- :mod:`~model.engine.async_engine` ``AsyncEngine``: the stepping thread and asyncio streams.
- :mod:`~model.engine.construction`: device, dtype and cache sizing from ``EngineArgs``.
- :mod:`~model.engine.step_metrics`: drain and prefill rates, step counters for ``stats()``.

``Engine`` is the ``AsyncEngine``: what replicas, the CLI and the benchmarks use.
"""

from model.engine.async_engine import AsyncEngine
from model.engine.construction import resolve_device, resolve_dtype
from model.engine.core import EngineCore
from model.engine.types import (
    CompletedChoice,
    DeadlineExceeded,
    EngineRequestError,
    EngineShuttingDown,
    RequestFailure,
    StepOutput,
)

Engine = AsyncEngine

__all__ = [
    "AsyncEngine",
    "CompletedChoice",
    "DeadlineExceeded",
    "Engine",
    "EngineCore",
    "EngineRequestError",
    "EngineShuttingDown",
    "RequestFailure",
    "StepOutput",
    "resolve_device",
    "resolve_dtype",
]
