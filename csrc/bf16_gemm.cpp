// bfloat16 products on AVX512_BF16 (bf16_gemm.h). The kernels carry their own target
// attribute, so the rest of the library keeps its build flags and no code path reaches them
// on a CPU without the instruction (bf16_dot_available() is checked at run time).
#include "bf16_gemm.h"

#include "packed_gemm.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
#define BNLSTM_BF16_KERNELS 1
#include <immintrin.h>
#define BNLSTM_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace bnlstm {

namespace {

constexpr int64_t kPanel = Bf16Gemm::kPanel;

#ifdef BNLSTM_BF16_KERNELS

// The lanes below `count` (clamped to 0..16).
inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// rows x k floats (rows ld apart) rounded to bfloat16, k padded with a zero to even: row r's
// pairs at dst + r * dst_stride.
BNLSTM_BF16_TARGET void round_rows(const float* src, int64_t ld, int64_t rows, int64_t k, uint32_t* dst,
                                   int64_t dst_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld;
    uint16_t* d = reinterpret_cast<uint16_t*>(dst + r * dst_stride);
    int64_t c = 0;
    for (; c + 32 <= k; c += 32) {
      const __m512 low = _mm512_loadu_ps(s + c), high = _mm512_loadu_ps(s + c + 16);
      _mm512_storeu_si512(d + c, (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
    for (; c < k; c += 16) {
      const int64_t count = std::min<int64_t>(16, k - c);
      const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(first_lanes(count), s + c));
      _mm256_mask_storeu_epi16(d + c, first_lanes(count + (count & 1)), rounded);  // the masked load's zero pads
    }
  }
}

// Sixteen floats and the sixteen below them (the next k) as bf16 pairs.
BNLSTM_BF16_TARGET inline __m512i pair_up(__m512 low, __m512 high) {
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(low));
  const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(high));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

// As round_rows for a transposed source, a[r][c] = src[c * ld + r] (h^T and x^T of the weight
// gradients): two source rows give sixteen rows' pairs at once, with no float32 transpose.
BNLSTM_BF16_TARGET void round_columns(const float* src, int64_t ld, int64_t rows, int64_t k, uint32_t* dst,
                                      int64_t dst_stride) {
  alignas(64) uint32_t pairs[16];
  for (int64_t q = 0; q < (k + 1) / 2; ++q) {
    for (int64_t r = 0; r < rows; r += 16) {
      const __mmask16 lanes = first_lanes(rows - r);
      const __m512 low = _mm512_maskz_loadu_ps(lanes, src + 2 * q * ld + r);
      const __m512 high =
          2 * q + 1 < k ? _mm512_maskz_loadu_ps(lanes, src + (2 * q + 1) * ld + r) : _mm512_setzero_ps();
      _mm512_store_si512(pairs, pair_up(low, high));
      const int64_t count = std::min<int64_t>(16, rows - r);
      for (int64_t j = 0; j < count; ++j) dst[(r + j) * dst_stride + q] = pairs[j];
    }
  }
}

// Packs b [k, n] (rows ld apart) into panels of kPanel columns, pair by pair of rows.
BNLSTM_BF16_TARGET void pack_rows(const float* b, int64_t ld, int64_t k, int64_t n, int64_t pairs, int64_t panels,
                                  uint32_t* packed) {
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t q = 0; q < pairs; ++q) {
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t column = p * kPanel + half * 16;
        const __mmask16 lanes = first_lanes(n - column);
        const __m512 low = _mm512_maskz_loadu_ps(lanes, b + 2 * q * ld + column);
        const __m512 high = 2 * q + 1 < k ? _mm512_maskz_loadu_ps(lanes, b + (2 * q + 1) * ld + column)
                                          : _mm512_setzero_ps();
        _mm512_storeu_si512(packed + (p * pairs + q) * kPanel + half * 16, pair_up(low, high));
      }
    }
  }
}

// Packs b^T for b [n, k] (rows ld apart): each row of b rounded gives one column's pairs.
BNLSTM_BF16_TARGET void pack_columns(const float* b, int64_t ld, int64_t k, int64_t n, int64_t pairs, int64_t panels,
                                     uint32_t* packed) {
  std::vector<uint32_t> rounded(static_cast<size_t>(std::max<int64_t>(n * pairs, 1)));
  round_rows(b, ld, n, k, rounded.data(), pairs);
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t q = 0; q < pairs; ++q) {
      uint32_t* dst = packed + (p * pairs + q) * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t column = p * kPanel + j;
        dst[j] = column < n ? rounded[column * pairs + q] : 0u;
      }
    }
  }
}

