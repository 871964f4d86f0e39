// The per-step GEMMs multiply by the same W_hh at every step. MKL's packed GEMM packs W_hh
// once per call instead of once per step (a fifth of a small step GEMM's time). The MKL
// symbols are declared weak: where this torch build does not export them (other BLAS,
// other platforms) they are null and every product goes through at::mm_out.
//
// At a few rows (small batches) even MKL's packed call spends more time deciding and
// copying than multiplying, so up to kSmallGemmRows rows a register-blocked kernel of its
// own runs instead (SmallGemm), on the vector code this library is built for; on AMD CPUs
// it runs at every batch (small_gemm_applies).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "bf16_gemm.h"

#include <algorithm>
#include <cstddef>
#include <memory>
#include <type_traits>

extern "C" {
// CBLAS enums, as in mkl_cblas.h.
enum { kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112, kCblasPacked = 151 };
enum { kCblasBMatrix = 162 };
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace bnlstm {

constexpr int64_t kTransposeTile = 16;

// dst[r, c] = src[c, r] for one kTransposeTile x kTransposeTile tile (row strides in elements).
template <typename T>
inline void transpose_tile(const T* src, int64_t src_stride, T* dst, int64_t dst_stride) {
  at::vec::transpose_mxn<T, kTransposeTile, kTransposeTile>(src, src_stride, dst, dst_stride);
}

#if defined(CPU_CAPABILITY_AVX512)
// Floats on AVX-512, in registers: pairs of rows interleaved by elements, then by element
// pairs, then by 128-bit lanes twice. at::vec's transpose_mxn passes a tile of runtime size
// through memory, which is several times slower (docs/CPU.md).
template <>
inline void transpose_tile<float>(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 8; ++i) {  // t[2i]: elements 0, 1, 4, 5, ... of rows 2i and 2i+1 interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + j]: column j + 4l of rows 4i .. 4i+3 in lane l
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int half = 0; half < 2; ++half) {  // rows 8 * half .. + 7 of columns j, j + 8 / j + 4, j + 12
    for (int j = 0; j < 4; ++j) {
      t[8 * half + 2 * j] = _mm512_shuffle_f32x4(r[8 * half + j], r[8 * half + 4 + j], 0x88);
      t[8 * half + 2 * j + 1] = _mm512_shuffle_f32x4(r[8 * half + j], r[8 * half + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 4; ++j) {
    _mm512_storeu_ps(dst + j * dst_stride, _mm512_shuffle_f32x4(t[2 * j], t[8 + 2 * j], 0x88));
    _mm512_storeu_ps(dst + (j + 8) * dst_stride, _mm512_shuffle_f32x4(t[2 * j], t[8 + 2 * j], 0xdd));
    _mm512_storeu_ps(dst + (j + 4) * dst_stride, _mm512_shuffle_f32x4(t[2 * j + 1], t[8 + 2 * j + 1], 0x88));
    _mm512_storeu_ps(dst + (j + 12) * dst_stride, _mm512_shuffle_f32x4(t[2 * j + 1], t[8 + 2 * j + 1], 0xdd));
  }
}
#endif

// dst[r, c] = src[c, r] for r < rows, c < cols (row strides in elements). Whole tiles go
// through transpose_tile, which keeps both sides in L1 (a strided copy_ of a transposed view
// walks one side a column at a time, a cache line per element) and moves a vector at a
// time; the edges go element by element.
template <typename T>
void transpose_into(T* dst, int64_t dst_stride, const T* src, int64_t src_stride, int64_t rows, int64_t cols) {
  const int64_t whole_rows = rows - rows % kTransposeTile, whole_cols = cols - cols % kTransposeTile;
  for (int64_t r = 0; r < whole_rows; r += kTransposeTile) {
    for (int64_t c = 0; c < whole_cols; c += kTransposeTile) {
      transpose_tile(src + c * src_stride + r, src_stride, dst + r * dst_stride + c, dst_stride);
    }
  }
  // The edges, walked only where there are any: a pack calls this once per panel, most
  // often of whole tiles alone, and a pass over every row with nothing to copy would take a
  // large share of its time. First the columns past the whole tiles of the tiled rows, then
  // the rows past them.
  if (whole_cols < cols) {
    for (int64_t r = 0; r < whole_rows; ++r) {
      for (int64_t c = whole_cols; c < cols; ++c) dst[r * dst_stride + c] = src[c * src_stride + r];
    }
  }
  for (int64_t r = whole_rows; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[r * dst_stride + c] = src[c * src_stride + r];
  }
}

// Whether a matrix's rows are contiguous (stride 1 along them).
inline bool rows_contiguous(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

// a [M, K] with contiguous rows: a itself, or a copy (of a transposed view through
// transpose_into's tiles).
template <typename T>
at::Tensor with_contiguous_rows(const at::Tensor& a) {
  if (rows_contiguous(a)) return a;
  if (a.stride(0) != 1) return a.contiguous();
  const int64_t m = a.size(0), k = a.size(1);
  at::Tensor rows = at::empty({m, k}, a.options());
  transpose_into(rows.data_ptr<T>(), k, a.data_ptr<T>(), a.stride(1), m, k);  // a's rows are columns in memory
  return rows;
}

// The most rows a step GEMM gives SmallGemm where MKL runs at its own rate; more go to MKL
// or at::mm (small_gemm_applies).
constexpr int64_t kSmallGemmRows = 32;

// out [M, N] = a [M, K] @ op(weight) for few rows M. op(weight) is packed once into panels
// of kPanel columns ([K, kPanel] each, zero past N), so a step streams each panel once per 4
// rows of a; 4 rows x 2 vectors of accumulators stay in registers through the K loop.
template <typename T>
class SmallGemm {
  using V = at::vec::Vectorized<T>;

 public:
  static constexpr int64_t kPanel = 2 * V::size();

  SmallGemm(const at::Tensor& weight, bool transpose, int64_t rows)
      : m_(rows), n_(transpose ? weight.size(0) : weight.size(1)), k_(transpose ? weight.size(1) : weight.size(0)),
        panels_((n_ + kPanel - 1) / kPanel) {
    packed_ = at::empty({panels_ * k_ * kPanel}, weight.options());
    T* packed = packed_.data_ptr<T>();
    const T* w = weight.data_ptr<T>();
    const int64_t row_stride = weight.stride(0);
    for (int64_t p = 0; p < panels_; ++p) {
      const int64_t columns = std::min(kPanel, n_ - p * kPanel);
      T* dst = packed + p * k_ * kPanel;
      if (columns < kPanel) std::fill_n(dst, k_ * kPanel, T(0));
      if (transpose) {  // W^T's columns are weight's rows
        transpose_into(dst, kPanel, w + p * kPanel * row_stride, row_stride, k_, columns);
      } else {
        for (int64_t k = 0; k < k_; ++k) std::copy_n(w + k * row_stride + p * kPanel, columns, dst + k * kPanel);
      }
    }
  }

  void run(const T* a, T* out, int64_t ldc) const { run_rows(a, k_, m_, out, ldc, /*accumulate=*/false); }

  // out (+)= a @ op(weight) for m rows of a (lda apart), whatever rows the constructor was
  // given: each panel passes over all m rows while it stays in L1.
  void run_rows(const T* a, int64_t lda, int64_t m, T* out, int64_t ldc, bool accumulate) const {
    const T* packed = packed_.data_ptr<T>();
    for (int64_t p = 0; p < panels_; ++p) {
      const T* panel = packed + p * k_ * kPanel;
      const int64_t columns = std::min(kPanel, n_ - p * kPanel);
      T* out_panel = out + p * kPanel;
      int64_t r = 0;
      for (; r + 4 <= m; r += 4) block<4>(a + r * lda, lda, panel, out_panel + r * ldc, ldc, columns, accumulate);
      switch (m - r) {
        case 3: block<3>(a + r * lda, lda, panel, out_panel + r * ldc, ldc, columns, accumulate); break;
        case 2: block<2>(a + r * lda, lda, panel, out_panel + r * ldc, ldc, columns, accumulate); break;
        case 1: single_row(a + r * lda, panel, out_panel + r * ldc, columns, accumulate); break;
        default: break;
      }
    }
  }

 private:
  // kRows rows of a times one panel. Accumulators are named, not an array: GCC keeps named
  // vectors in registers but spills an array of them.
  template <int kRows>
  void block(const T* a, int64_t lda, const T* panel, T* out, int64_t ldc, int64_t columns, bool accumulate) const {
    V c00(T(0)), c01(T(0)), c10(T(0)), c11(T(0)), c20(T(0)), c21(T(0)), c30(T(0)), c31(T(0));
    for (int64_t k = 0; k < k_; ++k) {
      const V b0 = V::loadu(panel + k * kPanel), b1 = V::loadu(panel + k * kPanel + V::size());
      const V a0(a[k]);
      c00 = at::vec::fmadd(a0, b0, c00);
      c01 = at::vec::fmadd(a0, b1, c01);
      if constexpr (kRows > 1) {
        const V a1(a[lda + k]);
        c10 = at::vec::fmadd(a1, b0, c10);
        c11 = at::vec::fmadd(a1, b1, c11);
      }
      if constexpr (kRows > 2) {
        const V a2(a[2 * lda + k]);
        c20 = at::vec::fmadd(a2, b0, c20);
        c21 = at::vec::fmadd(a2, b1, c21);
      }
      if constexpr (kRows > 3) {
        const V a3(a[3 * lda + k]);
        c30 = at::vec::fmadd(a3, b0, c30);
        c31 = at::vec::fmadd(a3, b1, c31);
      }
    }
    store(c00, c01, out, columns, accumulate);
    if constexpr (kRows > 1) store(c10, c11, out + ldc, columns, accumulate);
    if constexpr (kRows > 2) store(c20, c21, out + 2 * ldc, columns, accumulate);
    if constexpr (kRows > 3) store(c30, c31, out + 3 * ldc, columns, accumulate);
  }

  // One row times one panel. With a single row the two accumulators of block<1> would make
  // each step's FMA wait for the previous one's result (a latency-bound GEMV, as a B=1
  // serving call runs); four slices of K in eight accumulators keep the FMA units busy,
  // and the slices are summed at the end.
  void single_row(const T* a, const T* panel, T* out, int64_t columns, bool accumulate) const {
    constexpr int64_t width = V::size();
    V c0(T(0)), c1(T(0)), c2(T(0)), c3(T(0)), c4(T(0)), c5(T(0)), c6(T(0)), c7(T(0));
    int64_t k = 0;
    for (; k + 4 <= k_; k += 4) {
      const T* b = panel + k * kPanel;
      const V a0(a[k]), a1(a[k + 1]), a2(a[k + 2]), a3(a[k + 3]);
      c0 = at::vec::fmadd(a0, V::loadu(b), c0);
      c1 = at::vec::fmadd(a0, V::loadu(b + width), c1);
      c2 = at::vec::fmadd(a1, V::loadu(b + kPanel), c2);
      c3 = at::vec::fmadd(a1, V::loadu(b + kPanel + width), c3);
      c4 = at::vec::fmadd(a2, V::loadu(b + 2 * kPanel), c4);
      c5 = at::vec::fmadd(a2, V::loadu(b + 2 * kPanel + width), c5);
      c6 = at::vec::fmadd(a3, V::loadu(b + 3 * kPanel), c6);
      c7 = at::vec::fmadd(a3, V::loadu(b + 3 * kPanel + width), c7);
    }
    for (; k < k_; ++k) {
      const V a0(a[k]);
      c0 = at::vec::fmadd(a0, V::loadu(panel + k * kPanel), c0);
      c1 = at::vec::fmadd(a0, V::loadu(panel + k * kPanel + width), c1);
    }
    store((c0 + c2) + (c4 + c6), (c1 + c3) + (c5 + c7), out, columns, accumulate);
  }

  static void store(V low, V high, T* out, int64_t columns, bool accumulate) {
    constexpr int64_t width = V::size();
    if (accumulate) {
      low = low + V::loadu(out, static_cast<int>(std::min(columns, width)));
      if (columns > width) high = high + V::loadu(out + width, static_cast<int>(std::min(columns - width, width)));
    }
    if (columns >= 2 * width) {
      low.store(out);
      high.store(out + width);
    } else if (columns > width) {
      low.store(out);
      high.store(out + width, static_cast<int>(columns - width));
    } else {
      low.store(out, static_cast<int>(columns));
    }
  }

  at::Tensor packed_;
  int64_t m_, n_, k_, panels_;
};

// Whether this library runs vector code (AVX2 or AVX-512) on an AMD CPU. MKL takes its
// AVX2 kernels there whatever the build, and SmallGemm's kernel outruns its packed GEMM on
// the step GEMMs' shapes in both builds (docs/CPU.md).
inline bool amd_vector_build() {
#if (defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)) && defined(__x86_64__) && defined(__GNUC__)
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

// Whether the host code's GEMMs (all steps' rows: the input projection, the weight
// gradients, grad_x) run on SmallGemm's kernel instead of MKL's: on AMD CPUs with the
// AVX-512 build, where MKL runs at half the rate of this one on the host shapes. Against
// the AVX2 build's kernel MKL holds its own there (docs/CPU.md).
inline bool panel_gemm_preferred() {
#if defined(CPU_CAPABILITY_AVX512)
  return amd_vector_build();
#else
  return false;
#endif
}

// Whether SmallGemm runs a step GEMM of `rows` rows of this dtype: on real vector code only
// (the default capability's at::vec is plain arrays, slower than MKL's own dispatch), up to
// kSmallGemmRows rows, or for any rows on AMD CPUs (amd_vector_build).
inline bool small_gemm_applies(at::ScalarType dtype, int64_t rows) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const bool kernel_wins = rows <= kSmallGemmRows || amd_vector_build();
  return rows > 0 && kernel_wins && (dtype == at::kFloat || dtype == at::kDouble);
#else
  (void)dtype;
  (void)rows;
  return false;
#endif
}

// out (+)= a @ b on SmallGemm's kernel for any number of rows (float or double; a and b of
// any strides, out's rows contiguous): b packed once, a's rows in chunks over torch's threads.
template <typename T>
void panel_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t m = a.size(0), k = a.size(1);
  if (m == 0 || out.size(1) == 0) return;
  const SmallGemm<T> gemm = rows_contiguous(b) ? SmallGemm<T>(b, /*transpose=*/false, m)
                            : b.stride(0) == 1 ? SmallGemm<T>(b.t(), /*transpose=*/true, m)
                                               : SmallGemm<T>(b.contiguous(), /*transpose=*/false, m);
  const at::Tensor rows = with_contiguous_rows<T>(a);
  const T* a_rows = rows.data_ptr<T>();
  const int64_t lda = m > 1 ? rows.stride(0) : k, ldc = out.size(0) > 1 ? out.stride(0) : out.size(1);
  T* out_rows = out.data_ptr<T>();
  // Chunks of rows whose slice of a stays in L1 while every panel passes over it.
  constexpr int64_t kRowChunk = 64;
  at::parallel_for(0, m, kRowChunk, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r += kRowChunk) {
      gemm.run_rows(a_rows + r * lda, lda, std::min(kRowChunk, end - r), out_rows + r * ldc, ldc, accumulate);
    }
  });
}

// kRows rows of a (k apart) times all n rows of W (ldw apart), two rows of W at a time:
// out[r, j] = a[r, :] . W[j, :]. Each load of a serves two rows of W and each load of W
// kRows rows of a; the 2 x kRows accumulators are named, as SmallGemm::block's.
template <typename T, int kRows>
void dot_block(const T* a, int64_t k, const T* w, int64_t ldw, int64_t n, T* out, int64_t ldc) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t width = V::size();
  const int64_t vectors_end = k - k % width;
  // Row x of a against row wj of W: the lanes of the vector sum plus the columns past the
  // last vector.
  const auto finish = [k, vectors_end](const V& partial, const T* x, const T* wj) {
    T total = at::vec::vec_reduce_all<T>([](V u, V v) { return u + v; }, partial);
    for (int64_t i = vectors_end; i < k; ++i) total += x[i] * wj[i];
    return total;
  };
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const T *w0 = w + j * ldw, *w1 = w0 + ldw;
    V c00(T(0)), c01(T(0)), c10(T(0)), c11(T(0)), c20(T(0)), c21(T(0)), c30(T(0)), c31(T(0));
    for (int64_t i = 0; i < vectors_end; i += width) {
      const V b0 = V::loadu(w0 + i), b1 = V::loadu(w1 + i);
      const V x0 = V::loadu(a + i);
      c00 = at::vec::fmadd(x0, b0, c00);
      c01 = at::vec::fmadd(x0, b1, c01);
      if constexpr (kRows > 1) {
        const V x1 = V::loadu(a + k + i);
        c10 = at::vec::fmadd(x1, b0, c10);
        c11 = at::vec::fmadd(x1, b1, c11);
      }
      if constexpr (kRows > 2) {
        const V x2 = V::loadu(a + 2 * k + i);
        c20 = at::vec::fmadd(x2, b0, c20);
        c21 = at::vec::fmadd(x2, b1, c21);
      }
      if constexpr (kRows > 3) {
        const V x3 = V::loadu(a + 3 * k + i);
        c30 = at::vec::fmadd(x3, b0, c30);
        c31 = at::vec::fmadd(x3, b1, c31);
      }
    }
    const V* sums[4][2] = {{&c00, &c01}, {&c10, &c11}, {&c20, &c21}, {&c30, &c31}};
    for (int r = 0; r < kRows; ++r) {
      out[r * ldc + j] = finish(*sums[r][0], a + r * k, w0);
      out[r * ldc + j + 1] = finish(*sums[r][1], a + r * k, w1);
    }
  }
  if (j < n) {  // W's last row, odd n
    const T* wj = w + j * ldw;
    for (int r = 0; r < kRows; ++r) {
      V c(T(0));
      for (int64_t i = 0; i < vectors_end; i += width) c = at::vec::fmadd(V::loadu(a + r * k + i), V::loadu(wj + i), c);
      out[r * ldc + j] = finish(c, a + r * k, wj);
    }
  }
}

