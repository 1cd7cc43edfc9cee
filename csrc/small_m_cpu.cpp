// Fused dequantize-and-multiply for a few rows of x (token-by-token decoding, M <= 16):
//   y = x W^T + scaling * (x A^T) B^T + bias, W in the int8 / int4 / NF4 layouts of
//   qlora_kernels/formats/tensor.py, decoded in registers and never written out.
//
// At small M the matmul is bound by reading W: a packed 4-bit weight is ~3.9x fewer bytes than
// bf16, so decoding it while multiplying beats a dense GEMV. Every 4-bit format is a table
// lookup: a group's 16 possible values (NF4 level * absmax, (q - 8) * s, or q * s + m, computed
// with the reference's fp32 operations, so they equal the reference's decoded weights bit for
// bit) fit one 512-bit register, and `vpermps` turns 16 codes into 16 weights at once. The
// codes of a byte are (even, odd) columns, so x is reordered once per call into "even columns,
// then odd columns" per vector, and the packed bytes need no shuffling.
//
// The AVX-512 micro-kernels work on tiles of up to 4 weight rows times up to 8 rows of x: each
// x vector loaded serves every row of the tile, each decoded weight vector every row of x. The
// packed weight is prefetched a few KB ahead (one core cannot keep enough misses in flight by
// itself to read DRAM at full speed).
//
// Accumulation is fp32 (FMA) in a fixed order. Rows of W (N) are split across threads with
// at::parallel_for in whole 4-row tiles, so each output is computed by one thread with the same
// instructions whatever the thread count: results do not depend on it. The LoRA side path runs in
// the same call: x A^T is computed once (and returned, the autograd function saves it), and B's
// row is added in each output's epilogue, followed by the bias.
//
// Instruction sets, chosen at run time (the library's baseline is x86-64-v2): AVX-512
// (vpermps over 16 lanes), AVX2 (two 8-lane vpermps and a blend, one weight row at a time), and a
// portable scalar path, all with exact fp32 products. "avx512_bf16" adds, for bf16 x and the 4-bit
// formats, bf16 dot products (vdpbf16ps) on weights decoded to bf16 with vpermw: half the vector
// instructions per weight (one core was bound by issuing them, not by memory). It rounds
// the decoded weight to bf16, as the dense bf16 path does, so it runs only when asked for (the
// Python layer asks for bf16 inputs where the CPU compute-dtype policy is bf16). Not used: VNNI,
// which would need x quantized to int8.
//
// Operators (schemas in TORCH_LIBRARY_FRAGMENT below):
//   qlora_kernels::qlora_small_m(x, format, data, scales, mins?, levels?, nested_code?, absmax_scales?,
//                                absmax_offset?, group_size, lora_a?, lora_b?, scaling, bias?, isa)
//       -> (y (..., N) in x's dtype, xa = x A^T (..., r) fp32; (..., 0) without LoRA), x (..., K)
//   qlora_kernels::small_m_isa() -> "avx512_bf16" | "avx512" | "avx2" | "scalar" (this CPU's best)
//   qlora_kernels::set_small_m_task_macs(macs) -> the previous value (how much work a thread gets)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define QK_X86 1
#define QK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define QK_AVX2 __attribute__((target("avx2,fma")))
#define QK_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
// Helpers of the micro-kernels must inline, or their accumulators go through memory.
#define QK_INLINE inline __attribute__((always_inline))
#else
#define QK_X86 0
#endif

namespace qlora_kernels {
namespace {

constexpr int64_t kNestedBlock = 256;     // NF4 absmax values per fp32 scale (formats.NESTED_BLOCK)
// Multiply-adds below which a task is not worth another thread; set by the Python layer from the
// OpenMP wait policy (set_small_m_task_macs). Sleeping threads (OMP_WAIT_POLICY=PASSIVE): 2^20, about
// 40 us on one core, the order of a wake-up, so SmolLM2-sized layers (<= 576 x 1536) run on one
// thread while decoding and 4096 x 4096 still splits 16 ways. Spinning threads: 2^16.
std::atomic<int64_t> g_min_macs_per_task{int64_t{1} << 20};
constexpr int64_t kChunk = 32;            // weights per 16 packed bytes; every 4-bit group is a multiple
constexpr int64_t kTileRows = 4;          // weight rows per tile (the largest tile of the micro-kernels)
constexpr int64_t kGroupRows = 16;        // weight rows that share a block of x (a multiple of kTileRows)
constexpr int64_t kXBlockBytes = 24 * 1024;  // a block of x this large stays in L1 (48 KB on Zen 5)
// How far ahead in the packed weight to prefetch: rows are back to back, so this reaches the
// next tiles' rows (8 KB: measured best of 1-16 KB, 1.5x over none for 4096x4096 at M = 1).
constexpr int64_t kPrefetchBytes = 8192;
// How far ahead to prefetch LoRA B's rows (read once per output row, in the epilogue).
constexpr int64_t kLoraPrefetchRows = 16;

enum class Isa { kScalar, kAvx2, kAvx512, kAvx512Bf16 };

// A zero-filled buffer aligned to a cache line, so no vector load of it splits two lines.
template <typename T>
class Aligned {
 public:
  explicit Aligned(int64_t count = 0) { resize(count); }
  void resize(int64_t count) {
    const size_t bytes = ((std::max<int64_t>(count, 1) * sizeof(T) + 63) / 64) * 64;
    data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(data_ != nullptr, "qlora_small_m: out of memory allocating ", bytes, " bytes");
    std::memset(data_.get(), 0, bytes);
  }
  T* data() { return data_.get(); }
  T& operator[](int64_t i) { return data_.get()[i]; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
};
using Floats = Aligned<float>;

#if QK_X86
Isa detect_isa() {
  __builtin_cpu_init();  // may run before libgcc's own initialiser
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kScalar;
}
#else
Isa detect_isa() { return Isa::kScalar; }
#endif
const Isa kBestIsa = detect_isa();

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// "auto" is the best exact path: the bf16 dot products round the decoded weights to bf16, so
// they run only when asked for ("avx512_bf16", which the Python layer passes for bf16 inputs
// when the CPU compute-dtype policy is bf16).
Isa parse_isa(const std::string& name) {
  if (name == "auto") return std::min(kBestIsa, Isa::kAvx512);
  Isa want;
  if (name == "avx512_bf16") want = Isa::kAvx512Bf16;
  else if (name == "avx512") want = Isa::kAvx512;
  else if (name == "avx2") want = Isa::kAvx2;
  else if (name == "scalar") want = Isa::kScalar;
  else TORCH_CHECK_VALUE(false, "qlora_small_m: isa must be 'auto', 'avx512_bf16', 'avx512', 'avx2' or 'scalar', got '", name, "'");
  TORCH_CHECK_VALUE(static_cast<int>(want) <= static_cast<int>(kBestIsa), "qlora_small_m: isa='", name,
                    "' is not supported by this CPU (best: '", isa_name(kBestIsa), "'); pass isa='auto'");
  return want;
}

// ------------------------------------------------------------------------- the problem
enum class Layout { kInt8, kInt4Affine, kInt4Symmetric, kNf4, kNf4DoubleQuant };

struct Problem {
  Layout layout;
  int64_t m, n, k, group;
  // weight
  const int8_t* q8 = nullptr;            // int8 codes (N, K)
  const uint8_t* q4 = nullptr;           // packed 4-bit codes (N, K/2)
  const float* row_scales = nullptr;     // int8 (N,)
  const c10::Half* half_scales = nullptr;  // int4 (N, K/G)
  const c10::Half* half_mins = nullptr;    // int4 affine (N, K/G)
  const float* absmax = nullptr;         // nf4 (N*K/G,)
  const uint8_t* absmax_codes = nullptr;   // nf4 double quant (N*K/G,)
  const float* nested_code = nullptr;      // (256,)
  alignas(64) uint16_t nested_low[256] = {};   // nested_code's bits 0-15 and 16-31 (the AVX-512 lookup)
  alignas(64) uint16_t nested_high[256] = {};
  const float* absmax_scales = nullptr;    // (ceil(N*K/G / 256),)
  float absmax_offset = 0.0f;
  alignas(64) float base[16] = {};  // a code's value before the group scale: NF4 level, q - 8 or q
  bool has_offset = false;          // int4 affine: + min after the scale
  // activations
  const float* x = nullptr;   // (M, K) fp32
  const float* xp = nullptr;  // (M, K) fp32, columns reordered per vector (4-bit formats, SIMD paths)
  const uint16_t* xb = nullptr;  // bf16 bits of x, pass by pass and chunk by chunk (reorder_bf16)
  // LoRA
  int64_t r = 0;
  const float* xa_scaled = nullptr;  // (M, r): scaling * x A^T
  const float* lora_b = nullptr;     // (N, r)
  // epilogue
  const float* bias = nullptr;  // (N,) fp32, or none
  float* out = nullptr;         // (M, N) fp32

