"""Where a checkpoint keeps its chat template and special-token names, checked on load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.chat_template import compile_chat_template
from model.json_file import read_json_object
from model.tokenizers.base import TokenizerError


def read_json(path: Path) -> dict[str, Any]:
    """A tokenizer JSON file's object; TokenizerError naming the file otherwise."""
    return read_json_object(path, TokenizerError)


def token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def checked_template(template: Any, source: Path) -> str | None:
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


def folder_template(folder: Path) -> str | None:
    """The chat template a folder holds, where transformers looks for it."""
    if (folder / "chat_template.jinja").is_file():
        source = folder / "chat_template.jinja"
        try:
            return checked_template(source.read_text(encoding="utf-8"), source)
        except (OSError, UnicodeDecodeError) as error:
            raise TokenizerError(f"{source}: unreadable ({error})") from error
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            template = read_json(folder / name).get("chat_template")
            if template is not None:
                return checked_template(template, folder / name)
    return None
