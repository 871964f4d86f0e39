// The recurrent part of the BN-LSTM layer on the CPU: per step, one GEMM h_{t-1} W_hh^T and
// one fused pass that takes the batch statistics, normalizes, applies the gates, updates
// and normalizes the cell and writes h (docs/SEMANTICS.md):
//
//   gates_t = BN(W_ih x_t; gamma_ih, 0) + BN(W_hh h_{t-1}; gamma_hh, 0) + bias
//   c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
//   h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))
//
// W_ih x_t comes from one GEMM over all steps (layer.cpp), or, in inference with an input
// narrow against the batch, from each task's own product at every step. Each step is
// parallel over hidden units: a task owns hidden units [j0, j1) with their four gate
// columns and the whole batch, so every batch statistic it needs is a reduction over rows
// it holds. In the forward pass a task also computes its own columns of the step's GEMM.
// Inner loops run along hidden units, which are contiguous, with at::vec (AVX-512 or AVX2
// as built) and the inlined sigmoid, tanh and 1 / sqrt of vec_math.h.
// The backward pass mirrors it: per step and block, one fused pass, then the block's share
// of the GEMM for dh_{t-1} (its columns of grad_zh times its rows of W_hh; the next step sums
// the shares), and every few steps its rows of the weight gradients from the step gradients
// still in its cache. All steps run in one parallel region (step_loop.h).
#include "bf16_gemm.h"
#include "bnlstm.h"
#include "buffer_pool.h"
#include "packed_gemm.h"
#include "running_fold.h"
#include "step_loop.h"
#include "vec_math.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace bnlstm {
namespace {

// Calls body(offset, count) over [0, size) in vector-sized pieces. Full pieces get count
// as a compile-time constant, so loadu/store compile to plain vector moves; only the last
// piece may be short.
template <typename T, typename Body>
inline void for_each_vec(int64_t size, const Body& body) {
  constexpr int64_t width = Vec<T>::size();
  int64_t offset = 0;
  for (; offset + width <= size; offset += width) body(offset, std::integral_constant<int64_t, width>());
  if (offset < size) body(offset, size - offset);
}

// Columns a task of GivenStatistics' table takes at least: rows in parallel only where the
// table is long enough to pay for waking the threads.
constexpr int64_t kGivenStatisticsGrain = int64_t(1) << 15;

// Rows of a contiguous [T, ...] tensor by raw pointer: indexing a tensor at every step
// costs a dispatcher call each (a select), which adds up at small sizes.
template <typename T>
class Rows {
 public:
  Rows(const at::Tensor& t, bool present)
      : base_(present ? t.data_ptr<T>() : nullptr), stride_(present && t.size(0) > 0 ? t.numel() / t.size(0) : 0) {}
  T* operator[](int64_t row) const { return base_ == nullptr ? nullptr : base_ + row * stride_; }

 private:
  T* base_;
  int64_t stride_;
};

// Brings [p, p + count) towards this core's L2 cache ahead of use (kForWriting: owned,
// ready for stores). A task's part of a row is a few cache lines every few kilobytes, a
// pattern the hardware prefetchers do not follow, so without this every row starts with a
// miss to memory.
template <bool kForWriting = false, typename T>
inline void prefetch_span(const T* p, int64_t count) {
  const char* begin = reinterpret_cast<const char*>(p);
  const char* end = reinterpret_cast<const char*>(p + count);
  for (const char* line = begin; line < end; line += 64) __builtin_prefetch(line, kForWriting ? 1 : 0, 2);
}

// Stores v at p, bypassing the caches where `streaming` and it can (a whole float vector at
// an aligned address), else as usual. For results written once and read only after the
// recurrence (the weight-gradient GEMMs' operands, the backward's reserve): cached, each
// line would first be read in and would then evict step data the recurrence still reads.
template <typename T, typename Count>
inline void store_streaming(bool streaming, const Vec<T>& v, T* p, Count n) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t width = Vec<float>::size();
  if constexpr (std::is_same<T, float>::value && std::is_same<Count, std::integral_constant<int64_t, width>>::value) {
    if (streaming && reinterpret_cast<uintptr_t>(p) % (width * sizeof(float)) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      _mm512_stream_ps(p, v);
#else
      _mm256_stream_ps(p, v);
#endif
      return;
    }
  }
#else
  (void)streaming;
#endif
  v.store(p, n);
}

// Copies [from, from + count) to `to` past the caches (store_streaming), a vector at a time in
// address order, so each line's stores follow one another.
template <typename T>
void stream_copy(const T* from, T* to, int64_t count) {
  for_each_vec<T>(count, [&](int64_t j, auto n) { store_streaming(true, Vec<T>::loadu(from + j, n), to + j, n); });
}

// Streaming stores are weakly ordered: a pass that made them ends with this, before the
// step's end (and before it reads back what they wrote).
inline void fence_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// masked_moments' kVectors vectors of columns (the last one last_lanes wide), down every
// row: the sums stay in registers (a sum kept in memory costs a load and a store per
// element, which bounded the row-by-row form), and the second pass re-reads the columns'
// rows from L1. Each column adds its rows in order, as the row-by-row form did.
template <typename T, int kVectors>
void column_moments(const T* z, int64_t stride, int64_t batch, const bool* active, const Vec<T>& inv_count,
                    int64_t last_lanes, T* mean, T* var) {
  constexpr int64_t width = Vec<T>::size();
  const auto lanes = [&](int v) { return v == kVectors - 1 ? last_lanes : width; };
  Vec<T> m[kVectors], s[kVectors];
  for (int v = 0; v < kVectors; ++v) m[v] = s[v] = Vec<T>(T(0));
  for (int64_t b = 0; b < batch; ++b) {
    if (!active[b]) continue;
    for (int v = 0; v < kVectors; ++v) m[v] = m[v] + Vec<T>::loadu(z + b * stride + v * width, lanes(v));
  }
  for (int v = 0; v < kVectors; ++v) m[v] = m[v] * inv_count;
  for (int64_t b = 0; b < batch; ++b) {
    if (!active[b]) continue;
    for (int v = 0; v < kVectors; ++v) {
      const Vec<T> d = Vec<T>::loadu(z + b * stride + v * width, lanes(v)) - m[v];
      s[v] = at::vec::fmadd(d, d, s[v]);
    }
  }
  for (int v = 0; v < kVectors; ++v) {
    m[v].store(mean + v * width, lanes(v));
    (s[v] * inv_count).store(var + v * width, lanes(v));
  }
}

// Mean and biased variance over the active rows of z[b * stride + 0 .. size).
// z: rows of a [B, stride] matrix, already offset to the first column.
template <typename T>
void masked_moments(const T* z, int64_t stride, int64_t batch, const bool* active, int64_t count,
                    int64_t size, T* mean, T* var) {
  constexpr int64_t width = Vec<T>::size();
  constexpr int64_t kColumns = 4 * width;
  const Vec<T> inv_count(T(1) / T(std::max<int64_t>(count, 1)));
  int64_t j = 0;
  for (; j + kColumns <= size; j += kColumns) {
    column_moments<T, 4>(z + j, stride, batch, active, inv_count, width, mean + j, var + j);
  }
  for (; j < size; j += width) {
    column_moments<T, 1>(z + j, stride, batch, active, inv_count, std::min(width, size - j), mean + j, var + j);
  }
}

template <typename T>
struct StepForward {
  // Shapes: h_prev, h_next, c, output [B, H]; reserve [B, width].
  // W_ih x_t for the task's columns: gate g of unit j0 + j of row b at
  // wx[b * wx_row + g * wx_gate + j] (the layer's projection row, or the block's own product).
  const T* wx;
  int64_t wx_row, wx_gate;
  const bool* active;
  int64_t count;
  int64_t step;  // start_step + t: picks the statistics rows min(step, S - 1) in evaluation
  const T* h_prev;  // h_{t-1}, read by every block's GEMM: h_t goes to another buffer
  T* h_next;        // null where output is h_t (no row of the call is padded)
  T* c;
  T* output;
  T* reserve;  // this step's rows, or null in inference
  // The batch statistics of this step, in training: [4H] (step-wise input), [4H] (if
  // normalize_recurrent), [H] (if normalize_cell); else null.
  T* mean_ih;
  T* var_ih;
  T* mean_hh;
  T* var_hh;
  T* mean_c;
  T* var_c;
  // Step t + 1's W_ih x rows (laid out as wx; read) and reserve rows (to be written),
  // prefetched during this step; null at the last step, for W_ih x where the block computes
  // it at every step, and for the reserve in inference.
  const T* next_wx;
  T* next_reserve;
  // Store the reserve past the caches (store_streaming, stream_reserve_rows); the output
  // gate then also goes to the block's scratch, which the training pass over h reads.
  bool stream_reserve;
};

// rstd = 1 / sqrt(var + eps) and scale = gamma * rstd over [0, size) (rstd may be var).
template <typename T>
void scale_from_variance(const T* var, const T* gamma, T eps, int64_t size, T* rstd, T* scale) {
  for_each_vec<T>(size, [&](int64_t j, auto n) {
    const Vec<T> inv = inverse_sqrt(Vec<T>::loadu(var + j, n) + Vec<T>(eps));
    inv.store(rstd + j, n);
    (inv * Vec<T>::loadu(gamma + j, n)).store(scale + j, n);
  });
}

// The batch statistics of one normalized part for a task's columns, taken at every step of
// training: BN(z) = (z - mean) * scale + shift, scale = gamma * rstd. A part that is not
// normalized keeps mean 0, scale 1.
template <typename T>
struct ColumnStats {
  BlockVector<T> mean, rstd, scale;
  explicit ColumnStats(int64_t size) : mean(size, T(0)), rstd(size, T(1)), scale(size, T(1)) {}

  // Columns [offset, offset + size) from the moments of z over the active rows, reported in
  // used_mean and used_var.
  void normalize_with(const T* z, int64_t stride, int64_t batch, const bool* active, int64_t count,
                      const T* gamma, T eps, int64_t offset, int64_t size, T* used_mean, T* used_var) {
    T* m = mean.data() + offset;
    T* r = rstd.data() + offset;
    masked_moments(z, stride, batch, active, count, size, m, r);
    std::copy_n(m, size, used_mean);
    std::copy_n(r, size, used_var);
    scale_from_variance(r, gamma, eps, size, r, scale.data() + offset);
  }
};

