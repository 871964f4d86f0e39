"""Numerical edge cases, on every backend: zero batch variance, large inputs, sequences far
longer than max_length, max_length 1, T = 1, one sequence left active, strided and
batch-first inputs, and what a NaN in the input does (docs/RELIABILITY.md)."""
import math
import warnings

import pytest
import torch

from bnlstm_cuda import BNLSTM
from helpers import assert_matches_paper, make_module, scalar_loss

BACKENDS = ["reference", "cpu"]
VARIANTS = ["cooijmans", "laurent_step", "laurent_sequence", "none"]
NORMALIZED = VARIANTS[:3]


def finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def grads(module):
    return {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_batch_variance_stays_finite(backend, variant):
    """Every sequence of the batch the same: every normalized feature has variance 0 at
    every step and layer. BN then gives its beta (eps keeps the division finite), so in
    cooijmans every output is sigmoid(b_o) * tanh(beta_c); outputs, states and running
    statistics follow the paper to 1e-10, and so do the gradients where no normalization
    feeds the recurrence (see the next test for cooijmans).

    Identical rows stay identical only to rounding: a BLAS GEMM need not treat equal rows
    alike (MKL on AVX2 gives rows 1 ulp apart), and a normalization of a zero-variance
    feature multiplies such differences by gamma / sqrt(eps), 300 at eps = 1e-5, so in
    cooijmans they would reach order 1 within a few steps (the next test pins that gain).
    Here eps = 1 and gammas of at most about 0.5 make that factor below 1, so rounding
    differences die out and the claims above hold to 1e-12."""
    module = make_module(variant, input_size=3, hidden_size=5, num_layers=2, bidirectional=True, backend=backend,
                         eps=1.0)
    with torch.no_grad():
        for name, gamma in module.named_parameters():
            if name.startswith("gamma_"):
                gamma.mul_(0.2)
    x = torch.randn(6, 1, 3, dtype=torch.float64).expand(6, 4, 3).contiguous()
    conditioned = variant != "cooijmans"
    out, h_n, c_n = assert_matches_paper(module, x, training=True, gradients=conditioned)
    assert finite(out, h_n, c_n, *module.buffers())
    torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=0, atol=1e-12)
    if variant == "cooijmans":
        H = 5
        for direction, suffix in enumerate(("", "_reverse")):
            bias_o = getattr(module, f"bias_l1{suffix}")[3 * H:]
            expected = torch.sigmoid(bias_o) * torch.tanh(getattr(module, f"beta_c_l1{suffix}"))
            torch.testing.assert_close(out[:, :, direction * H:(direction + 1) * H],
                                       expected.detach().expand(6, 4, H), rtol=0, atol=1e-9)
    # Evaluation with running variances of exactly 0.
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.startswith("running_var_"):
                buffer.zero_()
    out, _, _ = assert_matches_paper(module, torch.randn(6, 4, 3, dtype=torch.float64), training=False, tol=1e-9)
    assert finite(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_batch_variance_gradients_carry_the_gain_of_eps(backend):
    """The exact derivative of BN at variance 0 is gamma / sqrt(eps) (about 316 gamma) times
    the centring: nothing cancels it. In cooijmans the recurrent and cell normalizations
    compound it step after step, so with every sequence identical the gradients grow
    geometrically with T: still finite in float64 at T = 6 (about 1e26 for the input), past
    float32's range with two layers (inf, then NaN). Pinned so that a change is a decision;
    docs/RELIABILITY.md says so."""
    grads_of = {}
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        module = make_module(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, backend=backend).to(dtype)
        x = torch.randn(6, 1, 3, dtype=dtype).expand(6, 4, 3).contiguous().requires_grad_(True)
        out, (h_n, c_n) = module(x)
        scalar_loss(out, h_n, c_n).backward()
        assert finite(out, h_n, c_n)
        grads_of[dtype] = [x.grad, *grads(module).values()]
    assert finite(*grads_of[torch.float64]) and grads_of[torch.float64][0].abs().max() > 1e20
    assert not finite(*grads_of[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inputs_of_magnitude_1e4(backend, variant, training):
    """Float32 stays finite and close to float64. Inputs spread over +-1e4 are well
    conditioned after normalization: the STYLE rule (at most about twice the error of the
    float32 reference) holds. Inputs at 1e4 + N(0, 1) are not: float32 rounding of the
    projection (1e4 * 6e-8 per term) is about 1e-3 of its unit spread, so any float32
    implementation is off by about that in the outputs and by a few 1e-2 (relative) in the
    input gradient (the float32 reference too); the bounds are absolute there, to catch a
    wrong result, not rounding."""
    wide = BNLSTM(3, 5, 2, bidirectional=True, max_length=4, variant=variant, backend="reference",
                  dtype=torch.float64).train(training)
    state = wide.state_dict()
    cases = {"spread": 1e4 * torch.randn(6, 4, 3, dtype=torch.float64),
             "offset": 1e4 + torch.randn(6, 4, 3, dtype=torch.float64)}
    for case, x in cases.items():
        wide.load_state_dict(state)
        x64 = x.clone().requires_grad_(True)
        expected = wide(x64)[0]
        expected.square().sum().backward()
        errors = {}
        for name in dict.fromkeys(("reference", backend)):
            for dtype in (torch.float32, torch.float64):
                module = BNLSTM(3, 5, 2, bidirectional=True, max_length=4, variant=variant, backend=name,
                                dtype=dtype).train(training)
                module.load_state_dict(state)
                xin = x.detach().to(dtype).clone().requires_grad_(True)
                out = module(xin)[0]
                out.square().sum().backward()
                assert finite(out, xin.grad, *grads(module).values(), *module.buffers()), (case, name, dtype)
                errors[name, dtype] = ((out.double() - expected).abs().max().item(),
                                       ((xin.grad.double() - x64.grad).abs().max() / x64.grad.abs().max().clamp(min=1e-12)).item())
        for which in (0, 1):
            assert errors[backend, torch.float64][which] < 1e-9, (case, errors)
            if case == "spread":
                assert errors[backend, torch.float32][which] <= 2 * errors["reference", torch.float32][which] + 1e-6, (case, errors)
            else:
                assert errors[backend, torch.float32][which] < (1e-2, 0.1)[which], (case, errors)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["cooijmans", "laurent_sequence"])
def test_sequences_ten_times_longer_than_max_length(backend, variant):
    """Training on T = 10 * max_length folds 28 steps into the last slot, in order; evaluation
    of such sequences reads the last slot from step max_length - 1 on. (Backpropagating
    through 30 steps of three normalizations amplifies float64 rounding past the 1e-10 that
    test_backend_behaviours.py's paper tests use at T = 5: 1e-8.)"""
    module = make_module(variant, input_size=3, hidden_size=4, bidirectional=True, max_length=3, backend=backend)
    lengths = [30, 12, 30]
    assert_matches_paper(module, torch.randn(30, 3, 3, dtype=torch.float64), lengths=lengths, training=True,
                         tol=1e-8)
    out, _, _ = assert_matches_paper(module, torch.randn(30, 3, 3, dtype=torch.float64), lengths=lengths,
                                     training=False, tol=1e-8)
    assert finite(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", NORMALIZED)
def test_max_length_one(backend, variant):
    module = make_module(variant, input_size=3, hidden_size=3, num_layers=2, max_length=1, backend=backend)
    for name, buffer in module.named_buffers():
        assert buffer.shape[0] == 1, name
    for training in (True, True, False):
        assert_matches_paper(module, torch.randn(4, 3, 3, dtype=torch.float64), lengths=[4, 1, 3], training=training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_single_time_step(backend, variant):
    module = make_module(variant, input_size=3, hidden_size=5, num_layers=2, bidirectional=True, backend=backend)
    h0 = torch.randn(4, 3, 5, dtype=torch.float64)
    c0 = torch.randn(4, 3, 5, dtype=torch.float64)
    for training in (True, False):
        assert_matches_paper(module, torch.randn(1, 3, 3, dtype=torch.float64), h0, c0, training=training)
        assert_matches_paper(module, torch.randn(1, 3, 3, dtype=torch.float64), h0, c0, lengths=[1, 1, 1],
                             training=training)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_sequence_left_active_at_the_last_steps(backend):
    """Steps 2..5 have one active sequence: it is normalized with its own statistics (so every
    BN gives beta: its output is sigmoid(b_o) * tanh(beta_c)), gradients stay finite, and the
    running statistics of those slots do not move."""
    module = make_module("cooijmans", input_size=3, hidden_size=5, max_length=8, backend=backend)
    before = {name: buffer.clone() for name, buffer in module.named_buffers()}
    out, _, _ = assert_matches_paper(module, torch.randn(6, 3, 3, dtype=torch.float64), lengths=[6, 1, 2],
                                     training=True)
    expected = torch.sigmoid(module.bias_l0[15:]) * torch.tanh(module.beta_c_l0)
    torch.testing.assert_close(out[2:, 0], expected.detach().expand(4, 5), rtol=0, atol=1e-12)
    assert torch.all(out[2:, 1:] == 0)
    for name, buffer in module.named_buffers():
        assert torch.equal(buffer[2:], before[name][2:]), name
        assert not torch.equal(buffer[:2], before[name][:2]), name
    assert finite(*grads(module).values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
def test_strided_inputs_give_the_contiguous_result(backend, training, batch_first):
    """Input, h_0, c_0 and lengths as non-contiguous views give what their contiguous copies
    give: bit for bit on the CPU backend (it copies to contiguous at its boundary), to
    rounding on the reference (matmul may take another path for a strided operand)."""
    tolerance = dict(rtol=0, atol=0) if backend == "cpu" else dict(rtol=1e-12, atol=1e-12)
    module = make_module(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, batch_first=batch_first,
                         backend=backend).train(training)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(6, 4, 3, dtype=torch.float64)  # [T, B, I]
    h0, c0 = torch.randn(2, 4, 4, 5, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 5, 3])
    strided_x = torch.empty(4, 6, 3, 2, dtype=torch.float64)[..., 0].transpose(0, 1)  # [T, B, I] view
    strided_x.copy_(x)
    strided_h0 = torch.empty(4, 5, 4, dtype=torch.float64).transpose(1, 2)
    strided_h0.copy_(h0)
    strided_c0 = torch.stack([c0, c0], -1)[..., 0]
    strided_lengths = torch.stack([lengths, lengths], 1).reshape(-1)[::2]
    layout = (lambda t: t.transpose(0, 1)) if batch_first else (lambda t: t)
    results = []
    for inputs in ((layout(x).contiguous(), h0, c0, lengths),
                   (layout(strided_x), strided_h0, strided_c0, strided_lengths)):
        assert all(t.is_contiguous() for t in inputs) == (len(results) == 0)
        module.load_state_dict(state)
        xin = inputs[0].detach().requires_grad_(True)
        out, (h_n, c_n) = module(xin, inputs[1:3], lengths=inputs[3])
        scalar_loss(out, h_n, c_n).backward()
        results.append([out, h_n, c_n, xin.grad, *(p.grad for p in module.parameters()), *module.buffers()])
        module.zero_grad()
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tolerance)


def nan_run(backend, variant, training, nan_at=None, lengths=None, bidirectional=False, T=6):
    """Run a fresh module (same seed, max_length 8 > T) on a fixed batch, with NaN at x[nan_at]."""
    torch.manual_seed(0)
    module = make_module(variant, input_size=3, hidden_size=4, max_length=8, bidirectional=bidirectional,
                         backend=backend).train(training)
    x = torch.randn(T, 4, 3, dtype=torch.float64)
    if nan_at is not None:
        x[nan_at] = math.nan
    out, (h_n, c_n) = module(x, lengths=lengths)
    return out, h_n, c_n, dict(module.named_buffers())


def initial_buffers(backend, variant):
    """The running statistics nan_run's module starts from (make_module randomizes them)."""
    torch.manual_seed(0)
    module = make_module(variant, input_size=3, hidden_size=4, max_length=8, backend=backend)
    return {name: buffer.clone() for name, buffer in module.named_buffers()}


def nan_slots(buffer):
    return [slot for slot in range(buffer.shape[0]) if torch.isnan(buffer[slot]).any()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_in_training_spreads_through_the_batch_statistics(backend, variant):
    """NaN at x[3, 1] in training. Batch statistics couple the sequences: from step 3 on every
    sequence's output is NaN (every step for laurent_sequence, whose statistics cover the
    whole sequence; only sequence 1 for "none", which has no statistics). The slots whose
    batch statistics saw it (ih at step 3, hh from step 4, which reads h_3, c from step 3)
    are not folded: they keep the values they had, never NaN; earlier slots and unused ones
    keep the values a clean batch gives."""
    clean = nan_run(backend, variant, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning itself: tests/test_statistics.py
        out, h_n, c_n, buffers = nan_run(backend, variant, True, nan_at=(3, 1, 0))
    first = {"laurent_sequence": 0}.get(variant, 3)
    assert torch.equal(out[:first], clean[0][:first])
    if variant == "none":
        assert torch.isnan(out[3:, 1]).all() and finite(out[:, [0, 2, 3]], h_n[:, [0, 2, 3]])
        assert torch.isnan(h_n[:, 1]).all() and torch.isnan(c_n[:, 1]).all()
    else:
        assert torch.isnan(out[first:]).all() and torch.isnan(h_n).all() and torch.isnan(c_n).all()
    expected = {"ih": [3], "hh": [4, 5], "c": [3, 4, 5]}
    for name, buffer in buffers.items():
        part = name.split("_")[2]
        slots = [0] if variant == "laurent_sequence" else expected[part]
        assert nan_slots(buffer) == [], name
        assert torch.equal(buffer[slots], initial_buffers(backend, variant)[name][slots]), name
        keep = [s for s in range(buffer.shape[0]) if s not in slots]
        assert torch.equal(buffer[keep], clean[3][name][keep]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_nan_in_evaluation_stays_in_its_sequence(backend, variant, bidirectional):
    """In evaluation the sequences are independent: NaN at x[3, 1] makes sequence 1's output
    NaN from step 3 on (forward direction) and up to step 3 (reverse direction); the other
    sequences are bit for bit what a clean batch gives, and no statistic changes."""
    clean = nan_run(backend, variant, False, bidirectional=bidirectional)
    out, h_n, c_n, buffers = nan_run(backend, variant, False, nan_at=(3, 1, 0), bidirectional=bidirectional)
    others = [0, 2, 3]
    assert torch.equal(out[:, others], clean[0][:, others])
    assert torch.equal(h_n[:, others], clean[1][:, others]) and torch.equal(c_n[:, others], clean[2][:, others])
    H = 4
    assert torch.isnan(out[3:, 1, :H]).all() and finite(out[:3, 1, :H])
    if bidirectional:
        assert torch.isnan(out[:4, 1, H:]).all() and finite(out[4:, 1, H:])
    assert torch.isnan(h_n[:, 1]).all() and torch.isnan(c_n[:, 1]).all()
    for name, buffer in buffers.items():
        assert torch.equal(buffer, clean[3][name]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", NORMALIZED)
def test_nan_where_one_sequence_is_active_leaves_running_statistics_alone(backend, variant):
    """A step with a single active sequence does not update running statistics, so a NaN
    there stays in that sequence: no slot changes from what a clean batch gives."""
    lengths = [6, 2, 2, 3]
    clean = nan_run(backend, variant, True, lengths=lengths)
    out, h_n, _, buffers = nan_run(backend, variant, True, nan_at=(4, 0, 1), lengths=lengths)
    if variant == "laurent_sequence":
        # Its single slot pools every step: the NaN reaches its statistics, which are then
        # not folded (the slot keeps its values).
        active = torch.arange(6).unsqueeze(1) < torch.tensor(lengths)
        assert torch.isnan(out[active]).all() and torch.all(out[~active] == 0)
        initial = initial_buffers(backend, variant)
        for name in ("running_mean_ih_l0", "running_var_ih_l0"):
            assert torch.equal(buffers[name], initial[name]), name
        return
    assert torch.equal(out[:4], clean[0][:4]) and torch.equal(out[:, 1:], clean[0][:, 1:])
    assert torch.isnan(out[4:, 0]).all() and torch.isnan(h_n[:, 0]).all() and finite(h_n[:, 1:])
    for name, buffer in buffers.items():
        assert torch.equal(buffer, clean[3][name]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_in_padding_change_nothing(backend):
    lengths = [6, 2, 4, 1]
    clean = nan_run(backend, "cooijmans", True, lengths=lengths, bidirectional=True)
    torch.manual_seed(0)
    module = make_module("cooijmans", input_size=3, hidden_size=4, max_length=8, bidirectional=True, backend=backend)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    x[2:, 1] = math.nan
    x[4:, 2] = math.inf
    x[1:, 3] = -math.inf
    out, (h_n, c_n) = module(x, lengths=lengths)
    for got, want in zip((out, h_n, c_n), clean[:3]):
        assert torch.equal(got, want)
    for name, buffer in module.named_buffers():
        assert torch.equal(buffer, clean[3][name]), name
