"""The Triton backend: the operators `bnlstm_triton::layer_forward` and `layer_backward`
(kernels: triton_kernels.py).

They have the schemas of the C++ operators (ops.FORWARD_SCHEMA, BACKWARD_SCHEMA) and are
registered with torch.library as custom operators, with the C++ operators' fake kernels and
autograd formula (ops.register_layer_operators), so torch.compile, torch.export and opcheck
see them as they see bnlstm::layer_forward. `bnlstm_layer_triton` has the signature of
`reference.bnlstm_layer_reference`. Forward:

    W_ih x for all steps            torch.matmul, in the operand dtype    [T, B, 4H]
    input batch norm + bias         bnlstm_input_bn_kernel, all steps     [T, B, 4H]
    per step t                      bnlstm_fwd_step_kernel               (T launches)

Backward: per step (last to first) bnlstm_bwd_step_kernel, with the gradient of h_t from
step t + 1's grad_zh @ W_hh by torch between launches (or, for half-precision inputs where
asked, inside the kernel: _fused_grad_h); then the weight and input gradients as GEMMs
over all steps, and the bias, gamma and beta gradients as sums of per-step column sums.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set
before this module's kernels are imported: Triton reads it when a kernel is decorated).
float32 and float64 inputs compute in their own dtype; float16 and bfloat16 inputs reach the
operators in float32 with their dtype as operand_dtype, multiply in it with float32
accumulation and keep statistics, cell state and everything the backward pass reads in
float32.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from .layer_api import LayerParams, LayerResult, RunningStats, active_mask, compute_dtype, reverse_padded
from .ops import (BACKWARD_SCHEMA, FORWARD_SCHEMA, INPUT_STATISTICS, LayerOperators, register_layer_operators,
                  run_layer, running_dict)
from .variants import Variant

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Batch rows per tile of the step kernels. A tile's four gate accumulators live in
# registers (4 x MAX_BLOCK_B x BLOCK_H floats); larger batches loop over tiles.
MAX_BLOCK_B = 64
# Input batch norm: rows per tile and features per program.
INPUT_BLOCK_R = 32
INPUT_BLOCK_F = 64
NUM_WARPS = 4
# The step kernels hold 4 gate tiles of BLOCK_B x BLOCK_H floats (and, backward, their
# statistics and gradients): 8 warps halve the registers a thread needs for them.
STEP_NUM_WARPS = 8
# tf32_matmul_kernel's tiles, for products of hundreds to thousands of rows and columns.
MATMUL_BLOCK_M, MATMUL_BLOCK_N, MATMUL_BLOCK_K = 128, 128, 32
MATMUL_NUM_WARPS = 8
# K chunk of the backward step's grad_zh @ W_hh (float32 or float64 operands).
GRAD_H_BLOCK_K = 32


class TileConfig(NamedTuple):
    """Tile sizes of the step kernels for one problem (tl.dot needs every side >= 16)."""

    block_b: int  # batch rows per tile
    block_h: int  # hidden units per program (each with its four gate columns)
    block_k: int  # reduction chunk of W_hh h_{t-1}
    tiles: int  # batch tiles, cdiv(B, block_b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tile_config(batch: int, hidden: int, dtype: torch.dtype) -> TileConfig:
    """Step-kernel tiles: the batch in one tile up to MAX_BLOCK_B rows; 32 hidden units a
    program from H = 512 on (more programs than SMs below that matters more than tile
    efficiency); K chunks of 64 for 2-byte operands, 32 for wider ones."""
    block_b = min(max(16, _next_power_of_2(batch)), MAX_BLOCK_B)
    block_h = 32 if hidden >= 512 else 16
    block_k = min(64 if dtype in (torch.float16, torch.bfloat16) else 32, max(16, _next_power_of_2(hidden)))
    return TileConfig(block_b, block_h, block_k, -(-batch // block_b))


def interpreter_requested() -> bool:
    """TRITON_INTERPRET is set to a true value in this process's environment."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no")


def _kernels():
    """The kernel module, imported on first use (importing bnlstm_cuda must not need triton)."""
    try:
        from . import triton_kernels
    except ImportError as error:
        raise RuntimeError(f'backend="triton" needs the triton package (pip install triton): {error}') from error
    return triton_kernels


def _kernels_interpreted() -> bool:
    return type(_kernels().bnlstm_fwd_step_kernel).__name__ == "InterpretedFunction"


