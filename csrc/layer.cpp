// Host code of the layer operators, in ATen only, shared by every device; and their CPU
// registration. See bnlstm.h for the split between host code and device kernels.
#include "bnlstm.h"

#include <torch/library.h>

#include <initializer_list>
#include <utility>

#include "buffer_pool.h"
#include "checks.h"
#include "layer_ops.h"
#include "running_fold.h"

namespace bnlstm {
namespace {

// From this many rows (T * B) on, the backward pass computes the weight gradients
// transposed (see layer_backward).
constexpr int64_t kTransposedWeightGradientRows = 512;

// Reverse each sequence of x [T, B, ...] within its own length into `out` (x's shape), and
// return it; padded steps stay put. Without lengths every sequence is full and the reversal
// is a flip. Copies that stay inside an operator go to pooled buffers (reversed_copy).
at::Tensor reverse_padded(const at::Tensor& x, const OptTensor& lengths, at::Tensor out) {
  const int64_t T = x.size(0);
  if (!lengths.has_value()) {
    return at::index_select_out(out, x, 0, at::arange(T - 1, -1, -1, x.options().dtype(at::kLong)));
  }
  const int64_t B = x.size(1);
  const at::Tensor steps = at::arange(T, lengths->options()).unsqueeze(1);  // [T, 1]
  const at::Tensor last = lengths->unsqueeze(0) - 1;                        // [1, B]
  at::Tensor index = at::where(steps <= last, last - steps, steps);        // [T, B]
  std::vector<int64_t> shape{T, B};
  shape.resize(x.dim(), 1);
  return at::gather_out(out, x, 0, index.view(shape).expand_as(x));
}

// x in processing order as a copy only the operator sees: a pooled buffer spares the page
// faults of a fresh one (buffer_pool.h).
at::Tensor reversed_copy(const at::Tensor& x, const OptTensor& lengths) {
  return reverse_padded(x, lengths, pooled_empty(x.sizes(), x.options()));
}

// x reversed into a tensor of its own, for outputs the caller keeps.
at::Tensor reversed_output(const at::Tensor& x, const OptTensor& lengths) {
  return reverse_padded(x, lengths, pooled_empty(x.sizes(), x.options()));
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
  at::Tensor counts;  // [T] int64, active sequences per step

  // [T, B, 1]: active as the input's dtype, for the sums of sequence-wise statistics.
  at::Tensor weight() const { return active.unsqueeze(2).to(x.scalar_type()); }
};

// The mask and counts of T steps of B full sequences on the CPU. The kernels only read
// them, so each thread keeps the last ones it made: a small call (a cell's step) spends a
// visible part of its time allocating and filling tensors (docs/CPU.md).
std::pair<at::Tensor, at::Tensor> all_active_cpu(int64_t T, int64_t B) {
  struct Kept {
    int64_t T = -1, B = -1;
    at::Tensor active, counts;
  };
  static thread_local Kept* kept = new Kept();  // never destroyed: no tensor freed at thread exit
  if (kept->T != T || kept->B != B) {
    kept->active = at::ones({T, B}, at::kBool);
    kept->counts = at::full({T}, B, at::kLong);
    kept->T = T;
    kept->B = B;
  }
  return {kept->active, kept->counts};
}

Prepared prepare(const at::Tensor& x, const OptTensor& lengths, bool reverse) {
  const int64_t T = x.size(0), B = x.size(1);
  Prepared p;
  const at::Tensor ordered = reverse ? reversed_copy(x, lengths) : x;
  if (!lengths.has_value()) {  // every sequence full: no mask to compute, no padding to zero
    if (x.is_cpu()) {
      std::tie(p.active, p.counts) = all_active_cpu(T, B);
    } else {
      p.active = at::ones({T, B}, x.options().dtype(at::kBool));
      p.counts = at::full({T}, B, x.options().dtype(at::kLong));
    }
    p.x = ordered;
    return p;
  }
  p.active = at::arange(T, lengths->options()).unsqueeze(1) < lengths->unsqueeze(0);
  p.counts = p.active.sum(1);
  // Padding may hold anything (NaN too); zeroed, it cannot reach a statistic or a gradient.
  // A CPU batch without padding skips the copy (asking a GPU would synchronise the host).
  const bool unpadded = x.is_cpu() && (T == 0 || p.counts.min().item<int64_t>() == B);
  p.x = unpadded ? ordered : at::where(p.active.unsqueeze(2), ordered, at::zeros({}, x.options()));
  return p;
}

// An entry of a schema tensor list: nullopt for the empty tensor that stands for "absent".
OptTensor present(const at::Tensor& t) { return t.defined() && t.numel() > 0 ? OptTensor(t) : c10::nullopt; }

void check_lengths(const OptTensor& lengths, const at::Tensor& x) {
  if (!lengths.has_value()) return;
  const int64_t B = x.size(1);
  TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B && lengths->scalar_type() == at::kLong &&
                  lengths->device() == x.device(),
              "lengths must be int64 [", B, "] on ", x.device(), ", got ", lengths->scalar_type(), " ",
              lengths->sizes(), " on ", lengths->device());
}

void check_list_size(at::TensorList list, size_t size, const char* name, const char* order) {
  TORCH_CHECK(list.size() == size, name, " must hold ", size, " tensors (", order, "), got ", list.size());
}

// LayerFlags::operand_dtype from the operators' optional argument.
at::ScalarType checked_operand_dtype(const c10::optional<at::ScalarType>& operand_dtype) {
  const at::ScalarType dtype = operand_dtype.value_or(at::ScalarType::Undefined);
  TORCH_CHECK(dtype == at::ScalarType::Undefined || dtype == at::kHalf || dtype == at::kBFloat16,
              "operand_dtype must be None, float16 or bfloat16, got ", dtype);
  return dtype;
}

}  // namespace

