// The running-statistics update of a training step on the CPU, as one operator: the same
// fold as bnlstm_cuda/statistics.py's vectorised one (which GPUs use), walked step by step.
// In Python that fold is some twenty small tensor operations per normalized part, about a
// quarter of a millisecond each time, several percent of a small layer's training step.
#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "running_fold.h"

namespace bnlstm {

int64_t fold_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                           const at::Tensor& var, const at::Tensor& count, double momentum, int64_t start_step) {
  TORCH_CHECK(running_mean.dim() == 2 && running_mean.size(0) >= 1,
              "running_mean must be [S >= 1, F], got ", running_mean.sizes());
  const int64_t slots = running_mean.size(0), features = running_mean.size(1);
  TORCH_CHECK(running_var.sizes() == running_mean.sizes() && running_var.scalar_type() == running_mean.scalar_type(),
              "running_var must match running_mean (", running_mean.sizes(), " ", running_mean.scalar_type(),
              "), got ", running_var.sizes(), " ", running_var.scalar_type());
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(),
              "running_mean and running_var must be contiguous (they are updated in place)");
  TORCH_CHECK(mean.dim() == 2 && mean.size(1) == features, "mean must be [N, ", features, "], got ", mean.sizes());
  const int64_t steps = mean.size(0);
  TORCH_CHECK(var.sizes() == mean.sizes(), "var must have shape ", mean.sizes(), ", got ", var.sizes());
  TORCH_CHECK(count.dim() == 1 && count.size(0) == steps, "count must be [", steps, "], got ", count.sizes());
  TORCH_CHECK(start_step >= 0, "start_step must be >= 0, got ", start_step);
  mark_updated_in_place(running_mean);
  mark_updated_in_place(running_var);
  // Converted only where needed: each conversion is an allocation, three parts a call.
  const auto as_running = [&](const at::Tensor& t) {
    return t.scalar_type() == running_mean.scalar_type() ? t.contiguous() : t.to(running_mean.scalar_type()).contiguous();
  };
  const at::Tensor batch_mean = as_running(mean), batch_var = as_running(var);
  // The counts as they come (the statistics' dtype: float32 or float64), else converted.
  const at::ScalarType count_type = count.scalar_type();
  const at::Tensor count_values = count_type == at::kFloat || count_type == at::kDouble
                                      ? count.contiguous() : count.to(at::kDouble).contiguous();
  std::vector<double> n(steps);
  AT_DISPATCH_FLOATING_TYPES(count_values.scalar_type(), "bnlstm_fold_counts", [&] {
    std::copy_n(count_values.data_ptr<scalar_t>(), steps, n.begin());
  });
  int64_t first_skipped = -1;
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "bnlstm_update_running_stats", [&] {
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    const scalar_t* m = batch_mean.data_ptr<scalar_t>();
    const scalar_t* v = batch_var.data_ptr<scalar_t>();
    const scalar_t keep = scalar_t(1 - momentum), take = scalar_t(momentum);
    for (int64_t t = 0; t < steps; ++t) {
      if (!(n[t] >= 2)) continue;
      const int64_t slot = std::min(start_step + t, slots - 1);
      const bool skipped = fold_step(rm + slot * features, rv + slot * features, m + t * features,
                                     v + t * features, features, keep, take, unbiasing_factor<scalar_t>(n[t]));
      if (skipped && first_skipped < 0) first_skipped = t;
    }
  });
  return first_skipped;
}

namespace {

at::Tensor update_running_stats_cpu(at::Tensor running_mean, at::Tensor running_var, const at::Tensor& mean,
                                    const at::Tensor& var, const at::Tensor& count, double momentum,
                                    int64_t start_step) {
  return at::scalar_tensor(fold_running_stats(running_mean, running_var, mean, var, count, momentum, start_step),
                           at::kLong);
}

// update_running_stats_cpu for each part: one operator call for a layer-direction instead of
// one per part (each call costs the dispatcher and Python more than the fold itself).
at::Tensor update_running_stats_parts_cpu(at::TensorList running_means, at::TensorList running_vars,
                                          at::TensorList means, at::TensorList vars, at::TensorList counts,
                                          double momentum, int64_t start_step) {
  const size_t parts = running_means.size();
  TORCH_CHECK(running_vars.size() == parts && means.size() == parts && vars.size() == parts && counts.size() == parts,
              "running_means, running_vars, means, vars and counts must be lists of the same length (one entry per "
              "part), got ", parts, ", ", running_vars.size(), ", ", means.size(), ", ", vars.size(), " and ",
              counts.size());
  at::Tensor skipped = at::empty({static_cast<int64_t>(parts)}, at::kLong);
  int64_t* first = skipped.data_ptr<int64_t>();
  for (size_t i = 0; i < parts; ++i) {
    first[i] = fold_running_stats(running_means[i], running_vars[i], means[i], vars[i], counts[i], momentum,
                                  start_step);
  }
  return skipped;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnlstm, CPU, m) {
  m.impl("update_running_stats", update_running_stats_cpu);
  m.impl("update_running_stats_parts", update_running_stats_parts_cpu);
}

}  // namespace bnlstm
