"""Chat templates: a checkpoint's Jinja template rendered as transformers renders it, and
Mistral's v1 ``[INST]`` format (token for token what mistral-common encodes) for sentencepiece
checkpoints that ship no template.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

ROLES = ("system", "user", "assistant")


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Plain copies of ``messages``; ValueError naming the first message that is not
    ``{"role": system|user|assistant, "content": str}``."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{index}] has unknown role {role!r}; "
                             f"expected one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{index}] ({role}) needs a string 'content'")
        checked.append({key: value for key, value in message.items()
                        if isinstance(key, str) and isinstance(value, str)})
    return checked


# ---------------------------------------------------------------------------------------------
# Jinja


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template, in a sandbox set up as transformers sets it up.

    Raises ValueError for a template that does not parse.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant mask): its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"chat template does not parse: {error} (line {error.lineno})"
                         ) from error


def render_chat_template(source: str, messages: list[dict[str, str]], *,
                         add_generation_prompt: bool,
                         special_tokens: Mapping[str, str | None]) -> str:
    """The prompt text of a conversation; ValueError when the template rejects it."""
    checked = validate_messages(messages)
    template = compile_chat_template(source)
    try:
        return template.render(messages=checked, add_generation_prompt=add_generation_prompt,
                               tools=None, documents=None, **special_tokens)
    except Exception as error:  # raise_exception, sandbox, or the template's own type errors
        raise ValueError(f"chat template rejected the conversation: {error}") from error


# ---------------------------------------------------------------------------------------------
# Mistral v1


def mistral_v1_chat(messages: list[dict[str, str]], *, add_generation_prompt: bool,
                    encode: Callable[[str], list[int]], bos_id: int, eos_id: int) -> list[int]:
    """Mistral's v1 format: ``<s>[INST] user [/INST] answer</s>[INST] user [/INST]``.

    Same ids as mistral-common's ``MistralTokenizer.v1().encode_chat_completion``:

    - system messages are joined with a blank line and put, followed by a blank line, in front
      of the first user message;
    - consecutive messages of one role (not separated by a system message) are joined with a
      blank line;
    - each user turn is encoded as ``"[INST] {content} [/INST]"`` and each answer as its
      content then EOS, every piece with its own sentencepiece dummy-prefix space.

    ``encode`` must encode plain text: no BOS, special tokens' text not parsed.
    """
    checked = validate_messages(messages)
    # Runs of one role; a system message ends a run (mistral-common aggregates the same way).
    turns: list[tuple[str, list[str]]] = []
    previous = None
    for message in checked:
        role = message["role"]
        if role != "system":
            if role == previous:
                turns[-1][1].append(message["content"])
            else:
                turns.append((role, [message["content"]]))
        previous = role
    system = "\n\n".join(m["content"] for m in checked if m["role"] == "system" and m["content"])
    if not turns or turns[0][0] != "user":
        found = f"an {turns[0][0]} message" if turns else "only system messages"
        raise ValueError("Mistral's [INST] format needs a user message first (after any "
                         f"system messages), got {found}")
    if add_generation_prompt and turns[-1][0] != "user":
        raise ValueError("to prompt a reply the conversation must end with a user message, "
                         "got an assistant message last")
    ids = [bos_id]
    for index, (role, parts) in enumerate(turns):
        content = "\n\n".join(parts)
        if role == "user":
            if index == 0 and system:
                content = f"{system}\n\n{content}"
            ids += encode(f"[INST] {content} [/INST]")
        else:
            if not content:
                raise ValueError("an assistant message in Mistral's [INST] format needs content")
            ids += encode(content)
            ids.append(eos_id)
    return ids
