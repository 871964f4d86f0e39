"""The layer operators: loading, fake kernels, autograd, and the layer function.

The schemas `bnlstm::layer_forward` and `bnlstm::layer_backward` are declared in
csrc/ops.cpp and implemented per device in C++; the Triton backend implements the same two
schemas as `bnlstm_triton::layer_forward` and `layer_backward` (triton_layer.py). Here both
pairs get the same fake (meta) kernels and autograd formula through `torch.library`, so they
work under autograd, pass `torch.library.opcheck` and trace under
`torch.compile(fullgraph=True)` and `torch.export`. `run_layer` calls a pair with the
signature of `reference.bnlstm_layer_reference`; `bnlstm_layer_fused` is it for the C++ pair.
On the CPU, `bnlstm::bidirectional_forward` and `bidirectional_backward` run both directions
of a bidirectional layer in one call (at once where that pays); `bidirectional_layer_fused`
calls them for the module in eager mode, and they get fake kernels and autograd here too.
Eager calls that record a graph take `bnlstm::layer` and `bnlstm::bidirectional` instead:
each C++ pair as one operator with its autograd node in C++ (csrc/layer_autograd.cpp), the
same formula without Python in the forward's bookkeeping or in the backward.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .layer_api import (BidirectionalResult, LayerParams, LayerResult, RunningStats, active_mask, compute_dtype,
                        needs_backward, step_batch_stats)
from .statistics import BatchStats
from .variants import Variant

# Variant.input_statistics -> the operators' int argument (csrc/bnlstm.h, InputStatistics).
INPUT_STATISTICS = {None: 0, "step": 1, "sequence": 2}

_lock = threading.Lock()
_registered = False
_failure: Optional[Exception] = None  # a failed build is not retried on every call


# The operators' schemas as csrc/ops.cpp declares them (tests/test_cpu_backend.py compares
# them with the loaded extension's); the Triton backend registers its operators with them.
FORWARD_SCHEMA = (
    "(Tensor x, Tensor h0, Tensor c0, Tensor? lengths, Tensor[] params, Tensor[] running, int input_statistics, "
    "bool normalize_recurrent, bool normalize_cell, bool training, float eps, bool reverse, bool keep_reserve, "
    "int start_step=0, ScalarType? operand_dtype=None) -> "
    "(Tensor output, Tensor h_n, Tensor c_n, Tensor[] statistics, Tensor projection, Tensor reserve)")
BACKWARD_SCHEMA = (
    "(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor? lengths, Tensor h0, Tensor c0, "
    "Tensor output, Tensor[] params, Tensor[] statistics, Tensor projection, Tensor reserve, "
    "int input_statistics, bool normalize_recurrent, bool normalize_cell, bool training, float eps, "
    "bool reverse, bool input_grad=True, ScalarType? operand_dtype=None) -> "
    "(Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor[] grad_params)")


class LayerOperators(NamedTuple):
    """A backend's pair of operators: `forward` with FORWARD_SCHEMA, `backward` (its
    gradients) with BACKWARD_SCHEMA; and, where the backend has one, `differentiable`: the
    pair as one operator with its autograd node in C++ (`bnlstm::layer`, csrc/ops.cpp),
    which eager calls that record a graph take instead of _LayerFunction."""

    forward: Callable
    backward: Callable
    differentiable: Optional[Callable] = None


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


_cpu_bf16: Optional[bool] = None


@torch.compiler.assume_constant_result  # asked at every forward; the answer never changes
def _cpu_multiplies_in_bf16() -> bool:
    global _cpu_bf16
    if _cpu_bf16 is None:
        ensure_loaded()
        _cpu_bf16 = bool(torch.ops.bnlstm.cpu_bf16_available())
    return _cpu_bf16


def cpu_rounds_operands(dtype: torch.dtype) -> bool:
    """Whether the CPU operators, given float32 operands and operand_dtype=dtype, round them
    to dtype themselves as casting them first would: bfloat16 where the CPU multiplies in it
    (AVX512_BF16, csrc/bf16_gemm.h; its products treat subnormal bfloat16 as zero, so a
    subnormal rounds to the same product either way). Elsewhere the cast is the rounding."""
    return dtype == torch.bfloat16 and _cpu_multiplies_in_bf16()


def update_running_stats_compiled(running_mean: Tensor, running_var: Tensor, stats: BatchStats,
                                  momentum: float, start_step: int = 0) -> Tensor:
    """statistics.update_running_stats for CPU tensors as one C++ operator
    (csrc/running_stats.cpp), the fold walked step by step: equal to rounding, and some 15
    times faster than the twenty small tensor operations of the vectorised fold. Returns the
    first step whose statistics held an inf or NaN (an int64 scalar; -1: none), which the
    walk finds for free."""
    ensure_loaded()
    return torch.ops.bnlstm.update_running_stats(running_mean, running_var, stats.mean, stats.var, stats.count,
                                                 momentum, start_step)


def update_running_stats_parts_compiled(running: RunningStats, batch_stats: Dict[str, BatchStats], momentum: float,
                                        start_step: int = 0) -> Tensor:
    """statistics.update_running_stats_parts as one C++ operator call for every part (a call
    per part costs more than the fold). Returns each part's first step whose statistics held
    an inf or NaN, in batch_stats' order ([parts] int64; -1: none)."""
    if not batch_stats:  # variant "none": no part, and an operator call needs a tensor
        return torch.empty(0, dtype=torch.int64)
    ensure_loaded()
    pairs = [running[part] for part in batch_stats]
    stats = batch_stats.values()
    return torch.ops.bnlstm.update_running_stats_parts(
        [mean for mean, _ in pairs], [var for _, var in pairs], [s.mean for s in stats], [s.var for s in stats],
        [s.count for s in stats], momentum, start_step)


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
    register_layer_operators("bnlstm::layer_forward", "bnlstm::layer_backward", compiled_operators)
    torch.library.register_fake("bnlstm::bidirectional_forward")(_bidirectional_forward_fake)
    torch.library.register_fake("bnlstm::bidirectional_backward")(_bidirectional_backward_fake)
    torch.library.register_autograd("bnlstm::bidirectional_forward", _registered_bidirectional_backward,
                                    setup_context=_registered_bidirectional_setup_context)
    torch.library.register_fake("bnlstm::update_running_stats")(_update_running_stats_fake)
    torch.library.register_fake("bnlstm::update_running_stats_parts")(_update_running_stats_parts_fake)