  int64_t groups() const { return k / group; }
  bool four_bit() const { return layout != Layout::kInt8; }
};

// The fp32 scale (and int4 affine's min) of `count` consecutive groups from group index `first`
// (row r's groups are r * K/G ... (r + 1) * K/G - 1), with the reference's operations.
void group_params(const Problem& p, int64_t first, int64_t count, float* scale, float* offset) {
  switch (p.layout) {
    case Layout::kInt4Affine:
      for (int64_t g = 0; g < count; ++g) offset[g] = static_cast<float>(p.half_mins[first + g]);
      [[fallthrough]];
    case Layout::kInt4Symmetric:
      for (int64_t g = 0; g < count; ++g) scale[g] = static_cast<float>(p.half_scales[first + g]);
      break;
    case Layout::kNf4:
      std::memcpy(scale, p.absmax + first, count * sizeof(float));
      break;
    case Layout::kNf4DoubleQuant:
      // Reference: absmax = dynamic[code] * absmax_scales[block // 256] + absmax_offset.
      for (int64_t g = 0; g < count; ++g) {
        const int64_t b = first + g;
        const float scaled = p.nested_code[p.absmax_codes[b]] * p.absmax_scales[b / kNestedBlock];
        scale[g] = scaled + p.absmax_offset;
      }
      break;
    case Layout::kInt8: break;
  }
}

// Split the sum of M rows into passes of at most `most` rows, as even as possible.
inline int pass_rows(int64_t m, int64_t m0, int most) {
  const int64_t passes = (m + most - 1) / most;
  const int64_t per = (m + passes - 1) / passes;
  return static_cast<int>(std::min<int64_t>(per, m - m0));
}

// ------------------------------------------------------------------------------ scalar
// The portable path: plain loops, one accumulator, the same decoded values.
void rows_scalar(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t k = p.k;
  const int64_t groups = p.four_bit() ? p.groups() : 0;
  Floats scale(groups), offset(groups), tables(groups * 16);
  for (int64_t row = r0; row < r1; ++row) {
    if (p.four_bit()) {
      group_params(p, row * groups, groups, scale.data(), offset.data());
      for (int64_t g = 0; g < groups; ++g)
        for (int i = 0; i < 16; ++i) {
          const float v = p.base[i] * scale[g];
          tables[g * 16 + i] = p.has_offset ? v + offset[g] : v;
        }
    }
    for (int64_t i = 0; i < p.m; ++i) {
      const float* x = p.x + i * k;
      float acc = 0.0f;
      if (p.four_bit()) {
        const uint8_t* q = p.q4 + row * (k / 2);
        const int64_t group = p.group;
        for (int64_t j0 = 0; j0 < k; j0 += group) {
          const float* t = tables.data() + (j0 / group) * 16;
          for (int64_t j = j0; j < j0 + group; j += 2) {
            acc += t[q[j / 2] >> 4] * x[j];
            acc += t[q[j / 2] & 0x0F] * x[j + 1];
          }
        }
      } else {
        const int8_t* q = p.q8 + row * k;
        for (int64_t j = 0; j < k; ++j) acc += static_cast<float>(q[j]) * x[j];
        acc *= p.row_scales[row];
      }
      for (int64_t j = 0; j < p.r; ++j) acc += p.xa_scaled[i * p.r + j] * p.lora_b[row * p.r + j];
      if (p.bias) acc += p.bias[row];
      p.out[i * p.n + row] = acc;
    }
  }
}

float dot_scalar(const float* a, const float* b, int64_t k) {
  float acc = 0.0f;
  for (int64_t j = 0; j < k; ++j) acc += a[j] * b[j];
  return acc;
}

#if QK_X86
// ----------------------------------------------------------------------------- AVX-512
// 16 lanes; x is reordered per 32 columns as [16 even columns | 16 odd columns], matching the
// high / low nibbles of 16 consecutive packed bytes. The micro-kernels compute a tile of R
// consecutive weight rows times MT rows of x, so each x vector loaded serves R rows and each
// decoded weight vector MT rows; U chunks are in flight, R * MT * U <= 8 (two accumulators each).
constexpr int kMaxRowsAvx512 = 8;

// Weight rows per tile for MT rows of x (at most 16 accumulators).
constexpr int tile_rows_avx512(int mt) { return mt <= 2 ? 4 : mt <= 4 ? 2 : 1; }
// Chunks in flight: enough independent accumulators (>= 8) to hide the FMA latency.
constexpr int unroll_avx512(int r, int mt) { return r * mt >= 4 ? 1 : r * mt == 2 ? 2 : 4; }

// Pairwise sum of COUNT vectors in a fixed order (unrolled at compile time, so they stay in registers).
template <int COUNT>
QK_AVX512 QK_INLINE __m512 tree_sum(const __m512* v) {
  if constexpr (COUNT == 1) {
    return v[0];
  } else {
    return _mm512_add_ps(tree_sum<COUNT / 2>(v), tree_sum<COUNT - COUNT / 2>(v + COUNT / 2));
  }
}

// The 16 values of group g: base * scale (+ min), the reference's fp32 operations.
QK_AVX512 QK_INLINE __m512 group_table(__m512 base, const float* scale, const float* offset, int64_t g) {
  const __m512 t = _mm512_mul_ps(base, _mm512_set1_ps(scale[g]));
  return offset ? _mm512_add_ps(t, _mm512_set1_ps(offset[g])) : t;
}

// One 32-column chunk of R weight rows (16 packed bytes each, `stride` bytes apart) times MT
// rows of x, into acc[r][i][0 / 1] (even / odd columns).
template <int R, int MT>
QK_AVX512 QK_INLINE void chunk4_avx512(const uint8_t* q, int64_t stride, const __m512* table, const float* xp,
                                    int64_t ldx, __m512 (*acc)[MT][2]) {
  __m512 xe[MT], xo[MT];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i) {
    xe[i] = _mm512_loadu_ps(xp + i * ldx);
    xo[i] = _mm512_loadu_ps(xp + i * ldx + 16);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * stride)));
    // vpermps reads the low 4 bits of each index: the high nibble needs a shift, the low none.
    const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table[r]);
    const __m512 odd = _mm512_permutexvar_ps(codes, table[r]);
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
      acc[r][i][0] = _mm512_fmadd_ps(even, xe[i], acc[r][i][0]);
      acc[r][i][1] = _mm512_fmadd_ps(odd, xo[i], acc[r][i][1]);
    }
  }
}

// Accumulates chunks c0 .. c1 - 1 of a tile's 4-bit weight rows times MT rows of x into `state`
// (U chunks in flight, two accumulators each); CPG chunks per group (group_size / 32). Steps of
// BLOCK chunks build each group's table once; c0 must be a multiple of BLOCK, so splitting K into
// blocks changes nothing in the order of any sum. scale / offset hold the tile's groups row
// after row (`groups` per row).
template <int R, int MT, int CPG>
QK_AVX512 QK_INLINE void dot4_range_avx512(const uint8_t* q, int64_t stride, __m512 base, const float* scale,
                                           const float* offset, int64_t groups, const float* xp, int64_t ldx,
                                           int64_t c0, int64_t c1, __m512 (*state)[R][MT][2]) {
  constexpr int U = unroll_avx512(R, MT);
  constexpr int BLOCK = U > CPG ? U : CPG;
  __m512 acc[U][R][MT][2];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MT; ++i) acc[u][r][i][0] = state[u][r][i][0], acc[u][r][i][1] = state[u][r][i][1];
  __m512 table[R];
  int64_t c = c0;
  for (; c + BLOCK <= c1; c += BLOCK) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(q + r * stride + c * 16 + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int g = 0; g < BLOCK / CPG; ++g) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        table[r] = group_table(base, scale + r * groups, offset ? offset + r * groups : nullptr, c / CPG + g);
#pragma GCC unroll 8
      for (int j = 0; j < CPG; ++j) {
        const int64_t cc = c + g * CPG + j;
        chunk4_avx512<R, MT>(q + cc * 16, stride, table, xp + cc * kChunk, ldx, acc[(g * CPG + j) % U]);
      }
    }
  }
  for (; c < c1; ++c) {
    for (int r = 0; r < R; ++r)
      table[r] = group_table(base, scale + r * groups, offset ? offset + r * groups : nullptr, c / CPG);
    chunk4_avx512<R, MT>(q + c * 16, stride, table, xp + c * kChunk, ldx, acc[0]);
  }
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MT; ++i) state[u][r][i][0] = acc[u][r][i][0], state[u][r][i][1] = acc[u][r][i][1];
}

// The accumulators of a tile summed in a fixed order: sums[r][i] = x_i . W_r.
template <int R, int MT>
QK_AVX512 QK_INLINE void tile_sums_avx512(__m512 (*state)[R][MT][2], __m512 (*sums)[MT]) {
  constexpr int U = unroll_avx512(R, MT);
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MT; ++i) {
      __m512 all[2 * U];
      for (int u = 0; u < U; ++u) {
        all[2 * u] = state[u][r][i][0];
        all[2 * u + 1] = state[u][r][i][1];
      }
      sums[r][i] = tree_sum<2 * U>(all);
    }
}

// sums[r][i] = x_i . W_r over the whole rows of a 4-bit tile.
template <int R, int MT, int CPG>
QK_AVX512 void dot4_avx512(const uint8_t* q, int64_t stride, __m512 base, const float* scale, const float* offset,
                           int64_t groups, const float* xp, int64_t ldx, int64_t chunks, __m512 (*sums)[MT]) {
  constexpr int U = unroll_avx512(R, MT);
  __m512 state[U][R][MT][2];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MT; ++i) state[u][r][i][0] = state[u][r][i][1] = _mm512_setzero_ps();
  dot4_range_avx512<R, MT, CPG>(q, stride, base, scale, offset, groups, xp, ldx, 0, chunks, state);
  tile_sums_avx512<R, MT>(state, sums);
}

