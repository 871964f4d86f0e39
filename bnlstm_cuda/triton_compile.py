"""Ahead-of-time compilation of the Triton kernels for sm_90 (H100), without a GPU.

    python -m bnlstm_cuda.build --triton      # or: python -m bnlstm_cuda.triton_compile

Compiles every kernel of triton_kernels.py with `triton.compile` for
`GPUTarget("cuda", 90, 32)` at the tile sizes the layer would use for the benchmark shapes
(B = 64; H = 512 and 1024; bfloat16 and float32, and float64, in which the GPU test suite
runs), then reads each cubin's resource usage:
registers, stack and shared memory from `cuobjdump --dump-resource-usage` (CUDA's, or the
copy bundled with triton), spill bytes from the ptxas log of the compile. Then compiles every
other combination of constexprs the layer can launch (`layer_combinations`, 176, a process
per core: about 3 minutes on 2 cores), so that none first fails on a GPU. Prints a table,
writes it to benchmarks/results/triton_resource_usage.txt, and exits non-zero if any kernel
fails to compile. No timing: that needs the GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "triton_resource_usage.txt"
BATCH = 64
HIDDEN_SIZES = (512, 1024)
# fp64: the GPU test suite runs float64 layers (the reference's precision), so CI compiles those too.
DTYPES = ("bf16", "fp32", "fp64")
# Names of pointer arguments by what they point at; the rest are compute-dtype buffers.
OPERAND_POINTERS = {"wx_ptr", "w_hh_ptr", "gamma_ptr", "bias_ptr", "gamma_ih_ptr", "gamma_hh_ptr", "gamma_c_ptr",
                    "beta_c_ptr", "h_op_prev_ptr", "h_op_next_ptr"}
RUNNING_POINTERS = {"stats_in_mean_ptr", "stats_in_var_ptr"}
FLOAT_SCALARS = {"eps"}


def _tool(name: str) -> Optional[str]:
    """A CUDA tool: /usr/local/cuda/bin first, then the copy bundled with triton, then PATH."""
    import triton

    for candidate in (Path("/usr/local/cuda/bin") / name,
                      Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name):
        if candidate.is_file():
            return str(candidate)
    return shutil.which(name)


def _signature(fn, operand: str, constexprs: Dict[str, object]) -> Dict[str, str]:
    """Triton signature of `fn`: pointer element types by argument name (operand dtype for
    x's projection and the parameters, int8 for masks, fp32 running statistics, the
    compute dtype elsewhere: fp64 for fp64 operands, else fp32), fp64 for eps (as the
    kernels annotate it), i32 for other scalars."""
    compute = "fp64" if operand == "fp64" else "fp32"
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name == "active_ptr":
                signature[name] = "*i8"
            elif name in OPERAND_POINTERS:
                signature[name] = f"*{operand}"
            elif name in RUNNING_POINTERS:
                signature[name] = "*fp32"
            else:
                signature[name] = f"*{compute}"
        elif name in FLOAT_SCALARS:
            signature[name] = "fp64"
        else:
            signature[name] = "i32"
    return signature


def _torch_dtype(name: str):
    """The torch dtype of a short name ("bf16", "fp32", ...), as gpu_choice names them."""
    from .gpu_choice import DTYPE_NAMES

    return {short: dtype for dtype, short in DTYPE_NAMES.items()}[name]


def _compile(fn, operand: str, constexprs: Dict[str, object], num_warps: int):
    """triton.compile of `fn` for sm_90 (GPUTarget("cuda", 90, 32)) with these constexprs,
    pointer types after `operand`; what ptxas prints goes to this process's stdout."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(fn, _signature(fn, operand, constexprs), constexprs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def kernel_configurations() -> List[dict]:
    """Every (kernel, constexprs) the layer launches for the benchmark shapes, in training
    with gradients (cooijmans, the variant with the most work) and in inference, with the
    constexprs the layer itself computes (triton_layer.*_step_constexprs)."""
    from . import triton_kernels as k
    from .triton_layer import (INPUT_BLOCK_F, INPUT_BLOCK_R, MATMUL_BLOCK_K, MATMUL_BLOCK_M, MATMUL_BLOCK_N,
                               MATMUL_NUM_WARPS, NUM_WARPS, STEP_NUM_WARPS, backward_step_constexprs,
                               forward_step_constexprs)
    from .variants import get_variant

    cooijmans = get_variant("cooijmans")
    configs = []
    for hidden in HIDDEN_SIZES:
        for dtype in DTYPES:
            shape = f"B={BATCH} H={hidden} {dtype}"
            half = dtype in ("bf16", "fp16")
            # float32 products: IEEE unless torch allows TF32 (off by default); the backward's
            # grad_zh W_hh of half inputs: the kernel's own, TF32 (BNLSTM_TRITON_GRAD_H=kernel;
            # triton_layer._fused_grad_h), the variant whose registers and spills matter.
            forward = lambda training: forward_step_constexprs(cooijmans, _torch_dtype(dtype), BATCH, hidden,
                                                               training=training, keep=training, precision="ieee",
                                                               upcast=False)
            backward = backward_step_constexprs(cooijmans, _torch_dtype(dtype), BATCH, hidden, training=True,
                                                fused_grad_h=half, precision="tf32" if half else "ieee")
            configs += [
                dict(name="bnlstm_input_bn_kernel", fn=k.bnlstm_input_bn_kernel, shape=shape, operand=dtype,
                     mode="train", constexprs=dict(COMPUTE_STATS=True, APPLY=True, HAS_BIAS=True,
                                                   BLOCK_R=INPUT_BLOCK_R, BLOCK_F=INPUT_BLOCK_F)),
                dict(name="bnlstm_fwd_step_kernel", fn=k.bnlstm_fwd_step_kernel, shape=shape, operand=dtype,
                     mode="train", constexprs=forward(True)),
                dict(name="bnlstm_fwd_step_kernel", fn=k.bnlstm_fwd_step_kernel, shape=shape, operand=dtype,
                     mode="eval", constexprs=forward(False)),
                dict(name="bnlstm_bwd_step_kernel", fn=k.bnlstm_bwd_step_kernel, shape=shape, operand=dtype,
                     mode="train", constexprs=backward),
            ]
    # The backward pass's products over all steps for bf16/fp16 inputs (any shape: one compile).
    configs.append(dict(name="tf32_matmul_kernel", fn=k.tf32_matmul_kernel, shape="all steps, bf16 inputs",
                        operand="fp32", mode="train",
                        constexprs=dict(PRECISION="tf32", BLOCK_M=MATMUL_BLOCK_M, BLOCK_N=MATMUL_BLOCK_N,
                                        BLOCK_K=MATMUL_BLOCK_K)))
    warps = {"bnlstm_input_bn_kernel": NUM_WARPS, "tf32_matmul_kernel": MATMUL_NUM_WARPS}
    for config in configs:
        config["num_warps"] = warps.get(config["name"], STEP_NUM_WARPS)
    return configs


