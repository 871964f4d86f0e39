"""The direct CPU path: the call a loop makes over and over (a training step, a serving
call, a decoder's step) taken from a module's `forward` straight to the C++ operators.

At small sizes `forward`'s general path (its checks, the autocast and backend choices,
`run_layer`'s argument lists, the results' named tuples) costs about as much Python as the
operators themselves (docs/CPU.md, "A module's call straight to the operators"). The direct
path serves the common call: CPU tensors of the parameters' dtype, the CPU backend resolved
by an earlier call, no torch.autocast, no synchronized training step, not traced or
compiled. A module in half precision computes as the general path computes it: input, state
and parameters cast to float32, the operators told to multiply in its dtype
(`operand_dtype`), their results cast back. It runs `bnlstm::layer_forward`
(`bidirectional_forward`) below the Autograd key where nothing records a graph, and
`bnlstm::layer` (`bidirectional`), the C++ autograd node that folds the batch statistics in
its steps, where something does.
Its argument lists come from names worked out once per backend, mode, eps and variant
(`DirectPlan`), read from `_parameters` and `_buffers` at every call, so a replaced,
parametrized or converted tensor is seen at once. Anything else, a training call without
autograd and every bad argument included, gets None from here and takes the general path,
whose checks name what is wrong.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import ops, parameters
from .layer_api import compute_dtype, step_batch_stats


class DirectPlan(NamedTuple):
    """What a direct call passes the operators beside its tensors, worked out on a module's
    first direct call for a backend, mode, eps and variant (key)."""

    key: tuple
    dtype: torch.dtype  # the module's: its parameters', and its calls' tensors
    compute_dtype: torch.dtype  # the operators': dtype, or float32 for half precision
    operand_dtype: Optional[torch.dtype]  # the operators' operand_dtype: dtype in half precision, else None
    absent: Tensor  # the operators' stand-in for a part the variant or layer lacks
    suffixes: Tuple[str, ...]  # the layer-directions, in hx order
    parameter_names: Tuple[Tuple[str, ...], ...]  # per layer-direction, LayerParams' order; "" absent
    running_names: Tuple[Tuple[str, ...], ...]  # per layer-direction, ops.STATISTICS' order; "" absent
    flags: tuple  # ops.operator_flags
    forward: Callable  # bnlstm::layer_forward, or bidirectional_forward for a bidirectional module
    recording: Callable  # bnlstm::layer, or bidirectional: the operator with its autograd node


class LayerArguments(NamedTuple):
    """One layer-direction's lists for the operators."""

    params: List[Tensor]  # in the plan's compute dtype
    running: List[Tensor]  # the buffers as they are (the operators convert a half-precision one)
    needs_grad: bool  # a parameter requires grad and grad mode is on


# The module dtypes the direct path serves; each computes in layer_api.compute_dtype's.
_SERVED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def plan_for(module) -> Optional[DirectPlan]:
    """`module`'s plan for a call now, or None where the direct path does not serve it: the
    CPU backend not resolved by an earlier call (or another backend asked for since), a
    synchronized training step, torch.autocast, torch.compile or tracing."""
    resolved = module.__dict__.get("_resolved")  # modules pickled before it existed lack it
    if resolved is None or resolved[1].name != "cpu" or resolved[0][0] != module.backend:
        return None
    if resolved[0][2] not in _SERVED_DTYPES:
        return None
    training = module.training
    if training and module.sync_statistics:
        return None
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    key = (resolved[0], training, module.eps, module.variant)
    plan = module.__dict__.get("_direct_plan")
    if plan is None or plan.key != key:
        plan = module._direct_plan = _make_plan(module, key)
    return plan


def _make_plan(module, key: tuple) -> DirectPlan:
    dtype, training = key[0][2], key[1]  # key: ((backend, device, dtype, batch), training, eps, variant)
    variant = module._variant
    suffixes = tuple(module._state_suffixes())
    parameter_names, running_names = [], []
    for suffix in suffixes:
        parameter_names.append(tuple(field + suffix if hasattr(module, field + suffix) else ""
                                     for field in parameters.PARAMETER_FIELDS))
        running = {part: (mean, var) for part, mean, var in parameters.running_stat_names(suffix, variant)}
        running_names.append(tuple(name for part in ops.STATISTICS_PARTS for name in running.get(part, ("", ""))))
    ops.ensure_loaded()  # (a module unpickled in a new process may not have loaded the extension)
    bnlstm, both_directions = torch.ops.bnlstm, getattr(module, "bidirectional", False)  # (a cell has one)
    forward, recording = ((bnlstm.bidirectional_forward, bnlstm.bidirectional) if both_directions
                          else (bnlstm.layer_forward, bnlstm.layer))
    compute = compute_dtype(dtype)
    return DirectPlan(key, dtype, compute, None if compute is dtype else dtype, torch.empty(0, dtype=compute),
                      suffixes, tuple(parameter_names), tuple(running_names),
                      ops.operator_flags(variant, training, module.eps), forward.default, recording.default)


