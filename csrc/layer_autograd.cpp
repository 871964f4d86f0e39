// bnlstm::layer and bnlstm::bidirectional (schemas in ops.cpp): a pair of layer operators
// with its autograd node in C++, for eager calls that record a graph. A Python
// autograd.Function costs tens of microseconds a call, in its apply and in the Python its
// backward runs under the GIL (docs/CPU.md); this node calls the same operators below the
// Autograd key, so every device's kernels run. torch.compile traces the pairs themselves
// with their Python formula (bnlstm_cuda/ops.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "layer_ops.h"

namespace bnlstm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptDtype = c10::optional<at::ScalarType>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_operator(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The arguments autograd does not track, passed to the node as one value: Function::apply
// takes every tensor argument, and each tensor of a TensorList, for an input.
struct UntrackedArguments {
  OptTensor lengths;
  at::TensorList running;
  int64_t input_statistics;
  bool normalize_recurrent, normalize_cell, training;
  double eps;
  bool reverse;  // one direction only
  int64_t start_step;  // one direction only
  OptDtype operand_dtype;
  // Training on the CPU: fold the batch statistics into `running` in place (RunningFold).
  c10::optional<double> momentum;
};

// The schema's `running` list of one direction as the running statistics to fold into
// (empty tensors: parts the variant does not normalize).
RunningFold running_fold(at::TensorList running, double momentum) {
  TORCH_CHECK(running.size() == 6, "running must hold 6 tensors (mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c), "
              "got ", running.size());
  const auto given = [](const at::Tensor& t) { return t.numel() ? t : at::Tensor(); };
  return {momentum, given(running[0]), given(running[1]), given(running[2]), given(running[3]), given(running[4]),
          given(running[5])};
}

// The operators' `folded` output: each folded direction's first non-finite step of every
// part the variant normalizes, in the order ih, hh, c, direction after direction.
at::Tensor first_skipped(const RunningFold* folds, size_t count, const UntrackedArguments& a) {
  const bool normalized[3] = {a.input_statistics != kInputNone, a.normalize_recurrent, a.normalize_cell};
  std::vector<int64_t> firsts;
  for (size_t d = 0; d < count; ++d) {
    for (int part = 0; part < 3; ++part) {
      if (normalized[part]) firsts.push_back(folds[d].first_skipped[part]);
    }
  }
  return at::tensor(firsts, at::kLong);
}

void check_fold_device(const at::Tensor& x, const UntrackedArguments& a) {
  TORCH_CHECK(!a.momentum.has_value() || (x.is_cpu() && a.training),
              "momentum (folding the running statistics in the forward pass) needs training=True and CPU tensors, "
              "got training=", a.training, " and x on ", x.device());
}

// What a forward operator returns, grouped for the node: `kept` holds what only the
// backward reads (the projections, then the reserves).
struct ForwardResult {
  at::Tensor output, h_n, c_n;
  std::vector<at::Tensor> statistics, kept;
  at::Tensor folded;  // first_skipped's, or [0] without a fold
};

// What the backward operator reads besides the incoming gradients.
struct BackwardInputs {
  at::Tensor x, h0, c0, output;
  OptTensor lengths;
  at::TensorList kept, params, statistics;
  int64_t input_statistics;
  bool normalize_recurrent, normalize_cell, training;
  double eps;
  bool reverse;
  OptDtype operand_dtype;
};

// One direction: layer_forward and layer_backward.
struct OneDirection {
  static constexpr size_t kParameters = 7;  // LayerParameters' fields
  static constexpr size_t kKept = 2;  // projection, reserve

  static ForwardResult forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               at::TensorList params, const UntrackedArguments& a) {
    using Signature = LayerForwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         at::TensorList, at::TensorList, int64_t, bool, bool, bool, double, bool,
                                         bool, int64_t, OptDtype);
    static const auto op = find_operator<Signature>("bnlstm::layer_forward");
    check_fold_device(x, a);
    if (!a.momentum.has_value()) {
      auto [output, h_n, c_n, statistics, projection, reserve] =
          op.call(x, h0, c0, a.lengths, params, a.running, a.input_statistics, a.normalize_recurrent,
                  a.normalize_cell, a.training, a.eps, a.reverse, /*keep_reserve=*/true, a.start_step,
                  a.operand_dtype);
      return {output, h_n, c_n, std::move(statistics), {projection, reserve}, at::empty({0}, at::kLong)};
    }
    // Folding: the CPU's host code directly, which takes the running statistics to fold into.
    RunningFold fold = running_fold(a.running, *a.momentum);
    auto [output, h_n, c_n, statistics, projection, reserve] = layer_forward_cpu(
        {x, h0, c0, a.lengths, unpack_parameters(params), unpack_running(a.running),
         unpack_flags(a.input_statistics, a.normalize_recurrent, a.normalize_cell, a.training, a.eps, a.start_step,
                      a.operand_dtype),
         a.reverse, /*keep_reserve=*/true, &fold});
    return {output, h_n, c_n, std::move(statistics), {projection, reserve}, first_skipped(&fold, 1, a)};
  }

  static LayerBackwardResult backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                      const at::Tensor& grad_c_n, const BackwardInputs& in, bool input_grad) {
    using Signature = LayerBackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&,
                                          int64_t, bool, bool, bool, double, bool, bool, OptDtype);
    static const auto op = find_operator<Signature>("bnlstm::layer_backward");
    return op.call(grad_output, grad_h_n, grad_c_n, in.x, in.lengths, in.h0, in.c0, in.output, in.params,
                   in.statistics, in.kept[0], in.kept[1], in.input_statistics, in.normalize_recurrent,
                   in.normalize_cell, in.training, in.eps, in.reverse, input_grad, in.operand_dtype);
  }
};