def register_layer_operators(forward: str, backward: str, operators: Callable[[], LayerOperators]) -> None:
    """Fake kernels and the autograd formula for a pair of operators with FORWARD_SCHEMA and
    BACKWARD_SCHEMA, named "namespace::name" (`operators`: the pair, looked up when a
    backward pass runs)."""
    torch.library.register_fake(forward)(_layer_forward_fake)
    torch.library.register_fake(backward)(_layer_backward_fake)
    torch.library.register_autograd(forward, _registered_backward,
                                    setup_context=functools.partial(_registered_setup_context, operators))


_compiled_operators: Optional[LayerOperators] = None


def compiled_operators() -> LayerOperators:
    """The C++ pair (csrc/ops.cpp), built or loaded on first use."""
    global _compiled_operators
    if _compiled_operators is None:
        ensure_loaded()
        _compiled_operators = LayerOperators(torch.ops.bnlstm.layer_forward, torch.ops.bnlstm.layer_backward,
                                             torch.ops.bnlstm.layer)
    return _compiled_operators


class ForwardArguments(NamedTuple):
    """`bnlstm::layer_forward`'s arguments by name (csrc/ops.cpp)."""

    x: Tensor
    h0: Tensor
    c0: Tensor
    lengths: Optional[Tensor]
    params: List[Tensor]  # LayerParams' order; an empty tensor for an absent part
    running: List[Tensor]  # STATISTICS' order; empty tensors where not read
    input_statistics: int
    normalize_recurrent: bool
    normalize_cell: bool
    training: bool
    eps: float
    reverse: bool
    keep_reserve: bool
    start_step: int = 0
    operand_dtype: Optional[torch.dtype] = None


# The order of the operators' statistics lists (`running`, and `statistics` out): a
# (mean, var) pair for each part of STATISTICS_PARTS.
STATISTICS = ("mean_ih", "var_ih", "mean_hh", "var_hh", "mean_c", "var_c")
STATISTICS_PARTS = ("ih", "hh", "c")


