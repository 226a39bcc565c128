"""Serve request router that sends each call to the LLM replica the caller named.

The ringserve router makes its own load-aware choice (app.admission) and passes the chosen
replica id as the ``target`` keyword of every call (batches, aborts, stats polls). This class,
installed as the LLM deployment's ``request_router_class``, honours it. It also publishes the
current replica ids in :data:`REPLICA_DIRECTORY` of the calling process, which is how the
router learns which replicas exist. A call whose target is gone (or None) may go to any
replica; batch streams name their replica in their first event, so nothing is misattributed.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

# (app name, deployment name) -> unique ids of the replicas this process's handle sees.
REPLICA_DIRECTORY: dict[tuple[str, str], tuple[str, ...]] = {}


def directory_key(app_name: str, deployment_name: str) -> tuple[str, str]:
    return (app_name, deployment_name)


class TargetedRequestRouter(RequestRouter):
    """Routes to ``kwargs["target"]`` when that replica exists, else to any replica."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        key = directory_key(self._deployment_id.app_name, self._deployment_id.name)
        REPLICA_DIRECTORY[key] = tuple(sorted(r.replica_id.unique_id for r in replicas))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        target = _target(pending_request)
        if target is not None:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == target:
                    return [[replica]]
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        shuffled = list(candidate_replicas)
        random.shuffle(shuffled)
        return [[r] for r in shuffled]


def _target(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None:
        return None
    kwargs: dict[Any, Any] = pending_request.kwargs
    target = kwargs.get("target")
    return target if isinstance(target, str) else None
