"""Which parts of the LSTM a variant normalizes (see docs/SEMANTICS.md).

A variant is a small frozen record, so backends branch on its fields, never on its name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Normalized parts: the input projection W_ih x_t, the recurrent projection W_hh h_{t-1},
# and the copy of the cell c_t that feeds h_t.
PARTS = ("ih", "hh", "c")


@dataclass(frozen=True)
class Variant:
    """What one variant normalizes.

    input_statistics: None (no input normalization), "step" (batch statistics of each time
        step, one statistics slot per step) or "sequence" (statistics over every active
        position of the whole sequence, one slot).
    """

    name: str
    input_statistics: Optional[str]
    normalize_recurrent: bool
    normalize_cell: bool

    def normalizes(self, part: str) -> bool:
        if part == "ih":
            return self.input_statistics is not None
        if part == "hh":
            return self.normalize_recurrent
        if part == "c":
            return self.normalize_cell
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")

    @property
    def parts(self) -> tuple:
        """The normalized parts, in the order ih, hh, c."""
        return tuple(part for part in PARTS if self.normalizes(part))

    def num_slots(self, part: str, max_length: int) -> int:
        """Rows of the running statistics of `part`: one per step, or one for the sequence."""
        if part == "ih" and self.input_statistics == "sequence":
            return 1
        return max_length


VARIANTS = {
    # Cooijmans et al. 2017: input, recurrent and cell normalization, per-step statistics.
    "cooijmans": Variant("cooijmans", "step", True, True),
    # Laurent et al. 2016: input projection only, frame-wise (per-step) statistics.
    "laurent_step": Variant("laurent_step", "step", False, False),
    # Laurent et al. 2016: input projection only, statistics over the sequence and batch.
    "laurent_sequence": Variant("laurent_sequence", "sequence", False, False),
    # A plain LSTM, equal to torch.nn.LSTM.
    "none": Variant("none", None, False, False),
}


def get_variant(name) -> Variant:
    """The Variant called `name` (a Variant passes through)."""
    if isinstance(name, Variant):
        return name
    if not isinstance(name, str) or name not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {name!r}")
    return VARIANTS[name]


def feature_size(part: str, hidden_size: int) -> int:
    """Features normalized by `part`: the four gates for ih and hh, the cell for c."""
    return hidden_size if part == "c" else 4 * hidden_size