// A part whose statistics are fixed for the whole call (evaluation's running statistics,
// one row per slot, or the sequence-wise input statistics, one row): its scale, and where
// keep_rstd its rstd, for every slot the call reads, computed once a call rather than at
// every step.
template <typename T>
class GivenStatistics {
 public:
  GivenStatistics() = default;
  // mean, var: [slots, columns]; the call's steps are start_step .. start_step + steps - 1.
  GivenStatistics(const T* mean, const T* var, const T* gamma, T eps, int64_t slots, int64_t columns,
                  int64_t start_step, int64_t steps, bool keep_rstd)
      : mean_(mean), slots_(slots), columns_(columns), first_(std::min(start_step, slots - 1)), keep_rstd_(keep_rstd) {
    const int64_t rows = std::max<int64_t>(std::min(start_step + steps - 1, slots - 1) - first_ + 1, 0);
    scale_.reset(new T[rows * columns]);  // every element is written below: no zero fill
    if (keep_rstd) rstd_.reset(new T[rows * columns]);
    // Rows in parallel where there are many (a long call's table is a step's worth of work
    // per row); each chunk's rstd goes to its own row buffer where it is not kept.
    const int64_t grain = std::max<int64_t>(1, kGivenStatisticsGrain / std::max<int64_t>(columns, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> row_rstd(keep_rstd ? 0 : columns);
      for (int64_t r = begin; r < end; ++r) {
        T* rstd = keep_rstd ? rstd_.get() + r * columns : row_rstd.data();
        scale_from_variance(var + (first_ + r) * columns, gamma, eps, columns, rstd, scale_.get() + r * columns);
      }
    });
  }
  const T* mean(int64_t step) const { return mean_ + slot(step) * columns_; }
  // null where not kept
  const T* rstd(int64_t step) const { return keep_rstd_ ? rstd_.get() + (slot(step) - first_) * columns_ : nullptr; }
  const T* scale(int64_t step) const { return scale_.get() + (slot(step) - first_) * columns_; }

 private:
  int64_t slot(int64_t step) const { return std::min(step, slots_ - 1); }

  const T* mean_ = nullptr;
  int64_t slots_ = 0, columns_ = 0, first_ = 0;
  bool keep_rstd_ = false;
  std::unique_ptr<T[]> rstd_, scale_;  // [rows, columns]
};

// Where one part's statistics for a task's columns are at one step, gate by gate: in the
// block's ColumnStats (batch statistics) or in the call's GivenStatistics.
template <typename T>
struct GateStatistics {
  const T* mean[4];
  const T* rstd[4];
  const T* scale[4];

  void point_to(const ColumnStats<T>& stats, int64_t gate, int64_t units) {
    mean[gate] = stats.mean.data() + gate * units;
    rstd[gate] = stats.rstd.data() + gate * units;
    scale[gate] = stats.scale.data() + gate * units;
  }
  void point_to(const GivenStatistics<T>& stats, int64_t step, int64_t gate, int64_t column) {
    mean[gate] = stats.mean(step) + column;
    rstd[gate] = stats.rstd(step) != nullptr ? stats.rstd(step) + column : nullptr;
    scale[gate] = stats.scale(step) + column;
  }
};

// One block's per-step buffers of the forward pass, allocated once a call and reused at
// every step (a step at B=1 is a few microseconds; a dozen allocations a step showed in
// its profile). A part that is not normalized keeps ColumnStats' identity values: the
// flags, and with them what each step writes, are the same at every step of a call.
// zeros: the bias and cell beta of a layer without them. reserve_row: one reserve row
// (row_width floats), where the pass stages it to stream it out (RecurrentForwardCPU::run).
template <typename T>
struct ForwardScratch {
  ColumnStats<T> in, rec, cell;
  BlockVector<T> zeros, c_new, out_gate, reserve_row;
  ForwardScratch(int64_t batch, int64_t units, int64_t row_width)
      : in(4 * units), rec(4 * units), cell(units), zeros(4 * units, T(0)), c_new(batch * units),
        out_gate(batch * units), reserve_row(row_width) {}
};

// Whether the training forward stages each reserve row in ForwardScratch::reserve_row before
// streaming it out: where a vector is shorter than a cache line (AVX2), each streamed store
// leaves its line half written among the pass's other stores, and the write-combining buffers
// flush partial lines (docs/CPU.md).
template <typename T>
constexpr bool kStageStreamedReserve = Vec<T>::size() * sizeof(T) < 64;

template <typename T>
class RecurrentForwardCPU {
 public:
  // The statistics given for the whole call (input ones that are not the step's batch's,
  // and in evaluation the running ones) get their GivenStatistics here, once. keep: the
  // steps store what the backward pass reads.
  RecurrentForwardCPU(const RecurrentForwardArgs& args, const LayerFlags& flags, int64_t batch,
                      int64_t hidden, bool keep)
      : flags_(flags), layout_(hidden, flags), batch_(batch), hidden_(hidden),
        given_input_(flags.input_statistics != kInputNone &&
                     !(flags.training && flags.input_statistics == kInputStep)),
        bias_(data_or_null(args.bias)), gamma_ih_(data_or_null(args.gamma_ih)),
        gamma_hh_(data_or_null(args.gamma_hh)), gamma_c_(data_or_null(args.gamma_c)),
        beta_c_(data_or_null(args.beta_c)) {
    const T eps = T(flags.eps);
    const int64_t steps = args.active.size(0), G = 4 * hidden;
    const auto given = [&](const at::Tensor& mean, const at::Tensor& var, const T* gamma, int64_t columns,
                           bool keep_rstd) {
      return GivenStatistics<T>(mean.data_ptr<T>(), var.data_ptr<T>(), gamma, eps, mean.size(0), columns,
                                flags.start_step, steps, keep_rstd);
    };
    // Only the recurrent part's rstd is read: for the normalized product kept for the backward.
    if (given_input_) input_ = given(args.input_mean, args.input_var, gamma_ih_, G, false);
    if (!flags.training && flags.normalize_recurrent) {
      recurrent_ = given(args.running_mean_hh, args.running_var_hh, gamma_hh_, G, keep);
    }
    if (!flags.training && flags.normalize_cell) {
      cell_ = given(args.running_mean_c, args.running_var_c, gamma_c_, hidden, false);
    }
  }

  // One step over hidden units [j0, j1), given zh = this block's columns of W_hh h_{t-1}
  // ([B, 4J], gate-major: column g * J + j is gate g of unit j0 + j). kKeep: store what the
  // backward pass reads.
  // scratch: this block's, ForwardScratch(B, j1 - j0).
  template <bool kKeep>
  void run(const StepForward<T>& s, const T* zh, int64_t j0, int64_t j1, ForwardScratch<T>& scratch) const {
    const int64_t H = hidden_, B = batch_, W = layout_.width, J = j1 - j0;
    const T eps = T(flags_.eps);
    const bool normalize_input = flags_.input_statistics != kInputNone;
    GateStatistics<T> in, rec, cell;
    const T* bias[4];
    for (int64_t g = 0; g < 4; ++g) {
      const int64_t k0 = g * H + j0;
      if (given_input_) {
        in.point_to(input_, s.step, g, k0);
      } else {
        if (normalize_input) {
          scratch.in.normalize_with(s.wx + g * s.wx_gate, s.wx_row, B, s.active, s.count, gamma_ih_ + k0, eps, g * J, J,
                                    s.mean_ih + k0, s.var_ih + k0);
        }
        in.point_to(scratch.in, g, J);
      }
      if (flags_.normalize_recurrent && !flags_.training) {
        rec.point_to(recurrent_, s.step, g, k0);
      } else {
        if (flags_.normalize_recurrent) {
          scratch.rec.normalize_with(zh + g * J, 4 * J, B, s.active, s.count, gamma_hh_ + k0, eps, g * J, J,
                                     s.mean_hh + k0, s.var_hh + k0);
        }
        rec.point_to(scratch.rec, g, J);
      }
      bias[g] = bias_ != nullptr ? bias_ + k0 : scratch.zeros.data() + g * J;
    }
    // The cell's statistics: in evaluation the running ones, known before the pass, so h
    // is written in the same pass as the gates; in training the batch's, over every row's
    // new cell, so h takes a second pass.
    const bool one_pass = !flags_.training;
    const T* cell_beta = beta_c_ != nullptr ? beta_c_ + j0 : scratch.zeros.data();
    if (flags_.normalize_cell && one_pass) {
      cell.point_to(cell_, s.step, 0, j0);
    } else {
      cell.point_to(scratch.cell, 0, 0);
    }
    // The passes read every pointer from a local: an intrinsic's vector store may alias any
    // memory, so one read through s, scratch (a vector's data()) or this is loaded again
    // after each store.
    const T* const wx_rows = s.wx;
    const int64_t wx_row = s.wx_row, wx_gate = s.wx_gate;
    const bool* const active_rows = s.active;
    const T* const h_prev = s.h_prev;
    T* const h_next = s.h_next;
    T* const c_rows = s.c;
    T* const output = s.output;
    T* const reserve = s.reserve;
    const T* const next_wx = s.next_wx;
    T* const next_reserve = s.next_reserve;
    const bool stream_reserve = s.stream_reserve;
    const bool normalize_recurrent = flags_.normalize_recurrent;
    const int64_t gates_at = layout_.gates, zhat_at = layout_.zhat, c_new_at = layout_.c_new;
    const T* const cell_mean = cell.mean[0];
    const T* const cell_scale = cell.scale[0];
    const auto cell_statistics = [&](const T* c_new) {
      if (!flags_.normalize_cell) return;
      scratch.cell.normalize_with(c_new, J, B, s.active, s.count, gamma_c_ + j0, eps, 0, J, s.mean_c + j0,
                                  s.var_c + j0);
    };
    // h = o * tanh(BN(c)), and the state and output of row b; padded steps give zero output
    // and leave the state alone.
    const auto write_h = [&](int64_t b, int64_t j, auto n, const Vec<T>& value, const Vec<T>& o) {
      // Centred before scaling, as the gates below.
      const Vec<T> seen = at::vec::fmadd(value - Vec<T>::loadu(cell_mean + j, n), Vec<T>::loadu(cell_scale + j, n),
                                         Vec<T>::loadu(cell_beta + j, n));
      const Vec<T> h_new = o * fast_tanh(seen);
      const int64_t at = b * H + j0 + j;
      if (active_rows[b]) {
        if (h_next != nullptr) h_new.store(h_next + at, n);
        value.store(c_rows + at, n);
        h_new.store(output + at, n);
      } else {
        Vec<T>::loadu(h_prev + at, n).store(h_next + at, n);
        Vec<T>(T(0)).store(output + at, n);
      }
    };

    // gates = (W_ih x - mean_in) * scale_in + (W_hh h - mean_rec) * scale_rec + bias, with
    // scale = gamma * rstd. Centred before scaling: folding the means into one shift
    // (x * scale + (bias - mean * scale)) cancels catastrophically when the batch spread is
    // small against the mean (few active sequences), where scale is large.
    // Gates and the new cell for every row (padded rows too: their values stay finite and
    // the backward pass multiplies them by zero).
    T* const c_new = scratch.c_new.data();
    T* const out_gate = scratch.out_gate.data();
    T* const reserve_row = scratch.reserve_row.data();
    const bool staged = kKeep && stream_reserve && kStageStreamedReserve<T>;
    for (int64_t b = 0; b < B; ++b) {
      T* const rs = kKeep ? reserve + b * W : nullptr;
      // The reserve's stores (StepForward::stream_reserve), at an offset in the row.
      T* const keep_row = staged ? reserve_row : rs;
      const auto keep_store = [&](const Vec<T>& v, int64_t offset, auto n) {
        store_streaming(stream_reserve && !staged, v, keep_row + offset, n);
      };
      if (next_wx != nullptr) {
        for (int64_t g = 0; g < 4; ++g) prefetch_span(next_wx + b * wx_row + g * wx_gate, J);
      }
      if (kKeep && next_reserve != nullptr && !stream_reserve) {
        T* next = next_reserve + b * W;
        for (int64_t g = 0; g < 4; ++g) {
          if (normalize_recurrent) prefetch_span<true>(next + zhat_at + g * H + j0, J);
          prefetch_span<true>(next + gates_at + g * H + j0, J);
        }
        prefetch_span<true>(next + c_new_at + j0, J);
      }
      const T* const wx_b = wx_rows + b * wx_row;
      const T* const zh_b = zh + b * 4 * J;
      T* const c_b = c_rows + b * H + j0;
      for_each_vec<T>(J, [&](int64_t j, auto n) {
        Vec<T> pre[4];
        for (int64_t g = 0; g < 4; ++g) {
          const int64_t k = g * H + j0 + j;
          const Vec<T> wx = Vec<T>::loadu(wx_b + g * wx_gate + j, n);
          const Vec<T> z = Vec<T>::loadu(zh_b + g * J + j, n);
          if (kKeep && normalize_recurrent) {
            const Vec<T> zhat = (z - Vec<T>::loadu(rec.mean[g] + j, n)) * Vec<T>::loadu(rec.rstd[g] + j, n);
            keep_store(zhat, zhat_at + k, n);
          }
          pre[g] = at::vec::fmadd(wx - Vec<T>::loadu(in.mean[g] + j, n), Vec<T>::loadu(in.scale[g] + j, n),
                                  at::vec::fmadd(z - Vec<T>::loadu(rec.mean[g] + j, n),
                                                 Vec<T>::loadu(rec.scale[g] + j, n), Vec<T>::loadu(bias[g] + j, n)));
        }
        const Vec<T> i = sigmoid(pre[0]), f = sigmoid(pre[1]), g = fast_tanh(pre[2]), o = sigmoid(pre[3]);
        const Vec<T> c_prev = Vec<T>::loadu(c_b + j, n);
        const Vec<T> value = at::vec::fmadd(f, c_prev, i * g);
        if (kKeep) {
          keep_store(i, gates_at + 0 * H + j0 + j, n);
          keep_store(f, gates_at + 1 * H + j0 + j, n);
          keep_store(g, gates_at + 2 * H + j0 + j, n);
          keep_store(o, gates_at + 3 * H + j0 + j, n);
          keep_store(value, c_new_at + j0 + j, n);
        }
        if (one_pass) {
          write_h(b, j, n, value, o);
        } else {
          value.store(c_new + b * J + j, n);
          if (!kKeep || stream_reserve) o.store(out_gate + b * J + j, n);
        }
      });
      if (staged) {
        // The block's columns of each H-wide segment of the row (ReserveLayout's parts are
        // whole segments, back to back), line after line.
        for (int64_t offset = j0; offset < W; offset += H) stream_copy(keep_row + offset, rs + offset, J);
      }
    }
    if (kKeep && stream_reserve) fence_streaming_stores();
    if (one_pass) return;

    // Training: the cell's batch statistics over the active rows, then h.
    cell_statistics(c_new);
    for (int64_t b = 0; b < B; ++b) {
      const T* const o_row = kKeep && !stream_reserve ? reserve + b * W + gates_at + 3 * H + j0 : out_gate + b * J;
      const T* const c_new_row = c_new + b * J;
      for_each_vec<T>(J, [&](int64_t j, auto n) {
        write_h(b, j, n, Vec<T>::loadu(c_new_row + j, n), Vec<T>::loadu(o_row + j, n));
      });
    }
  }