// sums[r][i] = x_i . q_r over int8 rows (the row scale is applied by the caller).
template <int R, int MT>
QK_AVX512 void dot8_avx512(const int8_t* q, int64_t stride, const float* x, int64_t ldx, int64_t k,
                           __m512 (*sums)[MT]) {
  constexpr int U = 2 * unroll_avx512(R, MT);
  __m512 acc[U][R][MT];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MT; ++i) acc[u][r][i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 * U <= k; j += 16 * U) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(q + r * stride + j + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      __m512 xv[MT];
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + j + 16 * u);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512 w = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * stride + j + 16 * u))));
#pragma GCC unroll 8
        for (int i = 0; i < MT; ++i) acc[u][r][i] = _mm512_fmadd_ps(w, xv[i], acc[u][r][i]);
      }
    }
  }
  for (; j + 16 <= k; j += 16) {
    for (int r = 0; r < R; ++r) {
      const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * stride + j));
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
      for (int i = 0; i < MT; ++i) acc[0][r][i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i * ldx + j), acc[0][r][i]);
    }
  }
  if (j < k) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (k - j)) - 1);
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, q + r * stride + j)));
      for (int i = 0; i < MT; ++i)
        acc[0][r][i] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, x + i * ldx + j), acc[0][r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MT; ++i) {
      __m512 all[U];
      for (int u = 0; u < U; ++u) all[u] = acc[u][r][i];
      sums[r][i] = tree_sum<U>(all);
    }
}

// v + B[row] . xa_scaled[i] (the LoRA term), reduced to one float.
QK_AVX512 QK_INLINE float lora_reduce_avx512(const Problem& p, int64_t row, int64_t i, __m512 v) {
  const float* b = p.lora_b + row * p.r;
  const float* xa = p.xa_scaled + i * p.r;
  int64_t j = 0;
  for (; j + 16 <= p.r; j += 16) v = _mm512_fmadd_ps(_mm512_loadu_ps(b + j), _mm512_loadu_ps(xa + j), v);
  if (j < p.r) {  // masked loads only where needed: they are slow on some cores (AMD Zen)
    const __mmask16 mask = static_cast<__mmask16>((1u << (p.r - j)) - 1);
    v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, b + j), _mm512_maskz_loadu_ps(mask, xa + j), v);
  }
  return _mm512_reduce_add_ps(v);
}

// One 16-bit half of a 256-entry table at 32 codes (16-bit lanes): four 64-entry two-register
// permutes, then pick by bits 6-7.
QK_AVX512 QK_INLINE __m512i lookup256_half_avx512(const uint16_t* half, __m512i codes, __mmask32 bit6, __mmask32 bit7) {
  __m512i part[4];
  for (int j = 0; j < 4; ++j)
    part[j] = _mm512_permutex2var_epi16(_mm512_load_si512(half + 64 * j), codes, _mm512_load_si512(half + 64 * j + 32));
  return _mm512_mask_blend_epi16(bit7, _mm512_mask_blend_epi16(bit6, part[0], part[1]),
                                 _mm512_mask_blend_epi16(bit6, part[2], part[3]));
}

// nested_code[codes] for 32 absmax codes, as two vectors of 16 floats: the table is looked up as
// two 16-bit halves, 32 lanes at a time, and the halves interleaved back into floats (about half
// the shuffles of a 16-lane fp32 lookup, which one core issued at about one group per cycle).
QK_AVX512 QK_INLINE void nested_lookup_avx512(const Problem& p, __m256i codes8, __m512* out) {
  const __m512i codes = _mm512_cvtepu8_epi16(codes8);
  const __mmask32 bit6 = _mm512_test_epi16_mask(codes, _mm512_set1_epi16(64));
  const __mmask32 bit7 = _mm512_test_epi16_mask(codes, _mm512_set1_epi16(128));
  const __m512i low = lookup256_half_avx512(p.nested_low, codes, bit6, bit7);
  const __m512i high = lookup256_half_avx512(p.nested_high, codes, bit6, bit7);
  // word 2i of float i from `low` (index i), word 2i + 1 from `high` (index 32 + i)
  const __m512i first = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                         6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
  out[0] = _mm512_castsi512_ps(_mm512_permutex2var_epi16(low, first, high));
  out[1] = _mm512_castsi512_ps(_mm512_permutex2var_epi16(low, second, high));
}

// Up to 16 elements: a plain load when all are wanted. Masked loads cost far more on some cores
// (AMD Zen: group_params spent 40% of its time on one), so they are kept for the last partial vector.
QK_AVX512 QK_INLINE __m512 load16_ps(const float* data, __mmask16 mask) {
  return mask == 0xFFFF ? _mm512_loadu_ps(data) : _mm512_maskz_loadu_ps(mask, data);
}
QK_AVX512 QK_INLINE __m256i load16_epi16(const void* data, __mmask16 mask) {
  return mask == 0xFFFF ? _mm256_loadu_si256(static_cast<const __m256i*>(data)) : _mm256_maskz_loadu_epi16(mask, data);
}

// group_params for the 4-bit formats, 16 groups at a time.
QK_AVX512 void group_params_avx512(const Problem& p, int64_t first, int64_t count, float* scale, float* offset) {
  __m512 nested[2];
  for (int64_t g = 0; g < count; g += 16) {
    const __mmask16 mask = count - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (count - g)) - 1);
    const int64_t b0 = first + g;
    if (p.layout == Layout::kNf4DoubleQuant) {
      // absmax = dynamic[code] * absmax_scales[block // 256] + absmax_offset; codes looked up 32 at a time
      if (g % 32 == 0) {
        const int64_t n = std::min<int64_t>(32, count - g);
        const __m256i codes = n == 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.absmax_codes + b0))
                                      : _mm256_maskz_loadu_epi8(static_cast<__mmask32>((1u << n) - 1), p.absmax_codes + b0);
        nested_lookup_avx512(p, codes, nested);
      }
      // 16 consecutive blocks span at most two nested blocks: pick between their two scales.
      const int64_t in_block = b0 % kNestedBlock;
      const float* nested_scale = p.absmax_scales + b0 / kNestedBlock;
      const __m512 s0 = _mm512_set1_ps(nested_scale[0]);
      const bool spans_two = in_block + std::min<int64_t>(16, count - g) > kNestedBlock;
      const __m512 s1 = spans_two ? _mm512_set1_ps(nested_scale[1]) : s0;
      const __m512i lanes = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(in_block)),
                                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      const __mmask16 second = _mm512_cmpge_epi32_mask(lanes, _mm512_set1_epi32(static_cast<int>(kNestedBlock)));
      const __m512 scaled = _mm512_mul_ps(nested[(g / 16) % 2], _mm512_mask_blend_ps(second, s0, s1));
      _mm512_mask_storeu_ps(scale + g, mask, _mm512_add_ps(scaled, _mm512_set1_ps(p.absmax_offset)));
    } else if (p.layout == Layout::kNf4) {
      _mm512_mask_storeu_ps(scale + g, mask, load16_ps(p.absmax + b0, mask));
    } else {  // int4: fp16 scales (and mins) to fp32, exactly
      _mm512_mask_storeu_ps(scale + g, mask, _mm512_cvtph_ps(load16_epi16(p.half_scales + b0, mask)));
      if (p.has_offset) _mm512_mask_storeu_ps(offset + g, mask, _mm512_cvtph_ps(load16_epi16(p.half_mins + b0, mask)));
    }
  }
}

// Prefetch every cache line of `bytes` bytes from `data` into L2 (a block of rows ahead: in L1 the
// weight stream evicts it before use).
inline void prefetch_range(const void* data, int64_t bytes) {
  const auto begin = reinterpret_cast<uintptr_t>(data);
  for (uintptr_t line = begin & ~uintptr_t{63}; line < begin + bytes; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T1);
}

// Prefetch the per-group data group_params reads for groups first .. first + count - 1, so the
// next block of rows does not start with a chain of cache misses while the weight stream waits.
inline void prefetch_group_params(const Problem& p, int64_t first, int64_t count) {
  switch (p.layout) {
    case Layout::kNf4DoubleQuant: prefetch_range(p.absmax_codes + first, count); break;
    case Layout::kNf4: prefetch_range(p.absmax + first, count * 4); break;
    case Layout::kInt4Affine: prefetch_range(p.half_mins + first, count * 2); [[fallthrough]];
    case Layout::kInt4Symmetric: prefetch_range(p.half_scales + first, count * 2); break;
    case Layout::kInt8: break;
  }
}