LayerParameters unpack_parameters(at::TensorList params) {
  check_list_size(params, 7, "params", "weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c");
  return {params[0], params[1], present(params[2]), present(params[3]),
          present(params[4]), present(params[5]), present(params[6])};
}

RunningStatistics unpack_running(at::TensorList running) {
  check_list_size(running, 6, "running", "mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c");
  return {present(running[0]), present(running[1]), present(running[2]),
          present(running[3]), present(running[4]), present(running[5])};
}

StepStatistics unpack_statistics(at::TensorList statistics) {
  check_list_size(statistics, 6, "statistics", "mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c");
  return {statistics[0], statistics[1], statistics[2], statistics[3], statistics[4], statistics[5]};
}

std::vector<at::Tensor> pack_statistics(StepStatistics s) {
  return {std::move(s.mean_ih), std::move(s.var_ih), std::move(s.mean_hh),
          std::move(s.var_hh),  std::move(s.mean_c), std::move(s.var_c)};
}

LayerFlags unpack_flags(int64_t input_statistics, bool normalize_recurrent, bool normalize_cell, bool training,
                        double eps, int64_t start_step, c10::optional<at::ScalarType> operand_dtype) {
  TORCH_CHECK(input_statistics >= kInputNone && input_statistics <= kInputSequence,
              "input_statistics must be 0 (none), 1 (step) or 2 (sequence), got ", input_statistics);
  TORCH_CHECK(start_step >= 0, "start_step must be >= 0, got ", start_step);
  return {input_statistics, normalize_recurrent, normalize_cell, training, eps, start_step,
          checked_operand_dtype(operand_dtype)};
}

