"""Int4 weights: exact re-packing of GGUF Q4_1 groups, the kernel against a dequantized fp32
reference, and the int4 model's greedy output across batch compositions.

Tolerance of the kernel (model/int4.py): it rounds the activations, the scales and zeros and
its output to bf16 (relative error 2^-9 each). A weight is ``(q - 8) s + z`` per group, so
per output element ``|out - x @ Wq^T| <= 2^-7 * sum_k |x_k| (|Wq_k| + |z_k|)`` (each
rounding 2^-9 of the term it touches, with margin; z_k the zero of input k's group).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import cpu_kernels, gguf_file, int4
from model.engine import Engine
from model.engine_args import EngineArgs
from model.int4 import Int4Projection, PromptRows, quantize_int4
from model.paged_cache import PagedChunk
from model.q8 import Q8Projection
from model.quantization import Int8Projection, QuantizationError, resolve_quantization
from model.requests import GenerationRequest
from model.sampling_params import SamplingParams
from model.transformer import Projection, Transformer, prompt_row_mask
from model.weights import load_weights
from tests.checkpoints import make_tiny_gguf, make_tiny_hf_checkpoint
from tests.engine_checks import assert_greedy_stable_across_batch_compositions

pytestmark = pytest.mark.skipif(not int4.int4_kernel_available(),
                                reason="this torch build has no CPU int4 matmul")


@pytest.fixture(autouse=True)
def _cache_dir(gguf_cache_dir: Path) -> Path:
    return gguf_cache_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("q4"), model_type="mistral",
                                   sliding_window=16, hidden_size=128, intermediate_size=256,
                                   num_layers=2, num_heads=4, num_kv_heads=2)


def kernel_bound(x: torch.Tensor, packed: int4.Int4Weight) -> torch.Tensor:
    zeros = packed.zero.abs().repeat_interleave(int4.GROUP_SIZE, dim=1)
    return 2.0 ** -7 * (x.abs() @ (packed.dequantize().abs() + zeros).T)


def test_q4_1_groups_are_reproduced_exactly() -> None:
    gen = torch.Generator().manual_seed(1)
    d = torch.rand(48, 4, generator=gen) * 0.1 + 1e-3  # per group of 32: w = d q + m
    m = -torch.rand(48, 4, generator=gen)
    q = torch.randint(0, 16, (48, 4, 32), generator=gen)
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 maps a group's min to 0 and its max to 15
    weight = (d[..., None] * q + m[..., None]).reshape(48, 128)
    packed = quantize_int4(weight)
    assert packed.codes.dtype == torch.uint8 and int(packed.codes.max()) <= 15
    assert torch.allclose(packed.dequantize(), weight, rtol=0, atol=1e-6)


def test_int4_rounding_error_within_half_a_step() -> None:
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    weight[3] = 0.25  # a constant row: scale 1, exact
    packed = quantize_int4(weight)
    step = packed.scale.repeat_interleave(int4.GROUP_SIZE, dim=1)
    assert torch.all((packed.dequantize() - weight).abs() <= step / 2 + 1e-6)
    assert torch.equal(packed.dequantize()[3], weight[3])


@pytest.mark.parametrize("batch", [1, 5, 33])
def test_int4_projection_matches_dequantized_reference(batch: int) -> None:
    weight = torch.randn(80, 160, generator=torch.Generator().manual_seed(batch)) * 0.05
    weight[7, 9] = 2.0  # an outlier coarsens only its own group
    packed = quantize_int4(weight)
    reference_weight = packed.dequantize()
    proj = Int4Projection(packed)
    x = torch.randn(batch, 160, generator=torch.Generator().manual_seed(100 + batch))
    x[0, 3] = 30.0
    out = proj(x)
    assert out.dtype == torch.float32 and out.shape == (batch, 80)
    assert torch.all((out - x @ reference_weight.T).abs()
                     <= kernel_bound(x, packed))
    for i in range(batch):  # each row's result is its own, whatever the batch
        assert torch.equal(proj(x[i:i + 1])[0], out[i])


def test_shapes_the_kernel_cannot_take_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int4(torch.ones(16, 40))
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_int4(torch.ones(8, 64))


def test_resolve_int4() -> None:
    assert resolve_quantization("int4", torch.device("cpu"), torch.float32) == "int4"
    with pytest.raises(QuantizationError, match="int4 runs on CPU with float32"):
        resolve_quantization("int4", torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("tied", [True, False])
def test_int4_model_from_a_q4_1_gguf_uses_the_files_weights(tied: bool, tmp_path: Path) -> None:
    hf = make_tiny_hf_checkpoint(tmp_path, model_type="mistral", sliding_window=16,
                                 hidden_size=128, intermediate_size=256, num_layers=2,
                                 num_heads=4, num_kv_heads=2, tie_word_embeddings=tied)
    # llama.cpp's Q4_1 files keep the token embedding as Q8_0 (the default model's layout)
    path = make_tiny_gguf(hf, tmp_path / "tiny-q4_1.gguf", "Q4_1",
                          tensor_types={"token_embd.weight": "Q8_0"})
    dequantized = load_weights(path, progress=False)  # the file's weights as fp32
    model = Transformer.from_tensors(dequantized.config, dequantized.tensors,
                                     quantization="int4")
    layer = model.layers[0]
    assert isinstance(layer.gate_up_proj, Int4Projection)
    q4_1 = ["layers.0.mlp.down_proj.weight", "layers.1.self_attn.q_proj.weight"]
    for name in q4_1 + ([] if tied else ["lm_head.weight"]):  # the file's Q4_1 groups
        weight = dequantized.tensors[name]
        assert torch.allclose(quantize_int4(weight).dequantize(), weight, rtol=0, atol=1e-6)
    head = dequantized.tensors.get("lm_head.weight", dequantized.tensors["embed_tokens.weight"])
    # the head is int8 (fp32 logits: greedy near-ties), tied (the Q8_0 embedding) or not
    if cpu_kernels.q8_linear() is not None:
        # Q8_0 groups through our kernel: a tied head is the file's Q8_0 embedding exactly; an
        # untied (Q4_1) one is rounded by half a step of its group, max|group| / 254, at most
        assert isinstance(model.lm_head, Q8Projection)
        head_int8 = model.lm_head.weight.dequantize()
        assert head_int8.shape == head.shape
        if tied:
            assert torch.equal(head_int8, head)
        groups = head.abs().view(head.shape[0], -1, 32).amax(dim=2, keepdim=True)
        assert torch.all((head_int8 - head).abs().view(head.shape[0], -1, 32)
                         <= 1.01 * groups / 254 + 1e-9)
    else:  # fbgemm's int8, one plane: the head rounded per row by half a step at most
        assert isinstance(model.lm_head, Int8Projection) and model.lm_head.planes == 1
        head_int8 = model.lm_head.int8_weight().dequantize()
        assert head_int8.shape == head.shape
        assert torch.all((head_int8 - head).abs()
                         <= 1.01 * head.abs().amax(dim=1, keepdim=True) / 254 + 1e-9)
    reference = Transformer.from_tensors(dequantized.config, dequantized.tensors)
    from model.kv_cache import SequenceChunk

    ids = torch.arange(3, 40)
    chunk = [SequenceChunk(0, 0, len(ids))]
    logits = model(ids, chunk, None, all_logits=True)
    ref = reference(ids, chunk, None, all_logits=True)
    assert (logits - ref).abs().max() <= 0.05 * ref.abs().max()  # bf16 activations at most


def test_int4_engine_greedy_output_stable_across_batch_compositions(checkpoint: Path) -> None:
    engine = Engine.from_args(EngineArgs(model=str(checkpoint), max_model_len=128,
                                         max_num_seqs=8, max_num_batched_tokens=48,
                                         prefill_chunk=20, progress=False,
                                         quantization="int4"))
    projection = engine.model.layers[0].qkv_proj
    assert isinstance(projection, Int4Projection) and projection.dense  # the default
    # Q8_0 groups on our kernel where it is built, else fbgemm's int8
    assert isinstance(engine.model.lm_head, Q8Projection if cpu_kernels.q8_linear() is not None
                      else Int8Projection)
    # prompts chunked by 20 in a 48-token budget: prompt rows beside decode rows in a step
    assert_greedy_stable_across_batch_compositions(engine, max_tokens=20)


def test_dense_prefill_rows_take_the_bf16_copy_and_decode_rows_the_int4_kernel() -> None:
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(3)) * 0.05
    split = PromptRows()
    dense = Int4Projection(quantize_int4(weight), dense=True, prompt_rows=split)
    plain = Int4Projection(quantize_int4(weight))
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(4))
    bf16_reference = (x.bfloat16() @ quantize_int4(weight).dequantize().t().bfloat16()).float()
    assert torch.equal(dense(x), plain(x))  # no rows marked: the int4 kernel for all
    split.rows = slice(None)  # every row a prompt token
    assert torch.equal(dense(x), bf16_reference)
    for rows, rest in ((slice(3, None), slice(0, 3)),
                       (torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4, 6]))):
        split.rows, split.rest = rows, rest
        out = dense(x)
        assert torch.equal(out[rows], bf16_reference[rows])
        for i in torch.arange(7)[rest].tolist():  # a decode row is what it is alone
            assert torch.equal(out[i], plain(x[i:i + 1])[0])
    assert not torch.equal(bf16_reference, plain(x))  # the two paths do differ


def test_prompt_rows_follow_each_chunks_prompt_length() -> None:
    chunks = [PagedChunk((0,), 9, 1, prompt_len=5),  # a decode
              PagedChunk((1,), 0, 4, prompt_len=10),  # a prompt chunk
              PagedChunk((2,), 3, 4, prompt_len=5),  # recompute: 2 prompt + 2 generated
              PagedChunk((3,), 6, 1)]  # no prompt length: one token past 0 is a decode
    assert prompt_row_mask(chunks) == [False, True, True, True, True, True, True, False,
                                       False, False]
    assert prompt_row_mask([PagedChunk((0,), 0, 1), PagedChunk((1,), 0, 3)]) == [True] * 4


def test_without_dense_prefill_the_projections_hold_int4_only(checkpoint: Path) -> None:
    engine = Engine.from_args(EngineArgs(model=str(checkpoint), max_model_len=64,
                                         progress=False, quantization="int4",
                                         dense_prefill=False))
    projection = engine.model.layers[0].gate_up_proj
    assert isinstance(projection, Int4Projection) and not projection.dense


def test_int4_loads_per_tensor_and_builds_the_same_model(checkpoint: Path) -> None:
    fp32 = load_weights(checkpoint, progress=False)
    loaded = load_weights(checkpoint, progress=False, quantization="int4")
    coded = {n for n, t in loaded.tensors.items() if t.dtype == torch.uint8}
    assert coded == set(loaded.scales) == set(loaded.zeros) == {
        n for n in fp32.tensors if n.endswith("proj.weight")}  # not the LM head
    for name in coded:
        want = quantize_int4(fp32.tensors[name])
        assert torch.equal(loaded.tensors[name], want.codes)
        assert torch.equal(loaded.zeros[name], want.zero)
    assert loaded.tensors["lm_head.weight"].dtype == torch.float32
    ids = torch.arange(3, 40)
    from model.kv_cache import SequenceChunk

    chunk = [SequenceChunk(0, 0, len(ids))]
    from_loaded = Transformer.from_tensors(loaded.config, loaded.tensors, quantization="int4",
                                           scales=loaded.scales, zeros=loaded.zeros)
    from_fp32 = Transformer.from_tensors(fp32.config, fp32.tensors, quantization="int4")
    assert torch.equal(from_loaded(ids, chunk, None, all_logits=True),
                       from_fp32(ids, chunk, None, all_logits=True))
    # unquantized from int4-loaded tensors: the codes are dequantized, not read as numbers
    plain = Transformer.from_tensors(loaded.config, loaded.tensors, scales=loaded.scales,
                                     zeros=loaded.zeros)
    down = plain.layers[0].down_proj
    assert isinstance(down, Projection)
    weight_t = down.weight_t
    name = "layers.0.mlp.down_proj.weight"
    assert torch.equal(weight_t, quantize_int4(fp32.tensors[name]).dequantize().T)


def test_gguf_int4_cache_written_once_then_used(checkpoint: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_tiny_gguf(checkpoint, tmp_path / "tiny-q4.gguf", "Q4_1")
    first = load_weights(path, progress=False, quantization="int4")
    assert (gguf_file.cache_entry(path) / gguf_file.INT4_WEIGHTS_FILE).is_file()

    def no_reader(path: Path) -> None:
        raise AssertionError("the GGUF file was opened despite the int4 cache")

    monkeypatch.setattr(gguf_file, "open_gguf", no_reader)
    second = load_weights(path, progress=False, quantization="int4")
    assert sorted(second.tensors) == sorted(first.tensors)
    for part in ("tensors", "scales", "zeros"):
        for name, tensor in getattr(first, part).items():
            assert torch.equal(getattr(second, part)[name], tensor), (part, name)


def test_int4_refused_where_it_cannot_run(checkpoint: Path) -> None:
    with pytest.raises(QuantizationError, match="float32"):
        Engine.from_args(EngineArgs(model=str(checkpoint), dtype="bfloat16",
                                    quantization="int4", progress=False))
    odd = make_tiny_hf_checkpoint(checkpoint.parent, hidden_size=48, intermediate_size=96,
                                  num_heads=4, num_kv_heads=2, name="odd")
    with pytest.raises(QuantizationError, match="multiple of 32"):
        load_weights(odd, progress=False, quantization="int4")


def test_auto_falls_back_from_int4_where_the_shapes_do_not_fit(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    # hidden 80: not a whole number of 32-input groups
    odd = make_tiny_hf_checkpoint(tmp_path, model_type="mistral", hidden_size=80,
                                  intermediate_size=160, num_layers=1, num_heads=2,
                                  num_kv_heads=1)
    with pytest.raises(int4.Int4ShapeError, match="multiple of 32"):
        Engine.from_args(EngineArgs(model=str(odd), max_model_len=64, progress=False,
                                    quantization="int4"))
    with caplog.at_level("WARNING"):
        engine = Engine.from_args(EngineArgs(model=str(odd), max_model_len=64, progress=False,
                                             quantization="auto"))
    fallback = resolve_quantization("auto", torch.device("cpu"), torch.float32,
                                    allow_int4=False)
    assert fallback != "int4" and f"using {fallback}" in caplog.text
    layer = engine.model.layers[0].qkv_proj
    assert not isinstance(layer, Int4Projection)
    assert isinstance(layer, Int8Projection) == (fallback in ("int8", "int8x2"))
    out = engine.run_to_completion([GenerationRequest("x", (5, 6, 7), SamplingParams(
        max_tokens=4, temperature=0.0, ignore_eos=True))])
    assert len(out[0].token_ids) == 4
