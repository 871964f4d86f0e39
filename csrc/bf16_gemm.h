// Matrix products with bfloat16 operands, float32 accumulation and float32 results, on the
// CPU's AVX512_BF16 dot product (vdpbf16ps sums two bf16 products into each float32 lane:
// twice the products per instruction of a float32 FMA). Half-precision inputs ask for them
// (LayerFlags::operand_dtype = bfloat16): their operands arrive in float32 and are rounded
// to bfloat16 (to nearest even) here, as the CUDA kernels round h_{t-1} and W_hh for their
// tensor cores. vdpbf16ps treats denormal inputs and results as zero, as oneDNN's bf16
// kernels do. Where the CPU lacks the instruction, or the library is built for other vector
// code than AVX-512, bf16_dot_available() is false and the products stay float32.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace bnlstm {

// Whether the bf16 kernels run: built for AVX-512 and the CPU reports AVX512_BF16.
bool bf16_dot_available();

// Whether a layer with this operand_dtype and compute dtype multiplies in bfloat16.
inline bool bf16_operands(at::ScalarType operand_dtype, at::ScalarType compute_dtype) {
  return operand_dtype == at::kBFloat16 && compute_dtype == at::kFloat && bf16_dot_available();
}

// out [M, N] = a [M, K] @ op(b), or out += with accumulate, op(b) rounded to bfloat16 and
// packed once at construction: b [K, N] as is (transpose=false) or b [N, K] used transposed;
// b's rows contiguous, any row stride. Each run rounds a's rows as it goes.
class Bf16Gemm {
 public:
  Bf16Gemm(const at::Tensor& b, bool transpose);

  // a: m rows of K floats, lda apart (a_transposed: K rows of m floats, lda apart, a's
  // columns); out: m rows of N floats, ldc apart.
  void run(const float* a, int64_t lda, int64_t m, float* out, int64_t ldc, bool accumulate,
           bool a_transposed = false) const;

  // Columns in a packed panel: two vectors of 16 float32 accumulators.
  static constexpr int64_t kPanel = 32;

 private:
  at::Tensor packed_;  // int32 [panels, pairs, kPanel]: op(b)[2q, n] in the low and op(b)[2q + 1, n] in the high half
  int64_t k_, n_, pairs_, panels_;
};

// out (+)= a @ b for float32 matrices of any strides (out's rows contiguous), operands rounded
// to bfloat16. Requires bf16_dot_available().
void bf16_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

}  // namespace bnlstm
