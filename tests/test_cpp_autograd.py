"""The C++ pairs' autograd node (bnlstm::layer and bnlstm::bidirectional,
csrc/layer_autograd.cpp), which the module's eager calls that record a graph take: the same
outputs and gradients, bit for bit, as the pair's forward operator under the formula
torch.library registers for it (bnlstm_cuda/ops.py, what torch.compile traces), with and
without the input's gradient and with an output left out of the loss. The module's tests
against the float64 reference (test_backend_behaviours.py) run through the node too."""
import pytest
import torch

from helpers import make_module, op_arguments, scalar_loss
from test_cpu_bidirectional import bidirectional_arguments

VARIANTS = ["cooijmans", "laurent_step", "laurent_sequence", "none"]

pytestmark = pytest.mark.usefixtures("cpu_extension")


def _gradients(call, x, h0, c0, params, rest, input_grad: bool, weights):
    """(output, h_n, statistics, gradients of x (if input_grad), h0, c0 and the present
    parameters) of `call`(x, h0, c0, lengths, params, ...) under a loss over output and h_n
    (c_n left out: its gradient reaches the node undefined)."""
    x = x.detach().requires_grad_(input_grad)
    h0, c0 = h0.detach().requires_grad_(), c0.detach().requires_grad_()
    params = [p.detach().requires_grad_(p.numel() > 0) for p in params]
    output, h_n, _c_n, statistics = call(x, h0, c0, rest[0], params, *rest[1:])[:4]
    loss = (output * weights[0]).sum() + (h_n * weights[1]).sum()
    inputs = ([x] if input_grad else []) + [h0, c0] + [p for p in params if p.numel()]
    return [output, h_n, *statistics], torch.autograd.grad(loss, inputs)


def _assert_same(first, second):
    """first, second: _gradients' results."""
    (values_a, grads_a), (values_b, grads_b) = first, second
    assert len(grads_a) == len(grads_b)
    for a, b in zip([*values_a, *grads_a], [*values_b, *grads_b]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["grad_x", "no_grad_x"])
def test_layer_node_matches_the_registered_formula(variant, training, input_grad):
    torch.manual_seed(3)
    a = op_arguments(variant, training, reverse=training, T=5, B=3, I=3, H=6)
    start_step, operand_dtype = 1, None
    node_rest = (a.lengths, a.running, a.input_statistics, a.normalize_recurrent, a.normalize_cell, a.training,
                 a.eps, a.reverse, start_step, operand_dtype)
    registered_rest = (*node_rest[:8], True, start_step, operand_dtype)  # keep_reserve
    weights = (torch.randn(5, 3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))
    node = _gradients(torch.ops.bnlstm.layer, a.x, a.h0, a.c0, a.params, node_rest, input_grad, weights)
    registered = _gradients(torch.ops.bnlstm.layer_forward, a.x, a.h0, a.c0, a.params, registered_rest, input_grad,
                            weights)
    _assert_same(node, registered)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bidirectional_node_matches_the_registered_formula(variant, training):
    torch.manual_seed(4)
    arguments, _, _ = bidirectional_arguments(variant, training, T=5, B=4, I=3, H=6)
    x, h0, c0, lengths, params, running, *flags = arguments
    flags = flags[:5]  # input_statistics to eps (keep_reserve last)
    weights = (torch.randn(5, 4, 12, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64))
    for input_grad in (True, False):
        node = _gradients(torch.ops.bnlstm.bidirectional, x, h0, c0, params, (lengths, running, *flags), input_grad,
                          weights)
        registered = _gradients(torch.ops.bnlstm.bidirectional_forward, x, h0, c0, params,
                                (lengths, running, *flags, True), input_grad, weights)
        _assert_same(node, registered)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["one_direction", "bidirectional"])
def test_module_training_records_the_cpp_node(bidirectional):
    """An eager training call of the module records the C++ node, one per layer, and its
    backward reaches every parameter."""
    module = make_module("cooijmans", input_size=3, hidden_size=5, num_layers=2, bidirectional=bidirectional,
                         backend="cpu")
    out, (h_n, c_n) = module(torch.randn(4, 3, 3, dtype=torch.float64))
    assert type(out.grad_fn).__name__ == "CppFunction"
    scalar_loss(out, h_n, c_n).backward()
    assert all(p.grad is not None for p in module.parameters())
