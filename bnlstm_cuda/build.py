"""Compiling the C++ extension: on first use, ahead of time, or by `pip install`.

On first use the sources in `csrc/` compile with `torch.utils.cpp_extension.load` and ninja
into a cache directory keyed by the hash of the sources, the compiler flags and the torch
version, so an edit or an upgrade rebuilds and nothing else does. An exclusive file lock
(`filelock`; released by the OS even if a builder dies) makes concurrent first uses build
once. A build that loaded is stamped with its library's size and hash and later loads
directly, without ninja or a compiler, and without writing or locking anything (a cache on
a read-only mount works). A broken cache is repaired under the lock, with a message on
stderr: a library that is not the one built (truncated: loading it would kill the process)
or does not load is linked again; an unfinished build (a killed compiler) is completed; if
building over such leftovers fails, the directory is emptied and everything compiles once
more.

The cache holds code this process runs, so, as ssh does with its keys, a cache directory,
library or stamp that another user owns (root excepted) or that group or others can write
is refused, and what a build writes is not writable by group or others, whatever the umask.
ninja is looked for on PATH, then beside this Python (a virtual environment run by path,
not activated) and in the `ninja` package.

    python -m bnlstm_cuda.build          # compile ahead of time, print where
    python -m bnlstm_cuda.build --cuda   # the CUDA-enabled extension (no GPU needed to build)

With a CUDA build of torch and a visible GPU, the extension that loads is the CUDA-enabled
one: the same CPU sources plus the CUDA kernels (csrc/recurrent_cuda.cu), in one library,
because the operator schemas (ops.cpp, TORCH_LIBRARY) can be defined only once per process.
It is cached beside the CPU one, in cuda-<key>, keyed also by the CUDA sources, nvcc flags
and target architectures; the build writes ptxas' resource report of every kernel
(registers, spills, shared memory) to resource_usage.txt in its directory.

Environment switches (prefix BNLSTM_):
    BNLSTM_CACHE_DIR        where builds are cached (default ~/.cache/bnlstm_cuda)
    BNLSTM_BUILD_EXTENSION  "1": `pip install --no-build-isolation .` compiles the extension
                            into the package (see setup.py) instead of on first use
    BNLSTM_VERBOSE_BUILD    "1": show the compiler's output
    BNLSTM_CPU_CAPABILITY   avx512, avx2 or default: the CPU extension's vector code (default:
                            the capability torch's own CPU kernels use); part of the cache key
    BNLSTM_CUDA             "1": build and load the CUDA-enabled extension even without a
                            visible GPU; "0": the CPU-only one even with a GPU
    TORCH_CUDA_ARCH_LIST    target architectures of the CUDA build (default "8.0;9.0")
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import stat
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

PACKAGE_DIR = Path(__file__).resolve().parent
CPU_SOURCES = ("ops.cpp", "layer.cpp", "layer_autograd.cpp", "recurrent_cpu.cpp", "bidirectional_cpu.cpp",
               "running_stats.cpp", "bf16_gemm.cpp")
HEADERS = ("bf16_gemm.h", "bnlstm.h", "buffer_pool.h", "checks.h", "layer_ops.h", "packed_gemm.h", "running_fold.h",
           "step_loop.h", "vec_math.h")
# Name of the library that `pip install` builds into the package (setup.py).
PREBUILT_NAME = "_bnlstm_cpu"
# What a build directory in the cache holds besides ninja's files: the library, our lock
# file, and the stamp written once the library has loaded (its size and hash: a complete
# build, loadable without ninja or a compiler).
EXTENSION_NAME = "bnlstm_cpu"
LIBRARY_FILE = f"{EXTENSION_NAME}.so"
LOCK_NAME = ".lock"
COMPLETE_STAMP = ".complete"
# The CUDA-enabled extension: CPU_SOURCES plus these, one library (ops.cpp defines the
# schemas once). Its build log and ptxas' resource report stay in its build directory.
CUDA_SOURCES = ("recurrent_cuda.cu", "register_cuda.cpp")
CUDA_EXTENSION_NAME = "bnlstm_cuda_ops"
CUDA_LIBRARY_FILE = f"{CUDA_EXTENSION_NAME}.so"
DEFAULT_CUDA_ARCHS = "8.0;9.0"
BUILD_LOG = "build.log"
RESOURCE_REPORT = "resource_usage.txt"


class ExtensionUnavailable(RuntimeError):
    """The C++ extension cannot be built or loaded here; the message says why."""


def source_dir() -> Path:
    """csrc/ of a source checkout (editable installs), else the copy installed in the package."""
    for candidate in (PACKAGE_DIR.parent / "csrc", PACKAGE_DIR / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    raise ExtensionUnavailable(f"the C++ sources (csrc/) are missing next to {PACKAGE_DIR}")


# at::vec's vector code, by capability: AVX-512 (16 floats a vector, the subsets torch's own
# AVX512 kernels use), AVX2 (8), or at::vec's portable default (no vector flags).
CPU_CAPABILITY_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": [],
}


def runnable_cpu_capabilities() -> List[str]:
    """The vector capabilities this CPU runs, widest first, as torch's own CPU detection
    (cpuinfo, every platform) reports them."""
    import torch

    supported = {
        "avx512": getattr(torch.cpu, "_is_avx512_supported", lambda: False)(),
        "avx2": getattr(torch.cpu, "_is_avx2_supported", lambda: False)(),
        "default": True,
    }
    return [name for name in CPU_CAPABILITY_FLAGS if supported[name]]


def cpu_capability() -> str:
    """The vector capability the CPU extension is built for: BNLSTM_CPU_CAPABILITY (avx512,
    avx2 or default; testing each path on one host), else the one torch's own CPU kernels
    use (torch.backends.cpu.get_cpu_capability(), which follows ATEN_CPU_CAPABILITY)."""
    import torch

    asked = os.environ.get("BNLSTM_CPU_CAPABILITY", "")
    if asked:
        if asked not in CPU_CAPABILITY_FLAGS:
            raise ExtensionUnavailable(
                f"BNLSTM_CPU_CAPABILITY must be one of {', '.join(CPU_CAPABILITY_FLAGS)}; got {asked!r}")
        runnable = runnable_cpu_capabilities()
        if asked not in runnable:
            raise ExtensionUnavailable(
                f"BNLSTM_CPU_CAPABILITY={asked}, but this CPU runs only {', '.join(runnable)}")
        return asked
    used = torch.backends.cpu.get_cpu_capability().lower()
    return used if used in CPU_CAPABILITY_FLAGS else "default"


def torch_uses_openmp() -> bool:
    """Whether ATen's parallel backend is OpenMP. at::parallel_for is then a header template
    around `#pragma omp parallel`: compiled without -fopenmp it silently runs every range on
    one thread."""
    import torch

    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def cpu_cflags() -> List[str]:
    """-O3, OpenMP where torch's at::parallel_for needs it, and vector code for at::vec
    (cpu_capability()). The build is for this machine: the cache key includes these flags."""
    flags = ["-O3"]
    if torch_uses_openmp():
        flags += ["-fopenmp"]
    return flags + CPU_CAPABILITY_FLAGS[cpu_capability()]


def cpu_ldflags() -> List[str]:
    """Link the OpenMP runtime the compiled parallel regions call (its soname is the one
    torch already loaded, so the process keeps one thread pool)."""
    return ["-fopenmp"] if torch_uses_openmp() else []


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
    with _ninja_on_path():
        if not is_ninja_available():
            return "ninja is not installed (pip install ninja)"
    return None


def ninja_directory() -> Optional[Path]:
    """The directory of the ninja a build runs: the one on PATH, else the one beside this
    Python (a virtual environment's bin/ or Scripts/, which is not on PATH when the
    environment runs without being activated: IDEs, cron, systemd, containers), else the
    `ninja` package's own binary; None where there is none."""
    found = shutil.which("ninja")
    if found:
        return Path(found).parent
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.append(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if shutil.which("ninja", path=str(directory)):
            return directory
    return None


@contextlib.contextmanager
def _ninja_on_path():
    """ninja_directory() first on PATH for the duration: torch.utils.cpp_extension runs
    `ninja` from PATH."""
    directory = None if shutil.which("ninja") else ninja_directory()
    if directory is None:
        yield
        return
    previous = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([str(directory)] + ([previous] if previous else []))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = previous


def _load_prebuilt() -> bool:
    """Load the library that `pip install` built into the package, if there is one and the
    sources next to it are the ones it was built from (an edited checkout rebuilds). One that
    does not load (truncated, built for another torch) is skipped with a message."""
    import torch

    for path in PACKAGE_DIR.glob(f"{PREBUILT_NAME}*.so"):
        stamp = path.with_suffix(".key")
        if stamp.is_file() and stamp.read_text().strip() != source_key():
            print(f"bnlstm_cuda: ignoring {path.name}: built from other sources or flags", file=sys.stderr)
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


def cuda_wanted() -> bool:
    """Whether the CUDA-enabled extension is the one to load: BNLSTM_CUDA=1 or 0 decides;
    otherwise when torch is a CUDA build and sees a GPU."""
    choice = os.environ.get("BNLSTM_CUDA", "")
    if choice in ("0", "1"):
        return choice == "1"
    import torch

    return torch.version.cuda is not None and torch.cuda.is_available()


def cuda_arch_list() -> str:
    """Target architectures of the CUDA build: TORCH_CUDA_ARCH_LIST, else sm_80 and sm_90."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS


def cuda_cflags() -> List[str]:
    """nvcc flags: -O3, and ptxas' resource report of every kernel (kept in the build log)."""
    return ["-O3", "-Xptxas", "-v"]


def cuda_include_paths() -> List[str]:
    """Headers that torch's CUDA headers include and a bare toolkit may lack (cusparse.h,
    cublas_v2.h, ...): the CUDA wheels of torch bring them under site-packages/nvidia/*/include."""
    import torch

    nvidia = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted(str(path) for path in nvidia.glob("*/include") if (path / "cusparse.h").is_file())


def cuda_ldflags() -> List[str]:
    """Link cuBLAS, which matmul_cuda calls itself (cublasGemmEx, for its TF32 compute type),
    and the same cuBLAS torch loads, since the handle comes from torch: the one its CUDA wheels
    bring under site-packages/nvidia/*/lib (by its full name: the wheels have no libcublas.so
    link), else the toolkit's (a torch built against it). A toolkit of another CUDA major
    version beside a wheel's torch would otherwise put a second cuBLAS in the process. None
    found: torch has loaded cuBLAS anyway, and the symbol resolves when the library loads."""
    import torch

    nvidia = Path(torch.__file__).resolve().parent.parent / "nvidia"
    for library in sorted(nvidia.glob("*/lib/libcublas.so.*")):
        return [f"-L{library.parent}", f"-l:{library.name}"]
    home = cuda_home()
    for directory in [Path(home) / "lib64", Path(home) / "lib"] if home else []:
        if (directory / "libcublas.so").is_file():
            return [f"-L{directory}", "-lcublas"]
    return []


def cuda_home() -> Optional[str]:
    """The CUDA toolkit to build with: CUDA_HOME or CUDA_PATH, else torch's own guess, else
    /usr/local/cuda; the first that holds bin/nvcc and include/cuda_runtime.h. (torch guesses
    from `which nvcc`, which a wrapper script in /usr/local/bin turns into /usr/local.)"""
    from torch.utils import cpp_extension

    candidates = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  "/usr/local/cuda")
    for candidate in candidates:
        if candidate and (Path(candidate) / "bin" / "nvcc").is_file() and (
            Path(candidate) / "include" / "cuda_runtime.h"
        ).is_file():
            return candidate
    return None


