"""Streaming detokenization: generated ids in, new text out, O(1) work per token.

Each token's bytes (:meth:`Tokenizer.decode_step`) go through an incremental UTF-8 decoder,
which holds back an incomplete multi-byte character until its last byte arrives. So the text
returned by all ``push`` calls and ``flush`` is exactly ``tokenizer.decode(ids)``, and no
U+FFFD is ever emitted for a character that is merely unfinished.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from model.tokenizers import Tokenizer


class IncrementalDetokenizer:
    """Turns generated token ids into text as they arrive.

    By default the output equals ``tokenizer.decode(generated_ids)``: with sentencepiece the
    first piece's leading space is dropped, as a decode from scratch drops it (right for a chat
    reply). Pass ``prompt_ids`` when the text continues the prompt (completions): the output is
    then what decoding prompt and generation together adds after the prompt, so the first
    generated token keeps its space (" Paris" after "The capital of France is").
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True,
                 prompt_ids: Iterable[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=tokenizer.utf8_errors)
        self._at_start = True
        for token_id in prompt_ids:
            _, self._at_start = tokenizer.decode_step(
                token_id, at_start=self._at_start, skip_special_tokens=skip_special_tokens)
            if not self._at_start:
                break

    def push(self, token_id: int) -> str:
        """The text ``token_id`` completes; empty while a multi-byte character is unfinished."""
        piece, self._at_start = self._tokenizer.decode_step(
            token_id, at_start=self._at_start, skip_special_tokens=self._skip_special_tokens)
        return self._decoder.decode(piece) if piece else ""

    def flush(self) -> str:
        """The rest, at the end of generation (U+FFFD where a character was left unfinished)."""
        return self._decoder.decode(b"", final=True)
