"""Paged rolling KV cache, the pure-Python half: block pool, block tables, ring arithmetic.

The cache is a pool of blocks of ``B`` positions. A sequence owns a *block table* that grows
one block at a time up to ``R = ceil((W - 1) / B) + 1`` blocks and then *rolls*: logical block
j (positions jB .. jB+B-1) lives in table entry ``j mod R``, whose previous content (logical
block j - R) lies entirely outside the window. Position i is therefore at ring row
``i mod (R*B)``, the rolling buffer one level up, and a sequence holds
``min(ceil(len / B), R)`` blocks. With no window (or a window longer than the context) the
table never rolls: R = ceil(max_model_len / B).

The allocator hands out block ids and says "no room" (``None``); the scheduler decides what
to do about it (wait, or preempt). No torch here: everything is tested on plain numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)


def blocks_per_table(window: int | None, max_model_len: int, block_size: int) -> int:
    """R: the most blocks one sequence ever holds.

    A query at position p sees p-W+1 .. p. Those W positions touch at most
    ceil((W - 1) / B) + 1 logical blocks (the partial block of p plus enough whole blocks
    for the W - 1 before it), so a table of that many entries can overwrite entry j mod R
    with block j: block j - R ends at position (j - R + 1)B - 1 <= jB - (R - 1)B - 1
    <= p - W, out of every later query's window. A context of at most ``max_model_len``
    positions never needs more than ceil(max_model_len / B) blocks.
    """
    if block_size < 1:
        raise ValueError("the block size must be positive")
    whole_context = ceil_div(max_model_len, block_size)
    if window is None:
        return whole_context
    return min(ceil_div(window - 1, block_size) + 1, whole_context)


def blocks_for(num_positions: int, block_size: int, table_len: int) -> int:
    """Blocks a sequence of ``num_positions`` cached positions holds: min(ceil(n / B), R)."""
    return min(ceil_div(num_positions, block_size), table_len)


def ring_segments(block_table: Sequence[int], first_pos: int, count: int, block_size: int,
                  table_len: int) -> list[tuple[int, int]]:
    """Pool rows of positions ``first_pos .. first_pos + count - 1``, as ``[start, stop)`` runs.

    This is the one place the paged rolling arithmetic lives. Pool row ``b*B + o`` is row o
    of block b (the pool viewed as [num_blocks * B, ...]). Position i is in logical block
    j = i // B at offset o = i % B; the block is ``block_table[j % R]``; so position i sits
    at ring row i mod (R*B) and at pool row ``block_table[(i // B) % R] * B + i % B``.
    Consecutive positions whose pool rows are consecutive merge into one run, so a
    sequence whose blocks happen to be adjacent in the pool reads as a single slice.

    Worked example: W = 6, B = 2, so R = ceil(5 / 2) + 1 = 4 entries (8 ring rows); the
    table is [7, 3, 4, 5] and the sequence has cached positions 0..8 and writes 9::

        position:      0 1 | 2 3 | 4 5 | 6 7 | 8 9
        logical block:   0 |   1 |   2 |   3 |   4
        entry (j % 4):   0 |   1 |   2 |   3 |   0   <- the ring wraps: block 4 reuses entry 0
        block:           7 |   3 |   4 |   5 |   7
        pool row:    14 15 | 6 7 | 8 9 |10 11|14 15

        ring_segments([7, 3, 4, 5], 9, 1, 2, 4) == [(15, 16)]            # write position 9
        ring_segments([7, 3, 4, 5], 4, 6, 2, 4) == [(8, 12), (14, 16)]   # its window 4..9

    Positions 8 and 9 overwrote 0 and 1 (entry 0), which a query at 9 can no longer see
    (9 - 6 + 1 = 4 is the oldest it may); blocks 4 and 5 are adjacent in the pool, so
    positions 4..7 come back as one run. A read of more than R*B positions would meet
    positions the ring no longer holds, and raises.
    """
    if count > table_len * block_size:
        raise ValueError(f"{count} positions do not fit a ring of {table_len} x {block_size}")
    runs: list[tuple[int, int]] = []
    pos, end = first_pos, first_pos + count
    while pos < end:
        logical, offset = divmod(pos, block_size)
        entry = logical % table_len
        if entry >= len(block_table):
            raise ValueError(f"position {pos} needs table entry {entry}; the table has "
                             f"{len(block_table)}")
        take = min(block_size - offset, end - pos)  # to the end of this block or the range
        start = block_table[entry] * block_size + offset
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], start + take)
        else:
            runs.append((start, start + take))
        pos += take
    return runs


def rows_of(runs: Sequence[tuple[int, int]]) -> list[int]:
    """The pool rows of ``ring_segments`` runs, one by one, in position order."""
    return [row for start, stop in runs for row in range(start, stop)]


def visible_history(start_pos: int, window: int | None) -> int:
    """How many positions before ``start_pos`` a query at ``start_pos`` may attend to.

    With window W a query at position p sees keys p-W+1 .. p (W positions, itself included),
    so the cached history it needs is min(p, W-1) positions; with no window, all p of them.
    """
    return start_pos if window is None else min(start_pos, window - 1)


class BlockPool:
    """Hands out block ids 0..num_blocks-1 and takes them back; pure Python.

    Placement keeps each sequence's blocks adjacent where it can (the decode kernel then
    reads a sequence as a few slices instead of one per block): a sequence's next block is
    the one right after its last when free; a new run starts in the middle of the largest
    free stretch, which leaves room for the sequences on both sides to grow.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV cache pool needs at least one block")
        self.num_blocks = num_blocks
        self._free = bytearray(b"\x01") * num_blocks  # 1 = free
        self._num_free = num_blocks

    @property
    def num_free(self) -> int:
        """Blocks not handed out."""
        return self._num_free

    @property
    def num_used(self) -> int:
        """Blocks handed out."""
        return self.num_blocks - self._num_free

    def is_free(self, block: int) -> bool:
        """Whether ``block`` is free (a valid id is required)."""
        return bool(self._free[block])

    def allocate(self, count: int, after: int | None = None) -> list[int] | None:
        """``count`` free block ids, or None (and nothing taken) when fewer are free.

        ``after`` names the block the new ones should follow (the sequence's last block).
        """
        if count < 0:
            raise ValueError("cannot allocate a negative number of blocks")
        if count > self._num_free:
            return None
        taken: list[int] = []
        nxt = None if after is None else after + 1
        while len(taken) < count:
            if nxt is not None and nxt < self.num_blocks and self._free[nxt]:
                block = nxt
            else:
                start, length = self._largest_free_run()
                want = count - len(taken)
                block = start + max(0, (length - want) // 2)
            self._free[block] = 0
            taken.append(block)
            nxt = block + 1
        self._num_free -= count
        return taken

    def free(self, blocks: Sequence[int]) -> None:
        """Give blocks back; freeing a block twice (or an unknown id) is a bug and raises."""
        for block in blocks:
            if not 0 <= block < self.num_blocks or self._free[block]:
                raise ValueError(f"block {block} is not allocated")
            self._free[block] = 1
        self._num_free += len(blocks)

    def _largest_free_run(self) -> tuple[int, int]:
        """(first block, length) of the longest stretch of free blocks (first one on ties)."""
        best_start, best_len, pos = 0, 0, 0
        while True:
            start = self._free.find(1, pos)
            if start < 0:
                break
            stop = self._free.find(0, start)
            stop = self.num_blocks if stop < 0 else stop
            if stop - start > best_len:
                best_start, best_len = start, stop - start
            pos = stop
        return best_start, best_len


@dataclass
class BlockTable:
    """One sequence's blocks, in table-entry order (entry e holds logical blocks e, e+R, ...)."""

    blocks: list[int]

    @property
    def last(self) -> int | None:
        """The most recently added block (the next one should follow it), or None."""
        return self.blocks[-1] if self.blocks else None


class BlockManager:
    """Block tables of running sequences over one :class:`BlockPool`.

    ``grow(seq_id, n)`` makes a table cover positions 0..n-1 (min(ceil(n / B), R) blocks),
    all or nothing; ``release`` hands a sequence's blocks back.
    """

    def __init__(self, pool: BlockPool, block_size: int, table_len: int) -> None:
        if table_len > pool.num_blocks:
            raise ValueError(f"a pool of {pool.num_blocks} blocks cannot hold one full table "
                             f"of {table_len} blocks")
        self.pool = pool
        self.block_size = block_size
        self.table_len = table_len
        self._tables: dict[str, BlockTable] = {}

    def blocks_needed(self, seq_id: str | None, num_positions: int) -> int:
        """New blocks ``grow(seq_id, num_positions)`` would take (None: a new sequence)."""
        held = len(self._tables[seq_id].blocks) if seq_id in self._tables else 0
        return max(0, blocks_for(num_positions, self.block_size, self.table_len) - held)

    def grow(self, seq_id: str, num_positions: int) -> bool:
        """Make ``seq_id``'s table cover positions 0..num_positions-1; False if no room."""
        table = self._tables.get(seq_id)
        need = self.blocks_needed(seq_id, num_positions)
        if need == 0:
            if table is None:
                self._tables[seq_id] = BlockTable([])
            return True
        blocks = self.pool.allocate(need, after=None if table is None else table.last)
        if blocks is None:
            return False
        if table is None:
            self._tables[seq_id] = BlockTable(blocks)
        else:
            table.blocks.extend(blocks)
        return True

    def release(self, seq_id: str) -> None:
        """Free a sequence's blocks (nothing if it holds none)."""
        table = self._tables.pop(seq_id, None)
        if table is not None:
            self.pool.free(table.blocks)

    def table(self, seq_id: str) -> tuple[int, ...]:
        """``seq_id``'s block ids in entry order."""
        return tuple(self._tables[seq_id].blocks)

    def num_blocks_of(self, seq_id: str) -> int:
        """How many blocks ``seq_id`` holds (0 when unknown)."""
        table = self._tables.get(seq_id)
        return 0 if table is None else len(table.blocks)