// out [M, N] = a [M, K] @ W^T, a contiguous, W [N, K] with rows ldw apart, as dot products
// of W's rows with a's, W read as it is: a one-step product of a few rows, where packing W
// would cost more than the product (chosen_step_kernel). Four rows of a at a time.
template <typename T>
void dot_rows(const T* a, int64_t m, int64_t k, const T* w, int64_t ldw, int64_t n, T* out, int64_t ldc) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) dot_block<T, 4>(a + r * k, k, w, ldw, n, out + r * ldc, ldc);
  switch (m - r) {
    case 3: dot_block<T, 3>(a + r * k, k, w, ldw, n, out + r * ldc, ldc); break;
    case 2: dot_block<T, 2>(a + r * k, k, w, ldw, n, out + r * ldc, ldc); break;
    case 1: dot_block<T, 1>(a + r * k, k, w, ldw, n, out + r * ldc, ldc); break;
    default: break;
  }
}

// A step GEMM's kernel (float32 and float64 operands; bfloat16 ones take Bf16Gemm): SmallGemm,
// SmallGemm with the operands' roles swapped (kSmallSwapped, below), dot_rows, MKL's packed
// GEMM, or at::mm_out.
enum class StepKernel { kSmall, kSmallSwapped, kDotRows, kMklPacked, kAten };

