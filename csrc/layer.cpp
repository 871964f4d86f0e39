// Host code of the layer operators, in ATen only, shared by every device; and their CPU
// registration. See bnlstm.h for the split between host code and device kernels.
#include "bnlstm.h"

#include <torch/library.h>

#include <initializer_list>
#include <utility>

#include "buffer_pool.h"
#include "checks.h"
#include "layer_ops.h"

namespace bnlstm {
namespace {

// From this many rows (T * B) on, the backward pass computes the weight gradients
// transposed (see layer_backward).
constexpr int64_t kTransposedWeightGradientRows = 512;

// Reverse each sequence of x [T, B, ...] within its own length; padded steps stay put.
at::Tensor reverse_padded(const at::Tensor& x, const at::Tensor& lengths) {
  const int64_t T = x.size(0), B = x.size(1);
  const at::Tensor steps = at::arange(T, lengths.options()).unsqueeze(1);  // [T, 1]
  const at::Tensor last = lengths.unsqueeze(0) - 1;                        // [1, B]
  at::Tensor index = at::where(steps <= last, last - steps, steps);       // [T, B]
  std::vector<int64_t> shape{T, B};
  shape.resize(x.dim(), 1);
  return x.gather(0, index.view(shape).expand_as(x));
}

// Mean and biased variance over dim 1 of z [N, M, F], counting rows where weight [N, M, 1]
// is 1; count [N, 1]. With no active row the statistics are 0.
std::tuple<at::Tensor, at::Tensor> masked_moments(const at::Tensor& z, const at::Tensor& weight,
                                                  const at::Tensor& count) {
  const at::Tensor divisor = count.clamp_min(1);
  const at::Tensor mean = (z * weight).sum(1) / divisor;  // [N, F]
  const at::Tensor centred = (z - mean.unsqueeze(1)) * weight;
  return {mean, (centred * centred).sum(1) / divisor};
}

// Inputs of both passes: processing-order input with padding zeroed, the active mask.
struct Prepared {
  at::Tensor x;       // [T, B, I] in processing order, zero at padded steps
  at::Tensor active;  // [T, B] bool
  at::Tensor weight;  // [T, B, 1] active as the input's dtype
  at::Tensor counts;  // [T] int64, active sequences per step
};

Prepared prepare(const at::Tensor& x, const at::Tensor& lengths, bool reverse) {
  const int64_t T = x.size(0);
  Prepared p;
  p.active = at::arange(T, lengths.options()).unsqueeze(1) < lengths.unsqueeze(0);
  p.weight = p.active.unsqueeze(2).to(x.scalar_type());
  // Padding may hold anything (NaN too); zeroed, it cannot reach a statistic or a gradient.
  // A CPU batch without padding skips the copy (asking a GPU would synchronise the host).
  const at::Tensor ordered = reverse ? reverse_padded(x, lengths) : x;
  p.counts = p.active.sum(1);
  const bool unpadded = x.is_cpu() && (T == 0 || p.counts.min().item<int64_t>() == x.size(1));
  p.x = unpadded ? ordered : at::where(p.active.unsqueeze(2), ordered, at::zeros({}, x.options()));
  return p;
}

// LayerFlags::operand_dtype from the operators' optional argument.
at::ScalarType checked_operand_dtype(const c10::optional<at::ScalarType>& operand_dtype) {
  const at::ScalarType dtype = operand_dtype.value_or(at::ScalarType::Undefined);
  TORCH_CHECK(dtype == at::ScalarType::Undefined || dtype == at::kHalf || dtype == at::kBFloat16,
              "operand_dtype must be None, float16 or bfloat16, got ", dtype);
  return dtype;
}

}  // namespace

LayerForwardResult layer_forward(
    RecurrentForwardFn recurrent, MatmulFn matmul, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& lengths, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& gamma_ih,
    const c10::optional<at::Tensor>& gamma_hh, const c10::optional<at::Tensor>& gamma_c,
    const c10::optional<at::Tensor>& beta_c, const c10::optional<at::Tensor>& running_mean_ih,
    const c10::optional<at::Tensor>& running_var_ih, const c10::optional<at::Tensor>& running_mean_hh,
    const c10::optional<at::Tensor>& running_var_hh, const c10::optional<at::Tensor>& running_mean_c,
    const c10::optional<at::Tensor>& running_var_c, int64_t input_statistics, bool normalize_recurrent,
    bool normalize_cell, bool training, double eps, bool reverse, bool keep_reserve, int64_t start_step,
    c10::optional<at::ScalarType> operand_dtype) {
  TORCH_CHECK(x.dim() == 3, "x must be [T, B, I], got ", x.sizes());
  TORCH_CHECK(input_statistics >= kInputNone && input_statistics <= kInputSequence,
              "input_statistics must be 0 (none), 1 (step) or 2 (sequence), got ", input_statistics);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = weight_hh.size(-1), G = 4 * H;
  TORCH_CHECK(start_step >= 0, "start_step must be >= 0, got ", start_step);
  const LayerFlags flags{input_statistics, normalize_recurrent, normalize_cell, training, eps, start_step,
                         checked_operand_dtype(operand_dtype)};
  const bool normalize_input = input_statistics != kInputNone;
  check_tensor(h0, "h0", {B, H}, x);
  check_tensor(c0, "c0", {B, H}, x);
  check_tensor(weight_ih, "weight_ih", {G, I}, x);
  check_tensor(weight_hh, "weight_hh", {G, H}, x);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.scalar_type() == at::kLong &&
                  lengths.device() == x.device(),
              "lengths must be int64 [", B, "] on ", x.device(), ", got ", lengths.scalar_type(), " ",
              lengths.sizes(), " on ", lengths.device());
  if (bias.has_value()) check_tensor(*bias, "bias", {G}, x);
  check_optional(gamma_ih, normalize_input, "gamma_ih", {G}, x);
  check_optional(gamma_hh, normalize_recurrent, "gamma_hh", {G}, x);
  check_optional(gamma_c, normalize_cell, "gamma_c", {H}, x);
  check_optional(beta_c, normalize_cell, "beta_c", {H}, x);
  check_running(running_mean_ih, normalize_input && !training, "running_mean_ih", G, x);
  check_running(running_var_ih, normalize_input && !training, "running_var_ih", G, x);
  check_running(running_mean_hh, normalize_recurrent && !training, "running_mean_hh", G, x);
  check_running(running_var_hh, normalize_recurrent && !training, "running_var_hh", G, x);
  check_running(running_mean_c, normalize_cell && !training, "running_mean_c", H, x);
  check_running(running_var_c, normalize_cell && !training, "running_var_c", H, x);

