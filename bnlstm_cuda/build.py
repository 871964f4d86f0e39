"""Compiling the C++ extension: on first use, ahead of time, or by `pip install`.

On first use the sources in `csrc/` compile with `torch.utils.cpp_extension.load` and ninja
into a cache directory keyed by the hash of the sources, the compiler flags and the torch
version, so an edit or an upgrade rebuilds and nothing else does. An exclusive file lock
(released by the OS even if a builder dies) makes concurrent first uses build once. A build
that loaded is stamped with its library's size and hash and later loads directly, without
ninja or a compiler. A broken cache is repaired under the lock, with a message on stderr:
a library that is not the one built (truncated: loading it would kill the process) or does
not load is linked again; an unfinished build (a killed compiler) is completed; if building
over such leftovers fails, the directory is emptied and everything compiles once more.

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
HEADERS = ("bnlstm.h", "buffer_pool.h", "checks.h", "layer_ops.h", "packed_gemm.h")
# Name of the library that `pip install` builds into the package (setup.py).
PREBUILT_NAME = "_bnlstm_cpu"
# What a build directory in the cache holds besides ninja's files: the library, our lock
# file, and the stamp written once the library has loaded (its size and hash: a complete
# build, loadable without ninja or a compiler).
EXTENSION_NAME = "bnlstm_cpu"
LIBRARY_FILE = f"{EXTENSION_NAME}.so"
LOCK_NAME = ".lock"
COMPLETE_STAMP = ".complete"


class ExtensionUnavailable(RuntimeError):
    """The C++ extension cannot be built or loaded here; the message says why."""


def source_dir() -> Path:
    """csrc/ of a source checkout (editable installs), else the copy installed in the package."""
    for candidate in (PACKAGE_DIR.parent / "csrc", PACKAGE_DIR / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    raise ExtensionUnavailable(f"the C++ sources (csrc/) are missing next to {PACKAGE_DIR}")


def _cpu_flags_present(*names: str) -> bool:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return all(name in flags for name in names)


# at::vec's widest code the building CPU runs: AVX-512 (16 floats a vector) where the CPU
# has the subsets torch's own AVX512 kernels use, else AVX2.
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def cpu_cflags() -> List[str]:
    """-O3, and vector code for at::vec (Sleef exp/tanh) as wide as the building CPU runs.
    The build is for this machine: the cache key includes these flags."""
    flags = ["-O3"]
    if _cpu_flags_present("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"):
        flags += AVX512_FLAGS
    elif _cpu_flags_present("avx2", "fma"):
        flags += AVX2_FLAGS
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
    sources next to it are the ones it was built from (an edited checkout rebuilds). One that
    does not load (truncated, built for another torch) is skipped with a message."""
    import torch

    for path in PACKAGE_DIR.glob(f"{PREBUILT_NAME}*.so"):
        stamp = path.with_suffix(".key")
        if stamp.is_file() and stamp.read_text().strip() != source_key():
            print(f"bnlstm_cuda: ignoring {path.name}: built from other sources", file=sys.stderr)
            return False
        try:
            torch.ops.load_library(str(path))
        except OSError as error:
            print(f"bnlstm_cuda: ignoring {path.name}: it does not load ({error})", file=sys.stderr)
            return False
        return True
    return False


def source_key(src: Optional[Path] = None) -> str:
    """Key of the C++ sources, the compiler flags and the torch version: the build cache's
    directory name, and the stamp setup.py writes next to a library it builds."""
    src = src or source_dir()
    return _build_key([src / name for name in CPU_SOURCES + HEADERS], cpu_cflags())


