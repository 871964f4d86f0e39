"""The CPU backend's step GEMMs (csrc/packed_gemm.h): up to 32 rows its own
register-blocked kernel (SmallGemm; AVX2 and AVX-512 builds), beyond that MKL or at::mm,
or SmallGemm again on AMD CPUs with the AVX-512 build (panel_gemm_preferred). Every row
remainder of its 4-row blocks, partial column panels, both sides of the 32-row switch and a
batch of many blocks, forward and backward, in float64 against the reference to rounding,
with one hidden-unit block and with two (each block multiplies by its own rows of W_hh)."""
import pytest
import torch

from bnlstm_cuda import BNLSTM
from bnlstm_cuda.ops import bnlstm_layer_fused
from helpers import assert_layer_matches_reference

TOL = dict(rtol=1e-10, atol=1e-10)
# 4 * H columns: 52 in one block; H = 150 in two blocks of units rounded to the vector
# width: at least one block's 4J columns leave a partial panel.
ONE_BLOCK_H, TWO_BLOCKS_H = 13, 150


pytestmark = pytest.mark.usefixtures("cpu_extension")


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 31, 32, 33, 70])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_rows_of_one_block(batch, training, threads):
    threads(1)
    assert torch.ops.bnlstm.cpu_hidden_blocks(4, batch, ONE_BLOCK_H) == 1
    lengths = torch.full((batch,), 4)
    lengths[-1] = 1  # padded rows multiply too, and must not leak into the statistics
    assert_layer_matches_reference(bnlstm_layer_fused, "cooijmans", lengths, tol=TOL, T=4, B=batch, I=5,
                                   H=ONE_BLOCK_H, training=training)


# B = 5: a remainder row. 12 steps: longer sequences of so few rows amplify rounding
# past the tolerance.
@pytest.mark.parametrize("batch", [5, 9, 32])
def test_rows_of_two_blocks(batch, threads):
    threads(2)
    assert torch.ops.bnlstm.cpu_hidden_blocks(12, batch, TWO_BLOCKS_H) == 2
    assert_layer_matches_reference(bnlstm_layer_fused, "cooijmans", None, tol=TOL, T=12, B=batch, I=5,
                                   H=TWO_BLOCKS_H, training=True, reverse=True)


# float32 packs W_hh^T for the forward's step GEMM in 16 x 16 tiles through the vector
# transpose (float64's panels are narrower than a tile): H = 16 and 48 fill whole tiles, H = 21
# leaves part of each panel's rows and columns to the scalar loop.
@pytest.mark.parametrize("hidden_size", [16, 21, 48])
@pytest.mark.parametrize("batch", [1, 3, 8, 37])
def test_float32_transposed_weight_tiles(hidden_size, batch, threads):
    """variant="none" is nn.LSTM: the float32 layer against nn.LSTM in float64, to float32
    rounding (a misplaced weight would be off by the weight's size)."""
    threads(1)
    torch.manual_seed(hidden_size + batch)
    lstm = torch.nn.LSTM(5, hidden_size, dtype=torch.float64)
    module = BNLSTM(5, hidden_size, variant="none", backend="cpu")
    module.load_state_dict({name: value.float() for name, value in lstm.state_dict().items()})
    x = torch.randn(6, batch, 5, dtype=torch.float64)
    want, (want_h, want_c) = lstm(x)
    got, (got_h, got_c) = module(x.float())
    for name, value, expected in (("output", got, want), ("h_n", got_h, want_h), ("c_n", got_c, want_c)):
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


# The backward's weight gradients (recurrent_backward_impl): with one block of units and at
# most 64 rows (T * B), the products write them as they are (dz^T h); beyond, into transposed
# rows transposed back after the recurrence (kDirectWeightGradientRows), as several blocks
# always do (test_rows_of_two_blocks). 4 x 16 = 64 and 5 x 16 = 80 rows sit on either side;
# one step is the cell's backward.
# laurent_step leaves the recurrence unnormalized: its dz is the gates' gradient itself.
@pytest.mark.parametrize("steps", [1, 4, 5, 12])
@pytest.mark.parametrize("variant", ["cooijmans", "laurent_step"])
def test_weight_gradient_layouts(steps, variant, threads):
    threads(1)
    assert torch.ops.bnlstm.cpu_hidden_blocks(steps, 16, ONE_BLOCK_H) == 1
    lengths = torch.full((16,), steps)
    lengths[-1] = max(steps // 2, 1)  # a padded row adds nothing in either layout
    assert_layer_matches_reference(bnlstm_layer_fused, variant, lengths, tol=TOL, T=steps, B=16, I=5,
                                   H=ONE_BLOCK_H, training=True)
