"""Tokenizers: sentencepiece ``tokenizer.model``, HF ``tokenizer.json`` and GGUF vocabularies.

:func:`load_tokenizer` picks the kind from what a checkpoint holds. Every kind encodes text to
ids, decodes ids to text, applies its chat template, and exposes what each token adds to the
decoded bytes (:meth:`Tokenizer.decode_step`), so that the incremental detokenizer
(model/detokenizer.py) streams text without re-decoding and always agrees with :meth:`decode`.
"""

from __future__ import annotations

import codecs
import json
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.chat_template import compile_chat_template, mistral_v1_chat, render_chat_template

if TYPE_CHECKING:
    import tokenizers


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


def _bytewise_errors() -> str:
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


_NORMAL, _CONTROL, _BYTE, _UNKNOWN = range(4)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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
            elif sp.is_byte(token_id) and (match := _BYTE_PIECE.fullmatch(piece)):
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
        self.utf8_errors = _bytewise_errors()
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
            self.utf8_errors = _bytewise_errors()
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
                match = _BYTE_PIECE.fullmatch(text) if byte_fallback else None
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


# ---------------------------------------------------------------------------------------------
# loading


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder, a ``.gguf`` file, or a tokenizer file itself.

    A folder is searched for ``tokenizer.json`` (with ``tokenizer_config.json``; it lists the
    tokens a fine-tune added, which a sentencepiece model beside it lacks), then
    ``tokenizer.model`` (sentencepiece), then a single ``*.gguf``. Raises TokenizerError naming
    the folder when none is there, or the file that cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _load_tokenizer_json(path / "tokenizer.json")
        # Mistral's consolidated folders name it tokenizer.model.v1, .v3, ...
        for model_file in [path / "tokenizer.model", *sorted(path.glob("tokenizer.model.v*"))]:
            if model_file.is_file():
                return SentencePieceTokenizer(model_file, chat_template=_folder_template(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0])
        if len(ggufs) > 1:
            raise TokenizerError(f"{path}: holds several .gguf files; pass one of them")
        extra = ""
        if (path / "tekken.json").is_file():
            extra = " (tekken.json, Mistral's tiktoken-style tokenizer, is not supported)"
        raise TokenizerError(f"{path}: no tokenizer found; looked for tokenizer.json, "
                             f"tokenizer.model[.vN] and *.gguf{extra}")
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path)
        if path.name == "tokenizer.json":
            return _load_tokenizer_json(path)
        if path.name.startswith("tokenizer.model"):
            return SentencePieceTokenizer(path, chat_template=_folder_template(path.parent))
        raise TokenizerError(f"{path}: not a tokenizer file (expected a folder, a .gguf, "
                             "tokenizer.json or tokenizer.model)")
    raise TokenizerError(f"{path}: no such file or folder")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path}: unreadable JSON ({error})") from error
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _checked_template(template: Any, source: Path) -> str | None:
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is None:
        return None
    if not isinstance(template, str):
        raise TokenizerError(f"{source}: chat_template must be a string")
    try:
        compile_chat_template(template)
    except ValueError as error:
        raise TokenizerError(f"{source}: {error}") from error
    return template


def _folder_template(folder: Path) -> str | None:
    """The chat template a folder holds, where transformers looks for it."""
    if (folder / "chat_template.jinja").is_file():
        source = folder / "chat_template.jinja"
        try:
            return _checked_template(source.read_text(encoding="utf-8"), source)
        except (OSError, UnicodeDecodeError) as error:
            raise TokenizerError(f"{source}: unreadable ({error})") from error
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            template = _read_json(folder / name).get("chat_template")
            if template is not None:
                return _checked_template(template, folder / name)
    return None


