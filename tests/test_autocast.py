"""BNLSTM and BNLSTMCell under torch.autocast, as nn.LSTM runs there.

Under an enabled autocast for the input's device type (float16 or bfloat16) the modules take
input and state of any autocast-eligible dtype, round input, state and the two weight
matrices to the autocast dtype, compute normalization and cell math in float32 (the backends'
half-precision path) and return output, h_n and c_n in the autocast dtype, as nn.LSTM does.
Gradients reach the parameters in their own dtype; running statistics stay float32.

The oracle is that definition computed in float64 by the reference layer: the module's
outputs must be its values rounded to the autocast dtype (within half an ulp, plus float32
noise), its running statistics the float64 fold to float32 accuracy. Whole-model accuracy
is measured against float32 and against nn.LSTM under the same autocast.
"""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from bnlstm_cuda import BNLSTM, BNLSTMCell, parameters
from bnlstm_cuda.reference import bnlstm_layer_reference
from bnlstm_cuda.statistics import update_running_stats
from bnlstm_cuda.validation import DTypeError
from helpers import randomize_bn_parameters

DTYPES = [torch.bfloat16, torch.float16]
CPU_BACKENDS = ["cpu", "reference"]


def unit_roundoff(dtype):
    """Half an ulp relative to the value: 2^-8 for bfloat16, 2^-11 for float16."""
    return torch.finfo(dtype).eps / 2


def error_bound(device, dtype):
    """Relative error allowed for Linear -> BNLSTM -> Linear under autocast against float32.
    A handful of roundings to the autocast dtype (the first Linear's output, the BNLSTM's
    input and weights, its output, the last Linear's operands and output), each of at most
    one unit roundoff u and partly cancelling: 2 u on the CPU, where the backends compute in
    float32 after them. The GPU backends also round the recurrent product's operands at
    every step, as cuDNN does: 4 u there."""
    return (4 if device.type == "cuda" else 2) * unit_roundoff(dtype)


def relative_error(got, want):
    """Relative RMS error of got against want, in float64."""
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def nn_lstm_under_autocast(device, dtype, x):
    """What nn.LSTM returns here for an autocast Linear's output; skips where its fused
    kernel refuses the dtype (oneDNN on CPUs without bf16 support)."""
    lstm = nn.LSTM(x.shape[-1], 4, device=device)
    first = nn.Linear(x.shape[-1], x.shape[-1], device=device)
    try:
        with torch.autocast(device.type, dtype=dtype):
            return lstm(first(x))
    except RuntimeError as error:
        pytest.skip(f"nn.LSTM does not run under autocast to {dtype} here: {error}")


# The whole-model pattern ---------------------------------------------------------------------


def pipeline_case(device, backend):
    """Linear -> BNLSTM (2 layers, bidirectional) -> Linear, float32, freshly initialised
    (gammas 0.1: with gammas near 1 the model itself amplifies the rounding of its input
    some 3 times, which the rounded oracle tests below cover instead), and its input."""
    core = BNLSTM(6, 8, num_layers=2, bidirectional=True, max_length=4, backend=backend, device=device)
    model = nn.ModuleDict({"first": nn.Linear(5, 6), "core": core, "last": nn.Linear(16, 3)}).to(device)
    x = torch.randn(7, 4, 5, device=device)
    return model, x


def run_pipeline(model, x, autocast_dtype=None):
    """(model output, the BNLSTM's (output, (h_n, c_n))); under autocast if a dtype is given."""
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        core_out = model["core"](model["first"](x))
        return model["last"](core_out[0]), core_out


def check_pipeline(device, dtype, backend):
    model, x = pipeline_case(device, backend)
    reference = copy.deepcopy(model)
    want, _ = run_pipeline(reference, x)  # float32, training mode: batch statistics

    before = {name: b.clone() for name, b in model.named_buffers()}
    got, (output, (h_n, c_n)) = run_pipeline(model, x, dtype)
    # The backward pass outside autocast, as autocast's documentation asks.
    (got.float() * torch.randn(got.shape, device=device)).sum().backward()

    assert (output.dtype, h_n.dtype, c_n.dtype, got.dtype) == (dtype,) * 4
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32, name
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name
    for name, buffer in model.named_buffers():
        assert buffer.dtype == torch.float32 and torch.isfinite(buffer).all(), name
        assert not torch.equal(buffer, before[name]), f"{name} was not updated"
    assert relative_error(got, want) <= error_bound(device, dtype)
    # Last: where nn.LSTM cannot run under this autocast the test skips after BNLSTM's checks.
    lstm_output, (lstm_h, lstm_c) = nn_lstm_under_autocast(device, dtype, x)
    assert (lstm_output.dtype, lstm_h.dtype, lstm_c.dtype) == (dtype,) * 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_bnlstm_linear_under_cpu_autocast(backend, dtype):
    """Output dtypes as nn.LSTM's, float32 finite gradients and updated float32 running
    statistics, error against float32 within error_bound (check_pipeline's assertions)."""
    check_pipeline(torch.device("cpu"), dtype, backend)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["auto", "reference", "cuda", "triton"])