// LoRA, bias, and the store into p.out of a tile's sums.
template <int R, int MT>
QK_AVX512 QK_INLINE void finish_tile_avx512(const Problem& p, int64_t row, int64_t m0, __m512 (*sums)[MT]) {
  if (p.r) {  // B's rows a few tiles on: a second stream the hardware prefetcher left to miss
    const char* ahead = reinterpret_cast<const char*>(p.lora_b + std::min(row + kLoraPrefetchRows, p.n - 1) * p.r);
    for (int64_t b = 0; b < R * p.r * 4; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MT; ++i) {
      float v = lora_reduce_avx512(p, row + r, m0 + i, sums[r][i]);
      if (p.bias) v += p.bias[row + r];
      p.out[(m0 + i) * p.n + row + r] = v;
    }
}

// A tile of R weight rows from `row` times MT rows of x from m0, finished into p.out.
template <int R, int MT>
QK_AVX512 void tile_avx512(const Problem& p, int64_t row, int64_t m0, const float* scale, const float* offset) {
  __m512 sums[R][MT];
  if (p.four_bit()) {
    const __m512 base = _mm512_load_ps(p.base);
    const int64_t stride = p.k / 2, groups = p.groups(), chunks = p.k / kChunk;
    const uint8_t* q = p.q4 + row * stride;
    const float* xp = p.xp + m0 * p.k;
    switch (p.group / kChunk) {
      case 1: dot4_avx512<R, MT, 1>(q, stride, base, scale, offset, groups, xp, p.k, chunks, sums); break;
      case 2: dot4_avx512<R, MT, 2>(q, stride, base, scale, offset, groups, xp, p.k, chunks, sums); break;
      case 4: dot4_avx512<R, MT, 4>(q, stride, base, scale, offset, groups, xp, p.k, chunks, sums); break;
      default: dot4_avx512<R, MT, 8>(q, stride, base, scale, offset, groups, xp, p.k, chunks, sums); break;
    }
  } else {
    dot8_avx512<R, MT>(p.q8 + row * p.k, p.k, p.x + m0 * p.k, p.k, p.k, sums);
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(p.row_scales[row + r]);
      for (int i = 0; i < MT; ++i) sums[r][i] = _mm512_mul_ps(sums[r][i], s);
    }
  }
  finish_tile_avx512<R, MT>(p, row, m0, sums);
}

// Rows `row` .. `row + rows - 1` (rows <= R) for MT rows of x: full tiles, then single rows.
template <int MT>
QK_AVX512 void pass_avx512(const Problem& p, int64_t row, int64_t rows, int64_t m0, const float* scale,
                           const float* offset) {
  constexpr int R = tile_rows_avx512(MT);
  const int64_t groups = p.four_bit() ? p.groups() : 0;
  if (rows == R) {
    tile_avx512<R, MT>(p, row, m0, scale, offset);
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    tile_avx512<1, MT>(p, row + r, m0, scale + r * groups, offset ? offset + r * groups : nullptr);
}


// Chunks per K block for MT rows of x: the block of x stays in L1 while every row of a group
// reads it (a multiple of 8, so of every BLOCK). K in one block when it fits.
inline int64_t block_chunks(int mt, int64_t chunks) {
  const int64_t fit = std::max<int64_t>(8, kXBlockBytes / (mt * kChunk * sizeof(float)) / 8 * 8);
  return chunks <= fit ? chunks : fit;
}

// The 4-bit rows `row` .. `row + rows - 1` (a multiple of R) for MT rows of x, K block by K block:
// each block of x is read from memory once for all rows instead of once per row.
template <int MT, int R>
QK_AVX512 void blocked_rows_avx512(const Problem& p, int64_t row, int64_t rows, int64_t m0, const float* scale,
                                   const float* offset, int64_t step) {
  constexpr int U = unroll_avx512(R, MT);
  const int64_t stride = p.k / 2, groups = p.groups(), chunks = p.k / kChunk;
  const __m512 base = _mm512_load_ps(p.base);
  const float* xp = p.xp + m0 * p.k;
  __m512 state[kGroupRows / R][U][R][MT][2];
  const int64_t tiles = rows / R;
  for (int64_t t = 0; t < tiles; ++t)
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < MT; ++i) state[t][u][r][i][0] = state[t][u][r][i][1] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < chunks; c0 += step) {
    const int64_t c1 = std::min(c0 + step, chunks);
    for (int64_t t = 0; t < tiles; ++t) {
      const uint8_t* q = p.q4 + (row + t * R) * stride;
      const float* sc = scale + t * R * groups;
      const float* of = offset ? offset + t * R * groups : nullptr;
      switch (p.group / kChunk) {
        case 1: dot4_range_avx512<R, MT, 1>(q, stride, base, sc, of, groups, xp, p.k, c0, c1, state[t]); break;
        case 2: dot4_range_avx512<R, MT, 2>(q, stride, base, sc, of, groups, xp, p.k, c0, c1, state[t]); break;
        case 4: dot4_range_avx512<R, MT, 4>(q, stride, base, sc, of, groups, xp, p.k, c0, c1, state[t]); break;
        default: dot4_range_avx512<R, MT, 8>(q, stride, base, sc, of, groups, xp, p.k, c0, c1, state[t]); break;
      }
    }
  }
  for (int64_t t = 0; t < tiles; ++t) {
    __m512 sums[R][MT];
    tile_sums_avx512<R, MT>(state[t], sums);
    finish_tile_avx512<R, MT>(p, row + t * R, m0, sums);
  }
}

// A group of rows for MT rows of x in K blocks: whole tiles, then the rows left one by one.
template <int MT>
QK_AVX512 void blocked_pass_avx512(const Problem& p, int64_t row, int64_t rows, int64_t m0, const float* scale,
                                   const float* offset, int64_t step) {
  constexpr int R = tile_rows_avx512(MT);
  const int64_t whole = rows / R * R, groups = p.groups();
  if (whole) blocked_rows_avx512<MT, R>(p, row, whole, m0, scale, offset, step);
  if (rows > whole)
    blocked_rows_avx512<MT, 1>(p, row + whole, rows - whole, m0, scale + whole * groups,
                               offset ? offset + whole * groups : nullptr, step);
}

// The rows `row` .. `row + rows - 1` of a group for MT = mt rows of x, in tiles of
// tile_rows_avx512(mt) rows (the last one may be shorter): Pass<MT>::run(p, first row of the tile,
// its rows, m0, its scales, its offsets).
template <template <int> class Pass>
QK_AVX512 void tiles_avx512(const Problem& p, int64_t row, int64_t rows, int64_t m0, int mt, const float* scale,
                            const float* offset) {
  const int64_t groups = p.four_bit() ? p.groups() : 0;
  const int tile = tile_rows_avx512(mt);
  for (int64_t t = 0; t < rows; t += tile) {
    const int64_t n = std::min<int64_t>(tile, rows - t);
    const float* sc = scale + t * groups;
    const float* of = offset ? offset + t * groups : nullptr;
    switch (mt) {
      case 1: Pass<1>::run(p, row + t, n, m0, sc, of); break;
      case 2: Pass<2>::run(p, row + t, n, m0, sc, of); break;
      case 3: Pass<3>::run(p, row + t, n, m0, sc, of); break;
      case 4: Pass<4>::run(p, row + t, n, m0, sc, of); break;
      case 5: Pass<5>::run(p, row + t, n, m0, sc, of); break;
      case 6: Pass<6>::run(p, row + t, n, m0, sc, of); break;
      case 7: Pass<7>::run(p, row + t, n, m0, sc, of); break;
      default: Pass<8>::run(p, row + t, n, m0, sc, of); break;
    }
  }
}

template <int MT>
struct ExactPass {
  QK_AVX512 static void run(const Problem& p, int64_t row, int64_t rows, int64_t m0, const float* scale,
                            const float* offset) {
    pass_avx512<MT>(p, row, rows, m0, scale, offset);
  }
};

QK_AVX512 void rows_avx512(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t groups = p.four_bit() ? p.groups() : 0;
  Floats scale(kGroupRows * groups), offset(kGroupRows * groups);
  for (int64_t row = r0; row < r1; row += kGroupRows) {
    const int64_t rows = std::min<int64_t>(kGroupRows, r1 - row);
    if (p.four_bit()) group_params_avx512(p, row * groups, rows * groups, scale.data(), offset.data());
    const float* off = p.has_offset ? offset.data() : nullptr;
    for (int64_t m0 = 0; m0 < p.m;) {
      const int mt = pass_rows(p.m, m0, kMaxRowsAvx512);
      const int64_t step = p.four_bit() ? block_chunks(mt, p.k / kChunk) : 0;
      if (p.four_bit() && step < p.k / kChunk) {
        switch (mt) {
          case 1: blocked_pass_avx512<1>(p, row, rows, m0, scale.data(), off, step); break;
          case 2: blocked_pass_avx512<2>(p, row, rows, m0, scale.data(), off, step); break;
          case 3: blocked_pass_avx512<3>(p, row, rows, m0, scale.data(), off, step); break;
          case 4: blocked_pass_avx512<4>(p, row, rows, m0, scale.data(), off, step); break;
          case 5: blocked_pass_avx512<5>(p, row, rows, m0, scale.data(), off, step); break;
          case 6: blocked_pass_avx512<6>(p, row, rows, m0, scale.data(), off, step); break;
          case 7: blocked_pass_avx512<7>(p, row, rows, m0, scale.data(), off, step); break;
          default: blocked_pass_avx512<8>(p, row, rows, m0, scale.data(), off, step); break;
        }
        m0 += mt;
        continue;
      }
      tiles_avx512<ExactPass>(p, row, rows, m0, mt, scale.data(), off);
      m0 += mt;
    }
  }
}

QK_AVX512 float dot_avx512(const float* a, const float* b, int64_t k) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t j = 0;
  for (; j + 64 <= k; j += 64)
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 16 * u), _mm512_loadu_ps(b + j + 16 * u), acc[u]);
  for (; j < k; j += 16) {
    const __mmask16 mask = k - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - j)) - 1);
    acc[0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + j), _mm512_maskz_loadu_ps(mask, b + j), acc[0]);
  }
  return _mm512_reduce_add_ps(tree_sum<4>(acc));
}

