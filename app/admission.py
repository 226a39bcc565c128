"""Admission control: where each request goes, or why it is refused (pure Python, no Ray).

The router keeps a :class:`LoadBoard`: the latest load each replica reported (an
:class:`~app.load.ReplicaLoad`, polled every ``stats_interval_s``) plus the requests this router
sent it since that poll, which the report cannot contain yet, less the requests the router has
seen end since that poll, which the report still counts (else two requests arriving together
would both go to a replica that has just finished one while another stands idle): together a
:class:`~app.load.LoadEstimate`. From that estimate it predicts how long a new request would
queue before it can start. Only work queued ahead that cannot run yet counts: a request the
replica can take now (room for it after everything queued ahead of it) has no queue wait::

    seq_blocks = ceil(min(seq_tokens, R * B) / B)             # blocks a typical sequence holds
    startable = min(free_slots, free_blocks // seq_blocks)   # sequences that could start now
    short = max(0, waiting_sequences + n - startable)        # sequences that must wait for room
    blocked = max(0, waiting_sequences - startable)          # those queued ahead of it
    blocked_tokens = waiting_tokens * blocked / waiting_sequences
    predicted_wait = 0                                                    if short == 0
                   = blocked_tokens / prefill_tokens_per_s + short * seq_tokens / tokens_per_s

A sequence that finds no room waits for a running one to finish, which takes about
``seq_tokens`` (the measured mean tokens of a finished sequence, prompt + output) of the
replica's work at ``tokens_per_s``, its measured rate overall; the queued sequences ahead of it
that cannot start yet must also be prefilled (``waiting_tokens`` are prompt tokens not yet
prefilled, their share by count, at the measured ``prefill_tokens_per_s``: many times the
decode rate, as a step's cost hardly grows with its token count). The prompts of sequences
that start now are prefilled together with the running batch: that is part of every request's
time to first token, not a queue wait, so a burst that fits is admitted whatever the rates.
Worked example: 4 slots all busy, 2 sequences waiting with 60 prompt tokens, sequences
average 100 tokens, the replica prefills 600 and drains 200 tokens/s; a new n=1 request finds
short = 2 + 1 - 0 = 3, blocked = 2, predicted_wait = 60/600 + 3*100/200 = 1.6 s. A burst into
free slots waits for nothing: 16 requests of 140 prompt tokens into 16 free slots predict 0 s
for the last one, whatever the rates; the 17th finds short = 16 + 1 - 16 = 1, blocked = 0:
one sequence's drain, 100/200 = 0.5 s.

How much room a replica has is read in one place, :meth:`LoadBoard.room`: the engine's KV
cache is paged (blocks of B positions, at most R per sequence), so how many more sequences fit
depends on their length: free blocks over the blocks a sequence of ``seq_tokens`` holds,
capped by ``free_slots`` (``max_num_seqs`` minus running). Worked example: blocks of 16, 40
free blocks, 30 free slots, sequences average 100 tokens (7 blocks): 5 can start; 4 sequences
wait with 60 prompt tokens, all of which can start; a new n=2 request finds
short = 4 + 2 - 5 = 1, blocked = 0, predicted_wait = 1*100/200 = 0.5 s. With 2 free blocks
(none can start) the same request finds short = 6, blocked = 4: 60/600 + 6*100/200 = 3.1 s.
A replica that reports no blocks counts its free slots alone (the first worked example).

A request goes to the replica with the smallest predicted wait (ties: more room to spare, then
fewer running sequences), so an idle replica always wins over one with a queue. It is shed
(429) when on every healthy replica either the wait exceeds ``max_queue_wait_s`` or the
sequences short of room would exceed ``max_waiting`` ("queue full"). ``Retry-After`` is the
time the best replica needs, at its measured rate, to drain the excess:
``(predicted_wait - max_queue_wait_s)`` or ``excess * seq_tokens / tokens_per_s``, rounded up
to whole seconds (at least 1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from app.load import LoadEstimate, ReplicaLoad


@dataclass(frozen=True)
class Room:
    """A replica's cache room as a request of ``seqs`` sequences would find it."""

    short: int  # sequences (those queued, then the request's) that must wait for room
    spare: int  # room left once the queued sequences have theirs (ties: more is better)
    default_max_waiting: int  # how many may wait when AdmissionLimits.max_waiting is None


