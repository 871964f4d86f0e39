// Shared declarations of the BN-LSTM layer operators (docs/SEMANTICS.md).
//
// One operator pair runs one layer in one direction over a whole padded sequence:
//   bnlstm::layer_forward   and   bnlstm::layer_backward
// (schemas in ops.cpp). The host code in layer.cpp is written with ATen operations only,
// so every device shares it: the input side (one GEMM for all steps, then the per-step
// input batch norm over all steps at once), the reversal of the reverse direction and the
// weight gradients as large GEMMs (unless the device kernel accumulates them itself, as the
// CPU's does: RecurrentBackwardOutputs). Each device supplies the recurrent part, one
// fused pass per step after the recurrent GEMM (recurrent_cpu.cpp for the CPU), and the
// matrix product the host code's GEMMs go through (MatmulFn).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace bnlstm {

// Input statistics, as Variant.input_statistics in bnlstm_cuda/variants.py.
enum InputStatistics : int64_t { kInputNone = 0, kInputStep = 1, kInputSequence = 2 };

// What the variant normalizes, and how this call runs.
struct LayerFlags {
  int64_t input_statistics;  // InputStatistics
  bool normalize_recurrent;
  bool normalize_cell;
  bool training;  // batch statistics (true) or running statistics (false)
  double eps;
  int64_t start_step;  // index of the first step: step t reads statistics slot min(start_step + t, S - 1)
  // Half or BFloat16, the dtype the inputs had (computed in float32): the recurrent GEMM may
  // round h_{t-1} and W_hh to it and the float32 GEMMs may run in TF32 (fp32 accumulation;
  // the CUDA kernels' tensor-core paths), or every GEMM in bfloat16 (the CPU's, on
  // AVX512_BF16); Undefined: operands in the compute dtype.
  at::ScalarType operand_dtype;
};

// out = a b, or out += a b with accumulate, for 2-D matrices in the compute dtype (a and b
// may be transposed views; out is contiguous). One per backend, for the host code's GEMMs:
// the CPU's is ATen's; the CUDA one multiplies on TF32 tensor cores where flags.operand_dtype
// is set, whatever torch.backends.cuda.matmul.allow_tf32 says (which governs float32 inputs).
using MatmulFn = void (*)(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                          const LayerFlags& flags);

// MatmulFn's product through ATen, for any device: what the CPU's is, and the CUDA one
// where it does not take TF32.
inline void matmul_aten(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::Tensor result = out;  // at::mm_out takes a non-const reference
    at::mm_out(result, a, b);
  }
}

// Per-step values the backward pass reads, stored row by row in reserve [T, B, width].
// Memory bandwidth, not arithmetic, is what a stored value costs, so the reserve keeps only
// what cannot be had cheaply: W_ih x_t is kept whole by the host (the input GEMM wrote it
// anyway), h_{t-1} is the previous step's output, c_{t-1} the previous step's c_new, and
// the normalized cell and its tanh are recomputed from c_new and the step's statistics (the
// CPU's float32 backward reads the tanh back from the output instead, as h_t / o).
// bnlstm_cuda/ops.py mirrors the width.
struct ReserveLayout {
  int64_t zhat;   // [4H] (W_hh h_{t-1} - mean) * rstd, if normalize_recurrent
  int64_t gates;  // [4H] activated gates i, f, g, o
  int64_t c_new;  // [H]  c_t as computed at step t (the state where the step is active)
  int64_t width;

  ReserveLayout(int64_t hidden, const LayerFlags& flags) {
    int64_t offset = 0;
    auto take = [&offset](int64_t size) { int64_t at = offset; offset += size; return at; };
    zhat = flags.normalize_recurrent ? take(4 * hidden) : -1;
    gates = take(4 * hidden);
    c_new = take(hidden);
    width = offset;
  }
};