// ------------------------------------------------------------------------ AVX-512 BF16
// For bf16 x on a CPU with avx512_bf16, where the compute-dtype policy multiplies in bf16: each
// group's 16 values (computed in fp32 as above) are rounded to bf16 (RNE, as the dense bf16 path
// rounds its decoded weight), `vpermw` turns 32 codes into 32 bf16 weights, and `vdpbf16ps`
// multiplies pairs of them with x into fp32 accumulators (exact products, fp32 sums).
//
// A chunk is 128 columns: 64 packed bytes, loaded as 32 16-bit words. Word j holds the chunk's
// columns 4j .. 4j + 3, in bits 0-3 column 4j + 1, 4-7 column 4j, 8-11 column 4j + 3 and 12-15
// column 4j + 2 (a byte's high nibble is its even column). vpermw reads the low 5 bits of each
// word, so the word shifted by 0, 4, 8 and 12 bits looks up its four codes with no widening
// shuffle, and x is reordered per chunk to match (kNibbleColumn). Per 128 weights that is one
// 64-byte load (one cache line, one prefetch), 3 shifts, 4 vpermw and 4 vdpbf16ps; the previous
// 64-column form needed two widening shuffles more, and one core was bound by its shuffles
// (1-thread M = 1 5632x2048 in a micro-benchmark: 29 -> 35 GB/s).
//
// Lanes 0-15 of a chunk cover its columns 0-63, lanes 16-31 columns 64-127. Groups of 128 or more
// put one group's 16 values in both halves of the 32-entry table, so bit 4 of an index does not
// matter; group_size 64 puts the chunk's two groups in the two halves, and the upper lanes' index
// gets bit 4 set; group_size 32 has four groups a chunk, looked up in a 64-entry two-register table
// (vpermt2w) with the lane's group in bits 4-5. A row's last chunk may be short (K a multiple of 32,
// not of 128): 64 columns run as a half chunk (half_chunk_bf16_avx512); 32 or 96 columns as a whole
// chunk whose missing codes (the next row's bytes, or zeros under a mask for W's last row) meet
// x's zero padding, and whose missing groups repeat the row's last one.
constexpr int64_t kChunkBf16 = 128;  // weights per 64 packed bytes
constexpr int kNibbleColumn[4] = {1, 0, 3, 2};  // the column (of 4j .. 4j + 3) of a word's bits 4s .. 4s + 3
constexpr int kMaxRowsBf16 = 8;

// x's columns a chunk per row: K rounded up to whole chunks.
inline int64_t padded_k_bf16(int64_t k) { return (k + kChunkBf16 - 1) / kChunkBf16 * kChunkBf16; }

// Weight rows per tile for MT rows of x, and accumulators per (weight row, x row): at most 16.
constexpr int tile_rows_bf16(int mt) { return mt == 1 ? 4 : mt <= 4 ? 2 : 1; }
constexpr int kAccumulatorsBf16 = 2;

// A 32-entry bf16 table: lanes 0-15 from `low`, 16-31 from `high`, each rounded to bf16 (RNE).
QK_AVX512_BF16 QK_INLINE __m512i table_bf16(__m512 low, __m512 high) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));
}

// The lookup table(s) of chunk c of one row (scale / offset: that row's groups). TAIL: the row's
// last, short chunk, whose groups past the row's end repeat its last group.
template <int G, bool TAIL>
QK_AVX512_BF16 QK_INLINE void chunk_tables_bf16(__m512 base, const float* scale, const float* offset,
                                                int64_t groups, int64_t c, __m512i* table) {
  const int64_t last = TAIL ? groups - 1 : INT64_MAX;
  if constexpr (G == 32) {
    const int64_t g = 4 * c;
    table[0] = table_bf16(group_table(base, scale, offset, g), group_table(base, scale, offset, std::min(g + 1, last)));
    table[1] = table_bf16(group_table(base, scale, offset, std::min(g + 2, last)),
                          group_table(base, scale, offset, std::min(g + 3, last)));
  } else if constexpr (G == 64) {
    const int64_t g = 2 * c;
    table[0] = table_bf16(group_table(base, scale, offset, g), group_table(base, scale, offset, std::min(g + 1, last)));
  } else {
    const __m512 t = group_table(base, scale, offset, c * kChunkBf16 / G);
    table[0] = table_bf16(t, t);
  }
}

// One chunk of R weight rows (64 packed bytes each, `stride` bytes apart; `bytes` < 64 of them in
// a short chunk) times MT rows of reordered bf16 x, into acc[r][i][s % A].
template <int R, int MT, int G, int A, bool TAIL>
QK_AVX512_BF16 QK_INLINE void chunk_bf16_avx512(const uint8_t* q, int64_t stride, const __m512i (*table)[2],
                                                const uint16_t* xb, __mmask64 bytes,
                                                const uint8_t* end, __m512 (*acc)[MT][A]) {
  const __m512i low = _mm512_set1_epi16(0x0F);
  // The lane's group slot: bit 4 on the upper 16 lanes (G = 64), bits 4-5 = lane / 8 (G = 32).
  const __m512i slot =
      G == 32 ? _mm512_set_epi64(0x0030003000300030ll, 0x0030003000300030ll, 0x0020002000200020ll,
                                 0x0020002000200020ll, 0x0010001000100010ll, 0x0010001000100010ll, 0, 0)
              : _mm512_maskz_set1_epi16(0xFFFF0000u, 16);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    // A short chunk reads on into the next row (its codes meet x's zero padding) but for W's last row.
    const __m512i words = TAIL && q + r * stride + 64 > end ? _mm512_maskz_loadu_epi8(bytes, q + r * stride)
                                                            : _mm512_loadu_si512(q + r * stride);
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      __m512i idx = s ? _mm512_srli_epi16(words, 4 * s) : words;
      if constexpr (G <= 64) {
        idx = s < 3 ? _mm512_ternarylogic_epi32(idx, low, slot, 0xEA)  // (idx & 15) | slot
                    : _mm512_or_si512(idx, slot);                      // bits 12-15 shifted down: < 16
      }
      const __m512bh w = reinterpret_cast<__m512bh>(G == 32 ? _mm512_permutex2var_epi16(table[r][0], idx, table[r][1])
                                                            : _mm512_permutexvar_epi16(idx, table[r][0]));
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) {
        const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb + i * kChunkBf16 + s * 32));
        acc[r][i][s % A] = _mm512_dpbf16_ps(acc[r][i][s % A], w, xv);
      }
    }
  }
}

// A row's last 64 columns when K is an odd multiple of 64 (SmolLM2's 576): 32 packed bytes widened
// to 16-bit codes, the high nibbles (even columns) and low nibbles (odd columns) looked up apart,
// against x's last 64 columns reordered as [32 even | 32 odd] (reorder_bf16). Half the instructions
// of a 128-column chunk that is half padding (K = 576 layers: about 5% faster). The table is the short
// chunk's: for group_size 32 its halves are the two groups (columns 0-31, 32-63: lanes 0-15, 16-31),
// for larger groups the one group twice.
template <int R, int MT, int G, int A>
QK_AVX512_BF16 QK_INLINE void half_chunk_bf16_avx512(const uint8_t* q, int64_t stride, const __m512i (*table)[2],
                                                     const uint16_t* xb, __m512 (*acc)[MT][A]) {
  const __m512i slot = G == 32 ? _mm512_maskz_set1_epi16(0xFFFF0000u, 16) : _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512i codes =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * stride)));
    const __m512i even_idx = _mm512_or_si512(_mm512_srli_epi16(codes, 4), slot);
    const __m512i odd_idx = G == 32 ? _mm512_ternarylogic_epi32(codes, _mm512_set1_epi16(0x0F), slot, 0xEA) : codes;
    const __m512bh even = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(even_idx, table[r][0]));
    const __m512bh odd = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(odd_idx, table[r][0]));
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
      acc[r][i][0] =
          _mm512_dpbf16_ps(acc[r][i][0], even, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb + i * kChunkBf16)));
      acc[r][i][1] =
          _mm512_dpbf16_ps(acc[r][i][1], odd, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb + i * kChunkBf16 + 32)));
    }
  }
}

