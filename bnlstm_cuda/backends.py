"""Backend registry: which implementation of a layer-direction runs a forward pass.

Every backend provides a function with the signature of
`reference.bnlstm_layer_reference`; the module chooses one per call by name and device.

    reference  the plain PyTorch loop, any device
    cpu        the fused C++ operators (csrc/), CPU tensors, compiled on first use
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

import torch

from .reference import LayerResult, bnlstm_layer_reference

LayerFunction = Callable[..., LayerResult]

BACKEND_NAMES = ("auto", "reference", "cpu")

_fallback_warned = False


def _cpu_backend() -> LayerFunction:
    """The fused CPU layer function, built and loaded on first call (raises
    build.ExtensionUnavailable with the reason when it cannot be)."""
    from .ops import bnlstm_layer_fused, ensure_loaded

    ensure_loaded()
    return bnlstm_layer_fused


def _cpu_problem() -> Optional[str]:
    """Why the CPU backend cannot run here, or None."""
    from .build import ExtensionUnavailable

    try:
        _cpu_backend()
    except ExtensionUnavailable as error:
        return str(error)
    return None


def available_backends(device: torch.device) -> tuple:
    """Names of the backends that can run on `device` here (without "auto")."""
    names = ["reference"]
    if torch.device(device).type == "cpu" and _cpu_problem() is None:
        names.append("cpu")
    return tuple(names)


def resolve_backend(name: str, device: torch.device) -> LayerFunction:
    """The layer function for backend `name` on `device`.

    "auto" picks the fused CPU backend for CPU tensors (falling back to the reference with
    one warning when the extension cannot be built) and the reference elsewhere.
    """
    global _fallback_warned
    device = torch.device(device)
    if name == "reference":
        return bnlstm_layer_reference
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f'backend="cpu" runs on CPU tensors; the input is on {device}')
        problem = _cpu_problem()
        if problem is not None:
            raise RuntimeError(f'backend="cpu" is unavailable: {problem}')
        return _cpu_backend()
    if name == "auto":
        if device.type == "cpu":
            problem = _cpu_problem()
            if problem is None:
                return _cpu_backend()
            if not _fallback_warned:
                warnings.warn(f"bnlstm_cuda: using the slow reference implementation; {problem}")
                _fallback_warned = True
        return bnlstm_layer_reference
    raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {name!r}")
