"""Compiling the C++ extension: on first use, ahead of time, or by `pip install`.

On first use the sources in `csrc/` compile with `torch.utils.cpp_extension.load` and ninja
into a cache directory keyed by the hash of the sources, the compiler flags and the torch
version, so an edit or an upgrade rebuilds and nothing else does. An exclusive file lock
(released by the OS even if a builder dies) makes concurrent first uses build once.

    python -m bnlstm_cuda.build          # compile ahead of time, print where

Environment switches (prefix BNLSTM_):
    BNLSTM_CACHE_DIR        where builds are cached (default ~/.cache/bnlstm_cuda)
    BNLSTM_BUILD_EXTENSION  "1": `pip install --no-build-isolation .` compiles the extension
                            into the package (see setup.py) instead of on first use
    BNLSTM_VERBOSE_BUILD    "1": show the compiler's output
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

PACKAGE_DIR = Path(__file__).resolve().parent
CPU_SOURCES = ("ops.cpp", "layer.cpp", "recurrent_cpu.cpp")
HEADERS = ("bnlstm.h", "checks.h", "layer_ops.h", "packed_gemm.h")
# Name of the library that `pip install` builds into the package (setup.py).
PREBUILT_NAME = "_bnlstm_cpu"


class ExtensionUnavailable(RuntimeError):
    """The C++ extension cannot be built or loaded here; the message says why."""


def source_dir() -> Path:
    """csrc/ of a source checkout (editable installs), else the copy installed in the package."""
    for candidate in (PACKAGE_DIR.parent / "csrc", PACKAGE_DIR / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    raise ExtensionUnavailable(f"the C++ sources (csrc/) are missing next to {PACKAGE_DIR}")


def _cpu_supports_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def cpu_cflags() -> List[str]:
    """-O3, and AVX2 code for at::vec (Sleef exp/tanh) where the building CPU has it. The
    build is for this machine: the cache key includes these flags."""
    flags = ["-O3"]
    if _cpu_supports_avx2():
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def _build_key(sources: List[Path], flags: List[str]) -> str:
    import torch

    digest = hashlib.sha256()
    for path in sorted(sources):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(torch.__version__.encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("BNLSTM_CACHE_DIR") or Path.home() / ".cache" / "bnlstm_cuda"
    return Path(root)


def missing_tools() -> Optional[str]:
    """What a build would lack here, or None."""
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: `{compiler}` is not on PATH (install g++ or clang, or set CXX)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _load_prebuilt() -> bool:
    """Load the library that `pip install` built into the package, if there is one and the
    sources next to it are the ones it was built from (an edited checkout rebuilds)."""
    import torch

    for path in PACKAGE_DIR.glob(f"{PREBUILT_NAME}*.so"):
        stamp = path.with_suffix(".key")
        if stamp.is_file() and stamp.read_text().strip() != source_key():
            print(f"bnlstm_cuda: ignoring {path.name}: built from other sources", file=sys.stderr)
            return False
        torch.ops.load_library(str(path))
        return True
    return False


def source_key(src: Optional[Path] = None) -> str:
    """Key of the C++ sources, the compiler flags and the torch version: the build cache's
    directory name, and the stamp setup.py writes next to a library it builds."""
    src = src or source_dir()
    return _build_key([src / name for name in CPU_SOURCES + HEADERS], cpu_cflags())


def load_cpu_extension(verbose: Optional[bool] = None) -> Path:
    """Build (once) and load the CPU operators into torch.ops.bnlstm; returns the build dir
    (or the package dir for a prebuilt library). Raises ExtensionUnavailable."""
    if _load_prebuilt():
        return PACKAGE_DIR
    import torch.utils.cpp_extension as cpp_extension

    problem = missing_tools()
    if problem:
        raise ExtensionUnavailable(f"cannot build the bnlstm_cuda C++ extension: {problem}")
    if verbose is None:
        verbose = os.environ.get("BNLSTM_VERBOSE_BUILD") == "1"
    src = source_dir()
    sources = [src / name for name in CPU_SOURCES]
    flags = cpu_cflags()
    build_dir = cache_dir() / f"cpu-{source_key(src)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / "bnlstm_cpu.so"
    with open(build_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent builder finishes first; we reuse its work
        if not library.exists():
            print(
                f"bnlstm_cuda: compiling the CPU extension into {build_dir} "
                "(first use only; about a minute)",
                file=sys.stderr,
                flush=True,
            )
        start = time.perf_counter()
        try:
            cpp_extension.load(
                name="bnlstm_cpu",
                sources=[str(s) for s in sources],
                extra_cflags=flags,
                extra_include_paths=[str(src)],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as error:  # the compiler's message is in the error
            raise ExtensionUnavailable(f"building the bnlstm_cuda C++ extension failed: {error}") from error
        if verbose:
            print(f"bnlstm_cuda: extension ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return build_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="build the CPU extension (the default)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    try:
        where = load_cpu_extension(verbose=args.verbose)
    except ExtensionUnavailable as error:
        print(error, file=sys.stderr)
        return 1
    print(f"CPU extension built and loaded from {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
