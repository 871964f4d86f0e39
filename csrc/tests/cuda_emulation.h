// A CPU stand-in for the parts of CUDA that csrc/recurrent_cuda.cu uses, so that its kernels
// and host code can run on CPU tensors where no GPU is at hand (tests/run_cuda_emulation.py).
// Each block runs on its own set of std::threads, one per CUDA thread, blocks one after the
// other; __shared__ variables become function statics (one block at a time uses them) and
// __syncthreads a std::barrier over the block's threads. Missing barriers, wrong indexing and
// wrong host-side pointer arithmetic show up as wrong results, as they would on a GPU; what
// this cannot show: the GPU's memory model beyond barriers, warp-level timing, performance.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
inline thread_local std::barrier<>* emulated_block_barrier = nullptr;

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
using std::exp;
using std::tanh;
using std::min;
using std::max;
inline float expf(float x) { return std::exp(x); }
inline float tanhf(float x) { return std::tanh(x); }

using cudaStream_t = int;
inline void __trap() { std::abort(); }
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }

// Half-precision types: c10's have the same bits and round to nearest even, as CUDA's do.
using __nv_bfloat16 = c10::BFloat16;
using __half = c10::Half;
inline __nv_bfloat16 __float2bfloat16(float v) { return __nv_bfloat16(v); }
inline __half __float2half(float v) { return __half(v); }

// A float32 matrix rounded to TF32 (10 of float32's 23 mantissa bits, to nearest even), as
// a tensor core reads float32 operands; finite values only, which is all the tests have.
inline at::Tensor round_to_tf32(const at::Tensor& m) {
  const at::Tensor bits = m.contiguous().view(at::kInt);
  const at::Tensor rounded = (bits + 0xfff + bits.bitwise_right_shift(13).bitwise_and(1)).bitwise_and(~0x1fff);
  return rounded.view(at::kFloat);
}

// WMMA (16 x 16 x 16 tiles, half-precision operands, float accumulators). A fragment is
// spread over a warp's registers on a GPU and is opaque to the code; here the warp's lane 0
// holds the whole tile and does the warp's work, the other lanes' calls do nothing. That is
// the API's contract as seen through load, mma and store: a tile in memory in, the product
// of the tiles out, accumulated in float32 (each product of two half-precision values is
// exact in float32; the order of the sums is not the tensor core's).
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has 16 x 16 x 16 tiles only");
  static constexpr int num_elements = 256;
  T x[256];
};

inline bool holds_fragments() { return threadIdx.x % 32 == 0; }

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T value) {
  if (holds_fragments()) std::fill(f.x, f.x + 256, value);
}

template <typename T>  // x[r * 16 + k] = A(r, k)
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  if (!holds_fragments()) return;
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) f.x[r * 16 + k] = p[r * ldm + k];
}

template <typename T>  // x[k * 16 + n] = B(k, n), stored column by column
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  if (!holds_fragments()) return;
  for (int n = 0; n < 16; ++n)
    for (int k = 0; k < 16; ++k) f.x[k * 16 + n] = p[n * ldm + k];
}

template <typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!holds_fragments()) return;
  float product[256];
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) {
      float sum = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) sum += static_cast<float>(a.x[r * 16 + k]) * static_cast<float>(b.x[k * 16 + n]);
      product[r * 16 + n] = sum;
    }
  }
  std::copy(product, product + 256, d.x);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  if (!holds_fragments()) return;
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      if (layout == mem_row_major) p[r * ldm + n] = f.x[r * 16 + n];
      else p[n * ldm + r] = f.x[r * 16 + n];
    }
}
}  // namespace wmma
}  // namespace nvcuda

// kernel<<<grid, block, 0, stream>>>(args...), run on the CPU.
template <typename Kernel, typename... Args>
void emulated_launch(Kernel kernel, dim3 grid, dim3 block, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            blockDim = block;
            gridDim = grid;
            emulated_block_barrier = &barrier;
            kernel(args...);
            // A thread that returns early leaves the barrier, as a finished CUDA thread no
            // longer counts at __syncthreads.
            barrier.arrive_and_drop();
          });
        }
        for (std::thread& thread : pool) thread.join();
      }
    }
  }
}

#define BNLSTM_LAUNCH(kernel, grid, block, stream, ...) emulated_launch(kernel, dim3(grid), dim3(block), __VA_ARGS__)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