  const Prepared p = prepare(x, lengths, reverse);
  // Every output is a tensor of its own (the schema promises no aliasing), so unused ones
  // are fresh empty tensors, never one shared.
  const auto empty_g = [&x, G] { return at::empty({0, G}, x.options()); };
  const auto empty_h = [&x, H] { return at::empty({0, H}, x.options()); };
  const auto as_input = [&x](const OptTensor& t) { return t->to(x.scalar_type()).contiguous(); };

  RecurrentForwardArgs args;
  // The input projection of all steps: one GEMM. The step kernels normalize it.
  args.input_projection = pooled_empty({T, B, G}, x.options());
  at::Tensor projection_rows = args.input_projection.view({T * B, G});
  matmul(projection_rows, p.x.reshape({T * B, I}), weight_ih.t(), /*accumulate=*/false, flags);
  args.active = p.active.contiguous();
  args.counts = p.counts.contiguous();
  args.weight_hh = weight_hh.contiguous();
  if (bias.has_value()) args.bias = bias->contiguous();
  if (normalize_input) args.gamma_ih = gamma_ih->contiguous();
  if (normalize_recurrent) args.gamma_hh = gamma_hh->contiguous();
  if (normalize_cell) {
    args.gamma_c = gamma_c->contiguous();
    args.beta_c = beta_c->contiguous();
  }

