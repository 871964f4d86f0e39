"""The parameters and running statistics of one layer-direction, as module attributes.

BNLSTM holds one set per layer and direction, named with a suffix (`weight_ih_l1_reverse`);
BNLSTMCell holds one set without suffix (`weight_ih`). Both register, initialise and read
them through these functions, so the two modules cannot drift apart.
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List

import torch
from torch import nn

from .layer_api import LayerParams, RunningStats
from .variants import Variant, feature_size

PARAMETER_FIELDS = LayerParams._fields  # weight_ih, weight_hh, bias, gamma_ih, ...


def register(module: nn.Module, suffix: str, input_size: int, hidden_size: int, variant: Variant,
             max_length: int, bias: bool, factory: dict) -> None:
    """Create the parameters and buffers of one layer-direction (values: see initialise).
    Running statistics are float32 when the parameters are half precision."""
    statistics_factory = dict(factory)
    if factory.get("dtype") in (torch.float16, torch.bfloat16):
        statistics_factory["dtype"] = torch.float32

    def parameter(name, *shape):
        module.register_parameter(name + suffix, nn.Parameter(torch.empty(shape, **factory)))

    parameter("weight_ih", 4 * hidden_size, input_size)
    parameter("weight_hh", 4 * hidden_size, hidden_size)
    if bias:
        parameter("bias", 4 * hidden_size)
    for part in variant.parts:
        features = feature_size(part, hidden_size)
        parameter(f"gamma_{part}", features)
        shape = (variant.num_slots(part, max_length), features)
        module.register_buffer(f"running_mean_{part}{suffix}", torch.zeros(shape, **statistics_factory))
        module.register_buffer(f"running_var_{part}{suffix}", torch.ones(shape, **statistics_factory))
    if variant.normalize_cell:
        parameter("beta_c", hidden_size)


@torch.no_grad()
def initialise(module: nn.Module, suffix: str, hidden_size: int, variant: Variant, gamma_init: float) -> None:
    """The "none" variant initialises as torch.nn.LSTM does. Normalized variants follow the
    paper: orthogonal W_hh per gate, zero bias, every gamma gamma_init, beta_c 0; running
    means 0 and variances 1."""
    bound = 1.0 / math.sqrt(hidden_size)
    plain = variant.name == "none"
    params = layer_params(module, suffix)
    nn.init.uniform_(params.weight_ih, -bound, bound)
    if plain:
        nn.init.uniform_(params.weight_hh, -bound, bound)
    else:
        # In float32 and copied: QR, which orthogonal_ needs, has no half-precision kernel.
        for gate in params.weight_hh.chunk(4, dim=0):
            gate.copy_(nn.init.orthogonal_(torch.empty(gate.shape, dtype=torch.float32, device=gate.device)))
    if params.bias is not None:
        if plain:
            nn.init.uniform_(params.bias, -bound, bound)
        else:
            nn.init.zeros_(params.bias)
    for gamma in (params.gamma_ih, params.gamma_hh, params.gamma_c):
        if gamma is not None:
            nn.init.constant_(gamma, gamma_init)
    if params.beta_c is not None:
        nn.init.zeros_(params.beta_c)
    for mean, var in running_stats(module, suffix, variant).values():
        nn.init.zeros_(mean)
        nn.init.ones_(var)


def layer_params(module: nn.Module, suffix: str) -> LayerParams:
    registered = module._parameters  # without nn.Module.__getattr__'s search, at every forward
    # Not a registered tensor: an absent part (bias=False: None), or one a parametrization or
    # hook replaced by an attribute.
    return LayerParams(*[parameter if (parameter := registered.get(name)) is not None else getattr(module, name, None)
                         for name in _parameter_names(suffix)])


@functools.lru_cache(maxsize=None)
def _parameter_names(suffix: str) -> tuple:
    """The names of one layer-direction's parameters, in LayerParams' order, worked out once."""
    return tuple(field + suffix for field in PARAMETER_FIELDS)


def running_stats(module: nn.Module, suffix: str, variant: Variant) -> RunningStats:
    buffers = module._buffers  # registered buffers, without nn.Module.__getattr__'s search
    return {part: (buffers[mean], buffers[var]) for part, mean, var in running_stat_names(suffix, variant)}


@functools.lru_cache(maxsize=None)
def running_stat_names(suffix: str, variant: Variant) -> tuple:
    """(part, running-mean name, running-variance name) of each part the variant normalizes,
    worked out once (the statistics are read twice at every training step)."""
    return tuple((part, f"running_mean_{part}{suffix}", f"running_var_{part}{suffix}") for part in variant.parts)


def state_names(module: nn.Module, suffix: str, variant: Variant) -> Dict[str, str]:
    """Unsuffixed name -> attribute name of every parameter and buffer of one layer-direction."""
    names = [field for field in PARAMETER_FIELDS if hasattr(module, field + suffix)]
    for part in variant.parts:
        names += [f"running_mean_{part}", f"running_var_{part}"]
    return {name: name + suffix for name in names}


def parameter_names(module: nn.Module, suffix: str) -> List[str]:
    """Attribute names of one layer-direction's parameters, in registration (state_dict) order."""
    fields = {field + suffix for field in PARAMETER_FIELDS}
    return [name for name, _ in module.named_parameters(recurse=False) if name in fields]


def graph_anchor(module: nn.Module, *tensors: torch.Tensor) -> torch.Tensor:
    """A zero scalar that autograd connects to every parameter of `module` and to `tensors`:
    added to empty results (a batch of no sequences), it lets backward() run and give each
    of them a zero gradient, as torch.nn.LSTM does."""
    anchor = sum(tensor.sum() for tensor in (*tensors, *module.parameters()))
    return anchor * 0


def keep_statistics_float32(module: nn.Module) -> None:
    """After a cast to half precision, put the running statistics back in float32: a
    momentum-0.1 average in bfloat16 would lose most of each update."""
    for name, buffer in module.named_buffers(recurse=False):
        if name.startswith("running_") and buffer.dtype in (torch.float16, torch.bfloat16):
            setattr(module, name, buffer.float())


def copy_state(destination: nn.Module, destination_suffix: str, source: nn.Module, source_suffix: str,
               variant: Variant) -> None:
    """Copy one layer-direction's parameters and buffers between modules (shapes must agree)."""
    source_names = state_names(source, source_suffix, variant)
    target_names = state_names(destination, destination_suffix, variant)
    if set(source_names) != set(target_names):
        raise ValueError(
            f"the two modules hold different parameters: {sorted(source_names)} and {sorted(target_names)} "
            "(variant or bias differ)"
        )
    with torch.no_grad():
        for name, attribute in source_names.items():
            value: torch.Tensor = getattr(source, attribute)
            target: torch.Tensor = getattr(destination, target_names[name])
            if target.shape != value.shape:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)} in the source and {tuple(target.shape)} in the "
                    "destination (input_size, hidden_size or max_length differ)"
                )
            target.copy_(value)


def suffix_of(layer: int, reverse: bool) -> str:
    """The state_dict suffix of a BNLSTM layer-direction: `_l{layer}` or `_l{layer}_reverse`."""
    return f"_l{layer}" + ("_reverse" if reverse else "")

