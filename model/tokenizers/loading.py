"""Which tokenizer a checkpoint holds, and loading it: folder, ``.gguf`` or tokenizer file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.tokenizers.base import Tokenizer, TokenizerError
from model.tokenizers.gguf_vocab import load_gguf_tokenizer
from model.tokenizers.hf_vocab import HFTokenizer
from model.tokenizers.sentencepiece_vocab import SentencePieceTokenizer
from model.tokenizers.templates import folder_template, read_json, token_text


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
                return SentencePieceTokenizer(model_file, chat_template=folder_template(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf_tokenizer(ggufs[0])
        if len(ggufs) > 1:
            raise TokenizerError(f"{path}: holds several .gguf files; pass one of them")
        extra = ""
        if (path / "tekken.json").is_file():
            extra = " (tekken.json, Mistral's tiktoken-style tokenizer, is not supported)"
        raise TokenizerError(f"{path}: no tokenizer found; looked for tokenizer.json, "
                             f"tokenizer.model[.vN] and *.gguf{extra}")
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf_tokenizer(path)
        if path.name == "tokenizer.json":
            return _load_tokenizer_json(path)
        if path.name.startswith("tokenizer.model"):
            return SentencePieceTokenizer(path, chat_template=folder_template(path.parent))
        raise TokenizerError(f"{path}: not a tokenizer file (expected a folder, a .gguf, "
                             "tokenizer.json or tokenizer.model)")
    raise TokenizerError(f"{path}: no such file or folder")



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
        config = read_json(folder / "tokenizer_config.json")
    tokens = {name: token_text(config.get(name))
              for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    eos: list[str | int] = [tokens["eos_token"]] if tokens["eos_token"] else []
    if (folder / "generation_config.json").is_file():
        value = read_json(folder / "generation_config.json").get("eos_token_id")
        eos += [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        # No flag: the tokenizer.json post-processor decides, as in transformers.
        bos_id = backend.token_to_id(tokens["bos_token"]) if tokens["bos_token"] else None
        with_specials = backend.encode("", add_special_tokens=True).ids
        add_bos = bos_id is not None and with_specials[:1] == [bos_id]
    return HFTokenizer(backend, decoder=decoder, bos_token=tokens["bos_token"], eos_tokens=eos,
                       add_bos=add_bos, chat_template=folder_template(folder),
                       template_tokens=tokens, source=path)
