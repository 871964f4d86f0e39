"""What every backend must do, written once and run for each name in backends.REGISTRY
(the `backend` fixture): two bidirectional layers against the independent float64
implementation of docs/SEMANTICS.md (tests/paper_reference.py), running statistics over
repeated calls, the layer function against the reference in float64 (outputs, final states,
batch statistics and every gradient) and under gradcheck, start_step and streaming, odd
sizes, float32 against float64, and a training step captured in a CUDA graph.

Each backend runs on its own device: "cuda" on CUDA tensors, "triton" on CUDA tensors where
a GPU is visible and in Triton's interpreter on CPU tensors elsewhere, the others on CPU
tensors. A backend that cannot run there is skipped, visibly, with the registry's reason.
What belongs to one backend alone (the CPU's vector code and thread blocks, the CUDA kernels'
tensor-core GEMM, the Triton tiles) stays in tests/test_<backend>_backend.py.

Test names avoid the backends' names, so that `-k cpu`, `-k cuda` or `-k triton` selects one
backend's cases (tests/run_cuda_emulation.py, benchmarks/gpu_check.sh, .ci/run).
"""
from typing import Callable, NamedTuple

import pytest
import torch

from bnlstm_cuda import LayerParams, backends, get_variant
import helpers
from helpers import assert_layer_matches_reference, assert_matches_paper, make_module

VARIANTS = ["cooijmans", "laurent_step", "laurent_sequence", "none"]
BACKENDS = list(backends.REGISTRY)
FUSED = [name for name in BACKENDS if name != "reference"]  # those compared with the reference
GPU_ONLY = ["cuda", "triton"]  # those that run on CUDA tensors (Triton: where a GPU is visible)

# The overflow of exp in sigmoid on padded rows (normalized with a one-row variance of 0)
# is harmless: those values are masked out. numpy warns about it in Triton's interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


class BackendUnderTest(NamedTuple):
    name: str
    device: str
    layer: Callable


def backend_device(name):
    """The device `name`'s tests run on here, and why they cannot run there (None: they can)."""
    if name == "triton":
        device, why_not = helpers.prepare_triton()
        if why_not is not None:
            return device, why_not
    else:
        device = "cuda" if name == "cuda" else "cpu"
    return device, backends.REGISTRY[name].unavailable(torch.device(device))


@pytest.fixture(params=BACKENDS)
def backend(request):
    """One backend of the registry on its device (tests narrow the list with
    `@pytest.mark.parametrize("backend", [...], indirect=True)`)."""
    device, why_not = backend_device(request.param)
    if why_not is not None:
        pytest.skip(f'backend="{request.param}" cannot run on {device} here: {why_not}')
    return BackendUnderTest(request.param, device, backends.REGISTRY[request.param].layer)


def in_interpreter(backend):
    return backend.name == "triton" and backend.device == "cpu"


# float64 against the paper: rounding only, but gradients grow with the hidden size and B = 3
# batch norms with random gammas amplify the rounding of differently ordered sums. At H = 5
# the reference and the CPU operators hold 1e-10; the GPU kernels order their reductions
# differently again (warp shuffles, tiles) and are held to 1e-9, as at H = 20, where the
# reference itself needs 1e-9.
PAPER_TOL = {"reference": 1e-10, "cpu": 1e-10, "cuda": 1e-9, "triton": 1e-9}


def paper_tol(backend, hidden_size):
    return PAPER_TOL[backend.name] if hidden_size <= 5 else 1e-9


