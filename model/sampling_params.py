"""Per-request sampling parameters: a frozen dataclass validated once, at the edge of the engine."""

from __future__ import annotations

from dataclasses import dataclass

# A seed is a signed 64-bit integer (OpenAI's `seed`); torch generators take [-2**63, 2**64).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request, and when to stop.

    temperature 0 means greedy. top_k <= 0, top_p == 1 and min_p == 0 switch those filters off.
    ``logprobs`` None returns no log-probabilities; k >= 0 returns the chosen token's
    log-probability (of the model's raw distribution) and the k most likely alternatives.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0.0, "temperature must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            (self.n >= 1, "n must be >= 1"),
            (self.seed is None or (isinstance(self.seed, int)
                                   and SEED_MIN <= self.seed <= SEED_MAX),
             "seed must be a 64-bit integer (from -2**63 to 2**63 - 1)"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingParamsError(message)

    @property
    def greedy(self) -> bool:
        """True when the next token is always the most likely one."""
        return self.temperature == 0.0
