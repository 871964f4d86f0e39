"""Exact population statistics: a calibration pass instead of the running averages.

The paper estimates evaluation statistics "over the whole dataset". This pass runs the
module with batch statistics (as in training, but without dropout and without touching
the running averages) over the batches given, pools every active sample that reaches each
statistics slot, and writes the pooled mean and unbiased variance into the running buffers.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Dict, Tuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .statistics import BatchStats


class _SlotAccumulator:
    """Per-slot sums in float64: count, sum of x and sum of x^2 over the pooled samples."""

    def __init__(self, num_slots: int, features: int, device) -> None:
        options = {"dtype": torch.float64, "device": device}
        self.count = torch.zeros(num_slots, **options)
        self.total = torch.zeros(num_slots, features, **options)
        self.total_sq = torch.zeros(num_slots, features, **options)

    def add(self, stats: BatchStats) -> None:
        """stats: mean, biased var [N, F] and count [N] of steps 0..N-1 (slot min(t, S-1))."""
        num_slots = self.count.shape[0]
        slots = torch.arange(stats.count.shape[0], device=self.count.device).clamp(max=num_slots - 1)
        count = stats.count.double()
        mean, var = stats.mean.double(), stats.var.double()
        weighted = count.unsqueeze(1)
        self.count.index_add_(0, slots, count)
        self.total.index_add_(0, slots, weighted * mean)
        # n * E[x^2] = n * (var + mean^2), so pooling exact per-step moments stays exact.
        self.total_sq.index_add_(0, slots, weighted * (var + mean * mean))

    def write(self, running_mean: Tensor, running_var: Tensor) -> None:
        """Write the pooled statistics of slots with at least 2 samples; leave the others."""
        seen = self.count >= 2
        count = self.count.clamp(min=1).unsqueeze(1)
        mean = self.total / count
        biased = (self.total_sq / count - mean * mean).clamp(min=0)
        unbiased = biased * count / (count - 1).clamp(min=1)
        keep = seen.unsqueeze(1)
        running_mean.copy_(torch.where(keep, mean.to(running_mean), running_mean))
        running_var.copy_(torch.where(keep, unbiased.to(running_var), running_var))


def _split_batch(batch) -> Tuple[object, object]:
    """A batch is an input tensor, a PackedSequence, or a pair (input, lengths)."""
    if isinstance(batch, (Tensor, PackedSequence)):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "each calibration batch must be an input tensor, a PackedSequence or a pair "
        f"(input, lengths), got {type(batch).__name__}"
    )


@torch.no_grad()
def calibrate_statistics(module, batches: Iterable, progress: bool = False) -> None:
    """Replace `module`'s running statistics by population statistics over `batches`.

    Every active sample of every batch counts once: a slot's statistics are the mean and
    unbiased variance over all samples that used that slot (steps >= max_length - 1 pool
    into the last slot). Slots that saw fewer than 2 samples keep their old values.
    Initial states are zero. The module's training flag is left as it was.
    """
    if not callable(getattr(module, "_forward", None)) or not callable(getattr(module, "_running_stats", None)):
        raise TypeError(f"module must be a BNLSTM, got {type(module).__name__}")
    if isinstance(batches, (Tensor, PackedSequence)) or not isinstance(batches, Iterable):
        raise TypeError(
            "batches must be an iterable of input tensors, PackedSequences or (input, lengths) "
            f"pairs (a list, a generator, a DataLoader), got {type(batches).__name__}"
        )
    accumulators: Dict[Tuple[str, str], _SlotAccumulator] = {}
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="calibrating", unit="batch")
    num_batches = 0
    for batch in batches:
        num_batches += 1
        try:
            input, lengths = _split_batch(batch)
            _, _, batch_stats, _ = module._forward(input, None, lengths, batch_statistics=True, dropout=0.0)
        except (TypeError, ValueError) as error:
            # Which batch of a long iterable was bad; the message itself names the argument.
            raise type(error)(f"calibration batch {num_batches - 1}: {error}") from error
        for name, parts in batch_stats.items():
            for part, stats in parts.items():
                key = (name, part)
                if key not in accumulators:
                    running_mean, _ = module._running_stats(name)[part]
                    accumulators[key] = _SlotAccumulator(*running_mean.shape, running_mean.device)
                accumulators[key].add(stats)
    if num_batches == 0:
        raise ValueError("calibrate_statistics needs at least one batch")
    for (name, part), accumulator in accumulators.items():
        accumulator.write(*module._running_stats(name)[part])
