"""Every backend against an independent float64 implementation of ../shared/PAPER.md, read
through the documented state_dict names: outputs, final states, running statistics and
the gradient of the input, the initial states and every parameter, to 1e-10."""
import pytest
import torch

from helpers import make_module, scalar_loss
from paper_reference import paper_bnlstm

TOL = dict(rtol=1e-10, atol=1e-10)
VARIANTS = ["cooijmans", "laurent_step", "laurent_sequence", "none"]
BACKENDS = ["reference", "cpu"]


def run_both(module, x, h0, c0, lengths, training):
    module.train(training)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in module.named_parameters()}
    running = {k: v.detach().clone() for k, v in module.named_buffers()}
    x_ref, h0_ref, c0_ref = (t.detach().clone().requires_grad_(True) for t in (x, h0, c0))
    x, h0, c0 = (t.detach().clone().requires_grad_(True) for t in (x, h0, c0))

    out, (h_n, c_n) = module(x, (h0, c0), lengths=lengths)
    scalar_loss(out, h_n, c_n).backward()
    ref_out, ref_h, ref_c = paper_bnlstm(
        params, running, variant=module.variant, num_layers=module.num_layers,
        bidirectional=module.bidirectional, x=x_ref, h0=h0_ref, c0=c0_ref, lengths=lengths,
        training=training, momentum=module.momentum, eps=module.eps,
    )
    scalar_loss(ref_out, ref_h, ref_c).backward()

    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(h_n, ref_h, **TOL)
    torch.testing.assert_close(c_n, ref_c, **TOL)
    for name, buffer in module.named_buffers():
        torch.testing.assert_close(buffer, running[name], **TOL, msg=lambda m: f"{name}: {m}")
    for name, tensor in (("input", x), ("h_0", h0), ("c_0", c0)):
        reference = {"input": x_ref, "h_0": h0_ref, "c_0": c0_ref}[name]
        torch.testing.assert_close(tensor.grad, reference.grad, **TOL, msg=lambda m: f"grad {name}: {m}")
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(parameter.grad, params[name].grad, **TOL, msg=lambda m: f"grad {name}: {m}")
        parameter.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("lengths", [None, [5, 2, 4]], ids=["full", "lengths"])
def test_two_layer_bidirectional_matches_paper(backend, variant, training, lengths):
    # T=5 > max_length=3: the tail steps share (and in training, all update) the last slot.
    module = make_module(variant, input_size=3, hidden_size=5, num_layers=2, bidirectional=True,
                         max_length=3, backend=backend)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    h0 = torch.randn(4, 3, 5, dtype=torch.float64)
    c0 = torch.randn(4, 3, 5, dtype=torch.float64)
    run_both(module, x, h0, c0, lengths, training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["cooijmans", "laurent_sequence"])
def test_repeated_training_steps_match_paper(backend, variant):
    """Running statistics accumulate over calls exactly as the sequential rule says, also
    with one sequence left active at the last steps (no update there) and T=1."""
    module = make_module(variant, input_size=4, hidden_size=3, num_layers=1, max_length=2, backend=backend)
    for steps, lengths in ((6, [6, 1, 2]), (1, None), (3, [3, 3, 2])):
        x = torch.randn(steps, 3, 4, dtype=torch.float64)
        h0 = torch.randn(1, 3, 3, dtype=torch.float64)
        c0 = torch.randn(1, 3, 3, dtype=torch.float64)
        run_both(module, x, h0, c0, lengths, training=True)
    run_both(module, x, h0, c0, [3, 1, 2], training=False)
