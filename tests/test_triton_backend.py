"""The Triton backend's own parts against the float64 reference: several batch tiles, the
backward step kernel's gradient of h and its switch, the constexpr sets `build --triton`
compiles, float32/float16/bfloat16 against float64, the TF32 GEMM, inference without a
reserve, the registered operators (opcheck, the same results as the CPU operators,
torch.compile and torch.export), and the step launcher. What every backend must do (the paper, the layer against the
reference, start_step and streaming, odd sizes, a training step captured in a CUDA graph) is
tests/test_backend_behaviours.py, for backend="triton" too.

Where a GPU is visible the kernels are compiled and run on CUDA tensors (the GPU suite of
the Triton backend); elsewhere they run in Triton's interpreter (TRITON_INTERPRET=1) on CPU
tensors. Shapes are tiny on purpose: the interpreter runs each program instance in Python.
"""
import math

import pytest
import torch

from bnlstm_cuda import triton_layer
import helpers

# helpers.prepare_triton: compiled kernels on a GPU, the interpreter elsewhere.
DEVICE, _why_not = helpers.prepare_triton()
if _why_not is not None:
    pytest.skip(_why_not, allow_module_level=True)
ON_GPU = DEVICE == "cuda"
import triton  # noqa: E402

from bnlstm_cuda import BNLSTM, backends, get_variant, reference  # noqa: E402
from bnlstm_cuda.reference import bnlstm_layer_reference  # noqa: E402
from helpers import random_layer  # noqa: E402

VARIANTS = ["cooijmans", "laurent_step", "laurent_sequence", "none"]
# float64 throughout: the kernels compute in float64 too, so they must agree with the
# reference to rounding; 1e-9 rather than 1e-10 because B = 3 batch norms with random
# gammas amplify rounding (gradients up to ~2e-11 apart were seen).
TOL = dict(rtol=1e-9, atol=1e-9)

# The overflow of exp in sigmoid on padded rows (normalized with a one-row variance of 0)
# is harmless: those values are masked out. numpy warns about it in the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def assert_layers_match(variant, lengths=None, tol=TOL, **kwargs):
    helpers.assert_layer_matches_reference(triton_layer.bnlstm_layer_triton, variant, lengths, tol=tol,
                                           device=DEVICE, **kwargs)