namespace {

// Checks the running statistics of every part the variant normalizes: [S >= 1, F] pairs on
// x's device, F = 4H (input, recurrent) or H (cell). Returns whether the recurrence can fold
// into them itself: x's dtype, contiguous.
bool fold_targets_match(const RunningFold& fold, const LayerFlags& flags, const at::Tensor& x, int64_t hidden) {
  bool match = true;
  const auto check = [&](const at::Tensor& mean, const at::Tensor& var, bool needed, int64_t features,
                         const char* name) {
    if (!needed) return;
    TORCH_CHECK(mean.defined() && var.defined() && mean.dim() == 2 && mean.size(0) >= 1 &&
                    mean.size(1) == features && var.sizes() == mean.sizes(),
                "the fold needs the running statistics of ", name, " as two [S >= 1, ", features,
                "] tensors, got ", mean.defined() ? mean.sizes() : at::IntArrayRef{}, " and ",
                var.defined() ? var.sizes() : at::IntArrayRef{});
    TORCH_CHECK(mean.device() == x.device() && var.device() == x.device(), "the running statistics of ", name,
                " must be on ", x.device(), ", got ", mean.device(), " and ", var.device());
    match = match && mean.scalar_type() == x.scalar_type() && var.scalar_type() == x.scalar_type() &&
            mean.is_contiguous() && var.is_contiguous();
  };
  check(fold.mean_ih, fold.var_ih, flags.input_statistics != kInputNone, 4 * hidden, "ih");
  check(fold.mean_hh, fold.var_hh, flags.normalize_recurrent, 4 * hidden, "hh");
  check(fold.mean_c, fold.var_c, flags.normalize_cell, hidden, "c");
  return match;
}

// What the recurrence did not fold: the sequence-wise input statistics (one row, over every
// active step of every sequence), or everything where it could not (fold_targets_match).
void fold_after_steps(RunningFold& fold, const LayerFlags& flags, bool folded_in_steps, const at::Tensor& counts,
                      const RecurrentForwardOutputs& out) {
  const auto fold_part = [&](int64_t part, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& step_mean,
                             const at::Tensor& step_var, const at::Tensor& count) {
    fold.first_skipped[part] =
        fold_running_stats(mean, var, step_mean, step_var, count, fold.momentum, flags.start_step);
  };
  if (flags.input_statistics == kInputSequence) {
    fold_part(0, fold.mean_ih, fold.var_ih, out.mean_ih, out.var_ih, counts.sum().reshape({1}));
  }
  if (folded_in_steps) return;
  if (flags.input_statistics == kInputStep) fold_part(0, fold.mean_ih, fold.var_ih, out.mean_ih, out.var_ih, counts);
  if (flags.normalize_recurrent) fold_part(1, fold.mean_hh, fold.var_hh, out.mean_hh, out.var_hh, counts);
  if (flags.normalize_cell) fold_part(2, fold.mean_c, fold.var_c, out.mean_c, out.var_c, counts);
}

}  // namespace

