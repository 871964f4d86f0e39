"""BNLSTMCell and streaming with start_step: the step index made explicit."""
import warnings

import pytest
import torch

from bnlstm_cuda import BNLSTM, BNLSTMCell
from helpers import (copied_and_loaded, counting_direct_calls, general_path_only, make_module,
                     randomize_bn_parameters, scalar_loss)

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
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_cell_over_steps_equals_the_layer(backend, variant, training, masked):
    """T=6 > max_length=4: the cell's steps 3..5 share the last slot as the layer's do. With
    masks equal to the layer's lengths: inactive rows keep their state and stay out of the
    statistics. Unmasked, the CPU cell's calls after its first take its direct path."""
    layer = make_module(variant, input_size=3, hidden_size=5, max_length=4, backend=backend).train(training)
    cell = BNLSTMCell.from_layer(layer).train(training)
    lengths = torch.tensor([6, 2, 5, 6]) if masked else None
    masks = torch.arange(6).unsqueeze(1) < lengths.unsqueeze(0) if masked else None  # [T, B]
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


@pytest.mark.parametrize("variant", ["cooijmans", "laurent_step", "laurent_sequence", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("mode", ["train", "eval_graph", "eval_no_grad"])
@pytest.mark.parametrize("first_state", ["given", "none"])
def test_direct_call_equals_the_general_path(variant, bias, dtype, mode, first_state):
    """The CPU cell's direct path gives, bit for bit, what the general path gives: states,
    running statistics after every fold, and every gradient. A decoder loop of 6 steps
    past max_length=4; the first call resolves the backend, the others go direct."""
    torch.manual_seed(3)
    training, grad = mode == "train", mode != "eval_no_grad"
    kwargs = dict(bias=bias, variant=variant, max_length=4, backend="cpu", dtype=dtype)
    direct, taken = counting_direct_calls(BNLSTMCell(5, 7, **kwargs).train(training))
    general = general_path_only(BNLSTMCell(5, 7, **kwargs).train(training))
    randomize_bn_parameters(direct)
    general.load_state_dict(direct.state_dict())
    x = torch.randn(6, 3, 5, dtype=dtype)
    hx = None if first_state == "none" else (torch.randn(3, 7, dtype=dtype), torch.randn(3, 7, dtype=dtype))
    results = []
    for cell in (direct, general):
        inputs = x.clone().requires_grad_(grad)
        state = None if hx is None else tuple(t.clone().requires_grad_(grad) for t in hx)
        with torch.set_grad_enabled(grad):
            new_state = state
            for step in range(6):
                new_state = cell(inputs[step], new_state, step=step)
            got = list(new_state)
            if grad:
                scalar_loss(*new_state, new_state[0]).backward()
                got += [inputs.grad] + ([] if state is None else [t.grad for t in state])
                got += [p.grad for p in cell.parameters()]
        results.append(got + [b.clone() for b in cell.buffers()])
    assert sum(result is not None for result in taken) == 5
    for index, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), index


def test_direct_call_leaves_other_calls_to_the_general_path():
    """Calls the direct path does not serve reach the general path, which names what is
    wrong with a bad one, as before the first call."""
    cell = BNLSTMCell(3, 5, max_length=4, backend="cpu")
    x, hx = torch.randn(4, 3), (torch.zeros(4, 5), torch.zeros(4, 5))
    cell(x, hx)  # resolves the backend
    assert cell._direct_cpu_call(x, hx, 1, None) is not None
    mask = torch.ones(4, dtype=torch.bool)
    served_elsewhere = [
        (x, hx, 1, mask), (x[0], None, 1, None), (x, list(hx), 1, None), (x.double(), None, 1, None),
        (x[:1], None, 1, None), (x[:0], None, 1, None), (x, hx, 1.0, None), (x, hx, -1, None),
    ]
    for arguments in served_elsewhere:
        assert cell._direct_cpu_call(*arguments) is None
    with torch.no_grad():  # a training call without autograd folds after its layer
        assert cell._direct_cpu_call(x, hx, 1, None) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cell._direct_cpu_call(x, hx, 1, None) is None
    cell.to(torch.bfloat16)
    assert cell._direct_cpu_call(x.bfloat16(), None, 1, None) is None
    cell.float()
    cell.backend = "reference"  # a backend changed after the first call is resolved again
    assert cell._direct_cpu_call(x, hx, 1, None) is None
    cell.backend = "cpu"
    with pytest.raises(ValueError, match=r"hx\[h_0\] must have shape \(4, 5\) \(batch, hidden_size\), got \(4, 6\)"):
        cell(x, (torch.zeros(4, 6), torch.zeros(4, 5)))
    with pytest.raises(TypeError, match=r"hx\[c_0\] must have dtype torch.float32, got torch.float64"):
        cell(x, (torch.zeros(4, 5), torch.zeros(4, 5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="input_size=3 features"):
        cell(torch.randn(4, 2), hx)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        cell(x, hx, step=-1)
    with pytest.raises(ValueError, match="batch=1"):
        cell(x[:1], (hx[0][:1], hx[1][:1]))


def test_direct_call_warns_of_statistics_that_are_not_finite():
    """A training call whose batch holds an inf: the direct path warns once, as the general
    path does, and the slot keeps its running statistics."""
    cell = BNLSTMCell(3, 5, max_length=4, backend="cpu", dtype=torch.float64)
    cell(torch.randn(4, 3, dtype=torch.float64), step=0)
    before = cell.running_mean_ih[2].clone()
    poisoned = torch.randn(4, 3, dtype=torch.float64)
    poisoned[1, 0] = float("inf")
    with pytest.warns(UserWarning, match=r"the cell: the batch statistics of step 2 \(ih\) are not finite"):
        cell(poisoned, step=2)
    assert torch.equal(cell.running_mean_ih[2], before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cell(poisoned, step=2)  # warned once per module


def test_a_copied_or_loaded_cell_keeps_its_direct_path():
    """copy.deepcopy and torch.save/torch.load copy the resolved backend with the module: the
    copies still go direct, and agree with the original."""
    cell = BNLSTMCell(3, 5, max_length=4, backend="cpu").eval()
    x = torch.randn(4, 3)
    cell(x)  # resolves the backend
    for copy_of_cell in copied_and_loaded(cell):
        with torch.no_grad():
            assert copy_of_cell._direct_cpu_call(x, None, 2, None) is not None
            assert torch.equal(copy_of_cell(x, step=2)[0], cell(x, step=2)[0])