// Both directions of a bidirectional layer: bidirectional_forward and bidirectional_backward.
struct BothDirections {
  static constexpr size_t kParameters = 2 * OneDirection::kParameters;
  static constexpr size_t kKept = 4;  // the projections, then the reserves

  static ForwardResult forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               at::TensorList params, const UntrackedArguments& a) {
    using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                              std::vector<at::Tensor>>;
    using Signature = Result(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                             at::TensorList, at::TensorList, int64_t, bool, bool, bool, double, bool, OptDtype);
    static const auto op = find_operator<Signature>("bnlstm::bidirectional_forward");
    check_fold_device(x, a);
    if (!a.momentum.has_value()) {
      auto [output, h_n, c_n, statistics, projection, reserve] =
          op.call(x, h0, c0, a.lengths, params, a.running, a.input_statistics, a.normalize_recurrent,
                  a.normalize_cell, a.training, a.eps, /*keep_reserve=*/true, a.operand_dtype);
      projection.insert(projection.end(), reserve.begin(), reserve.end());
      return {output, h_n, c_n, std::move(statistics), std::move(projection), at::empty({0}, at::kLong)};
    }
#ifdef BNLSTM_CUDA_KERNELS_ON_CPU
    TORCH_CHECK(false, "the CUDA emulation build has no bidirectional CPU operators");
#else
    TORCH_CHECK(a.running.size() == 12, "running must hold 12 tensors (6 a direction), got ", a.running.size());
    RunningFold folds[2] = {running_fold(a.running.slice(0, 6), *a.momentum),
                            running_fold(a.running.slice(6, 6), *a.momentum)};
    auto [output, h_n, c_n, statistics, projection, reserve] = bidirectional_forward_cpu_folding(
        x, h0, c0, a.lengths, params, a.running, a.input_statistics, a.normalize_recurrent, a.normalize_cell,
        a.training, a.eps, /*keep_reserve=*/true, a.operand_dtype, folds);
    projection.insert(projection.end(), reserve.begin(), reserve.end());
    return {output, h_n, c_n, std::move(statistics), std::move(projection), first_skipped(folds, 2, a)};
#endif
  }

  static LayerBackwardResult backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                      const at::Tensor& grad_c_n, const BackwardInputs& in, bool input_grad) {
    using Signature = LayerBackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          at::TensorList, at::TensorList, at::TensorList, at::TensorList, int64_t,
                                          bool, bool, bool, double, bool, OptDtype);
    static const auto op = find_operator<Signature>("bnlstm::bidirectional_backward");
    return op.call(grad_output, grad_h_n, grad_c_n, in.x, in.lengths, in.h0, in.c0, in.output, in.params,
                   in.statistics, in.kept.slice(0, 2), in.kept.slice(2), in.input_statistics, in.normalize_recurrent,
                   in.normalize_cell, in.training, in.eps, input_grad, in.operand_dtype);
  }
};

template <typename Pair>
class LayerNode : public torch::autograd::Function<LayerNode<Pair>> {
  static constexpr size_t kSavedBeforeKept = 4;  // x, h0, c0, output

