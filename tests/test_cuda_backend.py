"""The CUDA kernels (csrc/recurrent_cuda.cu) behind bnlstm::layer_forward / layer_backward,
what is theirs alone: float16 and bfloat16 inputs (the tensor-core GEMM of the step kernel,
the other GEMMs in TF32), opcheck of the CUDA ops, and B = 256, H = 2048 in float32. What every
backend must do (the paper, the layer against the reference, gradcheck, start_step, odd sizes,
float32 against float64, a training step captured in a CUDA graph) is
tests/test_backend_behaviours.py, for backend="cuda" too.

Everything but the last two tests needs a CUDA GPU and is skipped, visibly, without one. Those
two (backend errors, `python -m bnlstm_cuda.build --cuda` on a torch without CUDA) run
everywhere; CI builds the CUDA extension itself in .ci/run.
"""
import os

import pytest
import torch

from bnlstm_cuda import BNLSTM, LayerParams, backends
from bnlstm_cuda.ops import bnlstm_layer_fused
from bnlstm_cuda.reference import bnlstm_layer_reference
import helpers
from helpers import run_layer

VARIANTS = ["cooijmans", "laurent_step", "laurent_sequence", "none"]
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# tests/run_cuda_emulation.py runs the tests marked requires_gpu_or_emulation on CPU tensors
# against the kernels compiled for the CPU (csrc/tests/cuda_emulation.h), where no GPU is at hand.
EMULATED = os.environ.get("BNLSTM_CUDA_EMULATION") == "1"
DEVICE = "cpu" if EMULATED else "cuda"
requires_gpu_or_emulation = pytest.mark.skipif(not EMULATED and not torch.cuda.is_available(),
                                               reason="needs a CUDA GPU (or tests/run_cuda_emulation.py)")


def random_layer(variant, **kwargs):
    """helpers.random_layer on the device under test."""
    return helpers.random_layer(variant, device=DEVICE, **kwargs)


