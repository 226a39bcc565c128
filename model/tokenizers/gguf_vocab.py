"""Tokenizers rebuilt from GGUF metadata: byte-level BPE (gpt2) and sentencepiece (llama)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.tokenizers.base import Tokenizer, TokenizerError, bytes_to_unicode
from model.tokenizers.hf_vocab import HFTokenizer
from model.tokenizers.sentencepiece_vocab import SentencePieceTokenizer
from model.tokenizers.templates import checked_template

if TYPE_CHECKING:
    import tokenizers


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
_CONTROL_TYPE, _USER_DEFINED_TYPE, _BYTE_TYPE = 3, 4, 6  # tokenizer.ggml.token_type values


def load_gguf_tokenizer(path: Path) -> Tokenizer:
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
    template = checked_template(meta.get("tokenizer.chat_template"), path)
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
    so the rebuilt model tokenizes exactly as the original. Built with the model proto that
    the sentencepiece package ships (``sentencepiece_model_pb2``).
    """
    # generated protobuf code: its classes are made at import, so typed as Any
    pb: Any = importlib.import_module("sentencepiece.sentencepiece_model_pb2")

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type")
    if not scores or not types or not len(tokens) == len(scores) == len(types):
        raise TokenizerError(f"{path}: GGUF sentencepiece vocabulary needs tokens, scores and "
                             "token types of one length")
    proto = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types, strict=True):
        proto.pieces.add(piece=token, score=score, type=kind)
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = _BYTE_TYPE in types
    # sentencepiece finds its unk/bos/eos/pad by piece, not by id: set both, or -1 for none.
    for name, key in (("unk", "unknown_token_id"), ("bos", "bos_token_id"),
                      ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        index = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(index, int) and 0 <= index < len(tokens):
            setattr(trainer, f"{name}_id", index)
            setattr(trainer, f"{name}_piece", tokens[index])
        else:
            setattr(trainer, f"{name}_id", -1)
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False  # keep whitespace as is ...
    normalizer.escape_whitespaces = True  # ... spelled "▁"
    return proto.SerializeToString()
