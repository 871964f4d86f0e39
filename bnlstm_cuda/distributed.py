"""Synchronized batch statistics across processes: the SyncBatchNorm of the BN-LSTM.

Under torch.distributed data parallelism each process sees a slice of the global batch.
By default BNLSTM takes batch statistics over its own slice (per-process statistics, what
torch.nn.BatchNorm does under DistributedDataParallel). With synchronized statistics
(`BNLSTM(..., sync_statistics=True)` or `convert_sync_statistics(model)`) every time step
is normalized with the statistics of the global batch: each process all-reduces the masked
sum, sum of squares and count of its active sequences, so variable lengths stay exact and
the result equals one process running the concatenated batch.

Where the communication goes, per forward pass and layer-direction (the backward pass does
the same number again, the gradient of a sum being a sum):

- one all-reduce for the input side: the moments of every step at once (step-wise input
  statistics) or of the whole sequence (sequence-wise);
- one all-reduce per time step for each normalized recurrent part (W_hh h and c in the
  Cooijmans variant): these sit inside the recurrence, so they cannot be batched;
- plus one scalar all-reduce per forward pass for the longest sequence of the global batch,
  since every process must run that many steps for the per-step all-reduces to pair up.

The fused CPU kernels run the whole recurrence in C++ and cannot all-reduce in the middle,
so synchronized training steps run the reference layer (bnlstm_layer_reference) with
GlobalBatchStats as its statistics function. Evaluation, a world size of 1 and an
uninitialized torch.distributed communicate nothing and run the module's own backend.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backends import REFERENCE, Backend
from .statistics import BatchStats

# Backends whose layer function can be swapped for the reference with a statistics reduction.
SYNC_BACKENDS = ("auto", "reference")


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum). The gradient of a sum over processes with respect to
    each process's term is the sum of the gradients every process sends back: an all-reduce.
    (torch.distributed.nn.functional.all_reduce does this too, but is deprecated.)"""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Sum of `tensor` over the processes of `group` (None: the default group), differentiable."""
    return _AllReduceSum.apply(tensor, group)


class GlobalBatchStats:
    """A statistics function for bnlstm_layer_reference: masked moments over the global batch.

    Called as (z [..., B, F], mask [..., B]) -> BatchStats with mean, biased var [..., F] and
    count [...], the statistics of the active rows of every process's z. All leading steps of
    one call go in one all-reduce of [..., 2F + 1] (sum, sum of squares, count).

    Numerics: one pass, var = E[z^2] - E[z]^2, accumulated in float64. A two-pass variance
    (all-reduce the mean, then the centred sum of squares) would double the number of
    all-reduces inside the recurrence, whose cost is their latency. In float32 the one-pass
    form cancels: it loses log2(mean^2 / var) of float32's 24 bits. In float64 it keeps
    52 - log2(mean^2 / var) bits: more than float32's 24 up to |mean| / std ~ 1e4, and
    float64 inputs stay within ~1e-14 relative of the two-pass variance for the activations
    an LSTM produces (|mean| / std of order 1 to 100). The cast is elementwise on [B, F].
    """

    def __init__(self, group=None) -> None:
        self.group = group

    def __call__(self, z: Tensor, mask: Tensor) -> BatchStats:
        features = z.shape[-1]
        z64 = z.to(torch.float64)
        active = mask.unsqueeze(-1)  # [..., B, 1]
        # where, not a product with the mask: an inactive row may hold anything.
        masked = torch.where(active, z64, torch.zeros((), dtype=torch.float64, device=z.device))
        local = torch.cat(
            (masked.sum(-2), (masked * masked).sum(-2), active.to(torch.float64).sum(-2)), dim=-1
        )  # [..., 2F + 1]
        total = all_reduce_sum(local, self.group)
        sums, squares, count = total.split((features, features, 1), dim=-1)
        divisor = count.clamp(min=1)
        mean = sums / divisor
        # Rounding can take E[z^2] - E[z]^2 a hair below 0 for a constant feature.
        var = (squares / divisor - mean * mean).clamp(min=0)
        return BatchStats(mean.to(z.dtype), var.to(z.dtype), count.squeeze(-1).to(z.dtype))


class _GroupHandle:
    """Holds a module's process group. A ProcessGroup cannot be pickled or deep-copied, so a
    copy shares it (same process, same group) and a pickled module loads with None (the
    default group of the process that loads it)."""

    def __init__(self, group) -> None:
        self.group = group

    def __deepcopy__(self, memo) -> "_GroupHandle":
        return self

    def __reduce__(self):
        return (_GroupHandle, (None,))


def check_process_group(process_group) -> None:
    if process_group is None:
        return
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be None (the default group) or a torch.distributed.ProcessGroup "
            f"(e.g. from torch.distributed.new_group), got {type(process_group).__name__}"
        )


def configure(module: nn.Module, sync_statistics: bool, process_group=None) -> None:
    """Set a BNLSTM's or BNLSTMCell's statistics mode (module.backend must be set already)."""
    if not isinstance(sync_statistics, bool):
        raise TypeError(f"sync_statistics must be a bool, got {type(sync_statistics).__name__}")
    if process_group is not None and not sync_statistics:
        raise ValueError("process_group is only used with sync_statistics=True")
    check_process_group(process_group)
    if sync_statistics and module.backend not in SYNC_BACKENDS:
        raise ValueError(
            f"sync_statistics=True needs backend in {list(SYNC_BACKENDS)}, got backend={module.backend!r}: "
            "synchronized training steps run the reference layer, since the fused kernels cannot "
            "all-reduce in the middle of the recurrence (\"auto\" still uses them in evaluation and "
            "when there is a single process)"
        )
    module.sync_statistics = sync_statistics
    module._statistics_group = _GroupHandle(process_group)


def statistics_group(module: nn.Module, training: bool):
    """The process group whose global batch gives `module`'s batch statistics in this
    forward pass, or None for statistics of the local batch: not training, synchronized
    statistics off, torch.distributed unavailable or not initialized, or a group of one."""
    if not training or not getattr(module, "sync_statistics", False):
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    handle = getattr(module, "_statistics_group", None)
    # None means the default group, looked up now (it may be created after the module).
    group = handle.group if handle is not None and handle.group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def pad_to_global_length(x: Tensor, lengths: Optional[Tensor], group):
    """Pad x [T, B, I] with zero steps to the longest T of the group, so that every process
    runs the same number of steps (each step all-reduces). Returns (x [T_max, B, I],
    lengths [B] int64 on x's device: the given ones, or T for every sequence)."""
    num_steps, batch = x.shape[0], x.shape[1]
    longest = torch.tensor([num_steps], dtype=torch.int64, device=x.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
    longest = int(longest.item())
    if lengths is None:
        lengths = torch.full((batch,), num_steps, dtype=torch.int64, device=x.device)
    if longest > num_steps:
        x = torch.cat((x, x.new_zeros(longest - num_steps, *x.shape[1:])), dim=0)
    return x, lengths


def synchronized_backend(group) -> Backend:
    """The reference layer with batch statistics over `group`'s global batch, folding as the
    reference does on every process alike (a process whose evaluation ran the compiled
    operators must not fold an ulp differently from the others)."""
    return replace(REFERENCE, layer=partial(REFERENCE.layer, batch_stats_fn=GlobalBatchStats(group)))