@pytest.fixture(scope="module")
def cuda_extension():
    if EMULATED:
        return  # the runner loaded the emulation library
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    problem = backends._cuda_problem()
    assert problem is None, problem


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.usefixtures("cuda_extension")
@requires_gpu_or_emulation
def test_half_precision_inputs(dtype):
    """Half-precision inputs: the recurrent GEMM multiplies h_{t-1} and W_hh in the input's
    dtype on tensor cores (fp32 accumulation), the other GEMMs in TF32, everything else is
    float32, rounded once at the end; the reference computes in float32. bf16 has 8 bits of
    mantissa (4e-3 relative): the outputs within a few ulps, the gradients of the input and of
    every parameter within 5e-2 (and 5% of a parameter's largest; bf16 measured here within
    2%), the running statistics (batch statistics of the rounded GEMM) within 1e-2."""
    backend = "cpu" if EMULATED else "cuda"  # the emulation registers the CUDA code for the CPU
    module = BNLSTM(8, 40, max_length=5, backend=backend, device=DEVICE).to(dtype)
    reference = BNLSTM(8, 40, max_length=5, backend="reference", device=DEVICE).to(dtype)
    reference.load_state_dict(module.state_dict())
    x = torch.randn(5, 6, 8, device=DEVICE).to(dtype)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    out, want = module(xs[0])[0], reference(xs[1])[0]
    assert out.dtype == dtype
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    out.float().pow(2).sum().backward()
    want.float().pow(2).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=5e-2, atol=5e-2)
    for (name, parameter), want_parameter in zip(module.named_parameters(), reference.parameters()):
        scale = want_parameter.grad.float().abs().max().item()
        torch.testing.assert_close(parameter.grad.float(), want_parameter.grad.float(), rtol=5e-2, atol=5e-2 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name, buffer in module.named_buffers():
        torch.testing.assert_close(buffer, getattr(reference, name), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("operands", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant,training", [("cooijmans", True), ("cooijmans", False), ("laurent_step", True),
                                              ("laurent_sequence", False), ("none", True)])
# With BNLSTM_EMULATED_SMS=4 (the emulation's default) H = 72 takes blocks of 16 units (K in
# chunks of 64: two, ragged), H = 200 blocks of 32 (chunks of 32), H = 24 and 37 blocks of 8
# (one chunk of 128); H = 37 takes the 2-byte loads (rows not 16-byte aligned), the rest
# 16-byte loads; B = 70 two row tiles. On an H100 every H here takes blocks of 8.
@pytest.mark.parametrize("B,H", [(3, 72), (70, 24), (5, 37), (4, 200)], ids=["B3-H72", "B70-H24", "B5-H37", "B4-H200"])
@pytest.mark.usefixtures("cuda_extension")
@requires_gpu_or_emulation
def test_tensor_core_gemm_rounds_h_and_weights(operands, variant, training, B, H):
    """With operand_dtype (what half-precision inputs pass), the step kernel's own
    GEMM multiplies h_{t-1} and W_hh rounded to that dtype, accumulating in float32: the whole
    sequence matches the same operator run step by step on rounded operands in float32, over
    ragged row and K tiles, both load widths, padding and evaluation slots.
    "Matches": the root-mean-square difference of every result is at most a fraction of the
    unrounded float32 call's, not elementwise: a float32 difference in the order of the sums
    (the tensor cores' accumulation against the step-by-step GEMM's) can flip how an h value
    rounds, which then moves its whole row. The fraction is 5% for bfloat16 and 25% for
    float16, whose rounding grid is 8 times finer, so the same float32 differences cross it 8
    times as often while the unrounded call's difference shrinks with the grid
    (docs/CUDA.md has the measured fractions)."""
    args = helpers.op_arguments(variant, training, reverse=False, T=4, B=B, I=6, H=H, dtype=torch.float32,
                                device=DEVICE)
    params = list(args.params)
    params[1] = (params[1] * H ** -0.5).detach()  # W_hh at the usual scale: gates of order 1, not saturated
    # x and W_ih as half-precision inputs bring them: the TF32 input projection is then exact,
    # the same in the step-by-step calls without operand_dtype.
    params[0] = params[0].detach().to(operands).float()
    lengths = torch.randint(1, 5, (B,), device=DEVICE)
    lengths[0] = 4  # every step has an active row
    args = args._replace(x=args.x.detach().to(operands).float(), lengths=lengths, params=params)
    with torch.no_grad():
        got = torch.ops.bnlstm.layer_forward(*args._replace(operand_dtype=operands))
        want = helpers.run_op_step_by_step(args, operands)
        unrounded = torch.ops.bnlstm.layer_forward(*args)
    rms = lambda d: d.pow(2).mean().sqrt().item() if d.numel() else 0.0
    fraction = 0.25 if operands == torch.float16 else 0.05
    names = ("output", "h_n", "c_n", "mean_ih", "var_ih", "mean_hh", "var_hh", "mean_c", "var_c")
    flat = lambda result: (*result[:3], *result[3])
    for name, g, w, u in zip(names, flat(got), want, flat(unrounded)):
        w = w[:g.shape[0]]  # sequence-wise input statistics: one row, the same at every step
        assert g.shape == w.shape, name
        assert rms(g - w) <= fraction * rms(u - w) + 1e-6, (name, rms(g - w), rms(u - w))
    assert rms(unrounded[0] - want[0]) > 1e-5  # the rounding is visible in the output


@pytest.mark.parametrize("operands", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", ["cooijmans", "laurent_sequence", "none"])
@pytest.mark.usefixtures("cuda_extension")
@requires_gpu_or_emulation
def test_half_precision_gemms_in_tf32(operands, variant):
    """With operand_dtype, the layer's float32 GEMMs (the input projection, the per-step
    gradient of h_{t-1}, the weight gradients, grad_x) multiply in TF32, whatever allow_tf32
    says: exactly where both operands hold half-precision values, as the projection's do, and
    within TF32's rounding (2^-11) where one is a float32 state or gradient. Every GEMM layout
    the host code uses (transposed views, accumulation) goes through here."""
    T, B, I, H = 5, 3, 6, 20
    args = helpers.op_arguments(variant, True, reverse=False, T=T, B=B, I=I, H=H, dtype=torch.float32,
                                device=DEVICE)
    rounded = lambda t: t.detach().to(operands).float()
    params = [p.detach() for p in args.params]
    params[0] = rounded(params[0])  # x, W_ih: values half-precision inputs bring
    params[1] = rounded(params[1]) * 0.25  # W_hh at about the usual scale (a power of two keeps it exact)
    args = args._replace(x=rounded(args.x), h0=args.h0.detach(), c0=args.c0.detach(),
                         lengths=torch.tensor([5, 3, 4], device=DEVICE), params=params)
    active = (torch.arange(T, device=DEVICE)[:, None] < args.lengths[None, :]).double()[..., None]
    exact_projection = torch.einsum("tbi,gi->tbg", args.x.double(), params[0].double()) * active
    rms = lambda d: d.double().pow(2).mean().sqrt().item()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # operand_dtype=None: IEEE float32 products
    try:
        backward_args, forward = helpers.op_backward_arguments(args._replace(operand_dtype=operands))
        with torch.no_grad():
            unrounded_x = args.x + 1e-3 * torch.randn_like(args.x)  # x no longer half-precision values
            projection_of_unrounded = torch.ops.bnlstm.layer_forward(
                *args._replace(x=unrounded_x, operand_dtype=operands))[4]
        projection = forward[4]
        if variant != "none":  # the projection is kept for the backward pass where it is normalized
            torch.testing.assert_close(projection.double(), exact_projection, rtol=1e-6, atol=1e-5)
            exact = torch.einsum("tbi,gi->tbg", unrounded_x.double(), params[0].double()) * active
            error = rms(projection_of_unrounded - exact) / rms(exact)
            assert 2e-5 < error < 2e-3, error  # TF32's rounding of x, visible
        tf32 = torch.ops.bnlstm.layer_backward(*backward_args[:-1], operands)
        ieee = torch.ops.bnlstm.layer_backward(*backward_args[:-1], None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    # TF32's rounding of the gradients, visible in grad_x, grad_weight_hh and grad_h0.
    helpers.assert_backward_within_rounding(tf32, ieee, visible=("grad_x", "grad_weight_hh", "grad_h0"))


def op_arguments(*args, **kwargs):
    """helpers.op_arguments on the GPU."""
    return helpers.op_arguments(*args, device="cuda", **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.usefixtures("cuda_extension")
@pytest.mark.cuda
@requires_gpu
def test_opcheck_cuda_ops(variant, training):
    args = op_arguments(variant, training, reverse=training)
    torch.library.opcheck(torch.ops.bnlstm.layer_forward.default, args)
    torch.library.opcheck(torch.ops.bnlstm.layer_forward.default,
                          op_arguments(variant, training, reverse=False, keep_reserve=False))
    backward_args, _ = helpers.op_backward_arguments(args)
    torch.library.opcheck(torch.ops.bnlstm.layer_backward.default, backward_args)
    # With operand_dtype, as half-precision inputs call it: the GEMMs in TF32.
    torch.library.opcheck(torch.ops.bnlstm.layer_backward.default, backward_args[:-1] + (torch.bfloat16,))


@pytest.mark.usefixtures("cuda_extension")
@pytest.mark.cuda
@requires_gpu
def test_large_batch_and_hidden_float32():
    """B = 256, H = 2048 in float32 (the sizes the kernels promise), against the float32
    reference on the GPU, forward and backward."""
    torch.backends.cuda.matmul.allow_tf32 = False
    x, h0, c0, params, running = random_layer("cooijmans", T=3, B=256, I=64, H=2048)
    to32 = lambda t: None if t is None else t.float()
    x, h0, c0 = x.float(), h0.float(), c0.float()
    params = LayerParams(*(to32(p) for p in params))
    lengths = torch.randint(1, 4, (256,), device="cuda")
    want, want_grads = run_layer(bnlstm_layer_reference, x, h0, c0, params, {}, "cooijmans", lengths=lengths,
                                 training=True)
    got, got_grads = run_layer(bnlstm_layer_fused, x, h0, c0, params, {}, "cooijmans", lengths=lengths,
                               training=True)
    for name in ("output", "h_n", "c_n"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4)
    for name, grad in want_grads.items():
        scale = grad.abs().max().item() + 1e-6
        assert (got_grads[name] - grad).abs().max().item() <= 1e-3 * scale, name


def test_backend_errors_without_a_gpu():
    with pytest.raises(ValueError, match='backend="cuda" runs on CUDA tensors; the input is on cpu'):
        backends.resolve_backend("cuda", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='backend="cuda" is unavailable: '):
            backends.resolve_backend("cuda", torch.device("cuda"))
        assert "cuda" not in backends.available_backends("cuda")


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the message of a torch without CUDA")
def test_build_cuda_refuses_a_torch_without_cuda(capsys):
    from bnlstm_cuda import build

    assert build.main(["--cuda"]) == 1
    assert "is not a CUDA build; install a CUDA build of torch" in capsys.readouterr().err