@pytest.mark.parametrize("variant", ["cooijmans", "laurent_sequence"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_several_batch_tiles(monkeypatch, variant, training):
    """B = 20 rows in tiles of 16: statistics merged across tiles, a ragged last tile."""
    monkeypatch.setattr(triton_layer, "MAX_BLOCK_B", 16)
    assert triton_layer.tile_config(20, 20, torch.float64).tiles == 2
    lengths = torch.tensor([5, 3, 4, 1, 2] * 4)
    assert_layers_match(variant, lengths, B=20, training=training, reverse=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tiles", [1, 2])
def test_gradient_of_h_in_the_step_kernel(monkeypatch, variant, tiles):
    """The backward step kernel's own grad_zh_{t+1} @ W_hh (taken by half-precision inputs) in
    float64 against the reference at 1e-9: padded rows carrying their gradient through, both
    directions' padding, one batch tile and two (B = 20 in tiles of 16)."""
    monkeypatch.setattr(triton_layer, "_fused_grad_h", lambda x: True)
    if tiles == 2:
        monkeypatch.setattr(triton_layer, "MAX_BLOCK_B", 16)
        assert_layers_match(variant, torch.tensor([5, 3, 4, 1, 2] * 4), B=20, training=True, reverse=True)
    else:
        assert_layers_match(variant, torch.tensor([5, 2, 4]), training=True)
        assert_layers_match(variant, torch.tensor([5, 2, 4]), training=False, reverse=True)


@pytest.fixture
def step_launchers(monkeypatch):
    """The _StepLauncher of every step loop the test runs, in order."""
    launchers = []
    init = triton_layer._StepLauncher.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        launchers.append(self)

    monkeypatch.setattr(triton_layer._StepLauncher, "__init__", spy)
    return launchers


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_compile_check_covers_the_launches(step_launchers, dtype):
    """Every constexpr set the layer launches (variants, training and evaluation, with and
    without gradients) is among those `build --triton` compiles for sm_90
    (triton_compile.layer_combinations), up to the dot precision and the interpreter's upcast,
    which depend on the device."""
    from bnlstm_cuda import triton_compile

    # A launch as (kernel, constexprs but the device-dependent ones).
    key = lambda name, constexprs: (name, tuple(sorted((k, v) for k, v in constexprs.items()
                                                       if k not in ("DOT_PRECISION", "DOT_UPCAST"))))
    for variant in VARIANTS:
        for training in (True, False):
            x, h0, c0, params, running = random_layer(variant, T=2, dtype=dtype, device=DEVICE)
            for grad in (True, False):
                inputs = [t.detach().clone().requires_grad_(grad) for t in (x, h0, c0)]
                result = triton_layer.bnlstm_layer_triton(*inputs, params, running, variant=get_variant(variant),
                                                          training=training, eps=1e-5)
                if grad:
                    result.output.float().sum().backward()
    launched = {key(launcher.kernel.__name__, launcher.constexprs) for launcher in step_launchers}
    name = {torch.float64: "fp64", torch.bfloat16: "bf16"}[dtype]
    compiled = {key(c["name"], c["constexprs"]) for c in triton_compile.layer_combinations() if c["operand"] == name}
    assert len(launched) >= 10 and launched <= compiled, sorted(launched - compiled)


def test_gradient_of_h_switch(monkeypatch):
    """BNLSTM_TRITON_GRAD_H chooses where half-precision inputs take grad_zh @ W_hh (default
    "torch"; float32 and float64 always go to torch), read by the forward pass (which refuses a bad value, naming
    the variable, before any work) and by the backward operator as it runs. Both choices give the same gradients: up to float32
    rounding under the interpreter, which multiplies in float32 either way; on a GPU up to
    TF32's (2^-11, relative to the gradient's scale), since the kernel's product is TF32 and
    torch's addmm IEEE float32, and a B = 3 batch norm amplifies the difference a few times."""
    half, single = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    monkeypatch.delenv("BNLSTM_TRITON_GRAD_H", raising=False)
    assert not triton_layer._fused_grad_h(half) and not triton_layer._fused_grad_h(single)
    monkeypatch.setenv("BNLSTM_TRITON_GRAD_H", "torch")
    assert not triton_layer._fused_grad_h(half)
    monkeypatch.setenv("BNLSTM_TRITON_GRAD_H", "kernel")
    assert triton_layer._fused_grad_h(half) and not triton_layer._fused_grad_h(single)
    monkeypatch.setenv("BNLSTM_TRITON_GRAD_H", "cublas")
    x, h0, c0, params, running = random_layer("cooijmans", device=DEVICE)
    with pytest.raises(ValueError, match='BNLSTM_TRITON_GRAD_H must be "kernel" or "torch", got \'cublas\''):
        triton_layer.bnlstm_layer_triton(x, h0, c0, params, running, variant=get_variant("cooijmans"),
                                         training=True, eps=1e-5)
    # Half-precision inputs both ways: the same gradients up to float32 rounding.
    x, h0, c0, params, running = random_layer("cooijmans", dtype=torch.float16, device=DEVICE)
    grads = {}
    for choice in ("kernel", "torch"):
        monkeypatch.setenv("BNLSTM_TRITON_GRAD_H", choice)
        inputs = [t.detach().clone().requires_grad_() for t in (x, h0, c0)]
        result = triton_layer.bnlstm_layer_triton(*inputs, params, running, variant=get_variant("cooijmans"),
                                                  training=True, eps=1e-5)
        result.output.float().sum().backward()
        grads[choice] = [t.grad.float() for t in inputs]
    # The backward operator reads the variable as it runs.
    result = triton_layer.bnlstm_layer_triton(*inputs, params, running, variant=get_variant("cooijmans"),
                                              training=True, eps=1e-5)
    monkeypatch.setenv("BNLSTM_TRITON_GRAD_H", "cublas")
    with pytest.raises(ValueError, match="BNLSTM_TRITON_GRAD_H must be"):
        result.output.float().sum().backward()
    relative = 8 * 2.0 ** -11 if ON_GPU else 1e-4
    for name, kernel, torch_ in zip(("x", "h0", "c0"), grads["kernel"], grads["torch"]):
        torch.testing.assert_close(kernel, torch_, rtol=relative, atol=relative * torch_.abs().max().item(),
                                   msg=lambda m: f"grad {name}: {m}")


def _error_against_float64(module, wide, x, lengths):
    """Max abs error of the output and of the input gradient of `module` (narrow dtype)
    against the float64 module `wide`, and the largest input gradient."""
    x64 = x.clone().requires_grad_(True)
    expected = wide(x64, lengths=lengths)[0]
    expected.pow(2).sum().backward()
    xn = x.to(module.weight_ih_l0.dtype).requires_grad_(True)
    out = module(xn, lengths=lengths)[0]
    out.float().pow(2).sum().backward()
    errors = ((out.double() - expected).abs().max().item(), (xn.grad.double() - x64.grad).abs().max().item())
    return errors, x64.grad.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_narrow_dtypes_against_float64(monkeypatch, dtype):
    """The Triton backend's error against the float64 reference is at most about twice that
    of plain PyTorch computing the same layer in `dtype` (the reference loop with its
    compute dtype forced to `dtype`), with the paper's initialisation."""
    wide = BNLSTM(6, 20, 1, bidirectional=True, max_length=4, backend="reference", dtype=torch.float64,
                  device=DEVICE)
    narrow = {backend: BNLSTM(6, 20, 1, bidirectional=True, max_length=4, backend=backend, device=DEVICE).to(dtype)
              for backend in ("reference", "triton")}
    for module in narrow.values():
        module.load_state_dict({k: v.to(dtype) if k.startswith(("weight", "bias", "gamma", "beta")) else v
                                for k, v in wide.state_dict().items()})
    # At least 4 active rows at every step: with 2, a batch norm maps them to +-1 and
    # amplifies any rounding difference without bound, which would test nothing.
    x = torch.randn(6, 8, 6, dtype=torch.float64, device=DEVICE)
    lengths = [6, 4, 5, 6, 6, 3, 6, 2]
    errors, grad_scale = _error_against_float64(narrow["triton"], wide, x, lengths)
    # Plain PyTorch in `dtype`: the reference with every operation in that dtype.
    monkeypatch.setattr(reference, "compute_dtype", lambda d: d)
    plain, _ = _error_against_float64(narrow["reference"], wide, x, lengths)
    monkeypatch.undo()
    # 2x: the STYLE rule; the 1e-6 floor covers float32, where both errors are at rounding.
    assert errors[0] <= 2 * plain[0] + 1e-6, (errors, plain)
    if dtype == torch.float16 and not math.isfinite(plain[1]):
        # Plain float16 cannot differentiate a batch norm here ((var + eps)^-1.5 overflows
        # 65504); the kernels keep statistics in float32 and round only the matrix operands,
        # so their gradient must stay within a few float16 ulps of its scale. On a GPU the
        # backward's products also round the float32 gradients to TF32, whose 10 mantissa
        # bits are float16's: twice the roundings, twice the budget.
        ulps = 8 if ON_GPU else 4
        assert errors[1] <= ulps * 2.0 ** -10 * grad_scale, (errors, grad_scale)
    else:
        assert errors[1] <= 2 * plain[1] + 1e-6, (errors, plain)
    assert narrow["triton"](x.to(dtype))[0].dtype == dtype
    for name, buffer in narrow["triton"].named_buffers():
        assert buffer.dtype == torch.float32, name  # running statistics stay float32


@pytest.mark.parametrize("layout", ["rows", "transposed"])
def test_tf32_matmul(layout):
    """The GEMM of the backward pass's products over all steps for half-precision inputs, on
    odd shapes over two tiles each way, an operand as rows or as a transposed view: float32
    products under the interpreter; TF32's on a GPU, whose rounding must show (and no more)."""
    if layout == "rows":
        a, b = torch.randn(150, 37, device=DEVICE), torch.randn(37, 131, device=DEVICE)
    else:
        a, b = torch.randn(37, 150, device=DEVICE).t(), torch.randn(131, 37, device=DEVICE).t()
    got = triton_layer._tf32_matmul(a, b)
    want = a.double() @ b.double()
    error = ((got.double() - want).abs().max() / want.abs().max()).item()
    if DEVICE == "cpu":
        assert error < 1e-6, error
    else:
        assert 1e-6 < error < 5e-3, error
    empty = triton_layer._tf32_matmul(a[:, :0], b[:0])
    assert empty.shape == (150, 131) and not empty.any()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_without_gradients_matches(training):
    """Under no_grad the forward pass keeps nothing for backward (in training the step
    statistics still go through the reserve as scratch) and computes the same thing."""
    x, h0, c0, params, running = random_layer("cooijmans", B=4, device=DEVICE)
    kwargs = dict(variant=get_variant("cooijmans"), training=training, eps=1e-5,
                  lengths=torch.tensor([5, 3, 5, 1], device=DEVICE))
    with torch.no_grad():
        got = triton_layer.bnlstm_layer_triton(x, h0, c0, params, running, **kwargs)
        want = bnlstm_layer_reference(x, h0, c0, params, running, **kwargs)
    for name in ("output", "h_n", "c_n"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **TOL, msg=lambda m: f"{name}: {m}")


# The registered operators --------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(variant, training):
    """bnlstm_triton::layer_forward and layer_backward against their fakes and the autograd
    formula they share with the C++ operators (schema, fake tensors, autograd registration,
    AOT dispatch): with and without a kept reserve, reversed with lengths, half-precision
    operands."""
    forward, backward = torch.ops.bnlstm_triton.layer_forward.default, torch.ops.bnlstm_triton.layer_backward.default
    args = helpers.op_arguments(variant, training, reverse=True, device=DEVICE)
    torch.library.opcheck(forward, args)
    torch.library.opcheck(forward, helpers.op_arguments(variant, training, reverse=False, keep_reserve=False,
                                                        device=DEVICE))
    backward_args, _ = helpers.op_backward_arguments(args, forward=forward)
    torch.library.opcheck(backward, backward_args)
    without_input_args, _ = helpers.op_backward_arguments(args, input_grad=False, forward=forward)
    torch.library.opcheck(backward, without_input_args)
    half = helpers.op_arguments(variant, training, reverse=False, dtype=torch.float32, device=DEVICE)
    half = half._replace(lengths=None, start_step=1, operand_dtype=torch.bfloat16)
    torch.library.opcheck(forward, half)
    torch.library.opcheck(backward, helpers.op_backward_arguments(half, operand_dtype=torch.bfloat16,
                                                                  forward=forward)[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_operators_match_the_cpu_operators(variant):
    """Given the same arguments, bnlstm_triton's operators return what bnlstm's CPU operators
    do, to float64 rounding: outputs, statistics, the projection and every gradient; and
    reserves of the same shape (the Triton reserve keeps W_hh h_{t-1} unnormalized)."""
    if DEVICE != "cpu":
        pytest.skip("the C++ CPU operators take CPU tensors; this compares them under the interpreter")
    if "cpu" not in backends.available_backends("cpu"):
        pytest.skip("the CPU extension is unavailable here")
    for training in (True, False):
        args = helpers.op_arguments(variant, training, reverse=True, S=5)
        backward_triton, forward_triton = helpers.op_backward_arguments(
            args, forward=torch.ops.bnlstm_triton.layer_forward)
        backward_cpu, forward_cpu = helpers.op_backward_arguments(args)
        flat = lambda result: [t for part in result for t in (part if isinstance(part, list) else [part])]
        *got, got_reserve = flat(forward_triton)
        *want, want_reserve = flat(forward_cpu)
        assert got_reserve.shape == want_reserve.shape
        for index, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"forward result {index}: {m}")
        # The same output gradients into each backward, each with its own forward's results.
        backward_triton = backward_cpu[:7] + backward_triton[7:]
        got = flat(torch.ops.bnlstm_triton.layer_backward(*backward_triton))
        want = flat(torch.ops.bnlstm.layer_backward(*backward_cpu))
        for index, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"gradient {index}: {m}")


def test_torch_compile_and_export_see_the_operator():
    """torch.compile(fullgraph=True) of a training step keeps bnlstm_triton::layer_forward in
    the graph and differentiates it with the registered formula; torch.export of the layer
    function records the operator; both agree with eager."""
    module = helpers.make_module(input_size=3, hidden_size=5, backend="triton", device=DEVICE)
    x = torch.randn(4, 3, 3, dtype=torch.float64, device=DEVICE)
    traced = []

    def recording_backend(graph_module, example_inputs):
        traced.append(str(graph_module.graph))
        return graph_module.forward

    compiled = torch.compile(module, backend=recording_backend, fullgraph=True)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    module.eval()
    want = module(x_eager)[0]
    got = compiled(x_compiled)[0]
    assert "bnlstm_triton.layer_forward" in traced[0]
    torch.testing.assert_close(got, want, **TOL)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, **TOL)

    x1, h0, c0, params, running = random_layer("cooijmans", device=DEVICE)

    class Layer(torch.nn.Module):
        def forward(self, x):
            return triton_layer.bnlstm_layer_triton(x, h0, c0, params, running, variant=get_variant("cooijmans"),
                                                    training=False, eps=1e-5).output

    program = torch.export.export(Layer(), (x1,))
    assert "bnlstm_triton.layer_forward" in str(program.graph)
    torch.testing.assert_close(program.module()(x1), Layer()(x1), **TOL)


def test_step_launcher_calls_the_compiled_kernel_after_the_first_launch(monkeypatch):
    """_StepLauncher's protocol with Triton, on a stand-in kernel: the first launch goes through
    the JIT (`kernel[grid](*tensors, *scalars, num_warps=..., **constexprs)`), the later ones call
    the compiled kernel it returned with the grid padded to 3 dimensions, every argument in
    signature order and the tensors as their addresses, read once; a JIT that returns nothing
    (the interpreter) is called at every step."""
    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("compiled", grid, args, kwargs))

    class Kernel:
        arg_names = ["a_ptr", "b_ptr", "step", "B", "BLOCK", "FLAG"]

        def __init__(self, returns):
            self.returns = returns

        def __getitem__(self, grid):
            def jit(*args, **kwargs):
                calls.append(("jit", grid, args, kwargs))
                return self.returns
            return jit

    a, b = torch.zeros(3), torch.zeros(5)
    pointers = triton_layer._PointerArguments(a, b)
    addresses = (a.data_ptr(), b.data_ptr())
    launch = triton_layer._StepLauncher(Kernel(Compiled()), (7,), 8, FLAG=True, BLOCK=16)
    data_ptr, data_ptr_calls = torch.Tensor.data_ptr, []

    def counted_data_ptr(tensor):
        data_ptr_calls.append(tensor)
        return data_ptr(tensor)

    monkeypatch.setattr(torch.Tensor, "data_ptr", counted_data_ptr)
    for step in range(3):
        launch(pointers, step, 5)
    no_stream = dict(stream=None)  # CPU tensors: the compiled kernel reads the stream itself
    assert calls == [("jit", (7,), (a, b, 0, 5), dict(num_warps=8, FLAG=True, BLOCK=16)),
                     ("compiled", (7, 1, 1), (*addresses, 1, 5, 16, True), no_stream),
                     ("compiled", (7, 1, 1), (*addresses, 2, 5, 16, True), no_stream)]
    assert len(data_ptr_calls) == 2  # once for the loop, not at every launch
    monkeypatch.undo()
    calls.clear()
    # Triton 3.2 and earlier launch a compiled kernel with the run-time arguments only.
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    launch = triton_layer._StepLauncher(Kernel(Compiled()), (7,), 8, FLAG=True, BLOCK=16)
    launch(pointers, 0, 5)
    launch(pointers, 1, 5)
    assert calls[1] == ("compiled", (7, 1, 1), (*addresses, 1, 5), no_stream)
    monkeypatch.setattr(triton, "__version__", "3.6.0+git1234")
    assert triton_layer._StepLauncher(Kernel(None), (7,), 8, FLAG=True, BLOCK=16).constexpr_values == (16, True)
    calls.clear()
    launch = triton_layer._StepLauncher(Kernel(None), (2, 3), 4, BLOCK=16, FLAG=False)
    launch(pointers, 0, 5)
    launch(pointers, 1, 5)
    assert [call[0] for call in calls] == ["jit", "jit"]
    with pytest.raises(AssertionError, match="expected its last arguments to be"):
        triton_layer._StepLauncher(Kernel(None), (1,), 4, B=3, FLAG=False)


def test_step_kernels_reuse_the_compiled_kernel(step_launchers):
    """In a real layer call every _StepLauncher holds the compiled kernel after its first launch
    on a GPU, and none does under the interpreter (whose JIT returns no kernel)."""
    x, h0, c0, params, running = random_layer("cooijmans", device=DEVICE)
    x.requires_grad_()
    result = triton_layer.bnlstm_layer_triton(x, h0, c0, params, running, variant=get_variant("cooijmans"),
                                              training=True, eps=1e-5)
    result.output.sum().backward()
    assert [launcher.kernel.__name__ for launcher in step_launchers] == ["bnlstm_fwd_step_kernel",
                                                                         "bnlstm_bwd_step_kernel"]
    assert all((launcher.compiled is not None) == ON_GPU for launcher in step_launchers)


def test_device_and_dtype_errors_name_what_is_wrong(monkeypatch):
    with pytest.raises(ValueError, match='backend="triton" runs on CUDA tensors.*the input is on meta'):
        backends.resolve_backend("triton", torch.device("meta"))
    monkeypatch.setattr(triton_layer, "_kernels_interpreted", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1"):
        backends.resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="was imported before it was"):
        backends.resolve_backend("triton", torch.device("cpu"))
    monkeypatch.undo()
    monkeypatch.setattr(triton_layer, "_kernels_interpreted", lambda: True)
    with pytest.raises(ValueError, match="imported under TRITON_INTERPRET=1, which runs on CPU tensors only"):
        triton_layer.check_device(torch.device("cuda"))
    monkeypatch.undo()
    x, h0, c0, params, running = random_layer("cooijmans", device=DEVICE)
    with pytest.raises(ValueError, match=r"h0 must have shape \[3, 20\], got \[2, 20\]"):
        triton_layer.bnlstm_layer_triton(x, h0[:2], c0, params, running, variant=get_variant("cooijmans"),
                                         training=True, eps=1e-5)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 and float64 inputs; x is torch.int32"):
        triton_layer.bnlstm_layer_triton(x.int(), h0, c0, params, running, variant=get_variant("cooijmans"),
                                         training=True, eps=1e-5)
    assert "triton" in backends.BACKEND_NAMES
    assert BNLSTM(3, 4, backend="triton").backend == "triton"
