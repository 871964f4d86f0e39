"""`python -m benchmarks.triton_host`: host time a step of the Triton backend's Python loops.

The Triton layer launches one kernel a step forward and one kernel plus one GEMM a step
backward, from Python. On a GPU a step's kernels take a few microseconds, so whatever the
host spends per step besides the launch (slicing per-step views, allocations) adds to the
step time. This measures that part alone, on the CPU: the kernels are replaced by no-ops
that return a no-op compiled kernel, so the loops launch as on a GPU (Triton's own launcher,
which needs a GPU, is not included), at B=2, I=H=8 where the one real operation, the
backward GEMM, is negligible. A step's cost is the difference between runs of 250 and 50
steps, over 200, which removes the per-call work.

Then the part of Triton's JIT launch that the layer skips after a loop's first step
(`triton_layer._StepLauncher`): binding, specialising and the cache key of the step kernels'
arguments, timed on CPU tensors through Triton's internals (reported as not timed where a
Triton version has moved them).
"""
from __future__ import annotations

import argparse
import time
import types

import torch

from bnlstm_cuda import triton_kernels, triton_layer
from bnlstm_cuda.layer_api import LayerParams
from bnlstm_cuda.ops import run_layer
from bnlstm_cuda.variants import get_variant


class _NoOpCompiledKernel:
    """Stands for the compiled kernel Triton's JIT returns: launching it does nothing."""

    def __getitem__(self, grid):
        return lambda *args, stream=None: None


class _NoOpKernel:
    """Takes a kernel's launches and does nothing; like Triton's JIT on a GPU, it returns a
    compiled kernel, so the step loops take the path they take there (_StepLauncher's)."""

    def __init__(self, kernel):
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _NoOpCompiledKernel()


def _no_op_kernels():
    names = ("bnlstm_input_bn_kernel", "bnlstm_fwd_step_kernel", "bnlstm_bwd_step_kernel", "tf32_matmul_kernel")
    return types.SimpleNamespace(reserve_offsets=triton_kernels.reserve_offsets,
                                 **{name: _NoOpKernel(getattr(triton_kernels, name)) for name in names})


def host_seconds(steps: int, variant: str, repeats: int, batch: int = 2, size: int = 8) -> dict:
    """Best time of `repeats` calls: {"forward": s, "forward+backward": s} for one layer."""
    gates = 4 * size
    params = [torch.randn(gates, size), torch.randn(gates, size), torch.zeros(gates), torch.ones(gates),
              torch.ones(gates), torch.ones(size), torch.zeros(size)]
    for p in params:
        p.requires_grad_()
    x = torch.randn(steps, batch, size, requires_grad=True)
    h0, c0 = torch.zeros(batch, size), torch.zeros(batch, size)

    def forward():
        # The Triton operators themselves (bnlstm_layer_triton would refuse CPU tensors).
        return run_layer(triton_layer.OPERATORS, x, h0, c0, LayerParams(*params), {}, variant=get_variant(variant),
                         training=True, eps=1e-5)

    def forward_backward():
        forward().output.sum().backward()

    best = {}
    for name, call in (("forward", forward), ("forward+backward", forward_backward)):
        best[name] = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def jit_binding_seconds(repeats: int = 10, launches: int = 1000) -> dict:
    """Best time a launch of the per-launch work of Triton's JIT that _StepLauncher skips
    after the first step: binding the arguments, specialising them and the cache key
    (JITFunction.run up to its cache lookup), for the step kernels at B=64, H=1024, bf16,
    in training, on CPU tensors (it reads only their pointers and dtypes). Uses Triton's
    internals as 3.9 has them; {kernel: seconds}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    from bnlstm_cuda.triton_compile import kernel_configurations

    backend = make_backend(GPUTarget("cuda", 90, 32))
    seconds = {}
    for config in kernel_configurations():
        name, fn = config["name"], config["fn"]
        if "step" not in name or config["shape"] != "B=64 H=1024 bf16" or config["mode"] != "train":
            continue
        if type(fn).__name__ == "InterpretedFunction":
            raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels have no JIT binding")
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        constexprs = config["constexprs"]
        arguments = [torch.empty(16) if arg.endswith("_ptr") else 1e-5 if arg == "eps" else 7
                     for arg in fn.arg_names if arg not in constexprs]
        options = dict(constexprs, num_warps=config["num_warps"], debug=False, instrumentation_mode="",
                       fpsan_homomorphic_casts=False)
        cache = {}

        def bind():
            _, specialization, parsed = binder(*arguments, **options)
            compute_cache_key(cache, specialization, parsed)

        bind()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(launches):
                bind()
            best = min(best, (time.perf_counter() - start) / launches)
        seconds[name] = best
    return seconds


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
    try:
        binding = jit_binding_seconds()
    except Exception as error:  # Triton's internals move between versions: report, do not fail
        print(f"Triton's JIT binding not timed: {type(error).__name__}: {error}")
        return
    for name, seconds in binding.items():
        print(f"{name}: {seconds * 1e6:.1f} us a launch in Triton's JIT binding and cache key "
              "(skipped after the first step)")


if __name__ == "__main__":
    main()
