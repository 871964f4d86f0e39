// The layer operators' C++ signatures (schemas in ops.cpp), and the adaptor that binds a
// device's recurrent kernels and matrix product into an implementation for its dispatch key.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "bnlstm.h"

namespace bnlstm {

// (output [T, B, H], h_n [B, H], c_n [B, H],
//  mean_ih, var_ih [T | 1 | 0, 4H], mean_hh, var_hh [T | 0, 4H], mean_c, var_c [T | 0, H],
//  projection [T, B, 4H] | [0], reserve [T, B, width] | [0])
using LayerForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                      at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (grad_x, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias,
//  grad_gamma_ih, grad_gamma_hh, grad_gamma_c, grad_beta_c); [0] for parts not normalized
//  and for grad_x without input_grad.
using LayerBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                       at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using RecurrentForwardFn = void (*)(const RecurrentForwardArgs&, RecurrentForwardOutputs&, const LayerFlags&);
using RecurrentBackwardFn = void (*)(const RecurrentBackwardArgs&, RecurrentBackwardOutputs&, const LayerFlags&);

using OptTensor = c10::optional<at::Tensor>;

LayerForwardResult layer_forward(
    RecurrentForwardFn recurrent, MatmulFn matmul, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& lengths, const at::Tensor& weight_ih, const at::Tensor& weight_hh, const OptTensor& bias,
    const OptTensor& gamma_ih, const OptTensor& gamma_hh, const OptTensor& gamma_c, const OptTensor& beta_c,
    const OptTensor& running_mean_ih, const OptTensor& running_var_ih, const OptTensor& running_mean_hh,
    const OptTensor& running_var_hh, const OptTensor& running_mean_c, const OptTensor& running_var_c,
    int64_t input_statistics, bool normalize_recurrent, bool normalize_cell, bool training, double eps,
    bool reverse, bool keep_reserve, int64_t start_step, c10::optional<at::ScalarType> operand_dtype);

// weights_in_recurrence: the device's backward kernel accumulates the weight gradients
// itself (RecurrentBackwardOutputs::grad_weight_hh).
LayerBackwardResult layer_backward(
    RecurrentBackwardFn recurrent, MatmulFn matmul, bool weights_in_recurrence, const at::Tensor& grad_output,
    const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& x, const at::Tensor& lengths,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& output, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const OptTensor& gamma_ih, const OptTensor& gamma_hh, const OptTensor& gamma_c, const OptTensor& beta_c,
    const at::Tensor& mean_ih, const at::Tensor& var_ih, const at::Tensor& var_hh, const at::Tensor& mean_c,
    const at::Tensor& var_c, const at::Tensor& projection, const at::Tensor& reserve, int64_t input_statistics,
    bool normalize_recurrent, bool normalize_cell, bool training, double eps, bool reverse, bool input_grad,
    c10::optional<at::ScalarType> operand_dtype);

template <RecurrentForwardFn Recurrent, MatmulFn Matmul>
LayerForwardResult bind_layer_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& lengths,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const OptTensor& bias, const OptTensor& gamma_ih,
    const OptTensor& gamma_hh, const OptTensor& gamma_c, const OptTensor& beta_c, const OptTensor& running_mean_ih,
    const OptTensor& running_var_ih, const OptTensor& running_mean_hh, const OptTensor& running_var_hh,
    const OptTensor& running_mean_c, const OptTensor& running_var_c, int64_t input_statistics,
    bool normalize_recurrent, bool normalize_cell, bool training, double eps, bool reverse, bool keep_reserve,
    int64_t start_step, c10::optional<at::ScalarType> operand_dtype) {
  return layer_forward(Recurrent, Matmul, x, h0, c0, lengths, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c,
                       beta_c, running_mean_ih, running_var_ih, running_mean_hh, running_var_hh, running_mean_c,
                       running_var_c, input_statistics, normalize_recurrent, normalize_cell, training, eps, reverse,
                       keep_reserve, start_step, operand_dtype);
}

template <RecurrentBackwardFn Recurrent, MatmulFn Matmul, bool kWeightsInRecurrence = false>
LayerBackwardResult bind_layer_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& x,
    const at::Tensor& lengths, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& output,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const OptTensor& gamma_ih, const OptTensor& gamma_hh,
    const OptTensor& gamma_c, const OptTensor& beta_c, const at::Tensor& mean_ih, const at::Tensor& var_ih,
    const at::Tensor& var_hh, const at::Tensor& mean_c, const at::Tensor& var_c, const at::Tensor& projection,
    const at::Tensor& reserve, int64_t input_statistics, bool normalize_recurrent, bool normalize_cell,
    bool training, double eps, bool reverse, bool input_grad, c10::optional<at::ScalarType> operand_dtype) {
  return layer_backward(Recurrent, Matmul, kWeightsInRecurrence, grad_output, grad_h_n, grad_c_n, x, lengths, h0, c0,
                        output, weight_ih, weight_hh, gamma_ih, gamma_hh, gamma_c, beta_c, mean_ih, var_ih, var_hh, mean_c, var_c,
                        projection, reserve, input_statistics, normalize_recurrent, normalize_cell, training, eps,
                        reverse, input_grad, operand_dtype);
}

}  // namespace bnlstm
