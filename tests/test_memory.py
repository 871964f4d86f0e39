"""No memory growth over many training steps: resident memory (VmRSS) and the number of
live tensors stay flat once the allocator has warmed up."""
import gc
import warnings
from pathlib import Path

import pytest
import torch

from bnlstm_cuda import BNLSTM

STATUS = Path("/proc/self/status")


def resident_mib():
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def live_tensors():
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.fixture
def one_thread(threads):
    """One intra-op thread: thousands of small parallel regions per run slow down a
    hundredfold when other processes oversubscribe the cores; a leak does not depend on it."""
    threads(1)


@pytest.mark.skipif(not STATUS.exists(), reason="needs /proc/self/status (Linux)")
@pytest.mark.parametrize(
    "backend, sizes, steps",
    [
        # The fused operators: where a leaked reserve or autograd context would show.
        ("cpu", dict(input_size=8, hidden_size=32, num_layers=2, bidirectional=True), 1000),
        # The reference shares the module code; it is slower, so smaller and shorter.
        ("reference", dict(input_size=4, hidden_size=8, num_layers=2), 200),
    ],
    ids=["cpu", "reference"],
)
def test_training_steps_do_not_grow_memory(backend, sizes, steps, one_thread):
    """A leak of one step's output alone (with its graph) grows the CPU run by about 85 MiB
    over 1000 steps; the bound is 16 MiB, above the allocator's noise (about 1 MiB)."""
    torch.manual_seed(0)
    module = BNLSTM(**sizes, dropout=0.1, max_length=12, backend=backend)
    head = torch.nn.Linear(sizes["hidden_size"] * module.num_directions, 1)
    optimizer = torch.optim.Adam([*module.parameters(), *head.parameters()], lr=1e-3)
    batch, input_size = 8, sizes["input_size"]

    def step(index):
        x = torch.randn(16, batch, input_size)
        output, _ = module(x, lengths=torch.randint(1, 17, (batch,)))
        loss = head(output).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if index % 100 == 0:  # the inference and calibration paths too
            module.eval()
            with torch.no_grad():
                module(torch.randn(30, 3, input_size))
            module.train()
            module.calibrate([torch.randn(10, 4, input_size)])

    for index in range(50):
        step(index)
    tensors, resident = live_tensors(), resident_mib()
    for index in range(steps):
        step(index)
    growth = resident_mib() - resident
    assert live_tensors() - tensors <= 5
    assert growth < 16, f"resident memory grew by {growth:.1f} MiB over {steps} steps"