 private:
  static const T* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

  LayerFlags flags_;
  ReserveLayout layout_;
  int64_t batch_, hidden_;
  bool given_input_;  // the input's statistics are given (GivenStatistics), not the step's batch's
  const T* bias_;
  const T* gamma_ih_;
  const T* gamma_hh_;
  const T* gamma_c_;
  const T* beta_c_;
  GivenStatistics<T> input_, recurrent_, cell_;
};

// The hidden units split into one block per thread, fixed for the whole sequence: a block
// computes its own columns of every step's GEMM (its slice of W_hh stays packed in its
// core's cache) and then the fused pass over them, so zh never crosses cores and a step
// costs one parallel region. Blocks are whole vectors wide and at least kMinBlockUnits
// hidden units (or the whole layer). A call with less recurrent work than kMinParallelFlops
// runs as one block: a decoder calling a cell once per step (B=16, H=128: 2 MFLOP a call)
// leaves the other threads asleep between calls, and waking them costs more than they save
// (docs/CPU.md).
constexpr int64_t kMinBlockUnits = 32;
constexpr double kMinParallelFlops = 8e6;

// cpu_steps_project_input: input features per batch row up to which a step projects its own input.
constexpr int64_t kStepInputPerRow = 8;

// See stream_grads in recurrent_backward_impl.
constexpr int64_t kStreamingStoreMinBytes = int64_t(4) << 20;
// See stream_reserve_rows.
constexpr int64_t kStreamingReserveMinBytes = int64_t(1) << 20;

// Whether the training forward stores the reserve past the caches. It is written once and
// read only by the backward pass, from its last step back: beyond a core's L2 its lines are
// gone before then, and stored through the caches each is first read in (and the next
// step's rows fetched ahead for writing) only to be evicted. Streamed, its bytes go out
// once (docs/CPU.md). Only where every block's columns of a gate start on a cache line (H a
// multiple of 16 floats): a line half streamed and half stored costs more than either.
template <typename T>
bool stream_reserve_rows(int64_t hidden, int64_t bytes) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return std::is_same<T, float>::value && hidden % 16 == 0 && bytes >= kStreamingReserveMinBytes;
#else
  (void)hidden;
  (void)bytes;
  return false;
#endif
}

// The steps of a weight-gradient chunk (add_weight_gradients in recurrent_backward_impl): as
// many as fill kWeightGradientChunkBytes per buffer (a few of them fit a core's L2 beside
// the step's other data), but at least kWeightGradientChunkRows rows, or the accumulator's
// read and write every chunk dominate the GEMMs (docs/CPU.md has the chunk sizes measured).
constexpr int64_t kWeightGradientChunkBytes = int64_t(256) << 10;
constexpr int64_t kWeightGradientChunkRows = 256;
// Up to this many rows (T * B), a backward of one block writes the weight gradients as they
// are (dz^T h) instead of into transposed rows (h^T dz) transposed back after the
// recurrence: MKL runs h^T dz faster from about this many rows on, which pays for the
// transposes; a cell's step or a short, small batch would pay only them (docs/CPU.md).
constexpr int64_t kDirectWeightGradientRows = 64;
// Rows a backward column pass walks per group (RecurrentBackwardCPU::run): enough to keep
// the per-column sums and constants in registers for a while, few enough that a group's
// rows (kilobytes apart) share the L1 sets without evicting each other.
constexpr int64_t kRowGroup = 8;

bool worth_parallel(int64_t steps, int64_t batch, int64_t hidden) {
  const double flops = 8.0 * double(steps) * double(batch) * double(hidden) * double(hidden);  // W_hh products
  return flops >= kMinParallelFlops;
}

int64_t hidden_block_count(int64_t steps, int64_t batch, int64_t hidden, int64_t threads) {
  if (!worth_parallel(steps, batch, hidden)) return 1;
  return std::max<int64_t>(1, std::min(threads, hidden / kMinBlockUnits));
}

// The threads a recurrence may split over: one inside a parallel region (a direction of a
// bidirectional layer run beside the other, bidirectional_cpu.cpp), where a nested
// at::parallel_for runs on the calling thread alone.
int64_t available_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

std::vector<int64_t> hidden_blocks(int64_t steps, int64_t batch, int64_t hidden) {
  const int64_t width = Vec<float>::size();  // whole vectors in float32, and so in float64
  const int64_t count = hidden_block_count(steps, batch, hidden, available_threads());
  std::vector<int64_t> bounds{0};
  for (int64_t k = 1; k < count; ++k) bounds.push_back((hidden * k / count + width / 2) / width * width);
  bounds.push_back(hidden);
  return bounds;
}

// out (+)= a @ b over all steps' rows: bfloat16 operands where the layer multiplies in them
// (bf16_gemm.h), SmallGemm's kernel where it outruns MKL (panel_gemm_preferred), else ATen's.
void host_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate, bool bf16) {
  if (bf16) {
    bf16_matmul(out, a, b, accumulate);
  } else if (panel_gemm_preferred() && out.scalar_type() == at::kFloat) {
    panel_matmul<float>(out, a, b, accumulate);
  } else if (panel_gemm_preferred() && out.scalar_type() == at::kDouble) {
    panel_matmul<double>(out, a, b, accumulate);
  } else {
    matmul_aten(out, a, b, accumulate);
  }
}

// A block's rows of a gate-stacked weight [4H, C]: gate g's rows of hidden units
// [j0, j0 + J), gate after gate, as [4J, C] (the column order of the block's zh and dz).
at::Tensor block_rows(const at::Tensor& weight, int64_t j0, int64_t J) {
  const int64_t H = weight.size(0) / 4, C = weight.size(1);
  if (j0 == 0 && J == H) return weight.contiguous();  // the whole layer: no views to dispatch
  return weight.view({4, H, C}).narrow(1, j0, J).reshape({4 * J, C}).contiguous();
}

