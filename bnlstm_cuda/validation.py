"""Argument checks shared by every backend, run once at the public boundary.

Each failure is a ValueError or TypeError whose message names the argument and says what
was expected and what came, so no backend ever sees a malformed call.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")
    return value


def check_input(
    input, input_size: int, dtype: torch.dtype, device: torch.device
) -> None:
    """input: [T, B, I] (or [B, T, I] batch-first), or [T, I] unbatched."""
    if not isinstance(input, Tensor):
        raise TypeError(
            f"input must be a torch.Tensor or a PackedSequence, got {type(input).__name__}"
        )
    if input.dim() not in (2, 3):
        raise ValueError(
            f"input must be 3-D [T, B, {input_size}] (batch-first [B, T, {input_size}]) or "
            f"2-D unbatched [T, {input_size}], got {input.dim()}-D shape {tuple(input.shape)}"
        )
    if input.shape[-1] != input_size:
        raise ValueError(
            f"input must have input_size={input_size} features in its last dimension, "
            f"got shape {tuple(input.shape)}"
        )
    if input.dtype != dtype:
        raise TypeError(
            f"input has dtype {input.dtype} but the module's parameters are {dtype}; "
            f"convert one of them (e.g. module.to({dtype}) or input.to({dtype}))"
        )
    if input.device != device:
        raise ValueError(
            f"input is on {input.device} but the module's parameters are on {device}"
        )
    if any(size == 0 for size in input.shape):
        raise ValueError(f"input must not be empty, got shape {tuple(input.shape)}")


def check_hx(hx, expected_shape: Tuple[int, ...], input: Tensor) -> Tuple[Tensor, Tensor]:
    """hx: (h_0, c_0), each of expected_shape, with the input's dtype and device."""
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(
            f"hx must be a tuple (h_0, c_0) of two tensors of shape {expected_shape}, "
            f"got {type(hx).__name__}"
        )
    for name, state in zip(("h_0", "c_0"), hx):
        if not isinstance(state, Tensor):
            raise TypeError(f"hx[{name}] must be a torch.Tensor, got {type(state).__name__}")
        if tuple(state.shape) != expected_shape:
            raise ValueError(
                f"hx[{name}] must have shape {expected_shape} "
                f"(num_layers * num_directions, batch, hidden_size), got {tuple(state.shape)}"
            )
        if state.dtype != input.dtype:
            raise TypeError(f"hx[{name}] must have dtype {input.dtype}, got {state.dtype}")
        if state.device != input.device:
            raise ValueError(f"hx[{name}] must be on {input.device}, got {state.device}")
    return hx[0], hx[1]


def check_lengths(
    lengths, batch: int, num_steps: int, device: torch.device
) -> Optional[Tensor]:
    """lengths: [B] integers in [1, T], on the CPU or the input's device; or a sequence of ints.

    Returns int64 [B] on `device`.
    """
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in lengths):
            raise TypeError("lengths given as a list must hold ints")
        lengths = torch.tensor(lengths, dtype=torch.int64)
    if not isinstance(lengths, Tensor):
        raise TypeError(
            f"lengths must be a 1-D integer tensor or a list of ints, got {type(lengths).__name__}"
        )
    if lengths.dim() != 1:
        raise ValueError(
            f"lengths must be 1-D of size batch={batch}, got shape {tuple(lengths.shape)}"
        )
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must have an integer dtype, got {lengths.dtype}")
    if lengths.shape[0] != batch:
        raise ValueError(f"lengths must have batch={batch} entries, got {lengths.shape[0]}")
    if lengths.device.type != "cpu" and lengths.device != device:
        raise ValueError(
            f"lengths must be on the CPU or on the input's device {device}, got {lengths.device}"
        )
    # Checking values reads them on the host: skipped while torch.compile traces (they are
    # data) and while a CUDA graph is being captured (no host synchronisation allowed).
    if not torch.compiler.is_compiling() and not _capturing(lengths):
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1:
            raise ValueError(f"lengths must be >= 1, got a length of {low}")
        if high > num_steps:
            raise ValueError(
                f"lengths must be <= the number of time steps T={num_steps}, got a length of {high}"
            )
    return lengths.to(device=device, dtype=torch.int64)


def check_training_batch(batch: int, training: bool) -> None:
    """Batch statistics of a single sequence are degenerate, as torch's BatchNorm says too."""
    if training and batch < 2:
        raise ValueError(
            f"training needs a batch of at least 2 sequences to take batch statistics, got "
            f"batch={batch}; call module.eval() for single-sequence inference"
        )


def _capturing(tensor: Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
