"""Build robustness (bnlstm_cuda/build.py): a broken build cache is detected and rebuilt, a
missing tool or an unusable cache gives a message that says what to do, a complete build
loads without a compiler.

Concurrent first use is tested in test_cpu_backend.py (test_concurrent_first_use_builds_once).
The end-to-end tests here start from a copy of this checkout's complete build, so only one
compiles (about a minute) and a few link the library again (seconds); each runs in a
subprocess, since a process can load the operators only once. A read-only cache, ninja off
PATH, a cache that others can write or own, and umask 000 are tested too.
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


# Makes the cache a read-only mount for the script after it: anything that would create,
# change or open for writing a path under BNLSTM_CACHE_DIR fails as on such a mount (also
# where the tests run as root, whom chmod does not stop).
READ_ONLY_CACHE = textwrap.dedent(
    """
    import os, sys
    CACHE = os.path.realpath(os.environ["BNLSTM_CACHE_DIR"])
    WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    CHANGES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "os.chown", "os.truncate",
               "os.link", "os.symlink", "os.utime", "shutil.rmtree"}

    def inside(path):
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        path = os.path.realpath(os.fsdecode(path))
        return path == CACHE or path.startswith(CACHE + os.sep)

    def read_only(event, args):
        if (event == "open" and inside(args[0]) and args[2] & WRITES) or (event in CHANGES and inside(args[0])):
            print("refused", event, args[0], file=sys.stderr)
            raise OSError(30, "Read-only file system", args[0])

    sys.addaudithook(read_only)
    """
)


def make_read_only(root):
    for directory, _, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(directory, name), 0o444)
        os.chmod(directory, 0o555)


def run_on_read_only_mount(cache, directory):
    """SCRIPT in a subprocess with the cache read-only (and writes under it refused)."""
    make_read_only(cache)
    try:
        return run_python(READ_ONLY_CACHE + SCRIPT, cache, timeout=300)
    finally:
        cache.chmod(0o755)
        directory.chmod(0o755)


def test_complete_cache_on_a_read_only_mount_loads(cache_copy):
    """A complete build loads without creating, changing or locking anything in the cache
    (a container image, a shared read-only volume)."""
    cache, directory = cache_copy
    result = run_on_read_only_mount(cache, directory)
    assert result.returncode == 0, result.stderr
    assert "shape (5, 2, 4)" in result.stdout
    assert "refused" not in result.stderr
    assert not (directory / build.LOCK_NAME).exists()


def test_incomplete_cache_on_a_read_only_mount_says_what_to_set(cache_copy):
    """What must be built needs the lock, so a read-only cache without a complete build is
    an error that says what to set."""
    cache, directory = cache_copy
    (directory / build.COMPLETE_STAMP).unlink()
    result = run_on_read_only_mount(cache, directory)
    assert result.returncode != 0
    assert f"cannot use the build cache {directory}: " in result.stderr
    assert "set BNLSTM_CACHE_DIR to a writable directory" in result.stderr


@pytest.fixture
def path_without_ninja(tmp_path):
    """PATH as it is for a virtual environment's python run by path, without activating it,
    on a machine with no ninja of its own: the directory of sys.executable left out, and
    every other directory that holds a ninja replaced by a copy (of links) without it."""
    entries = []
    for index, entry in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        directory = Path(entry)
        if not directory.is_dir() or directory.resolve() == Path(sys.executable).parent.resolve():
            continue
        if shutil.which("ninja", path=entry):
            mirror = tmp_path / f"path-{index}"
            mirror.mkdir()
            for tool in directory.iterdir():
                if tool.name not in ("ninja", "ninja.exe"):
                    (mirror / tool.name).symlink_to(tool)
            entry = str(mirror)
        entries.append(entry)
    path = os.pathsep.join(entries)
    assert shutil.which("ninja", path=path) is None and shutil.which("c++", path=path)
    return path


def test_ninja_beside_python_or_in_its_package_is_used_off_path(path_without_ninja, monkeypatch, tmp_path):
    """missing_tools() finds the ninja installed with the package when PATH lacks it, and
    leaves PATH as it was."""
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", path_without_ninja)
    assert build.ninja_directory() in (Path(sys.executable).parent, Path(ninja.BIN_DIR))
    assert build.missing_tools() is None
    assert os.environ["PATH"] == path_without_ninja
    # Without one beside python, the ninja package's binary.
    package_bin = tmp_path / "package-bin"
    package_bin.mkdir()
    (package_bin / "ninja").symlink_to(shutil.which("ninja", path=str(build.ninja_directory())))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-ninja-here" / "python"))
    monkeypatch.setattr(ninja, "BIN_DIR", str(package_bin))
    assert build.ninja_directory() == package_bin
    assert build.missing_tools() is None


def test_build_runs_the_ninja_beside_python_off_path(cache_copy, path_without_ninja):
    """A virtual environment's python run by path (IDEs, cron, systemd, containers) builds:
    here, links the library again."""
    cache, directory = cache_copy
    (directory / build.COMPLETE_STAMP).unlink()
    (directory / build.LIBRARY_FILE).unlink()
    result = run_python(SCRIPT, cache, timeout=300, PATH=path_without_ninja)
    assert result.returncode == 0, result.stderr
    assert "shape (5, 2, 4)" in result.stdout
    assert "completing the build of the CPU extension" in result.stderr
    assert (directory / build.COMPLETE_STAMP).read_text() == build._stamp_text(directory / build.LIBRARY_FILE)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="no POSIX owners and modes")
def test_cache_that_others_can_write_is_refused(cache_copy, monkeypatch):
    """A cache directory, library or stamp that group or others can write is refused, with
    the path and what to do; nothing is loaded."""
    cache, directory = cache_copy
    loads = []
    monkeypatch.setenv("BNLSTM_CACHE_DIR", str(cache))
    monkeypatch.setattr(build, "_load_prebuilt", lambda: False)
    monkeypatch.setattr(build, "_load_library", loads.append)
    for path, mode in ((directory / build.LIBRARY_FILE, 0o777), (directory / build.COMPLETE_STAMP, 0o666),
                       (directory, 0o777), (cache, 0o777)):
        before = path.stat().st_mode
        path.chmod(mode)
        with pytest.raises(build.ExtensionUnavailable) as caught:
            build.load_cpu_extension()
        assert str(caught.value) == (
            f"refusing the build cache: {path} must not be writable by group or others, but its mode is "
            f"{mode:04o}; run `chmod go-w {path}` or set BNLSTM_CACHE_DIR to a directory of your own")
        path.chmod(before)
    assert loads == []
    build.load_cpu_extension()
    assert loads == [directory / build.LIBRARY_FILE]


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="no POSIX owners and modes")
def test_cache_owned_by_another_user_is_refused(cache_copy, monkeypatch):
    """A cache that another user owns is refused; one that root owns is not (a container
    image's cache, used by any user)."""
    cache, directory = cache_copy
    loads = []
    monkeypatch.setenv("BNLSTM_CACHE_DIR", str(cache))
    monkeypatch.setattr(build, "_load_prebuilt", lambda: False)
    monkeypatch.setattr(build, "_load_library", loads.append)
    user = os.geteuid()
    library = directory / build.LIBRARY_FILE
    if user == 0:
        monkeypatch.setattr(os, "geteuid", lambda: 4242)  # a user, in a cache that root owns
        build.load_cpu_extension()
        assert loads == [library]
        monkeypatch.setattr(os, "geteuid", lambda: 0)
        os.chown(library, 4242, -1)
        refused, owner, me = library, 4242, 0
    else:
        monkeypatch.setattr(os, "geteuid", lambda: user + 1)
        refused, owner, me = cache, user, user + 1
    with pytest.raises(build.ExtensionUnavailable) as caught:
        build.load_cpu_extension()
    assert str(caught.value) == (
        f"refusing the build cache: {refused} must be owned by this user (uid {me}) or root, not by uid {owner}; "
        "delete it or set BNLSTM_CACHE_DIR to a directory of your own")
    assert len(loads) == (1 if user == 0 else 0)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="no POSIX owners and modes")