LayerForwardResult layer_forward(RecurrentForwardFn recurrent, MatmulFn matmul, StepsProjectInputFn steps_project_input,
                                 const LayerForwardInputs& in, bool recurrent_folds) {
  const at::Tensor& x = in.x;
  const LayerFlags& flags = in.flags;
  const LayerParameters& w = in.params;
  const RunningStatistics& running = in.running;
  TORCH_CHECK(x.dim() == 3, "x must be [T, B, I], got ", x.sizes());
  TORCH_CHECK(w.weight_hh.dim() == 2, "weight_hh must be [4H, H], got ", w.weight_hh.sizes());
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w.weight_hh.size(-1), G = 4 * H;
  const int64_t input_statistics = flags.input_statistics;
  const bool normalize_recurrent = flags.normalize_recurrent, normalize_cell = flags.normalize_cell;
  const bool training = flags.training;
  const bool normalize_input = input_statistics != kInputNone;
  check_tensor(in.h0, "h0", {B, H}, x);
  check_tensor(in.c0, "c0", {B, H}, x);
  check_tensor(w.weight_ih, "weight_ih", {G, I}, x);
  check_tensor(w.weight_hh, "weight_hh", {G, H}, x);
  check_lengths(in.lengths, x);
  if (w.bias.has_value()) check_tensor(*w.bias, "bias", {G}, x);
  check_optional(w.gamma_ih, normalize_input, "gamma_ih", {G}, x);
  check_optional(w.gamma_hh, normalize_recurrent, "gamma_hh", {G}, x);
  check_optional(w.gamma_c, normalize_cell, "gamma_c", {H}, x);
  check_optional(w.beta_c, normalize_cell, "beta_c", {H}, x);
  check_running(running.mean_ih, normalize_input && !training, "running_mean_ih", G, x);
  check_running(running.var_ih, normalize_input && !training, "running_var_ih", G, x);
  check_running(running.mean_hh, normalize_recurrent && !training, "running_mean_hh", G, x);
  check_running(running.var_hh, normalize_recurrent && !training, "running_var_hh", G, x);
  check_running(running.mean_c, normalize_cell && !training, "running_mean_c", H, x);
  check_running(running.var_c, normalize_cell && !training, "running_var_c", H, x);

  TORCH_CHECK(in.fold == nullptr || (training && x.is_cpu()),
              "folding the running statistics in the forward pass needs training on the CPU");
  // A recurrence that folds (recurrent_folds) does so into running statistics in the compute
  // dtype, contiguous (the module's buffers are); the rest is folded after it.
  const bool fold_in_steps = in.fold != nullptr && fold_targets_match(*in.fold, flags, x, H) && recurrent_folds;

  const OptTensor& lengths = in.lengths;
  const Prepared p = prepare(x, lengths, in.reverse);
  // Inference in evaluation returns no statistics (ops.cpp): nothing reads the running
  // statistics' rows there, and copying them is a visible part of a small call
  // (docs/CPU.md). The CPU kernels then leave them out (they read the running statistics
  // themselves); the CUDA kernels write each step's rows, and pass the input statistics to
  // the step kernel through them, so they still get buffers, which the call drops.
  const bool report_statistics = training || in.keep_reserve;
  const bool statistics_buffers = report_statistics || !x.is_cpu();
  // Every output is a tensor of its own (the schema promises no aliasing), so unused ones
  // are fresh empty tensors, never one shared.
  const auto empty_g = [&x, G] { return at::empty({0, G}, x.options()); };
  const auto empty_h = [&x, H] { return at::empty({0, H}, x.options()); };
  const auto as_input = [&x](const OptTensor& t) {
    return t->scalar_type() == x.scalar_type() ? t->contiguous() : t->to(x.scalar_type()).contiguous();
  };

  RecurrentForwardArgs args;
  // The input projection of all steps: one GEMM, which the step kernels normalize. Where
  // no step needs all of it first (sequence-wise batch statistics, taken over every step
  // before the first), a device that says so projects each step's input in the step
  // instead: the projection of a long sequence is written to memory and read back, a step's
  // stays in cache (docs/CPU.md). Where the backward reads it (it recomputes the normalized
  // input from it), the steps write it to out.projection.
  const bool project_in_steps = steps_project_input != nullptr && steps_project_input(T, B, I) &&
                                !(training && input_statistics == kInputSequence);
  if (project_in_steps) {
    args.x = p.x.contiguous();
    args.weight_ih = w.weight_ih.contiguous();
  } else {
    args.input_projection = pooled_empty({T, B, G}, x.options());
    at::Tensor projection_rows = args.input_projection.view({T * B, G});
    matmul(projection_rows, p.x.reshape({T * B, I}), w.weight_ih.t(), /*accumulate=*/false, flags);
  }
  args.active = p.active.contiguous();
  args.counts = p.counts.contiguous();
  args.weight_hh = w.weight_hh.contiguous();
  if (w.bias.has_value()) args.bias = w.bias->contiguous();
  if (normalize_input) args.gamma_ih = w.gamma_ih->contiguous();
  if (normalize_recurrent) args.gamma_hh = w.gamma_hh->contiguous();
  if (normalize_cell) {
    args.gamma_c = w.gamma_c->contiguous();
    args.beta_c = w.beta_c->contiguous();
  }

  RecurrentForwardOutputs out;
  out.mean_ih = empty_g();
  out.var_ih = empty_g();
  if (input_statistics == kInputStep) {
    if (statistics_buffers) {
      out.mean_ih = pooled_empty({T, G}, x.options());
      out.var_ih = pooled_empty({T, G}, x.options());
    }
    if (!training) {
      args.input_mean = as_input(running.mean_ih);
      args.input_var = as_input(running.var_ih);
    }
  } else if (input_statistics == kInputSequence) {
    // Sequence-wise statistics need every step before the first one runs.
    if (training) {
      const at::Tensor weight = p.weight().view({1, T * B, 1});
      std::tie(out.mean_ih, out.var_ih) =
          masked_moments(args.input_projection.view({1, T * B, G}), weight, weight.sum(1));
      args.input_mean = out.mean_ih.contiguous();
      args.input_var = out.var_ih.contiguous();
    } else {
      args.input_mean = as_input(running.mean_ih).narrow(0, 0, 1).contiguous();
      args.input_var = as_input(running.var_ih).narrow(0, 0, 1).contiguous();
      if (report_statistics) {  // copies: an operator's outputs may not alias its inputs
        out.mean_ih = args.input_mean.clone();
        out.var_ih = args.input_var.clone();
      }
    }
  }
  if (!training && normalize_recurrent) {
    args.running_mean_hh = as_input(running.mean_hh);
    args.running_var_hh = as_input(running.var_hh);
  }
  if (!training && normalize_cell) {
    args.running_mean_c = as_input(running.mean_c);
    args.running_var_c = as_input(running.var_c);
  }
  out.output = pooled_empty({T, B, H}, x.options());
  out.h = in.h0.contiguous().clone();
  out.c = in.c0.contiguous().clone();
  const bool recurrent_rows = normalize_recurrent && statistics_buffers, cell_rows = normalize_cell && statistics_buffers;
  out.mean_hh = recurrent_rows ? pooled_empty({T, G}, x.options()) : empty_g();
  out.var_hh = recurrent_rows ? pooled_empty({T, G}, x.options()) : empty_g();
  out.mean_c = cell_rows ? pooled_empty({T, H}, x.options()) : empty_h();
  out.var_c = cell_rows ? pooled_empty({T, H}, x.options()) : empty_h();
  const ReserveLayout layout(H, flags);
  if (in.keep_reserve) out.reserve = pooled_empty({T, B, layout.width}, x.options());
  if (in.keep_reserve && normalize_input && project_in_steps) out.projection = pooled_empty({T, B, G}, x.options());
  if (fold_in_steps) args.fold = in.fold;
  recurrent(args, out, flags);
  if (in.fold != nullptr) {
    fold_after_steps(*in.fold, flags, fold_in_steps, p.counts, out);
  }

  at::Tensor output = in.reverse ? reversed_output(out.output, lengths) : out.output;
  at::Tensor reserve = in.keep_reserve ? out.reserve : at::empty({0}, x.options());
  // The backward pass recomputes the normalized input from the projection.
  at::Tensor projection = !(in.keep_reserve && normalize_input) ? at::empty({0}, x.options())
                         : project_in_steps                      ? out.projection
                                                                 : args.input_projection;
  StepStatistics statistics{out.mean_ih, out.var_ih, out.mean_hh, out.var_hh, out.mean_c, out.var_c};
  // Unreported: empty tensors, the placeholders themselves where the steps wrote no rows.
  if (!report_statistics && statistics_buffers) {
    statistics = {empty_g(), empty_g(), empty_g(), empty_g(), empty_h(), empty_h()};
  }
  return {output, out.h, out.c, pack_statistics(std::move(statistics)), projection, reserve};
}

