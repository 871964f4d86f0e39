"""Backend registry: which implementation runs a layer-direction, and how its running
statistics are folded.

Each backend is one record (`Backend`): its name, its layer function (a
`layer_api.LayerFunction`), the fold of its batch statistics into the running statistics,
through `unavailable`, why it cannot run on a device, and, where it has one, a function that
runs both directions of a bidirectional layer in one call (the CPU's). A module resolves its
backend once per device, dtype and backend name (`resolve`) and keeps the record; the fold
travels with the layer that ran, so the two always match.

    reference  the plain PyTorch loop, any device
    cpu        the fused C++ operators (csrc/), CPU tensors, compiled on first use
    cuda       the CUDA C++ kernels of the same operators (csrc/recurrent_cuda.cu), CUDA
               tensors; needs a CUDA build of torch, nvcc and a GPU (build.cuda_wanted)
    triton     the Triton kernels (triton_layer.py), CUDA tensors; CPU tensors under
               TRITON_INTERPRET=1 (Triton's interpreter, for tests)
    auto       cpu on CPU tensors (the reference, with one warning, where it cannot be
               built); on a GPU the fused backend measured fastest (gpu_choice.py); the
               reference elsewhere
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from . import ops
from .layer_api import BidirectionalLayerFunction, LayerFunction, RunningStatsFold
from .ops import bnlstm_layer_fused, ensure_loaded
from .reference import bnlstm_layer_reference
from .statistics import update_running_stats_parts

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "triton")


def _rounds_no_operands(dtype: torch.dtype) -> bool:
    """Backend.rounds_operands of a backend that takes autocast's inputs cast. A function of
    the module, not a lambda: a module keeps its Backend, and pickles with it."""
    return False


@dataclass(frozen=True)
class Backend:
    """One backend: what runs a layer-direction, what folds its batch statistics into the
    running statistics, and why it cannot run on a device (None: it can)."""

    name: str
    layer: LayerFunction
    fold: RunningStatsFold
    unavailable: Callable[[torch.device], Optional[str]]
    # Both directions of a bidirectional layer in one call, where the backend has that (the
    # CPU's runs them at once); None: a `layer` call per direction.
    bidirectional_layer: Optional[BidirectionalLayerFunction] = None
    # Whether its layer functions take float32 operands with operand_dtype=dtype and round
    # them as casting them would (LayerFunction): torch.autocast's inputs and weights then
    # reach them uncast, without the casts' copies and autograd nodes.
    rounds_operands: Callable[[torch.dtype], bool] = _rounds_no_operands
    # Whether its layer functions take fold_momentum and then fold the batch statistics into
    # the running statistics themselves (LayerFunction): the CPU's, whose steps fold as they
    # go, without a pass over every step's statistics after the call.
    folds_in_layer: bool = False


_fallback_warned = False
_cpu_status: Optional[str] = None  # None: not tried yet; "": available; else why not
_cuda_status: Optional[str] = None  # the same for the CUDA kernels


# Both availability checks run, not traced, under torch.compile (assume_constant_result):
# their first call builds or loads the extension under a lock, which Dynamo cannot trace, and
# their answer never changes, so a compiled graph may hold it as a constant.
@torch.compiler.assume_constant_result
def _cpu_problem() -> Optional[str]:
    """Why the CPU backend cannot run here, or None. Tries to build and load the extension
    on the first call only; the answer is kept (and read lock-free, so torch.compile can
    trace through it)."""
    global _cpu_status
    if _cpu_status is None:
        # Imported here: `python -m bnlstm_cuda.build` must not find build.py imported already.
        from .build import ExtensionUnavailable

        try:
            ensure_loaded()
            _cpu_status = ""
        except ExtensionUnavailable as error:
            _cpu_status = str(error)
    return _cpu_status or None


@torch.compiler.assume_constant_result
def _cuda_problem() -> Optional[str]:
    """Why the CUDA backend cannot run here, or None; tried on the first call only."""
    global _cuda_status
    if _cuda_status is None:
        if torch.version.cuda is None:
            _cuda_status = f"torch {torch.__version__} is not a CUDA build"
        elif not torch.cuda.is_available():
            _cuda_status = "no CUDA GPU is visible to torch"
        else:
            # With a GPU visible, the extension that loads is the CUDA-enabled one.
            _cuda_status = _cpu_problem() or ""
            if not _cuda_status and not torch._C._dispatch_has_kernel_for_dispatch_key(
                "bnlstm::layer_forward", "CUDA"
            ):
                _cuda_status = "the loaded extension has no CUDA kernels (was BNLSTM_CUDA=0 set?)"
    return _cuda_status or None


def _triton_problem(device: torch.device) -> Optional[str]:
    """Why the Triton backend cannot run on `device` here, or None."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    try:
        from . import triton_layer  # imports triton only when asked for

        triton_layer.check_device(device)
    except ImportError as error:
        return f"triton cannot be imported ({error})"
    except (RuntimeError, ValueError) as error:
        # RuntimeError: triton_layer._kernels found no triton package.
        return str(error)
    return None


