// A decoder layer's small ops on CPU, fp32, and a whole decode-step layer in one call.
// Built and loaded by model/cpu_kernels.py; used by model/transformer.py and model/rope.py.
//
// ringserve::rms_norm(x [N, C], weight [C], eps) -> [N, C]: x / sqrt(mean(x^2) + eps) * weight.
// ringserve::rotary(x [T, heads, D], cos [T, D], sin [T, D]) -> [T, heads, D]: the rotate-half
//   rotation (first half: a cos - b sin, second: b cos + a sin for the halves a, b).
// ringserve::silu_mul(gate_up [N, 2 I]) -> [N, I]: silu(gate) * up, the SwiGLU product.
// ringserve::decode_layer(...): one decoder layer for a step of one token per sequence with the
//   paged KV cache and int4 projections (model/int4.py KernelInt4): norm, q/k/v projection,
//   rotation, the new K/V written to their pool rows, attention (ringserve::paged_decode),
//   output projection and residual, norm, gate/up projection, SwiGLU, down projection and
//   residual. Through PyTorch that is ~20 ops a layer and ~190 us of dispatch and Python at
//   batch 1 (a third of the step); here it is one call.
//
// Every row is computed alone by the same code (whole 16-float vectors, fixed order), so a
// token's result does not depend on the rest of the batch, and decode_layer calls the same
// functions the separate ops run (and the same linears), so a decode token's result is bit for
// bit the same through decode_layer or through the layer's ops one by one (a step that mixes
// prompt chunks and decodes takes the second way).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "ringserve_kernels.h"

namespace {
using namespace ringserve::simd;

constexpr int64_t ELEMENTS_PER_TASK = 16384;  // below this, one thread: a fork costs more

int64_t rows_per_task(int64_t row_elements) {
  return std::max<int64_t>(1, ELEMENTS_PER_TASK / std::max<int64_t>(1, row_elements));
}

void check_float_cpu(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", what,
              " must be a float32 CPU tensor");
}

// one row of C floats (C a multiple of 16)
void rms_norm_row(const float* x, const float* w, float eps, int64_t C, float* y) {
  vf total = vf{};
  for (int64_t i = 0; i < C; i += LANES) {
    const vf v = load(x + i);
    total += v * v;
  }
  const float inverse = 1.0f / std::sqrt(lane_sum(total) / static_cast<float>(C) + eps);
  for (int64_t i = 0; i < C; i += LANES) store(y + i, load(x + i) * inverse * load(w + i));
}

// one head of D floats (D a multiple of 32) by one position's cos / sin rows
void rotate_head(const float* x, const float* c, const float* s, int64_t D, float* y) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; i += LANES) {
    const vf a = load(x + i), b = load(x + half + i);
    store(y + i, a * load(c + i) - b * load(s + i));
    store(y + half + i, b * load(c + half + i) + a * load(s + half + i));
  }
}

// one row: y[i] = silu(g[i]) * u[i] over I floats (I a multiple of 16)
void silu_mul_row(const float* g, const float* u, int64_t I, float* y) {
  for (int64_t i = 0; i < I; i += LANES) {
    const vf gate = load(g + i);
    store(y + i, gate / (1.0f + exp_clamped(-gate)) * load(u + i));
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float_cpu(x, "rms_norm", "x");
  check_float_cpu(weight, "rms_norm", "weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x [N, C] with dense rows");
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C && weight.is_contiguous(),
              "rms_norm: weight [C], contiguous");
  TORCH_CHECK(C % LANES == 0, "rms_norm: C must be a multiple of 16");
  at::Tensor out = at::empty({N, C}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride = x.stride(0);
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * stride, wp, feps, C, op + r * C);
  });
  return out;
}