// used [T, C] = the slot rows steps start_step .. start_step + T - 1 read from given [S, C]
// (slot min(step, S - 1)); both contiguous. By memcpy: the two ATen copies it would take
// cost a serving call (B=1) more than the bytes.
template <typename T>
void copy_slot_rows(const at::Tensor& used, const at::Tensor& given, int64_t start_step) {
  const int64_t steps = used.size(0), slots = given.size(0), columns = used.size(1);
  const int64_t own = std::clamp<int64_t>(slots - start_step, 0, steps);  // steps with a slot of their own
  T* out = used.data_ptr<T>();
  const T* in = given.data_ptr<T>();
  if (own > 0) std::memcpy(out, in + start_step * columns, sizeof(T) * own * columns);
  for (int64_t t = own; t < steps; ++t) std::memcpy(out + t * columns, in + (slots - 1) * columns, sizeof(T) * columns);
}

// The training forward's fold as it goes (RecurrentForwardArgs::fold): after a block has
// taken a step's batch statistics of its columns, it folds them into the step's slot, while
// they are in its cache and before the next step. A pass after the loop would read every
// step's statistics and the running ones again, enough at small sizes to push the next
// call's weights out of L2 (docs/CPU.md). Each block keeps its own first skipped steps.
template <typename T>
class StepFold {
 public:
  StepFold(RunningFold* fold, const LayerFlags& flags, int64_t hidden, int64_t blocks)
      : fold_(fold), hidden_(hidden), start_step_(flags.start_step),
        keep_(T(1 - (fold != nullptr ? fold->momentum : 0))), take_(T(fold != nullptr ? fold->momentum : 0)),
        skipped_(fold != nullptr ? blocks : 0, {-1, -1, -1}) {
    if (fold == nullptr) return;
    const bool step_input = flags.input_statistics == kInputStep;
    parts_[0] = part(step_input ? fold->mean_ih : at::Tensor(), step_input ? fold->var_ih : at::Tensor());
    parts_[1] = part(flags.normalize_recurrent ? fold->mean_hh : at::Tensor(),
                     flags.normalize_recurrent ? fold->var_hh : at::Tensor());
    parts_[2] = part(flags.normalize_cell ? fold->mean_c : at::Tensor(),
                     flags.normalize_cell ? fold->var_c : at::Tensor());
  }

  bool active() const { return fold_ != nullptr; }

  // Block k's columns (units [j0, j0 + J); every gate of the 4H-wide parts) of step t's
  // statistics, the rows of the parts' [T, F] outputs (null where not taken), over count rows.
  void step(int64_t k, int64_t t, int64_t j0, int64_t J, int64_t count, const std::array<const T*, 6>& rows) {
    if (count < 2) return;  // no unbiased variance: the fold leaves the slot as it is
    const T unbias = unbiasing_factor<T>(double(count));
    for (int64_t p = 0; p < 3; ++p) {
      const Part& part = parts_[p];
      if (part.mean == nullptr) continue;
      const int64_t slot = slot_offset(part, t);
      bool skipped = false;
      for (int64_t g = 0; g < part.gates; ++g) {
        const int64_t at = g * hidden_ + j0;
        skipped |= fold_step(part.mean + slot + at, part.var + slot + at, rows[2 * p] + at, rows[2 * p + 1] + at, J,
                             keep_, take_, unbias);
      }
      if (skipped && skipped_[k][p] < 0) skipped_[k][p] = t;
    }
  }

  // Asks for step t's slot rows of the block's columns ahead of its fold (prefetch_span):
  // read once a call, they come from L3 or memory.
  void prefetch(int64_t t, int64_t j0, int64_t J) const {
    for (const Part& part : parts_) {
      if (part.mean == nullptr) continue;
      const int64_t slot = slot_offset(part, t);
      for (int64_t g = 0; g < part.gates; ++g) {
        prefetch_span<true>(part.mean + slot + g * hidden_ + j0, J);
        prefetch_span<true>(part.var + slot + g * hidden_ + j0, J);
      }
    }
  }

  // After the last step: each part's first skipped step over all blocks, into the fold.
  void report() const {
    if (fold_ == nullptr) return;
    for (const auto& block : skipped_) {
      for (int64_t p = 0; p < 3; ++p) {
        int64_t& first = fold_->first_skipped[p];
        if (block[p] >= 0 && (first < 0 || block[p] < first)) first = block[p];
      }
    }
  }

 private:
  struct Part {
    T* mean = nullptr;
    T* var = nullptr;
    int64_t slots = 0, features = 0;
    int64_t gates = 0;  // H-wide segments a row holds: 4 (input, recurrent) or 1 (cell)
  };
  // A part's pointers; its tensors are marked as changed in place (the steps write them).
  Part part(const at::Tensor& mean, const at::Tensor& var) const {
    if (!mean.defined()) return {};
    mark_updated_in_place(mean);
    mark_updated_in_place(var);
    return {mean.data_ptr<T>(), var.data_ptr<T>(), mean.size(0), mean.size(1), mean.size(1) / hidden_};
  }
  // Where step t's slot, row min(start_step + t, S - 1), starts in the part's [S, F] tensors.
  int64_t slot_offset(const Part& part, int64_t t) const {
    return std::min(start_step_ + t, part.slots - 1) * part.features;
  }

  RunningFold* fold_;
  int64_t hidden_, start_step_;
  T keep_, take_;
  Part parts_[3];
  std::vector<std::array<int64_t, 3>> skipped_;
};

template <typename T>
void recurrent_forward_impl(const RecurrentForwardArgs& args, RecurrentForwardOutputs& out,
                            const LayerFlags& flags) {
  const int64_t T_ = args.active.size(0), B = args.active.size(1);
  const int64_t H = args.weight_hh.size(1);
  // Without the layer's input projection, each block multiplies x_t by its own rows of W_ih
  // at every step (RecurrentForwardArgs): into its own [B, 4J] buffer, or where the backward
  // reads W_ih x_t (out.projection), gate by gate into its columns of that tensor's rows.
  const bool project_in_steps = !args.input_projection.defined();
  const bool keep_projection = project_in_steps && out.projection.defined();
  const bool keep = out.reserve.defined();
  const RecurrentForwardCPU<T> kernel(args, flags, B, H, keep);
  const bool bf16 = bf16_operands(flags.operand_dtype, c10::CppTypeToScalarType<T>::value);
  const std::vector<int64_t> bounds = hidden_blocks(T_, B, H);
  const int64_t blocks = static_cast<int64_t>(bounds.size()) - 1;
  const bool once = T_ == 1;  // each product runs once: StepGemm may read W as it is
  std::vector<StepGemm> gemms;        // block k: h [B, H] @ (its rows of W_hh)^T -> [B, 4J]
  std::vector<StepGemm> input_gemms;  // block k: x_t [B, I] @ (its rows of W_ih)^T -> [B, 4J], if project_in_steps
  // Where keep_projection, instead block k's gate g at 4 * k + g: x_t @ (gate g's rows of W_ih
  // for its units)^T -> [B, J], rows 4H apart.
  std::vector<at::Tensor> zh, zx;     // block k's [B, 4J]
  std::vector<ForwardScratch<T>> scratch;
  const at::TensorOptions options = args.weight_hh.options();
  const bool stream_reserve = keep && stream_reserve_rows<T>(H, out.reserve.nbytes());
  const int64_t staged_row_width = stream_reserve && kStageStreamedReserve<T> ? ReserveLayout(H, flags).width : 0;
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t J = bounds[k + 1] - bounds[k];
    gemms.emplace_back(block_rows(args.weight_hh, bounds[k], J), /*transpose=*/true, B, bf16, once);
    zh.push_back(at::empty({B, 4 * J}, options));
    if (keep_projection) {
      for (int64_t g = 0; g < 4; ++g) {
        input_gemms.emplace_back(args.weight_ih.narrow(0, g * H + bounds[k], J), /*transpose=*/true, B, bf16,
                                   once);
      }
    } else if (project_in_steps) {
      input_gemms.emplace_back(block_rows(args.weight_ih, bounds[k], J), /*transpose=*/true, B, bf16, once);
      zx.push_back(at::empty({B, 4 * J}, options));
    }
    scratch.emplace_back(B, J, staged_row_width);
  }
  const bool* active = args.active.data_ptr<bool>();
  const int64_t* counts = args.counts.data_ptr<int64_t>();
  // Where no row is padded, step t's output rows are h_t, and the next step's GEMMs read
  // them there: h_t is written once, to rows no other core has read. Two buffers taking
  // turns made every block overwrite lines the other cores' GEMMs had read the step before,
  // each store waiting for their copies to be invalidated (docs/CPU.md).
  const bool h_in_output = std::all_of(counts, counts + T_, [B](int64_t count) { return count == B; });
  // Otherwise h_{t-1} and h_t in two buffers: a block that finishes early must not
  // overwrite columns of h_{t-1} another block's GEMM is still reading.
  at::Tensor h_buffers[2] = {out.h, h_in_output ? at::Tensor() : at::empty_like(out.h)};
  const bool step_input = flags.input_statistics == kInputStep;
  // The statistics each step used: the steps write their batch's in training; in evaluation
  // they are rows of the running ones, copied here where the call reports them (not in
  // inference, whose outputs have no rows).
  const bool training = flags.training;
  if (!training && keep) {
    if (step_input) {
      copy_slot_rows<T>(out.mean_ih, args.input_mean, flags.start_step);
      copy_slot_rows<T>(out.var_ih, args.input_var, flags.start_step);
    }
    if (flags.normalize_recurrent) {
      copy_slot_rows<T>(out.mean_hh, args.running_mean_hh, flags.start_step);
      copy_slot_rows<T>(out.var_hh, args.running_var_hh, flags.start_step);
    }
    if (flags.normalize_cell) {
      copy_slot_rows<T>(out.mean_c, args.running_mean_c, flags.start_step);
      copy_slot_rows<T>(out.var_c, args.running_var_c, flags.start_step);
    }
  }
  const Rows<T> projection(keep_projection ? out.projection : args.input_projection, !project_in_steps || keep_projection),
      inputs(args.x, project_in_steps),
      output(out.output, true), reserve(out.reserve, keep),
      mean_ih(out.mean_ih, training && step_input), var_ih(out.var_ih, training && step_input),
      mean_hh(out.mean_hh, training && flags.normalize_recurrent),
      var_hh(out.var_hh, training && flags.normalize_recurrent), mean_c(out.mean_c, training && flags.normalize_cell),
      var_c(out.var_c, training && flags.normalize_cell);
  StepFold<T> fold(training ? args.fold : nullptr, flags, H, blocks);
  run_steps(T_, blocks, [&](int64_t t, int64_t k) {
    const int64_t j0 = bounds[k], J = bounds[k + 1] - j0;
    T* block_zx = project_in_steps && !keep_projection ? zx[k].data_ptr<T>() : nullptr;
    if (keep_projection) {
      for (int64_t g = 0; g < 4; ++g) input_gemms[4 * k + g].run(inputs[t], projection[t] + g * H + j0, 4 * H);
    } else if (project_in_steps) {
      input_gemms[k].run(inputs[t], block_zx);
    }
    const StepForward<T> step{
        block_zx == nullptr ? projection[t] + j0 : block_zx, block_zx == nullptr ? 4 * H : 4 * J,
        block_zx == nullptr ? H : J, active + t * B, counts[t], flags.start_step + t,
        h_in_output ? (t == 0 ? out.h.data_ptr<T>() : output[t - 1]) : h_buffers[t % 2].data_ptr<T>(),
        h_in_output ? nullptr : h_buffers[(t + 1) % 2].data_ptr<T>(), out.c.data_ptr<T>(), output[t],
        reserve[t], mean_ih[t], var_ih[t], mean_hh[t], var_hh[t], mean_c[t], var_c[t],
        t + 1 < T_ && !project_in_steps ? projection[t + 1] + j0 : nullptr,
        t + 1 < T_ ? reserve[t + 1] : nullptr,
        stream_reserve,
    };
    T* block_zh = zh[k].data_ptr<T>();
    // The GEMM would meet the other blocks' columns of h_{t-1}, lines in other cores'
    // caches, a few at a time, row after row; asked for all at once, they come in parallel.
    if (blocks > 1) {
      for (int64_t b = 0; b < B; ++b) prefetch_span(step.h_prev + b * H, H);
    }
    if (fold.active()) fold.prefetch(t, j0, J);
    gemms[k].run(step.h_prev, block_zh);
    if (keep) {
      kernel.template run<true>(step, block_zh, bounds[k], bounds[k + 1], scratch[k]);
    } else {
      kernel.template run<false>(step, block_zh, bounds[k], bounds[k + 1], scratch[k]);
    }
    if (fold.active()) {
      fold.step(k, t, j0, J, step.count, {step.mean_ih, step.var_ih, step.mean_hh, step.var_hh, step.mean_c, step.var_c});
    }
  });
  fold.report();
  if (h_in_output) {
    if (T_ > 0 && B * H > 0) std::memcpy(out.h.data_ptr<T>(), output[T_ - 1], sizeof(T) * B * H);
  } else if (T_ % 2 == 1) {
    out.h.copy_(h_buffers[1]);
  }
}

