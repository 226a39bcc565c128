// ringserve::paged_decode - one query token per sequence over its window in the paged KV pool,
// on CPU, fp32. Built and loaded by model/cpu_kernels.py (see its docstring for why).
//
// q [B, H, D]; k_rows, v_rows [KVH, P, D] (one layer's pool as rows, last dim dense);
// run_bounds [R, 2] int64: [start, stop) pool-row runs; seq_offsets [B + 1] int64: sequence b's
// window is runs seq_offsets[b] .. seq_offsets[b + 1] - 1, in position order. Query head
// h * G + g (G = H / KVH) attends with KV head h. Returns [B, H, D]:
// softmax(q k^T * scale) v over the window's rows.
//
// Batch invariance: each (sequence, KV head) pair is computed by the same code in the same
// order whatever else is in the batch and whichever thread runs it - lanes of 16 floats in a
// fixed order, each lane sum by a fixed tree - so a sequence's result is bit for bit the same
// alone or in any batch. Two passes: scores for every row, then an exact max, exp, sum and
// the weighted sum of V (no online rescaling, so no order depends on block sizes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ringserve_kernels.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace {
constexpr int MAX_GROUP = 16;     // query heads per KV head
constexpr int MAX_DIM_VECS = 16;  // head dim <= 16 * LANES = 256
// below this many (row, KV head) pairs in the whole step, one thread: a second thread's
// fork and join cost more than the work (a batch-1 step over a 250-token window is 750)
constexpr int64_t PARALLEL_MIN_ROW_HEADS = 4096;

using namespace ringserve::simd;
}  // namespace

