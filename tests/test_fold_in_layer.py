"""The CPU's training forward folding its batch statistics into the running statistics as its
steps go (bnlstm::layer and bnlstm::bidirectional with a momentum: csrc/recurrent_cpu.cpp's
StepFold, layer.cpp's fold_after_steps): the same outputs, the same running statistics to the
bit and the same report of non-finite steps as the fold operator after the call
(update_running_stats_parts), which every other way of calling the layer takes."""
import pytest
import torch

import bnlstm_cuda
from bnlstm_cuda import ops
from bnlstm_cuda.layer_api import step_batch_stats
from helpers import make_module, op_arguments

VARIANTS = ["cooijmans", "laurent_step", "laurent_sequence", "none"]
MOMENTUM = 0.3

pytestmark = pytest.mark.usefixtures("cpu_extension")


def _running(variant, S, H, dtype):
    """Random running statistics (ops.running_list's order, empty for absent parts)."""
    v = bnlstm_cuda.get_variant(variant)
    absent = torch.empty(0, dtype=dtype)
    pair = lambda present, rows, features: (
        [torch.randn(rows, features, dtype=dtype), torch.rand(rows, features, dtype=dtype) + 0.5]
        if present else [absent, absent])
    return [*pair(v.input_statistics, 1 if v.input_statistics == "sequence" else S, 4 * H),
            *pair(v.normalize_recurrent, S, 4 * H), *pair(v.normalize_cell, S, H)]


def _layer_calls(variant, dtype, reverse, start_step, T, B, H, S, lengths, poison=False):
    """(the layer with the fold, the layer without it and the fold operator after): each
    (output, h_n, c_n, statistics, running after, first non-finite steps)."""
    torch.manual_seed(5)
    a = op_arguments(variant, True, reverse, T=T, B=B, I=3, H=H, dtype=dtype)
    x = a.x.detach().clone()
    if poison:
        x[3, 0] = float("inf")  # every statistic of step 3 (in processing order where full) is inf
    x.requires_grad_()
    running = _running(variant, S, H, dtype)
    absent = torch.empty(0, dtype=dtype)
    flags = (a.input_statistics, a.normalize_recurrent, a.normalize_cell, True, a.eps, reverse, start_step, None)

    folding = [r.clone() for r in running]
    output, h_n, c_n, statistics, folded = torch.ops.bnlstm.layer(x, a.h0, a.c0, lengths, a.params, folding, *flags,
                                                                  MOMENTUM)
    after = [r.clone() for r in running]
    output_b, h_n_b, c_n_b, statistics_b, unfolded = torch.ops.bnlstm.layer(x, a.h0, a.c0, lengths, a.params,
                                                                            [absent] * 6, *flags)
    assert unfolded.numel() == 0
    batch_stats = step_batch_stats(bnlstm_cuda.get_variant(variant), ops.step_counts(x, lengths), *statistics_b)
    skipped = ops.update_running_stats_parts_compiled(ops.running_dict(after), batch_stats, MOMENTUM, start_step)
    return ((output, h_n, c_n, statistics, folding, folded),
            (output_b, h_n_b, c_n_b, statistics_b, after, skipped))


def _assert_same(folded_in_layer, folded_after):
    """Equal to the bit, NaN where NaN (a poisoned batch's outputs)."""
    for a, b in zip(folded_in_layer, folded_after):
        for p, q in zip(*((a, b) if isinstance(a, (list, tuple)) else ([a], [b]))):
            torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)
        assert not isinstance(a, (list, tuple)) or len(a) == len(b)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_fold_in_steps_equals_the_fold_after(variant, dtype, reverse):
    """T = 6 steps from start_step 2 into S = 4 slots (steps 1 to 5 share the last one, in
    order); the sequences' lengths 6, 2, 1 leave one active row from step 2 on, which the fold
    skips."""
    in_layer, after = _layer_calls(variant, dtype, reverse, start_step=2, T=6, B=3, H=5, S=4,
                                   lengths=torch.tensor([6, 2, 1]))
    _assert_same(in_layer, after)
    if variant != "none":
        assert not all(torch.equal(a, b) for a, b in zip(in_layer[4], _running(variant, 4, 5, dtype)))


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("variant", ["cooijmans", "laurent_sequence"])
def test_fold_in_steps_over_blocks_of_hidden_units(variant, num_threads, threads):
    """With two threads each block of hidden units folds its own columns (H = 100: ragged
    block edges), padded."""
    threads(num_threads)
    assert torch.ops.bnlstm.cpu_hidden_blocks(20, 9, 100) == num_threads
    lengths = torch.tensor([20, 7, 20, 1, 13, 20, 2, 20, 9])
    in_layer, after = _layer_calls(variant, torch.float32, False, start_step=0, T=20, B=9, H=100, S=30,
                                   lengths=lengths)
    _assert_same(in_layer, after)