LayerBackwardResult layer_backward(RecurrentBackwardFn recurrent, MatmulFn matmul, bool weights_in_recurrence,
                                   const LayerBackwardInputs& in) {
  const at::Tensor& x = in.x;
  // The backward pass reads the statistics each step used, never a slot: flags.start_step is 0.
  const LayerFlags& flags = in.flags;
  const LayerParameters& w = in.params;
  const StepStatistics& stats = in.statistics;
  const at::Tensor &h0 = in.h0, &c0 = in.c0, &output = in.output, &projection = in.projection;
  const at::Tensor& reserve = in.reserve;
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w.weight_hh.size(-1), G = 4 * H;
  const int64_t input_statistics = flags.input_statistics;
  const bool normalize_recurrent = flags.normalize_recurrent, normalize_cell = flags.normalize_cell;
  const bool training = flags.training, reverse = in.reverse;
  const bool normalize_input = input_statistics != kInputNone;
  const ReserveLayout layout(H, flags);
  TORCH_CHECK(reserve.dim() == 3 && reserve.size(0) == T && reserve.size(1) == B && reserve.size(2) == layout.width,
              "reserve must be [", T, ", ", B, ", ", layout.width,
              "] from layer_forward(keep_reserve=True) with the same flags, got ", reserve.sizes());
  check_tensor(in.grad_output, "grad_output", {T, B, H}, x);
  check_tensor(in.grad_h_n, "grad_h_n", {B, H}, x);
  check_tensor(in.grad_c_n, "grad_c_n", {B, H}, x);
  check_lengths(in.lengths, x);
  check_tensor(h0, "h0", {B, H}, x);
  check_tensor(c0, "c0", {B, H}, x);
  check_tensor(output, "output", {T, B, H}, x);
  if (normalize_input) check_tensor(projection, "projection", {T, B, G}, x);
  check_tensor(w.weight_ih, "weight_ih", {G, I}, x);
  check_tensor(w.weight_hh, "weight_hh", {G, H}, x);
  check_optional(w.gamma_ih, normalize_input, "gamma_ih", {G}, x);
  check_optional(w.gamma_hh, normalize_recurrent, "gamma_hh", {G}, x);
  check_optional(w.gamma_c, normalize_cell, "gamma_c", {H}, x);
  check_optional(w.beta_c, normalize_cell, "beta_c", {H}, x);

  const OptTensor& lengths = in.lengths;
  const Prepared p = prepare(x, lengths, reverse);
  const bool step_input = input_statistics == kInputStep;
  RecurrentBackwardArgs args;
  args.grad_output = (reverse ? reversed_copy(in.grad_output, lengths) : in.grad_output).contiguous();
  args.active = p.active.contiguous();
  args.counts = p.counts.contiguous();
  args.weight_hh = w.weight_hh.contiguous();
  if (normalize_input) args.gamma_ih = w.gamma_ih->contiguous();
  if (normalize_recurrent) args.gamma_hh = w.gamma_hh->contiguous();
  if (normalize_cell) {
    args.gamma_c = w.gamma_c->contiguous();
    args.beta_c = w.beta_c->contiguous();
  }
  args.c0 = c0.contiguous();
  if (normalize_input) args.projection = projection.contiguous();
  args.mean_ih = stats.mean_ih.contiguous();
  args.var_ih = stats.var_ih.contiguous();
  args.mean_c = stats.mean_c.contiguous();
  args.var_hh = stats.var_hh.contiguous();
  args.var_c = stats.var_c.contiguous();
  args.reserve = reserve.contiguous();

  RecurrentBackwardOutputs out;
  const auto empty = [&x] { return at::empty({0}, x.options()); };
  out.grad_h = in.grad_h_n.contiguous().clone();
  out.grad_c = in.grad_c_n.contiguous().clone();
  // h_{t-1} is h_0 at the first step and the previous step's output after it (padded rows
  // differ, but their gradient is zero).
  const at::Tensor output_ordered = (reverse ? reversed_copy(output, lengths) : output).contiguous();
  // Which weight gradients the device kernel accumulates during the recurrence (all but
  // grad_weight_ih with sequence-wise statistics, whose grad_wx needs sums over all steps).
  const bool kernel_weight_hh = weights_in_recurrence;
  const bool kernel_weight_ih = weights_in_recurrence && input_statistics != kInputSequence;
  if (kernel_weight_hh) {
    out.grad_weight_hh = at::empty({G, H}, x.options());
    args.h0 = h0.contiguous();
    args.output = output_ordered;
  }
  if (kernel_weight_ih) {
    out.grad_weight_ih = at::empty({G, I}, x.options());
    args.x = p.x.contiguous();
  }
  // The [T, B, 4H] gradients the host reads after the recurrence: grad_zh for grad_weight_hh,
  // grad_wx for grad_weight_ih and grad_x, grad_gates for sequence-wise statistics (and where
  // one of the others is it). Otherwise the device kernel keeps each step's in scratch of its own.
  // A kernel that accumulates grad_weight_ih gives grad_x from the same steps' gradients.
  const bool kernel_grad_x = kernel_weight_ih && in.input_grad;
  if (kernel_grad_x) {
    out.grad_x = pooled_empty({T, B, I}, x.options());
    args.weight_ih = w.weight_ih.contiguous();
  }
  const bool need_zh = !kernel_weight_hh;
  const bool need_wx = (in.input_grad && !kernel_grad_x) || !kernel_weight_ih;
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
    const at::Tensor rstd = (stats.var_ih + flags.eps).rsqrt();  // [1, 4H]
    const at::Tensor xhat = (projection - stats.mean_ih) * rstd;
    const at::Tensor scale = rstd * *w.gamma_ih;
    if (training) {
      const at::Tensor count = p.counts.sum().clamp_min(1).to(x.scalar_type());
      grad_wx = (out.grad_gates - out.grad_bias / count - xhat * (out.grad_gamma_ih / count)) * p.weight() * scale;
    } else {
      grad_wx = out.grad_gates * scale;
    }
  }

  // Weight gradients the kernel did not accumulate, and the input gradient, as large GEMMs
  // over all steps.
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
    const at::Tensor h_prev = output_ordered.narrow(0, 0, T - 1);
    grad_weight_hh = weight_gradient({{out.grad_zh[0], h0},
                                      {out.grad_zh.narrow(0, 1, T - 1).reshape({(T - 1) * B, G}),
                                       h_prev.reshape({(T - 1) * B, H})}},
                                     G, H);
  }
  if (!kernel_weight_ih) {
    grad_weight_ih = weight_gradient({{grad_wx.reshape({T * B, G}), p.x.reshape({T * B, I})}}, G, I);
  }
  at::Tensor grad_x = at::empty({0}, x.options());
  if (in.input_grad) {
    at::Tensor grad_x_ordered = out.grad_x;
    if (!kernel_grad_x) {
      grad_x_ordered = pooled_empty({T, B, I}, x.options());
      matmul(grad_x_ordered.view({T * B, I}), grad_wx.reshape({T * B, G}), w.weight_ih, /*accumulate=*/false, flags);
    }
    grad_x = reverse ? reversed_output(grad_x_ordered, lengths) : grad_x_ordered;
  }
  at::Tensor grad_bias = w.bias.has_value() ? out.grad_bias : empty();
  return {grad_x, out.grad_h, out.grad_c,
          {grad_weight_ih, grad_weight_hh, grad_bias, out.grad_gamma_ih, out.grad_gamma_hh, out.grad_gamma_c,
           out.grad_beta_c}};
}

