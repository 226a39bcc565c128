// The kernels one source file calls from another (model/csrc/decode_layer.cpp runs a whole
// decoder layer through the others). Built together into one library by model/cpu_kernels.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace ringserve {
// model/csrc/paged_decode.cpp
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_rows, const at::Tensor& v_rows,
                        const at::Tensor& run_bounds, const at::Tensor& seq_offsets,
                        double scale);
// model/csrc/group_linear.cpp
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d,
                       const at::Tensor& m);
}  // namespace ringserve

// 16-float vectors (GCC / Clang vector extensions) and the helpers the kernels share
namespace ringserve::simd {
constexpr int LANES = 16;

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
typedef float vf2 __attribute__((vector_size(2 * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }

// the lanes' sum by a fixed tree (halves, quarters, ...): the same order on every call
inline float lane_sum(vf v) {
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) +
                __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const vf2 c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
  return c[0] + c[1];
}

// exp(x) lane by lane: 2^n p(r), r = x - n ln2 (ln2 in two parts), p the degree-6
// Taylor-fitted polynomial of Cephes' expf (relative error ~2e-7); x is clamped to
// [-87, 88] (exp ~1.6e-38 .. 1.7e38: attention's scores minus their max are <= 0, and a
// weight of 1e-38 vanishes beside the max's 1; SiLU's 1 + exp(-x) saturates)
inline vf exp_clamped(vf x) {
  const vf lowest = splat(-87.0f), highest = splat(88.0f);
  x = x < lowest ? lowest : x;
  x = x > highest ? highest : x;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504088896341f + shifter) - shifter;
  vf r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = splat(1.98756912e-4f);
  p = p * r + 1.39819730e-3f;
  p = p * r + 8.33345205e-3f;
  p = p * r + 4.16657962e-2f;
  p = p * r + 1.66666657e-1f;
  p = p * r + 5.0e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}
}  // namespace ringserve::simd
