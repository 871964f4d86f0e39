"""The BNLSTM module: masking, layouts, state_dict, dtypes, dropout, training."""
import pytest
import torch
from torch import nn

from bnlstm_cuda import BNLSTM
from helpers import make_module, scalar_loss

TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_padded_batch_in_eval_equals_each_sequence_alone(bidirectional):
    module = make_module(input_size=3, hidden_size=4, num_layers=2, bidirectional=bidirectional).eval()
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    lengths = [6, 2, 4]
    out, (h_n, c_n) = module(x, lengths=lengths)
    for b, n in enumerate(lengths):
        alone, (h_alone, c_alone) = module(x[:n, b])  # unbatched [T, I]
        torch.testing.assert_close(out[:n, b], alone, **TOL)
        assert torch.all(out[n:, b] == 0)
        torch.testing.assert_close(h_n[:, b], h_alone, **TOL)
        torch.testing.assert_close(c_n[:, b], c_alone, **TOL)


@pytest.mark.parametrize("variant", ["cooijmans", "laurent_sequence"])
def test_padding_content_changes_nothing_in_training(variant):
    lengths = torch.tensor([5, 2, 3])
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    garbage = x.clone()
    garbage[2:, 1] = 1e3
    garbage[3:, 2] = float("nan")
    initial = make_module(variant, input_size=3, hidden_size=4, bidirectional=True).state_dict()
    results = []
    for inp in (x, garbage):
        module = make_module(variant, input_size=3, hidden_size=4, bidirectional=True)
        module.load_state_dict(initial)
        inp = inp.clone().requires_grad_(True)
        out, (h_n, c_n) = module(inp, lengths=lengths)
        scalar_loss(out, h_n, c_n).backward()
        results.append((out, h_n, c_n, inp.grad, dict(module.named_buffers()), {k: p.grad for k, p in module.named_parameters()}))
    (out_a, h_a, c_a, gx_a, buf_a, grad_a), (out_b, h_b, c_b, gx_b, buf_b, grad_b) = results
    assert torch.all(out_a[2:, 1] == 0) and torch.all(out_b[3:, 2] == 0)
    torch.testing.assert_close(out_a, out_b, **TOL)
    torch.testing.assert_close(h_a, h_b, **TOL)
    torch.testing.assert_close(c_a, c_b, **TOL)
    torch.testing.assert_close(gx_a, gx_b, **TOL)
    assert torch.all(gx_a[2:, 1] == 0)
    for name in buf_a:
        torch.testing.assert_close(buf_a[name], buf_b[name], **TOL)
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], **TOL)


def test_batch_first_and_noncontiguous_inputs_give_the_same_result():
    module = make_module(input_size=3, hidden_size=4, bidirectional=True)
    first = make_module(input_size=3, hidden_size=4, bidirectional=True, batch_first=True)
    first.load_state_dict(module.state_dict())
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    out, (h_n, c_n) = module(x, lengths=[5, 3, 4])
    out_first, (h_first, c_first) = first(x.transpose(0, 1), lengths=[5, 3, 4])
    torch.testing.assert_close(out_first, out.transpose(0, 1), **TOL)
    torch.testing.assert_close(h_first, h_n, **TOL)
    torch.testing.assert_close(c_first, c_n, **TOL)
    strided = torch.randn(5, 3, 6, dtype=torch.float64)[:, :, ::2]
    torch.testing.assert_close(module.eval()(strided)[0], module(strided.contiguous())[0], **TOL)


@pytest.mark.parametrize(
    "variant, keys",
    [
        ("cooijmans", {"weight_ih", "weight_hh", "bias", "gamma_ih", "gamma_hh", "gamma_c", "beta_c",
                       "running_mean_ih", "running_var_ih", "running_mean_hh", "running_var_hh",
                       "running_mean_c", "running_var_c"}),
        ("laurent_step", {"weight_ih", "weight_hh", "bias", "gamma_ih", "running_mean_ih", "running_var_ih"}),
        ("laurent_sequence", {"weight_ih", "weight_hh", "bias", "gamma_ih", "running_mean_ih", "running_var_ih"}),
        ("none", {"weight_ih", "weight_hh", "bias"}),
    ],
)
def test_state_dict_names_and_shapes(variant, keys):
    module = BNLSTM(3, 5, num_layers=2, bidirectional=True, max_length=7, variant=variant)
    state = module.state_dict()
    expected = {f"{key}_l{k}{sfx}" for key in keys for k in (0, 1) for sfx in ("", "_reverse")}
    assert set(state) == expected
    shapes = {
        "weight_ih_l0": (20, 3), "weight_ih_l1_reverse": (20, 10), "weight_hh_l1": (20, 5),
        "bias_l0": (20,), "gamma_ih_l0": (20,), "gamma_hh_l0": (20,), "gamma_c_l1": (5,), "beta_c_l0": (5,),
        "running_mean_ih_l0": (1 if variant == "laurent_sequence" else 7, 20),
        "running_var_hh_l1_reverse": (7, 20), "running_mean_c_l0_reverse": (7, 5),
    }
    for name, shape in shapes.items():
        if name in state:
            assert tuple(state[name].shape) == shape, name