namespace ringserve {
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_rows, const at::Tensor& v_rows,
                        const at::Tensor& run_bounds, const at::Tensor& seq_offsets,
                        double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_rows.device().is_cpu() && v_rows.device().is_cpu(),
              "paged_decode: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_rows.scalar_type() == at::kFloat &&
              v_rows.scalar_type() == at::kFloat, "paged_decode: float32 tensors only");
  TORCH_CHECK(run_bounds.scalar_type() == at::kLong && seq_offsets.scalar_type() == at::kLong,
              "paged_decode: int64 run bounds and offsets");
  TORCH_CHECK(q.dim() == 3 && k_rows.dim() == 3 && v_rows.dim() == 3,
              "paged_decode: q [B, H, D], k_rows and v_rows [KVH, P, D]");
  TORCH_CHECK(k_rows.sizes() == v_rows.sizes() && k_rows.size(2) == q.size(2),
              "paged_decode: k_rows, v_rows and q disagree on shapes");
  TORCH_CHECK(k_rows.stride(2) == 1 && v_rows.stride(2) == 1,
              "paged_decode: the rows' last dimension must be dense");
  const at::Tensor qc = q.contiguous();
  const int64_t B = qc.size(0), H = qc.size(1), D = qc.size(2);
  const int64_t KVH = k_rows.size(0), P = k_rows.size(1);
  TORCH_CHECK(KVH > 0 && H % KVH == 0 && H / KVH <= MAX_GROUP,
              "paged_decode: query heads must be a multiple (at most 16x) of KV heads");
  TORCH_CHECK(D % LANES == 0 && D / LANES <= MAX_DIM_VECS,
              "paged_decode: head dim must be a multiple of 16, at most 256");
  const at::Tensor bounds = run_bounds.contiguous();
  const at::Tensor offsets = seq_offsets.contiguous();
  TORCH_CHECK(bounds.dim() == 2 && bounds.size(1) == 2 && offsets.dim() == 1 &&
              offsets.size(0) == B + 1, "paged_decode: run_bounds [R, 2], seq_offsets [B + 1]");
  const int64_t* bp = bounds.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  TORCH_CHECK(op[0] == 0 && op[B] == bounds.size(0), "paged_decode: offsets must span the runs");
  std::vector<int64_t> lengths(B);  // rows of each sequence's window
  int64_t rows_total = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(op[b] <= op[b + 1], "paged_decode: offsets must not decrease");
    int64_t length = 0;
    for (int64_t r = op[b]; r < op[b + 1]; ++r) {
      TORCH_CHECK(0 <= bp[2 * r] && bp[2 * r] <= bp[2 * r + 1] && bp[2 * r + 1] <= P,
                  "paged_decode: a run lies outside the pool");
      length += bp[2 * r + 1] - bp[2 * r];
    }
    TORCH_CHECK(length > 0, "paged_decode: every sequence needs at least one row");
    lengths[b] = length;
    rows_total += length;
  }
  // fn(col, row) for each row of sequence b's window, col = 0, 1, ... in position order
  auto for_each_row = [&](int64_t b, auto&& fn) {
    int64_t col = 0;
    for (int64_t r = op[b]; r < op[b + 1]; ++r)
      for (int64_t row = bp[2 * r]; row < bp[2 * r + 1]; ++row, ++col) fn(col, row);
  };
  at::Tensor out = at::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  const float* kp = k_rows.data_ptr<float>();
  const float* vp = v_rows.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  const int64_t ks0 = k_rows.stride(0), ks1 = k_rows.stride(1);
  const int64_t vs0 = v_rows.stride(0), vs1 = v_rows.stride(1);
  const int64_t G = H / KVH, DV = D / LANES;
  const float fscale = static_cast<float>(scale);
  const int64_t grain = rows_total * KVH < PARALLEL_MIN_ROW_HEADS ? B * KVH : 1;

  at::parallel_for(0, B * KVH, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [G, padded]: scores, then softmax weights
    vf qv[MAX_GROUP][MAX_DIM_VECS];
    vf acc[MAX_GROUP][MAX_DIM_VECS];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH, h = item % KVH, length = lengths[b];
      const int64_t padded = (length + LANES - 1) / LANES * LANES;
      scores.assign(G * padded, 0.0f);
      const float* qh = qp + (b * H + h * G) * D;  // the G query heads of KV head h
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < DV; ++i) qv[g][i] = load(qh + g * D + i * LANES) * fscale;
      for_each_row(b, [&](int64_t col, int64_t row) {
        const float* krow = kp + h * ks0 + row * ks1;
        vf kv[MAX_DIM_VECS];
        for (int64_t i = 0; i < DV; ++i) kv[i] = load(krow + i * LANES);
        for (int64_t g = 0; g < G; ++g) {
          vf dot = qv[g][0] * kv[0];
          for (int64_t i = 1; i < DV; ++i) dot += qv[g][i] * kv[i];
          scores[g * padded + col] = lane_sum(dot);
        }
      });
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * padded;
        float top = s[0];
        for (int64_t i = 1; i < length; ++i) top = s[i] > top ? s[i] : top;
        for (int64_t i = 0; i < padded; i += LANES) store(s + i, exp_clamped(load(s + i) - top));
        for (int64_t i = length; i < padded; ++i) s[i] = 0.0f;  // padding weighs nothing
        vf total = vf{};
        for (int64_t i = 0; i < padded; i += LANES) total += load(s + i);
        const float inverse = 1.0f / lane_sum(total);
        for (int64_t i = 0; i < padded; i += LANES) store(s + i, load(s + i) * inverse);
        for (int64_t i = 0; i < DV; ++i) acc[g][i] = vf{};
      }
      for_each_row(b, [&](int64_t col, int64_t row) {
        const float* vrow = vp + h * vs0 + row * vs1;
        vf vv[MAX_DIM_VECS];
        for (int64_t i = 0; i < DV; ++i) vv[i] = load(vrow + i * LANES);
        for (int64_t g = 0; g < G; ++g) {
          const vf weight = splat(scores[g * padded + col]);
          for (int64_t i = 0; i < DV; ++i) acc[g][i] += weight * vv[i];
        }
      });
      float* o = outp + (b * H + h * G) * D;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < DV; ++i) store(o + g * D + i * LANES, acc[g][i]);
    }
  });
  return out;
}
}  // namespace ringserve

TORCH_LIBRARY(ringserve, m) {
  m.def("paged_decode(Tensor q, Tensor k_rows, Tensor v_rows, Tensor run_bounds, "
        "Tensor seq_offsets, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ringserve, CPU, m) { m.impl("paged_decode", &ringserve::paged_decode); }
