// Weight-only group-quantized linears on CPU, x @ W^T with fp32 activations and results.
// Built and loaded by model/cpu_kernels.py; model/int4.py (KernelInt4) and model/q8.py
// (Q8Weight) pack the weights.
//
// ringserve::int4_linear(x, codes, d, m): x [M, K] fp32; codes [N / 16, K / 2, 16] uint8:
// output block b, input pair p, byte j holds output 16 b + j's codes of inputs 2 p (low
// nibble) and 2 p + 1 (high nibble); d, m [N / 16, K / 32, 16] fp16: per output and group of
// 32 inputs, W = d * code + m (GGUF Q4_1's own form: a Q4_1 file's d and m are fp16, so its
// weights come through exactly). Returns [M, N] fp32. Each output is summed group by group as
// d * (sum of x[k] code[k]) + m * (sum of x[k]), the group's sums over k = 0, 1, ... in order:
// the codes are widened to floats once per input and no weight is dequantized (at batch 1 the
// widening is the work: this form takes 0.66-0.75x the time of dequantizing d code + m).
//
// ringserve::q8_linear(x, codes, d): codes [N / 16, K, 16] int8 (block b, input k, byte j:
// output 16 b + j), d [N / 16, K / 32, 16] fp16, W = d * code (GGUF Q8_0's form, exact too);
// each output is the sum over k = 0, 1, ..., K - 1 of x[k] * (d code) in that order.
//
// Both in fp32, whatever M is and whichever thread computes it: a row's result is bit for bit
// the same alone or in any batch. Vectorised over 16 outputs; the codes of an input serve
// every row of a tile of rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ringserve_kernels.h"

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {
constexpr int LANES = 16;
constexpr int GROUP = 32;
constexpr int MAX_TILE = 16;  // rows sharing one dequantisation (q8)
constexpr int INT4_MAX_TILE = 8;  // rows sharing one widening of int4 codes (two sums each)

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef _Float16 vh __attribute__((vector_size(LANES * sizeof(_Float16))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

// 16 fp16 values as floats (F16C / AVX-512 conversions where the compiler targets them)
inline vf load_half(const void* p) {
  vf v;
#if defined(__AVX512F__)
  const __m512 r = _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  std::memcpy(&v, &r, sizeof(v));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p) + 1));
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
#else
  vh h;
  std::memcpy(&h, p, sizeof(h));
  v = __builtin_convertvector(h, vf);
#endif
  return v;
}

// 16 bytes as 16 int32 lanes
inline vi bytes_at(const uint8_t* p) {
  vi v;
#if defined(__AVX512F__)
  const __m512i r = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &r, sizeof(v));
#else
  for (int j = 0; j < LANES; ++j) v[j] = p[j];
#endif
  return v;
}

// the 16 int8 codes of one input for one block of 16 outputs, as floats -128..127
inline vf int8_codes_at(const int8_t* p) {
  vf v;
#if defined(__AVX512F__)
  const __m512 r = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&v, &r, sizeof(v));
#else
  for (int j = 0; j < LANES; ++j) v[j] = static_cast<float>(p[j]);
#endif
  return v;
}

// Q8_0 form: 16 outputs' weights of input k are d * code
struct Q8Block {
  const int8_t* codes;  // [K, 16]
  const at::Half* d;    // [K / 32, 16]
  vf scale;
  void group(int64_t g) { scale = load_half(d + g * LANES); }
  vf weight(int64_t k) const { return int8_codes_at(codes + k * LANES) * scale; }
};

template <int TILE, class Block>
void block_tile(const float* x, int64_t K, Block block, float* out, int64_t N) {
  vf acc[TILE];
  for (int r = 0; r < TILE; ++r) acc[r] = vf{};
  const int64_t groups = K / GROUP;
  for (int64_t g = 0; g < groups; ++g) {
    block.group(g);
    for (int64_t kk = 0; kk < GROUP; ++kk) {
      const int64_t k = g * GROUP + kk;
      const vf w = block.weight(k);
      for (int r = 0; r < TILE; ++r) acc[r] += x[r * K + k] * w;
    }
  }
  for (int r = 0; r < TILE; ++r) std::memcpy(out + r * N, &acc[r], sizeof(vf));
}

// int4: tile of TILE rows x one block of 16 outputs. xsum [TILE, K / 32]: each row's group sums.
template <int TILE>
void int4_tile(const float* x, const float* xsum, int64_t K, const uint8_t* codes,
               const at::Half* d, const at::Half* m, float* out, int64_t N) {
  vf acc[TILE];
  for (int r = 0; r < TILE; ++r) acc[r] = vf{};
  const int64_t groups = K / GROUP;
  for (int64_t g = 0; g < groups; ++g) {
    vf part[TILE];  // sum of x[k] code[k] over the group so far
    for (int r = 0; r < TILE; ++r) part[r] = vf{};
    const uint8_t* group_codes = codes + g * (GROUP / 2) * LANES;
    for (int64_t pair = 0; pair < GROUP / 2; ++pair) {
      const vi both = bytes_at(group_codes + pair * LANES);
      const vf even = __builtin_convertvector(both & 15, vf);
      const vf odd = __builtin_convertvector(both >> 4, vf);
      const int64_t k = g * GROUP + 2 * pair;
      for (int r = 0; r < TILE; ++r) {
        part[r] += x[r * K + k] * even;
        part[r] += x[r * K + k + 1] * odd;
      }
    }
    const vf scale = load_half(d + g * LANES), low = load_half(m + g * LANES);
    for (int r = 0; r < TILE; ++r) {
      acc[r] += part[r] * scale;
      acc[r] += low * xsum[r * groups + g];
    }
  }
  for (int r = 0; r < TILE; ++r) std::memcpy(out + r * N, &acc[r], sizeof(vf));
}