def test_state_dict_round_trip():
    module = make_module(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    module(x)  # move the running statistics away from their initial values
    clone = BNLSTM(3, 4, num_layers=2, bidirectional=True, max_length=4, dtype=torch.float64)
    clone.load_state_dict(module.state_dict())
    for mode in (True, False):
        module.train(mode)
        clone.train(mode)
        torch.testing.assert_close(clone(x)[0], module(x)[0], rtol=0, atol=0)
    for name, buffer in module.named_buffers():
        assert torch.equal(buffer, getattr(clone, name))


def test_dropout_acts_between_layers_in_training_only():
    module = make_module(input_size=3, hidden_size=4, num_layers=2, dropout=0.5)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    first, second = module(x)[0], module(x)[0]
    assert not torch.allclose(first, second)
    module.eval()
    torch.testing.assert_close(module(x)[0], module(x)[0], rtol=0, atol=0)
    with pytest.warns(UserWarning, match="no effect with num_layers=1"):
        BNLSTM(3, 4, dropout=0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_module_keeps_float32_statistics(dtype):
    module = BNLSTM(3, 4, max_length=4).to(dtype)
    assert module.weight_hh_l0.dtype == dtype
    assert module.running_var_hh_l0.dtype == torch.float32
    x = torch.randn(5, 3, 3).to(dtype)
    out, (h_n, c_n) = module(x)
    assert out.dtype == h_n.dtype == c_n.dtype == dtype
    assert torch.isfinite(out.float()).all()
    assert not torch.all(module.running_mean_hh_l0[:4] == 0)


def test_float32_and_float64_agree():
    # The paper's initialisation (gamma 0.1) and a batch of 8: a well-conditioned problem,
    # where float32 rounding is not amplified by near-zero batch variances.
    module = BNLSTM(3, 4, num_layers=2, max_length=4, dtype=torch.float64)
    single = BNLSTM(3, 4, num_layers=2, max_length=4)
    single.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
    x = torch.randn(5, 8, 3, dtype=torch.float64)
    torch.testing.assert_close(single(x.float())[0].double(), module(x)[0], rtol=1e-4, atol=1e-5)


def test_hx_is_used_and_defaults_to_zeros():
    module = make_module(input_size=3, hidden_size=4, num_layers=2).eval()
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    zeros = torch.zeros(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(module(x)[0], module(x, (zeros, zeros))[0], rtol=0, atol=0)
    assert not torch.allclose(module(x)[0], module(x, (zeros + 1, zeros))[0])


def test_flatten_parameters_is_accepted_and_changes_nothing():
    module = make_module(input_size=3, hidden_size=4).eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    before = module(x)[0]
    assert module.flatten_parameters() is None
    torch.testing.assert_close(module(x)[0], before, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_parametrized_weights_are_the_ones_used(backend):
    """A parametrization (torch.nn.utils.parametrize) replaces a registered parameter by a
    computed attribute: the forward pass and the gradients go through it."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, weight):
            return 2 * weight

    module = BNLSTM(3, 4, max_length=4, backend=backend, dtype=torch.float64)
    plain = BNLSTM(3, 4, max_length=4, backend=backend, dtype=torch.float64)
    plain.load_state_dict(module.state_dict())
    with torch.no_grad():
        plain.weight_hh_l0.mul_(2)
        plain.gamma_c_l0.mul_(2)
    parametrize.register_parametrization(module, "weight_hh_l0", Double())
    parametrize.register_parametrization(module, "gamma_c_l0", Double())
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(module(x)[0], plain(x)[0], **TOL)
    module(x)[0].sum().backward()
    plain(x)[0].sum().backward()
    original = module.parametrizations.weight_hh_l0.original
    torch.testing.assert_close(original.grad, 2 * plain.weight_hh_l0.grad, **TOL)


@pytest.mark.parametrize("variant", ["cooijmans", "laurent_sequence"])
def test_training_loop_loss_falls(variant):
    """Classify whether the running sum of a sequence ends positive: learnable by an LSTM."""
    model = nn.ModuleDict({"rnn": BNLSTM(2, 16, max_length=12, variant=variant), "head": nn.Linear(16, 2)})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x = torch.randn(12, 32, 2, generator=g)
        labels = (x[:, :, 0].sum(0) > 0).long()
        _, (h_n, _) = model["rnn"](x)
        loss = nn.functional.cross_entropy(model["head"](h_n[-1]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


@pytest.mark.cuda
def test_cuda_module_matches_cpu():
    module = make_module(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    cpu = module(x, lengths=[5, 2, 3])[0]
    gpu = module.cuda()(x.cuda(), lengths=torch.tensor([5, 2, 3]))[0]
    torch.testing.assert_close(gpu.cpu(), cpu, **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_construction(dtype):
    """Built directly in half precision: orthogonal W_hh (QR has no half kernel), float32
    running statistics, as after a cast."""
    module = BNLSTM(3, 4, dtype=dtype)
    assert module.weight_hh_l0.dtype == dtype and module.running_var_hh_l0.dtype == torch.float32
    gate = module.weight_hh_l0[:4].float()
    torch.testing.assert_close(gate @ gate.t(), torch.eye(4), atol=2e-2, rtol=0)
    assert module(torch.randn(5, 2, 3).to(dtype))[0].dtype == dtype