template <typename T>
struct StepBackward {
  // Shapes: grad_output, grad_h, grad_c [B, H]; grad_gates, grad_zh, grad_wx, wx [B, 4H];
  // reserve [B, width].
  const T* grad_output;
  const T* reserve;
  const T* c_prev;      // c_{t-1}: the previous step's c_new, or c_0
  int64_t c_prev_stride;
  const T* wx;          // W_ih x_t, if the input is normalized
  const bool* active;
  int64_t count;
  const T* mean_ih;  // [4H] statistics used at this step, if the input is normalized
  const T* var_ih;
  const T* var_hh;   // [4H], if normalize_recurrent
  const T* mean_c;   // [H], if normalize_cell
  const T* var_c;
  T* grad_h;         // read: gradient of h_t
  T* grad_c;         // read: gradient of c_t; written: gradient of c_{t-1}
  T* grad_gates;     // gradient of the gate pre-activations, or null: not an output
  T* grad_zh;        // gradient of W_hh h_{t-1}, if normalize_recurrent (else grad_gates), or null
  T* grad_wx;        // gradient of W_ih x_t, if step-wise input (else written by the host), or null
  bool stream_grads;  // store grad_zh and grad_wx past the caches (store_streaming)
  // The step processed next (t - 1), whose rows this step prefetches; null at t = 0.
  const T* next_reserve;
  const T* next_wx;
  const T* next_grad_output;
  // h_t as the forward pass wrote it ([B, H]), or null: pass 1 then recomputes tanh(BN(c_t)).
  const T* output;
};

// Adds src[0, size) into dst.
template <typename T>
void add_into(T* dst, const T* src, int64_t size) {
  for_each_vec<T>(size, [&](int64_t j, auto n) {
    (Vec<T>::loadu(dst + j, n) + Vec<T>::loadu(src + j, n)).store(dst + j, n);
  });
}

// One block's per-step buffers of the backward pass, allocated once a call (as
// ForwardScratch): per-column constants, which each step overwrites where its flags use
// them, and column sums, which each step zeroes first.
template <typename T>
struct BackwardScratch {
  BlockVector<T> cell_rstd, cell_scale, cell_mean, cell_beta, sum_seen, sum_seen_c_hat;
  BlockVector<T> in_mean, in_rstd, in_scale, rec_scale, sum_dy, sum_dy_zhat, sum_dy_xhat;
  BlockVector<T> c_hat, grad_seen;
  BackwardScratch(int64_t batch, int64_t units)
      : cell_rstd(units, T(1)), cell_scale(units, T(1)), cell_mean(units, T(0)), cell_beta(units, T(0)),
        sum_seen(units), sum_seen_c_hat(units), in_mean(4 * units, T(0)), in_rstd(4 * units, T(1)),
        in_scale(4 * units, T(1)), rec_scale(4 * units, T(1)), sum_dy(4 * units), sum_dy_zhat(4 * units),
        sum_dy_xhat(4 * units), c_hat(batch * units), grad_seen(batch * units) {}
};

template <typename T>
class RecurrentBackwardCPU {
 public:
  RecurrentBackwardCPU(const RecurrentBackwardArgs& args, RecurrentBackwardOutputs& out,
                       const LayerFlags& flags, int64_t batch, int64_t hidden)
      : flags_(flags), layout_(hidden, flags), batch_(batch), hidden_(hidden),
        gamma_ih_(data_or_null(args.gamma_ih)), gamma_hh_(data_or_null(args.gamma_hh)),
        gamma_c_(data_or_null(args.gamma_c)), beta_c_(data_or_null(args.beta_c)),
        grad_bias_(out.grad_bias.data_ptr<T>()),
        grad_gamma_ih_(data_or_null(out.grad_gamma_ih)), grad_gamma_hh_(data_or_null(out.grad_gamma_hh)),
        grad_gamma_c_(data_or_null(out.grad_gamma_c)), grad_beta_c_(data_or_null(out.grad_beta_c)) {}