using Int4TileFn = void (*)(const float*, const float*, int64_t, const uint8_t*,
                            const at::Half*, const at::Half*, float*, int64_t);

template <int... T>
Int4TileFn int4_tile_fn(int tile, std::integer_sequence<int, T...>) {
  static constexpr Int4TileFn table[] = {int4_tile<T + 1>...};
  return table[tile - 1];
}

template <class Block>
using TileFn = void (*)(const float*, int64_t, Block, float*, int64_t);

template <class Block, int... T>
TileFn<Block> tile_fn(int tile, std::integer_sequence<int, T...>) {
  static constexpr TileFn<Block> table[] = {block_tile<T + 1, Block>...};
  return table[tile - 1];
}

// x [M, K] @ W^T -> [M, N] over N / 16 blocks, each block's weights from make_block(b)
template <class Block, class MakeBlock>
at::Tensor run_blocks(const at::Tensor& x, int64_t blocks, MakeBlock make_block) {
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = blocks * LANES;
  at::Tensor out = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // ~16 K weights a block: a few blocks per task keep a thread's fork worth its work
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t r0 = 0; r0 < M; r0 += MAX_TILE) {
        const int tile = static_cast<int>(std::min<int64_t>(MAX_TILE, M - r0));
        tile_fn<Block>(tile, std::make_integer_sequence<int, MAX_TILE>{})(
            xp + r0 * K, K, make_block(b), op + r0 * N + b * LANES, N);
      }
    }
  });
  return out;
}

// x [M, K] fp32 and codes [N / 16, K / inputs_per_row, 16] (int4 packs two inputs a byte)
void check_x(const at::Tensor& x, const at::Tensor& codes, int64_t inputs_per_row,
             const char* op) {
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, op, ": x [M, K] float32");
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == LANES && codes.is_contiguous(), op,
              ": codes [N / 16, K", inputs_per_row > 1 ? " / 2" : "", ", 16], contiguous");
  TORCH_CHECK(codes.size(1) * inputs_per_row == x.size(1) && x.size(1) % GROUP == 0, op,
              ": x and codes disagree on K (a multiple of 32)");
}

void check_scales(const at::Tensor& t, const at::Tensor& codes, int64_t K, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.dim() == 3 &&
              t.size(0) == codes.size(0) && t.size(1) == K / GROUP && t.size(2) == LANES, op,
              ": scales [N / 16, K / 32, 16] float16, contiguous");
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d) {
  check_x(x, codes, 1, "q8_linear");
  TORCH_CHECK(codes.scalar_type() == at::kChar, "q8_linear: codes int8");
  check_scales(d, codes, x.size(1), "q8_linear");
  const int64_t K = x.size(1);
  const int8_t* cp = codes.data_ptr<int8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  return run_blocks<Q8Block>(x, codes.size(0), [&](int64_t b) {
    return Q8Block{cp + b * K * LANES, dp + b * (K / GROUP) * LANES, vf{}};
  });
}

}  // namespace

at::Tensor ringserve::int4_linear(const at::Tensor& x, const at::Tensor& codes,
                                  const at::Tensor& d, const at::Tensor& m) {
  check_x(x, codes, 2, "int4_linear");
  TORCH_CHECK(codes.scalar_type() == at::kByte, "int4_linear: codes uint8");
  const int64_t K = x.size(1), groups = K / GROUP, blocks = codes.size(0);
  check_scales(d, codes, K, "int4_linear");
  check_scales(m, codes, K, "int4_linear");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), N = blocks * LANES;
  at::Tensor out = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  std::vector<float> xsum(M * groups);  // each row's sum over each group, k in order
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float total = 0.0f;
      for (int64_t k = 0; k < GROUP; ++k) total += xp[r * K + g * GROUP + k];
      xsum[r * groups + g] = total;
    }
  float* op = out.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t r0 = 0; r0 < M; r0 += INT4_MAX_TILE) {
        const int tile = static_cast<int>(std::min<int64_t>(INT4_MAX_TILE, M - r0));
        int4_tile_fn(tile, std::make_integer_sequence<int, INT4_MAX_TILE>{})(
            xp + r0 * K, xsum.data() + r0 * groups, K, cp + b * (K / 2) * LANES,
            dp + b * groups * LANES, mp + b * groups * LANES, op + r0 * N + b * LANES, N);
      }
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(ringserve, lib) {
  lib.def("int4_linear(Tensor x, Tensor codes, Tensor d, Tensor m) -> Tensor");
  lib.def("q8_linear(Tensor x, Tensor codes, Tensor d) -> Tensor");
}

TORCH_LIBRARY_IMPL(ringserve, CPU, lib) {
  lib.impl("int4_linear", &ringserve::int4_linear);
  lib.impl("q8_linear", &q8_linear);
}