def layer_combinations() -> List[dict]:
    """The distinct (kernel, dtype, constexprs) the layer launches on a GPU, at the test
    suite's small tiles and the benchmark's: each variant, dtype (float64 is what the GPU
    suite runs), training and evaluation, with and without a kept reserve, one batch tile and
    two, float32 in IEEE and TF32, the backward's grad_zh W_hh in the kernel or not, and the
    input batch norm's modes."""
    from . import triton_kernels as k
    from .triton_layer import (INPUT_BLOCK_F, INPUT_BLOCK_R, NUM_WARPS, STEP_NUM_WARPS, backward_step_constexprs,
                               forward_step_constexprs)
    from .variants import VARIANTS, get_variant

    seen, combinations = set(), []

    def add(fn, dtype, constexprs, num_warps=STEP_NUM_WARPS):
        key = (fn.__name__, dtype, tuple(sorted(constexprs.items())))
        if key not in seen:
            seen.add(key)
            combinations.append(dict(name=fn.__name__, fn=fn, operand=dtype, constexprs=constexprs,
                                     num_warps=num_warps))

    # (dtype, batch, hidden, float32 precisions): the suite's tiles (B = 3, H = 20: one tile of
    # 16 rows) for every dtype, the benchmark's (B = 100, H = 512: two tiles of 64) for fp64
    # and the benchmark dtypes.
    cases = [("fp64", 3, 20, ("ieee",)), ("fp32", 3, 20, ("ieee", "tf32")), ("fp16", 3, 20, ("ieee",)),
             ("bf16", 3, 20, ("ieee",)), ("fp64", 100, 512, ("ieee",)), ("fp32", 100, 512, ("ieee",)),
             ("bf16", 100, 512, ("ieee",))]
    for dtype, batch, hidden, precisions in cases:
        half = dtype in ("bf16", "fp16")
        # grad_zh W_hh in the kernel: half inputs with BNLSTM_TRITON_GRAD_H=kernel (or not,
        # the default); the suite forces it for fp64; fp32 never.
        fused_choices = (False,) if dtype == "fp32" else (True, False)
        for name in VARIANTS:
            variant = get_variant(name)
            for training in (True, False):
                for precision in precisions:
                    for keep in (True, False):
                        add(k.bnlstm_fwd_step_kernel, dtype, forward_step_constexprs(
                            variant, _torch_dtype(dtype), batch, hidden, training=training, keep=keep,
                            precision=precision, upcast=False))
                    for fused in fused_choices:
                        add(k.bnlstm_bwd_step_kernel, dtype, backward_step_constexprs(
                            variant, _torch_dtype(dtype), batch, hidden, training=training, fused_grad_h=fused,
                            precision="tf32" if half else precision))
    for dtype in ("fp64", "fp32", "fp16", "bf16"):
        for compute_stats, apply, has_bias in ((True, True, True), (True, False, False), (False, True, True),
                                               (False, True, False)):
            add(k.bnlstm_input_bn_kernel, dtype, dict(COMPUTE_STATS=compute_stats, APPLY=apply, HAS_BIAS=has_bias,
                                                      BLOCK_R=INPUT_BLOCK_R, BLOCK_F=INPUT_BLOCK_F), NUM_WARPS)
    return combinations