def cuda_problem() -> Optional[str]:
    """Why the CUDA extension cannot be built here, or None."""
    import torch

    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is not a CUDA build; install a CUDA build of torch "
                "(e.g. pip install torch==2.14.1) to build the CUDA extension")
    if cuda_home() is None:
        return "no CUDA toolkit: nvcc not found (set CUDA_HOME, e.g. /usr/local/cuda)"
    return missing_tools()


def cuda_source_key(src: Optional[Path] = None) -> str:
    """Key of the CUDA-enabled build: every source, the C++ and nvcc flags, the target
    architectures, torch's CUDA version and the toolkit used."""
    import torch

    src = src or source_dir()
    flags = cpu_cflags() + cuda_cflags() + cuda_include_paths() + cuda_ldflags()
    flags += [f"arch={cuda_arch_list()}", f"cuda={torch.version.cuda}", f"toolkit={cuda_home()}"]
    return _build_key([src / name for name in CPU_SOURCES + CUDA_SOURCES + HEADERS], flags)


def load_extension(verbose: Optional[bool] = None) -> Path:
    """Build (once) and load the operators: the CUDA-enabled extension where cuda_wanted(),
    else the CPU one. Returns the build dir. Raises ExtensionUnavailable."""
    if cuda_wanted():
        return load_cuda_extension(verbose)
    return load_cpu_extension(verbose)