  RecurrentForwardOutputs out;
  out.mean_ih = empty_g();
  out.var_ih = empty_g();
  if (input_statistics == kInputStep) {
    out.mean_ih = at::empty({T, G}, x.options());
    out.var_ih = at::empty({T, G}, x.options());
    if (!training) {
      args.input_mean = as_input(running_mean_ih);
      args.input_var = as_input(running_var_ih);
    }
  } else if (input_statistics == kInputSequence) {
    // Sequence-wise statistics need every step before the first one runs.
    if (training) {
      const at::Tensor weight = p.weight.view({1, T * B, 1});
      std::tie(out.mean_ih, out.var_ih) =
          masked_moments(args.input_projection.view({1, T * B, G}), weight, weight.sum(1));
    } else {
      out.mean_ih = as_input(running_mean_ih).narrow(0, 0, 1).clone();
      out.var_ih = as_input(running_var_ih).narrow(0, 0, 1).clone();
    }
    args.input_mean = out.mean_ih.contiguous();
    args.input_var = out.var_ih.contiguous();
  }
  if (!training && normalize_recurrent) {
    args.running_mean_hh = as_input(running_mean_hh);
    args.running_var_hh = as_input(running_var_hh);
  }
  if (!training && normalize_cell) {
    args.running_mean_c = as_input(running_mean_c);
    args.running_var_c = as_input(running_var_c);
  }
  out.output = at::empty({T, B, H}, x.options());
  out.h = h0.contiguous().clone();
  out.c = c0.contiguous().clone();
  out.mean_hh = normalize_recurrent ? at::empty({T, G}, x.options()) : empty_g();
  out.var_hh = normalize_recurrent ? at::empty({T, G}, x.options()) : empty_g();
  out.mean_c = normalize_cell ? at::empty({T, H}, x.options()) : empty_h();
  out.var_c = normalize_cell ? at::empty({T, H}, x.options()) : empty_h();
  const ReserveLayout layout(H, flags);
  if (keep_reserve) out.reserve = pooled_empty({T, B, layout.width}, x.options());
  recurrent(args, out, flags);

  at::Tensor output = reverse ? reverse_padded(out.output, lengths) : out.output;
  at::Tensor reserve = keep_reserve ? out.reserve : at::empty({0}, x.options());
  // The backward pass recomputes the normalized input from the projection.
  at::Tensor projection = keep_reserve && normalize_input ? args.input_projection : at::empty({0}, x.options());
  return {output, out.h, out.c, out.mean_ih, out.var_ih, out.mean_hh, out.var_hh, out.mean_c, out.var_c,
          projection, reserve};
}

