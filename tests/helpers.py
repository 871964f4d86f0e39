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