  // One step backwards over hidden units [j0, j1), in passes over the batch rows:
  //   1. the output gate and the gradient reaching the normalized cell, with its column sums;
  //   2. back through the cell normalization, the gates i, f, g and to c_{t-1};
  //   then the column sums of every gate's gradient (over groups of rows);
  //   3. back through the recurrent and the input normalizations.
  // Batch-norm backward needs column sums over all rows before any row's result, hence the
  // passes. Accumulates the bias, gamma and beta gradients of these units' columns (no other
  // task touches them). Padded rows carry zero gate gradients.
  //
  // dy, dz, dwx: the block's [B, 4J] buffers (gate-major, as zh in the forward pass) for
  // the gate gradients, the gradient of its columns of W_hh h_{t-1} (the operand of its share
  // of grad_zh W_hh; dy when the recurrence is not normalized) and of W_ih x_t (written with
  // step-wise input statistics; dy without input normalization).
  // scratch: this block's, BackwardScratch(B, j1 - j0).
  void run(const StepBackward<T>& s, int64_t j0, int64_t j1, T* dy, T* dz, T* dwx,
           BackwardScratch<T>& scratch) const {
    const int64_t H = hidden_, G = 4 * hidden_, B = batch_, W = layout_.width, J = j1 - j0;
    const T eps = T(flags_.eps);
    const Vec<T> one(T(1)), zero(T(0));
    const bool cell_bn = flags_.normalize_cell;
    const bool recurrent = flags_.normalize_recurrent;
    const bool any_input = flags_.input_statistics != kInputNone;
    const bool step_input = flags_.input_statistics == kInputStep;
    const bool training = flags_.training;
    const Vec<T> inv_count(T(1) / T(std::max<int64_t>(s.count, 1)));
    // The passes read every pointer from a local, as the forward pass's do.
    const T* const reserve = s.reserve;
    const T* const wx = s.wx;
    const bool* const active_rows = s.active;
    const T* const grad_output = s.grad_output;
    const T* const c_prev_rows = s.c_prev;
    const int64_t c_prev_stride = s.c_prev_stride;
    T* const grad_h = s.grad_h;
    T* const grad_c = s.grad_c;
    T* const grad_gates = s.grad_gates;
    T* const grad_zh = s.grad_zh;
    T* const grad_wx = s.grad_wx;
    const bool stream_grads = s.stream_grads;
    const T* const next_reserve = s.next_reserve;
    const T* const next_wx = s.next_wx;
    const T* const next_grad_output = s.next_grad_output;
    const int64_t gates_at = layout_.gates, zhat_at = layout_.zhat, c_new_at = layout_.c_new;
    const T* const gamma_c = gamma_c_;
    // tanh(BN(c_t)) read back as h_t / o rather than recomputed: one division in place of
    // tanh's forty-odd instructions, which bound pass 1 (docs/CPU.md). Where o is 0 (an
    // extreme gate's sigmoid underflows in the portable build, whose at::vec exp lacks
    // vec_math.h's clamp) the quotient is taken as 0, which gives the right gradients: both
    // uses of tanh below are multiplied by o. A padded row's h is 0, and so is its gradient.
    // float32 only: float64 is the precision the tests check against.
    const T* const h_rows = std::is_same_v<T, float> ? s.output : nullptr;

    // Per-column constants: u indexes gate g's column of hidden unit j0 + j as g * J + j.
    T* const cell_rstd = scratch.cell_rstd.data();
    T* const cell_scale = scratch.cell_scale.data();
    T* const cell_mean = scratch.cell_mean.data();
    T* const cell_beta = scratch.cell_beta.data();
    if (cell_bn) {
      scale_from_variance(s.var_c + j0, gamma_c + j0, eps, J, cell_rstd, cell_scale);
      std::copy_n(s.mean_c + j0, J, cell_mean);
      std::copy_n(beta_c_ + j0, J, cell_beta);
    }
    T* const in_mean = scratch.in_mean.data();
    T* const in_rstd = scratch.in_rstd.data();
    T* const in_scale = scratch.in_scale.data();
    T* const rec_scale = scratch.rec_scale.data();
    for (int64_t g = 0; g < 4; ++g) {
      const int64_t k0 = g * H + j0;
      if (any_input) {
        scale_from_variance(s.var_ih + k0, gamma_ih_ + k0, eps, J, in_rstd + g * J, in_scale + g * J);
        std::copy_n(s.mean_ih + k0, J, in_mean + g * J);
      }
      if (recurrent) {  // only the scale: the normalized recurrent product is in the reserve (zhat)
        const T* const var_hh = s.var_hh + k0;
        const T* const gamma_hh = gamma_hh_ + k0;
        for_each_vec<T>(J, [&](int64_t j, auto n) {
          const Vec<T> rstd = inverse_sqrt(Vec<T>::loadu(var_hh + j, n) + Vec<T>(eps));
          (rstd * Vec<T>::loadu(gamma_hh + j, n)).store(rec_scale + g * J + j, n);
        });
      }
    }
    // The gate gradients dy of this step, in the block's own [B, 4J] buffer (it stays in this
    // core's cache), and in grad_gates where that is an output.
    const auto dy_at = [dy, J](int64_t b, int64_t g) { return dy + b * 4 * J + g * J; };
    const auto store_dy = [=](int64_t b, int64_t g, int64_t j, auto n, const Vec<T>& value) {
      value.store(dy_at(b, g) + j, n);
      if (grad_gates != nullptr) value.store(grad_gates + b * G + g * H + j0 + j, n);
    };
    // Column sums of each gate's gradient dy, of dy * zhat and of dy * xhat.
    T* const sum_dy = scratch.sum_dy.data();
    T* const sum_dy_zhat = scratch.sum_dy_zhat.data();
    T* const sum_dy_xhat = scratch.sum_dy_xhat.data();
    for (T* sums : {sum_dy, sum_dy_zhat, sum_dy_xhat}) std::fill_n(sums, 4 * J, T(0));
    const auto xhat_at = [=](int64_t b, int64_t g, int64_t j, auto n) {
      return (Vec<T>::loadu(wx + b * G + g * H + j0 + j, n) - Vec<T>::loadu(in_mean + g * J + j, n)) *
             Vec<T>::loadu(in_rstd + g * J + j, n);
    };

    // Pass 1: the normalized cell, recomputed from c_t and the step's statistics, and its
    // tanh (h_rows above); the output gate's gradient; the gradient reaching the normalized
    // cell.
    T* const c_hat = scratch.c_hat.data();
    T* const grad_seen = scratch.grad_seen.data();
    T* const sum_seen = scratch.sum_seen.data();
    T* const sum_seen_c_hat = scratch.sum_seen_c_hat.data();
    std::fill_n(sum_seen, J, T(0));
    std::fill_n(sum_seen_c_hat, J, T(0));
    for (int64_t b = 0; b < B; ++b) {
      const T* const rs = reserve + b * W;
      const bool active = active_rows[b];
      if (next_reserve != nullptr) {  // a third of the next step's rows in each pass
        const T* next = next_reserve + b * W;
        for (int64_t g = 0; g < 4; ++g) prefetch_span(next + gates_at + g * H + j0, J);
        prefetch_span(next + c_new_at + j0, J);
        prefetch_span(next_grad_output + b * H + j0, J);
      }
      const T* const c_new_row = rs + c_new_at + j0;
      const T* const o_row = rs + gates_at + 3 * H + j0;
      const T* const grad_output_row = grad_output + b * H + j0;
      const T* const grad_h_row = grad_h + b * H + j0;
      const T* const h_row = h_rows == nullptr ? nullptr : h_rows + b * H + j0;
      T* const c_hat_row = c_hat + b * J;
      T* const grad_seen_row = grad_seen + b * J;
      for_each_vec<T>(J, [&](int64_t j, auto n) {
        Vec<T> normalized = zero;
        if (cell_bn) {
          normalized = (Vec<T>::loadu(c_new_row + j, n) - Vec<T>::loadu(cell_mean + j, n)) *
                       Vec<T>::loadu(cell_rstd + j, n);
          normalized.store(c_hat_row + j, n);
        }
        const Vec<T> o = Vec<T>::loadu(o_row + j, n);
        Vec<T> tanh;
        if (h_row != nullptr) {
          tanh = Vec<T>::blendv(zero, Vec<T>::loadu(h_row + j, n) / o, o > zero);
        } else {
          tanh = fast_tanh(cell_bn ? at::vec::fmadd(normalized, Vec<T>::loadu(gamma_c + j0 + j, n),
                                                    Vec<T>::loadu(cell_beta + j, n))
                                   : Vec<T>::loadu(c_new_row + j, n));
        }
        const Vec<T> grad_h_new =
            active ? Vec<T>::loadu(grad_output_row + j, n) + Vec<T>::loadu(grad_h_row + j, n) : zero;
        const Vec<T> grad_o = grad_h_new * tanh * o * (one - o);
        store_dy(b, 3, j, n, grad_o);
        const Vec<T> grad = grad_h_new * o * (one - tanh * tanh);
        grad.store(grad_seen_row + j, n);
        if (cell_bn) {
          (Vec<T>::loadu(sum_seen + j, n) + grad).store(sum_seen + j, n);
          at::vec::fmadd(grad, normalized, Vec<T>::loadu(sum_seen_c_hat + j, n)).store(sum_seen_c_hat + j, n);
        }
      });
    }
    if (cell_bn) {
      add_into(grad_beta_c_ + j0, sum_seen, J);
      add_into(grad_gamma_c_ + j0, sum_seen_c_hat, J);
    }

    // Pass 2: through the cell normalization (training: dx = gamma * rstd * (dy - mean(dy) -
    // xhat * mean(dy * xhat)) on active rows; evaluation: gamma * rstd * dy), plus the
    // gradient arriving at c_t from step t+1; then the gates i, f, g and c_{t-1}.
    for (int64_t b = 0; b < B; ++b) {
      const T* const rs = reserve + b * W;
      const bool active = active_rows[b];
      if (next_reserve != nullptr && recurrent) {
        for (int64_t g = 0; g < 4; ++g) prefetch_span(next_reserve + b * W + zhat_at + g * H + j0, J);
      }
      const T* const gate_rows = rs + gates_at + j0;
      const T* const c_prev_row = c_prev_rows + b * c_prev_stride + j0;
      const T* const c_hat_row = c_hat + b * J;
      const T* const grad_seen_row = grad_seen + b * J;
      T* const grad_c_row = grad_c + b * H + j0;
      for_each_vec<T>(J, [&](int64_t j, auto n) {
        Vec<T> dc = zero;
        if (active) {
          Vec<T> grad_cell = Vec<T>::loadu(grad_seen_row + j, n);
          if (cell_bn) {
            if (training) {
              grad_cell = grad_cell - Vec<T>::loadu(sum_seen + j, n) * inv_count -
                          Vec<T>::loadu(c_hat_row + j, n) * Vec<T>::loadu(sum_seen_c_hat + j, n) * inv_count;
            }
            grad_cell = grad_cell * Vec<T>::loadu(cell_scale + j, n);
          }
          dc = grad_cell + Vec<T>::loadu(grad_c_row + j, n);
        }
        const Vec<T> i = Vec<T>::loadu(gate_rows + 0 * H + j, n);
        const Vec<T> f = Vec<T>::loadu(gate_rows + 1 * H + j, n);
        const Vec<T> g = Vec<T>::loadu(gate_rows + 2 * H + j, n);
        const Vec<T> c_prev = Vec<T>::loadu(c_prev_row + j, n);
        const Vec<T> grad_i = dc * g * i * (one - i);
        const Vec<T> grad_f = dc * c_prev * f * (one - f);
        const Vec<T> grad_g = dc * i * (one - g * g);
        store_dy(b, 0, j, n, grad_i);
        store_dy(b, 1, j, n, grad_f);
        store_dy(b, 2, j, n, grad_g);
        // A padded step passes the gradient of its (unchanged) state straight through.
        if (active) (dc * f).store(grad_c_row + j, n);
      });
    }
    // The column sums of every gate's dy, dy * zhat and dy * xhat over the active rows (a
    // padded row's dy is 0), kRowGroup rows at a time: the sums stay in registers across a
    // group rather than being loaded and stored at every row.
    for (int64_t b0 = 0; b0 < B; b0 += kRowGroup) {
      const int64_t b1 = std::min(B, b0 + kRowGroup);
      for (int64_t g = 0; g < 4; ++g) {
        const T* const zhat_rows = reserve + zhat_at + g * H + j0;
        for_each_vec<T>(J, [&](int64_t j, auto n) {
          const int64_t u = g * J + j;
          Vec<T> dy_sum = Vec<T>::loadu(sum_dy + u, n);
          Vec<T> dy_zhat_sum = Vec<T>::loadu(sum_dy_zhat + u, n);
          Vec<T> dy_xhat_sum = Vec<T>::loadu(sum_dy_xhat + u, n);
          for (int64_t b = b0; b < b1; ++b) {
            if (!active_rows[b]) continue;
            const Vec<T> dy = Vec<T>::loadu(dy_at(b, g) + j, n);
            dy_sum = dy_sum + dy;
            if (recurrent) dy_zhat_sum = at::vec::fmadd(dy, Vec<T>::loadu(zhat_rows + b * W + j, n), dy_zhat_sum);
            if (any_input) dy_xhat_sum = at::vec::fmadd(dy, xhat_at(b, g, j, n), dy_xhat_sum);
          }
          dy_sum.store(sum_dy + u, n);
          dy_zhat_sum.store(sum_dy_zhat + u, n);
          dy_xhat_sum.store(sum_dy_xhat + u, n);
        });
      }
    }
    for (int64_t g = 0; g < 4; ++g) {
      const int64_t k0 = g * H + j0;
      add_into(grad_bias_ + k0, sum_dy + g * J, J);
      if (recurrent) add_into(grad_gamma_hh_ + k0, sum_dy_zhat + g * J, J);
      // sum(dy * xhat) is gamma_ih's gradient for both input statistics; the sequence-wise
      // input backward is finished by the host from these sums.
      if (any_input) add_into(grad_gamma_ih_ + k0, sum_dy_xhat + g * J, J);
    }
    if (!recurrent && !step_input) return;

    // Pass 3: the recurrent and the step-wise input normalizations receive the same upstream
    // gradient dy = d gates. Training: dz = gamma * rstd * (dy - mean(dy) - zhat * mean(dy *
    // zhat)) on active rows; evaluation: dz = gamma * rstd * dy. Padded rows get 0.
    // kRowGroup rows at a time, so each column's constants are loaded once per group.
    for (int64_t b0 = 0; b0 < B; b0 += kRowGroup) {
      const int64_t b1 = std::min(B, b0 + kRowGroup);
      for (int64_t b = b0; b < b1; ++b) {
        if (next_reserve != nullptr && any_input) {
          for (int64_t g = 0; g < 4; ++g) prefetch_span(next_wx + b * G + g * H + j0, J);
        }
        if (active_rows[b]) continue;
        for (int64_t g = 0; g < 4; ++g) {
          if (recurrent && grad_zh != nullptr) std::fill_n(grad_zh + b * G + g * H + j0, J, T(0));
          if (step_input && grad_wx != nullptr) std::fill_n(grad_wx + b * G + g * H + j0, J, T(0));
        }
        if (recurrent) std::fill_n(dz + b * 4 * J, 4 * J, T(0));
        if (step_input) std::fill_n(dwx + b * 4 * J, 4 * J, T(0));
      }
      for (int64_t g = 0; g < 4; ++g) {
        const int64_t k0 = g * H + j0;
        const T* const zhat_rows = reserve + zhat_at + k0;
        for_each_vec<T>(J, [&](int64_t j, auto n) {
          const int64_t u = g * J + j;
          const Vec<T> mean_dy = Vec<T>::loadu(sum_dy + u, n) * inv_count;
          const Vec<T> mean_dy_zhat = Vec<T>::loadu(sum_dy_zhat + u, n) * inv_count;
          const Vec<T> mean_dy_xhat = Vec<T>::loadu(sum_dy_xhat + u, n) * inv_count;
          const Vec<T> rec_scale_u = Vec<T>::loadu(rec_scale + u, n);
          const Vec<T> in_scale_u = Vec<T>::loadu(in_scale + u, n);
          for (int64_t b = b0; b < b1; ++b) {
            if (!active_rows[b]) continue;
            const Vec<T> dy = Vec<T>::loadu(dy_at(b, g) + j, n);
            const Vec<T> centred_dy = training ? dy - mean_dy : dy;
            if (recurrent) {
              Vec<T> grad = centred_dy;
              if (training) grad = grad - Vec<T>::loadu(zhat_rows + b * W + j, n) * mean_dy_zhat;
              grad = grad * rec_scale_u;
              if (grad_zh != nullptr) store_streaming(stream_grads, grad, grad_zh + b * G + k0 + j, n);
              grad.store(dz + b * 4 * J + u, n);
            }
            if (step_input) {
              Vec<T> grad = centred_dy;
              if (training) grad = grad - xhat_at(b, g, j, n) * mean_dy_xhat;
              grad = grad * in_scale_u;
              if (grad_wx != nullptr) store_streaming(stream_grads, grad, grad_wx + b * G + k0 + j, n);
              grad.store(dwx + b * 4 * J + u, n);
            }
          }
        });
      }
    }
    if (stream_grads) fence_streaming_stores();
  }
 private:
  static const T* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }
  static T* data_or_null(at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

  LayerFlags flags_;
  ReserveLayout layout_;
  int64_t batch_, hidden_;
  const T* gamma_ih_;
  const T* gamma_hh_;
  const T* gamma_c_;
  const T* beta_c_;
  T* grad_bias_;
  T* grad_gamma_ih_;
  T* grad_gamma_hh_;
  T* grad_gamma_c_;
  T* grad_beta_c_;
};

