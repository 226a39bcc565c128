"""Our CPU kernels for a decoder layer's small ops and the fused decode layer
(model/csrc/decode_layer.cpp): rms_norm, rotary and silu_mul against PyTorch's formulas in
fp64, each row's result independent of the batch (bit for bit), argument errors, and
``ringserve::decode_layer`` giving bit for bit the logits and KV cache of the layer's ops run
one by one (so steps that mix prompt chunks with decodes, which take the op-by-op way, do not
change a sequence's tokens).

Tolerances: the kernels compute in fp32 (SiLU with a polynomial exp, relative error ~2e-7);
against fp64 references on unit-scale data they agree to a few 1e-6.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import cpu_kernels, int4
from model.engine import Engine
from model.engine_args import EngineArgs
from model.requests import GenerationRequest
from model.sampling_params import SamplingParams
from model.transformer import DecoderLayer, Transformer
from tests.checkpoints import make_tiny_hf_checkpoint

ATOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if cpu_kernels.decode_layer() is None:
        pytest.skip("the CPU kernels could not be built here (see the warning in the log)")


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_small_ops_match_pytorch_in_fp64(rows: int) -> None:
    torch.manual_seed(rows)
    rms_norm, rotary, silu_mul = cpu_kernels.rms_norm(), cpu_kernels.rotary(), \
        cpu_kernels.silu_mul()
    assert rms_norm is not None and rotary is not None and silu_mul is not None
    x, weight = torch.randn(rows, 576) * 3, torch.randn(576)
    expected = F.rms_norm(x.double(), (576,), weight.double(), 1e-5)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5).double(), expected, atol=ATOL, rtol=1e-6)
    heads = torch.randn(rows, 12, 64)
    angles = torch.rand(rows, 1, 64) * 100
    cos, sin = angles.cos(), angles.sin()
    torch.testing.assert_close(rotary(heads, cos, sin).double(),
                               rotate_reference(heads.double(), cos.double(), sin.double()),
                               atol=ATOL, rtol=0)
    gate_up = torch.randn(rows, 2 * 1536) * 4
    gate_up[0, :4] = torch.tensor([-100.0, -88.5, 90.0, 0.0])  # both clamps of the exp
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gate_up).double(), F.silu(gate) * up, atol=ATOL,
                               rtol=1e-6)


def test_small_ops_are_batch_invariant_and_take_strided_rows() -> None:
    torch.manual_seed(5)
    rms_norm, rotary, silu_mul = cpu_kernels.rms_norm(), cpu_kernels.rotary(), \
        cpu_kernels.silu_mul()
    assert rms_norm is not None and rotary is not None and silu_mul is not None
    wide = torch.randn(40, 1000)
    x, weight = wide[:, 8:584], torch.randn(576)  # rows with a stride of 1000
    qkv = torch.randn(40, 15, 64)
    angles = torch.rand(40, 1, 64) * 50
    cos, sin = angles.cos(), angles.sin()
    gate_up = torch.randn(40, 3072)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        batch = (rms_norm(x, weight, 1e-6), rotary(qkv[:, :12], cos, sin), silu_mul(gate_up))
        for r in (0, 17, 39):
            alone = (rms_norm(x[r:r + 1], weight, 1e-6),
                     rotary(qkv[r:r + 1, :12], cos[r:r + 1], sin[r:r + 1]),
                     silu_mul(gate_up[r:r + 1]))
            for whole, one in zip(batch, alone, strict=True):
                assert torch.equal(whole[r:r + 1], one)
    torch.set_num_threads(2)


def test_small_ops_reject_bad_arguments_with_clear_errors() -> None:
    rms_norm, rotary, silu_mul = cpu_kernels.rms_norm(), cpu_kernels.rotary(), \
        cpu_kernels.silu_mul()
    assert rms_norm is not None and rotary is not None and silu_mul is not None
    with pytest.raises(RuntimeError, match="multiple of 16"):
        rms_norm(torch.randn(2, 40), torch.randn(40), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        rms_norm(torch.randn(2, 64), torch.randn(32), 1e-5)
    with pytest.raises(RuntimeError, match="float32"):
        rms_norm(torch.randn(2, 64).double(), torch.randn(64), 1e-5)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        rotary(torch.randn(2, 3, 48), torch.randn(2, 1, 48), torch.randn(2, 1, 48))
    with pytest.raises(RuntimeError, match="cos and sin"):
        rotary(torch.randn(2, 3, 64), torch.randn(3, 1, 64), torch.randn(3, 1, 64))
    with pytest.raises(RuntimeError, match="2 I"):
        silu_mul(torch.randn(2, 40))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("fused"), model_type="mistral",
                                   sliding_window=16, hidden_size=128, intermediate_size=256,
                                   num_layers=2, num_heads=4, num_kv_heads=2)


def int4_engine(checkpoint: Path) -> Engine:
    if not int4.int4_kernel_available():
        pytest.skip("this torch build has no CPU int4 matmul (int4 is refused)")
    return Engine.from_args(EngineArgs(model=str(checkpoint), max_model_len=128, max_num_seqs=8,
                                       max_num_batched_tokens=48, prefill_chunk=20,
                                       progress=False, quantization="int4"))


def recorded_run(engine: Engine, monkeypatch: pytest.MonkeyPatch, fused: bool
                 ) -> tuple[list[torch.Tensor], int]:
    """Every forward pass's logits for four greedy prompts, and how many layer calls took the
    fused kernel."""
    logits: list[torch.Tensor] = []
    fused_calls = 0
    forward, fused_decode = Transformer.forward, DecoderLayer._fused_decode

    def recording_forward(self: Transformer, *args: object, **kwargs: object) -> torch.Tensor:
        out = forward(self, *args, **kwargs)  # type: ignore[arg-type]
        logits.append(out.clone())
        return out

    def counted(self: DecoderLayer, *args: object) -> torch.Tensor | None:
        nonlocal fused_calls
        out = fused_decode(self, *args) if fused else None  # type: ignore[arg-type]
        fused_calls += out is not None
        return out

    monkeypatch.setattr(Transformer, "forward", recording_forward)
    monkeypatch.setattr(DecoderLayer, "_fused_decode", counted)
    gen = torch.Generator().manual_seed(11)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    requests = [GenerationRequest(f"r{fused}{i}",
                                  tuple(torch.randint(3, 32000, (n,), generator=gen).tolist()),
                                  params) for i, n in enumerate((9, 30, 3, 22))]
    engine.run_to_completion(requests)  # windows of 16 wrap: the ring's rows are reused
    monkeypatch.undo()
    return logits, fused_calls


def test_decode_layer_gives_the_op_by_op_logits_bit_for_bit(
        checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = int4_engine(checkpoint)
    fused, fused_calls = recorded_run(engine, monkeypatch, fused=True)
    unfused, none = recorded_run(engine, monkeypatch, fused=False)
    assert none == 0 and fused_calls >= 2 * 8  # 2 layers, 8+ decode-only steps
    assert len(fused) == len(unfused)
    for a, b in zip(fused, unfused, strict=True):
        assert torch.equal(a, b)


def test_decode_layer_rejects_bad_rows_with_a_clear_error(checkpoint: Path) -> None:
    engine = int4_engine(checkpoint)
    layer = engine.model.layers[0]
    assert isinstance(layer, DecoderLayer)
    weights = layer.fused_weights()
    assert weights is not None
    kernel = cpu_kernels.decode_layer()
    assert kernel is not None
    cfg = layer.config
    k_rows = torch.zeros(cfg.num_kv_heads, 32, cfg.head_dim)
    x, cos = torch.randn(1, cfg.hidden_size), torch.ones(1, 1, cfg.head_dim)
    bounds, offsets = torch.tensor([[0, 4]]), torch.tensor([0, 1])
    norm = layer.input_layernorm.weight
    with pytest.raises(RuntimeError, match="write row lies outside the pool"):
        kernel(x, norm, norm, 1e-5, *weights, cos, cos, k_rows, k_rows.clone(),
               torch.tensor([32]), bounds, offsets, cfg.num_heads, 0.125)
    with pytest.raises(RuntimeError, match="num_heads"):
        kernel(x, norm, norm, 1e-5, *weights, cos, cos, k_rows, k_rows.clone(),
               torch.tensor([3]), bounds, offsets, cfg.num_heads + 1, 0.125)
