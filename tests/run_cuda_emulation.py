"""Run the CUDA backend's kernels and host code (csrc/recurrent_cuda.cu) on the CPU, for
machines without a GPU: they compile as C++ against csrc/tests/cuda_emulation.h (one
std::thread per CUDA thread, a std::barrier for __syncthreads) into a library whose CPU
registration binds layer.cpp's host code to recurrent_forward_cuda / recurrent_backward_cuda
instead of the CPU kernels. Then the tests that exercise the `"cpu"` backend run against it:
those of tests/test_backend_behaviours.py for backend="cpu" (every variant against the
independent float64 implementation of the paper, the layer against the reference, gradcheck
in float64, start_step, odd sizes: T = 63, B = 300, H = 2048, float32 against the float64
reference), opcheck and torch.compile of tests/test_cpu_backend.py, and the half-precision
tests of tests/test_cuda_backend.py, on CPU tensors. BNLSTM_EMULATION_ONLY_CUDA_TESTS=1 runs
only tests/test_cuda_backend.py and the layer-level tests of tests/test_backend_behaviours.py.

    python tests/run_cuda_emulation.py [extra pytest arguments]

BNLSTM_EMULATED_SMS (default 4) sets the multiprocessor count the block-size choice sees:
small values pick 32 hidden units a block, large ones 8. Slow (threads are real threads);
not part of the default test run.
"""
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv):
    import torch
    import torch.utils.cpp_extension as cpp_extension

    sys.path.insert(0, str(ROOT))
    build_dir = Path(os.environ.get("BNLSTM_EMULATION_BUILD") or Path(tempfile.gettempdir()) / "bnlstm-cuda-emulation")
    build_dir.mkdir(parents=True, exist_ok=True)
    csrc = ROOT / "csrc"
    cpp_extension.load(
        name="bnlstm_cuda_emulation",
        sources=[str(csrc / "ops.cpp"), str(csrc / "layer.cpp"), str(csrc / "layer_autograd.cpp"),
                 str(csrc / "running_stats.cpp"),
                 str(csrc / "tests" / "emulate_cuda.cpp")],
        extra_cflags=["-O2", "-std=c++20", "-Drecurrent_forward_cpu=recurrent_forward_cuda",
                      "-Drecurrent_backward_cpu=recurrent_backward_cuda", "-Dmatmul_cpu=matmul_cuda",
                      "-DBNLSTM_CUDA_KERNELS_ON_CPU"],
        extra_include_paths=[str(csrc)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    from bnlstm_cuda import ops

    # The library is loaded: register the Python parts and mark the operators as loaded, so
    # backend="cpu" runs the emulated CUDA code.
    ops._register_python_parts()
    ops._registered = True
    import pytest

    tests = ROOT / "tests"
    files = [str(tests / name)
             for name in ("test_backend_behaviours.py", "test_cpu_backend.py", "test_cuda_backend.py")]
    # -k applies to every file: file names pick the file (test_backend_behaviours.py's test
    # names avoid backend names, so "cpu" there picks backend="cpu").
    # (test_cpu_backend.py: not hidden_unit_blocks, which check the CPU kernels' split over
    # threads, nor the CPU's half-precision test: the CUDA kernels round the recurrent GEMM's
    # operands to the input's dtype; test_cuda_backend.py has their half-precision tests.)
    selection = [*files, "-k", "(backend_behaviours and cpu) or (cpu_backend and (opcheck or compile or paper) "
                               "and not hidden_unit_blocks) or (cuda_backend and half)"]
    if os.environ.get("BNLSTM_EMULATION_ONLY_CUDA_TESTS") == "1":
        selection = [*files[::2], "-k", "cuda_backend or (backend_behaviours and cpu and (layer_matches or odd_sizes "
                                        "or start_step))"]
    os.environ["BNLSTM_CUDA_EMULATION"] = "1"  # tests/test_cuda_backend.py: its tests on CPU tensors
    return pytest.main(["-q", "-p", "no:cacheprovider", *selection, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
