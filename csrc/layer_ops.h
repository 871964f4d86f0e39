// The layer operators' C++ side (schemas in ops.cpp): the schema's tensor lists and flags
// unpacked into named structs in one place, and the adaptor that binds a device's recurrent
// kernels and matrix product into an implementation for its dispatch key.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "bnlstm.h"

namespace bnlstm {

using OptTensor = c10::optional<at::Tensor>;

// The schema's `Tensor[] params`, in bnlstm_cuda.layer_api.LayerParams' order. An empty
// tensor in the list stands for a part the layer does not have (nullopt here).
struct LayerParameters {
  at::Tensor weight_ih;  // [4H, I]
  at::Tensor weight_hh;  // [4H, H]
  OptTensor bias;        // [4H]
  OptTensor gamma_ih;    // [4H]
  OptTensor gamma_hh;    // [4H]
  OptTensor gamma_c;     // [H]
  OptTensor beta_c;      // [H]
};

// Statistics of the three normalized parts, in the schema's list order: the running ones
// layer_forward reads in evaluation ([S, F], nullopt where not given), and the per-step ones
// it returns and layer_backward reads ([T | 1 | 0, F]).
template <typename T>
struct PartStatistics {
  T mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c;
};
using RunningStatistics = PartStatistics<OptTensor>;
using StepStatistics = PartStatistics<at::Tensor>;

LayerParameters unpack_parameters(at::TensorList params);
RunningStatistics unpack_running(at::TensorList running);
StepStatistics unpack_statistics(at::TensorList statistics);
std::vector<at::Tensor> pack_statistics(StepStatistics statistics);
// The flags both operators take; start_step is layer_forward's own (0 for the backward).
LayerFlags unpack_flags(int64_t input_statistics, bool normalize_recurrent, bool normalize_cell, bool training,
                        double eps, int64_t start_step, c10::optional<at::ScalarType> operand_dtype);

// (output [T, B, H], h_n [B, H], c_n [B, H], statistics (the schema's list),
//  projection [T, B, 4H] | [0], reserve [T, B, width] | [0])
using LayerForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor>;
// (grad_x, grad_h0, grad_c0, grad_params in params' order); [0] for parts the layer does
// not have and for grad_x without input_grad.
using LayerBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;

using RecurrentForwardFn = void (*)(const RecurrentForwardArgs&, RecurrentForwardOutputs&, const LayerFlags&);
using RecurrentBackwardFn = void (*)(const RecurrentBackwardArgs&, RecurrentBackwardOutputs&, const LayerFlags&);

// The host code (layer.cpp), for every device.
struct LayerForwardInputs {
  at::Tensor x, h0, c0;
  OptTensor lengths;
  LayerParameters params;
  RunningStatistics running;
  LayerFlags flags;
  bool reverse;
  bool keep_reserve;
  // Training: fold the batch statistics into these running statistics in place (the
  // recurrence as it goes, where it can), or null (RunningFold; CPU only).
  RunningFold* fold = nullptr;
};

struct LayerBackwardInputs {
  at::Tensor grad_output, grad_h_n, grad_c_n, x;
  OptTensor lengths;
  at::Tensor h0, c0, output;
  LayerParameters params;
  StepStatistics statistics;
  at::Tensor projection, reserve;
  LayerFlags flags;
  bool reverse;
  bool input_grad;
};

// Whether a device's recurrent kernel takes x and W_ih instead of the input projection
// (RecurrentForwardArgs) for a batch and input size; null: never.
using StepsProjectInputFn = bool (*)(int64_t steps, int64_t batch, int64_t input_size);

// steps_project_input: where it says so, and no other code reads the projection of every
// step, the recurrent kernel gets x and W_ih. recurrent_folds: the recurrent kernel folds
// RecurrentForwardArgs::fold as it goes (the CPU's).
LayerForwardResult layer_forward(RecurrentForwardFn recurrent, MatmulFn matmul, StepsProjectInputFn steps_project_input,
                                 const LayerForwardInputs& in, bool recurrent_folds = false);

// weights_in_recurrence: the device's backward kernel accumulates the weight gradients
// itself (RecurrentBackwardOutputs::grad_weight_hh).
LayerBackwardResult layer_backward(RecurrentBackwardFn recurrent, MatmulFn matmul, bool weights_in_recurrence,
                                   const LayerBackwardInputs& in);

// The CPU's layer_forward, for the node of bnlstm::layer (layer_autograd.cpp), which calls
// it directly where it folds the running statistics as the steps go (in.fold).
LayerForwardResult layer_forward_cpu(const LayerForwardInputs& in);

// (output [T, B, 2H], h_n [2, B, H], c_n [2, B, H], statistics (both directions' lists),
//  projection and reserve of each direction)
using BidirectionalForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>,
                                              std::vector<at::Tensor>, std::vector<at::Tensor>>;
// The CPU's bidirectional_forward (bidirectional_cpu.cpp), folding each direction's running
// statistics into folds[d] as layer_forward_cpu does (null: no fold).
BidirectionalForwardResult bidirectional_forward_cpu_folding(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const OptTensor& lengths, at::TensorList params,
    at::TensorList running, int64_t input_statistics, bool normalize_recurrent, bool normalize_cell, bool training,
    double eps, bool keep_reserve, c10::optional<at::ScalarType> operand_dtype, RunningFold* folds);

// The schema's arguments, as the dispatcher passes them, unpacked once.
template <RecurrentForwardFn Recurrent, MatmulFn Matmul, StepsProjectInputFn kStepsProjectInput = nullptr>
LayerForwardResult bind_layer_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                      const OptTensor& lengths, at::TensorList params, at::TensorList running,
                                      int64_t input_statistics, bool normalize_recurrent, bool normalize_cell,
                                      bool training, double eps, bool reverse, bool keep_reserve,
                                      int64_t start_step, c10::optional<at::ScalarType> operand_dtype) {
  return layer_forward(Recurrent, Matmul, kStepsProjectInput,
                       {x, h0, c0, lengths, unpack_parameters(params), unpack_running(running),
                        unpack_flags(input_statistics, normalize_recurrent, normalize_cell, training, eps,
                                     start_step, operand_dtype),
                        reverse, keep_reserve});
}

template <RecurrentBackwardFn Recurrent, MatmulFn Matmul, bool kWeightsInRecurrence = false>
LayerBackwardResult bind_layer_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& x,
    const OptTensor& lengths, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& output,
    at::TensorList params, at::TensorList statistics, const at::Tensor& projection, const at::Tensor& reserve,
    int64_t input_statistics, bool normalize_recurrent, bool normalize_cell, bool training, double eps, bool reverse,
    bool input_grad, c10::optional<at::ScalarType> operand_dtype) {
  return layer_backward(Recurrent, Matmul, kWeightsInRecurrence,
                        {grad_output, grad_h_n, grad_c_n, x, lengths, h0, c0, output, unpack_parameters(params),
                         unpack_statistics(statistics), projection, reserve,
                         unpack_flags(input_statistics, normalize_recurrent, normalize_cell, training, eps,
                                      /*start_step=*/0, operand_dtype),
                         reverse, input_grad});
}

}  // namespace bnlstm
