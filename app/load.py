"""The load record as it travels from a replica to the router (pure Python, no Ray).

One record, one name per figure. The engine's :class:`~model.requests.EngineStats` reaches the
router unchanged inside the replica's :class:`ReplicaLoad`; the replica's metrics are set from
that same record. The router's :class:`LoadEstimate` keeps the latest report as it came and
corrects it only for what the report cannot know yet: the work this router sent the replica
since (added) and the requests the router saw end since (left out), under the report's own
names; ``/load`` shows the estimate by those names (:func:`load_view`).
"""

from __future__ import annotations

import math
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
    this router has sent it (or is batching for it) since, which that report cannot contain,
    less the sequences it counts that the router has seen end since.

    The figures admission reads carry the engine's names; before the first report the
    replica's own figures count as zero.
    """

    replica_id: str
    stats: EngineStats | None  # the latest report's, unchanged; None before the first
    unreported_sequences: int
    unreported_tokens: int  # their prompt tokens
    tokens_per_s: float  # the report's measured rate, or the prior until one is measured
    prefill_tokens_per_s: float  # the measured prefill rate, or tokens_per_s until measured
    # Sequences the report counts that have ended since it was polled (the router saw them
    # end): running ones by the tokens each held in the cache, waiting ones with their prompts.
    ended_running_tokens: tuple[int, ...] = ()
    ended_waiting_sequences: int = 0
    ended_waiting_tokens: int = 0

    @property
    def ended_sequences(self) -> int:
        """Sequences the report counts that the figures below leave out (ended since)."""
        return len(self.ended_running_tokens) + self.ended_waiting_sequences

    @property
    def waiting_sequences(self) -> int:
        reported = self.stats.waiting_sequences if self.stats is not None else 0
        return max(0, reported - self.ended_waiting_sequences) + self.unreported_sequences

    @property
    def waiting_tokens(self) -> int:
        reported = self.stats.waiting_tokens if self.stats is not None else 0
        return max(0, reported - self.ended_waiting_tokens) + self.unreported_tokens

    @property
    def running_sequences(self) -> int:
        reported = self.stats.running_sequences if self.stats is not None else 0
        return max(0, reported - len(self.ended_running_tokens))

    @property
    def free_slots(self) -> int:
        if self.stats is None:
            return 0
        freed = self.stats.running_sequences - self.running_sequences
        return min(self.stats.total_slots, self.stats.free_slots + freed)

    @property
    def total_slots(self) -> int:
        return self.stats.total_slots if self.stats is not None else 0

    # The paged KV cache: 0 total blocks means the replica reported none (slots alone count)
    @property
    def free_blocks(self) -> int:
        """Reported free blocks plus those the ended running sequences held (their tokens
        over the block size, at most ``blocks_per_sequence_max`` each)."""
        if self.stats is None:
            return 0
        freed = 0
        if self.block_size > 0:
            freed = sum(self.blocks_held(tokens)
                        for tokens in self.ended_running_tokens[:self.stats.running_sequences])
        return min(self.stats.total_blocks, self.stats.free_blocks + freed)

    def blocks_held(self, tokens: float) -> int:
        """Blocks a sequence of ``tokens`` holds: whole blocks, at most
        ``blocks_per_sequence_max`` (the window's table). Needs ``block_size`` > 0."""
        blocks = math.ceil(max(1.0, tokens) / self.block_size)
        if self.blocks_per_sequence_max > 0:
            blocks = min(blocks, self.blocks_per_sequence_max)  # a sequence holds at most R
        return blocks

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