def load_cpu_extension(verbose: Optional[bool] = None) -> Path:
    """Build (once) and load the CPU operators into torch.ops.bnlstm; returns the build dir
    (or the package dir for a prebuilt library). Raises ExtensionUnavailable.

    A build that loaded once is stamped complete and later loads without ninja or a
    compiler. A broken cache (a truncated library, an unfinished build, the lock file of a
    builder that was killed) is detected under the lock and repaired: see the module
    docstring.
    """
    if _load_prebuilt():
        return PACKAGE_DIR
    if verbose is None:
        verbose = os.environ.get("BNLSTM_VERBOSE_BUILD") == "1"
    src = source_dir()
    build_dir = cache_dir() / f"cpu-{source_key(src)}"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = open(build_dir / LOCK_NAME, "a")
    except OSError as error:
        raise ExtensionUnavailable(
            f"cannot use the build cache {build_dir}: {error}; set BNLSTM_CACHE_DIR to a writable directory"
        ) from error
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent builder finishes first; we reuse its work
        library = build_dir / LIBRARY_FILE
        stamp = build_dir / COMPLETE_STAMP
        if stamp.is_file():
            # Checked before loading: dlopen of a truncated library kills the process (SIGBUS).
            if _stamp_text(library) == stamp.read_text():
                try:
                    _load_library(library)
                    return build_dir
                except OSError as error:
                    fault = f"does not load ({error})"
            else:
                fault = "is missing or damaged (it is not the file that was built)"
            print(f"bnlstm_cuda: the cached library in {build_dir} {fault}; building it again",
                  file=sys.stderr, flush=True)
            stamp.unlink()
        problem = missing_tools()
        if problem:
            raise ExtensionUnavailable(f"cannot build the bnlstm_cuda C++ extension: {problem}")
        leftovers = _contents(build_dir)
        # Without a stamp the directory is fresh or holds an unfinished build: its library
        # may be truncated, which ninja cannot tell, so it is always linked again (the
        # object files ninja finds up to date are reused).
        library.unlink(missing_ok=True)
        if not leftovers:
            what = "compiling the CPU extension into {} (first use only; about a minute)"
        else:
            what = "completing the build of the CPU extension in {}"
        try:
            _build_and_load(build_dir, src, verbose, what)
        except ExtensionUnavailable as error:
            if not leftovers:
                raise  # a fresh directory: a second attempt would fail the same way
            # What an interrupted or corrupted build left may be the cause: start afresh.
            _discard(build_dir, f"building in it failed ({_first_line(error)})")
            _build_and_load(build_dir, src, verbose, "recompiling the CPU extension into {} (about a minute)")
        temporary = stamp.with_name(stamp.name + ".tmp")
        temporary.write_text(_stamp_text(library))
        os.replace(temporary, stamp)
    return build_dir


def _stamp_text(library: Path) -> str:
    """What the complete stamp records: the size and SHA-256 of the library that loaded."""
    if not library.is_file():
        return ""
    data = library.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"


def _build_and_load(build_dir: Path, src: Path, verbose: bool, what: str) -> None:
    """Compile (ninja redoes only what is out of date) and load. Runs under the cache lock."""
    import torch.utils.cpp_extension as cpp_extension

    # torch's own lock file inside the build directory: one left there by a builder that
    # was killed would make cpp_extension.load wait forever. Every builder holds our lock,
    # so under it such a file can only be stale.
    (build_dir / "lock").unlink(missing_ok=True)
    print(f"bnlstm_cuda: {what.format(build_dir)}", file=sys.stderr, flush=True)
    # cpp_extension.load skips the build step for sources it already built in this process;
    # forgetting them makes a rebuild after a failed load really rebuild.
    versioner = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
    getattr(versioner, "entries", {}).pop(EXTENSION_NAME, None)
    start = time.perf_counter()
    try:
        cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(src / name) for name in CPU_SOURCES],
            extra_cflags=cpu_cflags(),
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
        )
    except OSError as error:  # the build ran but its library does not load
        raise ExtensionUnavailable(
            f"the bnlstm_cuda C++ extension built in {build_dir} does not load: {error}"
        ) from error
    except Exception as error:  # the compiler's message is in the error
        raise ExtensionUnavailable(f"building the bnlstm_cuda C++ extension failed: {error}") from error
    if verbose:
        print(f"bnlstm_cuda: extension ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def _load_library(path: Path) -> None:
    import torch

    torch.ops.load_library(str(path))


def _contents(build_dir: Path) -> List[Path]:
    """Everything in a build directory but our lock file."""
    return [entry for entry in build_dir.iterdir() if entry.name != LOCK_NAME]


def _discard(build_dir: Path, reason: str) -> None:
    """Empty a build directory (keeping the lock file we hold), saying why."""
    print(f"bnlstm_cuda: {reason}; deleting {build_dir} and rebuilding", file=sys.stderr, flush=True)
    for entry in _contents(build_dir):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