def test_what_a_build_writes_is_private_under_umask_000(tmp_path, monkeypatch):
    """Under umask 000 the directories, the library and the stamp a build writes are not
    writable by group or others (and so load again); the umask is restored."""
    fake = FakeBuilds(monkeypatch, tmp_path / "cache", [None])
    previous = os.umask(0)
    try:
        build.load_cpu_extension()
        assert os.umask(0) == 0
    finally:
        os.umask(previous)
    for path in (tmp_path / "cache", fake.directory, fake.directory / build.LIBRARY_FILE,
                 fake.directory / build.COMPLETE_STAMP):
        assert path.stat().st_mode & 0o022 == 0, (path, oct(path.stat().st_mode))
    build.load_cpu_extension()
    assert len(fake.builds) == 1 and len(fake.loads) == 1


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="no POSIX owners and modes")
def test_library_linked_under_umask_000_is_private(cache_copy):
    cache, directory = cache_copy
    (directory / build.COMPLETE_STAMP).unlink()
    (directory / build.LIBRARY_FILE).unlink()
    environment = dict(os.environ, BNLSTM_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=environment, capture_output=True, text=True,
                            timeout=300, preexec_fn=lambda: os.umask(0))
    assert result.returncode == 0, result.stderr
    assert "completing the build of the CPU extension" in result.stderr
    for path in (directory / build.LIBRARY_FILE, directory / build.COMPLETE_STAMP):
        assert path.stat().st_mode & 0o022 == 0, (path, oct(path.stat().st_mode))
    result = run_python(SCRIPT, cache, timeout=300)
    assert result.returncode == 0, result.stderr


def test_build_has_no_linux_only_parts():
    """The cache lock is filelock's (flock, or LockFileEx on Windows), not fcntl; the CPU's
    capabilities come from torch, not /proc/cpuinfo."""
    import ast

    source = Path(build.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert "fcntl" not in imported and "filelock" in imported
    assert "/proc/cpuinfo" not in source


def test_cache_lock_is_exclusive_and_released_when_its_holder_dies(tmp_path):
    import filelock

    holder = textwrap.dedent(
        f"""
        import sys, time
        from bnlstm_cuda import build
        held = build._cache_lock(__import__("pathlib").Path({str(tmp_path)!r})).acquire()
        print("held", flush=True)
        time.sleep(600)
        """
    )
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", holder], env=environment, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        with pytest.raises(filelock.Timeout):
            build._cache_lock(tmp_path).acquire(timeout=0.2)
    finally:
        process.kill()
        process.wait()
    with build._cache_lock(tmp_path).acquire(timeout=30):
        assert (tmp_path / build.LOCK_NAME).is_file()


def test_threads_loading_at_once_build_once(tmp_path, monkeypatch):
    import threading
    import time

    fake = FakeBuilds(monkeypatch, tmp_path, [None, None])
    slow_build = fake.build

    def build_slowly(*args):
        time.sleep(0.5)
        slow_build(*args)

    monkeypatch.setattr(build, "_build_and_load", build_slowly)
    errors = []

    def load():
        try:
            build.load_cpu_extension()
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(fake.builds) == 1 and len(fake.loads) == 1  # the builder loads in build()