// The CPU backward accumulates the weight gradients itself (recurrent_cpu.cpp). The CUDA
// emulation (tests/run_cuda_emulation.py) registers the CUDA kernels here, which do not.
#ifdef BNLSTM_CUDA_KERNELS_ON_CPU
constexpr bool kCpuWeightsInRecurrence = false;
constexpr StepsProjectInputFn kCpuStepsProjectInput = nullptr;
constexpr bool kCpuRecurrenceFolds = false;
#else
constexpr bool kCpuWeightsInRecurrence = true;
constexpr StepsProjectInputFn kCpuStepsProjectInput = cpu_steps_project_input;
constexpr bool kCpuRecurrenceFolds = true;
#endif

LayerForwardResult layer_forward_cpu(const LayerForwardInputs& in) {
  return layer_forward(recurrent_forward_cpu, matmul_cpu, kCpuStepsProjectInput, in, kCpuRecurrenceFolds);
}

TORCH_LIBRARY_IMPL(bnlstm, CPU, m) {
  m.impl("layer_forward", bind_layer_forward<recurrent_forward_cpu, matmul_cpu, kCpuStepsProjectInput>);
  m.impl("layer_backward", bind_layer_backward<recurrent_backward_cpu, matmul_cpu, kCpuWeightsInRecurrence>);
}

}  // namespace bnlstm
