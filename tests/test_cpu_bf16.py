"""The CPU backend's bfloat16 products (csrc/bf16_gemm.cpp): on a CPU with AVX512_BF16 and
the AVX-512 build, a layer called with operand_dtype=bfloat16 (what bfloat16 inputs pass)
multiplies every GEMM in bfloat16 operands with float32 accumulation: the input projection,
the recurrent product (h_{t-1} and W_hh rounded at every step, as the CUDA kernels do), and
in the backward pass the per-step product, the weight gradients and grad_x.

The kernel is checked against float64 products of the rounded operands over odd shapes,
every operand layout and accumulation; the forward pass against the same operator run step
by step on operands rounded beforehand (what the fused call computes, up to the order of its
sums); the backward pass against its float32 self within bfloat16's rounding.
"""
import copy
import math

import pytest
import torch
from torch import nn

import helpers
from bnlstm_cuda import BNLSTM, build

pytestmark = pytest.mark.usefixtures("cpu_extension")


def bf16_kernels():
    return torch.ops.bnlstm.cpu_bf16_available()


@pytest.fixture
def bf16_products(cpu_extension):
    if not bf16_kernels():
        pytest.skip("needs a CPU with AVX512_BF16 and the AVX-512 build")


requires_bf16 = pytest.mark.usefixtures("bf16_products")