template <typename T>
void recurrent_backward_impl(const RecurrentBackwardArgs& args, RecurrentBackwardOutputs& out,
                             const LayerFlags& flags) {
  const int64_t T_ = args.reserve.size(0), B = args.reserve.size(1);
  const int64_t H = args.weight_hh.size(1);
  const RecurrentBackwardCPU<T> kernel(args, out, flags, B, H);
  const bool bf16 = bf16_operands(flags.operand_dtype, c10::CppTypeToScalarType<T>::value);
  const bool* active = args.active.data_ptr<bool>();
  const int64_t* counts = args.counts.data_ptr<int64_t>();
  const bool step_input = flags.input_statistics == kInputStep;
  // The same hidden-unit blocks as the forward pass. After its fused pass a block multiplies
  // its own columns of grad_zh (still in its cache) by its rows of W_hh, packed once: a
  // partial gradient of h_{t-1} over all H units, one per block. The next step's task of a
  // block first sums its units' columns of every partial into grad_h. The products split
  // the reduction, so they need no barrier after the fused pass and grad_zh never crosses
  // cores.
  const std::vector<int64_t> bounds = hidden_blocks(T_, B, H);
  const int64_t blocks = static_cast<int64_t>(bounds.size()) - 1;
  // Weight gradients, where the host asks for them (RecurrentBackwardOutputs): each block
  // keeps the last `chunk` steps' dz (and dwx) rows of its columns, [chunk, B, 4J], and
  // every `chunk` steps adds dz^T h_{t-1} (and dwx^T x_t) over them to its rows of the
  // weight gradients: GEMMs of chunk * B rows on data still in this core's L2, instead of
  // [T, B, 4H] gradients written to memory and read back by GEMMs after the recurrence.
  const bool weights_hh = out.grad_weight_hh.defined(), weights_ih = out.grad_weight_ih.defined();
  const int64_t widest = bounds.size() > 1 ? *std::max_element(bounds.begin() + 1, bounds.end()) : 0;
  const int64_t row_bytes = 4 * std::max<int64_t>(widest, 1) * int64_t(sizeof(T));
  const int64_t chunk = !weights_hh ? 1
                                    : std::min(std::max<int64_t>(T_, 1),
                                               std::max({int64_t(1), kWeightGradientChunkBytes / (B * row_bytes),
                                                         (kWeightGradientChunkRows + B - 1) / B}));
  const at::TensorOptions options = out.grad_h.options();
  // grad_x from the same chunks as grad_weight_ih: block k's dwx [rows, 4J] times its rows of
  // W_ih [4J, I]. With several blocks each adds a partial of every row: block 0 writes
  // grad_x, every other block a partial of its own, added to grad_x after the recurrence.
  const bool input_grad = out.grad_x.defined();
  const int64_t input_size = input_grad ? args.weight_ih.size(1) : 0;
  std::vector<at::Tensor> weight_ih_by_block;
  const at::Tensor grad_x_partials =
      input_grad && blocks > 1 ? pooled_empty({blocks - 1, T_ * B, input_size}, options) : at::Tensor();
  // Only a single block's products can write the weight gradients themselves: with several,
  // a block's rows are four slices of them, one per gate.
  const bool transposed_rows = blocks > 1 || T_ * B > kDirectWeightGradientRows;
  std::vector<StepGemm> gemms;  // block k: dz [B, 4J] @ (its rows of W_hh) [4J, H] -> [B, H]
  // Block k's buffers of `chunk` steps (step t in slot t % chunk), each [chunk, B, 4J]: dy,
  // dz (normalized recurrence), dwx (step-wise input); its weight-gradient rows, gate-major.
  std::vector<at::Tensor> dy_ring, dz_ring, dwx_ring, weight_hh_rows, weight_ih_rows;
  std::vector<BackwardScratch<T>> scratch;
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t J = bounds[k + 1] - bounds[k];
    scratch.emplace_back(B, J);
    gemms.emplace_back(block_rows(args.weight_hh, bounds[k], J), /*transpose=*/false, B, bf16);
    // dy needs the whole ring only where it is dz or dwx.
    const bool dy_kept = !flags.normalize_recurrent || flags.input_statistics == kInputNone;
    dy_ring.push_back(at::empty({dy_kept ? chunk : 1, B, 4 * J}, options));
    dz_ring.push_back(flags.normalize_recurrent ? at::empty({chunk, B, 4 * J}, options) : dy_ring.back());
    dwx_ring.push_back(step_input ? at::empty({chunk, B, 4 * J}, options) : dy_ring.back());
    // Transposed, [H, 4J] and [I, 4J], and transposed into the weight gradients after the
    // recurrence; with one block and few rows, the weight gradients themselves
    // (kDirectWeightGradientRows).
    if (weights_hh) {
      weight_hh_rows.push_back(transposed_rows ? at::zeros({H, 4 * J}, options) : out.grad_weight_hh.zero_());
    }
    if (weights_ih) {
      weight_ih_rows.push_back(transposed_rows ? at::zeros({args.x.size(2), 4 * J}, options)
                                               : out.grad_weight_ih.zero_());
    }
    if (input_grad) {
      weight_ih_by_block.push_back(block_rows(args.weight_ih, bounds[k], J));
    }
  }
  const auto product = [bf16](const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    host_matmul(out, a, b, accumulate, bf16);
  };
  // rows += inputs^T grads [C, 4J] (transposed rows), else grads^T inputs [4J, C].
  const auto add_weight_product = [&](const at::Tensor& rows, const at::Tensor& inputs, const at::Tensor& grads) {
    if (transposed_rows) {
      product(rows, inputs.t(), grads, true);
    } else {
      product(rows, grads.t(), inputs, true);
    }
  };
  // Block k's share of the weight gradients from steps [t0, t0 + n) (its slots 0 to n - 1).
  const auto add_weight_gradients = [&](int64_t k, int64_t t0, int64_t n) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // on a worker thread: see StepGemm
    const int64_t rows = n * B, columns = 4 * (bounds[k + 1] - bounds[k]);
    const at::Tensor dz = dz_ring[k].view({chunk * B, columns}).narrow(0, 0, rows);
    const at::Tensor outputs = args.output.view({-1, H});
    if (t0 == 0) {  // step 0 meets h_0
      add_weight_product(weight_hh_rows[k], args.h0, dz.narrow(0, 0, B));
      if (n > 1) add_weight_product(weight_hh_rows[k], outputs.narrow(0, 0, rows - B), dz.narrow(0, B, rows - B));
    } else {
      add_weight_product(weight_hh_rows[k], outputs.narrow(0, (t0 - 1) * B, rows), dz);
    }
    const at::Tensor dwx = dwx_ring[k].view({chunk * B, columns}).narrow(0, 0, rows);
    if (weights_ih) {
      add_weight_product(weight_ih_rows[k], args.x.view({-1, args.x.size(2)}).narrow(0, t0 * B, rows), dwx);
    }
    if (input_grad) {
      product((k == 0 ? out.grad_x.view({T_ * B, input_size}) : grad_x_partials[k - 1]).narrow(0, t0 * B, rows), dwx,
              weight_ih_by_block[k], false);
    }
  };
  // grad_zh and grad_wx, where still asked for (grad_wx for grad_x), bypass the caches once
  // they outgrow a core's L2: written through the caches they evict step data the recurrence
  // still reads (docs/CPU.md).
  const bool stream_grads = T_ * B * 4 * H * int64_t(sizeof(T)) >= kStreamingStoreMinBytes;
  // Partial gradients of h_{t-1}, [2, blocks, B, H]: step t writes slot t % 2 while the
  // tasks of step t still read the previous step's slot.
  const at::Tensor partials = at::empty({2, blocks, B, H}, out.grad_h.options());
  const ReserveLayout layout(H, flags);
  const int64_t width = layout.width;
  const bool any_input = flags.input_statistics != kInputNone;
  const T* reserve = args.reserve.data_ptr<T>();
  const T* c0 = args.c0.data_ptr<T>();
  T* const grad_h = out.grad_h.data_ptr<T>();
  const Rows<T> grad_output(args.grad_output, true), projection(args.projection, any_input),
      mean_ih(args.mean_ih, any_input), var_ih(args.var_ih, any_input),
      var_hh(args.var_hh, flags.normalize_recurrent), mean_c(args.mean_c, flags.normalize_cell),
      var_c(args.var_c, flags.normalize_cell), grad_gates(out.grad_gates, out.grad_gates.defined()),
      grad_zh(out.grad_zh, out.grad_zh.defined()), grad_wx(out.grad_wx, step_input && out.grad_wx.defined()),
      partial_slots(partials, true), outputs(args.output, args.output.defined());
  // grad_h[:, j0 + J) = the sum of the partials of step t (processing order), on the rows
  // active at step t; padded rows pass their gradient through unchanged.
  const auto gather_grad_h = [&](int64_t t, int64_t j0, int64_t J) {
    const T* slot = partial_slots[t % 2];
    // The other blocks' partials were written by other cores: all their lines asked for at
    // once, as h_{t-1} in the forward pass.
    if (blocks > 1) {
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t k = 0; k < blocks; ++k) prefetch_span(slot + (k * B + b) * H + j0, J);
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      if (!active[t * B + b]) continue;
      T* dst = grad_h + b * H + j0;
      std::copy_n(slot + b * H + j0, J, dst);
      for (int64_t k = 1; k < blocks; ++k) add_into(dst, slot + (k * B + b) * H + j0, J);
    }
  };
  run_steps(T_, blocks, [&](int64_t i, int64_t k) {
    const int64_t t = T_ - 1 - i;
    // The sequence-wise input statistics have one row for every step.
    const int64_t input_row = flags.input_statistics == kInputSequence ? 0 : t;
    const StepBackward<T> step{
        grad_output[t],
        reserve + t * B * width,
        t > 0 ? reserve + (t - 1) * B * width + layout.c_new : c0,
        t > 0 ? width : H,
        projection[t],
        active + t * B,
        counts[t],
        mean_ih[input_row],
        var_ih[input_row],
        var_hh[t],
        mean_c[t],
        var_c[t],
        grad_h,
        out.grad_c.data_ptr<T>(),
        grad_gates[t],
        grad_zh[t],
        grad_wx[t],
        stream_grads,
        t > 0 ? reserve + (t - 1) * B * width : nullptr,
        t > 0 ? projection[t - 1] : nullptr,
        t > 0 ? grad_output[t - 1] : nullptr,
        outputs[t],
    };
    const int64_t j0 = bounds[k], J = bounds[k + 1] - j0;
    if (t + 1 < T_) gather_grad_h(t + 1, j0, J);
    const int64_t slot = (t % chunk) * B * 4 * J;
    const auto in_ring = [&](const at::Tensor& ring) { return ring.data_ptr<T>() + (ring.size(0) == 1 ? 0 : slot); };
    T* dz = in_ring(dz_ring[k]);
    kernel.run(step, j0, bounds[k + 1], in_ring(dy_ring[k]), dz, in_ring(dwx_ring[k]), scratch[k]);
    gemms[k].run(dz, partial_slots[t % 2] + k * B * H);
    if (weights_hh && t % chunk == 0) add_weight_gradients(k, t, std::min(chunk, T_ - t));
  });
  if (T_ > 0) gather_grad_h(0, 0, H);  // the gradient of h_0
  if (input_grad) {
    at::Tensor grad_x_rows = out.grad_x.view({T_ * B, input_size});
    for (int64_t k = 1; k < blocks; ++k) grad_x_rows.add_(grad_x_partials[k - 1]);
  }
  // The blocks' transposed rows into the weight gradients: every row of every gate.
  const int64_t I = weights_ih ? out.grad_weight_ih.size(1) : 0;
  for (int64_t k = 0; transposed_rows && k < blocks; ++k) {
    const int64_t j0 = bounds[k], J = bounds[k + 1] - j0;
    for (int64_t g = 0; g < 4; ++g) {
      if (weights_hh) {
        transpose_into(out.grad_weight_hh.data_ptr<T>() + (g * H + j0) * H, H,
                       weight_hh_rows[k].data_ptr<T>() + g * J, 4 * J, J, H);
      }
      if (weights_ih) {
        transpose_into(out.grad_weight_ih.data_ptr<T>() + (g * H + j0) * I, I,
                       weight_ih_rows[k].data_ptr<T>() + g * J, 4 * J, J, I);
      }
    }
  }
}

}  // namespace

