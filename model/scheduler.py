"""Continuous-batching scheduler: pure Python over sequence ids, token counts and blocks.

Every engine step it decides which tokens run: first one token for every decoding sequence
(running streams never stall), then prefill chunks of partly prefilled prompts, then new
sequences admitted from a FIFO queue while the blocks for their prompt (capped at R, see
:mod:`model.block_table`) are free. A decoding sequence takes a new block every B tokens
until it holds R; when none is free, the most recently admitted sequence is *preempted*: its
blocks are freed and it goes back to the front of the queue, to be recomputed from its
prompt and the tokens it already produced (vLLM v1's policy: nothing is corrupted or
dropped, the newest work pays). A per-step token budget (``max_num_batched_tokens``) bounds
the step; ``max_num_seqs`` bounds running sequences; ``prefill_chunk`` bounds how much of one
prompt runs in one step (chunked prefill). No torch here: it is unit-tested on plain numbers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from model.block_table import BlockManager


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

    @property
    def pending(self) -> int:
        """Known tokens not yet run through the model."""
        return self.num_tokens - self.num_computed


@dataclass(frozen=True)
class ScheduledChunk:
    """Run tokens ``start_pos .. start_pos+num_tokens-1`` of a sequence in this step."""

    seq_id: str
    block_table: tuple[int, ...]  # the sequence's blocks, covering these tokens
    start_pos: int
    num_tokens: int
    samples: bool  # the chunk reaches the last known token, so a next token is sampled


class Scheduler:
    """FIFO admission by free blocks, decode-first batching, chunked prefill under a token
    budget, preemption (recompute) of the newest sequence when decoding runs out of blocks."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[SequenceProgress] = deque()
        self.running: dict[str, SequenceProgress] = {}  # insertion order = admission order
        self.preemptions_total = 0

    def add(self, seq_id: str, num_prompt_tokens: int) -> None:
        """Queue a new sequence whose prompt has ``num_prompt_tokens`` tokens."""
        if num_prompt_tokens < 1:
            raise ValueError("a sequence needs at least one prompt token")
        self.waiting.append(SequenceProgress(seq_id, num_prompt_tokens))

    def abort(self, seq_id: str) -> bool:
        """Drop a waiting or running sequence, freeing its blocks; False if unknown."""
        if seq_id in self.running:
            self.finish(seq_id)
            return True
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                return True
        return False

    def finish(self, seq_id: str) -> None:
        """A running sequence is done: its blocks go back to the pool."""
        self.running.pop(seq_id)
        self.blocks.release(seq_id)

    def schedule(self) -> list[ScheduledChunk]:
        """Pick this step's work; an empty list means nothing can run."""
        budget = self.config.max_num_batched_tokens
        decodes: dict[str, int] = {}  # seq id -> tokens (1), in admission order
        preempted = False
        for seq in list(self.running.values()):
            if seq.seq_id not in self.running or seq.pending != 1 or budget < 1:
                continue
            # the token at position num_computed needs its block (a new one every B tokens)
            while not self.blocks.grow(seq.seq_id, seq.num_tokens):
                victim = next(reversed(self.running.values()))
                self._preempt(victim)
                preempted = True
                budget += decodes.pop(victim.seq_id, 0)
                if victim is seq:
                    break
            else:
                decodes[seq.seq_id] = 1
                budget -= 1
        chunks = [self._chunk(self.running[seq_id], 1) for seq_id in decodes]
        for seq in self.running.values():
            if seq.pending > 1 and budget > 0:  # its blocks were taken at admission
                count = min(seq.pending, budget, self.config.prefill_chunk)
                chunks.append(self._chunk(seq, count))
                budget -= count
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            head = self.waiting[0]
            if not self.blocks.grow(head.seq_id, head.num_tokens):
                break  # FIFO: nobody jumps the queue; the head waits for blocks
            self.waiting.popleft()
            self.running[head.seq_id] = head
            count = min(head.pending, budget, self.config.prefill_chunk)
            chunks.append(self._chunk(head, count))
            budget -= count
        return chunks

    def _preempt(self, seq: SequenceProgress) -> None:
        """Free a running sequence's blocks and requeue it at the front, to be recomputed."""
        del self.running[seq.seq_id]
        self.blocks.release(seq.seq_id)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.preemptions_total += 1

    def on_step_done(self, chunks: list[ScheduledChunk]) -> None:
        """Record that the chunks ran and that each sampling chunk produced one new token."""
        for chunk in chunks:
            seq = self.running.get(chunk.seq_id)
            if seq is None:
                continue
            seq.num_computed += chunk.num_tokens
            if chunk.samples:
                seq.num_tokens += 1

    def _chunk(self, seq: SequenceProgress, count: int) -> ScheduledChunk:
        return ScheduledChunk(seq.seq_id, self.blocks.table(seq.seq_id), seq.num_computed,
                              count, samples=count == seq.pending)

    # Load figures for routing and shedding ------------------------------------------
    @property
    def waiting_tokens(self) -> int:
        """Tokens not yet prefilled, over waiting and running sequences."""
        return (sum(s.pending for s in self.waiting)
                + sum(s.pending for s in self.running.values() if s.pending > 1))

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence holds."""
        return self.blocks.pool.num_free

    @property
    def has_work(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)
