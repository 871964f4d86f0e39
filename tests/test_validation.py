"""Bad input gets a ValueError or TypeError that names the argument and what was expected."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from bnlstm_cuda import BNLSTM


@pytest.fixture
def module():
    return BNLSTM(3, 4, num_layers=2, max_length=5)


def test_wrong_rank(module):
    with pytest.raises(ValueError, match=r"input must be 3-D .* got 4-D shape \(2, 3, 4, 3\)"):
        module(torch.randn(2, 3, 4, 3))
    with pytest.raises(ValueError, match="got 1-D"):
        module(torch.randn(3))


def test_wrong_feature_size(module):
    with pytest.raises(ValueError, match=r"input_size=3 .* got shape \(5, 2, 7\)"):
        module(torch.randn(5, 2, 7))


def test_not_a_tensor(module):
    with pytest.raises(TypeError, match="input must be a torch.Tensor or a PackedSequence, got list"):
        module([[1.0, 2.0, 3.0]])


def test_empty_input(module):
    with pytest.raises(ValueError, match=r"at least one time step \(dimension 0\), got shape \(0, 2, 3\)"):
        module(torch.randn(0, 2, 3))
    # An empty batch is no error, as in nn.LSTM (tests/test_drop_in.py).
    out, (h_n, c_n) = module(torch.randn(5, 0, 3))
    assert out.shape == (5, 0, 4) and h_n.shape == c_n.shape == (2, 0, 4)


def test_dtype_mismatch(module):
    with pytest.raises(TypeError, match=r"input has dtype torch.float64 but the module's parameters are torch.float32"):
        module(torch.randn(5, 2, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "hx, error, pattern",
    [
        ((torch.zeros(2, 3, 4), torch.zeros(2, 2, 4)), ValueError, r"hx\[h_0\] must have shape \(2, 2, 4\) .* got \(2, 3, 4\)"),
        ((torch.zeros(2, 2, 4), torch.zeros(1, 2, 4)), ValueError, r"hx\[c_0\] must have shape \(2, 2, 4\)"),
        ((torch.zeros(2, 2, 4, dtype=torch.float64),) * 2, TypeError, r"hx\[h_0\] must have dtype torch.float32"),
        (torch.zeros(2, 2, 4), TypeError, r"hx must be a tuple \(h_0, c_0\)"),
        ((torch.zeros(2, 2, 4), None), TypeError, r"hx\[c_0\] must be a torch.Tensor"),
    ],
)
def test_bad_hx(module, hx, error, pattern):
    with pytest.raises(error, match=pattern):
        module(torch.randn(5, 2, 3), hx)


@pytest.mark.parametrize(
    "lengths, error, pattern",
    [
        (torch.tensor([[5, 3]]), ValueError, r"lengths must be 1-D .* got shape \(1, 2\)"),
        (torch.tensor([5.0, 3.0]), TypeError, "lengths must have an integer dtype, got torch.float32"),
        (torch.tensor([5, 3, 2]), ValueError, "lengths must have batch=2 entries, got 3"),
        (torch.tensor([5, 0]), ValueError, "lengths must be >= 1, got a length of 0"),
        (torch.tensor([6, 3]), ValueError, r"lengths must be <= the number of time steps T=5, got a length of 6"),
        ([5, 2.5], TypeError, "lengths given as a list must hold ints"),
        ("5, 3", TypeError, "lengths must be a 1-D integer tensor or a list of ints, got str"),
        (torch.tensor([5, 3], device="meta"), ValueError, "lengths must be on the CPU or on the input's device cpu, got meta"),
    ],
)
def test_bad_lengths(module, lengths, error, pattern):
    with pytest.raises(error, match=pattern):
        module(torch.randn(5, 2, 3), lengths=lengths)


def test_lengths_with_packed_sequence(module):
    packed = pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ValueError, match="lengths must be None when input is a PackedSequence"):
        module(packed, lengths=[5, 3])


def test_batch_of_one_in_training(module):
    with pytest.raises(ValueError, match=r"at least 2 sequences .* got batch=1; call module.eval\(\)"):
        module(torch.randn(5, 1, 3))
    with pytest.raises(ValueError, match="batch=1"):
        module(torch.randn(5, 3))  # unbatched
    module.eval()
    assert module(torch.randn(5, 3))[0].shape == (5, 4)
    # Nothing normalized, no statistics needed.
    assert BNLSTM(3, 4, variant="none")(torch.randn(5, 3))[0].shape == (5, 4)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"hidden_size": 0}, ValueError, "hidden_size must be >= 1, got 0"),
        ({"input_size": 2.5}, TypeError, "input_size must be an int, got float"),
        ({"num_layers": 0}, ValueError, "num_layers must be >= 1"),
        ({"max_length": 0}, ValueError, "max_length must be >= 1"),
        ({"dropout": 1.5}, ValueError, r"dropout must be in \[0.0, 1.0\], got 1.5"),
        ({"momentum": -0.1}, ValueError, "momentum must be in"),
        ({"eps": 0.0}, ValueError, r"eps must be in \(0.0, inf\]"),
        ({"variant": "batchnorm"}, ValueError, r"variant must be one of \['cooijmans', 'laurent_sequence', 'laurent_step', 'none'\], got 'batchnorm'"),
        ({"backend": "cudnn"}, ValueError, r"backend must be one of \['auto', 'reference', 'cpu'[^]]*\], got 'cudnn'"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, pattern):
    arguments = {"input_size": 3, "hidden_size": 4, **kwargs}
    with pytest.raises(error, match=pattern):
        BNLSTM(**arguments)


def test_device_mismatch(module):
    with pytest.raises(ValueError, match="input is on meta but the module's parameters are on cpu"):
        module(torch.empty(5, 2, 3, device="meta"))