void check_cos_sin(const at::Tensor& cos, const at::Tensor& sin, int64_t T, int64_t D,
                   const char* op) {
  check_float_cpu(cos, op, "cos");
  check_float_cpu(sin, op, "sin");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * D &&
              sin.numel() == T * D && cos.size(0) == T && sin.size(0) == T, op,
              ": cos and sin [T, D] (or [T, 1, D]), contiguous");
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_float_cpu(x, "rotary", "x");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary: x [T, heads, D] with dense heads");
  const int64_t T = x.size(0), heads = x.size(1), D = x.size(2);
  TORCH_CHECK(D % (2 * LANES) == 0, "rotary: head dim must be a multiple of 32");
  check_cos_sin(cos, sin, T, D, "rotary");
  at::Tensor out = at::empty({T, heads, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  at::parallel_for(0, T, rows_per_task(heads * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < heads; ++h)
        rotate_head(xp + t * s0 + h * s1, cp + t * D, sp + t * D, D, op + (t * heads + h) * D);
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_float_cpu(gate_up, "silu_mul", "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % (2 * LANES) == 0,
              "silu_mul: gate_up [N, 2 I] with dense rows, I a multiple of 16");
  const int64_t N = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({N, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride = gate_up.stride(0);
  at::parallel_for(0, N, rows_per_task(I), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      silu_mul_row(gp + r * stride, gp + r * stride + I, I, op + r * I);
  });
  return out;
}

at::Tensor int4(const at::Tensor& x, at::TensorList w, const char* name) {
  TORCH_CHECK(w.size() == 3, "decode_layer: ", name, " takes [codes, d, m]");
  return ringserve::int4_linear(x, w[0], w[1], w[2]);
}

at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& input_norm,
                        const at::Tensor& post_norm, double eps, at::TensorList qkv_weight,
                        at::TensorList o_weight, at::TensorList gate_up_weight,
                        at::TensorList down_weight, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& k_rows, const at::Tensor& v_rows,
                        const at::Tensor& write_rows, const at::Tensor& run_bounds,
                        const at::Tensor& seq_offsets, int64_t num_heads, double scale) {
  check_float_cpu(x, "decode_layer", "x");
  check_float_cpu(k_rows, "decode_layer", "k_rows");
  check_float_cpu(v_rows, "decode_layer", "v_rows");
  TORCH_CHECK(x.dim() == 2, "decode_layer: x [B, hidden]");
  TORCH_CHECK(k_rows.dim() == 3 && k_rows.sizes() == v_rows.sizes() && k_rows.stride(2) == 1 &&
              v_rows.stride(2) == 1, "decode_layer: k_rows, v_rows [KVH, P, D], dense rows");
  const int64_t B = x.size(0), KVH = k_rows.size(0), P = k_rows.size(1), D = k_rows.size(2);
  const int64_t H = num_heads;
  TORCH_CHECK(H > 0 && H % KVH == 0, "decode_layer: num_heads must be a multiple of KV heads");
  TORCH_CHECK(D % (2 * LANES) == 0, "decode_layer: head dim must be a multiple of 32");
  check_cos_sin(cos, sin, B, D, "decode_layer");
  TORCH_CHECK(write_rows.device().is_cpu() && write_rows.scalar_type() == at::kLong &&
              write_rows.dim() == 1 && write_rows.size(0) == B,
              "decode_layer: write_rows [B] int64");
  const at::Tensor rows = write_rows.contiguous();
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= rp[b] && rp[b] < P, "decode_layer: a write row lies outside the pool");

  const at::Tensor normed = rms_norm(x, input_norm, eps);
  const at::Tensor qkv = int4(normed, qkv_weight, "qkv");  // [B, (H + 2 KVH) D]
  TORCH_CHECK(qkv.size(1) == (H + 2 * KVH) * D, "decode_layer: the q/k/v projection's width "
              "is not (heads + 2 KV heads) * head dim");
  at::Tensor q = at::empty({B, H, D}, x.options());
  {  // rotate q into q, k into its pool row; v to its pool row
    const float* src = qkv.data_ptr<float>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    float* qp = q.data_ptr<float>();
    float* kp = k_rows.data_ptr<float>();
    float* vp = v_rows.data_ptr<float>();
    const int64_t width = qkv.size(1);
    for (int64_t b = 0; b < B; ++b) {
      const float* row = src + b * width;
      for (int64_t h = 0; h < H; ++h)
        rotate_head(row + h * D, cp + b * D, sp + b * D, D, qp + (b * H + h) * D);
      for (int64_t h = 0; h < KVH; ++h) {
        rotate_head(row + (H + h) * D, cp + b * D, sp + b * D, D,
                    kp + h * k_rows.stride(0) + rp[b] * k_rows.stride(1));
        std::memcpy(vp + h * v_rows.stride(0) + rp[b] * v_rows.stride(1),
                    row + (H + KVH + h) * D, D * sizeof(float));
      }
    }
  }
  const at::Tensor attention = ringserve::paged_decode(q, k_rows, v_rows, run_bounds,
                                                       seq_offsets, scale);  // [B, H, D]
  at::Tensor hidden = int4(attention.view({B, H * D}), o_weight, "o");
  hidden.add_(x);  // the residual
  const at::Tensor gate_up = int4(rms_norm(hidden, post_norm, eps), gate_up_weight, "gate_up");
  at::Tensor out = int4(silu_mul(gate_up), down_weight, "down");
  out.add_(hidden);
  return out;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(ringserve, lib) {
  lib.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  lib.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  lib.def("silu_mul(Tensor gate_up) -> Tensor");
  lib.def("decode_layer(Tensor x, Tensor input_norm, Tensor post_norm, float eps, "
          "Tensor[] qkv_weight, Tensor[] o_weight, Tensor[] gate_up_weight, "
          "Tensor[] down_weight, Tensor cos, Tensor sin, Tensor(a!) k_rows, Tensor(b!) v_rows, "
          "Tensor write_rows, Tensor run_bounds, Tensor seq_offsets, int num_heads, "
          "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ringserve, CPU, lib) {
  lib.impl("rms_norm", &rms_norm);
  lib.impl("rotary", &rotary);
  lib.impl("silu_mul", &silu_mul);
  lib.impl("decode_layer", &decode_layer);
}
