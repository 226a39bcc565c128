"""`ringserve generate` end to end: output on a real checkpoint, one-line errors on bad ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import make_tiny_hf_checkpoint


def ringserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    """Exit non-zero; the error is one line, the last on stderr (progress may precede it)."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]], result.stderr
    assert lines[-1].startswith("ringserve: error:") and needle in lines[-1]
    assert "Traceback" not in result.stderr


def test_generate_json_equals_transformers_greedy(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from model.tokenizers import load_tokenizer

    folder = make_tiny_hf_checkpoint(tmp_path, model_type="mistral", sliding_window=8)
    result = ringserve("generate", "--model", str(folder), "--prompt", "Hello there",
                       "--max-tokens", "12", "--json", "--quiet", "--quantization", "none")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    tokenizer = load_tokenizer(folder)
    prompt_ids = tokenizer.encode("Hello there")
    assert out["prompt_tokens"] == len(prompt_ids)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        generated = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=12,
                                       do_sample=False, pad_token_id=0,
                                       eos_token_id=sorted(tokenizer.eos_token_ids))
    expected = generated[0, len(prompt_ids):].tolist()
    stopped = expected[-1] in tokenizer.eos_token_ids
    assert out["token_ids"] == (expected[:-1] if stopped else expected)
    assert out["finish_reason"] == ("stop" if stopped else "length")
    assert out["text"] == tokenizer.decode(out["token_ids"])


def test_folder_without_weights(tmp_path: Path) -> None:
    folder = make_tiny_hf_checkpoint(tmp_path, model_type="mistral")
    (folder / "model.safetensors").unlink()
    assert_one_line_error(ringserve("generate", "--model", str(folder), "--prompt", "x"),
                          str(folder))


def test_truncated_safetensors(tmp_path: Path) -> None:
    folder = make_tiny_hf_checkpoint(tmp_path, model_type="mistral")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(ringserve("generate", "--model", str(folder), "--prompt", "x"),
                          "model.safetensors")


def test_unsupported_model_type(tmp_path: Path) -> None:
    folder = make_tiny_hf_checkpoint(tmp_path, model_type="mistral")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(ringserve("generate", "--model", str(folder), "--prompt", "x"),
                          "model_type")


def test_prompt_over_the_limit(tmp_path: Path) -> None:
    folder = make_tiny_hf_checkpoint(tmp_path, model_type="mistral")
    result = ringserve("generate", "--model", str(folder), "--prompt", "word " * 100,
                       "--max-model-len", "64", "--max-tokens", "8")
    assert_one_line_error(result, "exceeds the model's limit of 64")


@pytest.mark.parametrize("bad", [["--max-tokens", "0"], ["--temperature", "-1"]])
def test_bad_sampling_flags(tmp_path: Path, bad: list[str]) -> None:
    result = ringserve("generate", "--model", str(tmp_path), "--prompt", "x", *bad)
    assert_one_line_error(result, "must be")
