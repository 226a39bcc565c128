"""The rolling buffer's arithmetic and the slot allocator: pure Python, no torch.

Each sequence owns one *slot* of ``buffer_len = min(window, max_model_len)`` positions per
layer (``max_model_len`` when there is no window); token position i lives at row
``i % buffer_len``. The scheduler plans on these numbers alone; the tensors that hold the rows
are in :mod:`model.kv_cache`. The allocator only says "no room" (``None``); the scheduler
decides what to do about it. (The engine's cache is the paged one, :mod:`model.block_table`;
this is the slot design it replaced, kept as the reference it is tested and measured against.)
"""

from __future__ import annotations


def buffer_len_for(window: int | None, max_model_len: int) -> int:
    """Rows a slot needs per layer: the window, or the whole context when there is none."""
    return max_model_len if window is None else min(window, max_model_len)


def rolling_rows(first_pos: int, count: int, buffer_len: int) -> list[int]:
    """Buffer rows of positions ``first_pos .. first_pos + count - 1`` (position i -> i % W).

    This is the one place the rolling arithmetic lives. Worked example, W = buffer_len = 4,
    a sequence that has cached positions 0..5 and now writes positions 6, 7, 8::

        position:   0 1 2 3 | 4 5 6 7 | 8
        row:        0 1 2 3 | 0 1 2 3 | 0      (row = position % 4)

        rolling_rows(6, 3, 4) == [2, 3, 0]

    After those writes the buffer holds rows [8, 5, 6, 7] (row r holds the newest position
    congruent to r mod 4): exactly the last W = 4 positions 5..8, which is all that a query at
    position 8 may see with window 4 (it attends to positions 8-4+1 = 5 .. 8). Reading the
    previous window back in position order uses the same function:
    ``rolling_rows(5, 4, 4) == [1, 2, 3, 0]``.

    When ``count > buffer_len`` only the last ``buffer_len`` positions can survive; callers
    write just those (the others would be overwritten within the same step).
    """
    return [(first_pos + i) % buffer_len for i in range(count)]


def visible_history(start_pos: int, window: int | None) -> int:
    """How many positions before ``start_pos`` a query at ``start_pos`` may attend to.

    With window W a query at position p sees keys p-W+1 .. p (W positions, itself included),
    so the cached history it needs is min(p, W-1) positions; with no window, all p of them.
    """
    return start_pos if window is None else min(start_pos, window - 1)


class SlotAllocator:
    """Hands out slot ids 0..num_slots-1, lowest free first; pure Python."""

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError("the KV cache pool needs at least one slot")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: pop() gives the lowest id

    def allocate(self) -> int | None:
        """A free slot id, or None when every slot is taken."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        """Give a slot back; releasing a slot twice is a bug and raises."""
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)
        self._free.sort(reverse=True)

    @property
    def num_free(self) -> int:
        """Slots not handed out."""
        return len(self._free)


def is_decode(start_pos: int, num_tokens: int) -> bool:
    """A chunk of one token past position 0 is a decode step; anything else runs prompt
    tokens (a prefill chunk)."""
    return num_tokens == 1 and start_pos > 0
