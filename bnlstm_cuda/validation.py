"""Argument checks shared by every backend, run once at the public boundary.

Each failure is a ValueError or TypeError whose message names the argument and says what
was expected and what came, so no backend ever sees a malformed call. Where torch.nn.LSTM
raises another type for the same mistake, the error derives from both (ShapeError,
DTypeError), so callers written for either catch it.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .variants import get_variant


# The floating dtypes torch.autocast casts (it leaves float64 alone).
AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ShapeError(ValueError, RuntimeError):
    """A tensor of the wrong shape: a ValueError here, the RuntimeError torch.nn.LSTM and
    torch.nn.LSTMCell raise for the same mistake."""


class DTypeError(TypeError, ValueError):
    """A tensor of the wrong dtype: a TypeError here, the ValueError torch.nn.LSTM raises
    for the same mistake."""


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    # A plain int skips the isinstance test against numbers.Integral, an abstract class and
    # slow to test against (start_step is checked at every forward pass).
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    # NaN passes every comparison and inf breaks the arithmetic: both are refused here, so
    # a NaN momentum cannot quietly turn every running statistic into NaN.
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """A flag must be a bool, as torch.nn.LSTM requires: bool("False") would be True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__} ({value!r})")
    return value


def check_input(
    input, input_size: int, dtype: Optional[torch.dtype], device: torch.device, batch_first: bool = False
) -> None:
    """input: [T, B, I] (or [B, T, I] batch-first), or [T, I] unbatched. T must be >= 1;
    B may be 0 (an empty batch, as torch.nn.LSTM allows). dtype: the parameters' dtype,
    which the input must have; None under torch.autocast, which casts both."""
    if not isinstance(input, Tensor):
        raise TypeError(
            f"input must be a torch.Tensor or a PackedSequence, got {type(input).__name__}"
        )
    if input.dim() not in (2, 3):
        raise ShapeError(
            f"input must be 3-D [T, B, {input_size}] (batch-first [B, T, {input_size}]) or "
            f"2-D unbatched [T, {input_size}], got {input.dim()}-D shape {tuple(input.shape)}"
        )
    if input.shape[-1] != input_size:
        raise ShapeError(
            f"input must have input_size={input_size} features in its last dimension, "
            f"got shape {tuple(input.shape)}"
        )
    if dtype is not None and input.dtype != dtype:
        hint = ""
        if input.dtype in (torch.float16, torch.bfloat16) and dtype in AUTOCAST_DTYPES:
            hint = (f", or run the module under torch.autocast({input.device.type!r}, dtype={input.dtype}) "
                    "as the layer that made the input ran")
        raise DTypeError(
            f"input has dtype {input.dtype} but the module's parameters are {dtype}; "
            f"convert one of them (e.g. module.to({input.dtype}) or input.to({dtype})){hint}"
        )
    if input.device != device:
        raise ValueError(
            f"input is on {input.device} but the module's parameters are on {device}"
        )
    time_dim = 1 if batch_first and input.dim() == 3 else 0
    if input.shape[time_dim] == 0:
        raise ShapeError(
            f"input must have at least one time step (dimension {time_dim}), got shape {tuple(input.shape)}"
        )