# float64 layer against the reference: 1e-9, for the same amplification, at hidden sizes up
# to 2048 (SHAPES).
LAYER_TOL = dict(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("lengths, hidden_size", [(None, 5), ([5, 2, 4], 5), ([5, 2, 4], 20)],
                         ids=["full-H5", "lengths-H5", "lengths-H20"])
def test_two_layer_bidirectional_matches_paper(backend, variant, training, lengths, hidden_size):
    """Two bidirectional layers against tests/paper_reference.py: outputs, final states,
    running statistics after the call and the gradient of the input, h_0, c_0 and every
    parameter. T = 5 > max_length = 3: the tail steps share (and in training, all update)
    the last slot."""
    module = make_module(variant, input_size=3, hidden_size=hidden_size, num_layers=2, bidirectional=True,
                         max_length=3, backend=backend.name).to(backend.device)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    h0 = torch.randn(4, 3, hidden_size, dtype=torch.float64)
    c0 = torch.randn(4, 3, hidden_size, dtype=torch.float64)
    tol = paper_tol(backend, hidden_size)
    assert_matches_paper(module, x, h0, c0, lengths=lengths, training=training, tol=tol)


@pytest.mark.parametrize("variant", ["cooijmans", "laurent_sequence"])
def test_repeated_training_steps_match_paper(backend, variant):
    """Running statistics accumulate over calls exactly as the sequential rule says, also
    with one sequence left active at the last steps (no update there) and T=1."""
    module = make_module(variant, input_size=4, hidden_size=3, num_layers=1, max_length=2,
                         backend=backend.name).to(backend.device)
    for steps, lengths in ((6, [6, 1, 2]), (1, None), (3, [3, 3, 2])):
        x = torch.randn(steps, 3, 4, dtype=torch.float64)
        h0 = torch.randn(1, 3, 3, dtype=torch.float64)
        c0 = torch.randn(1, 3, 3, dtype=torch.float64)
        assert_matches_paper(module, x, h0, c0, lengths=lengths, training=True, tol=paper_tol(backend, 3))
    assert_matches_paper(module, x, h0, c0, lengths=[3, 1, 2], training=False, tol=paper_tol(backend, 3))


@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("direction", ["forward", "forward-lengths", "reverse-lengths"])
def test_layer_matches_reference(backend, variant, training, direction):
    """The layer function against the reference, both in float64 with NaN in the padding:
    outputs, final states, batch statistics and every gradient."""
    lengths = None if direction == "forward" else torch.tensor([5, 2, 4])
    assert_layer_matches_reference(backend.layer, variant, lengths, tol=LAYER_TOL,
                                   device=backend.device, training=training, reverse=direction.startswith("reverse"))


# (The reference's own gradcheck is tests/test_reference.py's.)
@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_layer_gradcheck(backend, variant, training, reverse):
    """gradcheck of the layer function in float64 (T = 4, B = 3, H = 5, lengths 4, 2, 1) with
    respect to x, h_0, c_0 and every parameter the variant has."""
    if in_interpreter(backend):
        pytest.skip("gradcheck's hundreds of layer calls are too slow in Triton's interpreter; "
                    "test_layer_matches_reference checks the gradients against the reference's")
    args = helpers.op_arguments(variant, training, reverse, device=backend.device)
    x, h0, c0, lengths = args.x, args.h0, args.c0, args.lengths
    params = [p if p.numel() else None for p in args.params]
    v = get_variant(variant)
    running = {} if training else helpers.random_layer(variant, H=5, device=backend.device)[4]
    inputs = [t for t in (x, h0, c0, *params) if t is not None]
    layout = [t is not None for t in params]

    def layer(x, h0, c0, *present):
        it = iter(present)
        full = LayerParams(*(next(it) if keep else None for keep in layout))
        result = backend.layer(x, h0, c0, full, running, variant=v, training=training, eps=1e-5,
                               lengths=lengths, reverse=reverse)
        return result.output, result.h_n, result.c_n

    assert torch.autograd.gradcheck(layer, tuple(inputs))


@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("variant", ["cooijmans", "laurent_step"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_start_step_uses_later_slots(backend, variant, training):
    """start_step = 2 with S = 3 slots: the steps read slot 2 in evaluation."""
    assert_layer_matches_reference(backend.layer, variant, torch.tensor([5, 1, 3]), tol=LAYER_TOL,
                                   device=backend.device, training=training, start_step=2)


@pytest.mark.parametrize("backend", FUSED, indirect=True)
def test_streaming_updates_running_statistics_as_the_reference(backend):
    """A training chunk at start_step = 2 updates the slots that the reference updates."""
    modules = {
        name: make_module("cooijmans", input_size=3, hidden_size=20, max_length=3, backend=name).to(backend.device)
        for name in ("reference", backend.name)
    }
    modules[backend.name].load_state_dict(modules["reference"].state_dict())
    x = torch.randn(4, 3, 3, dtype=torch.float64, device=backend.device)
    results = {name: module(x, lengths=[4, 2, 3], start_step=2) for name, module in modules.items()}
    torch.testing.assert_close(results[backend.name][0], results["reference"][0], **LAYER_TOL)
    for name, buffer in modules["reference"].named_buffers():
        torch.testing.assert_close(getattr(modules[backend.name], name), buffer, **LAYER_TOL,
                                   msg=lambda m: f"{name}: {m}")


# (T, B, H, lengths): one step of one sequence; one step; 63 steps; H not a multiple of any
# block's units; a batch of 300 rows (many passes of every row lane, more than 256); H = 2048
# (many blocks).
SHAPES = {
    "T1-B1-H7": (1, 1, 7, None),
    "T1-B3-H200": (1, 3, 200, None),
    "T63-B3-H20": (63, 3, 20, [63, 17, 1]),
    "T4-B300-H37": (4, 300, 37, "random"),
    "T3-B5-H2048": (3, 5, 2048, [3, 1, 2, 3, 2]),
}
# Triton's interpreter runs every program instance in Python: these take minutes there.
SLOW_IN_INTERPRETER = {"T63-B3-H20", "T4-B300-H37", "T3-B5-H2048"}


@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("variant", ["cooijmans", "laurent_step", "laurent_sequence"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_odd_sizes(backend, shape, variant, training):
    """The layer against the reference in float64 (LAYER_TOL), reversed, on SHAPES."""
    if in_interpreter(backend) and shape in SLOW_IN_INTERPRETER:
        pytest.skip(f"{shape} is too slow in Triton's interpreter; it runs on a GPU")
    T, B, H, lengths = SHAPES[shape]
    if lengths == "random":
        lengths = torch.randint(1, T + 1, (B,))
    elif lengths is not None:
        lengths = torch.tensor(lengths)
    assert_layer_matches_reference(backend.layer, variant, lengths, tol=LAYER_TOL,
                                   device=backend.device, T=T, B=B, H=H, I=11, training=training, reverse=True)


@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_against_float64_reference(backend, variant):
    """docs/ACCURACY.md's rule: the float32 backend's error against the float64 reference is
    at most about twice that of the float32 reference (plain PyTorch in float32; TF32 off on
    a GPU), as a geometric mean over random problems (helpers.float32_error_ratios: one
    problem's ratio is noise), with the paper's initialisation (gamma 0.1). On the CPU,
    steps with 2 and 1 active sequences; on a GPU, H = 200 and 70 sequences of random lengths."""
    if in_interpreter(backend):
        pytest.skip("24 problems of two bidirectional layers are too slow in Triton's interpreter; "
                    "tests/test_triton_backend.py::test_narrow_dtypes_against_float64 checks float32 there")
    if backend.device == "cpu":
        problem = dict(hidden_size=20, batch=7, lengths=[12, 3, 7, 12, 1, 9, 10])
    else:
        problem = dict(hidden_size=200, batch=70, lengths=torch.randint(1, 13, (70,)))
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ratios = helpers.float32_error_ratios(variant, backend.name, device=backend.device, **problem)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    assert max(ratios) <= 2, ratios


def requires_gpu(backend):
    if backend.device != "cuda":
        pytest.skip(f'backend="{backend.name}" runs on {backend.device} here: this test needs a CUDA GPU')


@pytest.mark.parametrize("backend", GPU_ONLY, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_step_captured_in_a_graph_matches_eager(backend, dtype):
    """Forward and backward of a training step captured in a CUDA graph (no host
    synchronisation inside the layer) give what eager execution gives. bf16 takes the
    half-precision paths: the CUDA kernels' tensor-core GEMM inside the step kernel
    (version 2), the Triton kernels' half-precision operands and TF32 GEMMs over all steps
    (the per-step gradient of h by torch between launches, BNLSTM_TRITON_GRAD_H's default)."""
    requires_gpu(backend)
    helpers.assert_graph_step_matches_eager(backend.name, dtype)


@pytest.mark.parametrize("backend", GPU_ONLY, indirect=True)
def test_layer_on_a_device_that_is_not_current(backend):
    """The host code and kernels run under a guard for the tensors' device, not the current
    one (Triton launches on the current device: the layer makes it the tensors' own)."""
    requires_gpu(backend)
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    assert torch.cuda.current_device() == 0
    assert_layer_matches_reference(backend.layer, "cooijmans", torch.tensor([5, 2, 4]),
                                   tol=LAYER_TOL, device="cuda:1", training=True)
