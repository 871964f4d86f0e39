"""The reference BN-LSTM layer: a plain PyTorch time loop, written to be read.

This is the oracle every fused backend is tested against and the fallback where no fused
kernel runs. It implements docs/SEMANTICS.md for one layer and one direction:

    gates_t = BN(W_ih x_t; gamma_ih, 0) + BN(W_hh h_{t-1}; gamma_hh, 0) + bias    # [B, 4H]
    i, f, g, o = split(gates_t)                                                # torch order
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))

with the normalizations a Variant asks for, per-step statistics over the active sequences
in training and the running statistics of slot min(t, S-1) in evaluation. float64 and
float32 inputs are computed in their own dtype, float16 and bfloat16 inputs in float32.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .layer_api import LayerParams, LayerResult, RunningStats, active_mask, compute_dtype, reverse_padded
from .statistics import BatchStats, masked_batch_stats, normalize
from .variants import Variant


def bnlstm_layer_reference(
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
    batch_stats_fn: Callable[[Tensor, Tensor], BatchStats] = masked_batch_stats,
) -> LayerResult:
    """Run one BN-LSTM layer in one direction over a padded batch: a
    layer_api.LayerFunction (arguments and result as documented there), plus

    batch_stats_fn: (z [..., B, F], mask [..., B]) -> BatchStats [..., F], how training
             takes batch statistics. Called once for the input side (all steps together)
             and once per step for each normalized recurrent part. The default,
             masked_batch_stats, takes them over this batch; bnlstm_cuda.distributed passes
             one that reduces the moments over a process group (synchronized statistics).
    """
    out_dtype = x.dtype
    dtype = compute_dtype(x.dtype)
    num_steps, batch, _ = x.shape
    p = params.to(dtype)
    h, c = h0.to(dtype), c0.to(dtype)
    x = x.to(dtype)
    if reverse:
        x = reverse_padded(x, lengths)
    active = active_mask(lengths, num_steps, batch, x.device)  # [T, B]
    if lengths is not None:
        # Padding may hold anything (NaN too); zero it so it cannot reach a statistic or,
        # through 0 * NaN in the backward pass, a gradient.
        x = torch.where(active.unsqueeze(-1), x, torch.zeros_like(x))
    steps = torch.arange(num_steps, device=x.device) + start_step
    batch_stats: Dict[str, BatchStats] = {}

    def population(part: str, step) -> Tuple[Tensor, Tensor]:
        # Evaluation statistics of the given step(s), an int or a tensor of steps: slot
        # min(step, S - 1). (An int indexes without a tensor round trip, which keeps the
        # time loop free of data-dependent indexing under torch.compile.)
        mean, var = running[part]
        last = mean.shape[0] - 1
        slot = min(step, last) if isinstance(step, int) else step.clamp(max=last)
        return mean[slot].to(dtype), var[slot].to(dtype)

    # Input side, all steps at once: one GEMM, then the input normalization.
    wx = x @ p.weight_ih.t()  # [T, B, 4H]
    if variant.input_statistics == "step":
        if training:
            stats = batch_stats["ih"] = batch_stats_fn(wx, active)  # [T, 4H]
            mean, var = stats.mean, stats.var
        else:
            mean, var = population("ih", steps)
        wx = normalize(wx, mean, var, p.gamma_ih, None, eps)
    elif variant.input_statistics == "sequence":
        if training:
            flat = batch_stats_fn(wx.reshape(1, -1, wx.shape[-1]), active.reshape(1, -1))
            batch_stats["ih"] = flat  # [1, 4H]
            mean, var = flat.mean, flat.var
        else:
            mean, var = population("ih", steps[:1])
        wx = normalize(wx, mean, var, p.gamma_ih, None, eps)  # [1, F] broadcasts over T
    if p.bias is not None:
        wx = wx + p.bias

    recurrent_stats, cell_stats, outputs = [], [], []
    for t in range(num_steps):
        wh = h @ p.weight_hh.t()  # [B, 4H]
        if variant.normalize_recurrent:
            if training:
                stats = batch_stats_fn(wh, active[t])
                recurrent_stats.append(stats)
                mean, var = stats.mean, stats.var
            else:
                mean, var = population("hh", start_step + t)
            wh = normalize(wh, mean, var, p.gamma_hh, None, eps)
        i, f, g, o = (wx[t] + wh).chunk(4, dim=1)  # each [B, H]
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_out = c_next
        if variant.normalize_cell:
            if training:
                stats = batch_stats_fn(c_next, active[t])
                cell_stats.append(stats)
                mean, var = stats.mean, stats.var
            else:
                mean, var = population("c", start_step + t)
            c_out = normalize(c_next, mean, var, p.gamma_c, p.beta_c, eps)
        h_next = torch.sigmoid(o) * torch.tanh(c_out)
        # Padded positions give zero output and leave the state where it was.
        keep = active[t].unsqueeze(1)  # [B, 1]
        h = torch.where(keep, h_next, h)
        c = torch.where(keep, c_next, c)
        outputs.append(torch.where(keep, h_next, torch.zeros_like(h_next)))

    for part, per_step in (("hh", recurrent_stats), ("c", cell_stats)):
        if per_step:
            batch_stats[part] = BatchStats(*(torch.stack(field) for field in zip(*per_step)))
    output = torch.stack(outputs)  # [T, B, H]
    if reverse:
        output = reverse_padded(output, lengths)
    return LayerResult(output.to(out_dtype), h.to(out_dtype), c.to(out_dtype), batch_stats)
