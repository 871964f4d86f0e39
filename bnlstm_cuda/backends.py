"""Backend registry: which implementation of a layer-direction runs a forward pass.

Every backend provides a function with the signature of
`reference.bnlstm_layer_reference`; the module chooses one per call by name and device.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from .reference import LayerResult, bnlstm_layer_reference

LayerFunction = Callable[..., LayerResult]

_BACKENDS: Dict[str, LayerFunction] = {
    "reference": bnlstm_layer_reference,
}

BACKEND_NAMES = ("auto",) + tuple(_BACKENDS)


def available_backends(device: torch.device) -> tuple:
    """Names of the backends that can run on `device` here (without "auto")."""
    return tuple(_BACKENDS)


def resolve_backend(name: str, device: torch.device) -> LayerFunction:
    """The layer function for backend `name` on `device`; "auto" picks the fastest available.

    Only the reference exists so far, so "auto" is the reference on every device.
    """
    if name == "auto":
        return _BACKENDS["reference"]
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {name!r}")
    return _BACKENDS[name]
