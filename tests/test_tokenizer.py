"""Tokenizers, chat templates and the incremental detokenizer against their references:
transformers for the embedded GGUF, sentencepiece and mistral-common for Mistral."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from model.default_model import DefaultModelMissing, default_model_path
from model.detokenizer import IncrementalDetokenizer
from model.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)

TEXTS = [
    "Hello world",
    "Héllo, ça va? Übermäßig naïve café",
    "日本語のテキストと中文，还有한국어",
    "emoji 🤗🚀 family 👨‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "def f(x):\n    if x:\n\treturn x  # tab\n    return [i for i in range(10)]\n",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-01-31",
    " leading space",
    "   three leading spaces",
    "double  spaces  and   triple",
    "lines\n\nand\r\nwindows\n\n\n",
    "trailing space ",
    "Ελληνικά русский العربية हिन्दी",
    "",
]

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Bonjour, ça va? 🤗"},
     {"role": "assistant", "content": "Oui, très bien!"},
     {"role": "user", "content": "Et 日本語?"}],
    [{"role": "system", "content": "Answer in code."},
     {"role": "user", "content": "Write f."},
     {"role": "assistant", "content": "def f():\n    return 1\n"},
     {"role": "user", "content": "Now  with   spaces\n\nand lines"},
     {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "Thanks"}],
]


def mistral_model_file() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mistral")
    shutil.copy(mistral_model_file(), folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def mistral(mistral_dir: Path) -> Tokenizer:
    return load_tokenizer(mistral_dir)


@pytest.fixture(scope="module")
def sp() -> Any:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(mistral_model_file()))


@pytest.fixture(scope="module")
def mistral_common_v1() -> Any:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v1()


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return default_model_path()
    except DefaultModelMissing as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def gguf(gguf_path: Path) -> Tokenizer:
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf_reference(gguf_path: Path) -> Any:
    """transformers' tokenizer for the GGUF (slow: ~10 s to build)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(params=["mistral", "gguf"])
def any_tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def stream(tokenizer: Tokenizer, ids: list[int], **kwargs: Any) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    return [detok.push(i) for i in ids] + [detok.flush()]


def mistral_common_ids(reference: Any, conversation: list[dict[str, str]]) -> list[int]:
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request: ChatCompletionRequest = ChatCompletionRequest(
        messages=[kinds[m["role"]](content=m["content"]) for m in conversation])
    return list(reference.encode_chat_completion(request).tokens)


# -- the embedded GGUF (byte-level BPE) against transformers ----------------------------------

GGUF_SPECIAL_TEXTS = ["<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b <|im_start|> c",
                      "<repo_name>x<file_sep>"]


def test_gguf_fields(gguf: Tokenizer) -> None:
    assert isinstance(gguf, HFTokenizer)
    assert gguf.vocab_size == 49152
    assert gguf.bos_token_id == 1
    assert gguf.eos_token_ids == {2}
    assert gguf.add_bos_default is False  # tokenizer.ggml.add_bos_token
    assert {0, 1, 2, 16} <= gguf.special_ids
    assert gguf.encode("hi") == gguf.encode("hi", add_bos=False)
    assert gguf.encode("hi", add_bos=True) == [1, *gguf.encode("hi")]
    assert gguf.token_bytes(gguf.encode(" world")[0]) == b" world"


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS + GGUF_SPECIAL_TEXTS)
def test_gguf_ids_match_transformers(gguf: Tokenizer, hf_reference: Any, text: str) -> None:
    ids = gguf.encode(text)
    assert ids == hf_reference.encode(text, add_special_tokens=False)
    assert ids == hf_reference.encode(text)  # its default adds no BOS either
    assert gguf.decode(ids) == hf_reference.decode(ids, skip_special_tokens=True)
    assert gguf.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_gguf_random_ids_decode_like_transformers(gguf: Tokenizer, hf_reference: Any) -> None:
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(gguf.vocab_size) for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            expected = hf_reference.decode(ids, skip_special_tokens=skip)
            assert gguf.decode(ids, skip_special_tokens=skip) == expected
            assert "".join(stream(gguf, ids, skip_special_tokens=skip)) == expected


def test_gguf_special_tokens_as_text(gguf: Tokenizer) -> None:
    text = "<|im_start|>user"
    assert gguf.encode(text)[0] == 1
    plain = gguf.encode(text, parse_special=False)
    assert 1 not in plain and gguf.decode(plain) == text


