// Weight-only group-quantized linears on CPU, x @ W^T with fp32 activations and results.
// Built and loaded by model/cpu_kernels.py; model/int4.py (KernelInt4, KernelQ8) packs the
// weights.
//
// ringserve::int4_linear(x, codes, d, m): x [M, K] fp32; codes [N / 16, K, 8] uint8: output
// block b, input k, byte j holds the codes of outputs 16 b + j (low nibble) and 16 b + j + 8
// (high nibble); d, m [N / 16, K / 32, 16] fp16: per output and group of 32 inputs,
// W = d * code + m (GGUF Q4_1's own form: a Q4_1 file's d and m are fp16, so its weights come
// through exactly). Returns [M, N] fp32.
//
// ringserve::q8_linear(x, codes, d): codes [N / 16, K, 16] int8 (block b, input k, byte j:
// output 16 b + j), d [N / 16, K / 32, 16] fp16, W = d * code (GGUF Q8_0's form, exact too).
//
// Each output is sum over k = 0, 1, ..., K - 1 of x[k] * (d code + m) in that order, in fp32,
// whatever M is and whichever thread computes it: a row's result is bit for bit the same
// alone or in any batch. Vectorised over 16 outputs; the dequantised 16 weights of an input
// serve every row of a tile of up to 16 rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ringserve_kernels.h"

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <utility>

namespace {
constexpr int LANES = 16;
constexpr int GROUP = 32;
constexpr int MAX_TILE = 16;  // rows sharing one dequantisation

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef _Float16 vh __attribute__((vector_size(LANES * sizeof(_Float16))));
typedef uint8_t vb8 __attribute__((vector_size(8)));
typedef uint8_t vb16 __attribute__((vector_size(16)));

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

// the 16 codes of one input for one block of 16 outputs, as floats 0..15
inline vf codes_at(const uint8_t* p) {
  vf v;
#if defined(__AVX2__)
  const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  // bytes 0..7: low nibbles, 8..15: high nibbles (a 16-bit shift, then the mask drops the
  // bits that crossed from the neighbouring byte)
  const __m128i both = _mm_and_si128(_mm_unpacklo_epi64(packed, _mm_srli_epi16(packed, 4)),
                                     _mm_set1_epi8(15));
#if defined(__AVX512F__)
  const __m512 r = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(both));
  std::memcpy(&v, &r, sizeof(v));
#else
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(both));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(both, 8)));
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
#endif
#else
  vb8 packed;
  std::memcpy(&packed, p, sizeof(packed));
  const vb16 both = __builtin_shufflevector(packed, packed, 0, 1, 2, 3, 4, 5, 6, 7,
                                            0, 1, 2, 3, 4, 5, 6, 7);
  const vb16 shift = {0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4};
  v = __builtin_convertvector((both >> shift) & 15, vf);
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

// Q4_1 form: 16 outputs' weights of input k are d * code + m
struct Int4Block {
  const uint8_t* codes;  // [K, 8]
  const at::Half* d;     // [K / 32, 16]
  const at::Half* m;
  vf scale, low;
  void group(int64_t g) { scale = load_half(d + g * LANES); low = load_half(m + g * LANES); }
  vf weight(int64_t k) const { return codes_at(codes + k * 8) * scale + low; }
};

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

void check_x(const at::Tensor& x, const at::Tensor& codes, int64_t code_bytes, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, op, ": x [M, K] float32");
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == code_bytes && codes.is_contiguous(), op,
              ": codes [N / 16, K, ", code_bytes, "], contiguous");
  TORCH_CHECK(codes.size(1) == x.size(1) && x.size(1) % GROUP == 0, op,
              ": x and codes disagree on K (a multiple of 32)");
}

void check_scales(const at::Tensor& t, const at::Tensor& codes, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.dim() == 3 &&
              t.size(0) == codes.size(0) && t.size(1) == codes.size(1) / GROUP &&
              t.size(2) == LANES, op, ": scales [N / 16, K / 32, 16] float16, contiguous");
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d) {
  check_x(x, codes, LANES, "q8_linear");
  TORCH_CHECK(codes.scalar_type() == at::kChar, "q8_linear: codes int8");
  check_scales(d, codes, "q8_linear");
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
  check_x(x, codes, 8, "int4_linear");
  TORCH_CHECK(codes.scalar_type() == at::kByte, "int4_linear: codes uint8");
  check_scales(d, codes, "int4_linear");
  check_scales(m, codes, "int4_linear");
  const int64_t K = x.size(1);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  return run_blocks<Int4Block>(x, codes.size(0), [&](int64_t b) {
    const int64_t g = b * (K / GROUP) * LANES;
    return Int4Block{cp + b * K * 8, dp + g, mp + g, vf{}, vf{}};
  });
}

TORCH_LIBRARY_FRAGMENT(ringserve, lib) {
  lib.def("int4_linear(Tensor x, Tensor codes, Tensor d, Tensor m) -> Tensor");
  lib.def("q8_linear(Tensor x, Tensor codes, Tensor d) -> Tensor");
}

TORCH_LIBRARY_IMPL(ringserve, CPU, lib) {
  lib.impl("int4_linear", &ringserve::int4_linear);
  lib.impl("q8_linear", &q8_linear);
}
