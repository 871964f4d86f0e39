"""Backend registry: which implementation of a layer-direction runs a forward pass.

Every backend provides a function with the signature of
`reference.bnlstm_layer_reference`; the module chooses one per call by name and device.

    reference  the plain PyTorch loop, any device
    cpu        the fused C++ operators (csrc/), CPU tensors, compiled on first use
    cuda       the CUDA C++ kernels of the same operators (csrc/recurrent_cuda.cu), CUDA
               tensors; needs a CUDA build of torch, nvcc and a GPU (build.cuda_wanted)
    triton     the Triton kernels (triton_layer.py), CUDA tensors; CPU tensors under
               TRITON_INTERPRET=1 (Triton's interpreter, for tests)
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from . import ops
from .ops import bnlstm_layer_fused, ensure_loaded
from .reference import LayerResult, bnlstm_layer_reference
from .statistics import update_running_stats

LayerFunction = Callable[..., LayerResult]

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "triton")

_fallback_warned = False
_cpu_status: Optional[str] = None  # None: not tried yet; "": available; else why not
_cuda_status: Optional[str] = None  # the same for the CUDA kernels


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
    except ValueError as error:
        return str(error)
    return None


def available_backends(device: torch.device) -> tuple:
    """Names of the backends that can run on `device` here (without "auto"). On a GPU this
    imports triton; on the CPU, triton counts only under TRITON_INTERPRET=1 (tests)."""
    device = torch.device(device)
    names = ["reference"]
    if device.type == "cpu" and _cpu_problem() is None:
        names.append("cpu")
    if device.type == "cuda" and _cuda_problem() is None:
        names.append("cuda")
    if device.type == "cuda" and _triton_problem(device) is None:
        names.append("triton")
    return tuple(names)


def _auto_gpu(device: torch.device, dtype: Optional[torch.dtype], batch: Optional[int],
              hidden_size: Optional[int]) -> LayerFunction:
    """"auto" on a GPU: the fused backend measured fastest for this GPU, dtype and shape
    (gpu_choice.MEASURED), else the first that runs; the reference if none does."""
    from . import gpu_choice

    fused = [name for name in available_backends(device) if name in gpu_choice.FALLBACK_ORDER]
    if not fused:
        return bnlstm_layer_reference
    index = device.index if device.index is not None else torch.cuda.current_device()
    chosen = gpu_choice.choose(fused, torch.cuda.get_device_name(index), dtype or torch.float32,
                               batch or 1, hidden_size or 1)
    return resolve_backend(chosen, device)


def resolve_backend(name: str, device: torch.device, *, dtype: Optional[torch.dtype] = None,
                    batch: Optional[int] = None, hidden_size: Optional[int] = None) -> LayerFunction:
    """The layer function for backend `name` on `device`.

    "auto" picks the fused CPU backend for CPU tensors (falling back to the reference with
    one warning when the extension cannot be built); on a GPU, the fused GPU backend measured
    fastest for `dtype`, `batch` and `hidden_size` (see gpu_choice.py), the reference if no
    fused GPU backend runs there; the reference on other devices.
    """
    global _fallback_warned
    device = torch.device(device)
    if name == "reference":
        return bnlstm_layer_reference
    if name in ("cpu", "cuda"):
        # The same compiled operators; the dispatcher picks the device's kernels.
        if device.type != name:
            raise ValueError(f'backend="{name}" runs on {name.upper()} tensors; the input is on {device}')
        problem = _cpu_problem() if name == "cpu" else _cuda_problem()
        if problem is not None:
            raise RuntimeError(f'backend="{name}" is unavailable: {problem}')
        return bnlstm_layer_fused
    if name == "triton":
        from . import triton_layer  # imports triton only when asked for

        triton_layer.check_device(device)
        return triton_layer.bnlstm_layer_triton
    if name == "auto":
        if device.type == "cpu":
            problem = _cpu_problem()
            if problem is None:
                return bnlstm_layer_fused
            if not _fallback_warned:
                warnings.warn(f"bnlstm_cuda: using the slow reference implementation; {problem}")
                _fallback_warned = True
        elif device.type == "cuda":
            return _auto_gpu(device, dtype, batch, hidden_size)
        return bnlstm_layer_reference
    raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {name!r}")


def running_stats_fold(name: str, device: torch.device, *, synchronized: bool = False) -> Callable:
    """The function that folds a forward's batch statistics into the running statistics for
    backend `name` on `device`: beside the fused CPU operators a C++ operator too (the
    vectorised fold's small tensor operations cost a few percent of a small layer's training
    step), elsewhere `statistics.update_running_stats`. The two round differently (by an ulp),
    so the choice must follow what ran, not what happens to be loaded: "cpu" and "auto" on
    CPU tensors have loaded the operators by then unless "auto" fell back to the reference;
    a synchronized training step (`synchronized`) ran the reference layer whatever the
    backend, and folds as the reference does, on every process alike (before, a process
    whose evaluation had loaded the operators drifted from the others by an ulp a step)."""
    if (not synchronized and name in ("cpu", "auto") and torch.device(device).type == "cpu"
            and ops.is_loaded()):
        return ops.update_running_stats_compiled
    return update_running_stats