bool cpu_directions_concurrent(int64_t steps, int64_t batch, int64_t hidden) {
  const int64_t threads = available_threads();
  return threads >= 2 && worth_parallel(steps, batch, hidden) && hidden_block_count(steps, batch, hidden, threads) <= 2;
}

// Measured (docs/CPU.md): I=1 at B=16 and I=64 at B=32 gain, I=64 at B=8 breaks even, and
// I=64 at B=1 and I=512 at B=32 lose.
bool cpu_steps_project_input(int64_t steps, int64_t batch, int64_t input_size) {
  return steps == 1 || input_size <= kStepInputPerRow * batch;
}

void recurrent_forward_cpu(const RecurrentForwardArgs& args, RecurrentForwardOutputs& out,
                           const LayerFlags& flags) {
  AT_DISPATCH_FLOATING_TYPES(args.weight_hh.scalar_type(), "bnlstm_recurrent_forward_cpu",
                             [&] { recurrent_forward_impl<scalar_t>(args, out, flags); });
}

void recurrent_backward_cpu(const RecurrentBackwardArgs& args, RecurrentBackwardOutputs& out,
                            const LayerFlags& flags) {
  AT_DISPATCH_FLOATING_TYPES(args.reserve.scalar_type(), "bnlstm_recurrent_backward_cpu",
                             [&] { recurrent_backward_impl<scalar_t>(args, out, flags); });
}

// The host code's GEMMs on the CPU (host_matmul).
void matmul_cpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                const LayerFlags& flags) {
  host_matmul(out, a, b, accumulate, bf16_operands(flags.operand_dtype, out.scalar_type()));
}

// The vector code this library was compiled with (BNLSTM_CPU_CAPABILITY, build.py).
#if defined(CPU_CAPABILITY_AVX512)
constexpr const char* kVectorCapability = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
constexpr const char* kVectorCapability = "avx2";
#else
constexpr const char* kVectorCapability = "default";
#endif

namespace {

const char* step_kernel_name(StepKernel kernel) {
  switch (kernel) {
    case StepKernel::kSmall:
      return "small";
    case StepKernel::kSmallSwapped:
      return "small_swapped";
    case StepKernel::kDotRows:
      return "dot_rows";
    case StepKernel::kMklPacked:
      return "mkl_packed";
    case StepKernel::kAten:
      return "aten";
  }
  return "";
}

StepKernel step_kernel_named(c10::string_view name) {
  for (const StepKernel kernel : {StepKernel::kSmall, StepKernel::kSmallSwapped, StepKernel::kDotRows,
                                  StepKernel::kMklPacked, StepKernel::kAten}) {
    if (name == step_kernel_name(kernel)) return kernel;
  }
  TORCH_CHECK(false, "kernel must be \"small\", \"small_swapped\", \"dot_rows\", \"mkl_packed\" or \"aten\", got \"",
              name, "\"");
}

// a [M, K] @ op(weight) through the step GEMM kernel named `kernel`, whichever one this CPU
// would choose for M rows.
at::Tensor cpu_step_gemm(const at::Tensor& a, const at::Tensor& weight, bool transpose, c10::string_view kernel) {
  TORCH_CHECK(a.dim() == 2 && weight.dim() == 2, "a and weight must be 2-D, got ", a.sizes(), " and ", weight.sizes());
  TORCH_CHECK(a.is_cpu() && weight.is_cpu() && a.scalar_type() == weight.scalar_type(),
              "a and weight must be CPU tensors of one dtype, got ", a.scalar_type(), " on ", a.device(), " and ",
              weight.scalar_type(), " on ", weight.device());
  const int64_t k = transpose ? weight.size(1) : weight.size(0), n = transpose ? weight.size(0) : weight.size(1);
  TORCH_CHECK(a.size(1) == k, "a must have ", k, " columns for weight ", weight.sizes(), " (transpose=", transpose,
              "), got ", a.size(1));
  const StepGemm gemm(weight.contiguous(), transpose, a.size(0), /*bf16=*/false, /*once=*/true,
                      step_kernel_named(kernel));
  const at::Tensor rows = a.contiguous();
  at::Tensor out = at::empty({a.size(0), n}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cpu_step_gemm",
                             [&] { gemm.run(rows.data_ptr<scalar_t>(), out.data_ptr<scalar_t>()); });
  return out;
}

}  // namespace

// For tests and diagnostics: how many blocks of hidden units (threads) this recurrence uses
// for a call of these sizes with torch's current thread count, whether a bidirectional
// layer's directions run at once, whether an inference call projects each step's input in
// the step, the vector code built, and the step GEMMs' kernels: the one chosen for a number
// of rows, and a product through any of them.
TORCH_LIBRARY_FRAGMENT(bnlstm, m) {
  m.def("cpu_step_gemm_kernel(ScalarType dtype, int rows, bool once=False) -> str",
        [](at::ScalarType dtype, int64_t rows, bool once) {
          return std::string(step_kernel_name(chosen_step_kernel(dtype, rows, once)));
        });
  m.def("cpu_step_gemm(Tensor a, Tensor weight, bool transpose, str kernel) -> Tensor", cpu_step_gemm);
  m.def("cpu_vector_capability() -> str", [] { return std::string(kVectorCapability); });
  m.def("cpu_hidden_blocks(int steps, int batch, int hidden) -> int",
        [](int64_t steps, int64_t batch, int64_t hidden) {
          return hidden_block_count(steps, batch, hidden, available_threads());
        });
  m.def("cpu_directions_concurrent(int steps, int batch, int hidden) -> bool", cpu_directions_concurrent);
  m.def("cpu_steps_project_input(int steps, int batch, int input_size) -> bool", cpu_steps_project_input);
}

}  // namespace bnlstm