def load_cuda_extension(verbose: Optional[bool] = None) -> Path:
    """Build (once) and load the CUDA-enabled extension (CPU and CUDA kernels, one library);
    needs a CUDA build of torch and nvcc, not a GPU. Raises ExtensionUnavailable."""
    return _load_cached(cuda=True, verbose=verbose)


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
    return _load_cached(cuda=False, verbose=verbose)


def _load_cached(cuda: bool, verbose: Optional[bool]) -> Path:
    """The cache logic of both extensions (see load_cpu_extension)."""
    if verbose is None:
        verbose = os.environ.get("BNLSTM_VERBOSE_BUILD") == "1"
    src = source_dir()
    if cuda:
        problem = cuda_problem()
        if problem:
            raise ExtensionUnavailable(f"cannot build the bnlstm_cuda CUDA extension: {problem}")
        build_dir = cache_dir() / f"cuda-{cuda_source_key(src)}"
        build, kind, library_file = _build_and_load_cuda, "CUDA", CUDA_LIBRARY_FILE
    else:
        build_dir = cache_dir() / f"cpu-{source_key(src)}"
        build, kind, library_file = _build_and_load, "CPU", LIBRARY_FILE
    library = build_dir / library_file
    stamp = build_dir / COMPLETE_STAMP
    # A complete build loads without creating or locking anything (a cache on a read-only
    # mount); only building or repairing needs the lock.
    seen, fault = _read_stamp(stamp), None
    if seen:
        _refuse_unsafe([cache_dir(), build_dir, library, stamp])
        # Checked before loading: dlopen of a truncated library kills the process (SIGBUS).
        if _stamp_text(library) == seen:
            try:
                _load_library(library)
                return build_dir
            except OSError as error:
                fault = f"does not load ({error})"
    _refuse_unsafe([cache_dir(), build_dir])
    try:
        with _private_files():
            build_dir.mkdir(parents=True, exist_ok=True)
        held = _cache_lock(build_dir).acquire()  # a concurrent builder finishes first; we reuse its work
    except (OSError, NotImplementedError) as error:
        raise ExtensionUnavailable(
            f"cannot use the build cache {build_dir}: {error}; set BNLSTM_CACHE_DIR to a writable directory"
        ) from error
    with held, _private_files():
        current = _read_stamp(stamp)
        if current:
            _refuse_unsafe([library, stamp])
            if _stamp_text(library) != current:
                fault = "is missing or damaged (it is not the file that was built)"
            elif fault is None or current != seen:  # not the library that failed to load above
                try:
                    _load_library(library)
                    return build_dir
                except OSError as error:
                    fault = f"does not load ({error})"
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
        duration = "a few minutes" if cuda else "about a minute"
        if not leftovers:
            what = f"compiling the {kind} extension into {{}} (first use only; {duration})"
        else:
            what = f"completing the build of the {kind} extension in {{}}"
        try:
            build(build_dir, src, verbose, what)
        except ExtensionUnavailable as error:
            if not leftovers:
                raise  # a fresh directory: a second attempt would fail the same way
            # What an interrupted or corrupted build left may be the cause: start afresh.
            _discard(build_dir, f"building in it failed ({_first_line(error)})")
            build(build_dir, src, verbose, f"recompiling the {kind} extension into {{}} ({duration})")
        _make_private(library)
        temporary = stamp.with_name(stamp.name + ".tmp")
        temporary.write_text(_stamp_text(library))
        _make_private(temporary)
        os.replace(temporary, stamp)
    return build_dir


