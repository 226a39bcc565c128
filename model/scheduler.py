"""Continuous-batching scheduler: pure Python over sequence ids, token counts and slots.

Every engine step it decides which tokens run: first one token for every decoding sequence
(running streams never stall), then prefill chunks of partly prefilled prompts, then new
sequences admitted from a FIFO queue while a cache slot is free. A per-step token budget
(``max_num_batched_tokens``) bounds the step; ``max_num_seqs`` bounds running sequences;
``prefill_chunk`` bounds how much of one prompt runs in one step (chunked prefill).
No torch here: it is unit-tested on plain numbers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from model.cache_layout import SlotAllocator


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int
    max_num_batched_tokens: int
    prefill_chunk: int

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.prefill_chunk) < 1:
            raise ValueError("scheduler limits must be positive")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs so every running "
                             "sequence can decode in each step")


@dataclass
class SequenceProgress:
    """What the scheduler tracks of one sequence."""

    seq_id: str
    num_tokens: int  # known tokens: prompt + generated so far
    num_computed: int = 0  # tokens whose K/V are in the cache
    slot: int | None = None

    @property
    def pending(self) -> int:
        """Known tokens not yet run through the model."""
        return self.num_tokens - self.num_computed


@dataclass(frozen=True)
class ScheduledChunk:
    """Run tokens ``start_pos .. start_pos+num_tokens-1`` of a sequence in this step."""

    seq_id: str
    slot: int
    start_pos: int
    num_tokens: int
    samples: bool  # the chunk reaches the last known token, so a next token is sampled


class Scheduler:
    """FIFO admission, decode-first batching, chunked prefill under a token budget."""

    def __init__(self, config: SchedulerConfig, allocator: SlotAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: deque[SequenceProgress] = deque()
        self.running: dict[str, SequenceProgress] = {}  # insertion order = admission order

    def add(self, seq_id: str, num_prompt_tokens: int) -> None:
        """Queue a new sequence whose prompt has ``num_prompt_tokens`` tokens."""
        if num_prompt_tokens < 1:
            raise ValueError("a sequence needs at least one prompt token")
        self.waiting.append(SequenceProgress(seq_id, num_prompt_tokens))

    def abort(self, seq_id: str) -> bool:
        """Drop a waiting or running sequence, freeing its slot; False if unknown."""
        if seq_id in self.running:
            self.finish(seq_id)
            return True
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                return True
        return False

    def finish(self, seq_id: str) -> None:
        """A running sequence is done: its slot goes back to the allocator."""
        seq = self.running.pop(seq_id)
        if seq.slot is not None:
            self.allocator.release(seq.slot)

    def schedule(self) -> list[ScheduledChunk]:
        """Pick this step's work; an empty list means nothing can run."""
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        for seq in self.running.values():
            if seq.pending == 1 and budget >= 1:
                decodes.append(self._chunk(seq, 1))
                budget -= 1
        for seq in self.running.values():
            if seq.pending > 1 and budget > 0:
                count = min(seq.pending, budget, self.config.prefill_chunk)
                prefills.append(self._chunk(seq, count))
                budget -= count
        while (self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            slot = self.allocator.allocate()
            if slot is None:
                break  # FIFO: nobody jumps the queue; the head waits for a slot
            seq = self.waiting.popleft()
            seq.slot = slot
            self.running[seq.seq_id] = seq
            count = min(seq.pending, budget, self.config.prefill_chunk)
            prefills.append(self._chunk(seq, count))
            budget -= count
        return decodes + prefills

    def on_step_done(self, chunks: list[ScheduledChunk]) -> None:
        """Record that the chunks ran and that each sampling chunk produced one new token."""
        for chunk in chunks:
            seq = self.running.get(chunk.seq_id)
            if seq is None:
                continue
            seq.num_computed += chunk.num_tokens
            if chunk.samples:
                seq.num_tokens += 1

    @staticmethod
    def _chunk(seq: SequenceProgress, count: int) -> ScheduledChunk:
        assert seq.slot is not None
        return ScheduledChunk(seq.seq_id, seq.slot, seq.num_computed, count,
                              samples=count == seq.pending)

    # Load figures for routing and shedding ------------------------------------------
    @property
    def waiting_tokens(self) -> int:
        """Tokens not yet prefilled, over waiting and running sequences."""
        return (sum(s.pending for s in self.waiting)
                + sum(s.pending for s in self.running.values() if s.pending > 1))

    @property
    def has_work(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)