@pytest.mark.parametrize("variant", ["cooijmans", "laurent_step"])
def test_fold_in_steps_reports_and_skips_non_finite_statistics(variant):
    """An inf in one row at step 3: the statistics from there on are not finite; their
    features keep their running values, and each part reports its first such step as the
    fold operator does."""
    in_layer, after = _layer_calls(variant, torch.float64, False, start_step=0, T=6, B=4, H=5, S=6, lengths=None,
                                   poison=True)
    _assert_same(in_layer, after)
    folded = in_layer[5]
    assert folded[0] == 3  # the input part, at the poisoned step


def test_running_statistics_in_another_dtype_are_folded_after_the_steps():
    """Running statistics not in the compute dtype (float32 ones for a float64 layer) are
    folded after the steps, converted as the fold operator converts them."""
    torch.manual_seed(6)
    a = op_arguments("cooijmans", True, False, T=5, B=3, I=3, H=4)
    running = [r.float() for r in _running("cooijmans", 5, 4, torch.float64)]
    flags = (a.input_statistics, a.normalize_recurrent, a.normalize_cell, True, a.eps, False, 0, None)
    folding = [r.clone() for r in running]
    *_, folded = torch.ops.bnlstm.layer(a.x, a.h0, a.c0, a.lengths, a.params, folding, *flags, MOMENTUM)
    _, _, _, statistics, _ = torch.ops.bnlstm.layer(a.x, a.h0, a.c0, a.lengths, a.params, [torch.empty(0)] * 6,
                                                   *flags)
    after = [r.clone() for r in running]
    batch_stats = step_batch_stats(bnlstm_cuda.get_variant("cooijmans"), ops.step_counts(a.x, a.lengths),
                                   *statistics)
    skipped = ops.update_running_stats_parts_compiled(ops.running_dict(after), batch_stats, MOMENTUM)
    assert all(torch.equal(p, q) for p, q in zip(folding, after)) and torch.equal(folded, skipped)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bidirectional_fold_in_steps_equals_the_fold_after(variant):
    """Both directions fold into their own running statistics; `folded` lists the forward
    direction's parts, then the reverse one's."""
    from test_cpu_bidirectional import bidirectional_arguments

    torch.manual_seed(8)
    arguments, _, _ = bidirectional_arguments(variant, True, T=5, B=4, I=3, H=6)
    x, h0, c0, lengths, params, _, *flags = arguments
    flags = flags[:5]
    running = _running(variant, 4, 6, torch.float64) + _running(variant, 4, 6, torch.float64)
    folding = [r.clone() for r in running]
    output, h_n, c_n, statistics, folded = torch.ops.bnlstm.bidirectional(x, h0, c0, lengths, params, folding, *flags,
                                                                          None, MOMENTUM)
    after = [r.clone() for r in running]
    output_b, _, _, statistics_b, _ = torch.ops.bnlstm.bidirectional(x, h0, c0, lengths, params,
                                                                     [torch.empty(0, dtype=x.dtype)] * 12, *flags)
    assert torch.equal(output, output_b) and all(torch.equal(a, b) for a, b in zip(statistics, statistics_b))
    counts = ops.step_counts(x, lengths)
    skipped = []
    for d in range(2):
        stats = step_batch_stats(bnlstm_cuda.get_variant(variant), counts, *statistics_b[6 * d:6 * d + 6])
        skipped.append(ops.update_running_stats_parts_compiled(ops.running_dict(after[6 * d:6 * d + 6]), stats,
                                                               MOMENTUM))
    assert all(torch.equal(p, q) for p, q in zip(folding, after))
    assert torch.equal(folded, torch.cat(skipped))


def test_a_fold_needs_training_on_the_cpu():
    a = op_arguments("cooijmans", False, False)
    flags = (a.input_statistics, a.normalize_recurrent, a.normalize_cell, False, a.eps, False, 0, None)
    with pytest.raises(RuntimeError, match="needs training=True and CPU tensors, got training=0"):
        torch.ops.bnlstm.layer(a.x, a.h0, a.c0, a.lengths, a.params, a.running, *flags, MOMENTUM)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["one_direction", "bidirectional"])
