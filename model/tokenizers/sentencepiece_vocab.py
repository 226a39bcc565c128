"""Sentencepiece tokenizer.model vocabularies (Mistral, Llama 2) via the sentencepiece library."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from model.chat_template import mistral_v1_chat
from model.tokenizers.base import BYTE_PIECE, Tokenizer, TokenizerError, bytewise_errors

_NORMAL, _CONTROL, _BYTE, _UNKNOWN = range(4)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``tokenizer.model`` (Mistral, Llama 2), through the sentencepiece library.

    Decoding follows sentencepiece exactly: control pieces are invisible (and kept at the start),
    the first other piece loses one leading "▁" when it is a normal piece, byte pieces
    ``<0xNN>`` are raw bytes, and invalid UTF-8 becomes one U+FFFD per byte.
    """

    def __init__(self, path: Path, *, chat_template: str | None = None,
                 model_proto: bytes | None = None, add_bos: bool = True,
                 extra_eos_ids: Iterable[int] = ()) -> None:
        import sentencepiece

        try:
            if model_proto is None:
                sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            else:
                sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{path}: not a readable sentencepiece model ({error})") from error
        self.path = path
        self._sp = sp
        size = sp.get_piece_size()
        self._pieces: list[bytes] = []
        kinds = bytearray()
        for token_id in range(size):
            piece = sp.id_to_piece(token_id)
            if sp.is_control(token_id):
                kinds.append(_CONTROL)
                self._pieces.append(piece.encode())
            elif sp.is_byte(token_id) and (match := BYTE_PIECE.fullmatch(piece)):
                kinds.append(_BYTE)
                self._pieces.append(bytes([int(match.group(1), 16)]))
            elif sp.is_unknown(token_id):
                kinds.append(_UNKNOWN)
                self._pieces.append(sp.decode([token_id]).encode())  # the unk surface " ⁇ "
            else:
                kinds.append(_NORMAL)
                self._pieces.append(piece.replace("\u2581", " ").encode())
        self._kinds = bytes(kinds)
        control = [i for i in range(size) if kinds[i] == _CONTROL]
        self.utf8_errors = bytewise_errors()
        bos = sp.bos_id() if sp.bos_id() >= 0 else None
        eos = [sp.eos_id()] if sp.eos_id() >= 0 else []
        eos += [i for i in extra_eos_ids if i not in eos]
        self._control_pieces = {sp.id_to_piece(i): i for i in control}
        super().__init__(
            vocab_size=size, bos_token_id=bos, eos_token_ids=eos, special_ids=control,
            add_bos=add_bos, chat_template=chat_template,
            template_tokens={
                "bos_token": sp.id_to_piece(bos) if bos is not None else None,
                "eos_token": sp.id_to_piece(eos[0]) if eos else None,
                "unk_token": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
            },
        )

    @cached_property
    def _control_pattern(self) -> re.Pattern[str] | None:
        names = sorted(self._control_pieces, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names))) if names else None

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        pattern = self._control_pattern
        if not parse_special or pattern is None:
            return list(self._sp.encode(text))
        ids: list[int] = []
        start = 0
        # Each stretch of text between control tokens is its own sentencepiece input, with its
        # own dummy-prefix space, as llama.cpp does and as mistral-common encodes chat turns.
        for match in pattern.finditer(text):
            if match.start() > start:
                ids += self._sp.encode(text[start:match.start()])
            ids.append(self._control_pieces[match.group()])
            start = match.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def decode_step(self, token_id: int, *, at_start: bool,
                    skip_special_tokens: bool = True) -> tuple[bytes, bool]:
        self._check_id(token_id)
        kind = self._kinds[token_id]
        if kind == _CONTROL:
            return (b"" if skip_special_tokens else self._pieces[token_id]), at_start
        piece = self._pieces[token_id]
        if at_start and kind == _NORMAL and piece.startswith(b" "):
            piece = piece[1:]
        return piece, False

    def _builtin_chat(self, messages: list[dict[str, str]],
                      add_generation_prompt: bool) -> list[int]:
        if "[INST]" in self._control_pieces or self.bos_token_id is None or self._sp.eos_id() < 0:
            raise ValueError(f"{self.path}: no chat template, and this vocabulary is not Mistral's "
                             "v1 (its [INST] is a control token or it lacks BOS/EOS); add a "
                             "tokenizer_config.json with a chat_template")
        return mistral_v1_chat(messages, add_generation_prompt=add_generation_prompt,
                               encode=lambda text: self.encode(text, add_bos=False,
                                                               parse_special=False),
                               bos_id=self.bos_token_id, eos_id=self._sp.eos_id())


# ---------------------------------------------------------------------------------------------
# tokenizers library (tokenizer.json, GGUF byte-level BPE)
