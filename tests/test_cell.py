"""BNLSTMCell and streaming with start_step: the step index made explicit."""
import pytest
import torch

from bnlstm_cuda import BNLSTM, BNLSTMCell
from helpers import make_module, scalar_loss

TOL = dict(rtol=1e-10, atol=1e-10)
BACKENDS = ["reference", "cpu"]


def cell_loop(cell, x, hx, masks=None):
    """Run the cell over x [T, B, I], step t with mask t; returns outputs as the layer gives them."""
    outputs = []
    for t in range(x.shape[0]):
        mask = None if masks is None else masks[t]
        h, c = cell(x[t], hx, step=t, mask=mask)
        outputs.append(h if mask is None else torch.where(mask.unsqueeze(1), h, torch.zeros_like(h)))
        hx = (h, c)
    return torch.stack(outputs), hx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["cooijmans", "laurent_step", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cell_over_steps_equals_the_layer(backend, variant, training):
    """T=6 > max_length=4: the cell's steps 3..5 share the last slot as the layer's do. With
    masks equal to the layer's lengths: inactive rows keep their state and stay out of the
    statistics."""
    layer = make_module(variant, input_size=3, hidden_size=5, max_length=4, backend=backend).train(training)
    cell = BNLSTMCell.from_layer(layer).train(training)
    lengths = torch.tensor([6, 2, 5, 6])
    masks = torch.arange(6).unsqueeze(1) < lengths.unsqueeze(0)  # [T, B]
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    h0, c0 = torch.randn(1, 4, 5, dtype=torch.float64), torch.randn(1, 4, 5, dtype=torch.float64)
    x_layer, x_cell = x.clone().requires_grad_(True), x.clone().requires_grad_(True)

    out, (h_n, c_n) = layer(x_layer, (h0, c0), lengths=lengths)
    scalar_loss(out, h_n, c_n).backward()
    cell_out, (h_cell, c_cell) = cell_loop(cell, x_cell, (h0[0], c0[0]), masks)
    scalar_loss(cell_out, h_cell.unsqueeze(0), c_cell.unsqueeze(0)).backward()

    torch.testing.assert_close(cell_out, out, **TOL)
    torch.testing.assert_close(h_cell, h_n[0], **TOL)
    torch.testing.assert_close(c_cell, c_n[0], **TOL)
    torch.testing.assert_close(x_cell.grad, x_layer.grad, **TOL)
    for name, value in cell.state_dict().items():
        torch.testing.assert_close(value, layer.state_dict()[f"{name}_l0"], **TOL, msg=lambda m: f"{name}: {m}")
    for name, parameter in cell.named_parameters():
        torch.testing.assert_close(parameter.grad, getattr(layer, f"{name}_l0").grad, **TOL, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_chunked_layer_equals_one_call(backend, training):
    """Feeding a sequence in chunks, carrying (h, c) and advancing start_step, gives the
    output of one call on the whole sequence (per-step statistics do not see other steps,
    so this holds in training too, running statistics included)."""
    whole = make_module("cooijmans", input_size=3, hidden_size=5, num_layers=2, max_length=5, backend=backend)
    chunked = make_module("cooijmans", input_size=3, hidden_size=5, num_layers=2, max_length=5, backend=backend)
    chunked.load_state_dict(whole.state_dict())
    whole.train(training)
    chunked.train(training)
    x = torch.randn(9, 3, 3, dtype=torch.float64)
    expected, (h_n, c_n) = whole(x)
    pieces, hx, start = [], None, 0
    for size in (2, 1, 4, 2):
        out, hx = chunked(x[start:start + size], hx, start_step=start)
        pieces.append(out)
        start += size
    torch.testing.assert_close(torch.cat(pieces), expected, **TOL)
    torch.testing.assert_close(hx[0], h_n, **TOL)
    torch.testing.assert_close(hx[1], c_n, **TOL)
    for name, buffer in whole.named_buffers():
        torch.testing.assert_close(getattr(chunked, name), buffer, **TOL)


def test_start_step_changes_the_slots_in_eval():
    layer = make_module("cooijmans", input_size=3, hidden_size=5, max_length=6).eval()
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    assert not torch.allclose(layer(x)[0], layer(x, start_step=3)[0])
    # Past max_length every step reads the last slot: start 5 and start 50 agree.
    torch.testing.assert_close(layer(x, start_step=5)[0], layer(x, start_step=50)[0], rtol=0, atol=0)


def test_unbatched_cell_in_eval():
    layer = make_module("cooijmans", input_size=3, hidden_size=5, max_length=4).eval()
    cell = BNLSTMCell.from_layer(layer).eval()
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    out, _ = layer(x)
    hx = None
    for t in range(3):
        hx = cell(x[t, 1], hx, step=t)
        assert hx[0].shape == (5,)
        torch.testing.assert_close(hx[0], out[t, 1], **TOL)


def test_weights_move_both_ways_and_state_dict_names():
    layer = make_module("cooijmans", input_size=3, hidden_size=5, num_layers=2, bidirectional=True, max_length=4)
    cell = BNLSTMCell.from_layer(layer, layer=1, reverse=True)
    assert set(cell.state_dict()) == {
        "weight_ih", "weight_hh", "bias", "gamma_ih", "gamma_hh", "gamma_c", "beta_c",
        "running_mean_ih", "running_var_ih", "running_mean_hh", "running_var_hh", "running_mean_c", "running_var_c",
    }
    assert cell.weight_ih.shape == (20, 10) and cell.running_mean_c.shape == (4, 5)
    with torch.no_grad():
        for tensor in cell.state_dict().values():
            tensor.add_(1.0)
    layer.load_cell(cell, layer=1, reverse=True)
    for name, value in cell.state_dict().items():
        assert torch.equal(getattr(layer, f"{name}_l1_reverse"), value)
    assert not torch.equal(layer.weight_ih_l1, cell.weight_ih)


def test_cell_errors_are_clear():
    cell = BNLSTMCell(3, 5, max_length=4)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        cell(x, step=-1)
    with pytest.raises(TypeError, match="step must be an int"):
        cell(x, step=1.5)
    with pytest.raises(ValueError, match=r"mask must have shape \[4\], got \[3\]"):
        cell(x, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must have dtype torch.bool, got torch.int64"):
        cell(x, mask=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"hx\[h_0\] must have shape \(4, 5\) \(batch, hidden_size\), got \(4, 6\)"):
        cell(x, (torch.zeros(4, 6), torch.zeros(4, 5)))
    with pytest.raises(ValueError, match=r"input must be 2-D \[B, 3\]"):
        cell(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="batch=1"):
        cell(torch.randn(1, 3))
    layer = BNLSTM(3, 5, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional layer cannot"):
        layer(torch.randn(4, 2, 3), start_step=2)
    with pytest.raises(ValueError, match="reverse=True needs a bidirectional layer"):
        BNLSTMCell.from_layer(BNLSTM(3, 5), reverse=True)
    with pytest.raises(ValueError, match="layer must be < num_layers=1"):
        BNLSTMCell.from_layer(BNLSTM(3, 5), layer=1)
    with pytest.raises(ValueError, match="variant"):
        BNLSTM(3, 5).load_cell(BNLSTMCell(3, 5, variant="none"))
    with pytest.raises(ValueError, match="max_length differ"):
        BNLSTM(3, 5, max_length=7).load_cell(BNLSTMCell(3, 5, max_length=4))