def check_device(device: torch.device) -> None:
    """Raise ValueError unless the Triton kernels can run on `device` here: CUDA tensors with
    compiled kernels, CPU tensors with kernels decorated under TRITON_INTERPRET=1 and the
    variable still set."""
    device = torch.device(device)
    interpreted = _kernels_interpreted()
    if device.type == "cuda" and not interpreted:
        return
    if device.type == "cpu" and interpreted:
        if not interpreter_requested():
            # Triton's interpreter reads it again when a kernel calls a helper function.
            raise ValueError('backend="triton" on CPU tensors: TRITON_INTERPRET=1 must stay set while the '
                             "interpreted kernels run; it is unset now")
        return
    if device.type == "cuda":
        raise ValueError(
            'backend="triton": the Triton kernels were imported under TRITON_INTERPRET=1, which runs '
            f"on CPU tensors only; the input is on {device}"
        )
    if device.type != "cpu":
        raise ValueError('backend="triton" runs on CUDA tensors (CPU tensors under TRITON_INTERPRET=1); '
                         f"the input is on {device}")
    if interpreter_requested():
        raise ValueError(
            'backend="triton": TRITON_INTERPRET=1 is set now, but bnlstm_cuda.triton_kernels was imported '
            "before it was (Triton reads it when a kernel is decorated); set it before the first import"
        )
    raise ValueError(
        'backend="triton" runs on CUDA tensors; CPU tensors need Triton\'s interpreter: set '
        f"TRITON_INTERPRET=1 before importing bnlstm_cuda.triton_kernels (the input is on {device})"
    )


class _Config(NamedTuple):
    variant: Variant
    training: bool
    eps: float
    start_step: int
    keep: bool  # keep what the backward pass reads


def _dot_precision(x: Tensor) -> str:
    # float32 products follow torch's own switch, as torch.matmul does on the same tensors.
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


GRAD_H_CHOICE = "BNLSTM_TRITON_GRAD_H"


def forward_step_constexprs(variant: Variant, dtype: torch.dtype, batch: int, hidden: int, *, training: bool,
                            keep: bool, precision: str, upcast: bool) -> dict:
    """The constexprs of bnlstm_fwd_step_kernel for one layer call (`precision`: _dot_precision
    of the input; `upcast`: bfloat16 under the interpreter). Shared with triton_compile, which
    compiles every combination for sm_90."""
    tiles = tile_config(batch, hidden, dtype)
    in_step_stats = training and (variant.normalize_recurrent or variant.normalize_cell)
    return dict(NORM_REC=variant.normalize_recurrent, NORM_CELL=variant.normalize_cell, TRAINING=training,
                KEEP=keep or in_step_stats, TILES=tiles.tiles if in_step_stats else 1, BLOCK_B=tiles.block_b,
                BLOCK_H=tiles.block_h, BLOCK_K=tiles.block_k, DOT_PRECISION=precision, DOT_UPCAST=upcast,
                H_OPERAND=dtype != compute_dtype(dtype))


def backward_step_constexprs(variant: Variant, dtype: torch.dtype, batch: int, hidden: int, *, training: bool,
                             fused_grad_h: bool, precision: str) -> dict:
    """The constexprs of bnlstm_bwd_step_kernel for one layer call (`precision`: that of its
    grad_zh @ W_hh, TF32 for half-precision inputs on a GPU). Shared with triton_compile."""
    tiles = tile_config(batch, hidden, dtype)
    return dict(NORM_INPUT=variant.input_statistics is not None, STEP_INPUT=variant.input_statistics == "step",
                NORM_REC=variant.normalize_recurrent, NORM_CELL=variant.normalize_cell, TRAINING=training,
                TILES=tiles.tiles, BLOCK_B=tiles.block_b, BLOCK_H=tiles.block_h, FUSED_GRAD_H=fused_grad_h,
                BLOCK_K=GRAD_H_BLOCK_K, DOT_PRECISION=precision)


def _fused_grad_h(x: Tensor) -> bool:
    """Whether the backward step kernel computes the gradient of h_t itself, grad_zh_{t+1} @ W_hh
    with tl.dot (K = 4H, TF32 on a GPU) before its other loops, rather than torch between
    launches: for float16/bfloat16 inputs (under the interpreter too, which multiplies in
    float32) when the environment variable BNLSTM_TRITON_GRAD_H is "kernel" as the forward
    pass runs. The default, "torch", is the faster of the two in every training step measured
    on a GPU (docs/TRITON.md); the benchmark compares them. With a float32 W_hh the product's
    tiles make the kernel spill several times more than with a half-precision one
    (benchmarks/results/triton_resource_usage.txt, docs/TRITON.md), so float32 and float64
    inputs always take torch's GEMM (cuBLAS, allow_tf32 as torch's)."""
    choice = os.environ.get(GRAD_H_CHOICE, "torch")
    if choice not in ("kernel", "torch"):
        raise ValueError(f'{GRAD_H_CHOICE} must be "kernel" or "torch", got {choice!r}')
    return choice == "kernel" and x.dtype in (torch.float16, torch.bfloat16)


