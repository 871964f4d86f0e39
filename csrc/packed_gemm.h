// The per-step GEMMs multiply by the same W_hh at every step. MKL's packed GEMM packs W_hh
// once per call instead of once per step (a fifth of a small step GEMM's time). The MKL
// symbols are declared weak: where this torch build does not export them (other BLAS,
// other platforms) they are null and every product goes through at::mm_out.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cstddef>
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

// out [M, N] = a [M, K] @ op(weight), op(weight) [K, N] packed once at construction.
class StepGemm {
 public:
  // weight: [N, K] used transposed (transpose=true) or [K, N] as is; rows contiguous
  // (stride 1 along them), any row stride: a slice of columns packs without a copy.
  StepGemm(const at::Tensor& weight, bool transpose, int64_t rows)
      : weight_(weight), transpose_(transpose), m_(rows), n_(transpose ? weight.size(0) : weight.size(1)),
        k_(transpose ? weight.size(1) : weight.size(0)) {
    TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1, "StepGemm: weight rows must be contiguous, got strides ",
                weight.strides());
    const bool mkl = cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
                     cblas_sgemm_compute != nullptr;
    if (mkl && weight.scalar_type() == at::kFloat && weight.is_cpu() && m_ > 0) {
      const size_t bytes = cblas_sgemm_pack_get_size(kCblasBMatrix, m_, n_, k_);
      packed_ = at::empty({static_cast<int64_t>(bytes)}, weight.options().dtype(at::kByte));
      cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, transpose ? kCblasTrans : kCblasNoTrans, m_, n_, k_, 1.0f,
                       weight.data_ptr<float>(), weight.stride(0), reinterpret_cast<float*>(packed_.data_ptr()));
    }
  }

  // out [M, N] = a [M, K] @ op(weight), a contiguous, rows of out out_stride apart (N by
  // default), by raw pointer: no dispatcher call on the packed path, which runs once a step.
  template <typename T>
  void run(const T* a, T* out, int64_t out_stride = -1) const {
    const int64_t ldc = out_stride < 0 ? n_ : out_stride;
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
  at::Tensor weight_, packed_;
  bool transpose_;
  int64_t m_, n_, k_;
};

}  // namespace bnlstm
