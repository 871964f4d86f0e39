// One step's running-statistics fold on the CPU, shared by the fold operators
// (running_stats.cpp) and the training forward that folds as it goes (recurrent_cpu.cpp):
// the same arithmetic in both, so either gives the same running statistics to the bit.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace bnlstm {

// One step's fold into its slot, feature by feature: slot = keep * slot + take * step, with
// the variance unbiased. A non-finite statistic (an inf or NaN in the batch) would stay in
// the average for good: that feature keeps its running value. Returns whether any did.
template <typename scalar_t>
bool fold_step(scalar_t* slot_mean, scalar_t* slot_var, const scalar_t* step_mean, const scalar_t* step_var,
               int64_t features, scalar_t keep, scalar_t take, scalar_t unbias) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec largest(std::numeric_limits<scalar_t>::max());
  Vec all_finite(scalar_t(0));
  all_finite = all_finite == all_finite;  // every bit set: the masks below are too, where true
  for (int64_t f = 0; f < features; f += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), features - f);  // lanes past n load as 0, finite
    const Vec mean = Vec::loadu(step_mean + f, n), unbiased = Vec::loadu(step_var + f, n) * Vec(unbias);
    // |x| <= max is false for inf and NaN: std::isfinite, lane by lane.
    const Vec finite = (mean.abs() <= largest) & (unbiased.abs() <= largest);
    const Vec old_mean = Vec::loadu(slot_mean + f, n), old_var = Vec::loadu(slot_var + f, n);
    Vec::blendv(old_mean, old_mean * Vec(keep) + mean * Vec(take), finite).store(slot_mean + f, n);
    Vec::blendv(old_var, old_var * Vec(keep) + unbiased * Vec(take), finite).store(slot_var + f, n);
    all_finite = all_finite & finite;
  }
  return all_finite.zero_mask() != 0;
}

// The factor that makes a biased variance over `count` rows unbiased, as the fold takes it.
template <typename scalar_t>
scalar_t unbiasing_factor(double count) {
  return scalar_t(count / (count - 1));
}

// Marks a tensor the fold updates in place as changed, as torch's in-place operations do:
// a graph that saved it before refuses to backward instead of using the new values. (An
// inference tensor has no version; outside torch.inference_mode this refuses the update,
// as torch does.) Whatever writes running statistics marks them: fold_running_stats, and
// the recurrence's fold as it goes (recurrent_cpu.cpp, StepFold).
inline void mark_updated_in_place(const at::Tensor& t) {
  if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
}

// Step t of mean, var [N, F] (biased) with count[t] active rows updates slot
// min(start_step + t, S - 1) of running_mean, running_var [S, F] in order, with the unbiased
// variance, unless count[t] < 2; a feature whose mean or variance is not finite is skipped.
// Marks both as changed (mark_updated_in_place). Returns the first step t that had such a
// feature (-1: none), so the caller can warn without scanning the statistics again.
// (running_stats.cpp)
int64_t fold_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                           const at::Tensor& var, const at::Tensor& count, double momentum, int64_t start_step);

}  // namespace bnlstm
