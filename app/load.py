"""The load record as it travels from a replica to the router (pure Python, no Ray).

One record, one name per figure. The engine's :class:`~model.requests.EngineStats` reaches the
router unchanged inside the replica's :class:`ReplicaLoad`; the replica's metrics are set from
that same record. The router's :class:`LoadEstimate` keeps the latest report as it came and
adds only what the report cannot contain yet, the work this router sent the replica since,
under the report's own names; ``/load`` shows the estimate by those names
(:func:`load_view`).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.requests import EngineStats


@dataclass(frozen=True)
class ReplicaLoad:
    """A replica's answer to a load poll: its engine's stats, unchanged, and who it is."""

    replica_id: str
    stats: EngineStats
    draining: bool = False  # shutting down: it takes no new work

    @property
    def healthy(self) -> bool:
        return self.stats.healthy and not self.draining


@dataclass(frozen=True)
class LoadEstimate:
    """A replica's load as the router believes it now: the latest report plus the sequences
    this router has sent it (or is batching for it) since, which that report cannot contain.

    The figures admission reads carry the engine's names; before the first report the
    replica's own figures count as zero.
    """

    replica_id: str
    stats: EngineStats | None  # the latest report's, unchanged; None before the first
    unreported_sequences: int
    unreported_tokens: int  # their prompt tokens
    tokens_per_s: float  # the report's measured rate, or the prior until one is measured
    prefill_tokens_per_s: float  # the measured prefill rate, or tokens_per_s until measured

    @property
    def waiting_sequences(self) -> int:
        reported = self.stats.waiting_sequences if self.stats is not None else 0
        return reported + self.unreported_sequences

    @property
    def waiting_tokens(self) -> int:
        reported = self.stats.waiting_tokens if self.stats is not None else 0
        return reported + self.unreported_tokens

    @property
    def running_sequences(self) -> int:
        return self.stats.running_sequences if self.stats is not None else 0

    @property
    def free_slots(self) -> int:
        return self.stats.free_slots if self.stats is not None else 0

    @property
    def total_slots(self) -> int:
        return self.stats.total_slots if self.stats is not None else 0

    # The paged KV cache: 0 total blocks means the replica reported none (slots alone count)
    @property
    def free_blocks(self) -> int:
        return self.stats.free_blocks if self.stats is not None else 0

    @property
    def total_blocks(self) -> int:
        return self.stats.total_blocks if self.stats is not None else 0

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks

    @property
    def block_size(self) -> int:
        return self.stats.block_size if self.stats is not None else 0

    @property
    def blocks_per_sequence_max(self) -> int:
        return self.stats.blocks_per_sequence_max if self.stats is not None else 0


# What ``/load`` shows of each replica's estimate, by the engine's names.
LOAD_FIGURES = ("running_sequences", "waiting_sequences", "waiting_tokens", "free_slots",
                "total_slots", "used_blocks", "total_blocks", "block_size", "tokens_per_s",
                "prefill_tokens_per_s")


def load_view(estimate: LoadEstimate) -> dict[str, float]:
    """The estimate's :data:`LOAD_FIGURES`, for ``/load``."""
    return {name: getattr(estimate, name) for name in LOAD_FIGURES}
