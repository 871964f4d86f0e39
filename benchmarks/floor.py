"""The floor: a configuration's GEMM FLOPs at the matmul rate measured on the device.

An LSTM layer's GEMMs are the input projection W_ih x ([T*B, I] x [I, 4H]) and the
recurrent products W_hh h_{t-1} ([B, H] x [H, 4H], T of them): 2*T*B*4H*(I+H) FLOPs
forward. The backward pass does two GEMMs of each size (gradients of the input and of the
weights), so a training step is about 3x the forward. No implementation can run faster
than these FLOPs at the device's large-matmul rate; the element-wise work is left out.
"""
from __future__ import annotations

import torch

from .sweeps import Config
from .timing import time_call

FLOP_MULTIPLIER = {"inference": 1, "forward": 1, "train_step": 3}


def gemm_flops(config: Config, mode: str) -> float:
    forward = 2 * config.seq_len * config.batch * 4 * config.hidden_size * (
        config.input_size + config.hidden_size
    )
    return float(FLOP_MULTIPLIER[mode] * forward)


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