def check_hx(hx, expected_shape: Tuple[int, ...], input: Tensor,
             layout: str = "(num_layers * num_directions, batch, hidden_size)",
             autocast: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """hx: (h_0, c_0), each of expected_shape, with the input's dtype and device (under
    torch.autocast, `autocast` its dtype: any dtype autocast casts, as the caller casts them
    to it). layout: what the dimensions of expected_shape are, for the message."""
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(
            f"hx must be a tuple (h_0, c_0) of two tensors of shape {expected_shape}, "
            f"got {type(hx).__name__}"
        )
    for name, state in zip(("h_0", "c_0"), hx):
        if not isinstance(state, Tensor):
            raise TypeError(f"hx[{name}] must be a torch.Tensor, got {type(state).__name__}")
        if tuple(state.shape) != expected_shape:
            raise ShapeError(
                f"hx[{name}] must have shape {expected_shape} {layout}, got {tuple(state.shape)}"
            )
        if autocast is not None and state.dtype not in AUTOCAST_DTYPES:
            raise DTypeError(
                f"hx[{name}] must have dtype torch.float32, torch.float16 or torch.bfloat16 under "
                f"torch.autocast (it is cast to {autocast}), got {state.dtype}"
            )
        if autocast is None and state.dtype != input.dtype:
            raise DTypeError(f"hx[{name}] must have dtype {input.dtype}, got {state.dtype}")
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
        # Range-checked as Python ints: a value beyond int64 would otherwise fail inside
        # torch.tensor with a message that does not name the argument.
        _check_length_range([int(n) for n in lengths], num_steps)
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
    # An empty batch has no lengths to check (and min() of nothing fails).
    if lengths.numel() and not torch.compiler.is_compiling() and not _capturing(lengths):
        _check_length_range([int(lengths.min()), int(lengths.max())], num_steps)
    return lengths.to(device=device, dtype=torch.int64)


def _check_length_range(values: List[int], num_steps: int) -> None:
    if not values:
        return
    low, high = min(values), max(values)
    if low < 1:
        raise ValueError(f"lengths must be >= 1, got a length of {low}")
    if high > num_steps:
        raise ValueError(
            f"lengths must be <= the number of time steps T={num_steps}, got a length of {high}"
        )


def check_training_batch(batch: int, training: bool, variant) -> None:
    """Batch statistics of a single sequence are degenerate, as torch's BatchNorm says too.
    Only a variant (name or Variant) that normalizes something takes them: "none" trains on
    any batch. An empty batch (0) takes none either and passes."""
    variant = get_variant(variant)
    if training and batch == 1 and variant.parts:
        raise ValueError(
            f"training needs a batch of at least 2 sequences to take batch statistics, got "
            f"batch={batch}; call module.eval() for single-sequence inference (variant={variant.name!r} "
            "normalizes with batch statistics; variant='none' takes none)"
        )


def check_synchronized_batch(batch: int) -> None:
    """A synchronized training step all-reduces with every other process, so each must run
    it with at least one sequence (an empty batch would skip the exchange the others wait on)."""
    if batch == 0:
        raise ValueError(
            "a training step with sync_statistics=True needs at least one sequence on every process "
            "(the others wait for its statistics), got batch=0"
        )


def _capturing(tensor: Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_packed(packed, input_size: int) -> None:
    """A PackedSequence as torch.nn.utils.rnn.pack_sequence makes one: data [N, I];
    batch_sizes [T] int64 on the CPU, each >= 1, non-increasing, summing to N;
    sorted_indices and unsorted_indices both None, or both [B] permutations
    (B = batch_sizes[0]) inverse to each other. A hand-built one that breaks this would
    otherwise fail deep inside pad_packed_sequence, or silently drop rows."""
    data, batch_sizes = packed.data, packed.batch_sizes
    if not isinstance(data, Tensor) or data.dim() != 2:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ShapeError(
            f"PackedSequence data must be 2-D [sum of lengths, {input_size}], got {shape}"
        )
    if data.shape[1] != input_size:
        raise ShapeError(
            f"PackedSequence data must have input_size={input_size} features, got shape "
            f"{tuple(data.shape)}"
        )
    if (
        not isinstance(batch_sizes, Tensor)
        or batch_sizes.dim() != 1
        or batch_sizes.dtype != torch.int64
        or batch_sizes.device.type != "cpu"
        or batch_sizes.numel() == 0
    ):
        described = (
            f"{batch_sizes.dtype} shape {tuple(batch_sizes.shape)} on {batch_sizes.device}"
            if isinstance(batch_sizes, Tensor) else type(batch_sizes).__name__
        )
        raise ValueError(
            f"PackedSequence batch_sizes must be a non-empty 1-D int64 tensor on the CPU, got {described}"
        )
    if torch.compiler.is_compiling():
        return  # values are data while tracing; pad_packed_sequence reads them anyway
    sizes = batch_sizes.tolist()
    if min(sizes) < 1:
        raise ValueError(f"PackedSequence batch_sizes must all be >= 1, got {_brief(sizes)}")
    if any(later > earlier for earlier, later in zip(sizes, sizes[1:])):
        raise ValueError(
            "PackedSequence batch_sizes must be non-increasing (sequences sorted by decreasing "
            f"length, as pack_padded_sequence makes them), got {_brief(sizes)}"
        )
    if sum(sizes) != data.shape[0]:
        raise ValueError(
            f"PackedSequence data has {data.shape[0]} rows but its batch_sizes sum to {sum(sizes)}"
        )
    batch = sizes[0]
    indices = {name: getattr(packed, name) for name in ("sorted_indices", "unsorted_indices")}
    if (indices["sorted_indices"] is None) != (indices["unsorted_indices"] is None):
        raise ValueError("PackedSequence sorted_indices and unsorted_indices must be both None or both set")
    if indices["sorted_indices"] is None:
        return
    identity = torch.arange(batch)
    for name, index in indices.items():
        if (
            not isinstance(index, Tensor)
            or index.dim() != 1
            or index.dtype != torch.int64
            or index.shape[0] != batch
            or not torch.equal(index.cpu().sort().values, identity)
        ):
            described = (
                f"{index.dtype} {_brief(index.tolist())}" if isinstance(index, Tensor)
                else type(index).__name__
            )
            raise ValueError(
                f"PackedSequence {name} must be a permutation of 0..{batch - 1} "
                f"(int64 [{batch}], batch = batch_sizes[0]), got {described}"
            )
    if not torch.equal(indices["sorted_indices"].cpu()[indices["unsorted_indices"].cpu()], identity):
        raise ValueError("PackedSequence unsorted_indices must be the inverse permutation of sorted_indices")


def _brief(values: list, limit: int = 12) -> str:
    """A list for an error message, shortened when long."""
    if len(values) <= limit:
        return str(values)
    return f"[{', '.join(map(str, values[:limit]))}, ...] ({len(values)} entries)"


def state_dict_mismatches(
    state_dict, prefix: str, own: Dict[str, Tensor], max_length: int
) -> List[str]:
    """What a checkpoint was saved with, where its shapes differ from a module's own
    parameters and buffers (`own`: name -> tensor, names without `prefix`).

    torch's load_state_dict reports every mismatched tensor; these lines say which
    constructor argument differs, for a `_load_from_state_dict` hook to put first:
    max_length from the rows of the running statistics, hidden_size from weight_hh,
    input_size from the first layer's weight_ih.
    """
    saved_slots, saved_hidden, saved_input = set(), set(), set()
    hidden = input_size = None
    for name, tensor in own.items():
        value = state_dict.get(prefix + name)
        if not isinstance(value, Tensor) or value.shape == tensor.shape or value.dim() != tensor.dim():
            continue
        if name.startswith("running_") and tensor.dim() == 2 and value.shape[1] == tensor.shape[1]:
            if tensor.shape[0] == max_length:  # a one-slot laurent_sequence buffer has no max_length
                saved_slots.add(value.shape[0])
        elif name.startswith("weight_hh") and tensor.dim() == 2:
            hidden = tensor.shape[1]
            saved_hidden.add(value.shape[1])
        elif name.split("_reverse")[0] in ("weight_ih", "weight_ih_l0") and value.shape[0] == tensor.shape[0]:
            input_size = tensor.shape[1]
            saved_input.add(value.shape[1])
    messages = []
    for argument, saved, current in (
        ("max_length", saved_slots, max_length),
        ("hidden_size", saved_hidden, hidden),
        ("input_size", saved_input, input_size),
    ):
        if saved:
            values = ", ".join(str(v) for v in sorted(saved))
            messages.append(
                f"the checkpoint was saved with {argument}={values} but this module has "
                f"{argument}={current}: construct the module with {argument}={values} to load it"
            )
    return messages


def check_layer_options(input_size, hidden_size, max_length, variant, momentum, eps, gamma_init, backend,
                        backend_names: Sequence[str]) -> dict:
    """The constructor options BNLSTM and BNLSTMCell share, checked: name -> value."""
    return {
        "input_size": check_positive_int("input_size", input_size),
        "hidden_size": check_positive_int("hidden_size", hidden_size),
        "max_length": check_positive_int("max_length", max_length),
        "momentum": check_float("momentum", momentum, 0.0, 1.0),
        "eps": check_float("eps", eps, 0.0, math.inf, low_open=True),
        "gamma_init": check_float("gamma_init", gamma_init, -math.inf, math.inf),
        "variant": get_variant(variant).name,
        "backend": check_choice("backend", backend, backend_names),
    }