def test_linear_bnlstm_linear_under_cuda_autocast(backend, dtype):
    from bnlstm_cuda.backends import available_backends

    device = torch.device("cuda")
    if backend not in ("auto", "reference") and backend not in available_backends(device):
        pytest.skip(f"backend {backend!r} is unavailable here")
    check_pipeline(device, dtype, backend)


# Accuracy against nn.LSTM under the same autocast -------------------------------------------


def error_ratios(device, dtype, backend, variant, seeds=5):
    """For each seed: (BNLSTM's error, nn.LSTM's error), each the relative error of
    Linear -> core -> Linear under autocast against the same model in float32. The BNLSTM
    is built from the nn.LSTM's weights; with variant "none" it computes the same function."""
    errors = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        lstm = nn.LSTM(16, 32, device=device)
        core = BNLSTM.from_lstm(lstm, variant=variant, backend=backend)
        first, last = nn.Linear(16, 16, device=device), nn.Linear(32, 4, device=device)
        x = torch.randn(20, 8, 16, device=device)

        def run(module, autocast):
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                return last(module(first(x))[0])

        try:
            lstm_error = relative_error(run(lstm, True), run(lstm, False))
        except RuntimeError as error:
            pytest.skip(f"nn.LSTM does not run under autocast to {dtype} here: {error}")
        errors.append((relative_error(run(core, True), run(core, False)), lstm_error))
    return errors


def check_error_ratio(device, dtype, backend, variant):
    errors = error_ratios(device, dtype, backend, variant)
    # Geometric mean over seeds, so one lucky or unlucky seed of either model cannot decide;
    # the measured ratios are in docs/SEMANTICS.md.
    ratio = math.exp(sum(math.log(ours / theirs) for ours, theirs in errors) / len(errors))
    assert ratio <= 2.0, errors
    for ours, _ in errors:
        assert ours <= error_bound(device, dtype), errors


