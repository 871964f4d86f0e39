"""The reference BN-LSTM layer: a plain PyTorch time loop, written to be read.

This is the oracle every fused backend is tested against and the fallback where no fused
kernel runs. It implements ../shared/PAPER.md for one layer and one direction:

    gates_t = BN(W_ih x_t; gamma_ih, 0) + BN(W_hh h_{t-1}; gamma_hh, 0) + bias    # [B, 4H]
    i, f, g, o = split(gates_t)                                                # torch order
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))

with the normalizations a Variant asks for, per-step statistics over the active sequences
in training and the running statistics of slot min(t, S-1) in evaluation. float64 and
float32 inputs are computed in their own dtype, float16 and bfloat16 inputs in float32.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .statistics import BatchStats, masked_batch_stats, normalize
from .variants import Variant


class LayerParams(NamedTuple):
    """Parameters of one layer and direction (None where the variant has no such part)."""

    weight_ih: Tensor  # [4H, I]
    weight_hh: Tensor  # [4H, H]
    bias: Optional[Tensor]  # [4H]
    gamma_ih: Optional[Tensor]  # [4H]
    gamma_hh: Optional[Tensor]  # [4H]
    gamma_c: Optional[Tensor]  # [H]
    beta_c: Optional[Tensor]  # [H]

    def to(self, dtype: torch.dtype) -> "LayerParams":
        # Tensor.to of a tensor already in `dtype` returns it, but costs a few us a call through
        # the dispatcher: seven of them are a tenth of a small cell call.
        return LayerParams(*(p if p is None or p.dtype == dtype else p.to(dtype) for p in self))


# part -> (running_mean [S, F], running_var [S, F]); S = max_length, or 1 for sequence-wise.
RunningStats = Dict[str, Tuple[Tensor, Tensor]]


class LayerResult(NamedTuple):
    output: Tensor  # [T, B, H], zero at padded positions
    h_n: Tensor  # [B, H], each sequence's state at its last valid step
    c_n: Tensor  # [B, H]
    # part -> BatchStats of each processed step ([T, F]; [1, F] for sequence-wise input
    # statistics). Filled in training only: evaluation takes no batch statistics.
    batch_stats: Dict[str, BatchStats]


def needs_backward(x: Tensor, h0: Tensor, c0: Tensor, params: LayerParams) -> bool:
    """Whether autograd will differentiate this call: fused backends keep what their
    backward pass reads only then."""
    differentiable = (x, h0, c0) + tuple(p for p in params if p is not None)
    return torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)


def step_batch_stats(variant: Variant, counts: Tensor, mean_ih: Tensor, var_ih: Tensor, mean_hh: Tensor,
                     var_hh: Tensor, mean_c: Tensor, var_c: Tensor) -> Dict[str, BatchStats]:
    """LayerResult.batch_stats from the statistics a fused backend returns for every step
    (counts [T]: active sequences per step, in the statistics' dtype)."""
    batch_stats = {}
    if variant.input_statistics == "step":
        batch_stats["ih"] = BatchStats(mean_ih, var_ih, counts)
    elif variant.input_statistics == "sequence":
        batch_stats["ih"] = BatchStats(mean_ih, var_ih, counts.sum().reshape(1))
    if variant.normalize_recurrent:
        batch_stats["hh"] = BatchStats(mean_hh, var_hh, counts)
    if variant.normalize_cell:
        batch_stats["c"] = BatchStats(mean_c, var_c, counts)
    return batch_stats


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 and float32 compute in their own dtype; half precision in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def active_mask(lengths: Optional[Tensor], num_steps: int, batch: int, device) -> Tensor:
    """[T, B] bool: step t of sequence b is real (t < lengths[b]); all True without lengths."""
    if lengths is None:
        return torch.ones(num_steps, batch, dtype=torch.bool, device=device)
    steps = torch.arange(num_steps, device=device).unsqueeze(1)
    return steps < lengths.to(device).unsqueeze(0)


def reverse_padded(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Reverse each sequence within its own length; padded positions stay where they are.

    x: [T, B, ...]; lengths: [B] or None (all of length T). Its own inverse.
    """
    if lengths is None:
        return x.flip(0)
    num_steps, batch = x.shape[0], x.shape[1]
    steps = torch.arange(num_steps, device=x.device).unsqueeze(1)  # [T, 1]
    lengths = lengths.to(x.device).unsqueeze(0)  # [1, B]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # [T, B]
    index = index.reshape(num_steps, batch, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, index)


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
    """Run one BN-LSTM layer in one direction over a padded batch.

    x:       [T, B, I]
    h0, c0:  [B, H]
    lengths: [B] int64 on x's device, 1 <= lengths <= T, or None for all T
    running: running statistics read in evaluation (training leaves them alone: the caller
             folds LayerResult.batch_stats into them)
    reverse: process each sequence from its own last element: step t reads position
             lengths[b] - 1 - t.
    start_step: index of x's first time step (streaming in chunks): step t uses the
             statistics slot min(start_step + t, S - 1).
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
