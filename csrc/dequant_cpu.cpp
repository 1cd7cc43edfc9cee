// CPU dequantization of int8, int4 and NF4 weights into a caller-provided fp32/bf16/fp16 buffer.
//
// Layouts are those of qlora_kernels/formats/tensor.py. Each output element is computed with
// exactly the fp32 operations of the PyTorch reference (qlora_kernels/formats/reference.py), in
// the same order, then rounded to the output dtype with round-to-nearest-even as torch does (c10's
// conversions, or SIMD equivalents: SSE4.1/AVX2 integer rounding for bf16, F16C for fp16), so the
// result is bit-identical to the reference (tests/test_native.py checks every format and dtype).
// The baseline is x86-64-v2 (SSE4.2); AVX2 and F16C paths are chosen at run time.
//
// 4-bit formats: every value of a group is one of 16, so for each group we compute the 16
// decoded values once (in fp32, then converted), split them into byte planes and decode 16
// packed bytes (32 codes) at a time with byte shuffles (SSSE3) — a table lookup in registers.
// A scalar table lookup is the fallback on other CPUs. Rows are split across threads with
// at::parallel_for.
//
// Operators (schemas in TORCH_LIBRARY below), all writing into `out` (N, K), contiguous:
//   qlora_kernels::dequantize_int8_into(data, scales, out)
//   qlora_kernels::dequantize_int4_into(data, scales, mins?, group_size, out)  (mins None: symmetric)
//   qlora_kernels::dequantize_nf4_into(data, absmax, levels, block_size, nested_code?,
//                                      absmax_scales?, absmax_offset?, out)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "checks.h"

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__SSSE3__)
#define QK_HAVE_SSSE3 1
#else
#define QK_HAVE_SSSE3 0
#endif
#if defined(__SSE4_1__)
#define QK_HAVE_SSE41 1
#else
#define QK_HAVE_SSE41 0
#endif

namespace qlora_kernels {
namespace {

constexpr int64_t kNestedBlock = 256;  // NF4 absmax values per fp32 scale (formats.NESTED_BLOCK)
constexpr int64_t kMinElementsPerTask = 1 << 15;

// ------------------------------------------------------------------------------ checks
// `out` decides N and K; returns (N, K).
std::pair<int64_t, int64_t> check_out(const char* op, const at::Tensor& out) {
  const auto t = out.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
                   ": out must be torch.float32, torch.float16 or torch.bfloat16, got ", py_dtype(t));
  TORCH_CHECK_VALUE(out.dim() == 2, op, ": out must be 2-D (N, K), got shape ", py_shape(out.sizes()));
  TORCH_CHECK_VALUE(out.device().is_cpu(), op, ": out is on ", out.device(),
                    "; the native kernels run on the CPU: pass a CPU buffer");
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous; allocate it with torch.empty((N, K), ...)");
  return {out.size(0), out.size(1)};
}

void check_group(const char* op, const char* what, int64_t group, int64_t k) {
  TORCH_CHECK_VALUE(group == 32 || group == 64 || group == 128 || group == 256, op, ": ", what,
                    " must be one of (32, 64, 128, 256), got ", group);
  TORCH_CHECK_VALUE(k % group == 0, op, ": ", what, "=", group, " does not divide in_features K=", k);
}

int64_t grain_rows(int64_t k) { return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(k, 1)); }

// ------------------------------------------------------------------- output conversion
template <typename T>
inline T from_float(float v) {
  return T(v);  // c10::BFloat16 / c10::Half: round to nearest even, as Tensor.to() does
}
template <>
inline float from_float<float>(float v) {
  return v;
}

