"""Stop strings over streamed text, stop token ids and EOS."""

from __future__ import annotations

import pytest

from model.sampling_params import SamplingParams
from model.stop import StopChecker, is_stop_token


def _run(stop: tuple[str, ...], deltas: list[str]) -> tuple[list[str], bool, str]:
    """Push every delta (until a stop); return the emitted pieces, stopped, and the flush."""
    checker = StopChecker(stop)
    emitted: list[str] = []
    for delta in deltas:
        out, stopped = checker.push(delta)
        emitted.append(out)
        if stopped:
            return emitted, True, checker.flush()
    return emitted, False, checker.flush()


def test_no_stop_strings_passes_text_through() -> None:
    emitted, stopped, tail = _run((), ["Hello", " world"])
    assert emitted == ["Hello", " world"] and not stopped and tail == ""


def test_stop_in_one_delta_cuts_before_it() -> None:
    emitted, stopped, tail = _run(("STOP",), ["abc STOP def"])
    assert emitted == ["abc "] and stopped and tail == ""


def test_stop_split_across_deltas_is_never_emitted() -> None:
    emitted, stopped, _ = _run(("</s>",), ["Hi <", "/", "s", "> more"])
    assert stopped
    assert "".join(emitted) == "Hi "
    assert all("<" not in piece for piece in emitted)


@pytest.mark.parametrize("split", range(1, 9))
def test_every_split_point_gives_the_same_text(split: int) -> None:
    text = "xy<END>z"
    emitted, stopped, _ = _run(("<END>",), [text[:split], text[split:]])
    assert stopped and "".join(emitted) == "xy"


def test_overlapping_prefix_ababc() -> None:
    emitted, stopped, _ = _run(("abc",), list("ababc"))
    assert emitted == ["", "", "ab", "", ""]
    assert stopped and "".join(emitted) == "ab"


def test_overlapping_prefix_aaab() -> None:
    emitted, stopped, _ = _run(("aab",), list("xaaaab"))
    assert stopped and "".join(emitted) == "xaa"


def test_earliest_of_several_stop_strings_wins() -> None:
    emitted, stopped, _ = _run(("world", "lo"), ["hello world"])
    assert stopped and emitted == ["hel"]
    emitted, stopped, _ = _run(("bcd", "ab"), ["xab", "cd"])
    assert stopped and "".join(emitted) == "x"


def test_holds_back_at_most_the_longest_partial_prefix() -> None:
    checker = StopChecker(("abcdef", "xy"))
    out, stopped = checker.push("123abc")
    assert (out, stopped) == ("123", False)
    out, stopped = checker.push("de")
    assert (out, stopped) == ("", False)
    out, stopped = checker.push("Z")  # "abcdeZ" can no longer become a stop string
    assert (out, stopped) == ("abcdeZ", False)
    out, stopped = checker.push("qqx")
    assert (out, stopped) == ("qq", False)
    assert checker.flush() == "x"
    assert checker.flush() == ""


def test_flush_returns_held_tail_when_generation_ends_otherwise() -> None:
    emitted, stopped, tail = _run(("STOP",), ["the end ST"])
    assert emitted == ["the end "] and not stopped and tail == "ST"


def test_push_after_stop_emits_nothing() -> None:
    checker = StopChecker(("!",))
    assert checker.push("hi!there") == ("hi", True)
    assert checker.stopped
    assert checker.push("more") == ("", True)
    assert checker.flush() == ""


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError):
        StopChecker(("",))


def test_is_stop_token() -> None:
    eos = {2}
    assert is_stop_token(2, SamplingParams(), eos)
    assert not is_stop_token(2, SamplingParams(ignore_eos=True), eos)
    assert is_stop_token(7, SamplingParams(stop_token_ids=(7,), ignore_eos=True), eos)
    assert not is_stop_token(5, SamplingParams(stop_token_ids=(7,)), eos)
