"""Which GPU backend `backend="auto"` runs for a shape: a table of measurements.

Each row says which fused GPU backend the benchmark measured fastest for a training step on
one GPU model, dtype and shape. Rows come from benchmark results:

    python -m benchmarks.run --sweep gpu --update-committed   # on the GPU: benchmarks/results/<gpu>_gpu.json
    python -m benchmarks.choice_table benchmarks/results/<gpu>_gpu.json   # prints rows for MEASURED

"auto" takes the row of the same GPU model and dtype nearest in (log batch, log hidden size).
Where the table holds no row for the GPU and dtype, nothing was measured there, and "auto"
takes the first backend of FALLBACK_ORDER that can run: the CUDA kernels, then Triton.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch


class Measured(NamedTuple):
    gpu: str  # torch.cuda.get_device_name() of the GPU measured, e.g. "NVIDIA H100 80GB HBM3"
    dtype: str  # "fp32", "bf16" or "fp16", as the benchmark names them
    batch: int
    hidden_size: int
    fastest: str  # "cuda" or "triton"
    source: str  # the results file the row comes from


MEASURED: Sequence[Measured] = (
    Measured("NVIDIA H200", "bf16", 64, 512, "cuda", "nvidia-h200_gpu.json"),
    Measured("NVIDIA H200", "bf16", 64, 1024, "cuda", "nvidia-h200_gpu.json"),
)

FALLBACK_ORDER = ("cuda", "triton")

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def measured_choice(gpu: str, dtype: torch.dtype, batch: int, hidden_size: int,
                    table: Optional[Sequence[Measured]] = None) -> Optional[str]:
    """The backend measured fastest on `gpu` for the nearest measured shape, or None when the
    table (default: MEASURED) holds nothing for this GPU and dtype."""
    name = DTYPE_NAMES.get(dtype)
    rows = [row for row in (MEASURED if table is None else table) if row.gpu == gpu and row.dtype == name]
    if not rows:
        return None

    def distance(row: Measured) -> float:
        return math.hypot(math.log2(row.batch / max(batch, 1)), math.log2(row.hidden_size / max(hidden_size, 1)))

    return min(rows, key=distance).fastest


def choose(available: Sequence[str], gpu: str, dtype: torch.dtype, batch: int, hidden_size: int,
           table: Optional[Sequence[Measured]] = None) -> Optional[str]:
    """The GPU backend "auto" runs among `available`, or None if no fused GPU backend can."""
    measured = measured_choice(gpu, dtype, batch, hidden_size, table)
    if measured is not None and measured in available:
        return measured
    for name in FALLBACK_ORDER:
        if name in available:
            return name
    return None
