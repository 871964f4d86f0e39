"""What is measured: the providers (implementations of an LSTM, nn.LSTM's interface) and the
modes."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from bnlstm_cuda import BNLSTM
from bnlstm_cuda.backends import available_backends

from .sweeps import Config, padded_lengths

BASELINE = "nn.LSTM"
MODES = ("inference", "forward", "train_step")


@dataclass(frozen=True)
class Provider:
    name: str
    # (config, device) -> a module mapping input [T, B, I] (or a PackedSequence) to
    # (output [T, B, H * directions], (h_n, c_n)), as nn.LSTM
    build: Callable[[Config, torch.device], nn.Module]


def _bnlstm(backend: str, config: Config, device: torch.device) -> nn.Module:
    # One statistics slot per step, as in the paper (T=784 for pixel-by-pixel MNIST).
    module = BNLSTM(
        config.input_size, config.hidden_size, num_layers=config.num_layers,
        bidirectional=config.bidirectional, max_length=config.seq_len, backend=backend, device=device,
    )
    # Built in float32 and cast: the orthogonal initialisation has no bf16 QR on the CPU.
    return module.to(config.dtype)


def _compiled_reference(config: Config, device: torch.device) -> nn.Module:
    # A fresh start per configuration: otherwise dynamo marks shapes dynamic after the
    # first change and falls back to eager once its recompile limit is reached.
    torch._dynamo.reset()
    return torch.compile(_bnlstm("reference", config, device))


def _nn_lstm(config: Config, device: torch.device) -> nn.Module:
    return nn.LSTM(config.input_size, config.hidden_size, num_layers=config.num_layers,
                   bidirectional=config.bidirectional, device=device, dtype=config.dtype)


@contextlib.contextmanager
def environment(name: str, value: str):
    """Within: the environment variable `name` is `value`; restored after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def cublas_recurrent_gemm():
    """Within: the CUDA backend takes its recurrent GEMM through cuBLAS (version 1; in TF32 for
    half-precision inputs), not the tensor-core GEMM inside the step kernel that those inputs
    get, through the environment variable its host code reads at each forward call."""
    return environment("BNLSTM_CUDA_RECURRENT_GEMM", "cublas")


class _WithEnvironment(nn.Module):
    """A backend's module with an environment variable set around each forward call (the
    backends read their switches there; the backward pass follows what the forward chose)."""

    def __init__(self, module: nn.Module, name: str, value: str):
        super().__init__()
        self.module, self.name, self.value = module, name, value

    def forward(self, *args, **kwargs):
        with environment(self.name, self.value):
            return self.module(*args, **kwargs)


def _cuda_with_cublas_gemm(config: Config, device: torch.device) -> nn.Module:
    # Version 1's recurrent GEMM; for float32 inputs the same path as bnlstm:cuda.
    return _WithEnvironment(_bnlstm("cuda", config, device), "BNLSTM_CUDA_RECURRENT_GEMM", "cublas")


def _triton_with_kernel_grad_h(config: Config, device: torch.device) -> nn.Module:
    # The backward pass's grad_zh @ W_hh inside the step kernel, not by torch between
    # launches; for float32 inputs the same path as bnlstm:triton.
    return _WithEnvironment(_bnlstm("triton", config, device), "BNLSTM_TRITON_GRAD_H", "kernel")


def providers(device: torch.device, compile: bool = False,
              backends: Optional[Sequence[str]] = None) -> List[Provider]:
    """Every backend of the package available on `device`, the CUDA backend with its version 1
    recurrent GEMM and the Triton backend with its per-step backward GEMM in the kernel (to compare each
    pair), torch.compile of the reference if asked, and
    torch.nn.LSTM (cuDNN on a GPU) as the bar, last.

    backends: if given, only the bnlstm providers these names select (see `selects`);
    nn.LSTM stays. A name that selects none raises ValueError.
    """
    available = available_backends(device)
    found = [Provider(f"bnlstm:{name}", partial(_bnlstm, name)) for name in available]
    if "cuda" in available:
        found.append(Provider("bnlstm:cuda+cublas-gemm", _cuda_with_cublas_gemm))
    if "triton" in available:
        found.append(Provider("bnlstm:triton+kernel-grad-h", _triton_with_kernel_grad_h))
    if compile:
        found.append(Provider("bnlstm:reference+compile", _compiled_reference))
    if backends is not None:
        unmatched = [name for name in backends if not any(selects(name, p.name) for p in found)]
        if unmatched:
            raise ValueError(
                f"no provider on {device} for {', '.join(unmatched)}; available: "
                + ", ".join(p.name.removeprefix("bnlstm:") for p in found)
            )
        found = [p for p in found if any(selects(name, p.name) for name in backends)]
    found.append(Provider(BASELINE, _nn_lstm))
    return found


def selects(name: str, provider: str) -> bool:
    """Whether a --backends name selects a provider: "cuda" selects bnlstm:cuda and its
    variants (bnlstm:cuda+cublas-gemm), "cuda+cublas-gemm" that variant alone."""
    backend = provider.removeprefix("bnlstm:")
    return backend == name or backend.startswith(name + "+")


def modes_of(config: Config) -> Tuple[str, ...]:
    """The modes measured for `config`, in MODES order."""
    if config.modes is None:
        return MODES
    unknown = set(config.modes) - set(MODES)
    if unknown:
        raise ValueError(f"modes must be among {MODES}, got {sorted(unknown)}")
    return tuple(mode for mode in MODES if mode in config.modes)


def make_call(module: nn.Module, mode: str, config: Config, device: torch.device) -> Callable[[], None]:
    """A no-argument call that runs `module` once in `mode` on a fixed random input.

    inference: eval mode, no autograd. forward: training mode (batch statistics, running
    statistics updated) with autograd recording. train_step: forward plus backward, with
    the parameter gradients dropped first so every step allocates and writes them.
    A padded configuration's input is a PackedSequence (packed here, outside the call); an
    autocast one's forward runs under torch.autocast to bfloat16, its backward outside, as
    autocast's documentation asks.
    """
    options = {"device": device, "dtype": config.dtype}
    x = torch.randn(config.seq_len, config.batch, config.input_size, **options)  # [T, B, I]
    if config.padded:
        x = pack_padded_sequence(x, padded_lengths(config), enforce_sorted=False)
    if config.autocast:
        run = partial(_autocast_forward, module, x, device)
    else:
        run = partial(module, x)
    if mode == "inference":
        module.eval()

        def call() -> None:
            with torch.no_grad():
                run()

        return call
    module.train()
    if mode == "forward":

        def call() -> None:
            run()

        return call
    if mode != "train_step":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    # The output is [T, B, H * directions]; a packed output's data [sum of lengths, H * directions].
    rows = (x.data.shape[0],) if config.padded else (config.seq_len, config.batch)
    grad_output = torch.randn(*rows, config.hidden_size * config.directions, **options)
    parameters = list(module.parameters())

    def call() -> None:
        for parameter in parameters:
            parameter.grad = None
        output, _ = run()
        if isinstance(output, PackedSequence):
            output = output.data
        output.backward(grad_output)

    return call


def _autocast_forward(module: nn.Module, x, device: torch.device):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return module(x)
