"""The compiled layer operators: loading, fake kernels, autograd, and the layer function.

The schemas `bnlstm::layer_forward` and `bnlstm::layer_backward` are declared in
csrc/ops.cpp and implemented per device in C++. Here they get fake (meta) kernels and an
autograd formula through `torch.library`, so they work under autograd, pass
`torch.library.opcheck` and trace under `torch.compile(fullgraph=True)`.
`bnlstm_layer_fused` has the signature of `reference.bnlstm_layer_reference`.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
from torch import Tensor

from .layer_api import (LayerParams, LayerResult, RunningStats, active_mask, compute_dtype, needs_backward,
                        step_batch_stats)
from .statistics import BatchStats
from .variants import Variant

# Variant.input_statistics -> the operators' int argument (csrc/bnlstm.h, InputStatistics).
INPUT_STATISTICS = {None: 0, "step": 1, "sequence": 2}

_lock = threading.Lock()
_registered = False
_failure: Optional[Exception] = None  # a failed build is not retried on every call


def reserve_width(hidden: int, normalize_recurrent: bool) -> int:
    """Columns of the reserve the forward op keeps per (t, b): csrc/bnlstm.h, ReserveLayout."""
    return (4 * hidden if normalize_recurrent else 0) + 4 * hidden + hidden  # zhat, gates, c_new


def ensure_loaded() -> None:
    """Build or load the extension and register fake kernels and autograd, once.
    Raises build.ExtensionUnavailable when the extension cannot be had here."""
    global _registered, _failure
    if _registered:  # lock-free fast path: also what torch.compile traces
        return
    with _lock:
        if _registered:
            return
        if _failure is not None:
            raise _failure
        from .build import ExtensionUnavailable, load_extension

        try:
            load_extension()  # the CUDA-enabled one with a CUDA torch and a GPU (build.cuda_wanted)
        except ExtensionUnavailable as error:
            _failure = error
            raise
        _register_python_parts()
        _registered = True


def is_loaded() -> bool:
    """Whether ensure_loaded() has succeeded in this process (it is not attempted here)."""
    return _registered


def update_running_stats_compiled(running_mean: Tensor, running_var: Tensor, stats: BatchStats,
                                  momentum: float, start_step: int = 0) -> None:
    """statistics.update_running_stats for CPU tensors as one C++ operator
    (csrc/running_stats.cpp), the fold walked step by step: equal to rounding, and some 15
    times faster than the twenty small tensor operations of the vectorised fold."""
    ensure_loaded()
    torch.ops.bnlstm.update_running_stats(running_mean, running_var, stats.mean, stats.var, stats.count,
                                          momentum, start_step)


def cpu_buffer_pool_statistics() -> dict:
    """The CPU buffer pool of the fused operators (csrc/buffer_pool.h): bytes it keeps
    unused now, buffers it handed out again, buffers it had to allocate."""
    ensure_loaded()
    cached_bytes, reused, allocated = torch.ops.bnlstm.cpu_buffer_pool_statistics()
    return {"cached_bytes": cached_bytes, "reused": reused, "allocated": allocated}


def parallel_threads() -> int:
    """Threads an `at::parallel_for` inside the extension runs on: `torch.get_num_threads()`
    when the build is right (a diagnostic: 1 where OpenMP was left out of the build)."""
    ensure_loaded()
    return torch.ops.bnlstm.parallel_threads()


def release_cpu_buffers() -> int:
    """Free the buffers the CPU operators keep for reuse (the CPU's counterpart of
    torch.cuda.empty_cache); returns the bytes freed. BNLSTM_CPU_POOL_MB caps what is kept
    (default 512; 0: nothing is)."""
    ensure_loaded()
    return torch.ops.bnlstm.release_cpu_buffers()


def _register_python_parts() -> None:
    torch.library.register_fake("bnlstm::layer_forward")(_layer_forward_fake)
    torch.library.register_fake("bnlstm::layer_backward")(_layer_backward_fake)
    torch.library.register_fake("bnlstm::update_running_stats")(_update_running_stats_fake)
    torch.library.register_autograd(
        "bnlstm::layer_forward", _layer_backward_formula, setup_context=_setup_context
    )


def _layer_forward_fake(x, h0, c0, lengths, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c,
                        beta_c, running_mean_ih, running_var_ih, running_mean_hh, running_var_hh,
                        running_mean_c, running_var_c, input_statistics, normalize_recurrent,
                        normalize_cell, training, eps, reverse, keep_reserve, start_step=0,
                        operand_dtype=None):
    steps, batch, _ = x.shape
    hidden = weight_hh.shape[1]
    gates = 4 * hidden
    input_rows = {0: 0, 1: steps, 2: 1}[input_statistics]
    recurrent_rows = steps if normalize_recurrent else 0
    cell_rows = steps if normalize_cell else 0
    projection_shape = (steps, batch, gates) if keep_reserve and input_statistics else (0,)
    reserve_shape = (steps, batch, reserve_width(hidden, normalize_recurrent)) if keep_reserve else (0,)
    new = x.new_empty
    return (
        new(steps, batch, hidden), new(batch, hidden), new(batch, hidden),
        new(input_rows, gates), new(input_rows, gates),
        new(recurrent_rows, gates), new(recurrent_rows, gates),
        new(cell_rows, hidden), new(cell_rows, hidden),
        new(projection_shape), new(reserve_shape),
    )


def _layer_backward_fake(grad_output, grad_h_n, grad_c_n, x, lengths, h0, c0, output, weight_ih,
                         weight_hh, gamma_ih, gamma_hh, gamma_c, beta_c, mean_ih, var_ih, var_hh, mean_c,
                         var_c, projection, reserve, input_statistics, normalize_recurrent,
                         normalize_cell, training, eps, reverse, input_grad=True, operand_dtype=None):
    hidden = weight_hh.shape[1]
    new = x.new_empty
    sized = lambda condition, size: new(size) if condition else new(0)
    return (
        torch.empty_like(x) if input_grad else new(0), torch.empty_like(grad_h_n), torch.empty_like(grad_c_n),
        torch.empty_like(weight_ih), torch.empty_like(weight_hh), new(4 * hidden),
        sized(input_statistics != 0, 4 * hidden), sized(normalize_recurrent, 4 * hidden),
        sized(normalize_cell, hidden), sized(normalize_cell, hidden),
    )


def _update_running_stats_fake(running_mean, running_var, mean, var, count, momentum, start_step=0):
    return None  # updates its first two arguments in place


def _setup_context(ctx, inputs, output):
    (x, h0, c0, lengths, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c) = inputs[:11]
    # inputs[11:17]: running statistics; after the flags: start_step, operand_dtype
    input_statistics, normalize_recurrent, normalize_cell, training, eps, reverse, keep_reserve = inputs[17:24]
    ctx.operand_dtype = inputs[25] if len(inputs) > 25 else None  # the backward's GEMMs too
    out, _, _, mean_ih, var_ih, _mean_hh, var_hh, mean_c, var_c, projection, reserve = output
    ctx.mark_non_differentiable(*output[3:])
    # No zero gradients for the statistics and the (large) reserve: they are not used.
    ctx.set_materialize_grads(False)
    ctx.keep_reserve = keep_reserve
    ctx.flags = (input_statistics, normalize_recurrent, normalize_cell, training, eps, reverse)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, lengths, h0, c0, out, weight_ih, weight_hh, gamma_ih, gamma_hh, gamma_c,
                          beta_c, mean_ih, var_ih, var_hh, mean_c, var_c, projection, reserve)


def _layer_backward_formula(ctx, grad_output, grad_h_n, grad_c_n, *_grad_statistics):
    if not ctx.keep_reserve:
        raise RuntimeError(
            "bnlstm::layer_forward ran with keep_reserve=False (inference), so it kept nothing "
            "for the backward pass; call it with keep_reserve=True to differentiate"
        )
    if torch.is_grad_enabled():
        # backward(create_graph=True): the backward operator has no derivative of its own.
        raise RuntimeError(
            "double backward (create_graph=True, e.g. a gradient penalty) is not supported by the "
            "fused backends; use BNLSTM(..., backend=\"reference\"), whose plain PyTorch loop supports it"
        )
    saved = ctx.saved_tensors
    (x, _lengths, _h0, _c0, _output, _weight_ih, weight_hh, gamma_ih, gamma_hh, gamma_c, beta_c,
     *_statistics_and_reserve) = saved
    batch, hidden = x.shape[1], weight_hh.shape[1]
    zeros = lambda *shape: x.new_zeros(shape)
    grad_output = zeros(*x.shape[:2], hidden) if grad_output is None else grad_output
    grad_h_n = zeros(batch, hidden) if grad_h_n is None else grad_h_n
    grad_c_n = zeros(batch, hidden) if grad_c_n is None else grad_c_n
    input_grad = ctx.needs_input_grad[0]
    (grad_x, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias, grad_gamma_ih,
     grad_gamma_hh, grad_gamma_c, grad_beta_c) = torch.ops.bnlstm.layer_backward(
        grad_output, grad_h_n, grad_c_n, *saved, *ctx.flags, input_grad, ctx.operand_dtype,
    )
    present = lambda tensor, grad: grad if tensor is not None else None
    return (
        grad_x if input_grad else None, grad_h0, grad_c0, None, grad_weight_ih, grad_weight_hh,
        grad_bias if ctx.has_bias else None,
        present(gamma_ih, grad_gamma_ih), present(gamma_hh, grad_gamma_hh),
        present(gamma_c, grad_gamma_c), present(beta_c, grad_beta_c),
        None, None, None, None, None, None,  # running statistics
        None, None, None, None, None, None, None, None,  # flags, start_step
        None,  # operand_dtype
    )


class _LayerFunction(torch.autograd.Function):
    """Eager autograd for `bnlstm::layer_forward`: the formula registered with torch.library
    above (setup context and backward are the same functions), without its wrapper's
    per-call cost: that wrapper re-fills the schema's defaults on every call
    (inspect.signature), tens of microseconds for this many arguments (docs/CPU.md). Its
    forward calls the operator below the Autograd key: with grad mode off the registered
    autograd kernel would only pass the call on, after the same re-filling. torch.compile
    traces the operator itself."""

    @staticmethod
    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.bnlstm.layer_forward(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_layer_backward_formula)


def bnlstm_layer_fused(
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
    """One layer-direction through `bnlstm::layer_forward`; arguments and result as
    `reference.bnlstm_layer_reference`. Half-precision inputs are computed in float32; the
    CUDA kernels multiply the recurrent GEMM's operands in the input's dtype (fp32
    accumulation), as cuDNN and the Triton backend do, and the other GEMMs, forward and
    backward, in TF32."""
    ensure_loaded()
    out_dtype = x.dtype
    dtype = compute_dtype(x.dtype)
    if out_dtype != dtype:
        x, h0, c0 = x.to(dtype), h0.to(dtype), c0.to(dtype)
    params = params.to(dtype)
    steps, batch = x.shape[0], x.shape[1]
    if lengths is None:
        lengths = torch.full((batch,), steps, dtype=torch.int64, device=x.device)
    keep_reserve = needs_backward(x, h0, c0, params)
    no_stats = (None, None)
    running_ih = running.get("ih", no_stats) if not training else no_stats
    running_hh = running.get("hh", no_stats) if not training else no_stats
    running_c = running.get("c", no_stats) if not training else no_stats
    layer = torch.ops.bnlstm.layer_forward
    dispatch = contextlib.nullcontext()
    if not torch.compiler.is_compiling():
        if keep_reserve:
            layer = _LayerFunction.apply
        else:
            # Nothing needs a gradient: call the kernel below the Autograd key, skipping the
            # Python autograd kernel torch.library registered for it, which would only
            # redispatch after re-filling the schema's defaults.
            dispatch = torch._C._AutoDispatchBelowAutograd()
    with dispatch:
        (output, h_n, c_n, mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c, _projection, _reserve) = layer(
            x, h0, c0, lengths, *params, *running_ih, *running_hh, *running_c,
            INPUT_STATISTICS[variant.input_statistics], variant.normalize_recurrent,
            variant.normalize_cell, training, eps, reverse, keep_reserve, start_step,
            out_dtype if out_dtype != dtype else None,  # half precision: the GEMM's operand dtype
        )
    batch_stats = {}
    if training:
        counts = active_mask(lengths, steps, batch, x.device).sum(1).to(dtype)  # [T]
        batch_stats = step_batch_stats(variant, counts, mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c)
    if out_dtype != dtype:
        output, h_n, c_n = output.to(out_dtype), h_n.to(out_dtype), c_n.to(out_dtype)
    return LayerResult(output, h_n, c_n, batch_stats)