#if defined(__x86_64__) && defined(__GNUC__)
// fp32 -> fp16 with the F16C instruction (round to nearest even, as Tensor.to(torch.float16)
// does on x86); chosen at run time, since x86-64-v2 does not include F16C.
__attribute__((target("f16c"))) void store16_f16c(const float* f, c10::Half* dst) {
  for (int q = 0; q < 4; ++q) {
    const __m128i h = _mm_cvtps_ph(_mm_loadu_ps(f + 4 * q), _MM_FROUND_TO_NEAREST_INT);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + 4 * q), h);
  }
}
bool detect_f16c() {
  __builtin_cpu_init();  // may run before libgcc's own initialiser, so initialise explicitly
  return __builtin_cpu_supports("f16c");
}
const bool kHaveF16C = detect_f16c();
#define QK_HAVE_X86_DISPATCH 1
#else
#define QK_HAVE_X86_DISPATCH 0
#endif

#if QK_HAVE_SSE41
// c10::BFloat16(float) on 4 lanes: round to nearest even, NaN -> 0x7FC0; the bf16 bits end up in
// the low half of each 32-bit lane (checked against the reference by the tests).
inline __m128i bf16_bits(__m128 x) {
  const __m128i u = _mm_castps_si128(x);
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
  const __m128i rounded = _mm_srli_epi32(_mm_add_epi32(u, _mm_add_epi32(lsb, _mm_set1_epi32(0x7FFF))), 16);
  const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(x, x));
  return _mm_blendv_epi8(rounded, _mm_set1_epi32(0x7FC0), nan);
}

// Store 8 bf16 values made from two vectors of 4 floats.
inline void store8_bf16(__m128 a, __m128 b, c10::BFloat16* dst) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_packus_epi32(bf16_bits(a), bf16_bits(b)));
}
#endif

// Convert 16 fp32 values to T and store them (dst need not be aligned).
template <typename T>
inline void store16(const float* f, T* dst) {
#if QK_HAVE_SSE41
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    store8_bf16(_mm_loadu_ps(f), _mm_loadu_ps(f + 4), dst);
    store8_bf16(_mm_loadu_ps(f + 8), _mm_loadu_ps(f + 12), dst + 8);
    return;
  }
#endif
#if QK_HAVE_X86_DISPATCH
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (kHaveF16C) {
      store16_f16c(f, dst);
      return;
    }
  }
#endif
  for (int i = 0; i < 16; ++i) dst[i] = from_float<T>(f[i]);
}

#if QK_HAVE_X86_DISPATCH
// int8 row -> bf16 with 256-bit vectors (run-time dispatch: x86-64-v2 has no AVX2). Same fp32
// product q * s and the same rounding as bf16_bits.
__attribute__((target("avx2"))) inline __m256i bf16_bits_avx2(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

// Returns how many elements it wrote (a multiple of 16).
__attribute__((target("avx2"))) int64_t int8_row_bf16_avx2(const int8_t* src, float s, c10::BFloat16* dst,
                                                            int64_t k) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), sv);
    const __m256 b = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), sv);
    // packus works per 128-bit lane: [a0-3 b0-3 | a4-7 b4-7] -> reorder the 64-bit quarters.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits_avx2(a), bf16_bits_avx2(b)), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), packed);
  }
  return i;
}
bool detect_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
}
const bool kHaveAVX2 = detect_avx2();
#endif

// ---------------------------------------------------------------- 4-bit group decoding
// A group's 16 decoded values (already in the output type) and, with SSSE3, their byte planes.
template <typename T>
struct GroupTable {
  static constexpr int kBytes = sizeof(T);
  alignas(16) T values[16];
#if QK_HAVE_SSSE3
  __m128i planes[kBytes];