// Running statistics a training forward folds its batch statistics into as it goes (the
// CPU's; `bnlstm::layer` with a momentum): what update_running_stats_parts does after the
// call (running_stats.cpp), step t into slot min(start_step + t, S - 1) of each part's
// [S, F] pair, each in the compute dtype and contiguous; undefined where a part is not
// folded. The recurrence folds the parts it computes step by step, the host code the rest.
struct RunningFold {
  double momentum;
  at::Tensor mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c;
  // Each part's (ih, hh, c) first step with a non-finite statistic, which kept its running
  // value (-1: none); written by whoever folds the part.
  int64_t first_skipped[3] = {-1, -1, -1};
};

// Inputs of the recurrent part, in processing order (the reverse direction is already
// reversed by the host code). Each step normalizes its slice of the input projection in
// the same pass as the recurrent one: with its own batch statistics (step-wise training)
// or with row min(t, S - 1) of input_mean / input_var.
struct RecurrentForwardArgs {
  at::Tensor input_projection;  // [T, B, 4H] W_ih x_t, zero at padded steps; or undefined, and:
  at::Tensor x;                 // [T, B, I] in processing order, zero at padded steps, and
  at::Tensor weight_ih;         // [4H, I]: the step kernels project each step's input themselves
  at::Tensor active;            // [T, B] bool, step t of sequence b is real
  at::Tensor counts;            // [T] int64, active sequences per step
  at::Tensor weight_hh;         // [4H, H]
  at::Tensor bias;              // [4H] or undefined
  at::Tensor gamma_ih;          // [4H] or undefined
  at::Tensor gamma_hh;          // [4H] or undefined
  at::Tensor gamma_c;           // [H] or undefined
  at::Tensor beta_c;            // [H] or undefined
  at::Tensor input_mean, input_var;            // [S, 4H] unless step-wise training
  at::Tensor running_mean_hh, running_var_hh;  // [S, 4H], read in evaluation
  at::Tensor running_mean_c, running_var_c;    // [S, H]
  // Training: the running statistics the steps fold their batch statistics into as they go
  // (the step-wise ones: not sequence-wise input statistics), or null. Only the CPU's
  // recurrence folds.
  RunningFold* fold = nullptr;
};

// Outputs of the recurrent part. All are allocated by the caller; the kernel writes every
// element (reserve only when defined).
struct RecurrentForwardOutputs {
  at::Tensor output;           // [T, B, H], zero at padded steps
  at::Tensor h, c;             // [B, H], initial states on entry, final states on exit
  // The statistics used at each step; [0, F] where the part is not normalized, and on the
  // CPU in inference in evaluation (layer.cpp), where nothing reads them.
  at::Tensor mean_ih, var_ih;  // [T, 4H], if step-wise input
  at::Tensor mean_hh, var_hh;  // [T, 4H], if normalize_recurrent
  at::Tensor mean_c, var_c;    // [T, H], if normalize_cell
  at::Tensor reserve;          // [T, B, width] or undefined (inference)
  // [T, B, 4H] W_ih x_t, where the steps project their own input (args.x) and the backward
  // reads it; else undefined.
  at::Tensor projection;
};

struct RecurrentBackwardArgs {  // see ReserveLayout for what the backward pass recomputes
  at::Tensor grad_output;  // [T, B, H] in processing order
  at::Tensor active, counts, weight_hh;
  at::Tensor c0;             // [B, H] initial cell state
  at::Tensor projection;     // [T, B, 4H] W_ih x_t as in the forward pass, if the input is normalized
  at::Tensor gamma_ih, gamma_hh, gamma_c, beta_c;  // or undefined
  at::Tensor mean_ih, var_ih;  // [T | 1, 4H] statistics used in the forward pass, if normalized
  at::Tensor var_hh;           // [T, 4H], if normalize_recurrent
  at::Tensor mean_c, var_c;    // [T, H], if normalize_cell
  at::Tensor reserve;          // [T, B, width]
  // For a kernel that accumulates the weight gradients itself (RecurrentBackwardOutputs):
  at::Tensor h0;              // [B, H] initial hidden state
  at::Tensor output;          // [T, B, H] in processing order: h_t of the active rows
  at::Tensor x;               // [T, B, I] in processing order, zero at padded steps
  at::Tensor weight_ih;       // [4H, I], where the host asks for grad_x too
};