// sums[r][i] = x_i . W_r over whole 4-bit rows (K columns), x_i in reordered bf16.
template <int R, int MT, int G>
QK_AVX512_BF16 void dot4_bf16_avx512(const uint8_t* q, int64_t stride, __m512 base, const float* scale,
                                     const float* offset, int64_t groups, const uint16_t* xb, int64_t xstride,
                                     int64_t k, const uint8_t* end, __m512 (*sums)[MT]) {
  constexpr int A = kAccumulatorsBf16;
  constexpr int64_t kChunksPerTable = G > kChunkBf16 ? G / kChunkBf16 : 1;
  __m512 acc[R][MT][A];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MT; ++i)
      for (int a = 0; a < A; ++a) acc[r][i][a] = _mm512_setzero_ps();
  __m512i table[R][2];
  const auto row_scale = [&](int r) { return scale + r * groups; };
  const auto row_offset = [&](int r) { return offset ? offset + r * groups : nullptr; };
  const int64_t whole = k / kChunkBf16;
  for (int64_t c = 0; c < whole; ++c) {
    if (c % kChunksPerTable == 0) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) chunk_tables_bf16<G, false>(base, row_scale(r), row_offset(r), groups, c, table[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(q + r * stride + c * 64 + kPrefetchBytes), _MM_HINT_T0);
    chunk_bf16_avx512<R, MT, G, A, false>(q + c * 64, stride, table, xb + c * xstride, 0, end, acc);
  }
  if constexpr (G <= 64) {  // larger groups divide K into whole chunks
    if (const int64_t rest = k - whole * kChunkBf16) {
      for (int r = 0; r < R; ++r) chunk_tables_bf16<G, true>(base, row_scale(r), row_offset(r), groups, whole, table[r]);
      if (rest == kChunkBf16 / 2) {
        half_chunk_bf16_avx512<R, MT, G, A>(q + whole * 64, stride, table, xb + whole * xstride, acc);
      } else {
        const __mmask64 bytes = (__mmask64{1} << (rest / 2)) - 1;
        chunk_bf16_avx512<R, MT, G, A, true>(q + whole * 64, stride, table, xb + whole * xstride, bytes, end, acc);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MT; ++i) sums[r][i] = tree_sum<A>(acc[r][i]);
}

template <int R, int MT>
QK_AVX512_BF16 void tile_bf16_avx512(const Problem& p, int64_t row, int64_t m0, const float* scale,
                                     const float* offset) {
  __m512 sums[R][MT];
  const __m512 base = _mm512_load_ps(p.base);
  const int64_t stride = p.k / 2, groups = p.groups();
  const uint8_t* q = p.q4 + row * stride;
  const uint16_t* xb = p.xb + m0 * padded_k_bf16(p.k);  // this pass's rows (reorder_bf16)
  const int64_t xstride = MT * kChunkBf16;               // from a row's chunk to its next
  const uint8_t* end = p.q4 + p.n * stride;
  switch (p.group) {
    case 32: dot4_bf16_avx512<R, MT, 32>(q, stride, base, scale, offset, groups, xb, xstride, p.k, end, sums); break;
    case 64: dot4_bf16_avx512<R, MT, 64>(q, stride, base, scale, offset, groups, xb, xstride, p.k, end, sums); break;
    case 128: dot4_bf16_avx512<R, MT, 128>(q, stride, base, scale, offset, groups, xb, xstride, p.k, end, sums); break;
    default: dot4_bf16_avx512<R, MT, 256>(q, stride, base, scale, offset, groups, xb, xstride, p.k, end, sums); break;
  }
  finish_tile_avx512<R, MT>(p, row, m0, sums);
}

// Rows `row` .. `row + rows - 1` for MT rows of x: whole tiles, then the rows left one by one.
template <int MT>
QK_AVX512_BF16 void pass_bf16_avx512(const Problem& p, int64_t row, int64_t rows, int64_t m0, const float* scale,
                                     const float* offset) {
  constexpr int R = tile_rows_bf16(MT);
  const int64_t groups = p.groups();
  int64_t t = 0;
  for (; t + R <= rows; t += R)
    tile_bf16_avx512<R, MT>(p, row + t, m0, scale + t * groups, offset ? offset + t * groups : nullptr);
  for (; t < rows; ++t)
    tile_bf16_avx512<1, MT>(p, row + t, m0, scale + t * groups, offset ? offset + t * groups : nullptr);
}

// pass_bf16_avx512<mt>.
QK_AVX512_BF16 void pass_bf16(const Problem& p, int64_t row, int64_t rows, int64_t m0, int mt, const float* scale,
                              const float* offset) {
  switch (mt) {
    case 1: pass_bf16_avx512<1>(p, row, rows, m0, scale, offset); break;
    case 2: pass_bf16_avx512<2>(p, row, rows, m0, scale, offset); break;
    case 3: pass_bf16_avx512<3>(p, row, rows, m0, scale, offset); break;
    case 4: pass_bf16_avx512<4>(p, row, rows, m0, scale, offset); break;
    case 5: pass_bf16_avx512<5>(p, row, rows, m0, scale, offset); break;
    case 6: pass_bf16_avx512<6>(p, row, rows, m0, scale, offset); break;
    case 7: pass_bf16_avx512<7>(p, row, rows, m0, scale, offset); break;
    default: pass_bf16_avx512<8>(p, row, rows, m0, scale, offset); break;
  }
}

// Rows r0 .. r1 - 1 in blocks of kGroupRows. Plain NF4's fp32 absmax is read in place. The other
// layouts' group values (group_params) of the next block are computed while this block runs, a
// tile's rows after each tile, from inputs prefetched when the block starts: computed in one pass
// before each block, their loads stalled the core with no weight in flight (1-thread M = 1
// 4096x4096: plain NF4 read in place 0.36 -> 0.28 ms, NF4 with double quant 0.36 -> 0.32 ms).
QK_AVX512_BF16 void rows_bf16_avx512(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t groups = p.groups();
  if (p.layout == Layout::kNf4) {
    for (int64_t m0 = 0; m0 < p.m;) {
      const int mt = pass_rows(p.m, m0, kMaxRowsBf16);
      pass_bf16(p, r0, r1 - r0, m0, mt, p.absmax + r0 * groups, nullptr);
      m0 += mt;
    }
    return;
  }
  Floats scale[2] = {Floats(kGroupRows * groups), Floats(kGroupRows * groups)};
  Floats offset[2] = {Floats(kGroupRows * groups), Floats(kGroupRows * groups)};
  group_params_avx512(p, r0 * groups, std::min<int64_t>(kGroupRows, r1 - r0) * groups, scale[0].data(),
                      offset[0].data());
  const auto prefetch_block = [&](int64_t first_row) {
    if (first_row < r1) prefetch_group_params(p, first_row * groups, std::min(kGroupRows, r1 - first_row) * groups);
  };
  prefetch_block(r0 + kGroupRows);
  int cur = 0;
  for (int64_t row = r0; row < r1; row += kGroupRows, cur ^= 1) {
    const int64_t rows = std::min<int64_t>(kGroupRows, r1 - row);
    const int64_t next = row + kGroupRows, next_rows = std::min<int64_t>(kGroupRows, std::max<int64_t>(r1 - next, 0));
    prefetch_block(next + kGroupRows);  // a block ahead of the one computed during this block: a miss takes longer than a block
    const float* sc = scale[cur].data();
    const float* off = p.has_offset ? offset[cur].data() : nullptr;
    for (int64_t m0 = 0; m0 < p.m;) {
      const int mt = pass_rows(p.m, m0, kMaxRowsBf16);
      // The first tile, then (once) the next block's group values while its weight loads are in
      // flight, then the other tiles.
      const int64_t first = std::min<int64_t>(tile_rows_bf16(mt), rows);
      pass_bf16(p, row, first, m0, mt, sc, off);
      if (m0 == 0 && next_rows)
        group_params_avx512(p, next * groups, next_rows * groups, scale[cur ^ 1].data(), offset[cur ^ 1].data());
      if (rows > first) pass_bf16(p, row + first, rows - first, m0, mt, sc + first * groups, off ? off + first * groups : nullptr);
      m0 += mt;
    }
  }
}

// bf16 bits of x reordered for the nibble lookups. Rows in the kernel's passes (pass_rows); a
// pass of MT rows from row m0 is one block from m0 * padded K, chunk by chunk with the MT rows'
// chunk c side by side (a tile reads them at fixed offsets from one pointer, and a pass's x is
// contiguous: with chunks of all M rows interleaved, M = 16 read x at a 4 KB stride and ran 1.8x
// slower): block[(c * MT + i) * 128 + 32 s + j] = x[m0 + i, 128 c + 4 j + kNibbleColumn[s]], 0
// past column K; but for K an odd multiple of 64, the last 64 columns as [32 even | 32 odd]
// (half_chunk_bf16_avx512).
void reorder_bf16(const c10::BFloat16* x, uint16_t* out, int64_t m, int64_t k) {
  const int64_t padded = padded_k_bf16(k), chunks = padded / kChunkBf16;
  const bool half_tail = k % kChunkBf16 == kChunkBf16 / 2;
  for (int64_t m0 = 0; m0 < m;) {
    const int mt = pass_rows(m, m0, kMaxRowsBf16);
    uint16_t* block = out + m0 * padded;
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t i = 0; i < mt; ++i) {
        const c10::BFloat16* row = x + (m0 + i) * k;
        uint16_t* o = block + (c * mt + i) * kChunkBf16;
        const int64_t c0 = c * kChunkBf16;
        if (half_tail && c == chunks - 1) {
          for (int64_t j = 0; j < 32; ++j) {
            o[j] = row[c0 + 2 * j].x;
            o[32 + j] = row[c0 + 2 * j + 1].x;
          }
          continue;
        }
        for (int s = 0; s < 4; ++s)
          for (int64_t j = 0; j < 32; ++j) {
            const int64_t col = c0 + 4 * j + kNibbleColumn[s];
            o[32 * s + j] = col < k ? row[col].x : 0;
          }
      }
    m0 += mt;
  }
}

// -------------------------------------------------------------------------------- AVX2
// 8 lanes; x is reordered per 16 columns as [8 even | 8 odd]. A 16-entry table is two 8-lane
// halves: look a code up in both and pick by its bit 3.
constexpr int kMaxRowsAvx2 = 4;

QK_AVX2 QK_INLINE __m256 lookup_avx2(__m256 lo, __m256 hi, __m256i codes) {
  const __m256 pick_hi = _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28));  // bit 3 -> sign bit
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, codes), _mm256_permutevar8x32_ps(hi, codes), pick_hi);
}

