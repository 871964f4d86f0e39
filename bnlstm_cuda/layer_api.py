"""The contract between the modules and their backends: what a layer function takes and
returns, and the helpers every implementation shares.

A backend implements one layer in one direction as a `LayerFunction`: the reference loop
(reference.py), the compiled operators (ops.py) and the Triton layer (triton_layer.py) all
have this signature, take `LayerParams` and `RunningStats`, and return a `LayerResult`.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .statistics import BatchStats, masked_batch_stats
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
        # Tensor.to of a tensor already in `dtype` returns it, but still costs a dispatcher
        # call: skipped, since seven of them are a noticeable part of a small cell call; and
        # where nothing converts, the tuple itself comes back.
        for p in self:  # a loop, not any() over a generator: this runs at every call
            if p is not None and p.dtype != dtype:
                return LayerParams(*[p if p is None or p.dtype == dtype else p.to(dtype) for p in self])
        return self


# part -> (running_mean [S, F], running_var [S, F]); S = max_length, or 1 for sequence-wise.
RunningStats = Dict[str, Tuple[Tensor, Tensor]]


class LayerResult(NamedTuple):
    output: Tensor  # [T, B, H], zero at padded positions
    h_n: Tensor  # [B, H], each sequence's state at its last valid step
    c_n: Tensor  # [B, H]
    # part -> BatchStats of each processed step ([T, F]; [1, F] for sequence-wise input
    # statistics). Filled in training only: evaluation takes no batch statistics.
    batch_stats: Dict[str, BatchStats]
    # Where the layer folded batch_stats into the running statistics itself (fold_momentum):
    # each part's first step whose statistics held an inf or NaN, in batch_stats' order
    # ([parts] int64; -1: none). None: nothing was folded.
    folded: Optional[Tensor] = None


class LayerFunction(Protocol):
    """One BN-LSTM layer in one direction over a padded batch.

    x:       [T, B, I]
    h0, c0:  [B, H]
    params:  the layer-direction's parameters, in any floating dtype (computed in
             compute_dtype(x.dtype))
    running: running statistics, read in evaluation; training leaves them alone (the caller
             folds LayerResult.batch_stats into them with its backend's fold), unless the
             backend folds in its layers (backends.Backend.folds_in_layer) and the caller
             passes fold_momentum: then the layer folds them itself (LayerResult.folded)
    lengths: [B] int64 on x's device, 1 <= lengths <= T, or None for all T
    reverse: process each sequence from its own last element: step t reads position
             lengths[b] - 1 - t
    start_step: index of x's first time step: step t uses statistics slot
             min(start_step + t, S - 1)
    operand_dtype: a half-precision dtype to multiply in, with x, h0, c0 and the weights in
             float32 (torch.autocast's inputs, uncast); the results come in that dtype.
             Passed only to a backend that rounds float32 operands as casting them would
             (backends.Backend.rounds_operands); the others take autocast's inputs cast.
    """

    def __call__(self, x: Tensor, h0: Tensor, c0: Tensor, params: LayerParams, running: RunningStats, *,
                 variant: Variant, training: bool, eps: float, lengths: Optional[Tensor] = None,
                 reverse: bool = False, start_step: int = 0,
                 operand_dtype: Optional[torch.dtype] = None) -> LayerResult: ...


class BidirectionalResult(NamedTuple):
    output: Tensor  # [T, B, 2H]: the forward direction's features, then the reverse one's
    h_n: Tensor  # [2, B, H]: forward, reverse
    c_n: Tensor  # [2, B, H]
    batch_stats: Tuple[Dict[str, BatchStats], Dict[str, BatchStats]]  # forward's, reverse's
    folded: Tuple[Optional[Tensor], Optional[Tensor]] = (None, None)  # LayerResult.folded of each


class BidirectionalLayerFunction(Protocol):
    """Both directions of a bidirectional layer in one call, where a backend has a faster way
    than a LayerFunction call per direction: what those two calls (reverse=False, then True,
    over the same x) give, stacked. h0, c0: [2, B, H]; params, running: (forward's, reverse's)."""

    def __call__(self, x: Tensor, h0: Tensor, c0: Tensor, params: Tuple[LayerParams, LayerParams],
                 running: Tuple[RunningStats, RunningStats], *, variant: Variant, training: bool, eps: float,
                 lengths: Optional[Tensor] = None, operand_dtype: Optional[torch.dtype] = None
                 ) -> BidirectionalResult: ...


# (running statistics, batch statistics by part, momentum, start_step): folds every part of
# one layer-direction's batch statistics into its running statistics in place
# (statistics.update_running_stats_parts). A fold that walks the statistics anyway returns,
# for each part in the batch statistics' order, the first step whose statistics held an inf
# or NaN (an int64 tensor, -1 for none), so the module can warn without a second scan; one
# that does not know returns None.
RunningStatsFold = Callable[[RunningStats, Dict[str, BatchStats], float, int], Optional[Tensor]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 and float32 compute in their own dtype; half precision in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def needs_backward(x: Tensor, h0: Tensor, c0: Tensor, params: LayerParams) -> bool:
    """Whether autograd will differentiate this call: fused backends keep what their
    backward pass reads only then."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or h0.requires_grad or c0.requires_grad:
        return True
    for p in params:  # a loop, not any() over a generator: this runs at every call
        if p is not None and p.requires_grad:
            return True
    return False


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


__all__ = [
    "BidirectionalLayerFunction", "BidirectionalResult", "LayerFunction", "LayerParams", "LayerResult",
    "RunningStats", "RunningStatsFold", "active_mask", "compute_dtype", "masked_batch_stats", "needs_backward",
    "reverse_padded", "step_batch_stats",
]
