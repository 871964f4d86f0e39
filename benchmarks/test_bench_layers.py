"""pytest-benchmark suite: a whole layer per provider and mode, at fixed shapes.

Run `python -m pytest benchmarks --benchmark-autosave`, then later
`python -m pytest benchmarks --benchmark-compare` to see regressions. Benchmarks are
grouped by mode and shape, so providers are compared side by side. None of the backends
exposes a per-step function yet; the layer is the unit measured.
"""
import pytest
import torch

from .providers import MODES, make_call, providers
from .report import device_name
from .sweeps import ISSUE_SMALL, Config
from .timing import synchronized

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = {"tiny": Config(16, 8, 16, 32, torch.float32), "issue_small": ISSUE_SMALL}


def pytest_generate_tests(metafunc):
    if "provider" in metafunc.fixturenames:
        found = providers(DEVICE, compile=metafunc.config.getoption("--bench-compile"))
        metafunc.parametrize("provider", found, ids=[provider.name for provider in found])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer(benchmark, provider, shape, mode):
    config = SHAPES[shape]
    torch.manual_seed(0)
    module = provider.build(config, DEVICE)
    # The host clock times the call, so the device is waited for inside it.
    call = synchronized(make_call(module, mode, config, DEVICE), DEVICE)
    call()  # warm-up; compiles the compiled provider
    benchmark.group = f"{mode} {config.label}"
    benchmark.extra_info.update(provider=provider.name, device=device_name(DEVICE))
    benchmark(call)
