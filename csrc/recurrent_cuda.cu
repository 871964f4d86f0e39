// The recurrent part of the BN-LSTM layer on CUDA GPUs. Per step, one fused kernel
// (docs/SEMANTICS.md):
//
//   gates_t = BN(W_ih x_t; gamma_ih, 0) + BN(W_hh h_{t-1}; gamma_hh, 0) + bias
//   c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
//   h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))
//
// The recurrent GEMM h_{t-1} W_hh^T: for float16/bfloat16 inputs, inside the step kernel on
// tensor cores (WMMA, operands in the input's dtype, fp32 accumulation: one launch a step);
// for float32 (cuBLAS honours allow_tf32) and float64, through cuBLAS before the kernel
// (at::mm_out into one buffer allocated before the loop), since CUDA-core FMAs inside a few
// blocks could not match cuBLAS spread over the whole GPU.
//
// A thread block owns kUnits hidden units with their four gate columns and the whole batch
// (threads: kUnits units x kRows row lanes; each lane loops over rows b = lane, lane +
// kRows, ...), so every batch statistic it needs is a reduction over rows it holds, done in
// shared memory inside the block; blocks never exchange data within a launch. The backward
// pass mirrors it: one fused kernel per step, then the GEMM for dh_{t-1}.
//
// Exactly the computation of recurrent_cpu.cpp (same statistics, same reserve layout, same
// masking); step-wise input statistics are computed for all steps by one kernel before the
// loop instead of inside each step. No host synchronisation: counts and masks stay on the
// device, so a training step can be captured in a CUDA graph.
#include "bnlstm.h"

#ifdef BNLSTM_CUDA_EMULATION
// The same code on CPU tensors, for checking where no GPU is at hand (tests/run_cuda_emulation.py).
#include "tests/cuda_emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#define BNLSTM_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

// bfloat16 WMMA needs sm_80; builds for older architectures get a kernel that traps there,
// which the host never launches (half_inputs_on_tensor_cores checks the device).
#if defined(BNLSTM_CUDA_EMULATION) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define BNLSTM_HAS_WMMA_BF16 1
#else
#define BNLSTM_HAS_WMMA_BF16 0
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