 public:
  // Returns output, h_n, c_n and the statistics (not differentiable).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h0,
                               const at::Tensor& c0, at::TensorList params, const UntrackedArguments& a) {
    ForwardResult r;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      r = Pair::forward(x, h0, c0, params, a);
    }
    // No zero gradients for the statistics: nothing differentiates them.
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable(r.statistics);
    ctx->mark_non_differentiable({r.folded});
    variable_list saved{x, h0, c0, r.output};
    saved.insert(saved.end(), r.kept.begin(), r.kept.end());
    saved.insert(saved.end(), params.begin(), params.end());
    saved.insert(saved.end(), r.statistics.begin(), r.statistics.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["lengths"] = a.lengths;
    ctx->saved_data["flags"] = std::vector<int64_t>{a.input_statistics, a.normalize_recurrent, a.normalize_cell,
                                                    a.training, a.reverse};
    ctx->saved_data["eps"] = a.eps;
    ctx->saved_data["operand_dtype"] = a.operand_dtype;
    variable_list result{r.output, r.h_n, r.c_n};
    result.insert(result.end(), r.statistics.begin(), r.statistics.end());
    result.push_back(r.folded);
    return result;
  }

  // One gradient for every argument of forward: x, h0, c0, each parameter, then the
  // untracked arguments (undefined).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // backward(create_graph=True) runs with grad mode on: the backward operators have no
    // derivative of their own.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "double backward (create_graph=True, e.g. a gradient penalty) is not supported by the fused "
                "backends; use BNLSTM(..., backend=\"reference\"), whose plain PyTorch loop supports it");
    const variable_list saved = ctx->get_saved_variables();
    const at::TensorList all(saved);
    const std::vector<int64_t> flags = ctx->saved_data["flags"].toIntVector();
    const BackwardInputs in{saved[0], saved[1], saved[2], saved[3],
                            ctx->saved_data["lengths"].toOptional<at::Tensor>(),
                            all.slice(kSavedBeforeKept, Pair::kKept),
                            all.slice(kSavedBeforeKept + Pair::kKept, Pair::kParameters),
                            all.slice(kSavedBeforeKept + Pair::kKept + Pair::kParameters),
                            flags[0], flags[1] != 0, flags[2] != 0, flags[3] != 0,
                            ctx->saved_data["eps"].toDouble(), flags[4] != 0,
                            ctx->saved_data["operand_dtype"].toOptional<at::ScalarType>()};
    // Gradients of outputs nothing used come undefined (set_materialize_grads(false)).
    const auto or_zeros = [](const at::Tensor& grad, const at::Tensor& like) {
      return grad.defined() ? grad : at::zeros_like(like);
    };
    const bool input_grad = ctx->needs_input_grad(0);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_x, grad_h0, grad_c0, grad_params] = Pair::backward(
        or_zeros(grads[0], in.output), or_zeros(grads[1], in.h0), or_zeros(grads[2], in.c0), in, input_grad);
    variable_list result{input_grad ? grad_x : at::Tensor(), grad_h0, grad_c0};
    for (size_t i = 0; i < Pair::kParameters; ++i) {
      result.push_back(in.params[i].numel() ? grad_params[i] : at::Tensor());  // empty: an absent part
    }
    result.emplace_back();  // the untracked arguments
    return result;
  }
};

using LayerOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor>;

template <typename Pair>
LayerOutputs apply_node(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, at::TensorList params,
                        const UntrackedArguments& untracked) {
  TORCH_CHECK(params.size() == Pair::kParameters, "params must list ", Pair::kParameters, " tensors, got ",
              params.size());
  const variable_list result = LayerNode<Pair>::apply(x, h0, c0, params, untracked);
  return {result[0], result[1], result[2], std::vector<at::Tensor>(result.begin() + 3, result.end() - 1),
          result.back()};
}

LayerOutputs layer(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const OptTensor& lengths,
                   at::TensorList params, at::TensorList running, int64_t input_statistics, bool normalize_recurrent,
                   bool normalize_cell, bool training, double eps, bool reverse, int64_t start_step,
                   OptDtype operand_dtype, c10::optional<double> momentum) {
  return apply_node<OneDirection>(x, h0, c0, params,
                                  {lengths, running, input_statistics, normalize_recurrent, normalize_cell, training,
                                   eps, reverse, start_step, operand_dtype, momentum});
}

LayerOutputs bidirectional(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const OptTensor& lengths,
                           at::TensorList params, at::TensorList running, int64_t input_statistics,
                           bool normalize_recurrent, bool normalize_cell, bool training, double eps,
                           OptDtype operand_dtype, c10::optional<double> momentum) {
  return apply_node<BothDirections>(x, h0, c0, params,
                                    {lengths, running, input_statistics, normalize_recurrent, normalize_cell,
                                     training, eps, /*reverse=*/false, /*start_step=*/0, operand_dtype, momentum});
}

}  // namespace

TORCH_LIBRARY_IMPL(bnlstm, CompositeImplicitAutograd, m) {
  m.impl("layer", layer);
  m.impl("bidirectional", bidirectional);
}

}  // namespace bnlstm