inline bool mkl_packed_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}

// Whether a product that runs once (a one-step call) is cheaper with SmallGemm's operands
// swapped: out^T [N, M] = W [N, K] @ a^T, a's M rows packed as the panel's columns and W's
// rows read where they are, then out^T transposed into out. Packing W, N x K elements,
// costs about what the product does for a few rows of a; a swapped product pays instead
// for the panel's columns past M, and reads W from L2 once per panel. So it runs on one
// panel whose columns past M are at most half a vector (docs/CPU.md).
template <typename T>
bool swapped_product_cheaper(int64_t rows) {
  constexpr int64_t panel = SmallGemm<T>::kPanel, width = at::vec::Vectorized<T>::size();
  return rows <= panel && panel - rows <= width / 2;
}

// Whether a product that runs once is cheaper as dot_rows: for up to half a vector of
// rows, where the pack of W costs more than the product and dot_rows' horizontal sums less
// (docs/CPU.md).
template <typename T>
bool dot_rows_cheaper(int64_t rows) {
  return rows <= at::vec::Vectorized<T>::size() / 2;
}

// Where SmallGemm applies, the kernel of a product that runs once with the weight
// transposed: one that reads W as it is where that is cheaper, else SmallGemm's pack.
template <typename T>
StepKernel one_step_kernel(int64_t rows) {
  if (dot_rows_cheaper<T>(rows)) return StepKernel::kDotRows;
  return swapped_product_cheaper<T>(rows) ? StepKernel::kSmallSwapped : StepKernel::kSmall;
}

