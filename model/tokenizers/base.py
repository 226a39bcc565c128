"""The tokenizer interface every kind implements, and the byte-level helpers they share.

A :class:`Tokenizer` encodes text to ids, decodes ids to text, applies its chat template, and
exposes what each token adds to the decoded bytes (:meth:`Tokenizer.decode_step`), so that the
incremental detokenizer (model/detokenizer.py) streams text without re-decoding and always
agrees with :meth:`Tokenizer.decode`.
"""

from __future__ import annotations

import codecs
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

from model.chat_template import render_chat_template

#: a byte piece as sentencepiece and tokenizers' ByteFallback spell it
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenizerError(ValueError):
    """A checkpoint has no usable tokenizer, or its tokenizer files are corrupt."""


# Decoding errors: byte-level BPE (tokenizers' from_utf8_lossy) and Python's "replace" both put
# one U+FFFD per maximal invalid subsequence; sentencepiece and tokenizers' ByteFallback put one
# per invalid byte. The latter is this codec error handler, registered on first use.
BYTEWISE_REPLACE = "ringserve.bytewise_replace"


def _bytewise_replace(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\ufffd" * (error.end - error.start), error.end


def bytewise_errors() -> str:
    try:
        codecs.lookup_error(BYTEWISE_REPLACE)
    except LookupError:
        codecs.register_error(BYTEWISE_REPLACE, _bytewise_replace)
    return BYTEWISE_REPLACE


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte spelled as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


class Tokenizer(ABC):
    """Text ⇄ token ids for one checkpoint, plus its chat template."""

    vocab_size: int  # ids are 0..vocab_size-1
    bos_token_id: int | None
    eos_token_ids: frozenset[int]  # any of them ends generation
    special_ids: frozenset[int]  # what decode skips when skip_special_tokens is true
    add_bos_default: bool  # what encode(add_bos=None) does
    chat_template: str | None  # Jinja source; None: the kind's built-in format, if any
    #: name of the codec error handler used when decoded bytes are not valid UTF-8
    utf8_errors: str = "replace"

    def __init__(self, *, vocab_size: int, bos_token_id: int | None,
                 eos_token_ids: Iterable[int], special_ids: Iterable[int], add_bos: bool,
                 chat_template: str | None, template_tokens: Mapping[str, str | None]) -> None:
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids = frozenset(eos_token_ids)
        self.special_ids = frozenset(special_ids)
        self.add_bos_default = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        self._template_tokens = dict(template_tokens)

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None,
               parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        ``add_bos`` None follows the tokenizer's own default (sentencepiece adds BOS, SmolLM's
        GGUF does not). With ``parse_special`` (the default, as transformers does) special tokens
        written in the text, such as ``<|im_start|>``, become their ids; without it they are
        encoded as plain text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._encode_text(text, parse_special)
        if add_bos is None:
            add_bos = self.add_bos_default
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True, but this tokenizer has no BOS token")
            ids.insert(0, self.bos_token_id)
        return ids

    @abstractmethod
    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        """Ids of ``text`` without BOS."""

    # -- decoding ---------------------------------------------------------------------------

    @abstractmethod
    def decode_step(self, token_id: int, *, at_start: bool,
                    skip_special_tokens: bool = True) -> tuple[bytes, bool]:
        """What ``token_id`` adds to the decoded bytes, and whether decoding is still at its start.

        Decoding a sequence starts with ``at_start=True`` and threads the returned flag through
        every token: sentencepiece-style tokenizers drop the leading space of the first piece.
        """

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` adds to decoded text in the middle of a sequence."""
        return self.decode_step(token_id, at_start=False, skip_special_tokens=False)[0]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are left out unless ``skip_special_tokens`` is false."""
        out = bytearray()
        at_start = True
        for token_id in ids:
            piece, at_start = self.decode_step(token_id, at_start=at_start,
                                               skip_special_tokens=skip_special_tokens)
            out += piece
        return out.decode("utf-8", errors=self.utf8_errors)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary "
                             f"(0..{self.vocab_size - 1})")

    # -- chat -------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a conversation (BOS included when the format has one).

        Raises ValueError for unknown roles, an empty conversation, or a conversation the
        format rejects (the template's ``raise_exception``, or Mistral's ordering rules).
        """
        if self.chat_template is None:
            return self._builtin_chat(messages, add_generation_prompt)
        text = render_chat_template(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    special_tokens=self._template_tokens)
        # As transformers: the template writes BOS itself when the model wants one.
        return self.encode(text, add_bos=False)

    def _builtin_chat(self, messages: list[dict[str, str]],
                      add_generation_prompt: bool) -> list[int]:
        raise ValueError("this tokenizer has no chat template")


# ---------------------------------------------------------------------------------------------
# sentencepiece