@pytest.mark.slow
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_matches_transformers(gguf: Tokenizer, hf_reference: Any,
                                        conversation: list[dict[str, str]],
                                        add_generation_prompt: bool) -> None:
    expected = hf_reference.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True,
        return_dict=False)
    assert gguf.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.slow
def test_hf_folder_saved_by_transformers(tmp_path: Path, hf_reference: Any) -> None:
    hf_reference.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == {2}
    assert tokenizer.add_bos_default is False
    for text in TEXTS + GGUF_SPECIAL_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf_reference.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == hf_reference.decode(ids, skip_special_tokens=True)
    expected = hf_reference.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
    assert tokenizer.apply_chat_template(CONVERSATIONS[2]) == expected


# -- Mistral's sentencepiece model against sentencepiece and mistral-common -------------------


def test_mistral_fields(mistral: Tokenizer) -> None:
    assert isinstance(mistral, SentencePieceTokenizer)
    assert mistral.vocab_size == 32000
    assert mistral.bos_token_id == 1 and mistral.eos_token_ids == {2}
    assert mistral.special_ids == {1, 2}
    assert mistral.add_bos_default is True
    assert mistral.token_bytes(22557) == b" Hello"  # ▁Hello
    assert mistral.token_bytes(229) == b"\xe2"  # <0xE2>


@pytest.mark.parametrize("text", TEXTS)
def test_mistral_ids_match_sentencepiece(mistral: Tokenizer, sp: Any,
                                         mistral_common_v1: Any, text: str) -> None:
    ids = mistral.encode(text)
    assert ids == [1, *sp.encode(text)]
    assert ids == mistral_common_v1.instruct_tokenizer.tokenizer.encode(text, bos=True, eos=False)
    assert mistral.encode(text, add_bos=False) == sp.encode(text)
    assert mistral.decode(ids) == sp.decode(ids) == text


def test_mistral_special_tokens_in_text(mistral: Tokenizer, sp: Any) -> None:
    text = "<s>[INST] hi [/INST] ok</s> again"
    expected = [1, *sp.encode("[INST] hi [/INST] ok"), 2, *sp.encode(" again")]
    assert mistral.encode(text, add_bos=False) == expected
    assert mistral.encode(text, add_bos=False, parse_special=False) == sp.encode(text)
    assert mistral.decode(expected) == sp.decode(expected)
    assert mistral.decode(expected, skip_special_tokens=False) == \
        "<s>[INST] hi [/INST] ok</s>  again"


@pytest.mark.parametrize("pieces", [
    ["▁", "▁Hello"], ["<0x20>", "▁Hello"], ["<s>", "▁Hello"], ["<unk>", "▁Hello"],
    ["▁▁", "▁Hello"], ["<0xE2>", "<0x82>"], ["<0xE2>", "▁Hello", "<0x82>"],
    ["<0xF0>", "<0x9F>", "<0xA4>"], ["<0xED>", "<0xA0>", "<0x80>"], ["▁Hello", "<0xE2>"],
])
def test_mistral_decode_edge_cases_match_sentencepiece(mistral: Tokenizer, sp: Any,
                                                       pieces: list[str]) -> None:
    ids = [sp.piece_to_id(p) for p in pieces]
    assert mistral.decode(ids) == sp.decode(ids)
    assert "".join(stream(mistral, ids)) == sp.decode(ids)


def test_mistral_random_ids_decode_like_sentencepiece(mistral: Tokenizer, sp: Any) -> None:
    rng = random.Random(0)
    for _ in range(200):
        # Byte pieces (ids 3..258) often, to make broken and split UTF-8.
        ids = [rng.randrange(3, 259) if rng.random() < 0.5 else rng.randrange(32000)
               for _ in range(rng.randrange(1, 10))]
        assert mistral.decode(ids) == sp.decode(ids)
        assert "".join(stream(mistral, ids)) == sp.decode(ids)


MISTRAL_CONVERSATIONS = CONVERSATIONS + [
    [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "sys"},
     {"role": "user", "content": "b"}],
    [{"role": "system", "content": "one"}, {"role": "system", "content": "two"},
     {"role": "user", "content": ""}],
    [{"role": "user", "content": "literal <s>[INST] and </s> text"},
     {"role": "assistant", "content": " spaced  answer "},
     {"role": "assistant", "content": "more"},
     {"role": "user", "content": "🤗\n\n\tx"}],
]


@pytest.mark.parametrize("conversation", MISTRAL_CONVERSATIONS)
def test_mistral_chat_matches_mistral_common(mistral: Tokenizer, mistral_common_v1: Any,
                                             conversation: list[dict[str, str]]) -> None:
    assert mistral.apply_chat_template(conversation) == \
        mistral_common_ids(mistral_common_v1, conversation)