  void split_planes() {
    const auto* v = reinterpret_cast<const __m128i*>(values);
    if constexpr (kBytes == 2) {
      const __m128i even_odd = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
      const __m128i a = _mm_shuffle_epi8(_mm_load_si128(v), even_odd);
      const __m128i b = _mm_shuffle_epi8(_mm_load_si128(v + 1), even_odd);
      planes[0] = _mm_unpacklo_epi64(a, b);
      planes[1] = _mm_unpackhi_epi64(a, b);
    } else {
      const __m128i by_byte = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
      const __m128i v0 = _mm_shuffle_epi8(_mm_load_si128(v), by_byte);
      const __m128i v1 = _mm_shuffle_epi8(_mm_load_si128(v + 1), by_byte);
      const __m128i v2 = _mm_shuffle_epi8(_mm_load_si128(v + 2), by_byte);
      const __m128i v3 = _mm_shuffle_epi8(_mm_load_si128(v + 3), by_byte);
      const __m128i t0 = _mm_unpacklo_epi32(v0, v1);
      const __m128i t1 = _mm_unpacklo_epi32(v2, v3);
      const __m128i t2 = _mm_unpackhi_epi32(v0, v1);
      const __m128i t3 = _mm_unpackhi_epi32(v2, v3);
      planes[0] = _mm_unpacklo_epi64(t0, t1);
      planes[1] = _mm_unpackhi_epi64(t0, t1);
      planes[2] = _mm_unpacklo_epi64(t2, t3);
      planes[3] = _mm_unpackhi_epi64(t2, t3);
    }
  }

  // Look up 16 codes (one per byte of `codes`) and store 16 outputs at dst.
  inline void lookup16(__m128i codes, T* dst) const {
    auto* d = reinterpret_cast<__m128i*>(dst);
    if constexpr (kBytes == 2) {
      const __m128i b0 = _mm_shuffle_epi8(planes[0], codes);
      const __m128i b1 = _mm_shuffle_epi8(planes[1], codes);
      _mm_storeu_si128(d, _mm_unpacklo_epi8(b0, b1));
      _mm_storeu_si128(d + 1, _mm_unpackhi_epi8(b0, b1));
    } else {
      const __m128i b0 = _mm_shuffle_epi8(planes[0], codes);
      const __m128i b1 = _mm_shuffle_epi8(planes[1], codes);
      const __m128i b2 = _mm_shuffle_epi8(planes[2], codes);
      const __m128i b3 = _mm_shuffle_epi8(planes[3], codes);
      const __m128i w01l = _mm_unpacklo_epi8(b0, b1);
      const __m128i w23l = _mm_unpacklo_epi8(b2, b3);
      const __m128i w01h = _mm_unpackhi_epi8(b0, b1);
      const __m128i w23h = _mm_unpackhi_epi8(b2, b3);
      _mm_storeu_si128(d, _mm_unpacklo_epi16(w01l, w23l));
      _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(w01l, w23l));
      _mm_storeu_si128(d + 2, _mm_unpacklo_epi16(w01h, w23h));
      _mm_storeu_si128(d + 3, _mm_unpackhi_epi16(w01h, w23h));
    }
  }
#endif

  void set(const float (&f)[16]) {
    store16(f, values);
#if QK_HAVE_SSSE3
    split_planes();
#endif
  }

  // Decode `nbytes` packed bytes (high nibble first, as formats.packing) into 2 * nbytes outputs.
  inline void decode(const uint8_t* src, int64_t nbytes, T* dst) const {
    int64_t j = 0;
#if QK_HAVE_SSSE3
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (; j + 16 <= nbytes; j += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
      const __m128i lo = _mm_and_si128(v, low4);
      lookup16(_mm_unpacklo_epi8(hi, lo), dst + 2 * j);
      lookup16(_mm_unpackhi_epi8(hi, lo), dst + 2 * j + 16);
    }
#endif
    for (; j < nbytes; ++j) {
      const uint8_t b = src[j];
      dst[2 * j] = values[b >> 4];
      dst[2 * j + 1] = values[b & 0x0F];
    }
  }
};

// Decode rows of packed 4-bit codes; fill(row, group, f) writes the group's 16 fp32 values.
template <typename T, typename Fill>
void decode_4bit_rows(const uint8_t* data, T* out, int64_t n, int64_t k, int64_t group, const Fill& fill) {
  const int64_t groups = k / group;
  at::parallel_for(0, n, grain_rows(k), [&](int64_t r0, int64_t r1) {
    GroupTable<T> table;
    float f[16];
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* src = data + r * (k / 2);
      T* dst = out + r * k;
      for (int64_t g = 0; g < groups; ++g) {
        fill(r, g, f);
        table.set(f);
        table.decode(src + g * (group / 2), group / 2, dst + g * group);
      }
    }
  });
}

