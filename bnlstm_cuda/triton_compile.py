"""Ahead-of-time compilation of the Triton kernels for sm_90 (H100), without a GPU.

    python -m bnlstm_cuda.build --triton      # or: python -m bnlstm_cuda.triton_compile

Compiles every kernel of triton_kernels.py with `triton.compile` for
`GPUTarget("cuda", 90, 32)` at the tile sizes the layer would use for the benchmark shapes
(B = 64; H = 512 and 1024; bfloat16 and float32, and float64, in which the GPU test suite
runs), then reads each cubin's resource usage:
registers, stack and shared memory from `cuobjdump --dump-resource-usage` (CUDA's, or the
copy bundled with triton), spill bytes from the ptxas log of the compile. Prints a table, writes it to
benchmarks/results/triton_resource_usage.txt, and exits non-zero if any kernel fails to
compile. No timing: that needs the GPU.
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
    compute dtype elsewhere: fp64 for fp64 operands, else fp32), fp32 for eps (a Python
    float, as the JIT types it), i32 for other scalars."""
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
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def kernel_configurations() -> List[dict]:
    """Every (kernel, constexprs) the layer launches for the benchmark shapes, in training
    with gradients (cooijmans, the variant with the most work) and in inference."""
    import torch

    from . import triton_kernels as k
    from .triton_layer import (GRAD_H_BLOCK_K, INPUT_BLOCK_F, INPUT_BLOCK_R, MATMUL_BLOCK_K, MATMUL_BLOCK_M,
                               MATMUL_BLOCK_N, MATMUL_NUM_WARPS, NUM_WARPS, STEP_NUM_WARPS, tile_config)

    configs = []
    for hidden in HIDDEN_SIZES:
        for dtype in DTYPES:
            tiles = tile_config(BATCH, hidden, torch.bfloat16 if dtype == "bf16" else torch.float32)
            shape = f"B={BATCH} H={hidden} {dtype}"
            blocks = dict(BLOCK_B=tiles.block_b, BLOCK_H=tiles.block_h)
            # The GPU path multiplies fp32 in tf32 only when torch allows it (off by default).
            step = dict(TILES=tiles.tiles, BLOCK_K=tiles.block_k, DOT_PRECISION="ieee", DOT_UPCAST=False,
                        H_OPERAND=dtype == "bf16", **blocks)
            configs += [
                dict(name="bnlstm_input_bn_kernel", fn=k.bnlstm_input_bn_kernel, shape=shape, operand=dtype,
                     mode="train", constexprs=dict(COMPUTE_STATS=True, APPLY=True, HAS_BIAS=True,
                                                   BLOCK_R=INPUT_BLOCK_R, BLOCK_F=INPUT_BLOCK_F)),
                dict(name="bnlstm_fwd_step_kernel", fn=k.bnlstm_fwd_step_kernel, shape=shape, operand=dtype,
                     mode="train", constexprs=dict(NORM_REC=True, NORM_CELL=True, TRAINING=True, KEEP=True, **step)),
                dict(name="bnlstm_fwd_step_kernel", fn=k.bnlstm_fwd_step_kernel, shape=shape, operand=dtype,
                     mode="eval", constexprs=dict(NORM_REC=True, NORM_CELL=True, TRAINING=False, KEEP=False,
                                                  **dict(step, TILES=1))),
                dict(name="bnlstm_bwd_step_kernel", fn=k.bnlstm_bwd_step_kernel, shape=shape, operand=dtype,
                     mode="train", constexprs=dict(NORM_INPUT=True, STEP_INPUT=True, NORM_REC=True, NORM_CELL=True,
                                                   TRAINING=True, TILES=tiles.tiles, **blocks,
                                                   # grad_zh W_hh in the kernel, TF32, for half inputs
                                                   # (_fused_grad_h); IEEE fp32 goes to cuBLAS
                                                   FUSED_GRAD_H=dtype == "bf16", BLOCK_K=GRAD_H_BLOCK_K,
                                                   DOT_PRECISION="tf32" if dtype == "bf16" else "ieee")),
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
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
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
            source = ASTSource(config["fn"], _signature(config["fn"], config["operand"], constexprs), constexprs)
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(source, target=target, options={"num_warps": config["num_warps"]})
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
