"""The CPU backend's step GEMMs (csrc/packed_gemm.h): up to 32 rows its own
register-blocked kernel (SmallGemm; AVX2 and AVX-512 builds), beyond that MKL's packed GEMM
(float32) or at::mm, or SmallGemm again on AMD CPUs (small_gemm_applies). Each kernel on its
own, whichever this CPU chooses, against the float64 product; then in the layer: every row
remainder of its 4-row blocks, partial column panels, both sides of the 32-row switch and a
batch of many blocks, forward and backward, in float64 against the reference to rounding,
with one hidden-unit block and with two (each block multiplies by its own rows of W_hh)."""
from pathlib import Path

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

# (rows, K, N): a row remainder of each size, both sides of 32 rows, many blocks; N = 45
# leaves a partial column panel at either vector width.
PRODUCT_SHAPES = [(1, 29, 45), (2, 29, 45), (3, 29, 45), (5, 1, 45), (32, 29, 45), (33, 29, 45), (70, 64, 45)]


def kernels_for(dtype, transpose):
    """The kernels a step GEMM of this dtype can take here: the swapped SmallGemm and
    dot_rows take a transposed weight, MKL's packed GEMM float32, where torch is built with
    MKL (and so exports it)."""
    names = ["small", "aten"] + (["small_swapped", "dot_rows"] if transpose else [])
    if dtype == torch.float32 and torch.backends.mkl.is_available():
        names.append("mkl_packed")
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("transpose", [True, False], ids=["transposed", "as-is"])
@pytest.mark.parametrize("rows, k, n", PRODUCT_SHAPES)
def test_each_step_kernel_matches_the_product(rows, k, n, transpose, dtype, threads):
    """a @ op(weight) through each kernel by name (cpu_step_gemm), so that every kernel is
    checked on any CPU, not only the one this CPU chooses for these rows."""
    threads(1)
    torch.manual_seed(rows * 100 + k)
    a = torch.randn(rows, k, dtype=torch.float64)
    weight = torch.randn(n, k, dtype=torch.float64) if transpose else torch.randn(k, n, dtype=torch.float64)
    want = a @ (weight.t() if transpose else weight)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for kernel in kernels_for(dtype, transpose):
        got = torch.ops.bnlstm.cpu_step_gemm(a.to(dtype), weight.to(dtype), transpose, kernel)
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{kernel}: {m}")


def test_step_kernel_choice_and_errors():
    """Up to 32 rows SmallGemm (with vector code); beyond, SmallGemm on AMD CPUs, else MKL's
    packed GEMM for float32 (where torch has MKL) and at::mm for float64. A kernel that
    cannot take the operands says so."""
    vector = torch.ops.bnlstm.cpu_vector_capability() != "default"
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("needs /proc/cpuinfo to tell an AMD CPU")
    amd = "AuthenticAMD" in cpuinfo.read_text()
    choose = torch.ops.bnlstm.cpu_step_gemm_kernel
    mkl = "mkl_packed" if torch.backends.mkl.is_available() else "aten"
    for dtype, other in ((torch.float32, mkl), (torch.float64, "aten")):
        assert choose(dtype, 32) == ("small" if vector else other)
        assert choose(dtype, 33) == ("small" if vector and amd else other)
    a, weight = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32 CPU operands"):
        torch.ops.bnlstm.cpu_step_gemm(a, weight, True, "mkl_packed")
    with pytest.raises(RuntimeError, match='kernel must be "small", "small_swapped", "dot_rows", "mkl_packed" or '
                                           '"aten", got "fast"'):
        torch.ops.bnlstm.cpu_step_gemm(a, weight, True, "fast")
    with pytest.raises(RuntimeError, match="swapped SmallGemm takes float32 or float64 and a transposed weight"):
        torch.ops.bnlstm.cpu_step_gemm(a, weight.t(), False, "small_swapped")
    with pytest.raises(RuntimeError, match="dot_rows takes float32 or float64 and a transposed weight"):
        torch.ops.bnlstm.cpu_step_gemm(a, weight.t(), False, "dot_rows")
    with pytest.raises(RuntimeError, match="a must have 5 columns"):
        torch.ops.bnlstm.cpu_step_gemm(a, weight, False, "aten")


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


def vector_width(dtype):
    """Elements of this dtype in a vector of this build (0: the default capability)."""
    width = {"avx512": 16, "avx2": 8}.get(torch.ops.bnlstm.cpu_vector_capability(), 0)
    return width // 2 if dtype == torch.float64 else width


def dot_rows_batches(dtype):
    """The rows a one-step product takes dot_rows for: at most half a vector."""
    return list(range(1, vector_width(dtype) // 2 + 1))


def swapped_batches(dtype):
    """The rows a one-step product takes the swapped SmallGemm for: one panel (two vectors)
    of a's rows, at most half a vector of it unused."""
    width = vector_width(dtype)
    return list(range(2 * width - width // 2, 2 * width + 1)) if width else []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_one_step_products_read_the_weight_as_it_is(dtype):
    """A product that runs once (a one-step call) takes dot_rows for up to half a vector of
    rows and swaps SmallGemm's operands where a's rows fill most of one panel; otherwise it
    packs W as every other product does. The default capability does neither."""
    choose = torch.ops.bnlstm.cpu_step_gemm_kernel
    dot, swapped = dot_rows_batches(dtype), swapped_batches(dtype)
    for rows in range(1, 70):
        want = "dot_rows" if rows in dot else "small_swapped" if rows in swapped else choose(dtype, rows)
        assert choose(dtype, rows, True) == want, rows
        assert choose(dtype, rows) not in ("small_swapped", "dot_rows")


# One step (a cell's call, a module's call of one step): the forward's products take
# dot_rows and the swapped kernel at the batches dot_rows_batches and swapped_batches name
# for float64 (the oracle's precision, which this layer runs in), and the packed one on
# either side, for W_hh and W_ih alike (a one-step call projects its input in the step,
# I = 70 as well as I = 5, which a longer call would project first). H = 512 on two threads
# makes two blocks of units (a step of fewer units runs on one thread), each with its own
# rows of W.
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 16, 17])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_one_step_layer(batch, training, threads):
    threads(1)
    lengths = torch.ones(batch, dtype=torch.int64)
    if batch > 2:
        lengths[-1] = 0  # a row already ended: padded at its one step
    for input_size in (5, 70):
        assert_layer_matches_reference(bnlstm_layer_fused, "cooijmans", lengths, tol=TOL, T=1, B=batch,
                                       I=input_size, H=ONE_BLOCK_H, training=training)


@pytest.mark.parametrize("batch", [4, 8, 16])
def test_one_step_layer_of_two_blocks(batch, threads):
    threads(2)
    assert torch.ops.bnlstm.cpu_hidden_blocks(1, batch, 512) == 2
    assert_layer_matches_reference(bnlstm_layer_fused, "cooijmans", None, tol=TOL, T=1, B=batch, I=5, H=512,
                                   training=True)
