"""Batch statistics over active sequences, and the running statistics they update.

Conventions (docs/SEMANTICS.md, as torch.nn.BatchNorm): batch statistics use the biased
variance; running statistics are updated with the unbiased one,
`running = (1 - momentum) * running + momentum * batch`; time step t uses statistics slot
`min(start_step + t, num_slots - 1)`; a step with fewer than 2 active sequences does not update
them, nor does a batch statistic that is not finite.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import torch
from torch import Tensor


class BatchStats(NamedTuple):
    """Statistics of one normalized part, for each processed time step (or for the sequence).

    mean:  [N, F]  mean over the active rows
    var:   [N, F]  biased variance over the active rows
    count: [N]     number of active rows (float, in the dtype of mean)
    """

    mean: Tensor
    var: Tensor
    count: Tensor


def masked_batch_stats(z: Tensor, mask: Tensor) -> BatchStats:
    """Mean and biased variance of z over dimension -2, counting only rows where mask holds.

    z:    [..., B, F]
    mask: [..., B]    bool, True for active rows
    Returns BatchStats with mean, var [..., F] and count [...]. With no active row the
    statistics are 0 (the count is clamped to 1 for the division): such rows are all masked.
    """
    weight = mask.to(z.dtype).unsqueeze(-1)  # [..., B, 1]
    count = weight.sum(dim=-2)  # [..., 1]
    divisor = count.clamp(min=1)
    mean = (weight * z).sum(dim=-2) / divisor
    centred = (z - mean.unsqueeze(-2)) * weight
    var = (centred * centred).sum(dim=-2) / divisor
    return BatchStats(mean, var, count.squeeze(-1))


def normalize(z: Tensor, mean: Tensor, var: Tensor, gamma: Tensor, beta, eps: float) -> Tensor:
    """BN(z; gamma, beta) = beta + gamma * (z - mean) / sqrt(var + eps).

    z: [..., B, F]; mean, var: [..., F]; gamma, beta: [F] (beta may be None for 0).
    """
    z_hat = (z - mean.unsqueeze(-2)) * torch.rsqrt(var.unsqueeze(-2) + eps) * gamma
    return z_hat if beta is None else z_hat + beta


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor, running_var: Tensor, stats: BatchStats, momentum: float, start_step: int = 0
) -> None:
    """Fold the batch statistics of steps 0..N-1, in order, into the running statistics.

    running_mean, running_var: [S, F], updated in place
    stats: BatchStats with mean, var [N, F] (biased) and count [N]
    start_step: index of the first step (a chunk of a longer sequence starts later)
    Step t updates slot min(start_step + t, S-1) with the unbiased variance, unless
    count[t] < 2; a feature whose batch mean or variance is not finite keeps its value.
    Vectorised (no host synchronisation): slots below S-1 see at most one step; slot S-1
    sees, feature by feature, the K valid steps that reach it in order, which unrolls to
    r_K = (1-m)^K r_0 + sum_k m (1-m)^(K-k) v_k.
    """
    num_slots = running_mean.shape[0]
    num_steps = stats.mean.shape[0]
    dtype = running_mean.dtype
    count = stats.count.to(dtype)
    unbiased_var = stats.var.to(dtype) * (count / (count - 1).clamp(min=1)).unsqueeze(-1)
    batch_mean = stats.mean.to(dtype)
    # [N, F]: a step folds where it had 2 active rows and, feature by feature, where its
    # statistics are finite (an inf or NaN would stay in the average for good).
    valid = (count >= 2).unsqueeze(-1) & torch.isfinite(batch_mean) & torch.isfinite(unbiased_var)
    # Mean and variance go through the same arithmetic: one stacked pass, [2, S | N, F].
    running = torch.stack((running_mean, running_var))
    batch = torch.stack((batch_mean, unbiased_var))

    # Steps that own a slot of their own: slots start_step .. start_step + head - 1.
    head = max(0, min(num_steps, num_slots - 1 - start_step))
    if head > 0:
        slots = slice(start_step, start_step + head)
        blended = (1 - momentum) * running[:, slots] + momentum * batch[:, :head]
        running[:, slots] = torch.where(valid[:head], blended, running[:, slots])

    tail_valid = valid[head:]  # [K, F] steps sharing the last slot
    if tail_valid.numel() > 0:
        steps = tail_valid.to(dtype)
        later = steps.flip(0).cumsum(0).flip(0) - steps  # valid steps after each one, per feature
        weights = steps * momentum * (1 - momentum) ** later  # [K, F]
        decay = (1 - momentum) ** steps.sum(0)  # [F]
        # masked_fill, not a product with the zero weight: a skipped step may hold NaN. A
        # Python zero, not a CPU tensor: a CUDA graph capture refuses host-to-device copies.
        batch_tail = batch[:, head:].masked_fill(~tail_valid, 0.0)
        running[:, -1] = decay * running[:, -1] + (weights * batch_tail).sum(1)
    running_mean.copy_(running[0])
    running_var.copy_(running[1])


def update_running_stats_parts(running: Dict[str, Tuple[Tensor, Tensor]], batch_stats: Dict[str, BatchStats],
                               momentum: float, start_step: int = 0) -> None:
    """update_running_stats for every part of one layer-direction: running maps a part
    ("ih", "hh", "c") to its (running_mean, running_var), batch_stats to its statistics."""
    for part, stats in batch_stats.items():
        update_running_stats(*running[part], stats, momentum, start_step)
