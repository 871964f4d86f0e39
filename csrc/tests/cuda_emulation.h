// A CPU stand-in for the parts of CUDA that csrc/recurrent_cuda.cu uses, so that its kernels
// and host code can run on CPU tensors where no GPU is at hand (tests/run_cuda_emulation.py).
// Each block runs on its own set of std::threads, one per CUDA thread, blocks one after the
// other; __shared__ variables become function statics (one block at a time uses them) and
// __syncthreads a std::barrier over the block's threads. Missing barriers, wrong indexing and
// wrong host-side pointer arithmetic show up as wrong results, as they would on a GPU; what
// this cannot show: the GPU's memory model beyond barriers, warp-level timing, performance.
#pragma once

#include <ATen/ATen.h>

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