BNLSTM_BF16_TARGET inline void store(__m512 low, __m512 high, float* out, int64_t columns, bool accumulate) {
  const __mmask16 low_lanes = first_lanes(columns), high_lanes = first_lanes(columns - 16);
  if (accumulate) {
    low = _mm512_add_ps(low, _mm512_maskz_loadu_ps(low_lanes, out));
    high = _mm512_add_ps(high, _mm512_maskz_loadu_ps(high_lanes, out + 16));
  }
  _mm512_mask_storeu_ps(out, low_lanes, low);
  _mm512_mask_storeu_ps(out + 16, high_lanes, high);
}

// kRows rows of rounded a (pairs apart) times one panel: 2 x kRows accumulators in registers
// through the K loop, named (GCC spills an array of them), as SmallGemm's.
template <int kRows>
BNLSTM_BF16_TARGET void block(const uint32_t* a, const uint32_t* panel, int64_t pairs, float* out, int64_t ldc,
                              int64_t columns, bool accumulate) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t q = 0; q < pairs; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + q * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + q * kPanel + 16);
    const __m512bh a0 = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[q]));
    c00 = _mm512_dpbf16_ps(c00, a0, b0);
    c01 = _mm512_dpbf16_ps(c01, a0, b1);
    if constexpr (kRows > 1) {
      const __m512bh a1 = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[pairs + q]));
      c10 = _mm512_dpbf16_ps(c10, a1, b0);
      c11 = _mm512_dpbf16_ps(c11, a1, b1);
    }
    if constexpr (kRows > 2) {
      const __m512bh a2 = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[2 * pairs + q]));
      c20 = _mm512_dpbf16_ps(c20, a2, b0);
      c21 = _mm512_dpbf16_ps(c21, a2, b1);
    }
    if constexpr (kRows > 3) {
      const __m512bh a3 = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[3 * pairs + q]));
      c30 = _mm512_dpbf16_ps(c30, a3, b0);
      c31 = _mm512_dpbf16_ps(c31, a3, b1);
    }
  }
  store(c00, c01, out, columns, accumulate);
  if constexpr (kRows > 1) store(c10, c11, out + ldc, columns, accumulate);
  if constexpr (kRows > 2) store(c20, c21, out + 2 * ldc, columns, accumulate);
  if constexpr (kRows > 3) store(c30, c31, out + 3 * ldc, columns, accumulate);
}

// Rows of a in chunks whose rounded copy stays in L1/L2 while every panel passes over it.
constexpr int64_t kRowChunk = 64;

// a's rows lda apart, or with a_transposed its columns (a[r][c] = a[c * lda + r]).
BNLSTM_BF16_TARGET void run_packed(const uint32_t* packed, int64_t k, int64_t n, int64_t pairs, int64_t panels,
                                   const float* a, int64_t lda, bool a_transposed, int64_t m, float* out, int64_t ldc,
                                   bool accumulate) {
  std::vector<uint32_t> rows(static_cast<size_t>(std::max<int64_t>(std::min(m, kRowChunk) * pairs, 1)));
  for (int64_t r0 = 0; r0 < m; r0 += kRowChunk) {
    const int64_t count = std::min(kRowChunk, m - r0);
    if (a_transposed) {
      round_columns(a + r0, lda, count, k, rows.data(), pairs);
    } else {
      round_rows(a + r0 * lda, lda, count, k, rows.data(), pairs);
    }
    for (int64_t p = 0; p < panels; ++p) {
      const uint32_t* panel = packed + p * pairs * kPanel;
      const int64_t columns = std::min(kPanel, n - p * kPanel);
      float* o = out + r0 * ldc + p * kPanel;
      int64_t r = 0;
      for (; r + 4 <= count; r += 4) {
        block<4>(rows.data() + r * pairs, panel, pairs, o + r * ldc, ldc, columns, accumulate);
      }
      switch (count - r) {
        case 3: block<3>(rows.data() + r * pairs, panel, pairs, o + r * ldc, ldc, columns, accumulate); break;
        case 2: block<2>(rows.data() + r * pairs, panel, pairs, o + r * ldc, ldc, columns, accumulate); break;
        case 1: block<1>(rows.data() + r * pairs, panel, pairs, o + r * ldc, ldc, columns, accumulate); break;
        default: break;
      }
    }
  }
}

#endif  // BNLSTM_BF16_KERNELS

}  // namespace

bool bf16_dot_available() {
#ifdef BNLSTM_BF16_KERNELS
  static const bool available = __builtin_cpu_supports("avx512bf16");
  return available;
#else
  return false;
#endif
}

