"""`python -m benchmarks.triton_host`: host time a step of the Triton backend's Python loops.

The Triton layer launches one kernel a step forward and one kernel plus one GEMM a step
backward, from Python. On a GPU a step's kernels take a few microseconds, so whatever the
host spends per step besides the launch (slicing per-step views, allocations) adds to the
step time. This measures that part alone, on the CPU: the kernels are replaced by no-ops
(Triton's own dispatch, which needs a GPU, is not included), at B=2, I=H=8 where the one
real operation, the backward GEMM, is negligible. A step's cost is the difference between
runs of 250 and 50 steps, over 200, which removes the per-call work.
"""
from __future__ import annotations

import argparse
import time
import types

import torch

from bnlstm_cuda import triton_kernels, triton_layer
from bnlstm_cuda.variants import get_variant


class _NoOpKernel:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _no_op_kernels():
    no_op = _NoOpKernel()
    return types.SimpleNamespace(reserve_offsets=triton_kernels.reserve_offsets, bnlstm_input_bn_kernel=no_op,
                                 bnlstm_fwd_step_kernel=no_op, bnlstm_bwd_step_kernel=no_op,
                                 tf32_matmul_kernel=no_op)


def host_seconds(steps: int, variant: str, repeats: int, batch: int = 2, size: int = 8) -> dict:
    """Best time of `repeats` calls: {"forward": s, "forward+backward": s} for one layer."""
    gates = 4 * size
    params = [torch.randn(gates, size), torch.randn(gates, size), torch.zeros(gates), torch.ones(gates),
              torch.ones(gates), torch.ones(size), torch.zeros(size)]
    for p in params:
        p.requires_grad_()
    x = torch.randn(steps, batch, size, requires_grad=True)
    h0, c0 = torch.zeros(batch, size), torch.zeros(batch, size)
    active = torch.ones(steps, batch, dtype=torch.bool)
    config = triton_layer._Config(get_variant(variant), True, 1e-5, False, 0, True)

    def forward():
        return triton_layer.TritonLayerFunction.apply(x, h0, c0, *params, active, {}, config)

    def forward_backward():
        forward()[0].sum().backward()

    best = {}
    for name, call in (("forward", forward), ("forward+backward", forward_backward)):
        best[name] = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="cooijmans")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    kernels = triton_layer._kernels
    triton_layer._kernels = _no_op_kernels
    try:
        short, long = host_seconds(50, args.variant, args.repeats), host_seconds(250, args.variant, args.repeats)
    finally:
        triton_layer._kernels = kernels
    for name in short:
        print(f"{name}: {(long[name] - short[name]) / 200 * 1e6:.1f} us of host time a step "
              f"({args.variant}, kernels as no-ops, torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
