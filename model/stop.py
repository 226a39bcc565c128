"""When a sequence stops: stop strings over streamed text, stop token ids and EOS.

:class:`StopChecker` sees a sequence's text as it is detokenized, delta by delta, and never
lets a stop string (or any part of one) reach the client: it holds back the longest tail that
is still a proper prefix of some stop string. Worked example, stop ``("abc",)``, deltas
``"a", "b", "a", "b", "c"``::

    push("a")  -> ("",   False)   held "a"    ("a" may start "abc")
    push("b")  -> ("",   False)   held "ab"
    push("a")  -> ("ab", False)   held "a"    ("aba" can't start "abc"; its tail "a" can)
    push("b")  -> ("",   False)   held "ab"
    push("c")  -> ("",   True)    "abc" matched: the text before it ("") goes out, then stop

Any stop string that spans two pushes must begin inside the held tail (the tail is the longest
suffix that is a prefix of a stop string), so searching ``held + delta`` finds every match.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from model.sampling_params import SamplingParams


class StopChecker:
    """Stop-string matching for one sequence's incrementally produced text."""

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = tuple(stop)
        self._held = ""  # never longer than max(len(s) for s in stop) - 1
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once a stop string has matched; later pushes emit nothing."""
        return self._stopped

    def push(self, text_delta: str) -> tuple[str, bool]:
        """Add newly decoded text; return (text safe to emit now, whether a stop string matched).

        On a match only the text before the stop string is emitted. When several stop strings
        are complete in the text seen so far, the one starting earliest wins.
        """
        if self._stopped:
            return "", True
        if not self._stop:
            return text_delta, False
        text = self._held + text_delta
        cut = min((p for p in (text.find(s) for s in self._stop) if p >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self._stopped = True
            return text[:cut], True
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back tail, when generation ends for a reason other than a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_tail(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest


def is_stop_token(token_id: int, params: SamplingParams, eos_token_ids: Collection[int]) -> bool:
    """True when ``token_id`` ends the sequence: a requested stop token, or EOS unless ignored."""
    if token_id in params.stop_token_ids:
        return True
    return not params.ignore_eos and token_id in eos_token_ids
