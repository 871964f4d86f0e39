"""Small helpers shared by the tests."""
import torch

import bnlstm_cuda


def randomize_bn_parameters(module, generator=None):
    """Give every gamma, beta and bias a random value and every running statistic a random
    plausible one, so no comparison passes by the accident of an initial value."""
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            if name.startswith(("gamma_", "beta_", "bias_")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5 + (1.0 if name.startswith("gamma_") else 0.0))
        for name, tensor in module.named_buffers():
            if name.startswith("running_mean_"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
            elif name.startswith("running_var_"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return module


def scalar_loss(output, h_n, c_n, seed=1):
    """A random linear functional of every output, so each one gets its own gradient."""
    g = torch.Generator().manual_seed(seed)
    terms = 0
    for tensor in (output, h_n, c_n):
        weights = torch.randn(tensor.shape, generator=g, dtype=tensor.dtype).to(tensor.device)
        terms = terms + (tensor * weights).sum()
    return terms


def make_module(variant="cooijmans", **kwargs):
    kwargs.setdefault("max_length", 4)
    kwargs.setdefault("dtype", torch.float64)
    return randomize_bn_parameters(bnlstm_cuda.BNLSTM(variant=variant, **kwargs))


def assert_matches_paper(module, x, h0=None, c0=None, lengths=None, training=True, tol=1e-10, gradients=True):
    """Run `module` (float64) and tests/paper_reference.py on the same call; compare outputs,
    final states, running statistics after the call and the gradients of the input, the
    initial states and every parameter (gradients=False: forward only). Leaves the module's
    running statistics updated and its parameters' .grad set."""
    from paper_reference import paper_bnlstm

    close = dict(rtol=tol, atol=tol)
    states = module.num_layers * module.num_directions
    zeros = torch.zeros(states, x.shape[1], module.hidden_size, dtype=x.dtype)
    h0, c0 = (zeros if h0 is None else h0), (zeros if c0 is None else c0)
    module.train(training)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in module.named_parameters()}
    running = {k: v.detach().clone() for k, v in module.named_buffers()}
    mine = [t.detach().clone().requires_grad_(True) for t in (x, h0, c0)]
    theirs = [t.detach().clone().requires_grad_(True) for t in (x, h0, c0)]
    for parameter in module.parameters():
        parameter.grad = None

    out, (h_n, c_n) = module(mine[0], (mine[1], mine[2]), lengths=lengths)
    scalar_loss(out, h_n, c_n).backward()
    expected = paper_bnlstm(
        params, running, variant=module.variant, num_layers=module.num_layers,
        bidirectional=module.bidirectional, x=theirs[0], h0=theirs[1], c0=theirs[2], lengths=lengths,
        training=training, momentum=module.momentum, eps=module.eps,
    )
    scalar_loss(*expected).backward()
    for name, got, want in zip(("output", "h_n", "c_n"), (out, h_n, c_n), expected):
        torch.testing.assert_close(got, want, **close, msg=lambda m: f"{name}: {m}")
    for name, buffer in module.named_buffers():
        torch.testing.assert_close(buffer, running[name], **close, msg=lambda m: f"{name}: {m}")
    if not gradients:
        return out, h_n, c_n
    for name, got, want in zip(("input", "h_0", "c_0"), mine, theirs):
        torch.testing.assert_close(got.grad, want.grad, **close, msg=lambda m: f"grad {name}: {m}")
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(parameter.grad, params[name].grad, **close, msg=lambda m: f"grad {name}: {m}")
    return out, h_n, c_n