def _tf32_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for float32 matrices (any strides) from TF32 products with float32 accumulation,
    whatever allow_tf32 says (the interpreter multiplies in float32): the backward pass's
    products over all steps for float16/bfloat16 inputs, whose weights and inputs TF32 holds
    exactly and whose float32 gradients it rounds to 10 mantissa bits, more than the 7 of
    bfloat16 that cuDNN uses, at several times IEEE float32's rate on tensor cores."""
    (rows, inner), columns = a.shape, b.shape[1]
    c = torch.empty(rows, columns, dtype=torch.float32, device=a.device)
    if c.numel() == 0 or inner == 0:
        return c.zero_()
    grid = (-(-rows // MATMUL_BLOCK_M), -(-columns // MATMUL_BLOCK_N))
    _kernels().tf32_matmul_kernel[grid](
        a, b, c, rows, columns, inner, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        PRECISION="tf32" if a.is_cuda else "ieee", BLOCK_M=MATMUL_BLOCK_M, BLOCK_N=MATMUL_BLOCK_N,
        BLOCK_K=MATMUL_BLOCK_K, num_warps=MATMUL_NUM_WARPS,
    )
    return c


def _launch_passes_constexprs() -> bool:
    """Whether Triton's JIT launches a compiled kernel with the constexprs among its arguments:
    from Triton 3.3 on (JITFunction.run passes bound_args.values()); 3.2 and earlier pass
    the run-time arguments only."""
    import triton

    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())
    return (major, minor) >= (3, 3)


class _PointerArguments:
    """A step kernel's tensor arguments (its leading ones), the same at every step of a loop.

    Triton's JIT launch reads them as tensors. The compiled kernel's launcher takes a pointer
    argument as an address too; given a tensor, it calls the tensor's data_ptr() and the
    driver's cuPointerGetAttribute for it at every launch, which addresses read once here
    skip (docs/TRITON.md, "Host time a step")."""

    __slots__ = ("tensors", "_addresses")

    def __init__(self, *tensors: Tensor):
        self.tensors = tensors
        self._addresses = None

    @property
    def addresses(self) -> tuple:
        if self._addresses is None:
            self._addresses = tuple(tensor.data_ptr() for tensor in self.tensors)
        return self._addresses


class _StepLauncher:
    """Launches one kernel at every step of a loop whose launches differ only in arguments
    that select no other compiled kernel: the same tensors (or buffers allocated alike that
    swap roles), scalars marked `do_not_specialize`, the same constexprs and grid.

    The first launch goes through Triton's JIT, which binds the arguments, specialises them,
    looks the kernel up in its cache (compiling it the first time) and returns it; the later
    launches call that compiled kernel directly (`CompiledKernel[grid](*arguments)`, as the
    JIT launches it: every argument in signature order from Triton 3.3 on, the run-time ones
    only before), with the tensors' addresses and the stream read once: the JIT's per-launch
    work is several times a step kernel's GPU time (docs/TRITON.md, "Host time a step").
    Under the interpreter every launch goes through the JIT, which returns nothing to call."""

    def __init__(self, kernel, grid, num_warps: int, **constexprs):
        # The constexprs, passed by name, must be the signature's last arguments: the compiled
        # kernel takes them after the run-time ones.
        names = kernel.arg_names[len(kernel.arg_names) - len(constexprs):]
        if sorted(names) != sorted(constexprs):
            raise AssertionError(f"{kernel.arg_names}: expected its last arguments to be {sorted(constexprs)}")
        self.kernel, self.grid, self.num_warps, self.constexprs = kernel, grid, num_warps, constexprs
        self.constexpr_values = tuple(constexprs[name] for name in names) if _launch_passes_constexprs() else ()
        self.compiled = None
        self.stream = None

    def __call__(self, pointers: _PointerArguments, *scalars) -> None:
        """One step: the kernel's tensor arguments, then its other run-time arguments."""
        if self.compiled is not None:
            self.compiled(*pointers.addresses, *scalars, *self.constexpr_values, stream=self.stream)
            return
        kernel = self.kernel[self.grid](*pointers.tensors, *scalars, num_warps=self.num_warps, **self.constexprs)
        if kernel is not None and hasattr(kernel, "__getitem__"):
            self.compiled = kernel[tuple(self.grid) + (1,) * (3 - len(self.grid))]
            # The stream the JIT launched on (the current one), read once; None lets the
            # compiled kernel read it at every launch, where the tensors are not CUDA's.
            device = pointers.tensors[0].device
            self.stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def _on_device(device: torch.device):
    """Within: `device` is the current CUDA device (a no-op for CPU tensors). Triton launches
    on the current device and its stream, whatever device the tensors are on."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _slots(start_step: int, steps: int, num_slots: int, device) -> Tensor:
    return (torch.arange(steps, device=device) + start_step).clamp(max=num_slots - 1)


def _forward_pass(x, h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, active, running,
                  config: _Config):
    """One layer-direction forward: x [T, B, I] (padding zeroed, processing order), h0, c0
    [B, H] and the parameters (None where absent) in the operand dtype; active [T, B] bool;
    running: RunningStats read in evaluation.

    Returns output [T, B, H] (processing order), h_n, c_n [B, H], the statistics each step
    used (0-row tensors where a part is not normalized: mean_ih, var_ih [T | 1, 4H],
    mean_hh, var_hh [T, 4H], mean_c, var_c [T, H]) and the reserve, all in the compute
    dtype; and the input projection W_ih x [T, B, 4H] in the operand dtype."""
    k = _kernels()
    variant = config.variant
    steps, batch, _ = x.shape
    hidden = weight_hh.shape[1]
    gates = 4 * hidden
    dtype = compute_dtype(x.dtype)
    new = lambda *shape: torch.empty(shape, dtype=dtype, device=x.device)
    tiles = tile_config(batch, hidden, x.dtype)
    norm_rec, norm_cell = variant.normalize_recurrent, variant.normalize_cell
    training, eps = config.training, config.eps
    active_i8 = active.to(torch.int8).contiguous()

    # Input side: one GEMM, then one batch-norm launch over all steps.
    projection = torch.matmul(x, weight_ih.t()).contiguous()  # [T, B, 4H], x's dtype
    mean_ih, var_ih = new(0, gates), new(0, gates)
    bias_c = bias.to(dtype).contiguous() if bias is not None else None
    if variant.input_statistics is None:
        xin = projection.to(dtype) + bias_c if bias_c is not None else projection.to(dtype).contiguous()
    else:
        xin = new(steps, batch, gates)
        gamma = gamma_ih.contiguous()
        launch = lambda grid, wx, act, stats_in, mean, var, out, rows, start, slots, compute_stats, apply: (
            k.bnlstm_input_bn_kernel[grid](
                wx, act, stats_in[0], stats_in[1], mean, var, gamma, bias if bias is not None else gamma, out,
                rows, gates, start, slots, eps, COMPUTE_STATS=compute_stats, APPLY=apply,
                HAS_BIAS=bias is not None, BLOCK_R=INPUT_BLOCK_R, BLOCK_F=INPUT_BLOCK_F, num_warps=NUM_WARPS))
        feature_blocks = -(-gates // INPUT_BLOCK_F)
        per_step_used = (new(steps, gates), new(steps, gates))
        if variant.input_statistics == "step":
            mean_ih, var_ih = per_step_used
            if training:
                launch((steps, feature_blocks), projection, active_i8, (mean_ih, var_ih), mean_ih, var_ih, xin,
                       batch, 0, 1, True, True)
            else:
                stats_in = running["ih"]
                launch((steps, feature_blocks), projection, active_i8, stats_in, mean_ih, var_ih, xin, batch,
                       config.start_step, stats_in[0].shape[0], False, True)
        else:
            # Sequence-wise: one set of statistics over every active position, then apply.
            if training:
                mean_ih, var_ih = new(1, gates), new(1, gates)
                launch((1, feature_blocks), projection, active_i8, (mean_ih, var_ih), mean_ih, var_ih, xin,
                       steps * batch, 0, 1, True, False)
            else:
                # Copies: the operator's results may not alias its inputs.
                mean_ih = running["ih"][0][:1].to(dtype, copy=True).contiguous()
                var_ih = running["ih"][1][:1].to(dtype, copy=True).contiguous()
            launch((steps, feature_blocks), projection, active_i8, (mean_ih, var_ih), *per_step_used, xin, batch,
                   0, 1, False, True)

    # Recurrent part: one launch per step.
    precision = _dot_precision(x)
    # Triton 3.9's interpreter multiplies bfloat16 tiles wrongly: upcast the rounded operands.
    upcast = x.dtype == torch.bfloat16 and _kernels_interpreted()
    constexprs = forward_step_constexprs(variant, x.dtype, batch, hidden, training=training, keep=config.keep,
                                         precision=precision, upcast=upcast)
    zh_off, gates_off, cnew_off, width = k.reserve_offsets(hidden, norm_rec)
    # KEEP: kept for the backward pass, or the step's statistics need it between loops.
    reserve = new(steps, batch, width) if constexprs["KEEP"] else new(steps, 1, 1)
    h_buffers = (h0.to(dtype).contiguous().clone(), new(batch, hidden))
    # h_{t-1} as the GEMM's operand: in W_hh's dtype where that is narrower (rounded as the
    # kernel would round it), else h_buffers themselves.
    h_ops = ((h_buffers[0].to(x.dtype), torch.empty(batch, hidden, dtype=x.dtype, device=x.device))
             if constexprs["H_OPERAND"] else h_buffers)
    c = c0.to(dtype).contiguous().clone()
    output = new(steps, batch, hidden)
    weight_hh_op = weight_hh.contiguous()
    dummy_h = new(1, hidden)

    def statistics(part, normalized, features):
        if not normalized:
            return new(0, features), new(0, features), (dummy_h, dummy_h)
        if training:
            mean, var = new(steps, features), new(steps, features)
            return mean, var, (mean, var)
        mean, var = running[part]
        slots = _slots(config.start_step, steps, mean.shape[0], mean.device)
        used = (mean[slots].to(dtype), var[slots].to(dtype))
        return used[0], used[1], (mean.contiguous(), var.contiguous())

    mean_hh, var_hh, kernel_hh = statistics("hh", norm_rec, gates)
    mean_c, var_c, kernel_c = statistics("c", norm_cell, hidden)
    gamma_hh_c = gamma_hh.contiguous() if norm_rec else dummy_h
    gamma_c_c = gamma_c.contiguous() if norm_cell else dummy_h
    beta_c_c = beta_c.contiguous() if norm_cell else dummy_h
    slots_hh = kernel_hh[0].shape[0]
    slots_c = kernel_c[0].shape[0]
    # The kernel indexes the [T, ...] tensors by step itself: a view sliced on the host
    # at every step (output[t], ...) costs a dispatcher call each (docs/TRITON.md).
    # With statistics in the step a program takes every batch tile (TILES of them), else one.
    grid = (-(-hidden // tiles.block_h), tiles.tiles // constexprs["TILES"])
    launch = _StepLauncher(k.bnlstm_fwd_step_kernel, grid, STEP_NUM_WARPS, **constexprs)
    # The tensors of even and of odd steps (h_{t-1} and h_t swap buffers).
    pointers = [_PointerArguments(h_buffers[p], h_buffers[1 - p], h_ops[p], h_ops[1 - p], c, output, xin,
                                  weight_hh_op, active_i8, gamma_hh_c, gamma_c_c, beta_c_c, kernel_hh[0],
                                  kernel_hh[1], kernel_c[0], kernel_c[1], reserve) for p in (0, 1)]
    for t in range(steps):
        # Statistics row: the step's own in training, slot min(start_step + t, S - 1) in
        # evaluation (hh and c have the same S slots).
        row = t if training else min(config.start_step + t, (slots_hh if norm_rec else slots_c) - 1)
        launch(pointers[t % 2], t, row, batch, hidden, reserve.shape[2], zh_off, gates_off, cnew_off, eps)
    h_n = h_buffers[steps % 2]

    stats = (mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c)
    return output, h_n, c, stats, projection, reserve


def _backward_pass(grad_output, grad_h_n, grad_c_n, x, h0, c0, weight_ih, weight_hh, gamma_ih, gamma_hh, gamma_c,
                   beta_c, active, projection, output, reserve, statistics, config: _Config, fused: bool,
                   input_grad: bool):
    """Gradients of one layer-direction from what _forward_pass returned (x, h0, c0, the
    parameters and the projection as it took or returned them; output, the reserve and the
    statistics in the compute dtype; grad_output [T, B, H] in processing order): grad_x
    (None unless input_grad), grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, and the
    gradients of bias, gamma_ih, gamma_hh, gamma_c, beta_c (all of them: the caller drops
    those of absent parts), in the compute dtype. fused: _fused_grad_h."""
    k = _kernels()
    mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c = statistics
    variant = config.variant
    steps, batch, _ = x.shape
    hidden = weight_hh.shape[1]
    gates = 4 * hidden
    dtype = compute_dtype(x.dtype)
    new = lambda *shape: torch.empty(shape, dtype=dtype, device=x.device)
    zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=x.device)
    grad_output = zeros(steps, batch, hidden) if grad_output is None else grad_output.to(dtype).contiguous()
    grad_h = zeros(batch, hidden) if grad_h_n is None else grad_h_n.to(dtype).contiguous().clone()
    grad_c = zeros(batch, hidden) if grad_c_n is None else grad_c_n.to(dtype).contiguous().clone()
    norm_input = variant.input_statistics is not None
    step_input = variant.input_statistics == "step"
    norm_rec, norm_cell, training = variant.normalize_recurrent, variant.normalize_cell, config.training
    tiles = tile_config(batch, hidden, x.dtype)
    zh_off, gates_off, cnew_off, width = k.reserve_offsets(hidden, norm_rec)
    active_i8 = active.to(torch.int8).contiguous()

    grad_gates = new(steps, batch, gates)
    grad_zh = new(steps, batch, gates) if norm_rec else grad_gates
    grad_wx = new(steps, batch, gates) if step_input else grad_gates
    sums = new(steps, 3 * gates + 2 * hidden)
    carry = new(batch, hidden)
    c0_c = c0.to(dtype).contiguous()
    dummy = new(1, gates)
    param = lambda p: p.contiguous() if p is not None else dummy
    parameters = (param(gamma_ih), param(gamma_hh), param(gamma_c), param(beta_c))
    statistics = (mean_ih if norm_input else dummy, var_ih if norm_input else dummy,
                  mean_hh if norm_rec else dummy, var_hh if norm_rec else dummy,
                  mean_c if norm_cell else dummy, var_c if norm_cell else dummy)
    ih_rows = mean_ih.shape[0] if norm_input else 1
    # The gradient of h_{t-1}, carry_t + grad_zh_t @ W_hh (carry_t: the gradient of h_t on
    # rows padded at t, which pass it through; 0 elsewhere): in the next step's kernel
    # (_fused_grad_h), or here between launches.
    half = x.dtype != dtype
    # The products after the loop: TF32 (_tf32_matmul) for half-precision inputs, as in the
    # step kernel; else torch's, as for the inputs' dtype.
    matmul = _tf32_matmul if half else torch.mm
    constexprs = backward_step_constexprs(variant, x.dtype, batch, hidden, training=training, fused_grad_h=fused,
                                          precision="tf32" if half and x.is_cuda else _dot_precision(x))
    launch = _StepLauncher(k.bnlstm_bwd_step_kernel, (-(-hidden // tiles.block_h),), STEP_NUM_WARPS, **constexprs)
    weight_hh_op = weight_hh.contiguous()
    weight_hh_c = weight_hh.to(dtype)
    grad_zh_steps = grad_zh.unbind(0)  # one call for the T views
    wx = projection if projection is not None else x.new_empty(1, gates)  # read with input statistics only
    pointers = _PointerArguments(grad_output, grad_h, grad_c, carry, weight_hh_op, reserve, c0_c, wx,
                                 active_i8, *parameters, *statistics, grad_gates, grad_zh, grad_wx, sums)
    for t in reversed(range(steps)):
        # Reads grad_h (grad_h_n at the last step; fused, computed in it below the last step);
        # writes step t's grad_zh and carry.
        launch(pointers, t, steps, ih_rows, batch, hidden, width, zh_off, gates_off, cnew_off, config.eps)
        if not fused and t > 0:
            torch.addmm(carry, grad_zh_steps[t], weight_hh_c, out=grad_h)
    # Gradient of h_0.
    grad_h = carry + matmul(grad_zh_steps[0], weight_hh_c)

    totals = sums.sum(0)
    grad_bias = totals[:gates]
    grad_gamma_hh = totals[gates:2 * gates]
    grad_gamma_ih = totals[2 * gates:3 * gates]
    grad_beta_c = totals[3 * gates:3 * gates + hidden]
    grad_gamma_c = totals[3 * gates + hidden:]
    if variant.input_statistics == "sequence":
        # Statistics over every step: the batch-norm backward needs the sums over all steps.
        rstd = torch.rsqrt(var_ih + config.eps)  # [1, 4H]
        scale = rstd * gamma_ih.to(dtype)
        if training:
            count = active.sum().clamp(min=1).to(dtype)
            xhat = (projection.to(dtype) - mean_ih) * rstd
            centred = grad_gates - grad_bias / count - xhat * (grad_gamma_ih / count)
            grad_wx = torch.where(active.unsqueeze(-1), centred * scale, torch.zeros((), dtype=dtype,
                                                                                      device=x.device))
        else:
            grad_wx = grad_gates * scale

    # Weights and input: GEMMs over all steps. h_{t-1} is h_0, then the previous output
    # (zero on padded rows, where grad_zh is zero too).
    h_prev = torch.cat((h0.to(dtype).unsqueeze(0), output[:-1]))  # [T, B, H]
    grad_weight_hh = matmul(grad_zh.reshape(-1, gates).t(), h_prev.reshape(-1, hidden))
    grad_weight_ih = matmul(grad_wx.reshape(-1, gates).t(), x.to(dtype).reshape(steps * batch, -1))
    grad_x = matmul(grad_wx.reshape(-1, gates), weight_ih.to(dtype)).view(steps, batch, -1) if input_grad else None

    return (grad_x, grad_h, grad_c, grad_weight_ih, grad_weight_hh, grad_bias, grad_gamma_ih, grad_gamma_hh,
            grad_gamma_c, grad_beta_c)


def _check_inputs(x: Tensor, h0: Tensor, c0: Tensor, params: LayerParams, lengths: Optional[Tensor]) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [T, B, I], got shape {list(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f'backend="triton" supports float16, bfloat16, float32 and float64 inputs; x is {x.dtype}')
    steps, batch, features = x.shape
    hidden = params.weight_hh.shape[-1]
    expected = {"h0": (h0, [batch, hidden]), "c0": (c0, [batch, hidden]),
                "weight_ih": (params.weight_ih, [4 * hidden, features]),
                "weight_hh": (params.weight_hh, [4 * hidden, hidden])}
    for name, (tensor, shape) in expected.items():
        if list(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {list(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {tensor.device}")
    if params.weight_ih.dtype != x.dtype or params.weight_hh.dtype != x.dtype:
        raise TypeError(f"weight_ih and weight_hh must have x's dtype {x.dtype}, got "
                        f"{params.weight_ih.dtype} and {params.weight_hh.dtype}")
    if lengths is not None and (lengths.dim() != 1 or lengths.shape[0] != batch):
        raise ValueError(f"lengths must be [B] = [{batch}], got shape {list(lengths.shape)}")


def _variant(input_statistics: int, normalize_recurrent: bool, normalize_cell: bool) -> Variant:
    """The Variant of the operators' flags (INPUT_STATISTICS's inverse)."""
    by_code = {code: name for name, code in INPUT_STATISTICS.items()}
    return Variant("operator", by_code[input_statistics], normalize_recurrent, normalize_cell)


def _operand_cast(operand_dtype: Optional[torch.dtype]):
    """Tensor -> the same in the operand dtype (None: as it is); empty tensors, which stand
    for absent parameters, -> None."""
    def cast(tensor: Tensor) -> Optional[Tensor]:
        if tensor.numel() == 0:
            return None
        return tensor.to(operand_dtype) if operand_dtype is not None else tensor
    return cast


def _check_operator_dtypes(x: Tensor, operand_dtype: Optional[torch.dtype]) -> None:
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"bnlstm_triton::layer_forward: x must be float32 or float64 (half precision comes as "
                        f"float32 with operand_dtype), got {x.dtype}")
    if operand_dtype not in (None, torch.float16, torch.bfloat16) or (operand_dtype and x.dtype != torch.float32):
        raise TypeError(f"bnlstm_triton::layer_forward: operand_dtype must be None, float16 or bfloat16 (with "
                        f"float32 x), got {operand_dtype} with {x.dtype} x")


def _processing_order(x: Tensor, lengths: Optional[Tensor], reverse: bool, active: Tensor) -> Tensor:
    """x [T, B, ...] in the order the recurrence takes it, padding zeroed (it may hold
    anything, NaN too; zeroed, it reaches no statistic or gradient)."""
    ordered = reverse_padded(x, lengths) if reverse else x
    if lengths is not None:
        ordered = torch.where(active.reshape(*active.shape, *[1] * (x.dim() - 2)), ordered,
                              torch.zeros((), dtype=x.dtype, device=x.device))
    return ordered.contiguous()


def layer_forward(x: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor], params: List[Tensor],
                  running: List[Tensor], input_statistics: int, normalize_recurrent: bool, normalize_cell: bool,
                  training: bool, eps: float, reverse: bool, keep_reserve: bool, start_step: int = 0,
                  operand_dtype: Optional[torch.dtype] = None):
    """`bnlstm_triton::layer_forward`: bnlstm::layer_forward's schema and results (ops.py,
    csrc/ops.cpp) through the Triton kernels. The reserve has the same shape; its first
    4H columns (with a normalized recurrence) hold W_hh h_{t-1} before normalization,
    written once per step, which the backward pass normalizes again."""
    _check_operator_dtypes(x, operand_dtype)
    steps, batch, _ = x.shape
    active = active_mask(lengths, steps, batch, x.device)
    operand = _operand_cast(operand_dtype)
    config = _Config(_variant(input_statistics, normalize_recurrent, normalize_cell), training, float(eps),
                     int(start_step), keep_reserve)
    with _on_device(x.device):
        output, h_n, c_n, statistics, projection, reserve = _forward_pass(
            operand(_processing_order(x, lengths, reverse, active)), operand(h0), operand(c0),
            *(operand(p) for p in params), active, running_dict(running) if not training else {}, config)
    if reverse:
        output = reverse_padded(output, lengths)
    if not (training or keep_reserve):  # inference in evaluation reports no statistics
        statistics = [s.new_empty(0, s.shape[1]) for s in statistics]
    keeps_projection = keep_reserve and input_statistics != INPUT_STATISTICS[None]
    return (output, h_n, c_n, list(statistics), projection.to(x.dtype) if keeps_projection else x.new_empty(0),
            reserve if keep_reserve else x.new_empty(0))


def layer_backward(grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, x: Tensor, lengths: Optional[Tensor],
                   h0: Tensor, c0: Tensor, output: Tensor, params: List[Tensor], statistics: List[Tensor],
                   projection: Tensor, reserve: Tensor, input_statistics: int, normalize_recurrent: bool,
                   normalize_cell: bool, training: bool, eps: float, reverse: bool, input_grad: bool = True,
                   operand_dtype: Optional[torch.dtype] = None):
    """`bnlstm_triton::layer_backward`: bnlstm::layer_backward's schema and results, from
    what `layer_forward` returned. Where the gradient of h_t is taken follows
    BNLSTM_TRITON_GRAD_H as this runs (_fused_grad_h)."""
    _check_operator_dtypes(x, operand_dtype)
    steps, batch, _ = x.shape
    active = active_mask(lengths, steps, batch, x.device)
    operand = _operand_cast(operand_dtype)
    in_order = lambda tensor: reverse_padded(tensor, lengths) if reverse else tensor
    config = _Config(_variant(input_statistics, normalize_recurrent, normalize_cell), training, float(eps), 0, True)
    x_ordered = operand(_processing_order(x, lengths, reverse, active))
    projection = operand(projection) if input_statistics != INPUT_STATISTICS[None] else None
    with _on_device(x.device):
        grad_x, grad_h0, grad_c0, *grad_params = _backward_pass(
            in_order(grad_output), grad_h_n, grad_c_n, x_ordered, operand(h0), operand(c0), operand(params[0]),
            operand(params[1]), *(operand(p) for p in params[3:]), active, projection, in_order(output), reserve,
            statistics, config, _fused_grad_h(x_ordered), input_grad)
    if input_grad:
        # Padded positions take no part (the forward pass zeroed them): their gradient is zero.
        grad_x = in_order(_processing_order(grad_x, lengths, False, active))
    # One tensor each (several are views of one buffer), empty for the parts the layer lacks.
    grad_params = [grad.clone() if param.numel() else x.new_empty(0) for param, grad in zip(params, grad_params)]
    return grad_x if input_grad else x.new_empty(0), grad_h0, grad_c0, grad_params


torch.library.custom_op("bnlstm_triton::layer_forward", layer_forward, mutates_args=(), schema=FORWARD_SCHEMA)
torch.library.custom_op("bnlstm_triton::layer_backward", layer_backward, mutates_args=(), schema=BACKWARD_SCHEMA)
OPERATORS = LayerOperators(torch.ops.bnlstm_triton.layer_forward, torch.ops.bnlstm_triton.layer_backward)
register_layer_operators("bnlstm_triton::layer_forward", "bnlstm_triton::layer_backward", lambda: OPERATORS)


def bnlstm_layer_triton(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: LayerParams,
    running: RunningStats,
    *,
    variant: Variant,
    training: bool,
    eps: float,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
    start_step: int = 0,
) -> LayerResult:
    """One layer-direction through the Triton operators; arguments and result as
    `reference.bnlstm_layer_reference` (LayerResult with output [T, B, H], h_n, c_n [B, H]
    in x's dtype and the batch statistics of every step in training)."""
    check_device(x.device)
    _check_inputs(x, h0, c0, params, lengths)
    _fused_grad_h(x)  # refuses a bad BNLSTM_TRITON_GRAD_H before any work
    return run_layer(OPERATORS, x, h0, c0, params, running, variant=variant, training=training, eps=eps,
                     lengths=lengths, reverse=reverse, start_step=start_step)
