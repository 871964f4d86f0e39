"""The floor: a configuration's GEMM FLOPs at the matmul rate measured on the device.

An LSTM layer's GEMMs are the input projection W_ih x ([T*B, I] x [I, 4H]) and the
recurrent products W_hh h_{t-1} ([B, H] x [H, 4H], T of them): 2*T*B*4H*(I+H) FLOPs
forward. The backward pass does two GEMMs of each size (gradients of the input and of the
weights), so a training step is about 3x the forward. No implementation can run faster
than these FLOPs at the device's large-matmul rate; the element-wise work is left out.
Stacked layers add their own (layer k > 0 reads the previous layer's H * directions
outputs), each direction its own, and a padded batch counts its real steps only.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .sweeps import Config
from .timing import time_call

FLOP_MULTIPLIER = {"inference": 1, "forward": 1, "train_step": 3}


def gemm_flops(config: Config, mode: str) -> float:
    hidden = config.hidden_size
    layer_inputs = [config.input_size] + [hidden * config.directions] * (config.num_layers - 1)
    forward = sum(2 * config.tokens * 4 * hidden * (inputs + hidden) for inputs in layer_inputs)
    return float(FLOP_MULTIPLIER[mode] * forward * config.directions)


def rate_dtypes(config: Config) -> Tuple[torch.dtype, ...]:
    """The dtypes a configuration's GEMMs may run in: under autocast also bfloat16."""
    return (config.dtype, torch.bfloat16) if config.autocast else (config.dtype,)


def floor_rate(config: Config, rates: Dict[torch.dtype, float]) -> float:
    """The fastest measured rate among the configuration's dtypes: the floor stays a bound
    whichever dtype an implementation takes under autocast."""
    return max(rates[dtype] for dtype in rate_dtypes(config))


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of an n x n by n x n matmul in `dtype` (n = 8192 on a GPU, 1024 on a CPU),
    from the fastest of many runs: the floor is a bound, and the least disturbed run is
    the closest to what the device can do. At least a second of runs, and at least 5: a
    dtype without a fast path (bf16 on a CPU without AVX-512 BF16 or AMX: 2 s a product on
    the AMD development machine) then costs 10 s, not the 100 s of a fixed 50 runs."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    fastest_ms = time_call(lambda: torch.mm(a, b), device, min_runs=5, min_time_s=1.0).min_ms
    return 2 * n**3 / (fastest_ms * 1e-3)