def test_bf16_kernels_run_where_the_cpu_has_them():
    """Available exactly on the AVX-512 build on a CPU that torch finds AVX512_BF16 on."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is None:
        pytest.skip("this torch has no AVX512_BF16 probe")
    assert bf16_kernels() == (build.cpu_capability() == "avx512" and probe())


def rounded(t):
    return t.to(torch.bfloat16).double()


@requires_bf16
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("a_transposed,b_transposed", [(False, False), (True, False), (False, True), (True, True)])
# M: row remainders of 4-row blocks, one and several 64-row chunks (split over threads);
# K: odd (a zero pads the last pair), 1, over a vector; N: partial panels of 32, under 16.
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (3, 7, 5), (6, 33, 17), (37, 64, 96), (130, 129, 31), (257, 20, 70)])
def test_product_is_the_float64_product_of_rounded_operands(M, K, N, a_transposed, b_transposed, accumulate):
    a = torch.randn(K, M).t() if a_transposed else torch.randn(M, K)
    b = torch.randn(N, K).t() if b_transposed else torch.randn(K, N)
    c = torch.randn(M, N)
    got = torch.ops.bnlstm.cpu_bf16_addmm(c, a, b, accumulate)
    want = rounded(a) @ rounded(b) + (c.double() if accumulate else 0)
    # float32 accumulation of exact products: K roundings of the partial sums at most.
    scale = rounded(a).abs() @ rounded(b).abs() + (c.double().abs() if accumulate else 0)
    assert ((got.double() - want).abs() <= 2 * K * 2 ** -24 * scale + 1e-30).all()
    # The rounding to bfloat16 is visible against float32 operands.
    if K > 1:
        assert not torch.allclose(got.double(), a.double() @ b.double() + (c.double() if accumulate else 0),
                                  rtol=1e-5, atol=1e-5)


@requires_bf16
def test_product_refuses_mismatched_shapes():
    with pytest.raises(RuntimeError, match=r"bf16_matmul: shapes \[3, 4\] = \[3, 5\] @ \[5, 2\] do not match"):
        torch.ops.bnlstm.cpu_bf16_addmm(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(5, 2), False)


def bf16_arguments(variant, training, B, H, T=5, I=6):
    """Float32 operator arguments holding what bfloat16 inputs bring: x and W_ih bfloat16
    values, W_hh at the usual scale (gates of order 1), ragged lengths."""
    args = helpers.op_arguments(variant, training, reverse=False, T=T, B=B, I=I, H=H, dtype=torch.float32)
    params = [p.detach() for p in args.params]
    params[0] = params[0].to(torch.bfloat16).float()
    params[1] = params[1] * H ** -0.5
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T  # every step has an active row
    return args._replace(x=args.x.detach().to(torch.bfloat16).float(), h0=args.h0.detach(), c0=args.c0.detach(),
                         lengths=lengths, params=params)


RESULT_NAMES = ("output", "h_n", "c_n", "mean_ih", "var_ih", "mean_hh", "var_hh", "mean_c", "var_c")


def rms(d):
    return d.double().pow(2).mean().sqrt().item() if d.numel() else 0.0


@requires_bf16
@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("variant,training", [("cooijmans", True), ("cooijmans", False), ("laurent_step", True),
                                              ("laurent_sequence", False), ("none", True)])
# B = 1, 5 and 70: single rows, row remainders, more than one 64-row chunk; H = 37: odd K
# and partial panels; H = 150: two hidden-unit blocks at two threads.
@pytest.mark.parametrize("B,H", [(1, 37), (5, 37), (70, 24), (4, 150)])
def test_forward_rounds_h_and_weights_at_every_step(variant, training, B, H, thread_count, threads):
    """The whole sequence matches the step-by-step calls on rounded operands, in the
    root-mean-square difference of every result at most 5% of the unrounded call's (not
    elementwise: a float32 difference in the order of the sums can flip how one h value
    rounds, which then moves its row), and the rounding is visible."""
    args = bf16_arguments(variant, training, B, H)
    threads(thread_count)
    with torch.no_grad():
        got = torch.ops.bnlstm.layer_forward(*args._replace(operand_dtype=torch.bfloat16))
        want = helpers.run_op_step_by_step(args, torch.bfloat16)
        unrounded = torch.ops.bnlstm.layer_forward(*args)
    flat = lambda result: (*result[:3], *result[3])
    for name, g, w, u in zip(RESULT_NAMES, flat(got), want, flat(unrounded)):
        w = w[:g.shape[0]]  # sequence-wise input statistics: one row, the same at every step
        assert g.shape == w.shape, name
        assert rms(g - w) <= 0.05 * rms(u - w) + 1e-6, (name, rms(g - w), rms(u - w))
    # The rounding is visible in the output, but where batch statistics over one row make
    # every normalized value its shift (beta), whatever h_{t-1} was.
    if not (B == 1 and training and variant != "none"):
        assert rms(unrounded[0] - want[0]) > 1e-5


@requires_bf16
@pytest.mark.parametrize("thread_count", [1, 2])
@pytest.mark.parametrize("variant", ["cooijmans", "laurent_step", "laurent_sequence", "none"])
# T = 1: the step product's rounding reaches only grad_h0, so each weight gradient and grad_x
# shows its own product's.
@pytest.mark.parametrize("T", [1, 7])
def test_backward_products_in_bf16(variant, T, thread_count, threads):
    """With operand_dtype=bfloat16 every gradient is its float32 self within bfloat16's
    rounding of one operand of each product (2^-9 relative, partly cancelling), and the
    gradients whose products take a float32 gradient operand show that rounding."""
    args = bf16_arguments(variant, True, B=6, H=37, T=T)
    backward_args, _ = helpers.op_backward_arguments(args._replace(operand_dtype=torch.bfloat16))
    threads(thread_count)
    got = torch.ops.bnlstm.layer_backward(*backward_args[:-1], torch.bfloat16)
    want = torch.ops.bnlstm.layer_backward(*backward_args[:-1], None)
    visible = ("grad_x", "grad_weight_ih", "grad_weight_hh", "grad_h0")
    helpers.assert_backward_within_rounding(got, want, visible)


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def bf16_module_error_ratios(variant, seeds=5):
    """For each seed, the relative error of a bfloat16 BNLSTM (backend="cpu") against its
    float32 self over that of a bfloat16 nn.LSTM against its float32 self, on the same
    weights and input (with variant "none" the same function)."""
    ratios = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        lstm = nn.LSTM(16, 32)
        core = BNLSTM.from_lstm(lstm, variant=variant, backend="cpu")
        x = torch.randn(20, 8, 16).to(torch.bfloat16)
        errors = []
        for module in (core, lstm):
            want = module(x.float())[0]
            got = copy.deepcopy(module).to(torch.bfloat16)(x)[0]
            assert got.dtype == torch.bfloat16
            errors.append(relative_error(got, want))
        ratios.append(errors[0] / errors[1])
    return ratios


@requires_bf16
@pytest.mark.parametrize("variant", ["none", "cooijmans"])
def test_bf16_module_error_is_at_most_twice_nn_lstms(variant):
    """A bfloat16 module, multiplying in bfloat16: its error against float32 is at most
    twice nn.LSTM's in bfloat16 (geometric mean over seeds, so no single draw decides)."""
    ratios = bf16_module_error_ratios(variant)
    assert math.exp(sum(math.log(r) for r in ratios) / len(ratios)) <= 2.0, ratios