// Outputs of the backward recurrence; accumulators start at zero.
struct RecurrentBackwardOutputs {
  at::Tensor grad_h, grad_c;  // [B, H]: gradients of h_n, c_n on entry, of h_0, c_0 on exit
  at::Tensor grad_gates;      // [T, B, 4H] gradient of the gate pre-activations; undefined
                              // when grad_zh and grad_wx are buffers of their own (the
                              // kernel keeps each step's in scratch)
  at::Tensor grad_zh;         // [T, B, 4H] gradient of W_hh h_{t-1} (aliases grad_gates
                              // when the recurrence is not normalized), or undefined
  at::Tensor grad_wx;         // [T, B, 4H] gradient of W_ih x_t, if step-wise input, or undefined
  at::Tensor grad_bias;       // [4H] sum of grad_gates
  at::Tensor grad_gamma_ih;   // [4H] sum of grad_gates * xhat, if the input is normalized
  at::Tensor grad_gamma_hh;   // [4H] or undefined
  at::Tensor grad_gamma_c, grad_beta_c;  // [H] or undefined
  // Defined (uninitialised on entry: the kernel writes every element) where the host asks the
  // device kernel to accumulate the weight gradients during the recurrence, from each step's gradients while they are in cache:
  // grad_weight_hh = sum_t grad_zh_t^T h_{t-1} always, grad_weight_ih = sum_t grad_wx_t^T x_t
  // unless the input statistics are sequence-wise. grad_zh and grad_wx are then undefined
  // unless the host still needs them (grad_wx where grad_weight_ih is the host's); the kernel
  // stores what is defined.
  at::Tensor grad_weight_hh;  // [4H, H]
  at::Tensor grad_weight_ih;  // [4H, I]
  // [T, B, I] in processing order, grad_wx_t W_ih, from the same steps' gradients as
  // grad_weight_ih (then grad_wx need not be stored), where the host asks for it.
  at::Tensor grad_x;
};

// Device parts, one set per backend.
void recurrent_forward_cpu(const RecurrentForwardArgs& args, RecurrentForwardOutputs& out,
                           const LayerFlags& flags);
void recurrent_backward_cpu(const RecurrentBackwardArgs& args, RecurrentBackwardOutputs& out,
                            const LayerFlags& flags);
void matmul_cpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                const LayerFlags& flags);
// Whether the two directions of a bidirectional layer of these sizes run at once on the CPU,
// a thread each (bidirectional_cpu.cpp): where a direction alone would split over at most two
// threads, a thread per direction does the same work without the threads meeting at every
// step, and with torch's current thread count there are two to give.
bool cpu_directions_concurrent(int64_t steps, int64_t batch, int64_t hidden);
// Whether the CPU's recurrence multiplies each step's input by W_ih itself (RecurrentForwardArgs::x),
// where nothing else needs the projection of every step: a step's product reads the block's
// rows of W_ih (I values a gate unit) for B rows, so it pays where the input is narrow
// against the batch; the projection's trip to memory and back is what it saves. A one-step
// call always does: its step's product runs once, on a kernel that reads W_ih as it is
// (StepGemm's `once`), where the projection's GEMM would pack it.
bool cpu_steps_project_input(int64_t steps, int64_t batch, int64_t input_size);
// CUDA (recurrent_cuda.cu), compiled only into the CUDA-enabled extension.
void recurrent_forward_cuda(const RecurrentForwardArgs& args, RecurrentForwardOutputs& out,
                            const LayerFlags& flags);
void recurrent_backward_cuda(const RecurrentBackwardArgs& args, RecurrentBackwardOutputs& out,
                             const LayerFlags& flags);
void matmul_cuda(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                 const LayerFlags& flags);

}  // namespace bnlstm