@dataclass(frozen=True)
class Accepted:
    replica_id: str
    predicted_wait_s: float


@dataclass(frozen=True)
class Shed:
    reason: str  # "queue_full" | "queue_wait"
    retry_after_s: int
    predicted_wait_s: float
    message: str


@dataclass(frozen=True)
class NoReplica:
    message: str


Admission = Accepted | Shed | NoReplica


@dataclass(frozen=True)
class AdmissionLimits:
    """The shedding knobs (see AppConfig)."""

    max_queue_wait_s: float = 10.0
    max_waiting: int | None = None  # queued sequences per replica; None: LoadBoard.room's
    default_tokens_per_s: float = 50.0
    # A replica whose last answered poll was sent longer ago than this is not routed to (and
    # /health counts it out): a hung or vanished replica stops looking healthy. None: never.
    max_report_age_s: float | None = None


@dataclass
class _Sent:
    replica_id: str
    seqs: int
    prompt_tokens: int  # for all n sequences
    sent_at: float | None = None  # None while still in the router's batch window
    started_at: float | None = None  # its first event reached the router (it was scheduled)


@dataclass(frozen=True)
class _Ended:
    """A request that ended after the replica's latest report was polled: the report still
    counts its sequences, running or waiting, though the replica has let them go."""

    ended_at: float
    seqs: int
    running: bool  # it had started before that poll, so the report counts it running
    prompt_tokens: int  # for all its sequences
    seq_tokens: tuple[int, ...]  # each sequence's prompt + output tokens, where known


@dataclass
class _Replica:
    report: ReplicaLoad | None = None
    polled_at: float = -math.inf  # when the poll that produced `report` was sent
    unreachable: bool = False
    ended: list[_Ended] = field(default_factory=list)  # since `report` was polled


