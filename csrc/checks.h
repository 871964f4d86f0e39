// Argument checks at the operator boundary. The Python module validates user input with
// friendlier messages first (bnlstm_cuda/validation.py); these guard direct op calls.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace bnlstm {

inline void check_tensor(const at::Tensor& t, const char* name, std::vector<int64_t> shape,
                         const at::Tensor& like) {
  TORCH_CHECK(t.defined(), name, " is required");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " must have shape ", at::IntArrayRef(shape),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

// An optional tensor that must be present exactly when `needed`.
inline void check_optional(const c10::optional<at::Tensor>& t, bool needed, const char* name,
                           std::vector<int64_t> shape, const at::Tensor& like) {
  if (!needed) return;
  TORCH_CHECK(t.has_value() && t->defined(), name, " is required by this variant and mode");
  check_tensor(*t, name, shape, like);
}

// Running statistics: [S, F] with S >= 1, any dtype convertible, on the input's device.
inline void check_running(const c10::optional<at::Tensor>& t, bool needed, const char* name,
                          int64_t features, const at::Tensor& like) {
  if (!needed) return;
  TORCH_CHECK(t.has_value() && t->defined(), name, " is required in evaluation by this variant");
  TORCH_CHECK(t->dim() == 2 && t->size(0) >= 1 && t->size(1) == features, name,
              " must have shape [S >= 1, ", features, "], got ", t->sizes());
  TORCH_CHECK(t->device() == like.device(), name, " must be on ", like.device(), ", got ", t->device());
}

}  // namespace bnlstm
