// Both directions of a bidirectional layer in one operator call on the CPU
// (bidirectional_forward and bidirectional_backward, schemas in ops.cpp): the host code of
// layer.cpp once per direction, the directions at once where cpu_directions_concurrent says
// so, one thread each. Each direction's recurrence then runs as one block of hidden units,
// with no other thread to meet at every step; otherwise the directions run one after the
// other, as two layer_forward calls would, each over every thread.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "bnlstm.h"
#include "buffer_pool.h"
#include "checks.h"
#include "layer_ops.h"

namespace bnlstm {
namespace {

constexpr int64_t kParameterCount = 7;   // LayerParameters
constexpr int64_t kStatisticsCount = 6;  // PartStatistics

void check_count(at::TensorList list, int64_t count, const char* name, const char* order) {
  TORCH_CHECK(static_cast<int64_t>(list.size()) == count, name, " must hold ", count, " tensors (", order,
              " of the forward direction, then of the reverse one), got ", list.size());
}

// Calls direction(0) and direction(1), at once on two threads of torch's pool when
// `concurrent`, each under the caller's thread-local state (grad mode, dispatch keys): a
// pool thread does not inherit it. An exception in either reaches the caller.
template <typename Direction>
void run_directions(bool concurrent, const Direction& direction) {
  if (!concurrent) {
    direction(0);
    direction(1);
    return;
  }
  const at::ThreadLocalState state;
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t d = begin; d < end; ++d) direction(d);
  });
}

BidirectionalForwardResult bidirectional_forward_cpu(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const OptTensor& lengths, at::TensorList params,
    at::TensorList running, int64_t input_statistics, bool normalize_recurrent, bool normalize_cell, bool training,
    double eps, bool keep_reserve, c10::optional<at::ScalarType> operand_dtype) {
  return bidirectional_forward_cpu_folding(x, h0, c0, lengths, params, running, input_statistics, normalize_recurrent,
                                           normalize_cell, training, eps, keep_reserve, operand_dtype, nullptr);
}

}  // namespace

BidirectionalForwardResult bidirectional_forward_cpu_folding(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const OptTensor& lengths, at::TensorList params,
    at::TensorList running, int64_t input_statistics, bool normalize_recurrent, bool normalize_cell, bool training,
    double eps, bool keep_reserve, c10::optional<at::ScalarType> operand_dtype, RunningFold* folds) {
  check_count(params, 2 * kParameterCount, "params", "weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c");
  check_count(running, 2 * kStatisticsCount, "running", "mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c");
  TORCH_CHECK(x.dim() == 3, "x must be [T, B, I], got ", x.sizes());
  TORCH_CHECK(params[1].dim() == 2, "weight_hh must be [4H, H], got ", params[1].sizes());
  const int64_t T = x.size(0), B = x.size(1), H = params[1].size(1);
  check_tensor(h0, "h0", {2, B, H}, x);
  check_tensor(c0, "c0", {2, B, H}, x);
  const LayerFlags flags = unpack_flags(input_statistics, normalize_recurrent, normalize_cell, training, eps,
                                        /*start_step=*/0, operand_dtype);
  LayerForwardResult results[2];
  run_directions(cpu_directions_concurrent(T, B, H), [&](int64_t d) {
    results[d] = layer_forward_cpu(
        {x, h0[d], c0[d], lengths, unpack_parameters(params.slice(d * kParameterCount, kParameterCount)),
         unpack_running(running.slice(d * kStatisticsCount, kStatisticsCount)), flags, /*reverse=*/d == 1,
         keep_reserve, folds == nullptr ? nullptr : folds + d});
  });
  auto& [output_f, h_f, c_f, statistics_f, projection_f, reserve_f] = results[0];
  auto& [output_r, h_r, c_r, statistics_r, projection_r, reserve_r] = results[1];
  std::vector<at::Tensor> statistics = std::move(statistics_f);
  statistics.insert(statistics.end(), statistics_r.begin(), statistics_r.end());
  at::Tensor output = pooled_empty({T, B, 2 * H}, output_f.options());
  at::cat_out(output, {output_f, output_r}, 2);
  return {output, at::stack({h_f, h_r}), at::stack({c_f, c_r}), std::move(statistics),
          {projection_f, projection_r}, {reserve_f, reserve_r}};
}

namespace {

LayerBackwardResult bidirectional_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& x,
    const OptTensor& lengths, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& output,
    at::TensorList params, at::TensorList statistics, at::TensorList projection, at::TensorList reserve,
    int64_t input_statistics, bool normalize_recurrent, bool normalize_cell, bool training, double eps,
    bool input_grad, c10::optional<at::ScalarType> operand_dtype) {
  check_count(params, 2 * kParameterCount, "params", "weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c");
  check_count(statistics, 2 * kStatisticsCount, "statistics", "mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c");
  check_count(projection, 2, "projection", "the projection");
  check_count(reserve, 2, "reserve", "the reserve");
  TORCH_CHECK(x.dim() == 3, "x must be [T, B, I], got ", x.sizes());
  TORCH_CHECK(params[1].dim() == 2, "weight_hh must be [4H, H], got ", params[1].sizes());
  const int64_t T = x.size(0), B = x.size(1), H = params[1].size(1);
  check_tensor(grad_output, "grad_output", {T, B, 2 * H}, x);
  check_tensor(output, "output", {T, B, 2 * H}, x);
  for (const auto& [tensor, name] : {std::pair<const at::Tensor&, const char*>{grad_h_n, "grad_h_n"},
                                     {grad_c_n, "grad_c_n"}, {h0, "h0"}, {c0, "c0"}}) {
    check_tensor(tensor, name, {2, B, H}, x);
  }
  const LayerFlags flags = unpack_flags(input_statistics, normalize_recurrent, normalize_cell, training, eps,
                                        /*start_step=*/0, operand_dtype);
  LayerBackwardResult results[2];
  run_directions(cpu_directions_concurrent(T, B, H), [&](int64_t d) {
    results[d] = layer_backward(
        recurrent_backward_cpu, matmul_cpu, /*weights_in_recurrence=*/true,  // as the CPU's layer_backward
        {grad_output.narrow(2, d * H, H), grad_h_n[d], grad_c_n[d], x, lengths, h0[d], c0[d],
         output.narrow(2, d * H, H), unpack_parameters(params.slice(d * kParameterCount, kParameterCount)),
         unpack_statistics(statistics.slice(d * kStatisticsCount, kStatisticsCount)), projection[d], reserve[d],
         flags, /*reverse=*/d == 1, input_grad});
  });
  auto& [grad_x, grad_h_f, grad_c_f, grad_params] = results[0];
  auto& [grad_x_r, grad_h_r, grad_c_r, grad_params_r] = results[1];
  if (input_grad) grad_x.add_(grad_x_r);
  grad_params.insert(grad_params.end(), grad_params_r.begin(), grad_params_r.end());
  return {grad_x, at::stack({grad_h_f, grad_h_r}), at::stack({grad_c_f, grad_c_r}), std::move(grad_params)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnlstm, CPU, m) {
  m.impl("bidirectional_forward", bidirectional_forward_cpu);
  m.impl("bidirectional_backward", bidirectional_backward_cpu);
}

}  // namespace bnlstm