def layer_arguments(module, plan: DirectPlan, index: int, grad: bool) -> Optional[LayerArguments]:
    """Layer-direction `index`'s lists, or None where a parameter is not a registered CPU
    tensor of the plan's dtype (a parametrized or converted one: the general path)."""
    absent, registered, dtype = plan.absent, module._parameters, plan.dtype
    params = [registered.get(name) if name else absent for name in plan.parameter_names[index]]
    needs_grad = False
    for parameter in params:
        if parameter is absent:
            continue
        if parameter is None or parameter.dtype is not dtype or not parameter.is_cpu:
            return None
        if grad and parameter.requires_grad:
            needs_grad = True
    if plan.operand_dtype is not None:  # (autograd records the casts where a parameter needs grad)
        params = [parameter if parameter is absent else parameter.to(plan.compute_dtype) for parameter in params]
    buffers = module._buffers
    return LayerArguments(params, [buffers[name] if name else absent for name in plan.running_names[index]],
                          needs_grad)


def initial_state(hx, shape: Tuple[int, ...], dtype: torch.dtype) -> Optional[Tuple[Tensor, Tensor]]:
    """(h_0, c_0): zeros of `shape` where hx is None, hx's tensors where it is a tuple of two
    CPU tensors of that shape and dtype; None otherwise (the general path checks them)."""
    if hx is None:
        zeros = torch.zeros(shape, dtype=dtype)
        return zeros, zeros
    if type(hx) is not tuple or len(hx) != 2:
        return None
    h0, c0 = hx
    if (type(h0) is not Tensor or type(c0) is not Tensor or h0.dtype is not dtype or c0.dtype is not dtype
            or h0.shape != shape or c0.shape != shape or not (h0.is_cpu and c0.is_cpu)):
        return None
    return h0, c0


def _to_compute(plan: DirectPlan, x: Tensor, h0: Tensor, c0: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """x, h0 and c0 (in the module's dtype) in the operators' dtype."""
    if plan.operand_dtype is None:
        return x, h0, c0
    return x.to(plan.compute_dtype), h0.to(plan.compute_dtype), c0.to(plan.compute_dtype)


def _to_module(plan: DirectPlan, result):
    """The operators' (output, h_n, c_n, statistics, folded), the first three in the module's dtype."""
    if plan.operand_dtype is None:
        return result
    output, h_n, c_n, statistics, folded = result
    return output.to(plan.dtype), h_n.to(plan.dtype), c_n.to(plan.dtype), statistics, folded


def run_layer(plan: DirectPlan, x: Tensor, h0: Tensor, c0: Tensor, layer: LayerArguments, start_step: int,
              recording: bool, momentum: Optional[float]):
    """One layer-direction (forward in time): output, h_n, c_n, statistics and, where it
    records a graph, `folded` (ops.cpp, `layer`); momentum: fold in the steps (training).
    x, h0, c0 and the results in the module's dtype (cast as ops.run_layer casts them)."""
    return _to_module(plan, _run_layer(plan, *_to_compute(plan, x, h0, c0), layer, start_step, recording, momentum))


def _run_layer(plan: DirectPlan, x: Tensor, h0: Tensor, c0: Tensor, layer: LayerArguments, start_step: int,
               recording: bool, momentum: Optional[float]):
    if not recording:
        with torch._C._AutoDispatchBelowAutograd():  # as ops.run_layer: no Python autograd kernel
            output, h_n, c_n, statistics, _, _ = plan.forward(
                x, h0, c0, None, layer.params, layer.running, *plan.flags, False, False, start_step,
                plan.operand_dtype)
        return output, h_n, c_n, statistics, None
    return plan.recording(x, h0, c0, None, layer.params, layer.running, *plan.flags, False, start_step,
                          plan.operand_dtype, momentum)


def run_bidirectional(plan: DirectPlan, x: Tensor, h0: Tensor, c0: Tensor, forward: LayerArguments,
                      reverse: LayerArguments, recording: bool, momentum: Optional[float]):
    """Both directions of a layer (h0, c0 [2, B, H]): as run_layer, the lists of the forward
    direction followed by the reverse one's."""
    return _to_module(plan, _run_bidirectional(plan, *_to_compute(plan, x, h0, c0), forward, reverse, recording,
                                               momentum))


def _run_bidirectional(plan: DirectPlan, x: Tensor, h0: Tensor, c0: Tensor, forward: LayerArguments,
                       reverse: LayerArguments, recording: bool, momentum: Optional[float]):
    params, running = forward.params + reverse.params, forward.running + reverse.running
    if not recording:
        with torch._C._AutoDispatchBelowAutograd():
            output, h_n, c_n, statistics, _, _ = plan.forward(x, h0, c0, None, params, running, *plan.flags, False,
                                                              plan.operand_dtype)
        return output, h_n, c_n, statistics, None
    return plan.recording(x, h0, c0, None, params, running, *plan.flags, plan.operand_dtype, momentum)


def warn_if_not_finite(module, suffixes: Tuple[str, ...], x: Tensor, statistics: List[Tensor], folded: Tensor,
                       start_step: int) -> None:
    """After a training call of `suffixes`' layer-directions whose steps folded: the warning
    the general path gives (BNLSTMBase._warn_if_not_finite) where the fold skipped a step."""
    if module.__dict__.get("_warned_not_finite", False) or max(folded.tolist(), default=-1) < 0:
        return
    # ops.step_counts(x, None) in the operators' dtype, as the general path counts them
    counts = x.new_full((x.shape[0],), x.shape[1], dtype=compute_dtype(x.dtype))
    per_direction = len(statistics) // len(suffixes)
    for index, (suffix, skipped) in enumerate(zip(suffixes, folded.view(len(suffixes), -1))):
        parts = statistics[index * per_direction:(index + 1) * per_direction]
        module._folded_in_layer(suffix, step_batch_stats(module._variant, counts, *parts), start_step, skipped)