def running_list(running: RunningStats, absent: Tensor) -> List[Tensor]:
    """The operators' `running` list of RunningStats, `absent` for the parts it lacks."""
    listed = [absent] * len(STATISTICS)
    if not running:  # training reads none
        return listed
    for index, part in enumerate(STATISTICS_PARTS):
        if part in running:
            listed[2 * index:2 * index + 2] = running[part]
    return listed


def running_dict(listed: List[Tensor]) -> RunningStats:
    """running_list's inverse: RunningStats of the parts given (non-empty) in the list."""
    return {part: (listed[2 * index], listed[2 * index + 1]) for index, part in enumerate(STATISTICS_PARTS)
            if listed[2 * index].numel()}


def _layer_forward_fake(*arguments):
    a = ForwardArguments(*arguments)
    steps, batch, _ = a.x.shape
    hidden = a.params[1].shape[1]
    gates = 4 * hidden
    # Inference in evaluation reports no statistics (csrc/ops.cpp).
    reported = a.training or a.keep_reserve
    input_rows = {0: 0, 1: steps, 2: 1}[a.input_statistics] if reported else 0
    recurrent_rows = steps if a.normalize_recurrent and reported else 0
    cell_rows = steps if a.normalize_cell and reported else 0
    projection_shape = (steps, batch, gates) if a.keep_reserve and a.input_statistics else (0,)
    reserve_shape = (steps, batch, reserve_width(hidden, a.normalize_recurrent)) if a.keep_reserve else (0,)
    new = a.x.new_empty
    statistics = [new(input_rows, gates), new(input_rows, gates), new(recurrent_rows, gates),
                  new(recurrent_rows, gates), new(cell_rows, hidden), new(cell_rows, hidden)]
    return (new(steps, batch, hidden), new(batch, hidden), new(batch, hidden), statistics,
            new(projection_shape), new(reserve_shape))


def _layer_backward_fake(grad_output, grad_h_n, grad_c_n, x, lengths, h0, c0, output, params, statistics,
                         projection, reserve, input_statistics, normalize_recurrent, normalize_cell, training,
                         eps, reverse, input_grad=True, operand_dtype=None):
    weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c = params
    new = x.new_empty
    like_if = lambda condition, tensor: torch.empty_like(tensor) if condition else new(0)
    grad_params = [torch.empty_like(weight_ih), torch.empty_like(weight_hh), like_if(bias.numel(), bias),
                   like_if(input_statistics != 0, gamma_ih), like_if(normalize_recurrent, gamma_hh),
                   like_if(normalize_cell, gamma_c), like_if(normalize_cell, beta_c)]
    return (torch.empty_like(x) if input_grad else new(0), torch.empty_like(grad_h_n), torch.empty_like(grad_c_n),
            grad_params)


def _update_running_stats_fake(running_mean, running_var, mean, var, count, momentum, start_step=0):
    # Updates its first two arguments in place; returns the first non-finite step.
    return mean.new_empty((), dtype=torch.int64)


def _update_running_stats_parts_fake(running_means, running_vars, means, vars, counts, momentum, start_step=0):
    # Updates its first two lists in place; returns each part's first non-finite step.
    return torch.empty(len(means), dtype=torch.int64)


def _save_for_backward(ctx, operators: LayerOperators, a: ForwardArguments, statistics, output, projection,
                       reserve) -> None:
    # No zero gradients for the statistics and the (large) reserve: they are not used.
    ctx.set_materialize_grads(False)
    ctx.backward_operator = operators.backward
    ctx.keep_reserve = a.keep_reserve
    ctx.flags = (a.input_statistics, a.normalize_recurrent, a.normalize_cell, a.training, a.eps, a.reverse)
    ctx.operand_dtype = a.operand_dtype  # the backward's GEMMs too
    ctx.lengths = a.lengths  # an int64 tensor or None: nothing autograd tracks
    ctx.parameter_count = len(a.params)
    ctx.save_for_backward(a.x, a.h0, a.c0, output, projection, reserve, *a.params, *statistics)