QK_AVX2 QK_INLINE float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MT>
QK_AVX2 QK_INLINE void dot4_avx2(const uint8_t* q, const float* tables, int shift, const float* xp, int64_t ldx,
                              int64_t chunks, __m256* sums) {
  __m256 acc[MT][2];
  for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    _mm_prefetch(reinterpret_cast<const char*>(q + c * 16 + kPrefetchBytes), _MM_HINT_T0);
    const float* t = tables + (c >> shift) * 16;
    const __m256 lo = _mm256_loadu_ps(t);
    const __m256 hi = _mm256_loadu_ps(t + 8);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i codes =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + c * 16 + 8 * h)));
      const __m256 even = lookup_avx2(lo, hi, _mm256_srli_epi32(codes, 4));
      const __m256 odd = lookup_avx2(lo, hi, codes);
#pragma GCC unroll 4
      for (int i = 0; i < MT; ++i) {
        const float* xm = xp + i * ldx + c * kChunk + 16 * h;
        acc[i][h] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xm), acc[i][h]);
        acc[i][h] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xm + 8), acc[i][h]);
      }
    }
  }
  for (int i = 0; i < MT; ++i) sums[i] = _mm256_add_ps(acc[i][0], acc[i][1]);
}

template <int MT>
QK_AVX2 QK_INLINE void dot8_avx2(const int8_t* q, const float* x, int64_t ldx, int64_t k, __m256* sums) {
  __m256 acc[MT][2];
  for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(q + j + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 2
    for (int u = 0; u < 2; ++u) {
      const __m256 w = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j + 8 * u))));
#pragma GCC unroll 4
      for (int i = 0; i < MT; ++i)
        acc[i][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i * ldx + j + 8 * u), acc[i][u]);
    }
  }
  for (; j < k; j += 8) {  // the tail, zero-padded to a vector
    alignas(32) int32_t qt[8] = {};
    alignas(32) float xt[MT][8] = {};
    for (int64_t t = 0; t < 8 && j + t < k; ++t) {
      qt[t] = q[j + t];
      for (int i = 0; i < MT; ++i) xt[i][t] = x[i * ldx + j + t];
    }
    const __m256 w = _mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(qt)));
    for (int i = 0; i < MT; ++i) acc[i][0] = _mm256_fmadd_ps(w, _mm256_load_ps(xt[i]), acc[i][0]);
  }
  for (int i = 0; i < MT; ++i) sums[i] = _mm256_add_ps(acc[i][0], acc[i][1]);
}

QK_AVX2 QK_INLINE __m256i tail_mask_avx2(int64_t count) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(count, 8))), lanes);
}

QK_AVX2 QK_INLINE float lora_reduce_avx2(const Problem& p, int64_t row, int64_t i, __m256 v) {
  const float* b = p.lora_b + row * p.r;
  const float* xa = p.xa_scaled + i * p.r;
  for (int64_t j = 0; j < p.r; j += 8) {
    const __m256i mask = tail_mask_avx2(p.r - j);
    v = _mm256_fmadd_ps(_mm256_maskload_ps(b + j, mask), _mm256_maskload_ps(xa + j, mask), v);
  }
  return hsum_avx2(v);
}

template <int MT>
QK_AVX2 void pass_avx2(const Problem& p, int64_t row, int64_t m0, const float* tables, int shift) {
  __m256 sums[MT];
  if (p.four_bit()) {
    dot4_avx2<MT>(p.q4 + row * (p.k / 2), tables, shift, p.xp + m0 * p.k, p.k, p.k / kChunk, sums);
  } else {
    dot8_avx2<MT>(p.q8 + row * p.k, p.x + m0 * p.k, p.k, p.k, sums);
    const __m256 s = _mm256_set1_ps(p.row_scales[row]);
    for (int i = 0; i < MT; ++i) sums[i] = _mm256_mul_ps(sums[i], s);
  }
  for (int i = 0; i < MT; ++i) {
    float v = lora_reduce_avx2(p, row, m0 + i, sums[i]);
    if (p.bias) v += p.bias[row];
    p.out[(m0 + i) * p.n + row] = v;
  }
}

QK_AVX2 void rows_avx2(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t groups = p.four_bit() ? p.groups() : 0;
  const bool has_offset = p.has_offset;
  Floats scale(groups), offset(groups), tables(groups * 16);
  int shift = 0;
  while ((kChunk << shift) < p.group) ++shift;
  const __m256 base_lo = _mm256_load_ps(p.base);
  const __m256 base_hi = _mm256_load_ps(p.base + 8);
  for (int64_t row = r0; row < r1; ++row) {
    if (p.four_bit()) {
      group_params(p, row * groups, groups, scale.data(), offset.data());
      for (int64_t g = 0; g < groups; ++g) {  // base * scale (+ min), as the reference
        const __m256 s = _mm256_set1_ps(scale[g]);
        __m256 lo = _mm256_mul_ps(base_lo, s);
        __m256 hi = _mm256_mul_ps(base_hi, s);
        if (has_offset) {
          const __m256 m = _mm256_set1_ps(offset[g]);
          lo = _mm256_add_ps(lo, m);
          hi = _mm256_add_ps(hi, m);
        }
        _mm256_store_ps(tables.data() + g * 16, lo);
        _mm256_store_ps(tables.data() + g * 16 + 8, hi);
      }
    }
    for (int64_t m0 = 0; m0 < p.m;) {
      const int mt = pass_rows(p.m, m0, kMaxRowsAvx2);
      switch (mt) {
        case 1: pass_avx2<1>(p, row, m0, tables.data(), shift); break;
        case 2: pass_avx2<2>(p, row, m0, tables.data(), shift); break;
        case 3: pass_avx2<3>(p, row, m0, tables.data(), shift); break;
        default: pass_avx2<4>(p, row, m0, tables.data(), shift); break;
      }
      m0 += mt;
    }
  }
}

QK_AVX2 float dot_avx2(const float* a, const float* b, int64_t k) {
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t j = 0;
  for (; j + 16 <= k; j += 16)
    for (int u = 0; u < 2; ++u)
      acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8 * u), _mm256_loadu_ps(b + j + 8 * u), acc[u]);
  for (; j < k; j += 8) {
    const __m256i mask = tail_mask_avx2(k - j);
    acc[0] = _mm256_fmadd_ps(_mm256_maskload_ps(a + j, mask), _mm256_maskload_ps(b + j, mask), acc[0]);
  }
  return hsum_avx2(_mm256_add_ps(acc[0], acc[1]));
}
#endif  // QK_X86

// ------------------------------------------------------------------------- dispatching
using RowsFn = void (*)(const Problem&, int64_t, int64_t);
using DotFn = float (*)(const float*, const float*, int64_t);

RowsFn rows_fn(Isa isa, const Problem& p) {
#if QK_X86
  if (isa == Isa::kAvx512Bf16 && p.xb) return rows_bf16_avx512;
  if (isa >= Isa::kAvx512) return rows_avx512;
  if (isa == Isa::kAvx2) return rows_avx2;
#endif
  return rows_scalar;
}

DotFn dot_fn(Isa isa) {
#if QK_X86
  if (isa >= Isa::kAvx512) return dot_avx512;
  if (isa == Isa::kAvx2) return dot_avx2;
#endif
  return dot_scalar;
}

// Columns of each row reordered per block of 2 * lanes as [even columns | odd columns].
void reorder_even_odd(const float* x, float* out, int64_t m, int64_t k, int64_t lanes) {
  const int64_t block = 2 * lanes;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t b = 0; b < k; b += block)
      for (int64_t j = 0; j < lanes; ++j) {
        out[i * k + b + j] = x[i * k + b + 2 * j];
        out[i * k + b + lanes + j] = x[i * k + b + 2 * j + 1];
      }
}

template <typename T>
void to_float(const T* src, float* dst, int64_t count) {
  for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename Fn>
void dispatch_float(at::ScalarType t, const Fn& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, "unreachable: the dtype was checked");
  }
}

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void check_group(const char* op, int64_t group, int64_t k) {
  TORCH_CHECK_VALUE(group == 32 || group == 64 || group == 128 || group == 256, op,
                    ": group_size must be one of (32, 64, 128, 256), got ", group);
  TORCH_CHECK_VALUE(k % group == 0, op, ": group_size=", group, " does not divide in_features K=", k);
}

