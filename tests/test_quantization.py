"""Int8 weights: kernels against a dequantized fp32 reference, loaders, the GGUF int8 cache,
and the int8 model's greedy output through the engine across batch compositions.

Tolerances (stated once, derived in model/quantization.py's terms):

* weight rounding: |W - dequantize(quantize_rows(W))| <= scale / 2 per element, scale =
  max|row| / 127, hence |x @ (W - Wq)^T| <= sum|x| * scale / 2 per output;
* the int8 kernel against fp32 ``x @ Wq^T`` over the same dequantized weights: activations
  carry ~16 bits (two 8-bit passes), so the error is below 1e-3 of max|x @ Wq^T| (measured
  ~5e-5 on the default model's shapes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import gguf_file
from model.engine import Engine
from model.engine_args import EngineArgs
from model.int4 import int4_kernel_available
from model.kv_cache import SequenceChunk
from model.quantization import (
    INT4_MEETS_ACCURACY_GOALS,
    INT8_MEETS_ACCURACY_GOALS,
    INT8X2_MEETS_ACCURACY_GOALS,
    Int8Projection,
    QuantizationError,
    concat_rows,
    quantize_planes,
    quantize_rows,
    resolve_quantization,
)
from model.requests import GenerationRequest
from model.sampling_params import SamplingParams
from model.transformer import Transformer
from model.weights import load_weights
from tests.checkpoints import make_tiny_gguf, make_tiny_hf_checkpoint
from tests.engine_checks import assert_greedy_stable_across_batch_compositions

KERNEL_TOLERANCE = 1e-3  # of max|reference output|


@pytest.fixture(autouse=True)
def _cache_dir(gguf_cache_dir: Path) -> Path:
    return gguf_cache_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("q"), model_type="mistral",
                                   sliding_window=16, hidden_size=128, intermediate_size=256,
                                   num_layers=2, num_heads=4, num_kv_heads=2)


def random_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    weight[3, 7] = 1.5  # an outlier: its row gets a coarse scale, the others keep theirs
    weight[5] = 0.0  # an all-zero row
    return weight


def test_quantize_rows_error_within_half_a_step() -> None:
    weight = random_weight(40, 96, 0)
    q = quantize_rows(weight)
    assert q.values.dtype == torch.int8 and q.values.shape == weight.shape
    assert int(q.values.abs().max()) <= 127 and torch.all(q.scale > 0)
    torch.testing.assert_close(q.scale, weight.abs().amax(1).clamp_min(1e-30) / 127
                               * (weight.abs().amax(1) > 0) + (weight.abs().amax(1) == 0))
    error = (q.dequantize() - weight).abs()
    assert torch.all(error <= q.scale[:, None] / 2 + 1e-7)
    assert torch.equal(q.dequantize()[5], torch.zeros(96))


@pytest.mark.parametrize(("in_features", "out_features"), [(64, 96), (96, 64), (64, 1000)])
@pytest.mark.parametrize("batch", [1, 3, 33])
def test_int8_projection_matches_dequantized_reference(in_features: int, out_features: int,
                                                       batch: int) -> None:
    weight = random_weight(out_features, in_features, batch)
    q = quantize_rows(weight)
    proj = Int8Projection(q)
    gen = torch.Generator().manual_seed(batch + 1)
    x = torch.randn(batch, in_features, generator=gen)
    x[0, 2] = 40.0  # an activation outlier (as LLM hidden states have)
    out = proj(x)
    assert out.shape == (batch, out_features) and out.dtype == torch.float32
    reference = x @ q.dequantize().T  # fp32 over the same int8-rounded weights
    error = (out - reference).abs().max()
    assert error <= KERNEL_TOLERANCE * reference.abs().max(), float(error)
    bound = x.abs().sum(1, keepdim=True) * q.scale[None, :] / 2  # weight rounding, worst case
    assert torch.all((out - x @ weight.T).abs() <= bound + KERNEL_TOLERANCE
                     * reference.abs().max())


def test_int8_projection_rows_do_not_depend_on_the_batch() -> None:
    q = quantize_rows(random_weight(80, 64, 3))
    proj = Int8Projection(q)
    x = torch.randn(9, 64) * torch.logspace(-2, 2, 9)[:, None]  # rows of very different size
    together = proj(x)
    for i in range(9):
        assert torch.equal(proj(x[i:i + 1])[0], together[i])  # bit for bit
    assert torch.equal(proj(x[2:5]), together[2:5])


def test_int8_projection_unpacks_to_its_weight_and_fuses_rows() -> None:
    parts = [quantize_rows(random_weight(n, 64, n)) for n in (16, 8, 8)]
    fused = concat_rows(parts)
    unpacked = Int8Projection(fused).int8_weight()
    assert torch.equal(unpacked.values, fused.values)
    torch.testing.assert_close(unpacked.scale, fused.scale)
    assert torch.equal(fused.values[16:24], parts[1].values)


def test_resolve_quantization() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_quantization("none", cpu, torch.float32) == "none"
    assert resolve_quantization("int8", cpu, torch.float32) == "int8"
    assert resolve_quantization("int8x2", cpu, torch.float32) == "int8x2"
    assert resolve_quantization("auto", cuda, torch.bfloat16) == "none"
    auto_cpu = ("int4" if INT4_MEETS_ACCURACY_GOALS and int4_kernel_available()
                else "int8" if INT8_MEETS_ACCURACY_GOALS
                else "int8x2" if INT8X2_MEETS_ACCURACY_GOALS else "none")
    assert resolve_quantization("auto", cpu, torch.float32) == auto_cpu
    with pytest.raises(QuantizationError, match="CPU"):
        resolve_quantization("int8", cuda, torch.bfloat16)
    with pytest.raises(QuantizationError, match="CPU"):
        resolve_quantization("int8", cpu, torch.bfloat16)
    with pytest.raises(QuantizationError, match="one of"):
        resolve_quantization("int3", cpu, torch.float32)


def test_int8_weights_load_per_tensor_and_build_the_same_model(checkpoint: Path) -> None:
    fp32 = load_weights(checkpoint, progress=False)
    int8 = load_weights(checkpoint, progress=False, quantization="int8")
    quantized = {n for n, t in int8.tensors.items() if t.dtype == torch.int8}
    assert quantized == set(int8.scales) and quantized == {
        n for n in fp32.tensors if n.endswith("proj.weight") or n == "lm_head.weight"}
    for name in quantized:
        want = quantize_rows(fp32.tensors[name])
        assert torch.equal(int8.tensors[name], want.values)
    assert int8.tensors["embed_tokens.weight"].dtype == torch.float32
    from_loaded = Transformer.from_tensors(int8.config, int8.tensors, quantization="int8",
                                           scales=int8.scales)
    from_fp32 = Transformer.from_tensors(fp32.config, fp32.tensors, quantization="int8")
    assert isinstance(from_loaded.lm_head, Int8Projection)
    assert isinstance(from_loaded.layers[0].qkv_proj, Int8Projection)
    reference = Transformer.from_tensors(fp32.config, fp32.tensors)
    ids = torch.arange(3, 40)
    chunk = [SequenceChunk(0, 0, len(ids))]
    a = from_loaded(ids, chunk, None, all_logits=True)
    assert torch.equal(a, from_fp32(ids, chunk, None, all_logits=True))
    ref = reference(ids, chunk, None, all_logits=True)
    # the whole model: weight rounding of every layer adds up; logits stay within 5% of range
    assert (a - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (a.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_gguf_int8_cache_written_once_per_tensor_then_used(
        checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qtype: str) -> None:
    path = make_tiny_gguf(checkpoint, tmp_path / f"tiny-{qtype}.gguf", qtype)
    fp32 = load_weights(path, progress=False)
    first = load_weights(path, progress=False, quantization="int8")
    entry = gguf_file.cache_entry(path)
    assert (entry / gguf_file.INT8_WEIGHTS_FILE).is_file()
    for name, scale in first.scales.items():  # int8 of the dequantized GGUF tensor
        want = quantize_rows(fp32.tensors[name])
        assert torch.equal(first.tensors[name], want.values)
        torch.testing.assert_close(scale, want.scale)

    def no_reader(path: Path) -> None:
        raise AssertionError("the GGUF file was opened despite the int8 cache")

    monkeypatch.setattr(gguf_file, "open_gguf", no_reader)
    second = load_weights(path, progress=False, quantization="int8")
    assert sorted(second.tensors) == sorted(first.tensors)
    for name, tensor in first.tensors.items():
        assert torch.equal(second.tensors[name], tensor)
    assert sorted(second.scales) == sorted(first.scales)
    assert load_weights(path, progress=False).tensors.keys() == fp32.tensors.keys()


@pytest.fixture(scope="module")
def int8_engine(checkpoint: Path) -> Engine:
    return Engine.from_args(EngineArgs(model=str(checkpoint), max_model_len=256,
                                       max_num_seqs=8, max_num_batched_tokens=48,
                                       prefill_chunk=20, progress=False, quantization="int8"))


def test_int8_engine_greedy_output_stable_across_batch_compositions(int8_engine: Engine
                                                                    ) -> None:
    assert isinstance(int8_engine.model.layers[0].down_proj, Int8Projection)
    assert_greedy_stable_across_batch_compositions(int8_engine, max_tokens=24)


def test_int8_refused_on_a_dtype_it_cannot_run(checkpoint: Path) -> None:
    with pytest.raises(QuantizationError, match="float32"):
        Engine.from_args(EngineArgs(model=str(checkpoint), dtype="bfloat16",
                                    quantization="int8", progress=False))


def test_quantization_knob_reaches_the_engine_from_cli_and_config(checkpoint: Path) -> None:
    import json
    import subprocess
    import sys

    from pydantic import ValidationError

    from app.config import AppConfig

    assert AppConfig(quantization="int8").engine_args().quantization == "int8"
    # serving defaults to auto (int4 on CPU); the library keeps the checkpoint's weights
    assert AppConfig().engine_args().quantization == "auto"
    assert EngineArgs().quantization == "none"
    with pytest.raises(ValidationError):
        AppConfig(quantization="int3")

    def generate(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", "generate", "--model",
                               str(checkpoint), "--prompt", "Hello there", "--max-tokens", "6",
                               "--json", "--quiet", *extra], capture_output=True, text=True,
                              timeout=300)

    ok = generate("--quantization", "int8")
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["token_ids"]) >= 1
    bad = generate("--quantization", "int8", "--dtype", "bfloat16")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("ringserve: error: quantization int8")


# int8x2: two int8 planes per weight -------------------------------------------------------------
def test_quantize_planes_second_plane_cuts_the_error() -> None:
    weight = random_weight(40, 96, 4)
    first, second = quantize_planes(weight, 2)
    assert torch.equal(first.values, quantize_rows(weight).values)
    # plane 2 quantizes plane 1's rounding error, itself within scale1 / 2 per element, so
    # its own error is within scale2 / 2 and scale2 <= scale1 / 254 (up to float rounding);
    # an all-zero row keeps scale 1 in both planes
    zero_row = weight.abs().amax(1) == 0
    assert torch.all((second.scale <= first.scale / 254 * (1 + 1e-5)) | zero_row)
    error = (first.dequantize() + second.dequantize() - weight).abs()
    assert torch.all(error <= second.scale[:, None] / 2 + 1e-7)


@pytest.mark.parametrize(("in_features", "out_features"), [(64, 96), (96, 64)])
@pytest.mark.parametrize("batch", [1, 17])
def test_int8x2_projection_matches_dequantized_reference(in_features: int, out_features: int,
                                                         batch: int) -> None:
    weight = random_weight(out_features, in_features, batch + 10)
    planes = quantize_planes(weight, 2)
    proj = Int8Projection(planes)
    assert proj.planes == 2
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, in_features, generator=gen)
    x[0, 2] = 40.0
    out = proj(x)
    reference = x @ (planes[0].dequantize() + planes[1].dequantize()).T
    assert (out - reference).abs().max() <= KERNEL_TOLERANCE * reference.abs().max()
    # against the unrounded fp32 weight, too: two planes leave only the activation rounding
    assert (out - x @ weight.T).abs().max() <= KERNEL_TOLERANCE * reference.abs().max()
    for i in range(batch):
        assert torch.equal(proj(x[i:i + 1])[0], out[i])  # rows independent of the batch


def test_int8x2_model_is_close_to_fp32_and_batch_invariant(checkpoint: Path) -> None:
    fp32 = load_weights(checkpoint, progress=False)
    assert load_weights(checkpoint, progress=False, quantization="int8x2").scales == {}
    int8x2 = Transformer.from_tensors(fp32.config, fp32.tensors, quantization="int8x2")
    assert isinstance(int8x2.lm_head, Int8Projection) and int8x2.lm_head.planes == 2
    reference = Transformer.from_tensors(fp32.config, fp32.tensors)
    ids = torch.arange(3, 40)
    chunk = [SequenceChunk(0, 0, len(ids))]
    a = int8x2(ids, chunk, None, all_logits=True)
    ref = reference(ids, chunk, None, all_logits=True)
    assert (a - ref).abs().max() <= 2e-3 * ref.abs().max()  # int8 alone allows 5%
    assert torch.equal(a.argmax(-1), ref.argmax(-1))
    with pytest.raises(QuantizationError, match="float32 weights"):
        int8 = load_weights(checkpoint, progress=False, quantization="int8")
        Transformer.from_tensors(int8.config, int8.tensors, quantization="int8x2",
                                 scales=int8.scales)
    engine = Engine.from_args(EngineArgs(model=str(checkpoint), max_model_len=128,
                                         max_num_seqs=4, progress=False,
                                         quantization="int8x2"))
    qkv = engine.model.layers[0].qkv_proj
    assert isinstance(qkv, Int8Projection) and qkv.planes == 2
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [(5, 9, 11), tuple(range(20, 47)), (7,)]
    alone = [engine.run_to_completion([GenerationRequest(f"a{i}", p, params)])[0].token_ids
             for i, p in enumerate(prompts)]
    together = engine.run_to_completion([GenerationRequest(f"b{i}", p, params)
                                         for i, p in enumerate(prompts)])
    assert [c.token_ids for c in together] == alone