def _check_differentiable(ctx) -> None:
    """Refuse a backward pass the operators cannot give (no reserve kept, double backward)."""
    if not ctx.keep_reserve:
        raise RuntimeError(
            "the layer's forward operator ran with keep_reserve=False (inference), so it kept "
            "nothing for the backward pass; call it with keep_reserve=True to differentiate"
        )
    if torch.is_grad_enabled():
        # backward(create_graph=True): the backward operator has no derivative of its own.
        raise RuntimeError(
            "double backward (create_graph=True, e.g. a gradient penalty) is not supported by the "
            "fused backends; use BNLSTM(..., backend=\"reference\"), whose plain PyTorch loop supports it"
        )


def _layer_gradients(ctx, grad_output, grad_h_n, grad_c_n, input_grad: bool):
    """(grad_x or None, grad_h0, grad_c0, [grad of each parameter, None where absent]);
    input_grad: whether x needs its gradient."""
    _check_differentiable(ctx)
    x, h0, c0, output, projection, reserve, *rest = ctx.saved_tensors
    params, statistics = rest[:ctx.parameter_count], rest[ctx.parameter_count:]
    batch, hidden = x.shape[1], params[1].shape[1]
    zeros = lambda *shape: x.new_zeros(shape)
    grad_output = zeros(*x.shape[:2], hidden) if grad_output is None else grad_output
    grad_h_n = zeros(batch, hidden) if grad_h_n is None else grad_h_n
    grad_c_n = zeros(batch, hidden) if grad_c_n is None else grad_c_n
    grad_x, grad_h0, grad_c0, grad_params = ctx.backward_operator(
        grad_output, grad_h_n, grad_c_n, x, ctx.lengths, h0, c0, output, params, statistics, projection,
        reserve, *ctx.flags, input_grad, ctx.operand_dtype,
    )
    grad_params = [grad if param.numel() else None for param, grad in zip(params, grad_params)]
    return grad_x if input_grad else None, grad_h0, grad_c0, grad_params


# torch.library's autograd: the operator's own argument structure, Tensor lists included
# (each list's gradient is a list).
def _registered_setup_context(operators, ctx, inputs, output):
    output_tensor, _h_n, _c_n, statistics, projection, reserve = output
    ctx.mark_non_differentiable(*statistics, projection, reserve)
    _save_for_backward(ctx, operators(), ForwardArguments(*inputs), statistics, output_tensor, projection, reserve)


def _registered_backward(ctx, grad_output, grad_h_n, grad_c_n, *_grad_statistics_and_reserve):
    grad_x, grad_h0, grad_c0, grad_params = _layer_gradients(ctx, grad_output, grad_h_n, grad_c_n,
                                                             ctx.needs_input_grad[0])
    # One entry per argument the call passed (the dispatcher drops those at their defaults).
    flags = len(ctx.needs_input_grad) - 6
    return (grad_x, grad_h0, grad_c0, None, grad_params, [None] * len(STATISTICS)) + (None,) * flags


class _LayerFunction(torch.autograd.Function):
    """Eager autograd for a pair of layer operators without a C++ node (the Triton pair's),
    the formula torch.library has for them (_layer_gradients), without its wrapper's per-call
    cost: that wrapper re-fills the schema's defaults and flattens the tensor lists on every
    call (docs/CPU.md). An autograd.Function tracks only tensors passed directly, so the
    parameters come as separate arguments: apply(operators, x, h0, c0, lengths, *params,
    running, *flags). Its forward calls the forward operator below the Autograd key, and
    returns the statistics unpacked. The forward takes ctx itself: a separate setup_context
    makes every apply bind its arguments to forward's signature with inspect. torch.compile
    traces the operator itself."""

    @staticmethod
    def forward(ctx, operators, x, h0, c0, lengths, *rest):
        count = len(LayerParams._fields)
        arguments = ForwardArguments(x, h0, c0, lengths, list(rest[:count]), *rest[count:])
        with torch._C._AutoDispatchBelowAutograd():
            output, h_n, c_n, statistics, projection, reserve = operators.forward(*arguments)
        ctx.mark_non_differentiable(*statistics, projection, reserve)
        _save_for_backward(ctx, operators, arguments, statistics, output, projection, reserve)
        return (output, h_n, c_n, *statistics, projection, reserve)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, *_grad_statistics_and_reserve):
        grad_x, grad_h0, grad_c0, grad_params = _layer_gradients(ctx, grad_output, grad_h_n, grad_c_n,
                                                                 ctx.needs_input_grad[1])  # [0]: operators
        non_tensors = len(ForwardArguments._fields) - 5  # running and the flags
        return (None, grad_x, grad_h0, grad_c0, None, *grad_params) + (None,) * non_tensors


