"""Build robustness (bnlstm_cuda/build.py): a broken build cache is detected and rebuilt, a
missing tool or an unusable cache gives a message that says what to do, a complete build
loads without a compiler.

Concurrent first use is tested in test_cpu_backend.py (test_concurrent_first_use_builds_once).
The end-to-end tests here start from a copy of this checkout's complete build, so only the
last one compiles (about a minute); each runs in a subprocess, since a process can load
the operators only once.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bnlstm_cuda
from bnlstm_cuda import build
from bnlstm_cuda.ops import ensure_loaded

REPO = Path(bnlstm_cuda.__file__).resolve().parents[1]
SCRIPT = textwrap.dedent(
    """
    import torch
    from bnlstm_cuda import BNLSTM
    out, _ = BNLSTM(3, 4, backend="cpu")(torch.randn(5, 2, 3))
    print("shape", tuple(out.shape))
    """
)


def run_python(script, cache, timeout=600, **env):
    environment = dict(os.environ, BNLSTM_CACHE_DIR=str(cache), PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def cache_copy(tmp_path):
    """A cache directory holding a copy (times kept, so ninja sees it up to date) of the
    complete build this process uses; returns (cache root, build directory)."""
    if list(build.PACKAGE_DIR.glob(f"{build.PREBUILT_NAME}*.so")):
        pytest.skip("a library built into the package by pip is loaded first; the cache is not used")
    ensure_loaded()
    source = build.cache_dir() / f"cpu-{build.source_key()}"
    assert (source / build.COMPLETE_STAMP).is_file(), f"{source} holds no complete build"
    target = tmp_path / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(build.LOCK_NAME, "lock"))
    return tmp_path, target


def test_truncated_library_and_stale_lock_are_rebuilt(cache_copy):
    """A library cut short (dlopen of it dies with SIGBUS) is caught by the stamp's
    checksum before loading and linked again; torch's lock file left by a killed builder
    (cpp_extension.load would wait on it forever) is removed."""
    cache, directory = cache_copy
    library = directory / build.LIBRARY_FILE
    with open(library, "r+b") as handle:
        handle.truncate(library.stat().st_size // 3)
    (directory / "lock").touch()
    result = run_python(SCRIPT, cache, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "shape (5, 2, 4)" in result.stdout
    assert "is missing or damaged" in result.stderr
    assert "completing the build of the CPU extension" in result.stderr
    assert "recompiling" not in result.stderr  # the object files were reused: a link only
    assert not (directory / "lock").exists()
    assert (directory / build.COMPLETE_STAMP).read_text() == build._stamp_text(library)


def test_unfinished_build_with_damaged_object_is_rebuilt_from_scratch(cache_copy):
    """A build directory left by a killed build: no stamp, no library, torch's stale lock
    file and an object file ninja believes up to date but which is cut short. Linking
    fails, so the directory is emptied and everything compiles again (about a minute)."""
    cache, directory = cache_copy
    (directory / build.COMPLETE_STAMP).unlink()
    (directory / build.LIBRARY_FILE).unlink()
    (directory / "lock").touch()
    damaged = directory / "layer.o"
    times = damaged.stat()
    with open(damaged, "r+b") as handle:
        handle.truncate(4096)
    os.utime(damaged, ns=(times.st_atime_ns, times.st_mtime_ns))  # ninja cannot tell
    result = run_python(SCRIPT, cache)
    assert result.returncode == 0, result.stderr
    assert "shape (5, 2, 4)" in result.stdout
    assert "building in it failed" in result.stderr and "recompiling the CPU extension" in result.stderr
    assert (directory / build.COMPLETE_STAMP).is_file()
    assert damaged.stat().st_size > 4096


def test_missing_compiler_in_a_fresh_cache(tmp_path):
    """backend="cpu" raises naming the compiler and what to install; "auto" warns once and
    runs the reference."""
    script = textwrap.dedent(
        """
        import warnings
        import torch
        from bnlstm_cuda import BNLSTM
        x = torch.randn(5, 2, 3)
        try:
            BNLSTM(3, 4, backend="cpu")(x)
        except RuntimeError as error:
            print("cpu:", error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = BNLSTM(3, 4, backend="auto")(x)
            out, _ = BNLSTM(3, 4, backend="auto")(x)
        print("auto:", tuple(out.shape), [str(w.message) for w in caught])
        """
    )
    result = run_python(script, tmp_path, timeout=300, CXX="no-such-compiler-bnlstm")
    assert result.returncode == 0, result.stderr
    assert (
        'cpu: backend="cpu" is unavailable: cannot build the bnlstm_cuda C++ extension: no C++ compiler: '
        "`no-such-compiler-bnlstm` is not on PATH (install g++ or clang, or set CXX)"
    ) in result.stdout
    auto = result.stdout.split("auto:")[1]
    assert "(5, 2, 4)" in auto and auto.count("slow reference implementation") == 1
    assert not list(tmp_path.glob("cpu-*/*.so"))


def test_missing_ninja_is_reported(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert build.missing_tools() == "ninja is not installed (pip install ninja)"


def test_unusable_cache_directory_says_what_to_set(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("BNLSTM_CACHE_DIR", str(blocker))
    monkeypatch.setattr(build, "_load_prebuilt", lambda: False)
    with pytest.raises(build.ExtensionUnavailable, match="cannot use the build cache .*set BNLSTM_CACHE_DIR to a writable"):
        build.load_cpu_extension()


class FakeBuilds:
    """Stands in for compiling and loading, to test the cache logic without a compiler:
    each build call pops an outcome (an error, or None: write a library), loads record."""

    def __init__(self, monkeypatch, tmp_path, outcomes):
        self.outcomes = list(outcomes)
        self.builds, self.loads = [], []
        monkeypatch.setenv("BNLSTM_CACHE_DIR", str(tmp_path))
        monkeypatch.setattr(build, "_load_prebuilt", lambda: False)
        monkeypatch.setattr(build, "missing_tools", lambda: None)
        monkeypatch.setattr(build, "_build_and_load", self.build)
        monkeypatch.setattr(build, "_load_library", self.loads.append)
        self.directory = tmp_path / f"cpu-{build.source_key()}"

    def build(self, build_dir, src, verbose, what):
        self.builds.append(what)
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome
        (build_dir / build.LIBRARY_FILE).write_bytes(b"\x7fELF library")


def test_failed_build_over_leftovers_is_retried_once_from_an_empty_directory(tmp_path, monkeypatch, capsys):
    fake = FakeBuilds(monkeypatch, tmp_path, [build.ExtensionUnavailable("link failed: layer.o truncated"), None])
    fake.directory.mkdir(parents=True)
    (fake.directory / "layer.o").write_bytes(b"partial")
    (fake.directory / "sub").mkdir()
    (fake.directory / "sub" / "x.o").write_bytes(b"partial")
    assert build.load_cpu_extension() == fake.directory
    assert len(fake.builds) == 2 and "recompiling" in fake.builds[1]
    assert sorted(p.name for p in fake.directory.iterdir()) == sorted(
        [build.LOCK_NAME, build.LIBRARY_FILE, build.COMPLETE_STAMP]
    )
    assert "building in it failed (link failed: layer.o truncated); deleting" in capsys.readouterr().err


def test_failed_build_in_a_fresh_directory_is_not_retried(tmp_path, monkeypatch):
    fake = FakeBuilds(monkeypatch, tmp_path, [build.ExtensionUnavailable("error: expected ';'"), None])
    with pytest.raises(build.ExtensionUnavailable, match="expected ';'"):
        build.load_cpu_extension()
    assert len(fake.builds) == 1 and "first use only" in fake.builds[0]
    assert not (fake.directory / build.COMPLETE_STAMP).exists()


def test_complete_build_loads_without_tools_and_damage_is_caught(tmp_path, monkeypatch, capsys):
    fake = FakeBuilds(monkeypatch, tmp_path, [None, None])
    build.load_cpu_extension()
    assert len(fake.builds) == 1
    # Complete: loads directly, without asking for a compiler or ninja.
    monkeypatch.setattr(build, "missing_tools", lambda: "no C++ compiler")
    build.load_cpu_extension()
    assert len(fake.builds) == 1 and fake.loads == [fake.directory / build.LIBRARY_FILE]
    # A changed library is not loaded; without tools that is an error saying so.
    (fake.directory / build.LIBRARY_FILE).write_bytes(b"\x7fELF librar")
    with pytest.raises(build.ExtensionUnavailable, match="no C\\+\\+ compiler"):
        build.load_cpu_extension()
    assert len(fake.loads) == 1
    assert "is missing or damaged" in capsys.readouterr().err
    # With tools it builds again.
    monkeypatch.setattr(build, "missing_tools", lambda: None)
    build.load_cpu_extension()
    assert len(fake.builds) == 2 and "completing the build" in fake.builds[1]


def test_library_that_does_not_load_is_rebuilt(tmp_path, monkeypatch, capsys):
    fake = FakeBuilds(monkeypatch, tmp_path, [None, None])
    build.load_cpu_extension()

    def fail_once(path):
        monkeypatch.setattr(build, "_load_library", fake.loads.append)
        raise OSError("undefined symbol: _ZN2at4_ops")

    monkeypatch.setattr(build, "_load_library", fail_once)
    build.load_cpu_extension()
    assert len(fake.builds) == 2
    assert "does not load (undefined symbol" in capsys.readouterr().err


def test_prebuilt_library_that_does_not_load_falls_back_to_the_cache(tmp_path, monkeypatch, capsys):
    broken = tmp_path / f"{build.PREBUILT_NAME}.so"
    broken.write_bytes(b"not a library")
    monkeypatch.setattr(build, "PACKAGE_DIR", tmp_path)
    assert build._load_prebuilt() is False
    assert "does not load" in capsys.readouterr().err


@pytest.mark.skipif(not build.torch_uses_openmp(), reason="torch's parallel backend is not OpenMP")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: nothing to run in parallel")
def test_parallel_loops_of_the_extension_use_torchs_threads(threads):
    # at::parallel_for is inlined from torch's headers: a build without -fopenmp runs every
    # loop on one thread and nothing else notices (results are the same, only slower).
    from bnlstm_cuda import ops

    threads(2)
    assert ops.parallel_threads() == 2
    threads(1)
    assert ops.parallel_threads() == 1


def test_cpu_capability_switch_chooses_the_vector_code(monkeypatch):
    """BNLSTM_CPU_CAPABILITY picks at::vec's code path (its flags, so its own cache key);
    unset, the capability torch's own CPU kernels use; a value that is not a capability, or
    one this CPU cannot run, is refused naming the variable."""
    monkeypatch.setattr(build, "runnable_cpu_capabilities", lambda: ["avx512", "avx2", "default"])
    keys = set()
    for capability, define in (("avx512", "-DCPU_CAPABILITY_AVX512"), ("avx2", "-DCPU_CAPABILITY_AVX2"),
                               ("default", None)):
        monkeypatch.setenv("BNLSTM_CPU_CAPABILITY", capability)
        flags = build.cpu_cflags()
        assert build.cpu_capability() == capability
        assert [f for f in flags if f.startswith("-DCPU_CAPABILITY_")] == ([define] if define else [])
        keys.add(build.source_key())
    assert len(keys) == 3
    monkeypatch.setenv("BNLSTM_CPU_CAPABILITY", "sse2")
    with pytest.raises(build.ExtensionUnavailable, match="BNLSTM_CPU_CAPABILITY must be one of avx512, avx2, default"):
        build.cpu_cflags()
    monkeypatch.setattr(build, "runnable_cpu_capabilities", lambda: ["avx2", "default"])
    monkeypatch.setenv("BNLSTM_CPU_CAPABILITY", "avx512")
    with pytest.raises(build.ExtensionUnavailable, match="avx512, but this CPU runs only avx2, default"):
        build.cpu_cflags()
    monkeypatch.delenv("BNLSTM_CPU_CAPABILITY")
    import torch

    assert build.cpu_capability() == {"AVX512": "avx512", "AVX2": "avx2"}.get(
        torch.backends.cpu.get_cpu_capability(), "default")


def test_loaded_extension_has_the_chosen_vector_code():
    """The library this process runs was compiled for cpu_capability(): what makes a run
    under BNLSTM_CPU_CAPABILITY (.ci/run runs the CPU tests under each) test that path."""
    import torch

    if list(build.PACKAGE_DIR.glob(f"{build.PREBUILT_NAME}*.so")):
        pytest.skip("a library built into the package by pip is loaded first")
    ensure_loaded()
    assert torch.ops.bnlstm.cpu_vector_capability() == build.cpu_capability()
    assert build.cpu_capability() in build.runnable_cpu_capabilities()