def _load_tokenizer_json(path: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as Backend

    folder = path.parent
    try:
        raw = path.read_text(encoding="utf-8")
        backend = Backend.from_str(raw)
        decoder = json.loads(raw).get("decoder")
    except Exception as error:  # the library raises a bare Exception for a malformed file
        raise TokenizerError(f"{path}: not a readable tokenizer.json ({error})") from error
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        config = _read_json(folder / "tokenizer_config.json")
    tokens = {name: _token_text(config.get(name))
              for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    eos: list[str | int] = [tokens["eos_token"]] if tokens["eos_token"] else []
    if (folder / "generation_config.json").is_file():
        value = _read_json(folder / "generation_config.json").get("eos_token_id")
        eos += [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        # No flag: the tokenizer.json post-processor decides, as in transformers.
        bos_id = backend.token_to_id(tokens["bos_token"]) if tokens["bos_token"] else None
        with_specials = backend.encode("", add_special_tokens=True).ids
        add_bos = bos_id is not None and with_specials[:1] == [bos_id]
    return HFTokenizer(backend, decoder=decoder, bos_token=tokens["bos_token"], eos_tokens=eos,
                       add_bos=add_bos, chat_template=_folder_template(folder),
                       template_tokens=tokens, source=path)


# Pre-tokenizer splits for GGUF byte-level vocabularies, as transformers'
# integrations/gguf/gguf_tokenizer_mapping.py builds them; every other `tokenizer.ggml.pre`
# (including SmolLM's "smollm") gets GPT-2's ByteLevel split there, and so here.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx",
                     "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
_CONTROL_TYPE, _USER_DEFINED_TYPE = 3, 4  # tokenizer.ggml.token_type values


def _load_gguf(path: Path) -> Tokenizer:
    from model.gguf_file import read_gguf_metadata

    try:
        meta = read_gguf_metadata(path)
    except Exception as error:  # gguf raises assorted errors (ValueError, struct.error, ...)
        raise TokenizerError(f"{path}: not a readable GGUF file ({error})") from error
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise TokenizerError(f"{path}: GGUF metadata has no tokenizer (tokenizer.ggml.*)")
    eos_ids = [meta[f"tokenizer.ggml.{key}"] for key in ("eos_token_id", "eot_token_id",
                                                         "eom_token_id")
               if isinstance(meta.get(f"tokenizer.ggml.{key}"), int)]
    template = _checked_template(meta.get("tokenizer.chat_template"), path)
    if model == "llama":
        return SentencePieceTokenizer(
            path, chat_template=template, model_proto=_sentencepiece_proto(meta, path),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)), extra_eos_ids=eos_ids)
    if model != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer {model!r} is not supported "
                             "(only 'gpt2', byte-level BPE, and 'llama', sentencepiece)")
    if "tokenizer.ggml.merges" not in meta:
        raise TokenizerError(f"{path}: GGUF byte-level BPE without tokenizer.ggml.merges")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    template_tokens = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                       "unk_token": token("unknown_token_id"),
                       "pad_token": token("padding_token_id")}
    backend = _gguf_byte_level_backend(tokens, types, list(meta["tokenizer.ggml.merges"]),
                                       meta.get("tokenizer.ggml.pre"),
                                       [t for t in template_tokens.values() if t])
    return HFTokenizer(
        backend, decoder={"type": "ByteLevel"}, bos_token=template_tokens["bos_token"],
        eos_tokens=eos_ids, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=template, template_tokens=template_tokens,
        token_strings=tokens, source=path,
    )


def _gguf_byte_level_backend(tokens: list[str], types: list[int], merges: list[str],
                             pre: str | None, special_tokens: list[str]) -> tokenizers.Tokenizer:
    """The byte-level BPE transformers builds from GGUF metadata, so that our ids equal its ids."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens stored as raw text (outside the byte alphabet) are respelled in it.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    pairs = [(left, right) for left, _, right in (merge.partition(" ") for merge in merges)]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    split = _GGUF_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    # Control tokens are special (matched whole, skipped by decode); a "control" token spelled
    # outside the byte alphabet is a llama.cpp mislabel, left alone as transformers does.
    control = [t for t, kind in zip(tokens, types, strict=False) if kind == _CONTROL_TYPE]
    specials = dict.fromkeys(t for t in [*special_tokens, *control] if set(t) <= alphabet)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    user_defined = [AddedToken(t, normalized=False, special=False)
                    for t, kind in zip(tokens, types, strict=False)
                    if kind == _USER_DEFINED_TYPE and t in vocab]
    if user_defined:
        backend.add_tokens(user_defined)
    return backend


def _sentencepiece_proto(meta: Mapping[str, Any], path: Path) -> bytes:
    """A serialized sentencepiece ModelProto rebuilt from GGUF metadata (model "llama").

    llama.cpp's converter copies every piece, score and type of the original tokenizer.model,
    so the rebuilt model tokenizes exactly as the original. Written by hand (protobuf wire
    format, field numbers from sentencepiece_model.proto) to need no protobuf package.
    """
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type")
    if not scores or not types or not len(tokens) == len(scores) == len(types):
        raise TokenizerError(f"{path}: GGUF sentencepiece vocabulary needs tokens, scores and "
                             "token types of one length")

    def varint(value: int) -> bytes:
        value &= (1 << 64) - 1  # negative int32 fields are ten-byte two's complement
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    def number(field: int, value: int) -> bytes:
        return varint(field << 3) + varint(value)

    def message(field: int, payload: bytes) -> bytes:
        return varint(field << 3 | 2) + varint(len(payload)) + payload

    pieces = b"".join(
        message(1, message(1, token.encode()) + varint(2 << 3 | 5) + struct.pack("<f", score)
                + number(3, kind))
        for token, score, kind in zip(tokens, scores, types, strict=True))

    trainer = (number(3, 2)  # model_type BPE
               + number(4, len(tokens))
               + number(35, int(6 in types)))  # byte_fallback when there are byte pieces
    # sentencepiece finds its unk/bos/eos/pad by piece (fields 45-48), not by id (40-43).
    for id_field, key in enumerate(("unknown_token_id", "bos_token_id", "eos_token_id",
                                    "padding_token_id"), start=40):
        index = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(index, int) and 0 <= index < len(tokens):
            trainer += number(id_field, index) + message(id_field + 5, tokens[index].encode())
        else:
            trainer += number(id_field, -1)
    normalizer = (message(1, b"identity")
                  + number(3, int(bool(meta.get("tokenizer.ggml.add_space_prefix", True))))
                  + number(4, 0) + number(5, 1))  # keep whitespace as is; escape it as "▁"
    return pieces + message(2, trainer) + message(3, normalizer)
