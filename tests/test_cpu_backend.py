"""The fused CPU operators: registration (opcheck), torch.compile, their split over threads
(blocks of hidden units, chunks of weight gradients) against the paper and float32, and what
happens when the extension cannot be built. What every backend must do (the paper, gradcheck,
float32 against float64, start_step, odd sizes) is tests/test_backend_behaviours.py."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bnlstm_cuda
from bnlstm_cuda import BNLSTM, backends
from helpers import make_module, op_arguments, op_backward_arguments, scalar_loss

VARIANTS = ["cooijmans", "laurent_step", "laurent_sequence", "none"]

pytestmark = pytest.mark.usefixtures("cpu_extension")


def test_python_states_the_declared_schemas():
    """ops.FORWARD_SCHEMA and BACKWARD_SCHEMA, with which the Triton operators are
    registered, are the schemas csrc/ops.cpp declares."""
    from bnlstm_cuda.ops import BACKWARD_SCHEMA, FORWARD_SCHEMA

    for name, schema in (("layer_forward", FORWARD_SCHEMA), ("layer_backward", BACKWARD_SCHEMA)):
        declared = getattr(torch.ops.bnlstm, name).default._schema
        assert str(declared) == str(torch._C.parse_schema(f"bnlstm::{name}{schema}"))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_layer_forward(variant, training):
    args = op_arguments(variant, training, reverse=training)
    torch.library.opcheck(torch.ops.bnlstm.layer_forward.default, args)
    inference = op_arguments(variant, training, reverse=False, keep_reserve=False)
    torch.library.opcheck(torch.ops.bnlstm.layer_forward.default, inference)
    # start_step and operand_dtype given: what half-precision inputs pass; the CPU computes
    # in the compute dtype whatever it says. No lengths: every sequence is full.
    torch.library.opcheck(torch.ops.bnlstm.layer_forward.default,
                          args._replace(lengths=None, start_step=1, operand_dtype=torch.bfloat16))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_layer_backward(variant, training):
    args = op_arguments(variant, training, reverse=True)
    backward_args, _ = op_backward_arguments(args)
    torch.library.opcheck(torch.ops.bnlstm.layer_backward.default, backward_args)
    # input_grad=False: grad_x is skipped (empty), every other gradient is the same.
    without_input_args, _ = op_backward_arguments(args, input_grad=False)
    torch.library.opcheck(torch.ops.bnlstm.layer_backward.default, without_input_args)
    # operand_dtype, as half-precision inputs pass it: nothing changes on the CPU.
    torch.library.opcheck(torch.ops.bnlstm.layer_backward.default, backward_args[:-1] + (torch.float16,))
    full = torch.ops.bnlstm.layer_backward(*backward_args)
    without_input = torch.ops.bnlstm.layer_backward(*backward_args[:-2], False, None)
    assert full[0].shape == args.x.shape and without_input[0].numel() == 0
    for expected, got in zip((*full[1:3], *full[3]), (*without_input[1:3], *without_input[3])):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_in_evaluation_reports_no_statistics(variant):
    """keep_reserve=False in evaluation returns [0, F] statistics (nothing reads them) and
    the output and states of keep_reserve=True (float64, to rounding: inference may project
    x in the steps), whose statistics are the running rows each step used: slot
    min(t, S - 1), T = 4 steps over S = 3 slots. Training without a reserve still returns
    its batch statistics, which the running update folds."""
    from bnlstm_cuda.ops import STATISTICS, STATISTICS_PARTS

    args = op_arguments(variant, training=False, reverse=False)
    with torch.no_grad():
        kept = torch.ops.bnlstm.layer_forward(*args)
        inference = torch.ops.bnlstm.layer_forward(*args._replace(keep_reserve=False))
    for got, expected in zip(inference[:3], kept[:3]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    slots = torch.tensor([0, 1, 2, 2])
    for name, running, got, reported in zip(STATISTICS, args.running, inference[3], kept[3]):
        assert got.shape == (0, reported.shape[1]), name
        if running.numel() == 0:
            assert reported.shape[0] == 0, name
        elif running.shape[0] == 1:  # sequence-wise input statistics: one row for every step
            assert torch.equal(reported, running), name
        else:
            assert torch.equal(reported, running[slots]), name
    training = op_arguments(variant, training=True, reverse=False, keep_reserve=False)
    with torch.no_grad():
        statistics = torch.ops.bnlstm.layer_forward(*training)[3]
    variant_parts = bnlstm_cuda.get_variant(variant).parts
    for index, part in enumerate(STATISTICS_PARTS):
        for tensor in statistics[2 * index:2 * index + 2]:
            assert (tensor.shape[0] > 0) == (part in variant_parts), (part, tensor.shape)


def test_op_lengths_none_means_full_sequences():
    """lengths=None gives what lengths of T for every sequence give, forward and backward."""
    args = op_arguments("cooijmans", True, reverse=True)
    full = args._replace(lengths=torch.full_like(args.lengths, args.x.shape[0]))
    backward_full, forward_full = op_backward_arguments(full)
    backward_none, forward_none = op_backward_arguments(full._replace(lengths=None))
    flat = lambda result: [t for part in result for t in (part if isinstance(part, list) else [part])]
    for got, expected in zip(flat(forward_none), flat(forward_full)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    backward_none = (*backward_full[:4], None, *backward_full[5:])
    for got, expected in zip(flat(torch.ops.bnlstm.layer_backward(*backward_none)),
                             flat(torch.ops.bnlstm.layer_backward(*backward_full))):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_small_calls_run_as_one_block(threads):
    """A call with little recurrent work (a decoder's cell step) stays on one thread; a long
    sequence splits over the threads."""
    threads(2)
    assert torch.ops.bnlstm.cpu_hidden_blocks(1, 16, 128) == 1
    assert torch.ops.bnlstm.cpu_hidden_blocks(100, 32, 128) == 2
    assert torch.ops.bnlstm.cpu_hidden_blocks(100, 32, 48) == 1  # under two blocks of 32 units


def test_input_without_grad_gives_the_same_parameter_gradients():
    """An input that does not require grad skips grad_x; the parameters' gradients are the
    same bits as when it does."""
    module = make_module("cooijmans", input_size=5, hidden_size=7, num_layers=2, backend="cpu")
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    grads = []
    for requires_grad in (True, False):
        module.zero_grad()
        out, (h_n, c_n) = module(x.clone().requires_grad_(requires_grad))
        scalar_loss(out, h_n, c_n).backward()
        grads.append([p.grad.clone() for p in module.parameters()])
    for with_input, without_input in zip(*grads):
        assert torch.equal(with_input, without_input)


@pytest.mark.parametrize("variant", ["cooijmans", "laurent_sequence"])
def test_torch_compile_fullgraph_matches_eager(variant):
    """The ops trace under torch.compile through their fake kernels and autograd formula.
    aot_eager traces forward and backward exactly as inductor would, without spending
    minutes compiling C++ for the surrounding graph."""
    module = make_module(variant, input_size=3, hidden_size=5, num_layers=2, bidirectional=True, backend="cpu")
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 4, 2])

    def run(module, x):
        out, (h_n, c_n) = module(x, lengths=lengths)
        return out, h_n, c_n

    compiled_module = make_module(variant, input_size=3, hidden_size=5, num_layers=2, bidirectional=True, backend="cpu")
    compiled_module.load_state_dict(module.state_dict())
    expected = run(module, x)
    scalar_loss(*expected).backward()
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    out = compiled(compiled_module, x)
    scalar_loss(*out).backward()
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(module.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    for name, buffer in module.named_buffers():
        torch.testing.assert_close(getattr(compiled_module, name), buffer, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "full"])
@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("variant", ["cooijmans", "laurent_sequence"])
def test_hidden_unit_blocks_match_the_paper(variant, num_threads, padded, threads):
    """With several threads, each step's fused passes are split into blocks of hidden units
    (at::parallel_for): H = 100 makes 1 or 3 blocks with ragged edges; with 2 threads the
    two directions run at once, one block each (csrc/bidirectional_cpu.cpp). All must match
    the paper, with padded steps (at least three sequences active at every step: fewer make
    the batch norm's gradient amplify rounding beyond 1e-10) and without (where the next
    step's GEMMs read h_t from the output rows), in both directions."""
    from helpers import assert_matches_paper

    threads(num_threads)
    # Enough work for the recurrence to split it (a small call runs as one block).
    assert torch.ops.bnlstm.cpu_hidden_blocks(5, 21, 100) == num_threads
    assert torch.ops.bnlstm.cpu_directions_concurrent(5, 21, 100) == (num_threads == 2)
    torch.manual_seed(3)
    module = make_module(variant, input_size=6, hidden_size=100, num_layers=2, bidirectional=True, backend="cpu")
    x = torch.randn(5, 21, 6, dtype=torch.float64)
    for training in (True, False):
        # tol 1e-9: with H = 100 and gammas near 1 the gradients reach 1e2, and float64
        # rounding of the two implementations' different summation orders exceeds 1e-10.
        lengths = torch.tensor([5, 2, 4, 5, 3, 5, 1] * 3) if padded else None
        assert_matches_paper(module, x, lengths=lengths, training=training, tol=1e-9)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_weight_gradient_chunks_match_the_paper(num_threads, threads):
    """The CPU backward accumulates the weight gradients every few steps (a chunk of at least
    256 rows: 4 steps at B = 64, recurrent_cpu.cpp) while the recurrence runs: T = 13 makes
    chunks at both ends of the sequence, the first one short, and step 0 meets h_0. Against
    the paper in float64, padded and in both directions, training and evaluation."""
    from helpers import assert_matches_paper

    threads(num_threads)
    torch.manual_seed(11)
    module = make_module("cooijmans", input_size=5, hidden_size=20, bidirectional=True, backend="cpu", max_length=13)
    x = torch.randn(13, 64, 5, dtype=torch.float64)
    lengths = torch.tensor([13, 7, 12, 13, 3, 10, 13, 9] * 8)
    for training in (True, False):
        assert_matches_paper(module, x, lengths=lengths, training=training, tol=1e-9)


# (steps, batch, hidden): ragged blocks of hidden units; in the last one grad_wx [T, B, 4H]
# (written for grad_x: the input requires grad) reaches 4 MB, from where the backward pass
# stores it past the caches (kStreamingStoreMinBytes in recurrent_cpu.cpp), at aligned and
# unaligned columns, and the weight gradients take 8 chunks of steps.
# The last two: past the gradients' and the reserve's streaming thresholds (csrc/recurrent_cpu.cpp;
# AVX2 builds stage each reserve row and stream it out, AVX-512 builds stream each store).
BLOCK_SHAPES = [(12, 9, 100), (12, 9, 150), (64, 33, 130), (40, 17, 64)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("input_size", [3, 64], ids=["step-products", "layer-projection"])
def test_inference_input_products(variant, training, reverse, input_size, threads):
    """Without a gradient, an input narrow against the batch (I <= 8 B) is multiplied by W_ih
    in each step, by each block of hidden units (2 threads, H = 100: blocks of 48 and 52
    units); a wider one by the layer's one projection. Outputs, final states and batch
    statistics against the reference in float64, padded and reversed too (four rows stay
    active: batch statistics over fewer amplify float64 rounding past 1e-9 in 40 steps)."""
    from helpers import assert_layer_results_close, random_layer

    threads(2)
    T, B, H = 40, 7, 100
    assert torch.ops.bnlstm.cpu_hidden_blocks(T, B, H) == 2
    assert torch.ops.bnlstm.cpu_steps_project_input(T, B, input_size) == (input_size == 3)
    assert torch.ops.bnlstm.cpu_steps_project_input(1, B, input_size)  # one step: always
    x, h0, c0, params, running = random_layer(variant, T=T, B=B, I=input_size, H=H, S=30)
    lengths = torch.tensor([40, 13, 40, 1, 40, 27, 40])
    x = x.masked_fill((torch.arange(T).unsqueeze(1) >= lengths).unsqueeze(-1), float("nan"))
    arguments = dict(variant=bnlstm_cuda.get_variant(variant), training=training, eps=1e-5, lengths=lengths,
                     reverse=reverse)
    with torch.no_grad():
        want = bnlstm_cuda.bnlstm_layer_reference(x, h0, c0, params, running, **arguments)
        got = backends.REGISTRY["cpu"].layer(x, h0, c0, params, running, **arguments)
    assert_layer_results_close(got, want, dict(rtol=1e-9, atol=1e-9))


@pytest.mark.parametrize("variant", ["cooijmans", "laurent_sequence"])
def test_evaluation_statistics_tables_split_over_threads(variant, threads):
    """Evaluation computes each given part's scale for every slot it reads once a call, rows
    split over threads where the table is long (G = 1200: 27 rows a task, 55 slots read from
    start_step 5 of 60), then steps 60 to 74 read the last slot. Against the reference in
    float64, gradients too (they read the statistics each step used): within 1e-7, as 70
    steps amplify float64 rounding in the weight gradients past the short tests' 1e-9; a
    wrong slot is off by far more."""
    from helpers import assert_layer_matches_reference

    threads(2)
    assert_layer_matches_reference(backends.REGISTRY["cpu"].layer, variant, torch.tensor([70, 41, 66]),
                                   tol=dict(rtol=1e-7, atol=1e-7), T=70, H=300, S=60, training=False, start_step=5)


@pytest.mark.parametrize("steps, batch, hidden_size", BLOCK_SHAPES, ids=["H100", "H150", "streamed", "streamed-reserve"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_float32_hidden_unit_blocks(steps, batch, hidden_size, padded, threads):
    """float32 step products (the small-batch kernel at B = 9; at B = 33 MKL's packed GEMM,
    or the small-batch kernel again on AMD CPUs: csrc/packed_gemm.h): with 2 threads each block
    multiplies its own columns of grad_zh by its rows of W_hh and the next step sums the
    blocks' partial products into grad_h (on active rows; padded ones pass theirs through).
    The input (12 features) is narrow against the batch: each block projects it gate by gate
    into its columns of the projection the backward reads.
    Against the float64 module: relative error of float32 rounding, not of a wrong layout."""
    threads(2)
    assert torch.ops.bnlstm.cpu_hidden_blocks(steps, batch, hidden_size) == 2
    if hidden_size == 130:
        assert steps * batch * 4 * hidden_size * 4 >= 4 << 20
    if hidden_size == 64:  # the reserve, 9H floats a row, streamed where H is a multiple of 16
        assert steps * batch * 9 * hidden_size * 4 >= 1 << 20
    torch.manual_seed(5)
    wide = BNLSTM(12, hidden_size, max_length=steps, backend="reference", dtype=torch.float64)
    narrow = BNLSTM(12, hidden_size, max_length=steps, backend="cpu")
    narrow.load_state_dict({k: v.float() for k, v in wide.state_dict().items()})
    x = torch.randn(steps, batch, 12, dtype=torch.float64)
    lengths = [steps if b % 3 == 0 else 1 + (5 * b) % steps for b in range(batch)] if padded else None
    results = []
    for module, dtype in ((wide, torch.float64), (narrow, torch.float32)):
        x_in = x.to(dtype).detach().requires_grad_(True)
        out, (h_n, c_n) = module(x_in, lengths=lengths)
        scalar_loss(out.double(), h_n.double(), c_n.double()).backward()  # the same weights for both
        results.append([out, h_n, c_n, x_in.grad, *(p.grad for p in module.parameters()), *module.buffers()])
    for expected, got in zip(*results):
        assert (got is None) == (expected is None)
        if expected is not None:
            error = (got.double() - expected).norm() / expected.norm()
            assert error < 1e-4, error


def test_float32_backward_through_saturated_output_gates():
    """The float32 backward reads tanh(BN(c_t)) back as h_t / o (csrc/recurrent_cpu.cpp).
    Output gates driven to saturation both ways (a sigmoid that underflows to exactly 0
    where at::vec's exp has no clamp, the portable build CI also tests), on a padded batch:
    every gradient finite and within float32 rounding of the float64 module's."""
    torch.manual_seed(7)
    hidden = 8
    wide = BNLSTM(3, hidden, max_length=6, backend="reference", dtype=torch.float64)
    with torch.no_grad():
        wide.bias_l0[3 * hidden:3 * hidden + 4] = -200.0
        wide.bias_l0[3 * hidden + 4:] = 200.0
    narrow = BNLSTM(3, hidden, max_length=6, backend="cpu")
    narrow.load_state_dict({k: v.float() for k, v in wide.state_dict().items()})
    x, lengths = torch.randn(6, 5, 3, dtype=torch.float64), [6, 2, 4, 1, 6]
    results = []
    for module, dtype in ((wide, torch.float64), (narrow, torch.float32)):
        x_in = x.to(dtype).detach().requires_grad_(True)
        out, (h_n, c_n) = module(x_in, lengths=lengths)
        scalar_loss(out.double(), h_n.double(), c_n.double()).backward()
        results.append([out, h_n, c_n, x_in.grad, *(p.grad for p in module.parameters())])
    for expected, got in zip(*results):
        assert torch.isfinite(got).all()
        error = (got.double() - expected).norm() / expected.norm()
        assert error < 1e-4, error


COMPILE_FIRST = textwrap.dedent(
    """
    import torch, bnlstm_cuda
    torch.manual_seed(0)
    module = bnlstm_cuda.BNLSTM(4, 8, num_layers=2, max_length=5).train({training})
    eager = bnlstm_cuda.BNLSTM(4, 8, num_layers=2, max_length=5).train({training})
    eager.load_state_dict(module.state_dict())
    x = torch.randn(5, 3, 4)
    with torch.set_grad_enabled({training}):
        out = torch.compile(module, fullgraph=True)(x)[0]  # the process's first call
        want = eager(x)[0]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    if {training}:
        out.sum().backward()
        want.sum().backward()
        for got, expected in zip(module.parameters(), eager.parameters()):
            torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-5)
        for name, buffer in eager.named_buffers():
            torch.testing.assert_close(getattr(module, name), buffer)
    print("compiled first call matches eager")
    """
)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_as_the_first_call_in_a_fresh_process(training):
    """torch.compile(fullgraph=True) of a module never called before: the backend's first
    availability check (which builds or loads the extension under a lock) runs at trace time
    (assume_constant_result) instead of being traced. A fresh process: this suite has
    loaded the extension already."""
    repo = Path(bnlstm_cuda.__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", COMPILE_FIRST.format(training=training)], capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(repo)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled first call matches eager" in result.stdout


@pytest.mark.parametrize("backend, in_layers", [("cpu", True), ("auto", True), ("reference", False)])
def test_running_statistics_fold_follows_the_backend(backend, in_layers, monkeypatch):
    """Modules on the fused CPU backend fold their running statistics in their layers (the
    steps fold as they go: test_fold_in_layer.py), reference modules after them with the
    vectorised fold (whatever this process loaded before), and both agree."""
    calls = []
    module = BNLSTM(4, 6, max_length=3, backend=backend, dtype=torch.float64)
    reference = BNLSTM(4, 6, max_length=3, backend="reference", dtype=torch.float64)
    reference.load_state_dict(module.state_dict())
    fold_after = module._fold
    monkeypatch.setattr(module, "_fold", lambda *args: calls.append(args) or fold_after(*args))
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    module(x, lengths=[5, 2, 4])
    reference(x, lengths=[5, 2, 4])
    assert len(calls) == (0 if in_layers else 1)  # one call folds ih, hh and c
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(getattr(module, name), buffer, rtol=1e-12, atol=1e-12)
    # The cell, step by step, likewise.
    calls.clear()
    cell = bnlstm_cuda.BNLSTMCell(4, 6, max_length=3, backend=backend, dtype=torch.float64)
    reference_cell = bnlstm_cuda.BNLSTMCell(4, 6, max_length=3, backend="reference", dtype=torch.float64)
    reference_cell.load_state_dict(cell.state_dict())
    fold_after = cell._fold
    monkeypatch.setattr(cell, "_fold", lambda *args: calls.append(args) or fold_after(*args))
    for step in range(2):
        cell(x[step], step=step)
        reference_cell(x[step], step=step)
    assert len(calls) == (0 if in_layers else 2)
    for name, buffer in reference_cell.named_buffers():
        torch.testing.assert_close(getattr(cell, name), buffer, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("float32_products")
def test_half_precision_inputs_are_computed_in_float32():
    """Without bfloat16 products (a CPU without AVX512_BF16; pinned here) the CPU kernels
    compute half-precision inputs in float32 throughout (the CUDA kernels' recurrent GEMM
    multiplies in the input's dtype: test_cuda_backend.py; the CPU's bfloat16 products:
    test_cpu_bf16.py)."""
    module = BNLSTM(4, 6, max_length=5, backend="cpu").to(torch.bfloat16)
    reference = BNLSTM(4, 6, max_length=5, backend="reference").to(torch.bfloat16)
    reference.load_state_dict(module.state_dict())
    x = torch.randn(5, 3, 4).to(torch.bfloat16)
    out = module(x)[0]
    assert out.dtype == torch.bfloat16
    # Both compute in float32 and round once: at most one bfloat16 ulp apart.
    torch.testing.assert_close(out, reference(x)[0], rtol=1e-2, atol=1e-2)
    for name, buffer in module.named_buffers():
        torch.testing.assert_close(buffer, getattr(reference, name), rtol=1e-5, atol=1e-6)


def test_op_boundary_checks_name_the_argument():
    args = op_arguments("cooijmans", True, False)
    with pytest.raises(RuntimeError, match=r"lengths must be int64 \[3\]"):
        torch.ops.bnlstm.layer_forward(*args._replace(lengths=args.lengths.int()))
    with pytest.raises(RuntimeError, match=r"h0 must have shape \[3, 5\], got \[2, 5\]"):
        torch.ops.bnlstm.layer_forward(*args._replace(h0=torch.randn(2, 5, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match=r"params must hold 7 tensors \(weight_ih, .*\), got 6"):
        torch.ops.bnlstm.layer_forward(*args._replace(params=args.params[:6]))
    without_gamma_hh = list(args.params)
    without_gamma_hh[4] = torch.empty(0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="gamma_hh is required by this variant"):
        torch.ops.bnlstm.layer_forward(*args._replace(params=without_gamma_hh))
    evaluation = op_arguments("cooijmans", False, False)
    running = list(evaluation.running)
    running[2] = torch.empty(0, dtype=torch.float64)  # running mean_hh in evaluation
    with pytest.raises(RuntimeError, match="running_mean_hh is required in evaluation"):
        torch.ops.bnlstm.layer_forward(*evaluation._replace(running=running))
    with pytest.raises(RuntimeError, match=r"running must hold 6 tensors"):
        torch.ops.bnlstm.layer_forward(*evaluation._replace(running=running[:4]))
    with pytest.raises(RuntimeError, match="operand_dtype must be None, float16 or bfloat16, got Float"):
        torch.ops.bnlstm.layer_forward(*args._replace(operand_dtype=torch.float32))
    backward_args, _ = op_backward_arguments(args)
    with pytest.raises(RuntimeError, match="operand_dtype must be None, float16 or bfloat16, got Double"):
        torch.ops.bnlstm.layer_backward(*backward_args[:-1], torch.float64)
    with pytest.raises(RuntimeError, match=r"statistics must hold 6 tensors"):
        torch.ops.bnlstm.layer_backward(*backward_args[:9], backward_args[9][:5], *backward_args[10:])


def test_backward_without_reserve_says_why():
    args = op_arguments("cooijmans", True, False, keep_reserve=False)
    args.x.requires_grad_(True)  # x: the output needs a gradient it cannot get
    out = torch.ops.bnlstm.layer_forward(*args)[0]
    with pytest.raises(RuntimeError, match="keep_reserve=False"):
        out.sum().backward()


def test_auto_falls_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "_cpu_problem", lambda: "no C++ compiler: `c++` is not on PATH")
    monkeypatch.setattr(backends, "_fallback_warned", False)
    with pytest.warns(UserWarning, match="slow reference implementation; no C\\+\\+ compiler"):
        assert backends.resolve_backend("auto", torch.device("cpu")) is bnlstm_cuda.bnlstm_layer_reference
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.resolve_backend("auto", torch.device("cpu"))  # the second time is silent
    with pytest.raises(RuntimeError, match='backend="cpu" is unavailable: no C\\+\\+ compiler'):
        backends.resolve_backend("cpu", torch.device("cpu"))
    assert backends.available_backends("cpu") == ("reference",)


def test_cpu_backend_refuses_other_devices():
    with pytest.raises(ValueError, match='backend="cpu" runs on CPU tensors; the input is on meta'):
        backends.resolve_backend("cpu", torch.device("meta"))


def test_missing_compiler_is_reported(monkeypatch):
    from bnlstm_cuda import build

    monkeypatch.setenv("CXX", "no-such-compiler-bnlstm")
    assert "no C++ compiler: `no-such-compiler-bnlstm` is not on PATH" in build.missing_tools()


def test_concurrent_first_use_builds_once(tmp_path):
    """Two processes that load the extension at once into an empty cache: one compiles, the
    other waits on the lock and reuses the build."""
    script = textwrap.dedent(
        """
        import torch
        from bnlstm_cuda import BNLSTM
        out, _ = BNLSTM(3, 4, backend="cpu")(torch.randn(5, 2, 3))
        print("shape", tuple(out.shape))
        """
    )
    env = dict(os.environ, BNLSTM_CACHE_DIR=str(tmp_path), PYTHONPATH=str(Path(bnlstm_cuda.__file__).parents[1]))
    processes = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=900) for p in processes]
    for process, (stdout, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr
        assert "shape (5, 2, 4)" in stdout
    messages = sum(stderr.count("compiling the CPU extension") for _, stderr in results)
    assert messages == 1, [stderr for _, stderr in results]
    assert len(list(tmp_path.glob("cpu-*/bnlstm_cpu.so"))) == 1
