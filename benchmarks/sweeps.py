"""The configurations a run measures: input [T, B, I]; one layer, one direction, every
mode unless a configuration says otherwise."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Config:
    seq_len: int  # T
    batch: int  # B
    input_size: int  # I
    hidden_size: int  # H
    dtype: torch.dtype
    num_layers: int = 1
    bidirectional: bool = False
    # The batch as a PackedSequence of random lengths in [1, T] (padded_lengths).
    padded: bool = False
    # Module and input in `dtype`, the call under torch.autocast to bfloat16.
    autocast: bool = False
    # The modes measured (names from providers.MODES); None: every mode.
    modes: Optional[Tuple[str, ...]] = None

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def tokens(self) -> int:
        """The steps of all sequences: T*B, or the sum of the lengths of a padded batch."""
        return int(padded_lengths(self).sum()) if self.padded else self.seq_len * self.batch

    @property
    def shape(self) -> str:
        return shape_text(self.seq_len, self.batch, self.input_size, self.hidden_size, self.num_layers,
                          self.bidirectional, self.padded, self.autocast)

    @property
    def label(self) -> str:
        return f"{self.shape} {self.dtype_name}"


def shape_text(seq_len: int, batch: int, input_size: int, hidden_size: int, num_layers: int = 1,
               bidirectional: bool = False, padded: bool = False, autocast: bool = False) -> str:
    """"T=50 B=32 I=64 H=128", then shape_extras: "T=50 B=32 I=64 H=128 L=2 bidir"."""
    text = f"T={seq_len} B={batch} I={input_size} H={hidden_size}"
    return " ".join([text, *shape_extras(num_layers, bidirectional, padded, autocast)])


def shape_extras(num_layers: int = 1, bidirectional: bool = False, padded: bool = False,
                 autocast: bool = False) -> List[str]:
    """What differs from one unpadded layer in one direction without autocast: "L=2",
    "bidir", "padded", "autocast-bf16"."""
    extras = [f"L={num_layers}"] * (num_layers != 1) + ["bidir"] * bidirectional
    return extras + ["padded"] * padded + ["autocast-bf16"] * autocast


def padded_lengths(config: Config) -> torch.Tensor:
    """[B] int64 on the CPU: a padded configuration's sequence lengths, uniform in [1, T], the
    same in every run and for every provider (a generator of their own, not the global seed)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1, config.seq_len + 1, (config.batch,), generator=generator)


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

# What users run on a CPU, around the issue's small shape: short and long sequences, small
# batches, a serving call (B=1: inference only, since a batch-normalized layer cannot train on
# one sequence), a stacked bidirectional model, wide layers, a padded batch, pixel-by-pixel
# MNIST and the two ways to ask for bf16.
_USER_SMALL = dict(input_size=64, hidden_size=128, dtype=torch.float32)
USERS = [Config(seq_len, batch, **_USER_SMALL) for seq_len in (25, 100) for batch in (8, 32)] + [
    Config(100, 1, **_USER_SMALL, modes=("inference",)),
    Config(50, 32, **_USER_SMALL, num_layers=2, bidirectional=True),
    Config(50, 32, 512, 512, torch.float32),
    Config(100, 32, **_USER_SMALL, padded=True),
    Config(784, 16, 1, 100, torch.float32),
    Config(100, 32, **_USER_SMALL, autocast=True),
    Config(100, 32, 64, 128, torch.bfloat16),
]

SWEEPS: Dict[str, List[Config]] = {"default": DEFAULT, "gpu": GPU, "users": USERS}
