"""Vocabularies run by the ``tokenizers`` library: a checkpoint's tokenizer.json, or GGUF BPE."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.tokenizers.base import BYTE_PIECE, Tokenizer, bytes_to_unicode, bytewise_errors

if TYPE_CHECKING:
    import tokenizers

_BYTE_LEVEL, _SP_STRIP, _SP_NO_STRIP, _METASPACE, _OPAQUE = range(5)


def _decoder_mode(decoder: Mapping[str, Any] | None) -> tuple[int, list[tuple[str, str]], bool]:
    """How a tokenizer.json decoder turns tokens into text: (mode, replacements, byte fallback).

    Understood: ByteLevel; a Sequence of Replace / ByteFallback / Fuse with an optional final
    Strip of one leading space (Llama/Mistral); Metaspace. Anything else is _OPAQUE: each token
    decodes on its own through the library.
    """
    if decoder is None:
        return _OPAQUE, [], False
    kind = decoder.get("type")
    if kind == "ByteLevel":
        return _BYTE_LEVEL, [], False
    if kind == "Metaspace":
        scheme = decoder.get("prepend_scheme",
                             "always" if decoder.get("add_prefix_space", True) else "never")
        mode = _SP_NO_STRIP if scheme == "never" else _METASPACE
        return mode, [(decoder.get("replacement", "\u2581"), " ")], False
    if kind != "Sequence":
        return _OPAQUE, [], False
    replacements: list[tuple[str, str]] = []
    byte_fallback = fused = strip = False
    for step in decoder.get("decoders", []):
        step_kind = step.get("type")
        if step_kind == "Replace" and "String" in step.get("pattern", {}) and not fused:
            replacements.append((step["pattern"]["String"], step["content"]))
        elif step_kind == "ByteFallback" and not fused:
            byte_fallback = True
        elif step_kind == "Fuse":
            fused = True
        elif (step_kind == "Strip" and fused and not strip and step.get("content") == " "
              and step.get("start") == 1 and step.get("stop") == 0):
            strip = True
        else:
            return _OPAQUE, [], False
    return (_SP_STRIP if strip else _SP_NO_STRIP), replacements, byte_fallback


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer``: a checkpoint's tokenizer.json, or one built from GGUF."""

    def __init__(self, backend: tokenizers.Tokenizer, *, decoder: Mapping[str, Any] | None,
                 bos_token: str | None, eos_tokens: Sequence[str | int], add_bos: bool,
                 chat_template: str | None, template_tokens: Mapping[str, str | None],
                 token_strings: Sequence[str] | None = None, source: Path) -> None:
        self._backend = backend
        self.path = source
        added = backend.get_added_tokens_decoder()
        size = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1,
                   len(token_strings or ()))
        special = [i for i, token in added.items() if token.special]
        self._mode, replacements, byte_fallback = _decoder_mode(decoder)
        if byte_fallback:
            self.utf8_errors = bytewise_errors()
        self._first_pieces: dict[int, bytes] = {}
        self._pieces: list[bytes] = []
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        for token_id in range(size):
            text = token_strings[token_id] if token_strings is not None else None
            if text is None:
                text = backend.id_to_token(token_id)
            if text is None:
                self._pieces.append(b"")
            elif self._mode == _OPAQUE:
                self._pieces.append(backend.decode([token_id], skip_special_tokens=False).encode())
            elif self._mode == _BYTE_LEVEL:
                self._pieces.append(b"".join(
                    bytes([byte_of[c]]) if c in byte_of else c.encode() for c in text))
            else:
                match = BYTE_PIECE.fullmatch(text) if byte_fallback else None
                if match is not None:
                    self._pieces.append(bytes([int(match.group(1), 16)]))
                    continue
                if self._mode == _METASPACE:
                    self._first_pieces[token_id] = text.replace(replacements[0][0], "").encode()
                for old, new in replacements:
                    text = text.replace(old, new)
                self._pieces.append(text.encode())

        def to_id(token: str | int | None) -> int | None:
            if token is None or isinstance(token, int):
                return token
            return backend.token_to_id(token)

        eos_ids = {i for i in map(to_id, eos_tokens) if i is not None}
        super().__init__(vocab_size=size, bos_token_id=to_id(bos_token), eos_token_ids=eos_ids,
                         special_ids=special, add_bos=add_bos, chat_template=chat_template,
                         template_tokens=template_tokens)

    @cached_property
    def _plain_backend(self) -> tokenizers.Tokenizer:
        """A copy that encodes special tokens' text as plain text."""
        from tokenizers import Tokenizer as Backend

        plain = Backend.from_str(self._backend.to_str())
        plain.encode_special_tokens = True
        return plain

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        backend = self._backend if parse_special else self._plain_backend
        return list(backend.encode(text, add_special_tokens=False).ids)

    def decode_step(self, token_id: int, *, at_start: bool,
                    skip_special_tokens: bool = True) -> tuple[bytes, bool]:
        self._check_id(token_id)
        if skip_special_tokens and token_id in self.special_ids:
            return b"", at_start
        # Rendered special tokens go through the decoder like any token, as in the library.
        if not at_start:
            return self._pieces[token_id], False
        if self._mode == _METASPACE:
            return self._first_pieces.get(token_id, self._pieces[token_id]), False
        piece = self._pieces[token_id]
        if self._mode == _SP_STRIP:
            if not piece:
                return piece, True
            return (piece[1:] if piece.startswith(b" ") else piece), False
        return piece, False