LayerBackwardResult layer_backward(
    RecurrentBackwardFn recurrent, MatmulFn matmul, bool weights_in_recurrence, const at::Tensor& grad_output,
    const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& x, const at::Tensor& lengths,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& output, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const OptTensor& gamma_ih, const OptTensor& gamma_hh, const OptTensor& gamma_c, const OptTensor& beta_c,
    const at::Tensor& mean_ih, const at::Tensor& var_ih, const at::Tensor& var_hh, const at::Tensor& mean_c,
    const at::Tensor& var_c, const at::Tensor& projection, const at::Tensor& reserve, int64_t input_statistics,
    bool normalize_recurrent, bool normalize_cell, bool training, double eps, bool reverse, bool input_grad,
    c10::optional<at::ScalarType> operand_dtype) {
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = weight_hh.size(-1), G = 4 * H;
  // The backward pass reads the statistics each step used, never a slot: start_step is moot.
  const LayerFlags flags{input_statistics, normalize_recurrent, normalize_cell, training, eps, 0,
                         checked_operand_dtype(operand_dtype)};
  const bool normalize_input = input_statistics != kInputNone;
  const ReserveLayout layout(H, flags);
  TORCH_CHECK(reserve.dim() == 3 && reserve.size(0) == T && reserve.size(1) == B && reserve.size(2) == layout.width,
              "reserve must be [", T, ", ", B, ", ", layout.width,
              "] from layer_forward(keep_reserve=True) with the same flags, got ", reserve.sizes());
  check_tensor(grad_output, "grad_output", {T, B, H}, x);
  check_tensor(grad_h_n, "grad_h_n", {B, H}, x);
  check_tensor(grad_c_n, "grad_c_n", {B, H}, x);
  check_tensor(h0, "h0", {B, H}, x);
  check_tensor(c0, "c0", {B, H}, x);
  check_tensor(output, "output", {T, B, H}, x);
  if (normalize_input) check_tensor(projection, "projection", {T, B, G}, x);

  const Prepared p = prepare(x, lengths, reverse);
  const bool step_input = input_statistics == kInputStep;
  RecurrentBackwardArgs args;
  args.grad_output = (reverse ? reverse_padded(grad_output, lengths) : grad_output).contiguous();
  args.active = p.active.contiguous();
  args.counts = p.counts.contiguous();
  args.weight_hh = weight_hh.contiguous();
  if (normalize_input) args.gamma_ih = gamma_ih->contiguous();
  if (normalize_recurrent) args.gamma_hh = gamma_hh->contiguous();
  if (normalize_cell) {
    args.gamma_c = gamma_c->contiguous();
    args.beta_c = beta_c->contiguous();
  }
  args.c0 = c0.contiguous();
  if (normalize_input) args.projection = projection.contiguous();
  args.mean_ih = mean_ih.contiguous();
  args.var_ih = var_ih.contiguous();
  args.mean_c = mean_c.contiguous();
  args.var_hh = var_hh.contiguous();
  args.var_c = var_c.contiguous();
  args.reserve = reserve.contiguous();

  RecurrentBackwardOutputs out;
  const auto empty = [&x] { return at::empty({0}, x.options()); };
  out.grad_h = grad_h_n.contiguous().clone();
  out.grad_c = grad_c_n.contiguous().clone();
  // h_{t-1} is h_0 at the first step and the previous step's output after it (padded rows
  // differ, but their gradient is zero).
  const at::Tensor output_ordered = (reverse ? reverse_padded(output, lengths) : output).contiguous();
  // Which weight gradients the device kernel accumulates during the recurrence (all but
  // grad_weight_ih with sequence-wise statistics, whose grad_wx needs sums over all steps).
  const bool kernel_weight_hh = weights_in_recurrence;
  const bool kernel_weight_ih = weights_in_recurrence && input_statistics != kInputSequence;
  if (kernel_weight_hh) {
    out.grad_weight_hh = at::zeros({G, H}, x.options());
    args.h0 = h0.contiguous();
    args.output = output_ordered;
  }
  if (kernel_weight_ih) {
    out.grad_weight_ih = at::zeros({G, I}, x.options());
    args.x = p.x.contiguous();
  }
  // The [T, B, 4H] gradients the host reads after the recurrence: grad_zh for grad_weight_hh,
  // grad_wx for grad_weight_ih and grad_x, grad_gates for sequence-wise statistics (and where
  // one of the others is it). Otherwise the device kernel keeps each step's in scratch of its own.
  const bool need_zh = !kernel_weight_hh;
  const bool need_wx = input_grad || !kernel_weight_ih;
  const bool keep_grad_gates = input_statistics == kInputSequence || (!normalize_recurrent && need_zh) ||
                               (input_statistics == kInputNone && need_wx);
  out.grad_gates = keep_grad_gates ? pooled_empty({T, B, G}, x.options()) : at::Tensor();
  out.grad_zh = !need_zh ? at::Tensor() : normalize_recurrent ? pooled_empty({T, B, G}, x.options()) : out.grad_gates;
  out.grad_wx = !need_wx ? at::Tensor() : step_input ? pooled_empty({T, B, G}, x.options()) : out.grad_gates;
  out.grad_bias = at::zeros({G}, x.options());
  out.grad_gamma_ih = normalize_input ? at::zeros({G}, x.options()) : empty();
  out.grad_gamma_hh = normalize_recurrent ? at::zeros({G}, x.options()) : empty();
  out.grad_gamma_c = normalize_cell ? at::zeros({H}, x.options()) : empty();
  out.grad_beta_c = normalize_cell ? at::zeros({H}, x.options()) : empty();
  recurrent(args, out, flags);

  at::Tensor grad_wx = out.grad_wx;  // [T, B, 4H]
  if (input_statistics == kInputSequence) {
    // Sequence-wise statistics: the batch-norm backward needs sums over every step, which
    // the kernel accumulated as grad_bias = sum(dy) and grad_gamma_ih = sum(dy * xhat).
    const at::Tensor rstd = (var_ih + eps).rsqrt();  // [1, 4H]
    const at::Tensor xhat = (projection - mean_ih) * rstd;
    const at::Tensor scale = rstd * *gamma_ih;
    if (training) {
      const at::Tensor count = p.counts.sum().clamp_min(1).to(x.scalar_type());
      grad_wx = (out.grad_gates - out.grad_bias / count - xhat * (out.grad_gamma_ih / count)) * p.weight * scale;
    } else {
      grad_wx = out.grad_gates * scale;
    }
  }

  // Weight gradients the kernel did not accumulate, and the input gradient, as large GEMMs
  // over all steps.
  const at::Tensor h_prev = output_ordered.narrow(0, 0, T - 1);
  // With many rows (T * B) on the CPU, each weight gradient is computed transposed (h^T dz
  // rather than dz^T h) and transposed back: with the long dimension as the reduction of a
  // row-major A^T, MKL runs these products faster, which pays for the copy (docs/CPU.md); a
  // step or two (a cell) would pay only the copy.
  const bool transposed = x.is_cpu() && T * B >= kTransposedWeightGradientRows;
  // dz^T h [rows, columns] summed over (dz, h) pairs of [N, rows] and [N, columns].
  const auto weight_gradient = [&](std::initializer_list<std::pair<at::Tensor, at::Tensor>> pairs, int64_t rows,
                                   int64_t columns) {
    at::Tensor result = transposed ? at::empty({columns, rows}, x.options()) : at::empty({rows, columns}, x.options());
    bool accumulate = false;
    for (const auto& [dz, h] : pairs) {
      if (dz.size(0) == 0) continue;
      if (transposed) {
        matmul(result, h.t(), dz, accumulate, flags);
      } else {
        matmul(result, dz.t(), h, accumulate, flags);
      }
      accumulate = true;
    }
    if (!accumulate) result.zero_();
    return transposed ? result.t().contiguous() : result;
  };
  at::Tensor grad_weight_hh = out.grad_weight_hh, grad_weight_ih = out.grad_weight_ih;
  if (!kernel_weight_hh) {  // sum_t grad_zh_t^T h_{t-1}: h_0 first, then the outputs
    grad_weight_hh = weight_gradient({{out.grad_zh[0], h0},
                                      {out.grad_zh.narrow(0, 1, T - 1).reshape({(T - 1) * B, G}),
                                       h_prev.reshape({(T - 1) * B, H})}},
                                     G, H);
  }
  if (!kernel_weight_ih) {
    grad_weight_ih = weight_gradient({{grad_wx.reshape({T * B, G}), p.x.reshape({T * B, I})}}, G, I);
  }
  at::Tensor grad_x = at::empty({0}, x.options());
  if (input_grad) {
    at::Tensor grad_x_ordered = at::empty({T, B, I}, x.options());
    matmul(grad_x_ordered.view({T * B, I}), grad_wx.reshape({T * B, G}), weight_ih, /*accumulate=*/false, flags);
    grad_x = reverse ? reverse_padded(grad_x_ordered, lengths) : grad_x_ordered;
  }
  return {grad_x, out.grad_h, out.grad_c, grad_weight_ih, grad_weight_hh, out.grad_bias,
          out.grad_gamma_ih, out.grad_gamma_hh, out.grad_gamma_c, out.grad_beta_c};
}

// The CPU backward accumulates the weight gradients itself (recurrent_cpu.cpp). The CUDA
// emulation (tests/run_cuda_emulation.py) registers the CUDA kernels here, which do not.
#ifdef BNLSTM_CUDA_KERNELS_ON_CPU
constexpr bool kCpuWeightsInRecurrence = false;
#else
constexpr bool kCpuWeightsInRecurrence = true;
#endif

TORCH_LIBRARY_IMPL(bnlstm, CPU, m) {
  m.impl("layer_forward", bind_layer_forward<recurrent_forward_cpu, matmul_cpu>);
  m.impl("layer_backward", bind_layer_backward<recurrent_backward_cpu, matmul_cpu, kCpuWeightsInRecurrence>);
}

}  // namespace bnlstm