def _cpu_unavailable(device: torch.device) -> Optional[str]:
    return "it runs on CPU tensors" if device.type != "cpu" else _cpu_problem()


def _cuda_unavailable(device: torch.device) -> Optional[str]:
    return "it runs on CUDA tensors" if device.type != "cuda" else _cuda_problem()


def _always_available(device: torch.device) -> Optional[str]:
    return None


def _triton_layer(*args, **kwargs):
    from . import triton_layer  # imports triton only when a Triton layer runs

    return triton_layer.bnlstm_layer_triton(*args, **kwargs)


REFERENCE = Backend("reference", bnlstm_layer_reference, update_running_stats_parts, _always_available)
# The compiled operators: one library, the dispatcher picks the device's kernels. Beside the
# CPU kernels the fold is a C++ operator too (the vectorised fold's small tensor operations
# are a few percent of a small layer's training step); it rounds an ulp differently from
# the reference's fold, which is why the fold belongs to the backend that ran.
CPU = Backend("cpu", bnlstm_layer_fused, ops.update_running_stats_parts_compiled, _cpu_unavailable,
              ops.bidirectional_layer_fused, ops.cpu_rounds_operands, folds_in_layer=True)
CUDA = Backend("cuda", bnlstm_layer_fused, update_running_stats_parts, _cuda_unavailable)
TRITON = Backend("triton", _triton_layer, update_running_stats_parts, _triton_problem)
REGISTRY: Dict[str, Backend] = {backend.name: backend for backend in (REFERENCE, CPU, CUDA, TRITON)}


def available_backends(device: torch.device) -> tuple:
    """Names of the backends that can run on `device` here (without "auto"). On a GPU this
    imports triton. Triton on CPU tensors (its interpreter, for tests) is not offered here:
    it is chosen by name only."""
    device = torch.device(device)
    return tuple(name for name, backend in REGISTRY.items()
                 if (name != "triton" or device.type == "cuda") and backend.unavailable(device) is None)


def _auto_gpu(device: torch.device, dtype: Optional[torch.dtype], batch: Optional[int],
              hidden_size: Optional[int]) -> Backend:
    """"auto" on a GPU: the fused backend measured fastest for this GPU, dtype and shape
    (gpu_choice.MEASURED), else the first that runs; the reference if none does."""
    from . import gpu_choice

    fused = [name for name in available_backends(device) if name in gpu_choice.FALLBACK_ORDER]
    if not fused:
        return REFERENCE
    index = device.index if device.index is not None else torch.cuda.current_device()
    chosen = gpu_choice.choose(fused, torch.cuda.get_device_name(index), dtype or torch.float32,
                               batch or 1, hidden_size or 1)
    return resolve(chosen, device)


def resolve(name: str, device: torch.device, *, dtype: Optional[torch.dtype] = None,
            batch: Optional[int] = None, hidden_size: Optional[int] = None) -> Backend:
    """The backend `name` names on `device` (see the module docstring for "auto"; `dtype`,
    `batch` and `hidden_size` matter only to "auto" on a GPU). Raises ValueError for a
    backend that does not run on that device and RuntimeError for one that cannot run here."""
    global _fallback_warned
    device = torch.device(device)
    if name == "reference":
        return REFERENCE
    if name in ("cpu", "cuda"):
        backend = CPU if name == "cpu" else CUDA
        if device.type != name:
            raise ValueError(f'backend="{name}" runs on {name.upper()} tensors; the input is on {device}')
        reason = backend.unavailable(device)
        if reason is not None:
            raise RuntimeError(f'backend="{name}" is unavailable: {reason}')
        return backend
    if name == "triton":
        from . import triton_layer  # imports triton only when asked for

        triton_layer.check_device(device)  # its ValueError says what the device needs
        return TRITON
    if name == "auto":
        if device.type == "cpu":
            reason = _cpu_problem()
            if reason is None:
                return CPU
            if not _fallback_warned:
                warnings.warn(f"bnlstm_cuda: using the slow reference implementation; {reason}")
                _fallback_warned = True
        elif device.type == "cuda":
            return _auto_gpu(device, dtype, batch, hidden_size)
        return REFERENCE
    raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {name!r}")


def resolve_backend(name: str, device: torch.device, **shape) -> LayerFunction:
    """The layer function of resolve(name, device, **shape)."""
    return resolve(name, device, **shape).layer