def _cache_lock(build_dir: Path):
    """The exclusive lock of a build directory: flock, or LockFileEx on Windows, which the
    OS releases when the holder dies."""
    import filelock

    path = str(build_dir / LOCK_NAME)
    try:
        # A soft lock (filelock's fallback where the filesystem lacks flock) outlives a
        # killed holder and would leave every later process waiting.
        return filelock.FileLock(path, mode=0o644, fallback_to_soft=False)
    except TypeError:  # a filelock without that option
        return filelock.FileLock(path, mode=0o644)


def _refuse_unsafe(paths: List[Path]) -> None:
    """Refuse, as ssh does with its keys, a cache directory or file (those that exist) that
    another user owns (root excepted) or that group or others can write: whoever can write
    it chooses the code this process runs."""
    if not hasattr(os, "geteuid"):  # no POSIX owners or modes (Windows)
        return
    user = os.geteuid()
    for path in paths:
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        if info.st_uid not in (user, 0):
            raise ExtensionUnavailable(
                f"refusing the build cache: {path} must be owned by this user (uid {user}) or root, "
                f"not by uid {info.st_uid}; delete it or set BNLSTM_CACHE_DIR to a directory of your own")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ExtensionUnavailable(
                f"refusing the build cache: {path} must not be writable by group or others, but its mode "
                f"is {stat.S_IMODE(info.st_mode):04o}; run `chmod go-w {path}` or set BNLSTM_CACHE_DIR "
                "to a directory of your own")