def operator_flags(variant: Variant, training: bool, eps: float) -> tuple:
    """The operators' flags from input_statistics to eps (FORWARD_SCHEMA's order)."""
    return (INPUT_STATISTICS[variant.input_statistics], variant.normalize_recurrent, variant.normalize_cell,
            training, eps)


def _operand_dtype(out_dtype: torch.dtype, dtype: torch.dtype) -> Optional[torch.dtype]:
    """The operators' operand_dtype: a half-precision input's dtype (computed in `dtype`)."""
    return out_dtype if out_dtype != dtype else None


def step_counts(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """[T]: the active sequences at each of x's steps, in x's dtype (for step_batch_stats)."""
    steps, batch = x.shape[0], x.shape[1]
    return (x.new_full((steps,), batch) if lengths is None
            else active_mask(lengths, steps, batch, x.device).sum(1).to(x.dtype))


def run_layer(
    operators: LayerOperators,
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
    operand_dtype: Optional[torch.dtype] = None,
    fold_momentum: Optional[float] = None,
) -> LayerResult:
    """One layer-direction through `operators`; the other arguments and the result as
    `reference.bnlstm_layer_reference`. Half-precision inputs reach the operators in float32
    with their dtype as `operand_dtype`, in which the operators multiply (fp32 accumulation).
    operand_dtype given: the inputs come in float32, to be multiplied in that dtype, and the
    outputs go out in it (layer_api.LayerFunction).
    fold_momentum (training, CPU tensors): also fold the batch statistics into `running`
    (LayerResult.folded): the C++ node's steps fold them as they go where it runs, the fold
    operator after the call elsewhere (torch.compile, no graph, the Triton pair)."""
    out_dtype = x.dtype if operand_dtype is None else operand_dtype
    dtype = compute_dtype(out_dtype)
    if out_dtype != dtype:
        x, h0, c0 = x.to(dtype), h0.to(dtype), c0.to(dtype)
    params = params.to(dtype)
    keep_reserve = needs_backward(x, h0, c0, params)
    fold, node_folds, folded = fold_momentum is not None and training, False, None
    if fold and x.device.type != "cpu":
        raise ValueError(f"fold_momentum folds CPU tensors only, got x on {x.device}")
    absent = x.new_empty(0)  # stands for a part the layer does not have, or statistics not read
    parameter_list = [absent if p is None else p for p in params]
    running_given = running_list(running if not training else {}, absent)
    variant_flags, operand_dtype = operator_flags(variant, training, eps), _operand_dtype(out_dtype, dtype)
    flags = (*variant_flags, reverse, keep_reserve, start_step, operand_dtype)
    if torch.compiler.is_compiling():
        output, h_n, c_n, statistics, _projection, _reserve = operators.forward(
            x, h0, c0, lengths, parameter_list, running_given, *flags)
    elif keep_reserve and operators.differentiable is not None:
        node_folds = fold
        output, h_n, c_n, statistics, folded = operators.differentiable(
            x, h0, c0, lengths, parameter_list, running_list(running, absent) if fold else running_given,
            *variant_flags, reverse, start_step, operand_dtype, fold_momentum if fold else None)
    elif keep_reserve:
        output, h_n, c_n, *statistics = _LayerFunction.apply(operators, x, h0, c0, lengths, *parameter_list,
                                                             running_given, *flags)[:9]
    else:
        # Nothing needs a gradient: call the kernel below the Autograd key, skipping the
        # Python autograd kernel torch.library registered for it, which would only
        # redispatch after re-filling the schema's defaults.
        with torch._C._AutoDispatchBelowAutograd():
            output, h_n, c_n, statistics, _projection, _reserve = operators.forward(
                x, h0, c0, lengths, parameter_list, running_given, *flags)
    batch_stats = step_batch_stats(variant, step_counts(x, lengths), *statistics) if training else {}
    if fold and not node_folds:
        folded = update_running_stats_parts_compiled(running, batch_stats, fold_momentum, start_step)
    if out_dtype != dtype:
        output, h_n, c_n = output.to(out_dtype), h_n.to(out_dtype), c_n.to(out_dtype)
    return LayerResult(output, h_n, c_n, batch_stats, folded)


# Both directions of a bidirectional layer: bnlstm::bidirectional_forward and its backward
# (csrc/ops.cpp), CPU tensors only. Their lists hold the forward direction's entries, then
# the reverse one's.
PARAMETERS_PER_DIRECTION = len(LayerParams._fields)


def _bidirectional_forward_fake(x, h0, c0, lengths, params, running, input_statistics, normalize_recurrent,
                                normalize_cell, training, eps, keep_reserve, operand_dtype=None):
    results = [_layer_forward_fake(x, h0[d], c0[d], lengths, params[d * PARAMETERS_PER_DIRECTION:][
        :PARAMETERS_PER_DIRECTION], running[d * len(STATISTICS):][:len(STATISTICS)], input_statistics,
        normalize_recurrent, normalize_cell, training, eps, d == 1, keep_reserve) for d in (0, 1)]
    (output, h_n, c_n, statistics, projection, reserve), reverse = results
    return (x.new_empty(*output.shape[:2], 2 * output.shape[2]), x.new_empty(2, *h_n.shape),
            x.new_empty(2, *c_n.shape), statistics + reverse[3], [projection, reverse[4]], [reserve, reverse[5]])


def _bidirectional_backward_fake(grad_output, grad_h_n, grad_c_n, x, lengths, h0, c0, output, params, statistics,
                                 projection, reserve, input_statistics, normalize_recurrent, normalize_cell,
                                 training, eps, input_grad=True, operand_dtype=None):
    grad_params = []
    for d in (0, 1):
        grad_params += _layer_backward_fake(grad_output, grad_h_n[d], grad_c_n[d], x, lengths, h0[d], c0[d], output,
                                            params[d * PARAMETERS_PER_DIRECTION:][:PARAMETERS_PER_DIRECTION],
                                            statistics, projection[d], reserve[d], input_statistics,
                                            normalize_recurrent, normalize_cell, training, eps, d == 1)[3]
    return (torch.empty_like(x) if input_grad else x.new_empty(0), torch.empty_like(grad_h_n),
            torch.empty_like(grad_c_n), grad_params)


def _save_bidirectional(ctx, inputs, output, statistics, projection, reserve) -> None:
    x, h0, c0, lengths, params, _running, *flags = inputs
    ctx.set_materialize_grads(False)
    ctx.flags = tuple(flags[:5])  # input_statistics to eps
    ctx.keep_reserve = flags[5]
    ctx.operand_dtype = flags[6] if len(flags) > 6 else None
    ctx.lengths = lengths
    ctx.save_for_backward(x, h0, c0, output, *projection, *reserve, *params, *statistics)


def _bidirectional_gradients(ctx, grad_output, grad_h_n, grad_c_n, input_grad: bool):
    """(grad_x or None, grad_h0, grad_c0, [grad of each parameter, None where absent])."""
    _check_differentiable(ctx)
    x, h0, c0, output, projection, projection_reverse, reserve, reserve_reverse, *rest = ctx.saved_tensors
    count = 2 * PARAMETERS_PER_DIRECTION
    params, statistics = rest[:count], rest[count:]
    grad_output = torch.zeros_like(output) if grad_output is None else grad_output
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
    grad_c_n = torch.zeros_like(c0) if grad_c_n is None else grad_c_n
    grad_x, grad_h0, grad_c0, grad_params = torch.ops.bnlstm.bidirectional_backward(
        grad_output, grad_h_n, grad_c_n, x, ctx.lengths, h0, c0, output, params, statistics,
        [projection, projection_reverse], [reserve, reserve_reverse], *ctx.flags, input_grad, ctx.operand_dtype)
    grad_params = [grad if param.numel() else None for param, grad in zip(params, grad_params)]
    return grad_x if input_grad else None, grad_h0, grad_c0, grad_params


def _registered_bidirectional_setup_context(ctx, inputs, output):
    output_tensor, _h_n, _c_n, statistics, projection, reserve = output
    ctx.mark_non_differentiable(*statistics, *projection, *reserve)
    _save_bidirectional(ctx, inputs, output_tensor, statistics, projection, reserve)


def _registered_bidirectional_backward(ctx, grad_output, grad_h_n, grad_c_n, *_grad_statistics_and_reserve):
    grad_x, grad_h0, grad_c0, grad_params = _bidirectional_gradients(ctx, grad_output, grad_h_n, grad_c_n,
                                                                     ctx.needs_input_grad[0])
    flags = len(ctx.needs_input_grad) - 6
    return (grad_x, grad_h0, grad_c0, None, grad_params, [None] * 2 * len(STATISTICS)) + (None,) * flags


def bidirectional_layer_fused(x: Tensor, h0: Tensor, c0: Tensor, params: Tuple[LayerParams, LayerParams],
                              running: Tuple[RunningStats, RunningStats], *, variant: Variant, training: bool,
                              eps: float, lengths: Optional[Tensor] = None,
                              operand_dtype: Optional[torch.dtype] = None,
                              fold_momentum: Optional[float] = None) -> BidirectionalResult:
    """Both directions of a bidirectional layer in one call of the CPU operators (a
    `layer_api.BidirectionalLayerFunction`): what `bnlstm_layer_fused` gives for each
    direction, with the directions run at once where that pays (csrc/bidirectional_cpu.cpp),
    fold_momentum included."""
    out_dtype = x.dtype if operand_dtype is None else operand_dtype
    dtype = compute_dtype(out_dtype)
    if out_dtype != dtype:
        x, h0, c0 = x.to(dtype), h0.to(dtype), c0.to(dtype)
    params = (params[0].to(dtype), params[1].to(dtype))
    keep_reserve = needs_backward(x, h0, c0, params[0]) or needs_backward(x, h0, c0, params[1])
    absent = x.new_empty(0)
    parameter_list = [absent if p is None else p for p in (*params[0], *params[1])]
    fold = fold_momentum is not None and training
    running_given = (running_list(running[0], absent) + running_list(running[1], absent) if not training or fold
                     else [absent] * 2 * len(STATISTICS))
    flags, operand_dtype = operator_flags(variant, training, eps), _operand_dtype(out_dtype, dtype)
    folded = None
    if keep_reserve:  # the pair with its autograd node in C++ (csrc/layer_autograd.cpp)
        output, h_n, c_n, statistics, folded = torch.ops.bnlstm.bidirectional(
            x, h0, c0, lengths, parameter_list, running_given, *flags, operand_dtype,
            fold_momentum if fold else None)
    else:
        with torch._C._AutoDispatchBelowAutograd():
            output, h_n, c_n, statistics, _projection, _reserve = torch.ops.bnlstm.bidirectional_forward(
                x, h0, c0, lengths, parameter_list, running_given, *flags, False, operand_dtype)
    batch_stats, folds = ({}, {}), (None, None)
    if training:
        counts, half = step_counts(x, lengths), len(STATISTICS)  # the same steps in both directions
        batch_stats = (step_batch_stats(variant, counts, *statistics[:half]),
                       step_batch_stats(variant, counts, *statistics[half:]))
    if fold and folded is not None:  # the node folded: each direction's parts, one after the other
        folds = tuple(folded.view(2, -1))
    elif fold:
        folds = tuple(update_running_stats_parts_compiled(direction_running, direction_stats, fold_momentum)
                      for direction_running, direction_stats in zip(running, batch_stats))
    if out_dtype != dtype:
        output, h_n, c_n = output.to(out_dtype), h_n.to(out_dtype), c_n.to(out_dtype)
    return BidirectionalResult(output, h_n, c_n, batch_stats, folds)


def bnlstm_layer_fused(x: Tensor, h0: Tensor, c0: Tensor, params: LayerParams, running: RunningStats,
                       **options) -> LayerResult:
    """One layer-direction through the C++ operators (`run_layer`'s arguments but the first).
    The CUDA kernels multiply the recurrent GEMM's operands in a half-precision input's
    dtype, as cuDNN and the Triton backend do, and the other GEMMs, forward and backward, in
    TF32."""
    return run_layer(compiled_operators(), x, h0, c0, params, running, **options)
