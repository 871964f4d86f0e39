"""Determinism on the CPU: the same inputs and seed give bit-identical results, run after run
and process after process, on both backends, with one thread and with two. (Another
thread count is another summation order: results then agree to rounding, not to the bit.)"""
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bnlstm_cuda

BACKENDS = ["reference", "cpu"]


def training_run(backend, seed=0, steps=3, lr=0.01):
    """A few optimizer steps of a two-layer bidirectional module with dropout on a padded
    float32 batch; returns every output, gradient, parameter and buffer, in order."""
    torch.manual_seed(seed)
    module = bnlstm_cuda.BNLSTM(16, 33, 2, bidirectional=True, dropout=0.3, max_length=10, backend=backend)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    tensors = []
    for _ in range(steps):
        x = torch.randn(20, 9, 16, requires_grad=True)
        lengths = torch.randint(1, 21, (9,))
        out, (h_n, c_n) = module(x, lengths=lengths)
        loss = out.square().sum() + h_n.sum() + c_n.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tensors += [out, h_n, c_n, x.grad, *(p.grad for p in module.parameters())]
    module.eval()
    tensors.append(module(torch.randn(25, 3, 16))[0])
    return [t.detach() for t in tensors + list(module.parameters()) + list(module.buffers())]


def digest(tensors):
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.contiguous().numpy().tobytes())
    return hasher.hexdigest()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_repeated_runs_are_bit_identical(backend, num_threads, threads):
    threads(num_threads)
    first, second = training_run(backend), training_run(backend)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_counts_agree_to_rounding(backend, threads):
    # No optimizer step: Adam turns a rounding difference in a gradient near 0 into a full
    # step of another sign, which is not what this test is about.
    threads(1)
    one = training_run(backend, steps=1, lr=0.0)
    threads(2)
    two = training_run(backend, steps=1, lr=0.0)
    for a, b in zip(one, two):
        # Sums over the batch and the sequence in another order: float32 rounding (6e-8),
        # amplified through 20 steps of backward recurrence to about 2e-5 of each tensor's
        # norm here (an element that is a small sum of large terms moves more).
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-6


def test_another_process_gives_the_same_bits(threads):
    """A fresh process (other allocations, other memory alignment) reproduces this one's
    results bit for bit, on both backends, with two threads."""
    threads(2)
    here = {backend: digest(training_run(backend, steps=2)) for backend in BACKENDS}
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, {tests!r})
        torch.set_num_threads(2)
        from test_determinism import BACKENDS, digest, training_run
        for backend in BACKENDS:
            print(backend, digest(training_run(backend, steps=2)))
        """
    ).format(tests=str(Path(__file__).parent))
    repo = Path(bnlstm_cuda.__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=str(repo)))
    assert result.returncode == 0, result.stderr
    there = dict(line.split() for line in result.stdout.splitlines())
    assert there == here