# The umask belongs to the process: threads that build at once take turns changing it.
_UMASK_LOCK = threading.Lock()


@contextlib.contextmanager
def _private_files():
    """Files and directories created meanwhile (by us, ninja or the compiler) are not
    writable by group or others, whatever the umask."""
    with _UMASK_LOCK:
        previous = os.umask(0o022)
        os.umask(previous | 0o022)
        try:
            yield
        finally:
            os.umask(previous)


def _make_private(path: Path) -> None:
    """Take group's and others' write permission from a file we wrote."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        path.chmod(mode & ~(stat.S_IWGRP | stat.S_IWOTH))


def _read_stamp(stamp: Path) -> str:
    """The complete stamp's text; empty where there is none."""
    return stamp.read_text() if stamp.is_file() else ""


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
        with _ninja_on_path():
            cpp_extension.load(
                name=EXTENSION_NAME,
                sources=[str(src / name) for name in CPU_SOURCES],
                extra_cflags=cpu_cflags(),
                extra_ldflags=cpu_ldflags(),
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


def _build_and_load_cuda(build_dir: Path, src: Path, verbose: bool, what: str) -> None:
    """Compile and load the CUDA-enabled extension for cuda_arch_list(). Under the cache lock.
    The compiler's output (ptxas' report included) goes to the build log; the resource
    report is extracted from it."""
    import torch.utils.cpp_extension as cpp_extension

    (build_dir / "lock").unlink(missing_ok=True)
    print(f"bnlstm_cuda: {what.format(build_dir)}", file=sys.stderr, flush=True)
    versioner = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
    getattr(versioner, "entries", {}).pop(CUDA_EXTENSION_NAME, None)
    log = build_dir / BUILD_LOG
    start = time.perf_counter()
    previous_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    # cpp_extension reads its module-level CUDA_HOME when it writes the build file.
    cpp_extension.CUDA_HOME = cuda_home()
    # Without a visible GPU torch cannot pick the architectures itself.
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    try:
        with _output_to(log), _ninja_on_path():
            cpp_extension.load(
                name=CUDA_EXTENSION_NAME,
                sources=[str(src / name) for name in CPU_SOURCES + CUDA_SOURCES],
                extra_cflags=cpu_cflags(),
                extra_ldflags=cpu_ldflags() + cuda_ldflags(),
                extra_cuda_cflags=cuda_cflags(),
                extra_include_paths=[str(src)] + cuda_include_paths(),
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=True,  # into the log: ptxas' report is part of it
            )
    except OSError as error:
        raise ExtensionUnavailable(
            f"the bnlstm_cuda CUDA extension built in {build_dir} does not load: {error}"
        ) from error
    except Exception as error:
        raise ExtensionUnavailable(
            f"building the bnlstm_cuda CUDA extension failed: {error}\n{_tail(log)}"
        ) from error
    finally:
        if previous_archs is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous_archs
        if verbose and log.is_file():
            sys.stderr.write(log.read_text(errors="replace"))
    report = resource_report(log.read_text(errors="replace"))
    if report:  # ninja recompiled the kernels (otherwise the report of the build before stays)
        (build_dir / RESOURCE_REPORT).write_text(report)
    print(f"bnlstm_cuda: CUDA extension ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr file descriptors (the compiler's output that
    ninja passes through) to `path` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def resource_report(log: str) -> str:
    """ptxas' resource lines of the step kernels and their helpers from a build log: per
    kernel and architecture, registers, barriers, shared memory, stack frame and spills."""
    lines, kernel, frame = [], None, ""
    for line in log.splitlines():
        line = line.strip()
        if "Compiling entry function" in line:
            name = line.split("'")[1] if "'" in line else line
            arch = line.rsplit("for ", 1)[-1].strip("' ")
            kernel, frame = f"{_demangle(name)} [{arch}]", ""
        elif kernel and "stack frame" in line:
            frame = line
        elif kernel and line.startswith("ptxas info    : Used"):
            lines.append(f"{kernel}: {line.replace('ptxas info    : ', '')}; {frame}")
            kernel = None
    return "\n".join(lines) + ("\n" if lines else "")


def _demangle(name: str) -> str:
    """A readable kernel name: bnlstm_fwd_step_kernel<float, 8, true> from its mangled form
    (c++filt where there is one)."""
    tool = shutil.which("c++filt")
    if tool:
        import subprocess

        result = subprocess.run([tool, name], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            text = result.stdout.strip()
            return text.replace("bnlstm::(anonymous namespace)::", "")
    return name


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
    parser.add_argument("--cuda", action="store_true",
                        help="build the CUDA-enabled extension (CUDA build of torch and nvcc; no GPU needed) "
                             "and write ptxas' resource report to benchmarks/results/cuda_resource_usage.txt")
    parser.add_argument("--triton", action="store_true",
                        help="compile the Triton kernels for sm_90 (no GPU needed) and write their resource "
                             "report to benchmarks/results/triton_resource_usage.txt (bnlstm_cuda/triton_compile.py)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    parser.add_argument("--capabilities", action="store_true",
                        help="print the vector capabilities this CPU runs (values of BNLSTM_CPU_CAPABILITY)")
    args = parser.parse_args(argv)
    if args.capabilities:
        print(" ".join(runnable_cpu_capabilities()))
        return 0
    if args.triton:
        from .triton_compile import main as triton_main

        return triton_main([])
    if args.cuda:
        return _main_cuda(args.verbose)
    try:
        where = load_cpu_extension(verbose=args.verbose)
    except ExtensionUnavailable as error:
        print(error, file=sys.stderr)
        return 1
    print(f"CPU extension ({cpu_capability()} vector code) built and loaded from {where}")
    return 0


def _main_cuda(verbose: bool) -> int:
    start = time.perf_counter()
    try:
        where = load_cuda_extension(verbose=verbose)
    except ExtensionUnavailable as error:
        print(error, file=sys.stderr)
        return 1
    print(f"CUDA extension (architectures {cuda_arch_list()}) built and loaded from {where} "
          f"in {time.perf_counter() - start:.0f} s")
    report = where / RESOURCE_REPORT
    results = PACKAGE_DIR.parent / "benchmarks" / "results"
    if report.is_file() and results.is_dir():
        import torch

        target = results / "cuda_resource_usage.txt"
        header = (f"# ptxas resource usage of the CUDA kernels (csrc/recurrent_cuda.cu), nvcc flags "
                  f"{' '.join(cuda_cflags())}, architectures {cuda_arch_list()}, torch {torch.__version__}\n")
        target.write_text(header + report.read_text())
        print(f"resource report: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
