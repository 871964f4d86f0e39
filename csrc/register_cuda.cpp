// CUDA registration of the layer operators: layer.cpp's host code (ATen only) around the
// CUDA recurrent kernels (recurrent_cuda.cu). Compiled only into the CUDA-enabled
// extension, which also holds ops.cpp's schemas and the CPU parts (bnlstm_cuda/build.py).
#include <torch/library.h>

#include "bnlstm.h"
#include "layer_ops.h"

namespace bnlstm {

TORCH_LIBRARY_IMPL(bnlstm, CUDA, m) {
  m.impl("layer_forward", bind_layer_forward<recurrent_forward_cuda, matmul_cuda>);
  m.impl("layer_backward", bind_layer_backward<recurrent_backward_cuda, matmul_cuda>);
}

}  // namespace bnlstm
