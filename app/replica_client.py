"""The router's ReplicaClient over a Serve DeploymentHandle to the LLM deployment.

Every call names this router replica as its ``caller``: the LLM replica takes the load polls
as the router's heartbeat and aborts the requests of a router that fell silent (it died; Ray
would let their streams run on unread).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import cast

from ray.serve.handle import DeploymentHandle

from app.llm_server import BatchItem, Event, serve_replica_id
from app.load import ReplicaLoad
from app.replica_router import REPLICA_DIRECTORY, directory_key


class ServeReplicaClient:
    """Targets each call at one replica via ``target=`` (see app.replica_router)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self._key = directory_key(handle.app_name, handle.deployment_name)
        self.caller = serve_replica_id() or f"router-{uuid.uuid4().hex[:8]}"

    def replica_ids(self) -> list[str] | None:
        ids = REPLICA_DIRECTORY.get(self._key)
        return None if ids is None else list(ids)  # None: not learned yet; []: all gone

    async def stats(self, target: str | None) -> ReplicaLoad:
        return await self._handle.stats.remote(target=target, caller=self.caller)

    def generate_batch(self, target: str, items: list[BatchItem]
                       ) -> AsyncIterator[list[Event]]:
        # stream=True: a DeploymentResponseGenerator, an async iterator of the yielded lists
        return cast(AsyncIterator[list[Event]],
                    self._handle.generate_batch.options(stream=True).remote(
                        items, target=target, caller=self.caller))

    async def abort(self, target: str, request_ids: list[str]) -> None:
        await self._handle.abort.remote(request_ids, target=target, caller=self.caller)

    async def model_info(self) -> dict[str, object]:
        return await self._handle.model_info.remote()
