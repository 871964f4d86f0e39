"""The CPU operators' buffer pool (csrc/buffer_pool.h): reused buffers, same results."""
import os
import subprocess
import sys

import pytest
import torch

from bnlstm_cuda import BNLSTM
from bnlstm_cuda.backends import available_backends

pytestmark = pytest.mark.skipif(
    "cpu" not in available_backends(torch.device("cpu")), reason="the C++ extension cannot be built here"
)


def training_step(module, x):
    module.zero_grad()
    x = x.detach().requires_grad_()
    output, (h_n, c_n) = module(x)
    (output.square().sum() + h_n.sum() + c_n.sum()).backward()
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return [t.clone() for t in [output, h_n, c_n] + grads]


def test_reused_buffers_give_the_same_results():
    from bnlstm_cuda.ops import cpu_buffer_pool_statistics, release_cpu_buffers

    # Large enough for pooled buffers (>= 1 MiB): T * B * 4H * 4 bytes = 2 MiB.
    torch.manual_seed(0)
    module = BNLSTM(24, 64, max_length=64, backend="cpu", momentum=0.0)
    x = torch.randn(64, 32, 24)
    release_cpu_buffers()
    first = training_step(module, x)
    before = cpu_buffer_pool_statistics()
    assert before["cached_bytes"] > 0, before  # the step's intermediates came back to the pool
    second = training_step(module, x)
    after = cpu_buffer_pool_statistics()
    assert after["reused"] > before["reused"], (before, after)
    assert after["allocated"] == before["allocated"], (before, after)
    # Stale contents of a reused buffer must never show: every element is written first.
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert release_cpu_buffers() == after["cached_bytes"]
    assert cpu_buffer_pool_statistics()["cached_bytes"] == 0


def test_inference_outputs_come_from_the_pool_and_behave_as_any_tensor():
    """An inference call's output is pooled (a call that follows a dropped output reuses its
    buffer) but is an ordinary tensor to the caller: one held is never handed out again, and
    its storage resizes (through the pool)."""
    from bnlstm_cuda.ops import cpu_buffer_pool_statistics, release_cpu_buffers

    torch.manual_seed(0)
    module = BNLSTM(3, 64, max_length=300, backend="cpu").eval()
    x = torch.randn(300, 16, 3)  # output T * B * H * 4 bytes = 1.2 MiB
    with torch.no_grad():
        release_cpu_buffers()
        expected = module(x)[0]
        kept = cpu_buffer_pool_statistics()["cached_bytes"]
        expected = expected.clone()  # the output's buffer returns to the pool
        assert cpu_buffer_pool_statistics()["cached_bytes"] - kept >= expected.numel() * 4
        before = cpu_buffer_pool_statistics()
        held = module(x)[0]
        after = cpu_buffer_pool_statistics()
        assert after["reused"] > before["reused"] and after["allocated"] == before["allocated"], (before, after)
        other = module(x)[0]  # `held` is still alive: this call cannot be given its buffer
        assert other.data_ptr() != held.data_ptr()
        torch.testing.assert_close(held, expected, rtol=0, atol=0)
        torch.testing.assert_close(other, expected, rtol=0, atol=0)
        grown = held.view(-1).resize_(held.numel() + 1000)
        torch.testing.assert_close(grown[:expected.numel()].view_as(expected), expected, rtol=0, atol=0)
        shrunk = other.view(-1).resize_(10).clone()
        torch.testing.assert_close(shrunk, expected.view(-1)[:10], rtol=0, atol=0)
        del held, other, grown


def test_pool_can_be_turned_off():
    script = (
        "import torch; from bnlstm_cuda import BNLSTM; from bnlstm_cuda.ops import cpu_buffer_pool_statistics\n"
        "m = BNLSTM(24, 64, backend='cpu'); x = torch.randn(64, 32, 24, requires_grad=True)\n"
        "for _ in range(2):\n    out, _ = m(x); out.sum().backward()\n"
        "print(cpu_buffer_pool_statistics())\n"
    )
    env = dict(os.environ, BNLSTM_CPU_POOL_MB="0")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "{'cached_bytes': 0, 'reused': 0, 'allocated': 0}", result.stdout


@pytest.mark.parametrize("value", ["abc", "-1", "99999999999999999999"])
def test_bad_pool_size_is_refused_naming_the_variable(value):
    """A BNLSTM_CPU_POOL_MB that is not a non-negative integer (strtoull would read "abc" as
    0 and "-1" as the largest size) raises at the pool's first use, and at every later one."""
    script = (
        "import torch; from bnlstm_cuda import BNLSTM; from bnlstm_cuda.ops import cpu_buffer_pool_statistics\n"
        "m = BNLSTM(24, 64, backend='cpu'); x = torch.randn(64, 32, 24)\n"
        "for use in (lambda: m(x), cpu_buffer_pool_statistics):\n"
        "    try:\n        use()\n    except RuntimeError as error:\n        print(str(error).splitlines()[0])\n"
    )
    env = dict(os.environ, BNLSTM_CPU_POOL_MB=value)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    message = (
        f'BNLSTM_CPU_POOL_MB must be a non-negative integer number of MB (at most {(sys.maxsize * 2 + 1) >> 20}; '
        f'0 turns the CPU buffer pool off), got "{value}"'
    )
    assert result.stdout.splitlines() == [message, message], result.stdout