def assert_parameters_as_without_the_casts(layer, cast):
    """layer ran with the float32 input and weights uncast, cast with the casts: each weight's
    gradient is cast's before its rounding to bfloat16 (and no cast rounded it), the other
    parameters' gradients and every buffer are equal."""
    for (name, g), (_, w) in zip(layer.named_parameters(), cast.named_parameters()):
        if name.startswith("weight_"):
            assert torch.equal(w.grad, g.grad.bfloat16().float()), name
            assert not torch.equal(g.grad, g.grad.bfloat16().float()), name  # no cast rounded it
        else:
            assert torch.equal(w.grad, g.grad), name
    for (name, g), (_, w) in zip(layer.named_buffers(), cast.named_buffers()):
        assert torch.equal(g, w), name


@requires_bf16
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-direction", "bidirectional"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_passes_the_input_and_weights_uncast(bidirectional, training, monkeypatch):
    """Under bf16 autocast the module hands the CPU operators the float32 input and weights
    with operand_dtype=bfloat16 (they round them as the casts would), instead of casting
    them to bfloat16 and back. Against the module with the casts (as where the CPU cannot
    round them, but multiplying in bfloat16 all the same): outputs, final states and running
    statistics equal bit for bit; the gradients of the weights and of the input are the same
    ones without the casts' rounding to bfloat16 on their way back, the others equal. Two
    layers, odd sizes, a padded batch and a float32 state given."""
    from bnlstm_cuda import ops

    torch.manual_seed(11)
    module = BNLSTM(7, 19, num_layers=2, bidirectional=bidirectional, max_length=5, backend="cpu").train(training)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(torch.rand_like(buffer) + 0.5 if "var" in name else torch.randn_like(buffer))
    cast = copy.deepcopy(module)
    states = 2 * (2 if bidirectional else 1)
    x = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(6, 5, 7), torch.tensor([6, 6, 4, 3, 1]))
    hx = torch.randn(states, 5, 19), torch.randn(states, 5, 19)

    def run(layer):
        inputs = x.data.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, (h_n, c_n) = layer(x._replace(data=inputs), hx)
        (output.data.float().square().sum() + h_n.float().sum() + c_n.float().sum()).backward()
        return output.data, h_n, c_n, inputs.grad

    got = run(module)
    monkeypatch.setattr(ops, "_cpu_bf16", False)  # the module casts; the operators still multiply in bf16
    want = run(cast)
    for name, g, w in zip(("output", "h_n", "c_n"), got[:3], want[:3]):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w), name
    assert torch.equal(want[3], got[3].bfloat16().float()), "grad_x"
    assert_parameters_as_without_the_casts(module, cast)


@requires_bf16
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cell_under_autocast_passes_the_input_and_weights_uncast(training, monkeypatch):
    """BNLSTMCell takes the same shortcut as BNLSTM under bf16 autocast: against the cell with
    the casts, h_1, c_1 and the running statistics equal bit for bit, the input's and the
    weights' gradients are the same without the casts' rounding, the others equal. Two steps,
    the second (the one differentiated) with a row masked out and the first's state given
    in float32; odd sizes."""
    from bnlstm_cuda import BNLSTMCell, ops

    torch.manual_seed(12)
    cell = BNLSTMCell(7, 19, max_length=3, backend="cpu").train(training)
    with torch.no_grad():
        for name, buffer in cell.named_buffers():
            buffer.copy_(torch.rand_like(buffer) + 0.5 if "var" in name else torch.randn_like(buffer))
    cast = copy.deepcopy(cell)
    x = torch.randn(2, 5, 7)
    mask = torch.tensor([True, True, False, True, True])

    def run(layer):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():  # one call's gradients: the casts round each call's on its own
                h, c = layer(inputs[0])
            h, c = layer(inputs[1], (h.float(), c.float()), step=1, mask=mask)
        (h.float().square().sum() + c.float().sum()).backward()
        return h, c, inputs.grad

    got = run(cell)
    monkeypatch.setattr(ops, "_cpu_bf16", False)  # the cell casts; the operators still multiply in bf16
    want = run(cast)
    for name, g, w in zip(("h_1", "c_1"), got[:2], want[:2]):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w), name
    assert torch.equal(want[2], got[2].bfloat16().float()), "grad of the input"
    assert_parameters_as_without_the_casts(cell, cast)