namespace bnlstm {
namespace {

// Threads per block of the step kernels: kUnits hidden units x kRows row lanes.
constexpr int kThreads = 256;
// Input statistics kernel: 32 feature columns (one warp, 128-byte rows in float32) x 8 lanes.
constexpr int kStatColumns = 32;
constexpr int kStatRows = 8;

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }
__device__ __forceinline__ float rsqrt_(float x) { return rsqrtf(x); }
__device__ __forceinline__ double rsqrt_(double x) { return rsqrt(x); }

template <typename T>
__device__ __forceinline__ T sigmoid_(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// Sums v[0..N) over the kRows lanes that share a hidden unit (threads j, j + kUnits, ...):
// every thread of the block must call it (it holds barriers); on return each thread holds
// the sums of its unit. scratch: N * kThreads values of shared memory.
template <int N, int kUnits, typename T>
__device__ __forceinline__ void sum_over_lanes(T (&v)[N], T* scratch) {
  constexpr int kRows = kThreads / kUnits;
  const int j = threadIdx.x % kUnits, lane = threadIdx.x / kUnits;
#pragma unroll
  for (int n = 0; n < N; ++n) scratch[(n * kRows + lane) * kUnits + j] = v[n];
  __syncthreads();
#pragma unroll
  for (int stride = kRows / 2; stride > 0; stride /= 2) {
    if (lane < stride) {
#pragma unroll
      for (int n = 0; n < N; ++n) {
        scratch[(n * kRows + lane) * kUnits + j] += scratch[(n * kRows + lane + stride) * kUnits + j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int n = 0; n < N; ++n) v[n] = scratch[(n * kRows) * kUnits + j];
  __syncthreads();  // scratch may be reused after this
}

// ---------------------------------------------------------------------------------------
// Input statistics of step-wise variants, for all steps at once (grid: steps x column
// tiles). Training: mean and biased variance of W_ih x_t over the active rows of each step
// (the CPU's masked_moments); evaluation: rows min(start_step + t, S - 1) of the running
// statistics. The step kernel reads them back.
template <typename T>
__global__ void __launch_bounds__(kStatColumns * kStatRows)
    bnlstm_input_stats_kernel(const T* __restrict__ wx,          // [T, B, 4H]
                              const bool* __restrict__ active,   // [T, B]
                              const int64_t* __restrict__ counts,  // [T]
                              int64_t batch, int64_t features,
                              const T* __restrict__ given_mean,  // [S, 4H] or null (training)
                              const T* __restrict__ given_var, int64_t slots, int64_t start_step,
                              T* __restrict__ mean,               // [T, 4H]
                              T* __restrict__ var) {
  __shared__ T scratch[kStatRows][kStatColumns];
  const int64_t t = blockIdx.x;
  const int64_t k = int64_t(blockIdx.y) * kStatColumns + threadIdx.x;
  const int lane = threadIdx.y;
  const bool valid = k < features;
  if (given_mean != nullptr) {  // uniform over the block: no barrier is skipped by some only
    if (valid && lane == 0) {
      const int64_t row = min(start_step + t, slots - 1);
      mean[t * features + k] = given_mean[row * features + k];
      var[t * features + k] = given_var[row * features + k];
    }
    return;
  }
  const int64_t count = counts[t];
  const T inv_count = T(1) / T(count > 1 ? count : 1);
  const T* z = wx + t * batch * features;
  const bool* act = active + t * batch;
  // Two passes over the rows, as the CPU: the mean, then the centred sum of squares.
  T sum = T(0);
  if (valid) {
    for (int64_t b = lane; b < batch; b += kStatRows) {
      if (act[b]) sum += z[b * features + k];
    }
  }
  scratch[lane][threadIdx.x] = sum;
  __syncthreads();
  T m = T(0);
  for (int l = 0; l < kStatRows; ++l) m += scratch[l][threadIdx.x];
  m *= inv_count;
  __syncthreads();
  T squares = T(0);
  if (valid) {
    for (int64_t b = lane; b < batch; b += kStatRows) {
      if (act[b]) {
        const T d = z[b * features + k] - m;
        squares += d * d;
      }
    }
  }
  scratch[lane][threadIdx.x] = squares;
  __syncthreads();
  if (valid && lane == 0) {
    T v = T(0);
    for (int l = 0; l < kStatRows; ++l) v += scratch[l][threadIdx.x];
    mean[t * features + k] = m;
    var[t * features + k] = v * inv_count;
  }
}

// ---------------------------------------------------------------------------------------
// The recurrent GEMM inside the forward step kernel, on tensor cores (float16/bfloat16
// operands, fp32 accumulation): zh[:, block's gate columns] = h_{t-1} W_hh[columns]^T.
// The block's 4 * kUnits columns are kUnits units of each gate, g * H + unit0 + j. Rows are
// taken kGemmRows at a time; K in chunks of kDepth staged in shared memory (zero past B and
// H, so any B and H work), each warp owning 16 x 16 output tiles. Each chunk waits once for
// its loads from L2, so chunks are as deep as shared memory allows: 128 for the narrow
// blocks a GPU with many multiprocessors gets (kUnits = 8 from H = 1024 on an H100).
constexpr int kWarps = kThreads / 32;
constexpr int kGemmRows = 64;
constexpr int kVector = 8;  // operands per 16-byte load

template <int kUnits>
struct GemmTiles {
  static constexpr int kColumns = 4 * kUnits;
  static constexpr int kColumnTiles = kColumns / 16;
  static constexpr int kDepth = kUnits == 8 ? 128 : (kUnits == 16 ? 64 : 32);
  // Staged rows hold kDepth operands plus 8 of padding: a multiple of 8 elements (WMMA's
  // ldm) that keeps every 16-row tile 32-byte aligned and shifts banks from row to row.
  static constexpr int kStageLd = kDepth + 8;
  static constexpr int kOutLd = kColumns + 4;  // floats; a multiple of 4, as WMMA needs
  static constexpr int kTilesPerWarp = (kGemmRows / 16) * kColumnTiles / kWarps;
  static constexpr int kStageBytes = (kGemmRows + kColumns) * kStageLd * 2;
  static constexpr int kOutBytes = kGemmRows * kOutLd * 4;
  static constexpr int kBytes = kStageBytes > kOutBytes ? kStageBytes : kOutBytes;
  static_assert(kColumns % 16 == 0 && (kGemmRows / 16) * kColumnTiles % kWarps == 0, "tiles must share out");
  static_assert(kBytes + 4 * kThreads * 4 <= 48 * 1024, "static shared memory is at most 48 KB");
};

// 16 bytes (kVector operands) at a 16-byte aligned address.
__device__ __forceinline__ uint4 load_16_bytes(const void* from) {
#ifdef BNLSTM_CUDA_EMULATION
  uint4 v;
  std::memcpy(&v, from, 16);
  return v;
#else
  return *reinterpret_cast<const uint4*>(from);
#endif
}

__device__ __forceinline__ void store_16_bytes(void* to, uint4 v) {
#ifdef BNLSTM_CUDA_EMULATION
  std::memcpy(to, &v, 16);
#else
  *reinterpret_cast<uint4*>(to) = v;
#endif
}

template <typename Operand>
__device__ __forceinline__ Operand to_operand(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 to_operand<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half to_operand<__half>(float v) { return __float2half(v); }

template <typename Operand, int kUnits>
__device__ __forceinline__ void recurrent_gemm_in_block(const Operand* __restrict__ h, const Operand* __restrict__ w,
                                                        float* zh, int64_t B, int64_t H, int64_t unit0,
                                                        unsigned char* smem) {
#if BNLSTM_HAS_WMMA_BF16
  namespace wmma = nvcuda::wmma;
  using Tiles = GemmTiles<kUnits>;
  constexpr int kLd = Tiles::kStageLd, kColumns = Tiles::kColumns, kDepth = Tiles::kDepth;
  Operand* a_stage = reinterpret_cast<Operand*>(smem);  // [kGemmRows][kLd]: rows of h
  Operand* b_stage = a_stage + kGemmRows * kLd;         // [kColumns][kLd]: rows of W_hh
  float* out_stage = reinterpret_cast<float*>(smem);    // [kGemmRows][kOutLd], after the K loop
  const int warp = threadIdx.x / 32;
  const int64_t G = 4 * H;
  const Operand zero = to_operand<Operand>(0.0f);
  for (int64_t row0 = 0; row0 < B; row0 += kGemmRows) {
    const int rows = static_cast<int>(min(int64_t(kGemmRows), B - row0));
    const int tiles = ((rows + 15) / 16) * Tiles::kColumnTiles;  // row tiles past B are skipped
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Tiles::kTilesPerWarp];
#pragma unroll
    for (int i = 0; i < Tiles::kTilesPerWarp; ++i) wmma::fill_fragment(acc[i], 0.0f);
    // The staged chunk times this warp's tiles, into the accumulators.
    auto multiply_chunk = [&]() {
#pragma unroll
      for (int kk = 0; kk < kDepth; kk += 16) {
#pragma unroll
        for (int i = 0; i < Tiles::kTilesPerWarp; ++i) {
          const int tile = warp + i * kWarps;
          if (tile < tiles) {  // uniform over the warp, as WMMA needs
            const int row_tile = tile / Tiles::kColumnTiles, column_tile = tile % Tiles::kColumnTiles;
            wmma::fragment<wmma::matrix_a, 16, 16, 16, Operand, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, Operand, wmma::col_major> b;
            wmma::load_matrix_sync(a, a_stage + row_tile * 16 * kLd + kk, kLd);
            wmma::load_matrix_sync(b, b_stage + column_tile * 16 * kLd + kk, kLd);
            wmma::mma_sync(acc[i], a, b, acc[i]);
          }
        }
      }
    };
    if (H % kVector == 0) {
      // Rows of h and W_hh are 16-byte aligned: 16-byte loads, all of a chunk's issued before
      // any is stored (a loop that stores each load waited for L2 once per pair of loads:
      // ptxas' code for the loop this replaced), and the next chunk's issued before the MMAs of
      // this one, so that their latency overlaps.
      constexpr int kSlices = kDepth / kVector;
      constexpr int kASlices = kGemmRows * kSlices / kThreads, kBSlices = kColumns * kSlices / kThreads;
      static_assert(kASlices * kThreads == kGemmRows * kSlices && kBSlices * kThreads == kColumns * kSlices,
                    "every thread stages the same number of slices");
      uint4 a_slices[kASlices], b_slices[kBSlices];
      auto load_chunk = [&](int64_t k0) {
#pragma unroll
        for (int i = 0; i < kASlices; ++i) {
          const int e = threadIdx.x + i * kThreads, r = e / kSlices, k = (e % kSlices) * kVector;
          a_slices[i] = (r < rows && k0 + k < H) ? load_16_bytes(h + (row0 + r) * H + k0 + k) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < kBSlices; ++i) {
          const int e = threadIdx.x + i * kThreads, n = e / kSlices, k = (e % kSlices) * kVector;
          const int64_t unit = unit0 + n % kUnits;
          b_slices[i] = (unit < H && k0 + k < H) ? load_16_bytes(w + ((n / kUnits) * H + unit) * H + k0 + k)
                                                 : make_uint4(0, 0, 0, 0);
        }
      };
      auto store_chunk = [&]() {  // zero bits are +0 in float16 and bfloat16
#pragma unroll
        for (int i = 0; i < kASlices; ++i) {
          const int e = threadIdx.x + i * kThreads;
          store_16_bytes(a_stage + (e / kSlices) * kLd + (e % kSlices) * kVector, a_slices[i]);
        }
#pragma unroll
        for (int i = 0; i < kBSlices; ++i) {
          const int e = threadIdx.x + i * kThreads;
          store_16_bytes(b_stage + (e / kSlices) * kLd + (e % kSlices) * kVector, b_slices[i]);
        }
      };
      load_chunk(0);
      for (int64_t k0 = 0; k0 < H; k0 += kDepth) {
        store_chunk();
        __syncthreads();
        if (k0 + kDepth < H) load_chunk(k0 + kDepth);  // in flight during the MMAs below
        multiply_chunk();
        __syncthreads();  // the stage is refilled (or becomes out_stage) next
      }
    } else {  // 2-byte loads, one chunk at a time
      for (int64_t k0 = 0; k0 < H; k0 += kDepth) {
        for (int e = threadIdx.x; e < kGemmRows * kDepth; e += kThreads) {
          const int r = e / kDepth, k = e % kDepth;
          a_stage[r * kLd + k] = (r < rows && k0 + k < H) ? h[(row0 + r) * H + k0 + k] : zero;
        }
        for (int e = threadIdx.x; e < kColumns * kDepth; e += kThreads) {
          const int n = e / kDepth, k = e % kDepth;
          const int64_t unit = unit0 + n % kUnits;
          b_stage[n * kLd + k] = (unit < H && k0 + k < H) ? w[((n / kUnits) * H + unit) * H + k0 + k] : zero;
        }
        __syncthreads();
        multiply_chunk();
        __syncthreads();
      }
    }
#pragma unroll
    for (int i = 0; i < Tiles::kTilesPerWarp; ++i) {
      const int tile = warp + i * kWarps;
      if (tile < tiles) {
        const int row_tile = tile / Tiles::kColumnTiles, column_tile = tile % Tiles::kColumnTiles;
        wmma::store_matrix_sync(out_stage + row_tile * 16 * Tiles::kOutLd + column_tile * 16, acc[i], Tiles::kOutLd,
                                wmma::mem_row_major);
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < rows * kColumns; e += kThreads) {
      const int r = e / kColumns, n = e % kColumns;
      const int64_t unit = unit0 + n % kUnits;
      if (unit < H) zh[(row0 + r) * G + (n / kUnits) * H + unit] = out_stage[r * Tiles::kOutLd + n];
    }
    __syncthreads();  // zh complete for the block; the stage is free again
  }
#else
  __trap();  // not launched: the host takes the cuBLAS path below sm_80
#endif
}

// ---------------------------------------------------------------------------------------
// Forward step.
template <typename T>
struct ForwardStep {
  int64_t batch, hidden;
  const T* wx;               // [B, 4H] W_ih x_t
  T* zh;                     // [B, 4H] W_hh h_{t-1} (from cuBLAS, or written by the kernel's own GEMM)
  const void* h_operand;     // [B, H] h_{t-1} in the operand dtype (tensor-core GEMM), else null
  void* h_operand_next;      // [B, H] h_t in the operand dtype: a second buffer, as other blocks
                             // still read h_operand
  const void* weight_operand;  // [4H, H] W_hh in the operand dtype
  const bool* active;        // [B]
  const int64_t* count;      // -> active rows at this step (device memory)
  const T* input_mean;       // [4H] input statistics for this step, or null (not normalized)
  const T* input_var;
  const T* running_mean_hh;  // [4H] row of this step (evaluation), else null
  const T* running_var_hh;
  const T* running_mean_c;   // [H] row of this step (evaluation), else null
  const T* running_var_c;
  const T* bias;             // [4H] or null
  const T* gamma_ih;         // [4H] or null
  const T* gamma_hh;         // [4H] or null
  const T* gamma_c;          // [H] or null
  const T* beta_c;           // [H] or null
  T* h;                      // [B, H] h_{t-1} on entry, h_t on exit (active rows)
  T* c;                      // [B, H] c_{t-1} on entry, c_t on exit (active rows)
  T* output;                 // [B, H] this step's output
  T* reserve;                // [B, width] this step's reserve, or null (inference)
  int64_t width, zhat_at, gates_at, c_new_at;  // ReserveLayout
  T* mean_hh;                // [4H] statistics used, if normalize_recurrent
  T* var_hh;
  T* mean_c;                 // [H], if normalize_cell
  T* var_c;
  T eps;
  bool training, normalize_input, normalize_recurrent, normalize_cell;
};

// One step of the recurrence for hidden units [blockIdx.x * kUnits, + kUnits) and all rows.
// kKeep: write the reserve for the backward pass. Operand: void when zh comes from cuBLAS,
// else the dtype of the tensor-core GEMM's operands (T is float then).
template <typename T, int kUnits, bool kKeep, typename Operand = void>
__global__ void __launch_bounds__(kThreads) bnlstm_fwd_step_kernel(const ForwardStep<T> s) {
  constexpr int kRows = kThreads / kUnits;
  constexpr bool kGemmInBlock = !std::is_void<Operand>::value;
  __shared__ T scratch[4 * kThreads];
  const int j = threadIdx.x % kUnits, lane = threadIdx.x / kUnits;
  const int64_t H = s.hidden, G = 4 * H, B = s.batch;
  const int64_t u = int64_t(blockIdx.x) * kUnits + j;  // this thread's hidden unit
  if constexpr (kGemmInBlock) {
    static_assert(std::is_same<T, float>::value, "the tensor-core GEMM accumulates in float32");
    __shared__ __align__(128) unsigned char gemm_stage[GemmTiles<kUnits>::kBytes];
    recurrent_gemm_in_block<Operand, kUnits>(static_cast<const Operand*>(s.h_operand),
                                             static_cast<const Operand*>(s.weight_operand), s.zh, B, H,
                                             int64_t(blockIdx.x) * kUnits, gemm_stage);
  }
  const bool valid = u < H;  // threads past H hold zeros and take part in the barriers
  const int64_t count = *s.count;
  const T inv_count = T(1) / T(count > 1 ? count : 1);

  // gates = (wx - mean_in) * in_scale + (zh - mean_rec) * rec_scale + bias, scale = gamma *
  // rstd, as recurrent_cpu.cpp: centred before scaling (folding the means into one shift
  // cancels when the batch spread is small against the mean, where scale is large).
  T rec_mean[4], rec_rstd[4], rec_scale[4], in_mean[4], in_scale[4], bias[4];
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    rec_mean[g] = T(0);
    rec_rstd[g] = T(1);
    rec_scale[g] = T(1);
    in_mean[g] = T(0);
    in_scale[g] = T(1);
    bias[g] = (valid && s.bias != nullptr) ? s.bias[g * H + u] : T(0);
  }
  if (s.normalize_recurrent) {
    T mean[4] = {T(0), T(0), T(0), T(0)}, var[4] = {T(0), T(0), T(0), T(0)};
    if (s.training) {  // uniform over the block, like every branch around a barrier here
      if (valid) {
        for (int64_t b = lane; b < B; b += kRows) {
          if (!s.active[b]) continue;
#pragma unroll
          for (int g = 0; g < 4; ++g) mean[g] += s.zh[b * G + g * H + u];
        }
      }
      sum_over_lanes<4, kUnits>(mean, scratch);
#pragma unroll
      for (int g = 0; g < 4; ++g) mean[g] *= inv_count;
      if (valid) {
        for (int64_t b = lane; b < B; b += kRows) {
          if (!s.active[b]) continue;
#pragma unroll
          for (int g = 0; g < 4; ++g) {
            const T d = s.zh[b * G + g * H + u] - mean[g];
            var[g] += d * d;
          }
        }
      }
      sum_over_lanes<4, kUnits>(var, scratch);
#pragma unroll
      for (int g = 0; g < 4; ++g) var[g] *= inv_count;
    } else if (valid) {
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        mean[g] = s.running_mean_hh[g * H + u];
        var[g] = s.running_var_hh[g * H + u];
      }
    }
    if (valid) {
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        if (lane == 0) {
          s.mean_hh[g * H + u] = mean[g];
          s.var_hh[g * H + u] = var[g];
        }
        rec_mean[g] = mean[g];
        rec_rstd[g] = rsqrt_(var[g] + s.eps);
        rec_scale[g] = rec_rstd[g] * s.gamma_hh[g * H + u];
      }
    }
  }
  if (s.normalize_input && valid) {
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      in_mean[g] = s.input_mean[g * H + u];
      in_scale[g] = rsqrt_(s.input_var[g * H + u] + s.eps) * s.gamma_ih[g * H + u];
    }
  }

  // Gates and the new cell for every row (padded rows too, as on the CPU: their reserve
  // stays finite and the backward pass multiplies it by zero). Active rows take the new
  // cell into c now (each (b, u) belongs to this thread alone) and park the output gate in
  // output until the cell statistics are known.
  T cell_sum[1] = {T(0)};
  if (valid) {
    for (int64_t b = lane; b < B; b += kRows) {
      T pre[4];
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        const int64_t k = b * G + g * H + u;
        const T z = s.zh[k];
        if (kKeep && s.normalize_recurrent) {
          s.reserve[b * s.width + s.zhat_at + g * H + u] = (z - rec_mean[g]) * rec_rstd[g];
        }
        pre[g] = (s.wx[k] - in_mean[g]) * in_scale[g] + ((z - rec_mean[g]) * rec_scale[g] + bias[g]);
      }
      const T i = sigmoid_(pre[0]), f = sigmoid_(pre[1]), gg = tanh_(pre[2]), o = sigmoid_(pre[3]);
      const T c_prev = s.c[b * H + u];
      const T cell = f * c_prev + i * gg;
      if (kKeep) {
        T* rs = s.reserve + b * s.width;
        rs[s.gates_at + 0 * H + u] = i;
        rs[s.gates_at + 1 * H + u] = f;
        rs[s.gates_at + 2 * H + u] = gg;
        rs[s.gates_at + 3 * H + u] = o;
        rs[s.c_new_at + u] = cell;
      }
      if (s.active[b]) {
        s.c[b * H + u] = cell;
        s.output[b * H + u] = o;
        cell_sum[0] += cell;
      }
    }
  }

  // Cell statistics over the active rows (per hidden unit: block-local), then h.
  T cell_mean = T(0), cell_scale = T(1), cell_beta = T(0);
  if (s.normalize_cell) {
    T mean = T(0), var = T(0);
    if (s.training) {
      sum_over_lanes<1, kUnits>(cell_sum, scratch);
      mean = cell_sum[0] * inv_count;
      T squares[1] = {T(0)};
      if (valid) {
        for (int64_t b = lane; b < B; b += kRows) {
          if (!s.active[b]) continue;
          const T d = s.c[b * H + u] - mean;
          squares[0] += d * d;
        }
      }
      sum_over_lanes<1, kUnits>(squares, scratch);
      var = squares[0] * inv_count;
    } else if (valid) {
      mean = s.running_mean_c[u];
      var = s.running_var_c[u];
    }
    if (valid) {
      if (lane == 0) {
        s.mean_c[u] = mean;
        s.var_c[u] = var;
      }
      cell_mean = mean;
      cell_scale = rsqrt_(var + s.eps) * s.gamma_c[u];
      cell_beta = s.beta_c[u];
    }
  }
  if (valid) {
    for (int64_t b = lane; b < B; b += kRows) {
      const int64_t k = b * H + u;
      if (s.active[b]) {
        const T h_new = s.output[k] * tanh_((s.c[k] - cell_mean) * cell_scale + cell_beta);
        s.h[k] = h_new;
        s.output[k] = h_new;
        if constexpr (kGemmInBlock) static_cast<Operand*>(s.h_operand_next)[k] = to_operand<Operand>(h_new);
      } else {
        s.output[k] = T(0);  // padded steps give zero output and leave the state alone
        if constexpr (kGemmInBlock) {
          static_cast<Operand*>(s.h_operand_next)[k] = static_cast<const Operand*>(s.h_operand)[k];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward step.
template <typename T>
struct BackwardStep {
  int64_t batch, hidden;
  const T* grad_output;      // [B, H]
  const T* reserve;          // [B, width] this step's reserve
  const T* c_prev;           // c_{t-1}: the previous step's reserve c_new, or c_0
  int64_t c_prev_stride;
  const T* wx;               // [B, 4H] W_ih x_t, if the input is normalized
  const bool* active;        // [B]
  const int64_t* count;      // -> active rows at this step (device memory)
  const bool* active_next;   // [B] rows active at step t + 1, or null at the last step
  const T* grad_h_gemm;      // [B, H] grad_zh_{t+1} W_hh, or null at the last step
  const T* mean_ih;          // [4H] statistics used at this step, if the input is normalized
  const T* var_ih;
  const T* var_hh;           // [4H], if normalize_recurrent
  const T* mean_c;           // [H], if normalize_cell
  const T* var_c;
  const T* gamma_ih;
  const T* gamma_hh;
  const T* gamma_c;
  const T* beta_c;
  T* grad_h;                 // [B, H] gradient of h_t (completed here from grad_h_gemm)
  T* grad_c;                 // [B, H] gradient of c_t on entry, of c_{t-1} on exit
  T* grad_gates;             // [B, 4H]
  T* grad_zh;                // [B, 4H], written if normalize_recurrent (else aliases grad_gates)
  T* grad_wx;                // [B, 4H], written if step-wise input
  T* grad_bias;              // [4H] accumulated over steps
  T* grad_gamma_ih;          // [4H] or null
  T* grad_gamma_hh;          // [4H] or null
  T* grad_gamma_c;           // [H] or null
  T* grad_beta_c;            // [H] or null
  int64_t width, zhat_at, gates_at, c_new_at;
  T eps;
  bool training, any_input, step_input, normalize_recurrent, normalize_cell;
};

// One step backwards for hidden units [blockIdx.x * kUnits, + kUnits) and all rows; the
// bias, gamma and beta gradients of these units' columns accumulate here (no other block
// touches them, so the sums are deterministic).
template <typename T, int kUnits>
__global__ void __launch_bounds__(kThreads) bnlstm_bwd_step_kernel(const BackwardStep<T> s) {
  constexpr int kRows = kThreads / kUnits;
  __shared__ T scratch[12 * kThreads];
  const int j = threadIdx.x % kUnits, lane = threadIdx.x / kUnits;
  const int64_t H = s.hidden, G = 4 * H, B = s.batch, W = s.width;
  const int64_t u = int64_t(blockIdx.x) * kUnits + j;
  const bool valid = u < H;
  const int64_t count = *s.count;
  const T inv_count = T(1) / T(count > 1 ? count : 1);

  // The normalized cell and its tanh are recomputed from c_new and the step's statistics.
  T cell_mean = T(0), cell_rstd = T(1), cell_gamma = T(1), cell_beta = T(0);
  if (s.normalize_cell && valid) {
    cell_mean = s.mean_c[u];
    cell_rstd = rsqrt_(s.var_c[u] + s.eps);
    cell_gamma = s.gamma_c[u];
    cell_beta = s.beta_c[u];
  }
  const T cell_scale = cell_rstd * cell_gamma;

  // Gradient of h_t (rows active at t + 1 take it from the GEMM, others pass it through),
  // the output gate, and the gradient reaching the normalized copy of c_t, parked in the
  // i-gate slot of grad_gates until the cell statistics' sums are known.
  T cell_sums[2] = {T(0), T(0)};  // sum(dy), sum(dy * c_hat)
  if (valid) {
    for (int64_t b = lane; b < B; b += kRows) {
      const T* rs = s.reserve + b * W;
      T grad_h = s.grad_h[b * H + u];
      if (s.grad_h_gemm != nullptr) {
        if (s.active_next[b]) grad_h = s.grad_h_gemm[b * H + u];
        s.grad_h[b * H + u] = grad_h;
      }
      const bool active = s.active[b];
      T seen = rs[s.c_new_at + u], c_hat = T(0);
      if (s.normalize_cell) {
        c_hat = (seen - cell_mean) * cell_rstd;
        seen = c_hat * cell_gamma + cell_beta;
      }
      const T tanh_c = tanh_(seen);
      const T o = rs[s.gates_at + 3 * H + u];
      const T grad_h_new = active ? s.grad_output[b * H + u] + grad_h : T(0);
      s.grad_gates[b * G + 3 * H + u] = grad_h_new * tanh_c * o * (T(1) - o);
      const T grad_seen = grad_h_new * o * (T(1) - tanh_c * tanh_c);
      s.grad_gates[b * G + u] = grad_seen;
      if (active) {
        cell_sums[0] += grad_seen;
        cell_sums[1] += grad_seen * c_hat;
      }
    }
  }
  if (s.normalize_cell) {
    sum_over_lanes<2, kUnits>(cell_sums, scratch);
    if (valid && lane == 0) {
      s.grad_beta_c[u] += cell_sums[0];
      s.grad_gamma_c[u] += cell_sums[1];
    }
  }

  // Statistics of the input normalization used at this step.
  T in_mean[4], in_rstd[4], in_scale[4], rec_scale[4];
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    in_mean[g] = T(0);
    in_rstd[g] = T(1);
    in_scale[g] = T(1);
    rec_scale[g] = T(1);
    if (valid && s.any_input) {
      in_mean[g] = s.mean_ih[g * H + u];
      in_rstd[g] = rsqrt_(s.var_ih[g * H + u] + s.eps);
      in_scale[g] = in_rstd[g] * s.gamma_ih[g * H + u];
    }
    if (valid && s.normalize_recurrent) {
      rec_scale[g] = rsqrt_(s.var_hh[g * H + u] + s.eps) * s.gamma_hh[g * H + u];
    }
  }

  // Through the cell normalization (padded rows: zero), add the gradient arriving at c_t
  // from step t + 1; gates i, f, g; the gradient to c_{t-1}; and the column sums of the
  // gate gradients for the bias, the gammas and the batch-norm backward below:
  // sums[g] = sum(dy), sums[4 + g] = sum(dy * zhat), sums[8 + g] = sum(dy * xhat).
  T sums[12];
#pragma unroll
  for (int n = 0; n < 12; ++n) sums[n] = T(0);
  if (valid) {
    for (int64_t b = lane; b < B; b += kRows) {
      const T* rs = s.reserve + b * W;
      const bool active = s.active[b];
      const T grad_seen = s.grad_gates[b * G + u];
      T grad_cell = grad_seen;
      if (s.normalize_cell) {
        if (!active) {
          grad_cell = T(0);
        } else if (s.training) {
          const T c_hat = (rs[s.c_new_at + u] - cell_mean) * cell_rstd;
          grad_cell = (grad_seen - cell_sums[0] * inv_count - c_hat * cell_sums[1] * inv_count) * cell_scale;
        } else {
          grad_cell = grad_seen * cell_scale;
        }
      }
      const T dc = active ? grad_cell + s.grad_c[b * H + u] : T(0);
      const T i = rs[s.gates_at + 0 * H + u];
      const T f = rs[s.gates_at + 1 * H + u];
      const T gg = rs[s.gates_at + 2 * H + u];
      const T c_prev = s.c_prev[b * s.c_prev_stride + u];
      T dy[4];
      dy[0] = dc * gg * i * (T(1) - i);
      dy[1] = dc * c_prev * f * (T(1) - f);
      dy[2] = dc * i * (T(1) - gg * gg);
      dy[3] = s.grad_gates[b * G + 3 * H + u];
      s.grad_gates[b * G + 0 * H + u] = dy[0];
      s.grad_gates[b * G + 1 * H + u] = dy[1];
      s.grad_gates[b * G + 2 * H + u] = dy[2];
      // A padded step passes the gradient of its (unchanged) state straight through.
      if (!active) continue;
      s.grad_c[b * H + u] = dc * f;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        sums[g] += dy[g];
        if (s.normalize_recurrent) sums[4 + g] += dy[g] * rs[s.zhat_at + g * H + u];
        if (s.any_input) sums[8 + g] += dy[g] * ((s.wx[b * G + g * H + u] - in_mean[g]) * in_rstd[g]);
      }
    }
  }
  sum_over_lanes<12, kUnits>(sums, scratch);
  if (valid && lane == 0) {
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      s.grad_bias[g * H + u] += sums[g];
      if (s.normalize_recurrent) s.grad_gamma_hh[g * H + u] += sums[4 + g];
      // sum(dy * xhat) is gamma_ih's gradient for both input statistics; the host finishes
      // the sequence-wise input backward from these sums.
      if (s.any_input) s.grad_gamma_ih[g * H + u] += sums[8 + g];
    }
  }

  // Back through the recurrent and the step-wise input normalizations, which receive the
  // same upstream gradient dy: training dz = gamma * rstd * (dy - mean(dy) - zhat *
  // mean(dy * zhat)) on active rows, evaluation dz = gamma * rstd * dy; padded rows 0.
  if (valid && (s.normalize_recurrent || s.step_input)) {
    for (int64_t b = lane; b < B; b += kRows) {
      const T* rs = s.reserve + b * W;
      const bool active = s.active[b];
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        const int64_t k = b * G + g * H + u;
        if (!active) {
          if (s.normalize_recurrent) s.grad_zh[k] = T(0);
          if (s.step_input) s.grad_wx[k] = T(0);
          continue;
        }
        const T dy = s.grad_gates[k];
        const T centred = s.training ? dy - sums[g] * inv_count : dy;
        if (s.normalize_recurrent) {
          T grad = centred;
          if (s.training) grad -= rs[s.zhat_at + g * H + u] * sums[4 + g] * inv_count;
          s.grad_zh[k] = grad * rec_scale[g];
        }
        if (s.step_input) {
          T grad = centred;
          if (s.training) grad -= (s.wx[k] - in_mean[g]) * in_rstd[g] * sums[8 + g] * inv_count;
          s.grad_wx[k] = grad * in_scale[g];
        }
      }
    }
  }
}

// grad_h = active ? from_gemm : grad_h, row by row: the gradient of h_{t-1} after the last
// (first in time) step's GEMM.
template <typename T>
__global__ void bnlstm_merge_rows_kernel(T* __restrict__ grad_h, const T* __restrict__ from_gemm,
                                         const bool* __restrict__ active, int64_t batch, int64_t hidden) {
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= batch * hidden) return;
  if (active[index / hidden]) grad_h[index] = from_gemm[index];
}

// ---------------------------------------------------------------------------------------
// Host side.

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_or_null(at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// Hidden units per block: the widest tile (longest contiguous runs in memory) that still
// gives every multiprocessor a block.
int units_per_block(int64_t hidden) {
#ifdef BNLSTM_CUDA_EMULATION
  const char* emulated = std::getenv("BNLSTM_EMULATED_SMS");
  const int processors = emulated != nullptr ? std::atoi(emulated) : 4;
#else
  const int processors = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
  for (int units : {32, 16}) {
    if ((hidden + units - 1) / units >= processors) return units;
  }
  return 8;
}

// Calls body(std::integral_constant<int, kUnits>) for the runtime choice.
template <typename Body>
void switch_units(int units, const Body& body) {
  switch (units) {
    case 32: body(std::integral_constant<int, 32>()); break;
    case 16: body(std::integral_constant<int, 16>()); break;
    default: body(std::integral_constant<int, 8>()); break;
  }
}

void check_cuda_args(const at::Tensor& reference, int64_t batch, int64_t hidden) {
#ifndef BNLSTM_CUDA_EMULATION
  TORCH_CHECK(reference.is_cuda(), "the CUDA kernels need CUDA tensors, got ", reference.device());
#endif
  TORCH_CHECK(reference.scalar_type() == at::kFloat || reference.scalar_type() == at::kDouble,
              "the CUDA kernels compute in float32 or float64, got ", reference.scalar_type(),
              " (bnlstm_cuda casts float16 and bfloat16 inputs to float32 before calling the operator)");
  TORCH_CHECK(batch >= 1 && hidden >= 1, "the CUDA kernels need B >= 1 and H >= 1, got B=", batch, " H=", hidden);
  // Grid x counts blocks of hidden units; grid y of the statistics kernel counts column tiles.
  TORCH_CHECK((4 * hidden + kStatColumns - 1) / kStatColumns <= 65535, "hidden size ", hidden,
              " is too large for the CUDA kernels (at most ", 65535 * kStatColumns / 4, ")");
}

// Whether a product with this float32 operand may run on tensor cores at the inputs'
// precision: a layer whose inputs were float16/bfloat16 (LayerFlags::operand_dtype), on a GPU
// with bfloat16 and TF32 tensor cores (sm_80). Both tensor-core paths below ask it.
bool half_inputs_on_tensor_cores(const at::Tensor& operand, const LayerFlags& flags) {
  if (operand.scalar_type() != at::kFloat ||
      (flags.operand_dtype != at::kHalf && flags.operand_dtype != at::kBFloat16)) {
    return false;
  }
#ifdef BNLSTM_CUDA_EMULATION
  return true;
#else
  return at::cuda::getDeviceProperties(operand.device().index())->major >= 8;
#endif
}

// The operand dtype of the tensor-core GEMM inside the step kernel, or Undefined for the
// cuBLAS path: half_inputs_on_tensor_cores, and BNLSTM_CUDA_RECURRENT_GEMM not "cublas"
// (kept to compare the two paths).
at::ScalarType tensor_core_operands(const at::Tensor& input_projection, const LayerFlags& flags) {
  if (!half_inputs_on_tensor_cores(input_projection, flags)) return at::ScalarType::Undefined;
  const char* choice = std::getenv("BNLSTM_CUDA_RECURRENT_GEMM");
  if (choice != nullptr && std::strcmp(choice, "cublas") == 0) return at::ScalarType::Undefined;
  return flags.operand_dtype;
}

#ifndef BNLSTM_CUDA_EMULATION
// An operand of cuBLAS's column-major GEMM: a row-major matrix is its own transpose in
// column-major order, so m [rows, columns] with unit column stride is read as is ("N") for
// the transposed product, and one with unit row stride (a transposed view) as "T".
struct ColumnMajorOperand {
  at::Tensor storage;
  bool transpose;
  int64_t ld;
};

ColumnMajorOperand column_major_operand(const at::Tensor& m) {
  const int64_t rows = m.size(0), columns = m.size(1);
  if (m.stride(1) == 1 && m.stride(0) >= std::max<int64_t>(1, columns)) return {m, false, m.stride(0)};
  if (m.stride(0) == 1 && m.stride(1) >= std::max<int64_t>(1, rows)) return {m, true, m.stride(1)};
  const at::Tensor packed = m.contiguous();
  return {packed, false, std::max<int64_t>(1, columns)};
}
#endif

// Launches the forward step kernel for the reserve choice and the GEMM's operand dtype.
template <typename T, int kUnits>
void launch_forward_step(bool keep, at::ScalarType operands, unsigned blocks, cudaStream_t stream,
                         const ForwardStep<T>& s) {
  auto launch = [&](auto kernel) {
    BNLSTM_LAUNCH(kernel, blocks, kThreads, stream, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if constexpr (std::is_same<T, float>::value) {
    if (operands == at::kBFloat16) {
      return keep ? launch(bnlstm_fwd_step_kernel<T, kUnits, true, __nv_bfloat16>)
                  : launch(bnlstm_fwd_step_kernel<T, kUnits, false, __nv_bfloat16>);
    }
    if (operands == at::kHalf) {
      return keep ? launch(bnlstm_fwd_step_kernel<T, kUnits, true, __half>)
                  : launch(bnlstm_fwd_step_kernel<T, kUnits, false, __half>);
    }
  }
  keep ? launch(bnlstm_fwd_step_kernel<T, kUnits, true>) : launch(bnlstm_fwd_step_kernel<T, kUnits, false>);
}

template <typename T>
void recurrent_forward_impl(const RecurrentForwardArgs& args, RecurrentForwardOutputs& out,
                            const LayerFlags& flags) {
  const int64_t steps = args.input_projection.size(0), B = args.input_projection.size(1);
  const int64_t H = args.weight_hh.size(1), G = 4 * H;
  check_cuda_args(args.input_projection, B, H);
#ifdef BNLSTM_CUDA_EMULATION
  const cudaStream_t stream = 0;
#else
  const at::cuda::CUDAGuard device_guard(args.input_projection.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
#endif
  if (steps == 0) return;
  const ReserveLayout layout(H, flags);
  const bool keep = out.reserve.defined();
  const bool step_input = flags.input_statistics == kInputStep;
  const bool normalize_input = flags.input_statistics != kInputNone;

  if (step_input) {
    // Statistics of every step's input projection at once (given rows in evaluation).
    const dim3 grid(static_cast<unsigned>(steps), static_cast<unsigned>((G + kStatColumns - 1) / kStatColumns));
    const dim3 block(kStatColumns, kStatRows);
    TORCH_CHECK(steps <= 0x7fffffff, "too many steps for the CUDA kernels: ", steps);
    const bool given = !flags.training;
    const auto kernel = bnlstm_input_stats_kernel<T>;
    BNLSTM_LAUNCH(kernel, grid, block, stream,
        args.input_projection.data_ptr<T>(), args.active.data_ptr<bool>(), args.counts.data_ptr<int64_t>(), B, G,
        given ? args.input_mean.data_ptr<T>() : nullptr, given ? args.input_var.data_ptr<T>() : nullptr,
        given ? args.input_mean.size(0) : 1, flags.start_step, out.mean_ih.data_ptr<T>(), out.var_ih.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // The recurrent GEMM's output, allocated once for all steps.
  at::Tensor zh = at::empty({B, G}, args.input_projection.options());
  const at::Tensor weight_hh_t = args.weight_hh.t();  // [H, 4H]
  // Tensor-core path: W_hh and h_{t-1} in the operand dtype; h in two buffers, step t
  // reading one and writing the other (blocks of step t still read h_{t-1} while others
  // have written h_t).
  const at::ScalarType operands = tensor_core_operands(args.input_projection, flags);
  const bool gemm_in_block = operands != at::ScalarType::Undefined;
  at::Tensor weight_operand, h_operand;
  if (gemm_in_block) {
    weight_operand = args.weight_hh.to(operands).contiguous();
    h_operand = at::empty({2, B, H}, args.input_projection.options().dtype(operands));
    h_operand.select(0, 0).copy_(out.h);
  }

  ForwardStep<T> s{};
  s.batch = B;
  s.hidden = H;
  s.zh = zh.data_ptr<T>();
  s.bias = data_or_null<T>(args.bias);
  s.gamma_ih = data_or_null<T>(args.gamma_ih);
  s.gamma_hh = data_or_null<T>(args.gamma_hh);
  s.gamma_c = data_or_null<T>(args.gamma_c);
  s.beta_c = data_or_null<T>(args.beta_c);
  s.h = out.h.data_ptr<T>();
  s.c = out.c.data_ptr<T>();
  s.width = layout.width;
  s.zhat_at = layout.zhat;
  s.gates_at = layout.gates;
  s.c_new_at = layout.c_new;
  s.eps = T(flags.eps);
  s.training = flags.training;
  s.normalize_input = normalize_input;
  s.normalize_recurrent = flags.normalize_recurrent;
  s.normalize_cell = flags.normalize_cell;
  TORCH_CHECK(!normalize_input || (s.gamma_ih != nullptr), "gamma_ih is required");
  TORCH_CHECK(!flags.normalize_recurrent || s.gamma_hh != nullptr, "gamma_hh is required");
  TORCH_CHECK(!flags.normalize_cell || (s.gamma_c != nullptr && s.beta_c != nullptr), "gamma_c, beta_c are required");

  const T* projection = args.input_projection.data_ptr<T>();
  const bool* active = args.active.data_ptr<bool>();
  const int64_t* counts = args.counts.data_ptr<int64_t>();
  T* output = out.output.data_ptr<T>();
  T* reserve = keep ? out.reserve.data_ptr<T>() : nullptr;
  const int64_t slots_in = normalize_input && !step_input ? args.input_mean.size(0) : 0;
  const int64_t slots_hh = args.running_mean_hh.defined() ? args.running_mean_hh.size(0) : 0;
  const int64_t slots_c = args.running_mean_c.defined() ? args.running_mean_c.size(0) : 0;
  const bool eval_hh = !flags.training && flags.normalize_recurrent;
  const bool eval_c = !flags.training && flags.normalize_cell;

  const int units = units_per_block(H);
  const int64_t blocks = (H + units - 1) / units;
  s.weight_operand = gemm_in_block ? weight_operand.data_ptr() : nullptr;
  for (int64_t t = 0; t < steps; ++t) {
    if (gemm_in_block) {
      s.h_operand = h_operand.select(0, t % 2).data_ptr();
      s.h_operand_next = h_operand.select(0, (t + 1) % 2).data_ptr();
    } else {
      matmul_cuda(zh, out.h, weight_hh_t, /*accumulate=*/false, flags);  // [B, 4H] = h_{t-1} W_hh^T
    }
    const int64_t step = flags.start_step + t;
    s.wx = projection + t * B * G;
    s.active = active + t * B;
    s.count = counts + t;
    s.output = output + t * B * H;
    s.reserve = keep ? reserve + t * B * layout.width : nullptr;
    if (step_input) {
      s.input_mean = out.mean_ih.data_ptr<T>() + t * G;
      s.input_var = out.var_ih.data_ptr<T>() + t * G;
    } else if (normalize_input) {  // sequence-wise: one row for every step
      const int64_t row = std::min(step, slots_in - 1);
      s.input_mean = args.input_mean.data_ptr<T>() + row * G;
      s.input_var = args.input_var.data_ptr<T>() + row * G;
    }
    s.running_mean_hh = eval_hh ? args.running_mean_hh.data_ptr<T>() + std::min(step, slots_hh - 1) * G : nullptr;
    s.running_var_hh = eval_hh ? args.running_var_hh.data_ptr<T>() + std::min(step, slots_hh - 1) * G : nullptr;
    s.running_mean_c = eval_c ? args.running_mean_c.data_ptr<T>() + std::min(step, slots_c - 1) * H : nullptr;
    s.running_var_c = eval_c ? args.running_var_c.data_ptr<T>() + std::min(step, slots_c - 1) * H : nullptr;
    s.mean_hh = flags.normalize_recurrent ? out.mean_hh.data_ptr<T>() + t * G : nullptr;
    s.var_hh = flags.normalize_recurrent ? out.var_hh.data_ptr<T>() + t * G : nullptr;
    s.mean_c = flags.normalize_cell ? out.mean_c.data_ptr<T>() + t * H : nullptr;
    s.var_c = flags.normalize_cell ? out.var_c.data_ptr<T>() + t * H : nullptr;
    switch_units(units, [&](auto units_constant) {
      constexpr int kUnits = decltype(units_constant)::value;
      launch_forward_step<T, kUnits>(keep, operands, static_cast<unsigned>(blocks), stream, s);
    });
  }
}

template <typename T>
void recurrent_backward_impl(const RecurrentBackwardArgs& args, RecurrentBackwardOutputs& out,
                             const LayerFlags& flags) {
  const int64_t steps = args.reserve.size(0), B = args.reserve.size(1);
  const int64_t H = args.weight_hh.size(1), G = 4 * H;
  check_cuda_args(args.reserve, B, H);
#ifdef BNLSTM_CUDA_EMULATION
  const cudaStream_t stream = 0;
#else
  const at::cuda::CUDAGuard device_guard(args.reserve.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
#endif
  if (steps == 0) return;
  const ReserveLayout layout(H, flags);
  const bool step_input = flags.input_statistics == kInputStep;
  const bool any_input = flags.input_statistics != kInputNone;

  // grad_zh_t W_hh for each step, allocated once: the next kernel (or the final merge)
  // takes its rows that were active.
  at::Tensor grad_h_gemm = at::empty({B, H}, out.grad_h.options());

  BackwardStep<T> s{};
  s.batch = B;
  s.hidden = H;
  s.gamma_ih = data_or_null<T>(args.gamma_ih);
  s.gamma_hh = data_or_null<T>(args.gamma_hh);
  s.gamma_c = data_or_null<T>(args.gamma_c);
  s.beta_c = data_or_null<T>(args.beta_c);
  s.grad_h = out.grad_h.data_ptr<T>();
  s.grad_c = out.grad_c.data_ptr<T>();
  s.grad_bias = out.grad_bias.data_ptr<T>();
  s.grad_gamma_ih = mutable_or_null<T>(out.grad_gamma_ih);
  s.grad_gamma_hh = mutable_or_null<T>(out.grad_gamma_hh);
  s.grad_gamma_c = mutable_or_null<T>(out.grad_gamma_c);
  s.grad_beta_c = mutable_or_null<T>(out.grad_beta_c);
  s.width = layout.width;
  s.zhat_at = layout.zhat;
  s.gates_at = layout.gates;
  s.c_new_at = layout.c_new;
  s.eps = T(flags.eps);
  s.training = flags.training;
  s.any_input = any_input;
  s.step_input = step_input;
  s.normalize_recurrent = flags.normalize_recurrent;
  s.normalize_cell = flags.normalize_cell;
  TORCH_CHECK(!any_input || (s.gamma_ih != nullptr && s.grad_gamma_ih != nullptr), "gamma_ih is required");
  TORCH_CHECK(!flags.normalize_recurrent || (s.gamma_hh != nullptr && s.grad_gamma_hh != nullptr),
              "gamma_hh is required");
  TORCH_CHECK(!flags.normalize_cell || (s.gamma_c != nullptr && s.beta_c != nullptr), "gamma_c, beta_c are required");

  const T* reserve = args.reserve.data_ptr<T>();
  const T* grad_output = args.grad_output.data_ptr<T>();
  const T* projection = any_input ? args.projection.data_ptr<T>() : nullptr;
  const bool* active = args.active.data_ptr<bool>();
  const int64_t* counts = args.counts.data_ptr<int64_t>();
  // grad_gates is an output only where grad_zh or grad_wx is it (the host allocates it then);
  // otherwise a step's gate gradients are scratch: one [B, 4H] buffer serves every step, as
  // the steps run in order on the stream.
  const bool keep_grad_gates = out.grad_gates.defined();
  const at::Tensor gate_scratch = keep_grad_gates ? out.grad_gates : at::empty({B, G}, args.reserve.options());
  T* grad_gates = gate_scratch.data_ptr<T>();
  const int64_t grad_gates_step = keep_grad_gates ? B * G : 0;
  T* grad_zh = out.grad_zh.data_ptr<T>();
  T* grad_wx = step_input ? out.grad_wx.data_ptr<T>() : nullptr;

  const int units = units_per_block(H);
  const int64_t blocks = (H + units - 1) / units;
  for (int64_t t = steps - 1; t >= 0; --t) {
    // The sequence-wise input statistics have one row for every step.
    const int64_t input_row = flags.input_statistics == kInputSequence ? 0 : t;
    s.grad_output = grad_output + t * B * H;
    s.reserve = reserve + t * B * layout.width;
    s.c_prev = t > 0 ? reserve + (t - 1) * B * layout.width + layout.c_new : args.c0.data_ptr<T>();
    s.c_prev_stride = t > 0 ? layout.width : H;
    s.wx = any_input ? projection + t * B * G : nullptr;
    s.active = active + t * B;
    s.count = counts + t;
    s.active_next = t + 1 < steps ? active + (t + 1) * B : nullptr;
    s.grad_h_gemm = t + 1 < steps ? grad_h_gemm.data_ptr<T>() : nullptr;
    s.mean_ih = any_input ? args.mean_ih.data_ptr<T>() + input_row * G : nullptr;
    s.var_ih = any_input ? args.var_ih.data_ptr<T>() + input_row * G : nullptr;
    s.var_hh = flags.normalize_recurrent ? args.var_hh.data_ptr<T>() + t * G : nullptr;
    s.mean_c = flags.normalize_cell ? args.mean_c.data_ptr<T>() + t * H : nullptr;
    s.var_c = flags.normalize_cell ? args.var_c.data_ptr<T>() + t * H : nullptr;
    s.grad_gates = grad_gates + t * grad_gates_step;
    s.grad_zh = grad_zh + t * B * G;
    s.grad_wx = step_input ? grad_wx + t * B * G : nullptr;
    switch_units(units, [&](auto units_constant) {
      constexpr int kUnits = decltype(units_constant)::value;
      const auto kernel = bnlstm_bwd_step_kernel<T, kUnits>;
      BNLSTM_LAUNCH(kernel, static_cast<unsigned>(blocks), kThreads, stream, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // Gradient of h_{t-1} through W_hh ([B, 4H] @ [4H, H]), merged into grad_h by the next
    // kernel: rows active at t take it, padded rows pass grad_h straight through.
    matmul_cuda(grad_h_gemm, out.grad_zh.select(0, t), args.weight_hh, /*accumulate=*/false, flags);
  }
  const int64_t total = B * H;
  const int threads = 256;
  const auto merge = bnlstm_merge_rows_kernel<T>;
  BNLSTM_LAUNCH(merge, static_cast<unsigned>((total + threads - 1) / threads), threads, stream,
                out.grad_h.data_ptr<T>(), grad_h_gemm.data_ptr<T>(), active, B, H);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// The host code's GEMMs and the per-step ones here. For half-precision inputs (float32
// compute), TF32 tensor cores whatever allow_tf32 says: their operands were float16/bfloat16,
// which TF32 holds exactly (8-bit exponent, 10-bit mantissa), so the input projection loses
// nothing, and a gradient operand keeps more than the bf16 cuDNN rounds it to. cublasGemmEx's
// compute type scopes TF32 to this call; the global switch would change every other float32
// matmul of the process. Anything else goes to ATen (float32 honouring allow_tf32, float64).
void matmul_cuda(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                 const LayerFlags& flags) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const int64_t int_max = std::numeric_limits<int>::max();
  const bool tf32 = half_inputs_on_tensor_cores(a, flags) && out.is_contiguous() && M <= int_max && N <= int_max &&
                    K <= int_max && a.numel() <= int_max && b.numel() <= int_max;
  if (!tf32) return matmul_aten(out, a, b, accumulate);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) out.zero_();
    return;
  }
#ifdef BNLSTM_CUDA_EMULATION
  matmul_aten(out, round_to_tf32(a), round_to_tf32(b), accumulate);  // TF32's rounding, float32 products
#else
  // The handle and the stream are the current device's: the host code calls this before the
  // recurrence sets its guard, and an operator of our own gets no guard from the dispatcher.
  const at::cuda::CUDAGuard device_guard(out.device());
  // Row-major out [M, N] is column-major out^T [N, M] = b^T a^T.
  const ColumnMajorOperand first = column_major_operand(b), second = column_major_operand(a);
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  // The current stream's handle, with torch's workspace: safe under CUDA-graph capture.
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const auto as_int = [](int64_t v) { return static_cast<int>(v); };
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, first.transpose ? CUBLAS_OP_T : CUBLAS_OP_N, second.transpose ? CUBLAS_OP_T : CUBLAS_OP_N, as_int(N),
      as_int(M), as_int(K), &alpha, first.storage.data_ptr<float>(), CUDA_R_32F, as_int(first.ld),
      second.storage.data_ptr<float>(), CUDA_R_32F, as_int(second.ld), &beta, out.data_ptr<float>(), CUDA_R_32F,
      as_int(N), CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
#endif
}

void recurrent_forward_cuda(const RecurrentForwardArgs& args, RecurrentForwardOutputs& out,
                            const LayerFlags& flags) {
  AT_DISPATCH_FLOATING_TYPES(args.input_projection.scalar_type(), "bnlstm_recurrent_forward_cuda",
                             [&] { recurrent_forward_impl<scalar_t>(args, out, flags); });
}

void recurrent_backward_cuda(const RecurrentBackwardArgs& args, RecurrentBackwardOutputs& out,
                             const LayerFlags& flags) {
  AT_DISPATCH_FLOATING_TYPES(args.reserve.scalar_type(), "bnlstm_recurrent_backward_cuda",
                             [&] { recurrent_backward_impl<scalar_t>(args, out, flags); });
}

}  // namespace bnlstm