@pytest.mark.parametrize("variant", ["none", "cooijmans"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_error_against_float32_is_at_most_twice_nn_lstms(backend, dtype, variant):
    """Geometric mean over seeds of BNLSTM's error over nn.LSTM's is at most 2, and each
    BNLSTM error is within error_bound (check_error_ratio's assertions)."""
    check_error_ratio(torch.device("cpu"), dtype, backend, variant)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["none", "cooijmans"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_cuda_error_against_float32_is_at_most_twice_nn_lstms(backend, dtype, variant):
    check_error_ratio(torch.device("cuda"), dtype, backend, variant)


# Against the float64 oracle of the definition -------------------------------------------------


def oracle(module, x, dtype, training, h0=None, c0=None, start_step=0):
    """The autocast semantics in float64, for a one-layer module: input, state and weights
    rounded to `dtype`, everything else exact. Returns (output, h_n, c_n) unrounded,
    {suffix: batch statistics} and the loss's gradients {parameter name: grad}."""
    rounded = lambda t: t.detach().to(dtype).double()
    suffixes = [parameters.suffix_of(0, reverse) for reverse in (False, True)[:getattr(module, "num_directions", 1)]]
    if isinstance(module, BNLSTMCell):
        suffixes = [""]
    batch, hidden = x.shape[1], module.hidden_size
    outputs, h_n, c_n, stats, leaves = [], [], [], {}, {}
    for index, suffix in enumerate(suffixes):
        params = parameters.layer_params(module, suffix)
        fields = {}
        for field, p in params._asdict().items():
            if p is not None:
                value = rounded(p) if field in ("weight_ih", "weight_hh") else p.detach().double()
                fields[field] = leaves[field + suffix] = value.requires_grad_(True)
            else:
                fields[field] = None
        running = {part: (mean.double(), var.double()) for part, (mean, var) in module._running_stats(suffix).items()}
        zeros = torch.zeros(batch, hidden, dtype=torch.float64, device=x.device)
        start_h = zeros if h0 is None else rounded(h0[index] if h0.dim() == 3 else h0)
        start_c = zeros if c0 is None else rounded(c0[index] if c0.dim() == 3 else c0)
        result = bnlstm_layer_reference(
            rounded(x), start_h, start_c, type(params)(**fields), running, variant=module._variant,
            training=training, eps=module.eps, reverse=index == 1, start_step=start_step,
        )
        outputs.append(result.output)
        h_n.append(result.h_n)
        c_n.append(result.c_n)
        stats[suffix] = result.batch_stats
    return torch.cat(outputs, -1), torch.stack(h_n), torch.stack(c_n), stats, leaves


def assert_rounding_of(got, want, dtype, name):
    """got (in dtype) is want (float64) rounded to dtype: within half an ulp, with room for
    the float32 arithmetic before the rounding."""
    assert got.dtype == dtype, name
    error = (got.double() - want).abs()
    bound = unit_roundoff(dtype) * want.abs() * (1 + 1e-3) + 1e-6
    assert (error <= bound).all(), f"{name}: worst excess {(error - bound).max().item():.3g}"


def assert_gradients(module, leaves, dtype):
    """Weight gradients pass autocast's cast back to float32 (rounded to dtype there, as a
    Linear's are); the other parameters' gradients are float32 throughout."""
    for name, want in leaves.items():
        got = getattr(module, name).grad
        assert got is not None and got.dtype == torch.float32, name
        scale = want.grad.abs().max().item()
        rtol = unit_roundoff(dtype) * (1 + 1e-3) if name.startswith("weight_") else 1e-4
        error = (got.double() - want.grad).abs()
        assert (error <= rtol * want.grad.abs() + 1e-5 * scale).all(), name


def assert_running_stats(module, before, stats, momentum, start_step=0):
    """The running statistics are float32 and the float64 fold of the oracle's batch
    statistics to float32 accuracy (statistics taken in half precision would miss by ~1e-3)."""
    for suffix, parts in stats.items():
        for part, (mean, var) in module._running_stats(suffix).items():
            assert mean.dtype == var.dtype == torch.float32
            want_mean, want_var = (t.double() for t in before[suffix][part])
            update_running_stats(want_mean, want_var, parts[part], momentum, start_step)
            torch.testing.assert_close(mean.double(), want_mean, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("float32_products")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_under_autocast_is_the_rounded_float64_oracle(backend, dtype, training):
    module = randomize_bn_parameters(BNLSTM(5, 8, bidirectional=True, max_length=4, backend=backend))
    module.train(training)
    x = torch.randn(6, 4, 5)
    h0, c0 = torch.randn(2, 4, 8), torch.randn(2, 4, 8)  # float32: cast like the input
    before = {suffix: {part: (m.clone(), v.clone()) for part, (m, v) in module._running_stats(suffix).items()}
              for suffix in ("_l0", "_l0_reverse")}
    want_output, want_h, want_c, stats, leaves = oracle(module, x, dtype, training, h0, c0)

    with torch.autocast("cpu", dtype=dtype):
        output, (h_n, c_n) = module(x, (h0, c0))
    weights = torch.randn(output.shape)
    (output.float() * weights).sum().backward()
    (want_output * weights.to(dtype).double()).sum().backward()  # the cast rounds the output's gradient

    for name, got, want in (("output", output, want_output), ("h_n", h_n, want_h), ("c_n", c_n, want_c)):
        assert_rounding_of(got, want, dtype, name)
    assert_gradients(module, leaves, dtype)
    if training:
        assert_running_stats(module, before, stats, module.momentum)


@pytest.mark.usefixtures("float32_products")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cell_under_autocast_is_the_rounded_float64_oracle(backend, dtype):
    cell = randomize_bn_parameters(BNLSTMCell(5, 8, max_length=4, backend=backend))
    first = nn.Linear(5, 5)
    x = torch.randn(4, 5)
    hx = torch.randn(4, 8), torch.randn(4, 8)
    before = {"": {part: (m.clone(), v.clone()) for part, (m, v) in cell._running_stats("").items()}}
    with torch.autocast("cpu", dtype=dtype):
        features = first(x)
        h_1, c_1 = cell(features, hx, step=2)  # float32 state: cast like the input
        # nn.LSTMCell returns the autocast dtype for a state in it (for a float32 one, type
        # promotion makes its result float32; this cell casts the state instead).
        lstm_h, lstm_c = nn.LSTMCell(5, 8)(features, tuple(state.to(dtype) for state in hx))
    assert (h_1.dtype, c_1.dtype) == (lstm_h.dtype, lstm_c.dtype) == (dtype, dtype)
    want_output, want_h, want_c, stats, leaves = oracle(cell, features.unsqueeze(0), dtype, True, *hx, start_step=2)
    weights = torch.randn(h_1.shape)
    (h_1.float() * weights).sum().backward()
    (want_h[0] * weights.to(dtype).double()).sum().backward()

    assert_rounding_of(h_1, want_h[0], dtype, "h_1")
    assert_rounding_of(c_1, want_c[0], dtype, "c_1")
    assert_gradients(cell, leaves, dtype)
    assert first.weight.grad.dtype == torch.float32 and torch.isfinite(first.weight.grad).all()
    assert_running_stats(cell, before, stats, cell.momentum, start_step=2)
    for part, (mean, _) in cell._running_stats("").items():
        assert torch.equal(mean[[0, 1, 3]], before[""][part][0][[0, 1, 3]]), f"{part}: only slot 2 is folded"


# The edges of the rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_input_under_autocast(backend):
    module = BNLSTM(5, 8, backend=backend)
    x = torch.randn(6, 3, 5)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]), enforce_sorted=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, (h_n, c_n) = module(packed)
        padded_output, _ = module(x.to(torch.bfloat16), lengths=torch.tensor([6, 4, 2]))
    assert output.data.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    want = pack_padded_sequence(padded_output, torch.tensor([6, 4, 2]), enforce_sorted=False).data
    assert torch.equal(output.data, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_half_precision_module_under_autocast_computes_as_one_in_float32(backend):
    """A bfloat16 module under bfloat16 autocast: its weights are already rounded, so it
    gives what its float32 copy gives under the same autocast."""
    module = randomize_bn_parameters(BNLSTM(5, 8, backend=backend)).to(torch.bfloat16)
    wide = copy.deepcopy(module).float()
    x = torch.randn(6, 3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = module(x)
        want, _ = wide(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert all(b.dtype == torch.float32 for b in module.buffers())


def test_float64_module_is_left_alone_by_autocast():
    """Autocast casts no float64 tensor, and neither does the module."""
    module = BNLSTM(5, 8, dtype=torch.float64)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    module.eval()
    want, _ = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, (h_n, _) = module(x)
    assert got.dtype == h_n.dtype == torch.float64 and torch.equal(got, want)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            DTypeError, match=r"input has dtype torch.float32 but the module's parameters are torch.float64"):
        module(x.float())


def test_mismatched_dtype_without_autocast_still_raises():
    module = BNLSTM(5, 8)
    x = torch.randn(6, 3, 5, dtype=torch.bfloat16)
    with pytest.raises(DTypeError, match=r"input has dtype torch.bfloat16 but the module's parameters are "
                                         r"torch.float32.*torch.autocast\('cpu', dtype=torch.bfloat16\)"):
        module(x)
    with pytest.raises(DTypeError, match=r"input has dtype torch.bfloat16 but the module's parameters"):
        BNLSTMCell(5, 8)(x[0])
    # Autocast for another device type does not apply to CPU tensors.
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()), \
            pytest.raises(DTypeError, match="input has dtype torch.bfloat16"):
        module(x)


def test_float64_state_under_autocast_is_refused():
    module = BNLSTM(5, 8)
    x = torch.randn(6, 3, 5)
    state = torch.zeros(1, 3, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            DTypeError, match=r"hx\[h_0\] must have dtype torch.float32, torch.float16 or torch.bfloat16 under "
                              r"torch.autocast \(it is cast to torch.bfloat16\), got torch.float64"):
        module(x, (state, state.float()))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_module_under_autocast_matches_eager(training):
    """torch.compile traces the autocast rule (fullgraph: no graph break), forward and
    backward; aot_eager traces as inductor would without compiling C++ for the graph."""
    module = randomize_bn_parameters(BNLSTM(5, 8, max_length=4)).train(training)
    compiled_module = copy.deepcopy(module)
    x = torch.randn(6, 3, 5)
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, (want_h, _) = module(x)
        got, (got_h, _) = compiled(x)
    assert got.dtype == got_h.dtype == torch.bfloat16
    assert torch.equal(got, want) and torch.equal(got_h, want_h)
    want.float().sum().backward()
    got.float().sum().backward()
    for (name, p), q in zip(module.named_parameters(), compiled_module.parameters()):
        assert q.grad.dtype == torch.float32, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(module.named_buffers(), compiled_module.buffers()):
        assert c.dtype == torch.float32, name
        torch.testing.assert_close(c, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
