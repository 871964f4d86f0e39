"""The configurations a run measures: one layer, one direction, input [T, B, I]."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Config:
    seq_len: int  # T
    batch: int  # B
    input_size: int  # I
    hidden_size: int  # H
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def shape(self) -> str:
        return f"T={self.seq_len} B={self.batch} I={self.input_size} H={self.hidden_size}"

    @property
    def label(self) -> str:
        return f"{self.shape} {self.dtype_name}"


def around(base: Config, **axes) -> List[Config]:
    """`base`, then `base` with one field changed at a time to each of the values given."""
    configs = [base]
    for field, values in axes.items():
        configs += [replace(base, **{field: value}) for value in values]
    return list(dict.fromkeys(configs))


# The issue's CPU reference shapes (another issue states its targets on them).
ISSUE_SMALL = Config(100, 32, 64, 128, torch.float32)
ISSUE_LARGE = Config(100, 64, 128, 256, torch.float32)

# Sized for a 2-core CPU, where the reference (a Python time loop) is slow: about 1.5
# minutes there, quiet, while still spanning T, B, H and dtype around ISSUE_SMALL.
DEFAULT = around(
    ISSUE_SMALL,
    seq_len=(25, 50),
    batch=(8, 64),
    hidden_size=(64, 256),
    dtype=(torch.bfloat16,),
) + [ISSUE_LARGE]

# bf16 and fp32 at B=64, I=H=512 and 1024, T=100 and 784 (pixel-by-pixel MNIST), plus a
# batch sweep so the plot has a batch axis.
GPU = [
    Config(seq_len, 64, size, size, dtype)
    for dtype in (torch.bfloat16, torch.float32)
    for size in (512, 1024)
    for seq_len in (100, 784)
] + [Config(100, batch, 512, 512, torch.bfloat16) for batch in (16, 32, 128, 256)]

SWEEPS: Dict[str, List[Config]] = {"default": DEFAULT, "gpu": GPU}
