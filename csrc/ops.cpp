// Operator schemas, declared once for every device. Implementations register per dispatch
// key (layer.cpp for the CPU); fake kernels and autograd are registered from Python
// (bnlstm_cuda/ops.py) so that torch.compile can trace the ops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bitset>

#include "buffer_pool.h"

TORCH_LIBRARY(bnlstm, m) {
  // One layer, one direction, over a padded batch x [T, B, I] with lengths [B] (int64; None:
  // every sequence has all T steps).
  // params: the layer-direction's parameters in bnlstm_cuda.layer_api.LayerParams' order
  //   (weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c); an empty tensor
  //   stands for a part the layer does not have.
  // running: running statistics (mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c), [S, F]
  //   each, read only in evaluation (training=False); empty tensors where not read.
  // statistics: the statistics used at each step, in the same order (batch statistics in
  //   training, for the running update; in evaluation the running statistics' rows, for the
  //   backward pass); [0, F] for parts the variant does not normalize.
  // keep_reserve=False (inference) returns an empty projection and reserve, and in
  // evaluation [0, F] statistics too: nothing reads them there. start_step is the index of
  // x's first step: step t uses statistics slot min(start_step + t, S - 1).
  // operand_dtype (float16 or bfloat16, for inputs that were in it and are computed in
  // float32) lets a backend with tensor cores multiply at that precision, accumulating in
  // float32 as cuDNN does: the recurrent GEMM's operands h_{t-1} and W_hh rounded to it, the
  // float32 GEMMs (the input projection; in layer_backward every GEMM) in TF32, which holds
  // float16 and bfloat16 values exactly. The CPU multiplies bfloat16 operands in bfloat16
  // where it has AVX512_BF16 (bf16_gemm.h: every GEMM, float32 accumulation), and otherwise
  // computes in the compute dtype.
  // bnlstm_cuda/ops.py states both layer schemas again, for the Triton backend's operators
  // (tests/test_cpu_backend.py checks that they agree).
  m.def(
      "layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor? lengths, Tensor[] params, Tensor[] running, "
      "int input_statistics, bool normalize_recurrent, bool normalize_cell, bool training, float eps, "
      "bool reverse, bool keep_reserve, int start_step=0, ScalarType? operand_dtype=None) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor[] statistics, Tensor projection, Tensor reserve)");
  // layer_forward with keep_reserve=True as one autograd node, for eager calls that record
  // a graph (layer_autograd.cpp): output, h_n, c_n and the statistics (not differentiable).
  // With a momentum (training, CPU tensors), `running` holds the running statistics, all six
  // as in layer_forward's list, and the steps fold their batch statistics into them in place
  // as they go, as update_running_stats_parts would after the call; `folded` is then, for
  // each part the variant normalizes (in the order ih, hh, c), the first step whose
  // statistics were not finite, which kept its running value (-1: none; int64), and [0]
  // without a momentum.
  m.def(
      "layer(Tensor x, Tensor h0, Tensor c0, Tensor? lengths, Tensor[] params, Tensor(a!)[] running, "
      "int input_statistics, bool normalize_recurrent, bool normalize_cell, bool training, float eps, "
      "bool reverse, int start_step=0, ScalarType? operand_dtype=None, float? momentum=None) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor[] statistics, Tensor folded)");
  // Gradients of layer_forward's inputs, from its inputs, output, statistics, projection
  // and reserve; grad_params in params' order, empty for absent parts. input_grad=False
  // skips grad_x (returned empty): a model's input layer rarely needs it, and it is one of
  // the three large GEMMs of the backward pass.
  m.def(
      "layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor? lengths, "
      "Tensor h0, Tensor c0, Tensor output, Tensor[] params, Tensor[] statistics, Tensor projection, "
      "Tensor reserve, int input_statistics, bool normalize_recurrent, bool normalize_cell, bool training, "
      "float eps, bool reverse, bool input_grad=True, ScalarType? operand_dtype=None) -> "
      "(Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor[] grad_params)");
  // Both directions of a bidirectional layer in one call (the CPU's, bidirectional_cpu.cpp):
  // layer_forward with reverse=False and with reverse=True over the same x, run at once where
  // that pays. h0, c0 and h_n, c_n are [2, B, H] (forward, reverse); params, running and
  // statistics are the forward direction's list followed by the reverse one's; output is
  // [T, B, 2H], the forward direction's features first, as the next layer takes it;
  // projection and reserve are one per direction.
  m.def(
      "bidirectional_forward(Tensor x, Tensor h0, Tensor c0, Tensor? lengths, Tensor[] params, Tensor[] running, "
      "int input_statistics, bool normalize_recurrent, bool normalize_cell, bool training, float eps, "
      "bool keep_reserve, ScalarType? operand_dtype=None) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor[] statistics, Tensor[] projection, Tensor[] reserve)");
  // bidirectional_forward with keep_reserve=True as one autograd node, as layer is
  // layer_forward's (layer_autograd.cpp), momentum and folded included (the forward
  // direction's parts, then the reverse one's).
  m.def(
      "bidirectional(Tensor x, Tensor h0, Tensor c0, Tensor? lengths, Tensor[] params, Tensor(a!)[] running, "
      "int input_statistics, bool normalize_recurrent, bool normalize_cell, bool training, float eps, "
      "ScalarType? operand_dtype=None, float? momentum=None) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor[] statistics, Tensor folded)");
  // Its gradients: grad_x sums both directions', grad_h0 and grad_c0 are [2, B, H],
  // grad_params lists the forward direction's and then the reverse one's.
  m.def(
      "bidirectional_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor? lengths, "
      "Tensor h0, Tensor c0, Tensor output, Tensor[] params, Tensor[] statistics, Tensor[] projection, "
      "Tensor[] reserve, int input_statistics, bool normalize_recurrent, bool normalize_cell, bool training, "
      "float eps, bool input_grad=True, ScalarType? operand_dtype=None) -> "
      "(Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor[] grad_params)");
  // Fold per-step batch statistics (mean, biased var [N, F], active rows count [N]) into
  // running statistics [S, F] in place: step t updates slot min(start_step + t, S - 1)
  // with momentum and the unbiased variance, unless count[t] < 2 (statistics.py); a feature
  // whose statistics are not finite keeps its running value. Returns the first step that
  // had one (int64 scalar; -1: none).
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "Tensor count, float momentum, int start_step=0) -> Tensor");
  // The same for every normalized part of a layer-direction in one call (the i-th entries of
  // the lists are one part); returns each part's first non-finite step, [parts] int64.
  m.def(
      "update_running_stats_parts(Tensor(a!)[] running_means, Tensor(b!)[] running_vars, Tensor[] means, "
      "Tensor[] vars, Tensor[] counts, float momentum, int start_step=0) -> Tensor");
  // The CPU buffer pool (buffer_pool.h): its statistics (bytes kept unused, buffers reused,
  // buffers allocated), and a release of every buffer it keeps (returns the bytes freed).
  m.def("cpu_buffer_pool_statistics() -> int[]", [] { return bnlstm::BufferPool::instance().statistics(); });
  m.def("release_cpu_buffers() -> int",
        [] { return static_cast<int64_t>(bnlstm::BufferPool::instance().release()); });
  // How many threads an at::parallel_for compiled into this library runs on: torch's thread
  // count when the build is right, 1 when OpenMP was left out of a build that needs it.
  m.def("parallel_threads() -> int", [] {
    std::atomic<uint64_t> seen{0};
    at::parallel_for(0, 1024, 1, [&seen](int64_t, int64_t) {
      seen |= uint64_t(1) << std::min<int>(at::get_thread_num(), 63);
    });
    return static_cast<int64_t>(std::bitset<64>(seen.load()).count());
  });
}