@dataclass
class LoadBoard:
    """Per-replica load estimates and the admission decision over them."""

    limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    seq_tokens_prior: float = 64.0
    _replicas: dict[str, _Replica] = field(default_factory=dict)
    _sent: dict[str, _Sent] = field(default_factory=dict)  # request id -> where it went
    _seq_tokens: float | None = None  # EMA of finished sequences' prompt + output tokens

    # Membership and reports -------------------------------------------------------------
    def set_replicas(self, replica_ids: Iterable[str]) -> None:
        """The replicas that exist now; forget those that are gone."""
        ids = set(replica_ids)
        for gone in set(self._replicas) - ids:
            del self._replicas[gone]
        for new in ids - set(self._replicas):
            self._replicas[new] = _Replica()

    @property
    def replica_ids(self) -> list[str]:
        return sorted(self._replicas)

    def report(self, load: ReplicaLoad, polled_at: float, target: str | None = None) -> None:
        """A replica answered a poll sent at ``polled_at`` (router clock) to ``target``.

        An answer from another replica than the one targeted means the target is gone (Serve
        routes a call whose target has vanished to any replica): the target is unreachable.
        """
        if target is not None and target != load.replica_id:
            self.unreachable(target)
        rep = self._replicas.setdefault(load.replica_id, _Replica())
        if polled_at < rep.polled_at:
            return  # an older answer overtaken by a newer one
        rep.report, rep.polled_at, rep.unreachable = load, polled_at, False
        # a request that ended before this poll was sent is no longer in this report
        rep.ended = [e for e in rep.ended if e.ended_at >= polled_at]

    def unreachable(self, replica_id: str) -> None:
        """A poll failed or timed out: route nothing there until it answers again."""
        if replica_id in self._replicas:
            self._replicas[replica_id].unreachable = True

    @property
    def seq_tokens(self) -> float:
        return self._seq_tokens if self._seq_tokens is not None else self.seq_tokens_prior

    def healthy_ids(self, now: float | None = None) -> list[str]:
        """Replicas that answered their latest poll healthy, recently enough."""
        oldest = -math.inf
        if self.limits.max_report_age_s is not None:
            oldest = (time.monotonic() if now is None else now) - self.limits.max_report_age_s
        return [rid for rid, r in sorted(self._replicas.items())
                if _usable(r) and r.polled_at >= oldest]

    # Request lifecycle ------------------------------------------------------------------
    def sent(self, request_ids: Iterable[str], now: float) -> None:
        """The batch carrying these requests left the router now."""
        for rid in request_ids:
            if rid in self._sent:
                self._sent[rid].sent_at = now

    def moved(self, request_id: str, replica_id: str) -> None:
        """A request ran on another replica than planned (its target vanished)."""
        if request_id in self._sent:
            self._sent[request_id].replica_id = replica_id

    def started(self, request_id: str, now: float) -> None:
        """The request's first event reached the router: the replica has scheduled it."""
        sent = self._sent.get(request_id)
        if sent is not None and sent.started_at is None:
            sent.started_at = now

    def finished(self, request_id: str, seq_tokens: Iterable[int] = (),
                 now: float | None = None) -> None:
        """A request ended (any way); record its sequences' total tokens for ``seq_tokens``.

        If the replica's latest report was polled after the request was sent, that report
        still counts it: it is remembered as ended until a report polled after now arrives,
        and the estimate leaves it out (else two requests arriving together could both
        go to the replica that just finished one while another stands idle).
        """
        totals = tuple(seq_tokens)
        sent = self._sent.pop(request_id, None)
        rep = self._replicas.get(sent.replica_id) if sent is not None else None
        if (sent is not None and rep is not None and sent.sent_at is not None
                and sent.sent_at < rep.polled_at):
            running = sent.started_at is not None and sent.started_at < rep.polled_at
            rep.ended.append(_Ended(time.monotonic() if now is None else now, sent.seqs,
                                    running, sent.prompt_tokens, totals))
        for total in totals:
            if total > 0:
                self._seq_tokens = (float(total) if self._seq_tokens is None
                                    else 0.8 * self._seq_tokens + 0.2 * total)

    def in_flight(self, replica_id: str) -> int:
        """Requests this router has sent to (or is batching for) a replica and not finished."""
        return sum(1 for s in self._sent.values() if s.replica_id == replica_id)

    # Estimates and decisions ------------------------------------------------------------
    def estimate(self, replica_id: str) -> LoadEstimate:
        rep = self._replicas[replica_id]
        unreported = [s for s in self._sent.values() if s.replica_id == replica_id
                      and (s.sent_at is None or s.sent_at >= rep.polled_at)]
        seqs = sum(s.seqs for s in unreported)
        tokens = sum(s.prompt_tokens for s in unreported)
        stats = rep.report.stats if rep.report is not None else None
        measured = stats.tokens_per_s if stats is not None else 0.0
        rate = measured if measured > 0 else self.limits.default_tokens_per_s
        prefill = stats.prefill_tokens_per_s if stats is not None else 0.0
        ended_running = [e for e in rep.ended if e.running]
        ended_waiting = [e for e in rep.ended if not e.running]
        held: list[int] = []  # tokens each ended running sequence held in the cache
        for e in ended_running:  # its prompt share where it ended without a final count
            known = list(e.seq_tokens[:e.seqs])
            held += known + [e.prompt_tokens // max(1, e.seqs)] * (e.seqs - len(known))
        return LoadEstimate(replica_id, stats, seqs, tokens, rate,
                            prefill if prefill > 0 else rate,
                            ended_running_tokens=tuple(held),
                            ended_waiting_sequences=sum(e.seqs for e in ended_waiting),
                            ended_waiting_tokens=sum(e.prompt_tokens for e in ended_waiting))

    def room(self, est: LoadEstimate, seqs: int = 1) -> Room:
        """The one place admission reads a replica's capacity, ``seqs`` more sequences
        arriving behind those already queued: how many sequences could start now, i.e. its
        free slots (``max_num_seqs`` minus running) and, for the paged KV cache, its free
        blocks over the blocks a sequence of the measured mean length holds."""
        startable = self.startable(est)
        return Room(short=max(0, est.waiting_sequences + seqs - startable),
                    spare=startable - est.waiting_sequences,
                    default_max_waiting=est.total_slots)

    def startable(self, est: LoadEstimate) -> int:
        """Sequences of ``seq_tokens`` tokens that could start on the replica now."""
        if est.total_blocks <= 0 or est.block_size <= 0:
            return est.free_slots  # no block figures reported: slots alone
        return min(est.free_slots, est.free_blocks // est.blocks_held(self.seq_tokens))

    def predicted_wait(self, est: LoadEstimate, seqs: int = 1) -> float:
        """Seconds a request of ``seqs`` sequences would queue on the replica before it could
        start: 0 when there is room for it behind the queued sequences that can start now;
        otherwise the prefill of the queued sequences that cannot start yet plus the drain
        of the running sequences whose room it needs (module docstring)."""
        startable = self.startable(est)
        short = max(0, est.waiting_sequences + seqs - startable)
        if short == 0:
            return 0.0
        blocked = max(0, est.waiting_sequences - startable)
        blocked_tokens = (est.waiting_tokens * blocked / est.waiting_sequences
                          if est.waiting_sequences > 0 else 0.0)
        return (blocked_tokens / est.prefill_tokens_per_s
                + short * self.seq_tokens / est.tokens_per_s)

    def admit(self, request_id: str, prompt_tokens: int, seqs: int = 1,
              force: bool = False) -> Admission:
        """Pick a replica for a request of ``seqs`` sequences, or say why not.

        ``force``: never shed (a request already accepted whose replica died is placed again:
        accepted work is not refused later); only "no healthy replica" remains.
        """
        decision = self._decide(seqs, force)
        if isinstance(decision, Accepted):
            self._sent[request_id] = _Sent(decision.replica_id, seqs, prompt_tokens * seqs)
        return decision

    def retry_after_s(self, seqs: int = 1) -> int:
        """The ``Retry-After`` a new request of ``seqs`` sequences would be shed with now; 1 s
        when it would be admitted (an accepted request that did not start in time is refused
        with this: the dispatcher's late refusal)."""
        decision = self._decide(seqs, force=False)
        return decision.retry_after_s if isinstance(decision, Shed) else 1

    def _decide(self, seqs: int, force: bool) -> Admission:
        candidates = [self.estimate(rid) for rid in self.healthy_ids()]
        if not candidates:
            return NoReplica("no healthy LLM replica is available")
        best: tuple[tuple[float, int, int, str], LoadEstimate] | None = None
        refusals: list[Shed] = []
        for est in candidates:
            room = self.room(est, seqs)
            wait = self.predicted_wait(est, seqs)
            max_waiting = (self.limits.max_waiting if self.limits.max_waiting is not None
                           else room.default_max_waiting)
            excess = room.short - max_waiting
            if excess > 0 and not force:
                retry = excess * self.seq_tokens / est.tokens_per_s
                refusals.append(Shed("queue_full", _ceil_s(retry), wait,
                                     "the waiting queue is full"))
                continue
            if wait > self.limits.max_queue_wait_s and not force:
                refusals.append(Shed("queue_wait", _ceil_s(wait - self.limits.max_queue_wait_s),
                                     wait, f"predicted queue wait {wait:.1f}s exceeds "
                                     f"{self.limits.max_queue_wait_s:g}s"))
                continue
            key = (wait, -room.spare, est.running_sequences + self.in_flight(est.replica_id),
                   est.replica_id)
            if best is None or key < best[0]:
                best = (key, est)
        if best is None:
            shed = min(refusals, key=lambda s: s.retry_after_s)
            return Shed(shed.reason, shed.retry_after_s, shed.predicted_wait_s,
                        overloaded_message(shed.message, shed.retry_after_s))
        return Accepted(best[1].replica_id, best[0][0])


def _usable(rep: _Replica) -> bool:
    return rep.report is not None and rep.report.healthy and not rep.unreachable


def _ceil_s(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def overloaded_message(reason: str, retry_after_s: int) -> str:
    """A 429's message when the server sheds load: why, and when to come back."""
    return f"server overloaded: {reason}; retry after {retry_after_s}s"
