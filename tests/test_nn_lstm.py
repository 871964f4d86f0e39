"""Agreement with torch.nn.LSTM: the "none" variant, BN with identity statistics, from_lstm."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from bnlstm_cuda import BNLSTM
from helpers import scalar_loss

TOL = dict(rtol=1e-10, atol=1e-10)


def make_lstm(**kwargs):
    kwargs = {"input_size": 3, "hidden_size": 5, "num_layers": 2, "bidirectional": True, **kwargs}
    return nn.LSTM(**kwargs, dtype=torch.float64)


def assert_grads_match(module, lstm):
    for name, parameter in module.named_parameters():
        if name.startswith("bias_"):
            # bias = bias_ih + bias_hh, so each of the two receives the gradient of bias.
            expected = getattr(lstm, name.replace("bias_", "bias_ih_")).grad
        else:
            expected = getattr(lstm, name).grad
        torch.testing.assert_close(parameter.grad, expected, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_none_variant_equals_lstm_on_packed_bidirectional_two_layers(training):
    lstm = make_lstm()
    module = BNLSTM.from_lstm(lstm, variant="none").train(training)
    lstm.train(training)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([4, 6, 1, 3])  # unsorted: exercises sorted/unsorted indices
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    hx = (torch.randn(4, 4, 5, dtype=torch.float64), torch.randn(4, 4, 5, dtype=torch.float64))

    out, (h_n, c_n) = module(packed, hx)
    expected, (h_ref, c_ref) = lstm(packed, hx)
    assert torch.equal(out.batch_sizes, expected.batch_sizes)
    assert torch.equal(out.sorted_indices, expected.sorted_indices)
    assert torch.equal(out.unsorted_indices, expected.unsorted_indices)
    torch.testing.assert_close(out.data, expected.data, **TOL)
    torch.testing.assert_close(h_n, h_ref, **TOL)
    torch.testing.assert_close(c_n, c_ref, **TOL)

    scalar_loss(out.data, h_n, c_n).backward()
    scalar_loss(expected.data, h_ref, c_ref).backward()
    assert_grads_match(module, lstm)


def test_none_variant_equals_lstm_batch_first_unbatched_and_no_bias():
    for kwargs, shape in (({"batch_first": True}, (4, 7, 3)), ({}, (7, 3)), ({"bias": False}, (7, 2, 3))):
        lstm = make_lstm(**kwargs)
        module = BNLSTM.from_lstm(lstm, variant="none").eval()
        x = torch.randn(*shape, dtype=torch.float64)
        out, (h_n, c_n) = module(x)
        expected, (h_ref, c_ref) = lstm(x)
        torch.testing.assert_close(out, expected, **TOL)
        torch.testing.assert_close(h_n, h_ref, **TOL)
        torch.testing.assert_close(c_n, c_ref, **TOL)


def test_identity_statistics_and_unit_gamma_equal_lstm_in_eval():
    """With mean 0, var 1 - eps (so var + eps = 1), gamma 1 and beta 0, every BN is the
    identity and the BN-LSTM is an LSTM."""
    lstm = make_lstm()
    module = BNLSTM.from_lstm(lstm, max_length=3).eval()
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            if name.startswith("gamma_"):
                tensor.fill_(1.0)
        for name, tensor in module.named_buffers():
            tensor.fill_(1.0 - module.eps if name.startswith("running_var_") else 0.0)
    x = torch.randn(7, 3, 3, dtype=torch.float64)  # T=7 > max_length: the last slot too
    out, (h_n, c_n) = module(x)
    expected, (h_ref, c_ref) = lstm(x)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(h_n, h_ref, **TOL)
    torch.testing.assert_close(c_n, c_ref, **TOL)


def test_from_lstm_copies_weights_and_sums_biases():
    lstm = make_lstm(batch_first=True, dropout=0.25)
    module = BNLSTM.from_lstm(lstm, max_length=9)
    assert (module.num_layers, module.bidirectional, module.batch_first, module.dropout) == (2, True, True, 0.25)
    assert module.max_length == 9 and module.weight_ih_l0.dtype == torch.float64
    for name in ("l0", "l1_reverse"):
        assert torch.equal(getattr(module, f"weight_ih_{name}"), getattr(lstm, f"weight_ih_{name}"))
        assert torch.equal(getattr(module, f"weight_hh_{name}"), getattr(lstm, f"weight_hh_{name}"))
        torch.testing.assert_close(
            getattr(module, f"bias_{name}"),
            getattr(lstm, f"bias_ih_{name}") + getattr(lstm, f"bias_hh_{name}"),
        )
        assert torch.all(getattr(module, f"gamma_hh_{name}") == 0.1)


def test_from_lstm_rejects_projections_and_other_modules():
    with pytest.raises(ValueError, match="proj_size"):
        BNLSTM.from_lstm(nn.LSTM(3, 5, proj_size=2))
    with pytest.raises(TypeError, match="torch.nn.LSTM"):
        BNLSTM.from_lstm(nn.GRU(3, 5))
