"""The Triton backend: host code and autograd of one layer-direction (kernels: triton_kernels.py).

`bnlstm_layer_triton` has the signature of `reference.bnlstm_layer_reference`. Forward:

    W_ih x for all steps            torch.matmul, in x's dtype            [T, B, 4H]
    input batch norm + bias         bnlstm_input_bn_kernel, all steps     [T, B, 4H]
    per step t                      bnlstm_fwd_step_kernel               (T launches)

Backward: per step (last to first) bnlstm_bwd_step_kernel, with the gradient of h_t from
step t + 1's grad_zh @ W_hh by torch between launches (or, for half-precision inputs where
asked, inside the kernel: _fused_grad_h); then the weight and input gradients as GEMMs
over all steps, and the bias, gamma and beta gradients as sums of per-step column sums.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set
before this module's kernels are imported: Triton reads it when a kernel is decorated).
float32 and float64 inputs compute in their own dtype; float16 and bfloat16 inputs multiply
in their dtype with float32 accumulation and keep statistics, cell state and everything the
backward pass reads in float32.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .layer_api import (LayerParams, LayerResult, RunningStats, active_mask, compute_dtype, needs_backward,
                        reverse_padded, step_batch_stats)
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
    reverse: bool
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


class TritonLayerFunction(torch.autograd.Function):
    """One layer-direction: (x, h0, c0, parameters) -> (output, h_n, c_n, statistics used).

    x [T, B, I] (padding zeroed, processing order), h0, c0 [B, H]; parameters as LayerParams
    (None where absent); active [T, B] bool; running: RunningStats read in evaluation.
    Returns output [T, B, H] (processing order), h_n, c_n [B, H] in x's dtype, and the
    statistics each step used, in the compute dtype (0-row tensors where a part is not
    normalized): mean_ih, var_ih [T | 1, 4H], mean_hh, var_hh [T, 4H], mean_c, var_c [T, H].
    """

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, active, running,
                config: _Config):
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
        nothing = new(0, gates)

        # Input side: one GEMM, then one batch-norm launch over all steps.
        projection = torch.matmul(x, weight_ih.t()).contiguous()  # [T, B, 4H], x's dtype
        mean_ih, var_ih = nothing, nothing
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
                    mean_ih = running["ih"][0][:1].to(dtype).contiguous()
                    var_ih = running["ih"][1][:1].to(dtype).contiguous()
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

        ctx.config = config
        ctx.device = x.device
        ctx.fused_grad_h = _fused_grad_h(x)
        ctx.has = tuple(p is not None for p in (bias, gamma_ih, gamma_hh, gamma_c, beta_c))
        ctx.dtypes = (x.dtype, h0.dtype, c0.dtype)
        if config.keep:
            ctx.save_for_backward(x, h0, c0, weight_ih, weight_hh, gamma_ih, gamma_hh, gamma_c, beta_c, active,
                                  projection, output, reserve, mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c)
        stats = (mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c)
        ctx.mark_non_differentiable(*stats)
        ctx.set_materialize_grads(False)
        return (output.to(x.dtype), h_n.to(x.dtype), c.to(x.dtype), *stats)

    @staticmethod
    def backward(ctx, *grads):
        with _on_device(ctx.device):
            return TritonLayerFunction._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, grad_output, grad_h_n, grad_c_n, *_unused):
        config = ctx.config
        if not config.keep:
            raise RuntimeError("bnlstm triton layer: the forward pass kept nothing for backward (no input "
                               "required grad when it ran)")
        k = _kernels()
        (x, h0, c0, weight_ih, weight_hh, gamma_ih, gamma_hh, gamma_c, beta_c, active, projection, output, reserve,
         mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c) = ctx.saved_tensors
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
        fused = ctx.fused_grad_h
        # The products after the loop: TF32 (_tf32_matmul) for half-precision inputs, as in the
        # step kernel; else torch's, as for the inputs' dtype.
        matmul = _tf32_matmul if half else torch.mm
        constexprs = backward_step_constexprs(variant, x.dtype, batch, hidden, training=training, fused_grad_h=fused,
                                              precision="tf32" if half and x.is_cuda else _dot_precision(x))
        launch = _StepLauncher(k.bnlstm_bwd_step_kernel, (-(-hidden // tiles.block_h),), STEP_NUM_WARPS, **constexprs)
        weight_hh_op = weight_hh.contiguous()
        weight_hh_c = weight_hh.to(dtype)
        grad_zh_steps = grad_zh.unbind(0)  # one call for the T views
        pointers = _PointerArguments(grad_output, grad_h, grad_c, carry, weight_hh_op, reserve, c0_c, projection,
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
        grad_x = matmul(grad_wx.reshape(-1, gates), weight_ih.to(dtype)).view(steps, batch, -1)

        has_bias, has_gamma_ih, has_gamma_hh, has_gamma_c, has_beta_c = ctx.has
        x_dtype, h_dtype, c_dtype = ctx.dtypes
        pdtype = weight_hh.dtype
        cast = lambda grad, present: grad.to(pdtype) if present else None
        return (grad_x.to(x_dtype), grad_h.to(h_dtype), grad_c.to(c_dtype), grad_weight_ih.to(pdtype),
                grad_weight_hh.to(pdtype), cast(grad_bias, has_bias), cast(grad_gamma_ih, has_gamma_ih),
                cast(grad_gamma_hh, has_gamma_hh), cast(grad_gamma_c, has_gamma_c), cast(grad_beta_c, has_beta_c),
                None, None, None)


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
    """One layer-direction through the Triton kernels; arguments and result as
    `reference.bnlstm_layer_reference` (LayerResult with output [T, B, H], h_n, c_n [B, H]
    in x's dtype and the batch statistics of every step in training)."""
    check_device(x.device)
    _check_inputs(x, h0, c0, params, lengths)
    steps, batch, _ = x.shape
    dtype = compute_dtype(x.dtype)
    active = active_mask(lengths, steps, batch, x.device)  # [T, B]
    ordered = reverse_padded(x, lengths) if reverse else x
    if lengths is not None:
        # Padding may hold anything (NaN too); zeroed, it reaches no statistic or gradient.
        ordered = torch.where(active.unsqueeze(-1), ordered, torch.zeros((), dtype=x.dtype, device=x.device))
    keep = needs_backward(x, h0, c0, params)
    config = _Config(variant, training, float(eps), reverse, int(start_step), keep)
    with _on_device(x.device):
        output, h_n, c_n, mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c = TritonLayerFunction.apply(
            ordered.contiguous(), h0, c0, *params, active, running if not training else {}, config)
    if reverse:
        output = reverse_padded(output, lengths)
    batch_stats = {}
    if training:
        counts = active.sum(1).to(dtype)  # [T]
        batch_stats = step_batch_stats(variant, counts, mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c)
    return LayerResult(output, h_n, c_n, batch_stats)