template <typename Fn>
void dispatch_out(const at::Tensor& out, const Fn& fn) {
  switch (out.scalar_type()) {
    case at::kFloat: fn(out.data_ptr<float>()); break;
    case at::kBFloat16: fn(out.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: fn(out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "unreachable: out dtype was checked");
  }
}

// ------------------------------------------------------------------------------ int8
template <typename T>
void int8_rows(const int8_t* q, const float* scales, T* out, int64_t n, int64_t k) {
  at::parallel_for(0, n, grain_rows(k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float s = scales[r];
      const int8_t* src = q + r * k;
      T* dst = out + r * k;
      int64_t i = 0;
#if QK_HAVE_SSE41
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if QK_HAVE_X86_DISPATCH
        if (kHaveAVX2) i = int8_row_bf16_avx2(src, s, dst, k);
#endif
        const __m128 sv = _mm_set1_ps(s);
        for (; i + 8 <= k; i += 8) {  // q * s in fp32, as the reference, 8 at a time
          const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
          const __m128 a = _mm_mul_ps(_mm_cvtepi32_ps(_mm_cvtepi8_epi32(q8)), sv);
          const __m128 b = _mm_mul_ps(_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_srli_si128(q8, 4))), sv);
          store8_bf16(a, b, dst + i);
        }
      }
#endif
      float f[16];
      for (; i + 16 <= k; i += 16) {
        for (int j = 0; j < 16; ++j) f[j] = static_cast<float>(src[i + j]) * s;  // reference: q * s
        store16(f, dst + i);
      }
      for (; i < k; ++i) dst[i] = from_float<T>(static_cast<float>(src[i]) * s);
    }
  });
}

void dequantize_int8_into(const at::Tensor& data, const at::Tensor& scales, at::Tensor& out) {
  constexpr const char* op = "dequantize_int8 (native)";
  const auto [n, k] = check_out(op, out);
  check_field(op, "data", data, at::kChar, {n, k});
  check_field(op, "scales", scales, at::kFloat, {n});
  const int8_t* q = data.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  dispatch_out(out, [&](auto* dst) { int8_rows(q, s, dst, n, k); });
}

// ------------------------------------------------------------------------------ int4
void dequantize_int4_into(const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& mins,
                          int64_t group_size, at::Tensor& out) {
  constexpr const char* op = "dequantize_int4 (native)";
  const auto [n, k] = check_out(op, out);
  check_group(op, "group_size", group_size, k);
  check_field(op, "data", data, at::kByte, {n, k / 2});
  check_field(op, "scales", scales, at::kHalf, {n, k / group_size});
  if (mins) check_field(op, "mins", *mins, at::kHalf, {n, k / group_size});
  const uint8_t* q = data.data_ptr<uint8_t>();
  const c10::Half* s = scales.data_ptr<c10::Half>();
  const int64_t groups = k / group_size;
  if (mins) {
    const c10::Half* m = mins->data_ptr<c10::Half>();
    // Reference: q * s + m, both fp16 values converted to fp32 first.
    auto fill = [=](int64_t r, int64_t g, float (&f)[16]) {
      const float sc = static_cast<float>(s[r * groups + g]);
      const float mn = static_cast<float>(m[r * groups + g]);
      for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(i) * sc + mn;
    };
    dispatch_out(out, [&](auto* dst) { decode_4bit_rows(q, dst, n, k, group_size, fill); });
  } else {
    // Reference: (q - 8) * s.
    auto fill = [=](int64_t r, int64_t g, float (&f)[16]) {
      const float sc = static_cast<float>(s[r * groups + g]);
      for (int i = 0; i < 16; ++i) f[i] = (static_cast<float>(i) - 8.0f) * sc;
    };
    dispatch_out(out, [&](auto* dst) { decode_4bit_rows(q, dst, n, k, group_size, fill); });
  }
}

