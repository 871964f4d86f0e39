import math
import os

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Without a GPU, Triton kernels can only run in Triton's interpreter, which must be chosen
# before triton is first imported (it decorates its own library functions then) and stay set
# while kernels run: tests/test_triton_backend.py and tests/test_backend_behaviours.py run the
# Triton backend that way (helpers.prepare_triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(requires_cuda)


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """torch.empty and torch.empty_like return NaN-filled floats, so a value that code
    forgets to write fails loudly instead of passing on leftover memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.fill_(math.nan)
        return tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def cpu_extension():
    """The CPU extension built or loaded, for modules whose tests call its operators
    directly (`pytestmark = pytest.mark.usefixtures("cpu_extension")`)."""
    from bnlstm_cuda.ops import ensure_loaded

    ensure_loaded()


@pytest.fixture
def threads():
    """Set the intra-op thread count for a test (call it with the count), and restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def float32_products(monkeypatch):
    """Half-precision inputs multiplied in float32, as on a CPU without AVX512_BF16: where the
    CPU has it, the CPU backend otherwise multiplies bfloat16 inputs in bfloat16, h_{t-1}
    rounded at every step (tests/test_cpu_bf16.py holds that path to its own oracle). For
    tests whose oracle computes in float32 after rounding the inputs: the module casts the
    input and weights to bfloat16 under autocast (as where the CPU cannot round them) and
    the operators multiply the rounded values in float32."""
    from bnlstm_cuda import ops

    monkeypatch.setattr(ops, "_operand_dtype", lambda out_dtype, dtype: None)
    monkeypatch.setattr(ops, "_cpu_bf16", False)