def _compile_combination(name: str, operand: str, constexprs: Dict[str, object], num_warps: int) -> Optional[str]:
    """Compile one kernel of triton_kernels for sm_90 (in a worker process); the error, if any."""
    from . import triton_kernels

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            _compile(getattr(triton_kernels, name), operand, constexprs, num_warps)
    except Exception as error:
        return f"{name} {operand} {constexprs}: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return None


def compile_combinations(combinations: List[dict]) -> List[str]:
    """Compile every entry of `combinations` (layer_combinations()) for sm_90, in a process per
    core (each compile takes a core for about a second); a line for each that fails."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(c["name"], c["operand"], c["constexprs"], c["num_warps"]) for c in combinations]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_compile_combination, *zip(*jobs)))
    return [error for error in results if error is not None]


def _cubin_usage(cubin: bytes, cuobjdump: Optional[str]) -> Dict[str, str]:
    """REG, STACK, LOCAL and SHARED of the cubin Triton built, from `cuobjdump --dump-resource-usage`."""
    usage = {"REG": "?", "STACK": "?", "LOCAL": "?", "SHARED": "?"}
    if cuobjdump is None:
        return usage
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    for key in usage:
        match = re.search(rf"\b{key}:(\d+)", text)
        if match:
            usage[key] = match.group(1)
    return usage


def _spills(ptxas_log: str) -> str:
    """'stores/loads' spill bytes from the ptxas -v log Triton printed while compiling."""
    match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    return f"{match.group(1)}/{match.group(2)}" if match else "?"


def compile_all(report: Path = REPORT) -> int:
    """Compile every configuration, print and write the report; the number of failures."""
    # The interpreter would hand us InterpretedFunctions, which cannot be compiled; a fresh
    # cache makes ptxas run (and print its log) for every kernel; Triton 3.9's default.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cache = tempfile.TemporaryDirectory()
    os.environ["TRITON_CACHE_DIR"] = cache.name
    import triton

    cuobjdump = _tool("cuobjdump")
    triton.knobs.nvidia.dump_ptxas_log = True
    header = (f"Triton {triton.__version__} kernels compiled for sm_90 (GPUTarget('cuda', 90, 32); Triton emits "
              "sm_90a) without a GPU.\nregisters, stack (bytes per thread) and shared (bytes per program) from "
              f"{cuobjdump or 'no cuobjdump found'} --dump-resource-usage on Triton's cubin;\nspills = bytes of "
              "spill stores/loads from the ptxas -v log of that compile. mode: train = cooijmans, gradients "
              "kept; eval = inference.\n")
    columns = ("kernel", "shape", "mode", "tiles", "warps", "registers", "spills", "stack", "shared")
    rows, failures, spills = [], 0, {}
    for config in kernel_configurations():
        constexprs = config["constexprs"]
        tiles = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in constexprs.items()
                         if k.startswith("BLOCK_") or k == "TILES")
        try:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = _compile(config["fn"], config["operand"], constexprs, config["num_warps"])
        except Exception as error:  # report every kernel, then fail
            failures += 1
            rows.append((config["name"], config["shape"], config["mode"], tiles, str(config["num_warps"]),
                         f"COMPILE ERROR: {type(error).__name__}: {str(error).splitlines()[0][:200]}"))
            continue
        # Identical constexprs (H is a run-time argument) come from Triton's cache: no new ptxas log.
        key = (config["name"], config["operand"], config["mode"], config["num_warps"])
        spills[key] = _spills(log.getvalue()) if "spill" in log.getvalue() else spills.get(key, "?")
        usage = _cubin_usage(compiled.asm["cubin"], cuobjdump)
        rows.append((config["name"], config["shape"], config["mode"], tiles, str(config["num_warps"]),
                     usage["REG"], spills[key], usage["STACK"], str(compiled.metadata.shared)))
    widths = [max(len(columns[i]), *(len(row[i]) for row in rows if len(row) > i)) for i in range(len(columns))]
    line = lambda cells: "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
    text = header + "\n" + line(columns) + "\n" + "\n".join(
        line(row) if len(row) == len(columns) else "  ".join(row) for row in rows) + "\n"
    # Beyond the table: every other combination the layer can launch must compile too.
    combinations = layer_combinations()
    combination_failures = compile_combinations(combinations)
    failures += len(combination_failures)
    text += (f"\nEvery combination of constexprs the layer can launch (layer_combinations: "
             f"{len(combinations)}, at B = 3, H = 20 and B = 100, H = 512): "
             f"{len(combination_failures) or 'none'} failed to compile.\n")
    text += "".join(f"COMPILE ERROR: {failure}\n" for failure in combination_failures)
    print(text, end="")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    print(f"written to {report}")
    cache.cleanup()
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, default=REPORT, help="where to write the resource report")
    args = parser.parse_args(argv)
    failures = compile_all(args.report)
    if failures:
        print(f"{failures} Triton kernel configuration(s) failed to compile", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