// ------------------------------------------------------------------------------- nf4
void dequantize_nf4_into(const at::Tensor& data, const at::Tensor& absmax, const at::Tensor& levels,
                         int64_t block_size, const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& absmax_scales,
                         const std::optional<at::Tensor>& absmax_offset, at::Tensor& out) {
  constexpr const char* op = "dequantize_nf4 (native)";
  const auto [n, k] = check_out(op, out);
  check_group(op, "block_size", block_size, k);
  const int64_t blocks = n * (k / block_size);
  const int64_t per_row = k / block_size;
  check_field(op, "data", data, at::kByte, {n, k / 2});
  check_field(op, "levels", levels, at::kFloat, {16});
  const bool double_quant = absmax_scales.has_value();
  TORCH_CHECK_VALUE(double_quant == nested_code.has_value() && double_quant == absmax_offset.has_value(), op,
                    ": double quantization needs nested_code, absmax_scales and absmax_offset together "
                    "(pass all three, or none for fp32 absmax)");
  const uint8_t* q = data.data_ptr<uint8_t>();
  const float* lv = levels.data_ptr<float>();
  if (!double_quant) {
    check_field(op, "absmax", absmax, at::kFloat, {blocks});
    const float* a = absmax.data_ptr<float>();
    // Reference: NF4_LEVELS[q] * absmax[block].
    auto fill = [=](int64_t r, int64_t g, float (&f)[16]) {
      const float am = a[r * per_row + g];
      for (int i = 0; i < 16; ++i) f[i] = lv[i] * am;
    };
    dispatch_out(out, [&](auto* dst) { decode_4bit_rows(q, dst, n, k, block_size, fill); });
    return;
  }
  check_field(op, "absmax", absmax, at::kByte, {blocks});
  check_field(op, "nested_code", *nested_code, at::kFloat, {256});
  check_field(op, "absmax_scales", *absmax_scales, at::kFloat, {(blocks + kNestedBlock - 1) / kNestedBlock});
  check_field(op, "absmax_offset", *absmax_offset, at::kFloat, {1});
  const uint8_t* codes = absmax.data_ptr<uint8_t>();
  const float* dyn = nested_code->data_ptr<float>();
  const float* sc = absmax_scales->data_ptr<float>();
  const float offset = *absmax_offset->data_ptr<float>();
  // Reference: absmax = dynamic[code] * absmax_scales[block // 256] + offset; then levels[q] * absmax.
  auto fill = [=](int64_t r, int64_t g, float (&f)[16]) {
    const int64_t b = r * per_row + g;
    const float scaled = dyn[codes[b]] * sc[b / kNestedBlock];
    const float am = scaled + offset;
    for (int i = 0; i < 16; ++i) f[i] = lv[i] * am;
  };
  dispatch_out(out, [&](auto* dst) { decode_4bit_rows(q, dst, n, k, block_size, fill); });
}

}  // namespace
}  // namespace qlora_kernels

TORCH_LIBRARY(qlora_kernels, m) {
  m.def("dequantize_int8_into(Tensor data, Tensor scales, Tensor(a!) out) -> ()");
  m.def("dequantize_int4_into(Tensor data, Tensor scales, Tensor? mins, int group_size, Tensor(a!) out) -> ()");
  m.def(
      "dequantize_nf4_into(Tensor data, Tensor absmax, Tensor levels, int block_size, Tensor? nested_code, "
      "Tensor? absmax_scales, Tensor? absmax_offset, Tensor(a!) out) -> ()");
}

// CompositeExplicitAutograd: the kernels see tensors of every device, so a CUDA tensor gets
// the clear "move it to the CPU" error above instead of a dispatcher error.
TORCH_LIBRARY_IMPL(qlora_kernels, CompositeExplicitAutograd, m) {
  m.impl("dequantize_int8_into", &qlora_kernels::dequantize_int8_into);
  m.impl("dequantize_int4_into", &qlora_kernels::dequantize_int4_into);
  m.impl("dequantize_nf4_into", &qlora_kernels::dequantize_nf4_into);
}
