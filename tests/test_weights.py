"""Weight loaders: HF (single and sharded), Mistral consolidated, GGUF (dequantized, cached).

Each format is checked against the HF state dict it was made from; q/k rows must come back
in HF's rotate-half order whatever the source. The error cases check that the message names
the file and tensor at fault.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import gguf_file
from model.config import ConfigError
from model.weights import (
    LoadedWeights,
    WeightsError,
    expected_shapes,
    interleaved_to_rotate_half,
    load_weights,
)
from tests.checkpoints import (
    hf_state_dict,
    make_tiny_consolidated_checkpoint,
    make_tiny_gguf,
    make_tiny_hf_checkpoint,
    rotate_half_to_interleaved,
)

SIZES: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                             num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(autouse=True)
def _cache_dir(gguf_cache_dir: Path) -> Path:
    return gguf_cache_dir


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf"), "mistral", sliding_window=32,
                                   **SIZES)


@pytest.fixture(scope="module")
def reference(mistral_dir: Path) -> dict[str, torch.Tensor]:
    return hf_state_dict(mistral_dir)


@pytest.fixture
def mistral_copy(mistral_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(mistral_dir, tmp_path / "copy"))


def assert_same_tensors(loaded: LoadedWeights, reference: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded.tensors) == sorted(reference)
    for name, tensor in loaded.tensors.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu", name
        torch.testing.assert_close(tensor, reference[name].float(), rtol=0, atol=0, msg=name)


# HF folders -----------------------------------------------------------------------------------
def test_hf_folder_matches_state_dict(mistral_dir: Path, reference: dict) -> None:
    loaded = load_weights(mistral_dir, progress=False)
    assert_same_tensors(loaded, reference)
    assert loaded.source == mistral_dir
    config = loaded.config
    assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads,
            config.head_dim, config.sliding_window, config.tie_word_embeddings) == (
        "mistral", 2, 4, 2, 16, 32, False)
    assert {name: tuple(t.shape) for name, t in loaded.tensors.items()} == expected_shapes(config)


def test_hf_sharded_tied_llama(tmp_path: Path) -> None:
    folder = make_tiny_hf_checkpoint(tmp_path, "llama", tie_word_embeddings=True,
                                     max_shard_size="40KB", **SIZES)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    loaded = load_weights(folder, progress=False)
    reference = hf_state_dict(folder)
    assert "lm_head.weight" not in reference
    assert_same_tensors(loaded, reference)
    assert loaded.config.tie_word_embeddings and loaded.config.sliding_window is None


def test_hf_progress_bar_on_stderr(mistral_dir: Path, capsys: pytest.CaptureFixture) -> None:
    load_weights(mistral_dir, progress=True)
    assert "loading weights" in capsys.readouterr().err


def test_hf_half_precision_is_widened(mistral_dir: Path, reference: dict,
                                      tmp_path: Path) -> None:
    folder = tmp_path / "bf16"
    folder.mkdir()
    shutil.copy(mistral_dir / "config.json", folder)
    save_file({k if k == "lm_head.weight" else f"model.{k}": v.to(torch.bfloat16)
               for k, v in reference.items()}, str(folder / "model.safetensors"))
    loaded = load_weights(folder, progress=False)
    assert_same_tensors(loaded, {k: v.to(torch.bfloat16) for k, v in reference.items()})


# Mistral consolidated -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_consolidated_matches_hf(mistral_dir: Path, reference: dict, tmp_path: Path,
                                 dtype: torch.dtype) -> None:
    folder = make_tiny_consolidated_checkpoint(mistral_dir, tmp_path / "consolidated", dtype)
    loaded = load_weights(folder, progress=False)
    assert_same_tensors(loaded, {k: v.to(dtype) for k, v in reference.items()})
    assert loaded.config.sliding_window == 32 and loaded.config.head_dim == 16


def test_consolidated_vocab_from_embeddings(mistral_dir: Path, tmp_path: Path) -> None:
    folder = make_tiny_consolidated_checkpoint(mistral_dir, tmp_path / "c", torch.float32)
    params = json.loads((folder / "params.json").read_text())
    del params["vocab_size"]  # Mistral 7B v0.1's params.json has none
    (folder / "params.json").write_text(json.dumps(params))
    assert load_weights(folder, progress=False).config.vocab_size == SIZES["vocab_size"]


def test_interleaved_to_rotate_half_preserves_rotary_scores() -> None:
    """Meta rotary on interleaved rows == HF rotary on the reordered rows (same q.k scores)."""
    gen = torch.Generator().manual_seed(0)
    heads, head_dim, hidden, pos_q, pos_k = 3, 8, 12, 5, 2
    wq_meta = torch.randn(heads * head_dim, hidden, generator=gen)
    wk_meta = torch.randn(heads * head_dim, hidden, generator=gen)
    x = torch.randn(hidden, generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)  # [D/2]

    def meta_rotary(v: torch.Tensor, pos: int) -> torch.Tensor:  # v [H*D], pairs (2j, 2j+1)
        pairs = torch.view_as_complex(v.reshape(heads, head_dim // 2, 2).contiguous())
        return torch.view_as_real(pairs * torch.polar(torch.ones(()), pos * inv_freq))

    def hf_rotary(v: torch.Tensor, pos: int) -> torch.Tensor:  # v [H*D], pairs (j, j+D/2)
        v = v.reshape(heads, head_dim)
        angle = torch.cat([pos * inv_freq, pos * inv_freq])  # [D]
        rotated = torch.cat([-v[:, head_dim // 2:], v[:, : head_dim // 2]], dim=-1)
        return v * angle.cos() + rotated * angle.sin()

    meta_scores = (meta_rotary(wq_meta @ x, pos_q) * meta_rotary(wk_meta @ x, pos_k)).sum((1, 2))
    wq_hf = interleaved_to_rotate_half(wq_meta, heads)
    wk_hf = interleaved_to_rotate_half(wk_meta, heads)
    hf_scores = (hf_rotary(wq_hf @ x, pos_q) * hf_rotary(wk_hf @ x, pos_k)).sum(1)
    torch.testing.assert_close(hf_scores, meta_scores)
    torch.testing.assert_close(rotate_half_to_interleaved(wq_hf, heads), wq_meta)


# GGUF -----------------------------------------------------------------------------------------
# Worst-case error of each type relative to the largest |value| in a row (a block's largest is
# no more): Q8_0 rounds to steps of amax/127; Q4_0 to steps of amax/8 and clips the far end of
# [-amax, amax] by one step; Q4_1 rounds to steps of (max - min)/15 <= 2 amax/15. Scales and
# minimums are float16, which adds up to ~0.1% of amax to each.
GGUF_TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1 / 200, "Q4_0": 1 / 7.9,
                  "Q4_1": 1 / 14}


@pytest.mark.parametrize("qtype", sorted(GGUF_TOLERANCE))
def test_gguf_dequantizes_and_unpermutes(mistral_dir: Path, reference: dict, tmp_path: Path,
                                         qtype: str) -> None:
    path = make_tiny_gguf(mistral_dir, tmp_path / f"tiny-{qtype}.gguf", qtype)
    loaded = load_weights(path, progress=False)
    assert sorted(loaded.tensors) == sorted(reference)
    for name, tensor in loaded.tensors.items():
        want = reference[name]
        row_max = want.abs().amax(dim=-1, keepdim=True)
        error = (tensor - want).abs()
        assert torch.all(error <= GGUF_TOLERANCE[qtype] * row_max + 1e-7), (
            f"{name}: max error {error.max():.3g}, row max {row_max.max():.3g}")
    config = loaded.config
    assert (config.architecture, config.vocab_size, config.num_kv_heads, config.sliding_window,
            config.tie_word_embeddings) == ("llama", 128, 2, 32, False)


def test_gguf_tied_embeddings(tmp_path: Path) -> None:
    folder = make_tiny_hf_checkpoint(tmp_path, "llama", tie_word_embeddings=True, **SIZES)
    loaded = load_weights(make_tiny_gguf(folder, tmp_path / "tied.gguf", "F32"), progress=False)
    assert loaded.config.tie_word_embeddings
    assert_same_tensors(loaded, hf_state_dict(folder))


def test_gguf_cache_written_once_then_used(mistral_dir: Path, reference: dict, tmp_path: Path,
                                          _cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    path = make_tiny_gguf(mistral_dir, tmp_path / "tiny.gguf", "Q8_0")
    first = load_weights(path, progress=True)
    err = capsys.readouterr().err
    entry = gguf_file.cache_entry(path)
    assert f"converting {path.name}" in err and str(entry) in err
    assert entry.parent.parent == _cache_dir
    assert sorted(p.name for p in entry.iterdir()) == ["metadata.json", "weights.safetensors"]

    def no_reader(path: Path) -> None:
        raise AssertionError("the GGUF file was opened despite the cache")

    monkeypatch.setattr(gguf_file, "open_gguf", no_reader)
    second = load_weights(path, progress=True)
    assert "converting" not in capsys.readouterr().err
    assert second.config == first.config and second.source == path
    assert_same_tensors(second, first.tensors)
    meta = gguf_file.read_gguf_metadata(path)
    assert meta["llama.block_count"] == 2 and meta["tokenizer.ggml.tokens"][5] == "<t5>"
    assert isinstance(meta["llama.rope.freq_base"], float)


def test_gguf_metadata_cached_values_equal_direct(mistral_dir: Path, tmp_path: Path) -> None:
    path = make_tiny_gguf(mistral_dir, tmp_path / "tiny.gguf", "F16")
    first = gguf_file.read_gguf_metadata(path)  # from the file, then saved
    assert (gguf_file.cache_entry(path) / "metadata.json").is_file()
    assert not (gguf_file.cache_entry(path) / "weights.safetensors").exists()
    second = gguf_file.read_gguf_metadata(path)  # from the cache
    assert first == second
    assert {type(v) for v in first.values()} <= {str, int, float, bool, list}
    assert "GGUF.version" not in first


def test_gguf_cache_keyed_by_file_state(mistral_dir: Path, tmp_path: Path) -> None:
    path = make_tiny_gguf(mistral_dir, tmp_path / "tiny.gguf", "F32")
    before = gguf_file.cache_entry(path)
    load_weights(path, progress=False)
    make_tiny_gguf(mistral_dir, path, "Q8_0")  # replaced in place: new size
    os.utime(path, ns=(1, 1))
    after = gguf_file.cache_entry(path)
    assert after != before
    loaded = load_weights(path, progress=False)
    assert (after / "weights.safetensors").is_file()
    assert not torch.equal(loaded.tensors["embed_tokens.weight"],
                           load_file(str(before / "weights.safetensors"))["embed_tokens.weight"])


def test_gguf_interrupted_or_corrupt_cache_is_not_used(mistral_dir: Path, reference: dict,
                                                        tmp_path: Path) -> None:
    path = make_tiny_gguf(mistral_dir, tmp_path / "tiny.gguf", "F32")
    entry = gguf_file.cache_entry(path)
    entry.mkdir(parents=True)
    # An interrupted conversion leaves only a temporary file behind.
    (entry / ".weights.safetensors.x.tmp").write_bytes(b"partial")
    assert_same_tensors(load_weights(path, progress=False), reference)
    # A damaged cache file is converted again rather than trusted.
    weights = entry / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_same_tensors(load_weights(path, progress=False), reference)
    assert load_file(str(weights)).keys() == reference.keys()


def test_write_atomically_leaves_no_target_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "entry" / "weights.safetensors"

    def fail(temp: Path) -> None:
        temp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gguf_file.write_atomically(target, fail)
    assert list(target.parent.iterdir()) == []


def test_unwritable_cache_still_loads(mistral_dir: Path, reference: dict, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(gguf_file.CACHE_ENV, str(blocker))
    path = make_tiny_gguf(mistral_dir, tmp_path / "tiny.gguf", "F32")
    assert_same_tensors(load_weights(path, progress=False), reference)
    assert "cannot write the GGUF cache" in capsys.readouterr().err


# Errors ---------------------------------------------------------------------------------------
def _rewrite(folder: Path, change: dict[str, torch.Tensor | None]) -> None:
    """Rewrite model.safetensors with tensors replaced, added, or (None) removed."""
    tensors = load_file(str(folder / "model.safetensors"))
    for name, tensor in change.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, str(folder / "model.safetensors"))


def test_error_missing_path(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no-such-model: no such file"):
        load_weights(tmp_path / "no-such-model")


@pytest.mark.parametrize("files, message", [
    ({}, "no checkpoint found"),
    ({"config.json": "{}"}, "config.json but no model.safetensors"),
    ({"params.json": "{}"}, "params.json but no consolidated"),
    ({"config.json": "{}", "pytorch_model.bin": ""}, r"only PyTorch pickles \(pytorch_model.bin"),
])
def test_error_folder_without_weights(tmp_path: Path, files: dict[str, str],
                                      message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(WeightsError, match=message) as info:
        load_weights(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_error_truncated_safetensors(mistral_copy: Path) -> None:
    file = mistral_copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(WeightsError, match="model.safetensors: unreadable safetensors file"):
        load_weights(mistral_copy)


def test_error_wrong_shape(mistral_copy: Path) -> None:
    config = json.loads((mistral_copy / "config.json").read_text())
    config["intermediate_size"] = 96
    (mistral_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"model.safetensors: tensor 'model.layers.0.mlp.\w+_"
                       r"proj.weight' has shape \[\d+, \d+\], the config implies"):
        load_weights(mistral_copy)


def test_error_missing_tensor(mistral_copy: Path) -> None:
    _rewrite(mistral_copy, {"model.layers.1.post_attention_layernorm.weight": None})
    with pytest.raises(WeightsError,
                       match="copy: tensor 'layers.1.post_attention_layernorm.weight' is missing"):
        load_weights(mistral_copy)


def test_error_bias_and_unknown_tensors(mistral_copy: Path) -> None:
    _rewrite(mistral_copy, {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(WeightsError, match="'model.layers.0.self_attn.q_proj.bias' is a bias"):
        load_weights(mistral_copy)
    _rewrite(mistral_copy, {"model.layers.0.self_attn.q_proj.bias": None,
                            "model.layers.2.mlp.up_proj.weight": torch.zeros(128, 64)})
    with pytest.raises(WeightsError, match="unexpected tensor 'model.layers.2.mlp.up_proj"):
        load_weights(mistral_copy)


def test_harmless_extras_ignored(mistral_copy: Path, reference: dict) -> None:
    _rewrite(mistral_copy, {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    assert_same_tensors(load_weights(mistral_copy, progress=False), reference)


def test_error_index_names_missing_shard(tmp_path: Path) -> None:
    folder = make_tiny_hf_checkpoint(tmp_path, "llama", max_shard_size="40KB", **SIZES)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"index.json: names shard '{shard.name}'"):
        load_weights(folder)


def test_error_bad_config_is_config_error(mistral_copy: Path) -> None:
    (mistral_copy / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type"):
        load_weights(mistral_copy)


def test_error_gguf_unknown_quantization(mistral_dir: Path, tmp_path: Path) -> None:
    path = make_tiny_gguf(mistral_dir, tmp_path / "q81.gguf", "Q8_0",
                          tensor_types={"blk.1.ffn_up.weight": "Q8_1"})
    with pytest.raises(WeightsError, match="q81.gguf: tensor 'blk.1.ffn_up.weight' uses "
                                           "quantization type Q8_1"):
        load_weights(path)


def test_error_gguf_rope_freqs(mistral_dir: Path, tmp_path: Path) -> None:
    path = make_tiny_gguf(mistral_dir, tmp_path / "rope.gguf",
                          extra_tensors={"rope_freqs.weight": np.ones(8)})
    with pytest.raises(WeightsError, match="rope.gguf: tensor 'rope_freqs.weight' holds rope"):
        load_weights(path)


def test_error_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    with pytest.raises(WeightsError, match="broken.gguf: not a readable GGUF file"):
        load_weights(bad)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match="weights.bin: not a GGUF file"):
        load_weights(other)


# Default model --------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_matches_transformers_gguf_loader() -> None:
    from transformers import AutoModelForCausalLM

    from model.default_model import default_model_path

    torch.set_num_threads(1)
    path = default_model_path()
    ours = load_weights(None, progress=False)
    assert ours.source == path and ours.config.tie_word_embeddings
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    theirs = {name.removeprefix("model."): t for name, t in model.state_dict().items()
              if name != "lm_head.weight"}
    assert sorted(ours.tensors) == sorted(theirs)
    for name, tensor in ours.tensors.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6, msg=name)