def test_module_folds_in_its_layers(bidirectional, monkeypatch):
    """A training call of the module on the CPU backend folds in its layers, not in _fold,
    and leaves the running statistics the module's own fold would: the same to the bit over
    three calls, padded."""
    torch.manual_seed(9)
    kwargs = dict(input_size=3, hidden_size=7, num_layers=2, bidirectional=bidirectional, backend="cpu",
                  max_length=4)
    module, folding_after = make_module("cooijmans", **kwargs), make_module("cooijmans", **kwargs)
    folding_after.load_state_dict(module.state_dict())
    folding_after._fold_momentum = lambda *args: None
    monkeypatch.setattr(module, "_fold", lambda *args: pytest.fail("the module folded after its layers"))
    x, lengths = torch.randn(6, 5, 3, dtype=torch.float64), torch.tensor([6, 3, 6, 1, 5])
    for _ in range(3):
        out_a, _ = module(x, lengths=lengths)
        out_b, _ = folding_after(x, lengths=lengths)
        assert torch.equal(out_a, out_b)
    before = make_module("cooijmans", **kwargs)
    for (name, a), (_, b), (_, untouched) in zip(module.named_buffers(), folding_after.named_buffers(),
                                                 before.named_buffers()):
        assert torch.equal(a, b), name
        assert not torch.equal(a, untouched), name


def test_cell_folds_in_its_layer(monkeypatch):
    """The same for BNLSTMCell, step by step into its slots, the last slot reused."""
    torch.manual_seed(10)
    cell = bnlstm_cuda.BNLSTMCell(3, 6, max_length=2, backend="cpu", dtype=torch.float64)
    folding_after = bnlstm_cuda.BNLSTMCell(3, 6, max_length=2, backend="cpu", dtype=torch.float64)
    folding_after.load_state_dict(cell.state_dict())
    folding_after._fold_momentum = lambda *args: None
    folding_after._direct_cpu_call = lambda *args: None  # its direct path folds in the node
    monkeypatch.setattr(cell, "_fold", lambda *args: pytest.fail("the cell folded after its layer"))
    state_a = state_b = None
    for step in range(3):
        x = torch.randn(4, 3, dtype=torch.float64)
        state_a = cell(x, state_a, step=step)
        state_b = folding_after(x, state_b, step=step)
        assert torch.equal(state_a[0], state_b[0])
    for (name, a), (_, b) in zip(cell.named_buffers(), folding_after.named_buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("grad_mode", ["graph", "no_grad"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one_direction", "bidirectional"])
@pytest.mark.parametrize("variant", ["cooijmans", "laurent_step", "laurent_sequence"])
def test_a_training_call_marks_the_running_statistics_changed(variant, bidirectional, grad_mode):
    """The fold updates the running statistics in place, as torch's in-place operations do
    (the reference backend's fold is some): each buffer's version goes up, and a graph that
    saved one before refuses to backward after, instead of using the new values. With a
    graph the node folds in the steps; without one, the fold operator after the layer."""
    torch.manual_seed(11)
    kwargs = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=bidirectional, max_length=3)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    for backend in ("cpu", "reference"):
        module = make_module(variant, backend=backend, **kwargs)
        buffers = dict(module.named_buffers())
        assert buffers
        before = {name: buffer._version for name, buffer in buffers.items()}
        first = next(iter(buffers.values()))
        weight = torch.ones(first.shape[-1], dtype=torch.float64, requires_grad=True)
        saved = (first * weight).sum()  # saves a running statistic for weight's gradient
        with torch.set_grad_enabled(grad_mode == "graph"):
            module(x)
        assert all(buffer._version > before[name] for name, buffer in buffers.items()), backend
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.backward()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_training_step_of_the_cell_marks_the_running_statistics_changed(backend):
    cell = bnlstm_cuda.BNLSTMCell(3, 6, max_length=2, backend=backend, dtype=torch.float64)
    before = {name: buffer._version for name, buffer in cell.named_buffers()}
    cell(torch.randn(4, 3, dtype=torch.float64), step=1)
    assert all(buffer._version > before[name] for name, buffer in cell.named_buffers())


def test_the_fold_operators_mark_the_running_statistics_changed():
    running_mean, running_var = torch.zeros(2, 4), torch.ones(2, 4)
    mean, var, count = torch.randn(3, 4), torch.rand(3, 4), torch.full((3,), 4.0)
    versions = running_mean._version, running_var._version
    torch.ops.bnlstm.update_running_stats(running_mean, running_var, mean, var, count, MOMENTUM)
    assert (running_mean._version, running_var._version) == (versions[0] + 1, versions[1] + 1)
    torch.ops.bnlstm.update_running_stats_parts([running_mean], [running_var], [mean], [var], [count], MOMENTUM)
    assert (running_mean._version, running_var._version) == (versions[0] + 2, versions[1] + 2)