Bf16Gemm::Bf16Gemm(const at::Tensor& b, bool transpose)
    : k_(transpose ? b.size(1) : b.size(0)),
      n_(transpose ? b.size(0) : b.size(1)),
      pairs_((k_ + 1) / 2),
      panels_((n_ + kPanel - 1) / kPanel) {
  TORCH_CHECK(bf16_dot_available(), "Bf16Gemm: this CPU or build has no AVX512_BF16 kernels");
  TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kFloat && rows_contiguous(b),
              "Bf16Gemm: b must be a float32 matrix with contiguous rows, got ", b.sizes(), " ", b.scalar_type(),
              " strides ", b.strides());
  packed_ = at::empty({std::max<int64_t>(panels_ * pairs_ * kPanel, 1)}, b.options().dtype(at::kInt));
#ifdef BNLSTM_BF16_KERNELS
  uint32_t* packed = reinterpret_cast<uint32_t*>(packed_.data_ptr<int32_t>());
  if (transpose) {
    pack_columns(b.data_ptr<float>(), b.stride(0), k_, n_, pairs_, panels_, packed);
  } else {
    pack_rows(b.data_ptr<float>(), b.stride(0), k_, n_, pairs_, panels_, packed);
  }
#endif
}

void Bf16Gemm::run(const float* a, int64_t lda, int64_t m, float* out, int64_t ldc, bool accumulate,
                   bool a_transposed) const {
#ifdef BNLSTM_BF16_KERNELS
  const uint32_t* packed = reinterpret_cast<const uint32_t*>(packed_.data_ptr<int32_t>());
  const auto rows = [&](int64_t begin, int64_t end) {
    run_packed(packed, k_, n_, pairs_, panels_, a + begin * (a_transposed ? 1 : lda), lda, a_transposed, end - begin,
               out + begin * ldc, ldc, accumulate);
  };
  // Host GEMMs (all steps' rows) split over torch's threads; a step's few rows, and any call
  // inside a parallel region, run on the calling thread.
  if (m >= 2 * kRowChunk) {
    at::parallel_for(0, m, kRowChunk, rows);
  } else {
    rows(0, m);
  }
#else
  (void)a, (void)lda, (void)m, (void)out, (void)ldc, (void)accumulate, (void)a_transposed;
  TORCH_CHECK(false, "Bf16Gemm: this build has no AVX512_BF16 kernels");
#endif
}

void bf16_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) && out.size(0) == a.size(0) &&
                  out.size(1) == b.size(1),
              "bf16_matmul: shapes ", out.sizes(), " = ", a.sizes(), " @ ", b.sizes(), " do not match");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "bf16_matmul: float32 operands expected");
  TORCH_CHECK(rows_contiguous(out), "bf16_matmul: out's rows must be contiguous, got strides ", out.strides());
  const int64_t m = a.size(0), k = a.size(1);
  if (m == 0 || out.size(1) == 0) return;
  const Bf16Gemm gemm = rows_contiguous(b) ? Bf16Gemm(b, false)
                        : b.stride(0) == 1 ? Bf16Gemm(b.t(), true)
                                           : Bf16Gemm(b.contiguous(), false);
  if (!rows_contiguous(a) && a.stride(0) == 1) {  // a transposed view, rounded from its columns
    gemm.run(a.data_ptr<float>(), a.stride(1), m, out.data_ptr<float>(), out.size(0) > 1 ? out.stride(0) : out.size(1),
             accumulate, /*a_transposed=*/true);
    return;
  }
  const at::Tensor rows = with_contiguous_rows<float>(a);
  gemm.run(rows.data_ptr<float>(), m > 1 ? rows.stride(0) : k, m, out.data_ptr<float>(),
           out.size(0) > 1 ? out.stride(0) : out.size(1), accumulate);
}

// For tests: whether the bf16 kernels run, and c (+)= a @ b through them.
TORCH_LIBRARY_FRAGMENT(bnlstm, m) {
  m.def("cpu_bf16_available() -> bool", [] { return bf16_dot_available(); });
  m.def("cpu_bf16_addmm(Tensor c, Tensor a, Tensor b, bool accumulate) -> Tensor",
        [](const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
          TORCH_CHECK(bf16_dot_available(), "cpu_bf16_addmm: this CPU or build has no AVX512_BF16 kernels");
          at::Tensor result = accumulate ? c.clone() : at::empty_like(c);
          bf16_matmul(result, a, b, accumulate);
          return result;
        });
}

}  // namespace bnlstm