// ------------------------------------------------------------------------------ the op
std::tuple<at::Tensor, at::Tensor> qlora_small_m(
    const at::Tensor& x, const std::string& format, const at::Tensor& data, const at::Tensor& scales,
    const std::optional<at::Tensor>& mins, const std::optional<at::Tensor>& levels,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& absmax_scales,
    const std::optional<at::Tensor>& absmax_offset, int64_t group_size, const std::optional<at::Tensor>& lora_a,
    const std::optional<at::Tensor>& lora_b, double scaling, const std::optional<at::Tensor>& bias,
    const std::string& isa_name_arg) {
  constexpr const char* op = "qlora_small_m (native)";
  const Isa isa = parse_isa(isa_name_arg);
  TORCH_CHECK_TYPE(is_float_type(x.scalar_type()), op,
                   ": x must be torch.float32, torch.bfloat16 or torch.float16, got ", py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.device().is_cpu() && x.is_contiguous(), op,
                    ": x must be a contiguous (..., K) CPU tensor, got shape ", py_shape(x.sizes()), " on ",
                    x.device());
  TORCH_CHECK_VALUE(data.dim() == 2, op, ": 'data' must be 2-D, got shape ", py_shape(data.sizes()));
  Problem p;
  p.k = x.size(-1);
  p.m = p.k ? x.numel() / p.k : 0;
  p.n = data.size(0);
  const int64_t n = p.n, k = p.k;
  const int64_t weight_k = format == "int8" ? data.size(1) : 2 * data.size(1);
  TORCH_CHECK_VALUE(k == weight_k, op, ": x has ", k, " columns but the weight has in_features K=", weight_k,
                    "; x must be (..., K)");
  if (format == "int8") {
    p.layout = Layout::kInt8;
    p.group = k;
    check_field(op, "data", data, at::kChar, {n, k});
    check_field(op, "scales", scales, at::kFloat, {n});
    p.q8 = data.data_ptr<int8_t>();
    p.row_scales = scales.data_ptr<float>();
  } else if (format == "int4" || format == "nf4") {
    check_group(op, group_size, k);
    p.group = group_size;
    check_field(op, "data", data, at::kByte, {n, k / 2});
    p.q4 = data.data_ptr<uint8_t>();
    const int64_t groups = k / group_size;
    if (format == "int4") {
      check_field(op, "scales", scales, at::kHalf, {n, groups});
      p.half_scales = scales.data_ptr<c10::Half>();
      p.layout = mins ? Layout::kInt4Affine : Layout::kInt4Symmetric;
      if (mins) {
        check_field(op, "mins", *mins, at::kHalf, {n, groups});
        p.half_mins = mins->data_ptr<c10::Half>();
        p.has_offset = true;
      }
      for (int i = 0; i < 16; ++i) p.base[i] = mins ? static_cast<float>(i) : static_cast<float>(i) - 8.0f;
    } else {
      TORCH_CHECK_VALUE(levels.has_value(), op, ": nf4 needs the 16 NF4 levels (formats.nf4_table())");
      check_field(op, "levels", *levels, at::kFloat, {16});
      std::memcpy(p.base, levels->data_ptr<float>(), sizeof(p.base));
      const int64_t blocks = n * groups;
      const bool double_quant = absmax_scales.has_value();
      TORCH_CHECK_VALUE(double_quant == nested_code.has_value() && double_quant == absmax_offset.has_value(), op,
                        ": double quantization needs nested_code, absmax_scales and absmax_offset together "
                        "(pass all three, or none for fp32 absmax)");
      if (double_quant) {
        p.layout = Layout::kNf4DoubleQuant;
        check_field(op, "scales", scales, at::kByte, {blocks});
        check_field(op, "nested_code", *nested_code, at::kFloat, {256});
        check_field(op, "absmax_scales", *absmax_scales, at::kFloat, {(blocks + kNestedBlock - 1) / kNestedBlock});
        check_field(op, "absmax_offset", *absmax_offset, at::kFloat, {1});
        p.absmax_codes = scales.data_ptr<uint8_t>();
        p.nested_code = nested_code->data_ptr<float>();
        for (int i = 0; i < 256; ++i) {
          uint32_t bits;
          std::memcpy(&bits, p.nested_code + i, sizeof(bits));
          p.nested_low[i] = static_cast<uint16_t>(bits);
          p.nested_high[i] = static_cast<uint16_t>(bits >> 16);
        }
        p.absmax_scales = absmax_scales->data_ptr<float>();
        p.absmax_offset = *absmax_offset->data_ptr<float>();
      } else {
        p.layout = Layout::kNf4;
        check_field(op, "scales", scales, at::kFloat, {blocks});
        p.absmax = scales.data_ptr<float>();
      }
    }
  } else {
    TORCH_CHECK_VALUE(false, op, ": format must be 'int8', 'int4' or 'nf4', got '", format, "'");
  }
  TORCH_CHECK_VALUE(lora_a.has_value() == lora_b.has_value(), op, ": pass both lora_a and lora_b, or neither");
  if (lora_a) {
    TORCH_CHECK_VALUE(lora_a->dim() == 2, op, ": lora_a must be 2-D (r, K), got shape ", py_shape(lora_a->sizes()));
    p.r = lora_a->size(0);
    check_field(op, "lora_a", *lora_a, at::kFloat, {p.r, k});
    check_field(op, "lora_b", *lora_b, at::kFloat, {n, p.r});
    p.lora_b = lora_b->data_ptr<float>();
  }
  if (bias) {
    TORCH_CHECK_TYPE(is_float_type(bias->scalar_type()), op, ": bias must be a float tensor, got ",
                     py_dtype(bias->scalar_type()));
    check_field(op, "bias", *bias, bias->scalar_type(), {n});
  }

  // y (..., N) and xa (..., r): x's leading dimensions, flattened into M rows here.
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  shape.back() = p.r;
  at::Tensor xa = at::empty(shape, x.options().dtype(at::kFloat));
  if (p.m == 0 || n == 0) return {y, xa};

  // x in fp32, and reordered for the 4-bit SIMD paths.
  Floats x32(p.m * k);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    to_float(x.data_ptr<T>(), x32.data(), p.m * k);
  });
  p.x = x32.data();
  // bf16 dot products: bf16 x and a 4-bit weight.
  Aligned<uint16_t> xb;
#if QK_X86
  if (isa == Isa::kAvx512Bf16 && p.four_bit() && x.scalar_type() == at::kBFloat16) {
    xb.resize(p.m * padded_k_bf16(k));
    reorder_bf16(x.data_ptr<c10::BFloat16>(), xb.data(), p.m, k);
    p.xb = xb.data();
  }
#endif
  Floats xp;
  if (p.four_bit() && isa != Isa::kScalar && !p.xb) {
    xp.resize(p.m * k);
    reorder_even_odd(x32.data(), xp.data(), p.m, k, isa >= Isa::kAvx512 ? 16 : 8);
    p.xp = xp.data();
  }

  const int64_t min_macs = g_min_macs_per_task.load(std::memory_order_relaxed);
  // LoRA: x A^T once, (M, r), each entry one fixed-order dot product.
  Floats xa_scaled(p.m * p.r);
  if (p.r) {
    float* xa_out = xa.data_ptr<float>();
    const float* a = lora_a->data_ptr<float>();
    const DotFn dot = dot_fn(isa);
    const float s = static_cast<float>(scaling);
    at::parallel_for(0, p.m * p.r, std::max<int64_t>(1, min_macs / k), [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        xa_out[e] = dot(p.x + (e / p.r) * k, a + (e % p.r) * k, k);
        xa_scaled[e] = s * xa_out[e];
      }
    });
    p.xa_scaled = xa_scaled.data();
  }

  Floats bias32;
  if (bias) {
    bias32.resize(n);
    dispatch_float(bias->scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      to_float(bias->data_ptr<T>(), bias32.data(), n);
    });
    p.bias = bias32.data();
  }

  // The rows of W across threads; each output is finished (LoRA, bias) in fp32 where computed,
  // then rounded to x's dtype by the same thread.
  const bool fp32_out = x.scalar_type() == at::kFloat;
  Floats out32(fp32_out ? 0 : p.m * n);
  p.out = fp32_out ? y.data_ptr<float>() : out32.data();
  // Threads get whole tiles of kTileRows rows, so how rows group into tiles (and with it the
  // order of every sum) does not depend on the thread count.
  const RowsFn rows_kernel = rows_fn(isa, p);
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  const int64_t grain = std::max<int64_t>(1, min_macs / (k * p.m * kTileRows));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    const int64_t r0 = t0 * kTileRows, r1 = std::min(t1 * kTileRows, n);
    rows_kernel(p, r0, r1);
    if (fp32_out) return;
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* out = y.data_ptr<T>();
      for (int64_t i = 0; i < p.m; ++i)
        for (int64_t row = r0; row < r1; ++row) out[i * n + row] = static_cast<T>(p.out[i * n + row]);
    });
  });
  return {y, xa};
}

std::string small_m_isa() { return isa_name(kBestIsa); }

int64_t set_small_m_task_macs(int64_t macs) {
  TORCH_CHECK_VALUE(macs >= 1, "set_small_m_task_macs: macs must be >= 1, got ", macs);
  return g_min_macs_per_task.exchange(macs);
}

}  // namespace
}  // namespace qlora_kernels

TORCH_LIBRARY_FRAGMENT(qlora_kernels, m) {
  m.def(
      "qlora_small_m(Tensor x, str format, Tensor data, Tensor scales, Tensor? mins, Tensor? levels, "
      "Tensor? nested_code, Tensor? absmax_scales, Tensor? absmax_offset, int group_size, Tensor? lora_a, "
      "Tensor? lora_b, float scaling, Tensor? bias, str isa) -> (Tensor, Tensor)");
  m.def("small_m_isa() -> str", &qlora_kernels::small_m_isa);
  m.def("set_small_m_task_macs(int macs) -> int", &qlora_kernels::set_small_m_task_macs);
}

// CompositeExplicitAutograd, as the dequantize operators: CUDA tensors get the "run on the CPU" error.
TORCH_LIBRARY_IMPL(qlora_kernels, CompositeExplicitAutograd, m) {
  m.impl("qlora_small_m", &qlora_kernels::qlora_small_m);
}