def test_mistral_chat_without_generation_prompt_may_end_with_answer(mistral: Tokenizer,
                                                                    sp: Any) -> None:
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids = mistral.apply_chat_template(conversation, add_generation_prompt=False)
    assert ids == [1, *sp.encode("[INST] hi [/INST]"), *sp.encode("yo"), 2]


@pytest.mark.parametrize(("conversation", "message"), [
    ([], "non-empty"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user"}], "string 'content'"),
    (["hello"], "must be a dict"),
    ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
     "user message first"),
    ([{"role": "system", "content": "x"}], "user message first"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
     "end with a user message"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""},
      {"role": "user", "content": "y"}], "needs content"),
])
def test_mistral_chat_errors(mistral: Tokenizer, conversation: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mistral.apply_chat_template(conversation)


def test_gguf_chat_rejects_unknown_roles(gguf: Tokenizer) -> None:
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        gguf.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty"):
        gguf.apply_chat_template([])


MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


def test_sentencepiece_folder_with_jinja_template(tmp_path: Path, mistral_common_v1: Any) -> None:
    shutil.copy(mistral_model_file(), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": MISTRAL_V01_TEMPLATE}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.chat_template == MISTRAL_V01_TEMPLATE
    conversation = [{"role": "user", "content": "Hi there"}]
    assert tokenizer.apply_chat_template(conversation) == \
        mistral_common_ids(mistral_common_v1, conversation)
    with pytest.raises(ValueError, match="roles must alternate"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"},
                                       {"role": "user", "content": "b"}])


@pytest.mark.slow
def test_mistral_gguf_is_sentencepiece(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       mistral: Tokenizer, sp: Any) -> None:
    """A Mistral GGUF ("llama" vocabulary) tokenizes as the tokenizer.model it came from."""
    import gguf as gguf_lib

    monkeypatch.setenv("RINGSERVE_CACHE_DIR", str(tmp_path / "cache"))
    size = sp.get_piece_size()

    def kind(i: int) -> int:
        return 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 2 if sp.is_unknown(i) else 1

    path = tmp_path / "mistral.gguf"
    writer = gguf_lib.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(size)])
    writer.add_token_scores([sp.get_score(i) for i in range(size)])
    writer.add_token_types([kind(i) for i in range(size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tokenizer = load_tokenizer(path)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids) == (1, {2})
    assert tokenizer.add_bos_default is True
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == mistral.encode(text)
        assert tokenizer.decode(ids) == text
    for conversation in MISTRAL_CONVERSATIONS:
        assert tokenizer.apply_chat_template(conversation) == \
            mistral.apply_chat_template(conversation)


# -- the incremental detokenizer ---------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_equals_decode(any_tokenizer: Tokenizer, text: str) -> None:
    ids = any_tokenizer.encode(text, add_bos=True)
    chunks = stream(any_tokenizer, ids)
    assert "".join(chunks) == any_tokenizer.decode(ids) == text
    assert not any("\ufffd" in chunk for chunk in chunks)  # never half a character


def test_detokenizer_holds_back_partial_characters(any_tokenizer: Tokenizer) -> None:
    ids = any_tokenizer.encode("🤗", add_bos=False)
    assert len(ids) > 1  # the emoji is split over several tokens in both vocabularies
    chunks = stream(any_tokenizer, ids)
    assert chunks[:-2] == [""] * (len(ids) - 1) and chunks[-2:] == ["🤗", ""]
    unfinished = stream(any_tokenizer, ids[:-1])
    assert "".join(unfinished) == any_tokenizer.decode(ids[:-1])
    assert unfinished[:-1] == [""] * (len(ids) - 1) and "\ufffd" in unfinished[-1]


def test_detokenizer_special_tokens(any_tokenizer: Tokenizer) -> None:
    eos = min(any_tokenizer.eos_token_ids)
    ids = [*any_tokenizer.encode("Hi there", add_bos=True), eos]
    assert "".join(stream(any_tokenizer, ids)) == any_tokenizer.decode(ids) == "Hi there"
    assert "".join(stream(any_tokenizer, ids, skip_special_tokens=False)) == \
        any_tokenizer.decode(ids, skip_special_tokens=False)


def test_detokenizer_continuing_a_prompt_keeps_the_space(any_tokenizer: Tokenizer) -> None:
    prompt = any_tokenizer.encode("The capital of France is")
    full = any_tokenizer.encode("The capital of France is Paris.")
    assert full[:len(prompt)] == prompt
    generated = full[len(prompt):]
    continued = "".join(stream(any_tokenizer, generated, prompt_ids=prompt))
    assert continued == any_tokenizer.decode(full)[len(any_tokenizer.decode(prompt)):]
    assert continued == " Paris."
    fresh = "".join(stream(any_tokenizer, generated))
    assert fresh == any_tokenizer.decode(generated)
    # sentencepiece drops the first piece's space in a decode from scratch; byte-level BPE not
    assert fresh == ("Paris." if isinstance(any_tokenizer, SentencePieceTokenizer) else " Paris.")


def test_detokenizer_does_not_redecode(any_tokenizer: Tokenizer,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ids = any_tokenizer.encode(TEXTS[4] * 20)
    expected = any_tokenizer.decode(ids)

    def no_decode(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("the detokenizer must not re-decode the sequence")

    monkeypatch.setattr(any_tokenizer, "decode", no_decode)
    assert "".join(stream(any_tokenizer, ids)) == expected


def test_decode_rejects_ids_outside_the_vocabulary(any_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        any_tokenizer.decode([any_tokenizer.vocab_size])


# -- tokenizer.json with sentencepiece-style decoders (built here, checked against the library) -


def write_sp_style_tokenizer_json(folder: Path, decoder: str) -> None:
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "▁abcdefghijklmnopqrstuvwxyz.,!?'HTWé":
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "h"), ("▁h", "i"), ("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "▁")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                 byte_fallback=True, fuse_unk=True))
    if decoder == "strip":  # Mistral / Llama 2 tokenizer.json
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                   normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        backend.decoder = decoders.Metaspace(prepend_scheme="first")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<unk>", "<s>", "</s>")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>"},
        "chat_template": MISTRAL_V01_TEMPLATE}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))


@pytest.mark.parametrize("decoder", ["strip", "metaspace"])
def test_sentencepiece_style_tokenizer_json(tmp_path: Path, decoder: str) -> None:
    from tokenizers import Tokenizer as Backend

    write_sp_style_tokenizer_json(tmp_path, decoder)
    library = Backend.from_file(str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == {2, 5}
    assert tokenizer.add_bos_default is True  # from the post-processor
    texts = ["hi there", " the  hit", "café ü 🤗", "<s>hi</s>", "What?\n"]
    id_lists = [library.encode(text).ids for text in texts]
    for text, ids in zip(texts, id_lists, strict=True):
        assert tokenizer.encode(text) == ids
    rng = random.Random(0)
    id_lists += [[rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 8))]
                 for _ in range(200)]
    id_lists += [[259, 3 + 0xE2, 3 + 0x82, 3 + 0xAC], [3 + 0x20, 259], [1, 3 + 0x20, 260]]
    for ids in id_lists:
        for skip in (True, False):
            expected = library.decode(ids, skip_special_tokens=skip)
            decoded = tokenizer.decode(ids, skip_special_tokens=skip)
            assert "".join(stream(tokenizer, ids, skip_special_tokens=skip)) == decoded, ids
            if "\ufffd" not in expected:
                assert decoded == expected, ids
    # Invalid UTF-8 from byte pieces: one U+FFFD per invalid byte, as sentencepiece does; the
    # library's ByteFallback replaces every byte of the run, valid ones too.
    if decoder == "strip":
        broken = [3 + 0xE2, 3 + 0x41, 3 + 0xFF]
        assert tokenizer.decode(broken) == "\ufffdA\ufffd"
        assert library.decode(broken) == "\ufffd\ufffd\ufffd"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        library.encode("<s>[INST] hi [/INST]", add_special_tokens=False).ids


# -- loading errors ----------------------------------------------------------------------------


def test_folder_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=str(tmp_path)) as caught:
        load_tokenizer(tmp_path)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json", "model.gguf"])
def test_corrupt_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               name: str) -> None:
    monkeypatch.setenv("RINGSERVE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / name).write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(TokenizerError, match=str(tmp_path / name)):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_config_is_named(tmp_path: Path) -> None:
    write_sp_style_tokenizer_json(tmp_path, "strip")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_broken_chat_template_is_named(tmp_path: Path) -> None:
    shutil.copy(mistral_model_file(), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}"}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json.*does not parse"):
        load_tokenizer(tmp_path)


def test_no_work_at_import() -> None:
    code = ("import sys, model.tokenizers, model.detokenizer, model.chat_template; "
            "print(sorted(m for m in ('sentencepiece', 'tokenizers', 'jinja2', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