// The kernel a step GEMM of `rows` rows of this dtype takes; `once`: it runs once, with
// the weight transposed (one_step_kernel).
inline StepKernel chosen_step_kernel(at::ScalarType dtype, int64_t rows, bool once = false) {
  if (small_gemm_applies(dtype, rows)) {
    if (!once) return StepKernel::kSmall;
    return dtype == at::kFloat ? one_step_kernel<float>(rows) : one_step_kernel<double>(rows);
  }
  if (dtype == at::kFloat && rows > 0 && mkl_packed_available()) return StepKernel::kMklPacked;
  return StepKernel::kAten;
}

// out [M, N] = a [M, K] @ op(weight), op(weight) [K, N] packed once at construction.
class StepGemm {
 public:
  // weight: [N, K] used transposed (transpose=true) or [K, N] as is; rows contiguous
  // (stride 1 along them), any row stride: a slice of columns packs without a copy.
  // bf16: multiply in bfloat16 (Bf16Gemm; bf16_operands() must hold for the weight's dtype).
  // once: the product runs once (a one-step call; see swapped_product_cheaper).
  // kernel: chosen_step_kernel's by default; tests name each one.
  StepGemm(const at::Tensor& weight, bool transpose, int64_t rows, bool bf16 = false, bool once = false,
           c10::optional<StepKernel> kernel = c10::nullopt)
      : weight_(weight), transpose_(transpose), m_(rows), n_(transpose ? weight.size(0) : weight.size(1)),
        k_(transpose ? weight.size(1) : weight.size(0)) {
    TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1, "StepGemm: weight rows must be contiguous, got strides ",
                weight.strides());
    if (bf16) {
      bf16_ = std::make_unique<Bf16Gemm>(weight, transpose);
      return;
    }
    const at::ScalarType dtype = weight.scalar_type();
    kernel_ = kernel.value_or(chosen_step_kernel(dtype, m_, once && transpose));
    switch (kernel_) {
      case StepKernel::kSmall:
        TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "StepGemm: SmallGemm takes float32 or float64, got ",
                    dtype);
        if (dtype == at::kFloat) {
          small_float_ = std::make_unique<SmallGemm<float>>(weight, transpose, m_);
        } else {
          small_double_ = std::make_unique<SmallGemm<double>>(weight, transpose, m_);
        }
        return;
      case StepKernel::kSmallSwapped:
      case StepKernel::kDotRows:  // nothing of W packed (the swapped kernel packs a as it runs)
        TORCH_CHECK((dtype == at::kFloat || dtype == at::kDouble) && transpose, "StepGemm: ",
                    kernel_ == StepKernel::kDotRows ? "dot_rows" : "the swapped SmallGemm",
                    " takes float32 or float64 and a transposed weight, got ", dtype, " and transpose=", transpose);
        return;
      case StepKernel::kMklPacked: {
        TORCH_CHECK(mkl_packed_available() && dtype == at::kFloat && weight.is_cpu() && m_ > 0,
                    "StepGemm: MKL's packed GEMM needs float32 CPU operands, at least one row and a torch build that "
                    "exports it");
        const size_t bytes = cblas_sgemm_pack_get_size(kCblasBMatrix, m_, n_, k_);
        packed_ = at::empty({static_cast<int64_t>(bytes)}, weight.options().dtype(at::kByte));
        cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, transpose ? kCblasTrans : kCblasNoTrans, m_, n_, k_, 1.0f,
                         weight.data_ptr<float>(), weight.stride(0), reinterpret_cast<float*>(packed_.data_ptr()));
        return;
      }
      case StepKernel::kAten:
        return;
    }
  }

  // out [M, N] = a [M, K] @ op(weight), a contiguous, rows of out out_stride apart (N by
  // default), by raw pointer: no dispatcher call on the packed path, which runs once a step.
  template <typename T>
  void run(const T* a, T* out, int64_t out_stride = -1) const {
    const int64_t ldc = out_stride < 0 ? n_ : out_stride;
    if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
      if (kernel_ == StepKernel::kSmallSwapped) {
        run_swapped(a, out, ldc);
        return;
      }
      if (kernel_ == StepKernel::kDotRows) {
        dot_rows(a, m_, k_, weight_.data_ptr<T>(), weight_.stride(0), n_, out, ldc);
        return;
      }
    }
    if constexpr (std::is_same<T, float>::value) {
      if (bf16_) {
        bf16_->run(a, k_, m_, out, ldc, /*accumulate=*/false);
        return;
      }
      if (small_float_) {
        small_float_->run(a, out, ldc);
        return;
      }
    } else if constexpr (std::is_same<T, double>::value) {
      if (small_double_) {
        small_double_->run(a, out, ldc);
        return;
      }
    }
    if constexpr (std::is_same<T, float>::value) {
      if (packed_.defined()) {
        cblas_sgemm_compute(kCblasRowMajor, kCblasNoTrans, kCblasPacked, m_, n_, k_, a, k_,
                            reinterpret_cast<const float*>(packed_.data_ptr()), n_, 0.0f, out, ldc);
        return;
      }
    }
    // Tasks of at::parallel_for run on threads without the caller's thread-local dispatch
    // state: without this guard the product would meet autograd there (weight_ may be a
    // view of a parameter).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto options = weight_.options();
    at::Tensor result = at::from_blob(out, {m_, n_}, {ldc, 1}, options);
    at::mm_out(result, at::from_blob(const_cast<T*>(a), {m_, k_}, options), transpose_ ? weight_.t() : weight_);
  }

 private:
  // out [M, N] = (W [N, K] @ a^T)^T: a^T packed as SmallGemm's panels, W's rows as its rows.
  template <typename T>
  void run_swapped(const T* a, T* out, int64_t ldc) const {
    const auto options = weight_.options();
    const SmallGemm<T> gemm(at::from_blob(const_cast<T*>(a), {m_, k_}, options), /*transpose=*/true, n_);
    const at::Tensor product = at::empty({n_, m_}, options);  // out^T
    gemm.run_rows(weight_.data_ptr<T>(), weight_.stride(0), n_, product.data_ptr<T>(), m_, /*accumulate=*/false);
    transpose_into(out, ldc, product.data_ptr<T>(), m_, m_, n_);
  }

  at::Tensor weight_, packed_;
  std::unique_ptr<SmallGemm<float>> small_float_;  // the small-batch kernel, where it applies
  std::unique_ptr<SmallGemm<double>> small_double_;
  std::unique_ptr<Bf16Gemm> bf16_;  // bfloat16 operands, where the layer asks for them
  bool transpose_;
  StepKernel kernel_ = StepKernel::kAten;  // the kernel chosen (bf16_ runs instead where set)
  int64_t m_, n_, k_;
};

}  // namespace bnlstm
