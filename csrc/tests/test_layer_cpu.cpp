// C++ unit test of the CPU layer operators through the dispatcher (no Python): the "none"
// variant against an LSTM written with ATen, and padded steps.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <tuple>
#include <vector>

#include "expect.h"

namespace {

using bnlstm_test::expect;
using bnlstm_test::failures;

using ForwardOp = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, at::TensorList,
    at::TensorList, int64_t, bool, bool, bool, double, bool, bool, int64_t, c10::optional<at::ScalarType>);

}  // namespace

int main() {
  at::manual_seed(0);
  const int64_t T = 6, B = 3, I = 4, H = 5;
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({T, B, I}, options), h0 = at::randn({B, H}, options), c0 = at::randn({B, H}, options);
  const at::Tensor w_ih = at::randn({4 * H, I}, options), w_hh = at::randn({4 * H, H}, options);
  const at::Tensor bias = at::randn({4 * H}, options);
  const at::Tensor lengths = at::tensor({6, 2, 4}, at::kLong);
  const at::Tensor absent = at::empty({0}, options);

  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnlstm::layer_forward", "").typed<ForwardOp>();
  const std::vector<at::Tensor> params{w_ih, w_hh, bias, absent, absent, absent, absent};
  const std::vector<at::Tensor> running(6, absent);
  const auto out = op.call(x, h0, c0, lengths, params, running, /*input_statistics=*/0, false, false,
                           /*training=*/true, 1e-5, /*reverse=*/false, /*keep_reserve=*/true, /*start_step=*/0,
                           /*operand_dtype=*/c10::nullopt);
  const at::Tensor output = std::get<0>(out), h_n = std::get<1>(out);

  // The plain LSTM, sequence by sequence, with ATen.
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor h = h0[b], c = c0[b];
    const int64_t length = lengths[b].item<int64_t>();
    for (int64_t t = 0; t < length; ++t) {
      const auto gates = (at::mv(w_ih, x[t][b]) + at::mv(w_hh, h) + bias).chunk(4);
      c = at::sigmoid(gates[1]) * c + at::sigmoid(gates[0]) * at::tanh(gates[2]);
      h = at::sigmoid(gates[3]) * at::tanh(c);
      expect(at::allclose(output[t][b], h, 1e-10, 1e-10), "output equals the ATen LSTM");
    }
    for (int64_t t = length; t < T; ++t) expect(output[t][b].abs().max().item<double>() == 0.0, "padded output is 0");
    expect(at::allclose(h_n[b], h, 1e-10, 1e-10), "h_n is the state at the last valid step");
  }
  expect(std::get<5>(out).size(0) == T && std::get<5>(out).size(1) == B, "reserve kept for backward");

  if (failures == 0) std::printf("test_layer_cpu: all checks passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
