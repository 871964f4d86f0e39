"""The reference layer on its own: gradcheck in float64 and its helpers."""
import pytest
import torch

from bnlstm_cuda import LayerParams, bnlstm_layer_reference, get_variant
from bnlstm_cuda.layer_api import active_mask, reverse_padded
from bnlstm_cuda.statistics import masked_batch_stats


def layer_inputs(T=3, B=3, I=2, H=3, S=2):
    g = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    params = LayerParams(g(4 * H, I), g(4 * H, H), g(4 * H), g(4 * H), g(4 * H), g(H), g(H))
    running = {
        "ih": (torch.randn(S, 4 * H, dtype=torch.float64), torch.rand(S, 4 * H, dtype=torch.float64) + 0.5),
        "hh": (torch.randn(S, 4 * H, dtype=torch.float64), torch.rand(S, 4 * H, dtype=torch.float64) + 0.5),
        "c": (torch.randn(S, H, dtype=torch.float64), torch.rand(S, H, dtype=torch.float64) + 0.5),
    }
    return g(T, B, I), g(B, H), g(B, H), params, running


@pytest.mark.parametrize("variant", ["cooijmans", "laurent_step", "laurent_sequence", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gradcheck_reference(variant, training, reverse):
    x, h0, c0, params, running = layer_inputs()
    lengths = torch.tensor([3, 1, 2])
    variant = get_variant(variant)
    if variant.input_statistics == "sequence":
        running["ih"] = tuple(t[:1] for t in running["ih"])

    def layer(x, h0, c0, *flat_params):
        result = bnlstm_layer_reference(
            x, h0, c0, LayerParams(*flat_params), running, variant=variant,
            training=training, eps=1e-5, lengths=lengths, reverse=reverse,
        )
        return result.output, result.h_n, result.c_n

    assert torch.autograd.gradcheck(layer, (x, h0, c0, *params))


def test_reverse_padded_reverses_within_each_length():
    x = torch.arange(4.0).reshape(4, 1, 1).expand(4, 3, 1).clone()  # x[t, b] = t
    out = reverse_padded(x, torch.tensor([4, 2, 1]))
    assert out[:, 0, 0].tolist() == [3, 2, 1, 0]
    assert out[:, 1, 0].tolist() == [1, 0, 2, 3]
    assert out[:, 2, 0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(reverse_padded(out, torch.tensor([4, 2, 1])), x)


def test_masked_batch_stats_ignore_inactive_rows():
    z = torch.tensor([[1.0, 2.0], [3.0, 6.0], [100.0, -100.0]], dtype=torch.float64)
    stats = masked_batch_stats(z, torch.tensor([True, True, False]))
    torch.testing.assert_close(stats.mean, torch.tensor([2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(stats.var, torch.tensor([1.0, 4.0], dtype=torch.float64))
    assert stats.count.item() == 2


def test_active_mask():
    mask = active_mask(torch.tensor([2, 3]), 3, 2, "cpu")
    assert mask.tolist() == [[True, True], [True, True], [False, True]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    """A half-precision call equals the float32 computation on the same (rounded) values,
    rounded once at the end."""
    x, h0, c0, params, running = layer_inputs()
    low = [t.detach().to(dtype) for t in (x, h0, c0, *params)]
    variant = get_variant("cooijmans")
    out_low = bnlstm_layer_reference(*low[:3], LayerParams(*low[3:]), running, variant=variant, training=True, eps=1e-5)
    wide = [t.float() for t in low]
    out_wide = bnlstm_layer_reference(*wide[:3], LayerParams(*wide[3:]), running, variant=variant, training=True, eps=1e-5)
    assert out_low.output.dtype == dtype
    assert torch.equal(out_low.output, out_wide.output.to(dtype))
    assert out_low.batch_stats["hh"].mean.dtype == torch.float32
