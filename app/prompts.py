"""OpenAI request bodies -> token ids and SamplingParams, with the length checks on the way.

The router tokenizes (the replicas get token ids) and refuses what cannot fit in the model's
context with a 400 before any replica sees it: text too long to fit is refused before it is
even tokenized (:meth:`PromptReader.check_text_fits`), token-id prompts and prompt +
max_tokens are checked against the limit.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.errors import APIError, bad_request
from app.formatting import TokenizerLike
from app.schemas import ChatCompletionRequest, SamplingFields
from model.sampling_params import SamplingParams, SamplingParamsError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's legacy completions API
# A token stands for at most max_token_bytes bytes of text, so text of B bytes is at least
# B / max_token_bytes tokens. Text over this many times (limit * max_token_bytes) bytes cannot
# fit and is refused without tokenizing it (the slack covers normalizers that shrink text).
TEXT_BOUND_SLACK = 2

CompletionPrompt = str | list[str] | list[int] | list[list[int]]


def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None
                    ) -> SamplingParams:
    """The engine's SamplingParams for a body's sampling fields (bad values: 400)."""
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
            top_p=body.top_p, min_p=body.min_p, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, seed=body.seed,
            stop=tuple(body.stop or ()), stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos, n=body.n, logprobs=logprobs)
    except SamplingParamsError as exc:
        raise bad_request(str(exc)) from exc


def check_length(prompt_len: int, max_tokens: int, limit: int, prompt_param: str) -> None:
    """A non-empty prompt whose length plus ``max_tokens`` fits in ``limit`` tokens."""
    if prompt_len == 0:
        raise bad_request("the prompt is empty", param=prompt_param)
    if prompt_len + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens; the "
                       f"prompt has {prompt_len} tokens and max_tokens is {max_tokens} "
                       f"({prompt_len + max_tokens} in all). Shorten the prompt or lower "
                       "max_tokens.", param="max_tokens" if prompt_len < limit
                       else prompt_param, code="context_length_exceeded")


class PromptReader:
    """Tokenizes prompts with the served model's tokenizer and checks them against a limit."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self.tokenizer = tokenizer
        self._max_token_bytes = max(
            1, max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)))

    def check_text_fits(self, texts: Sequence[str], limit: int, param: str) -> None:
        """Refuse text that cannot fit in ``limit`` tokens before tokenizing it (a prompt of
        many MB would cost the router seconds of CPU and a token list of GBs)."""
        size = sum(len(t.encode("utf-8")) for t in texts)
        if size > TEXT_BOUND_SLACK * limit * self._max_token_bytes:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the "
                           f"prompt ({size} bytes of text) is longer than that. Shorten the "
                           "prompt.", param=param, code="context_length_exceeded")

    @staticmethod
    def check_ids_fit(ids: Sequence[int], limit: int) -> None:
        if len(ids) >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the "
                           f"prompt has {len(ids)} tokens. Shorten the prompt.", param="prompt",
                           code="context_length_exceeded")

    def completion_prompts(self, prompt: CompletionPrompt, limit: int
                           ) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of each prompt of a completions request."""
        if isinstance(prompt, str):
            self.check_text_fits([prompt], limit, "prompt")
            return [self.tokenizer.encode(prompt)], [prompt]
        if not prompt:
            raise bad_request("prompt must not be an empty list", param="prompt")
        if all(isinstance(p, str) for p in prompt):
            texts: list[str] = list(prompt)  # type: ignore[arg-type]
            for text in texts:
                self.check_text_fits([text], limit, "prompt")
            return [self.tokenizer.encode(p) for p in texts], texts
        if all(isinstance(p, int) for p in prompt):
            ids: list[int] = list(prompt)  # type: ignore[arg-type]
            self.check_ids_fit(ids, limit)
            return [ids], [self._decode_prompt(ids)]
        lists: list[list[int]] = [list(p) for p in prompt]  # type: ignore[arg-type]
        for one in lists:
            self.check_ids_fit(one, limit)
        return lists, [self._decode_prompt(p) for p in lists]

    def chat_prompt(self, body: ChatCompletionRequest, limit: int) -> list[int]:
        """The chat template applied to the body's messages, as token ids."""
        messages = [{"role": m.template_role(), "content": m.text()} for m in body.messages]
        if len(messages) > limit:  # every turn costs a token at least: this cannot fit
            raise APIError(400, f"This model's maximum context length is {limit} tokens; "
                           f"{len(messages)} messages cannot fit in it.", param="messages",
                           code="context_length_exceeded")
        self.check_text_fits([m["content"] for m in messages], limit, "messages")
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt)
        except ValueError as exc:
            raise bad_request(f"messages: {exc}", param="messages") from exc

    def _decode_prompt(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids)
        except Exception as exc:  # an id outside the vocabulary
            raise bad_request(f"invalid prompt token ids: {exc}", param="prompt") from exc
