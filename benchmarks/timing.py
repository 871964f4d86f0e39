"""How it is measured: wall or device time of many runs after warm-up, and peak memory.

GPU: triton.testing.do_bench where triton imports (device time, L2 flushed between runs),
else CUDA events. CPU: time.perf_counter around each call. Peak memory is the growth
during one call: CUDA allocator statistics on a GPU, the process's peak resident set on
Linux (the kernel's high-water mark, reset through /proc/self/clear_refs).
"""
from __future__ import annotations

import ctypes
import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

try:
    from triton.testing import do_bench
except ImportError:
    do_bench = None


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median, quartiles and extremes of the timed runs."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    runs: Optional[int]  # None where do_bench chose the number


def timer_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "time.perf_counter"
    return "triton.testing.do_bench" if do_bench is not None else "CUDA events"


def synchronized(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """fn, waiting for the device afterwards, for timers that read the host clock."""
    if device.type != "cuda":
        return fn

    def call() -> None:
        fn()
        torch.cuda.synchronize(device)

    return call


def time_call(
    fn: Callable[[], None], device: torch.device, *, warmup: int = 2, min_runs: int = 10,
    min_time_s: float = 0.5,
) -> Timing:
    """Time fn after `warmup` calls (which also absorb compilation and autotuning): at
    least `min_runs` runs and `min_time_s` seconds."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda" and do_bench is not None:
        low, q1, median, q3, high = do_bench(
            fn, rep=min_time_s * 1e3, quantiles=[0.0, 0.25, 0.5, 0.75, 1.0]
        )
        return Timing(median, q1, q3, low, high, None)
    return _timing(_times(fn, device, min_runs, min_time_s))


def time_interleaved(
    fns: Dict[str, Callable[[], None]], device: torch.device, *, warmup: int = 2, min_runs: int = 10,
    min_time_s: float = 0.5, rounds: Optional[int] = None,
) -> Dict[str, Timing]:
    """time_call for calls to be compared with each other, in alternation, so that a slow
    spell of a shared machine (on a VM it comes and goes within a second) falls on every
    call instead of on whichever ran during it. By default the calls alternate call by call,
    the order reversed every other turn, until each has `min_runs` runs and all together
    `min_time_s` seconds each. With `rounds`, they alternate in that many rounds of
    consecutive runs (each a round's share of `min_runs` and `min_time_s`; 1: one after the
    other). Each call's Timing is over all its runs. With triton's do_bench (device time on
    a GPU, which host load does not move) the calls are timed one after the other."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda" and do_bench is not None:
        return {name: time_call(fn, device, warmup=0, min_runs=min_runs, min_time_s=min_time_s)
                for name, fn in fns.items()}
    if rounds is None:
        return {name: _timing(found) for name, found in _alternating_times(fns, device, min_runs, min_time_s).items()}
    rounds = max(1, rounds)
    runs, seconds = math.ceil(min_runs / rounds), min_time_s / rounds
    times: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns)
    for round_index in range(rounds):
        for name in order if round_index % 2 == 0 else reversed(order):
            times[name] += _times(fns[name], device, runs, seconds)
    return {name: _timing(found) for name, found in times.items()}


def _alternating_times(
    fns: Dict[str, Callable[[], None]], device: torch.device, min_runs: int, min_time_s: float,
) -> Dict[str, List[float]]:
    """One run of each call per turn, in the reverse order every other turn."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns)
    start = time.perf_counter()
    turn = 0
    while turn < min_runs or time.perf_counter() - start < min_time_s * len(fns):
        for name in order if turn % 2 == 0 else reversed(order):
            times[name] += _times(fns[name], device, 1, 0.0)
        turn += 1
    return times


def _times(fn: Callable[[], None], device: torch.device, min_runs: int, min_time_s: float) -> List[float]:
    if device.type == "cuda":
        return _cuda_event_times(fn, min_runs, min_time_s)
    return _host_times(fn, min_runs, min_time_s)


def _timing(times: List[float]) -> Timing:
    low, q1, median, q3, high = np.percentile(times, [0, 25, 50, 75, 100]).tolist()
    return Timing(median, q1, q3, low, high, len(times))


def _host_times(fn: Callable[[], None], min_runs: int, min_time_s: float) -> List[float]:
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time_s:
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def _cuda_event_times(fn: Callable[[], None], min_runs: int, min_time_s: float) -> List[float]:
    events = []
    start = time.perf_counter()
    while len(events) < min_runs or time.perf_counter() - start < min_time_s:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        events.append((begin, end))
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) for begin, end in events]


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "growth of torch.cuda.max_memory_allocated over one call"
    if _can_reset_peak_rss():
        return "growth of the process's peak RSS (VmHWM, reset before) over one call"
    return "not measured (needs Linux /proc/self/clear_refs)"


def peak_memory_bytes(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    """Peak memory above what was in use before, during one call of fn (None: unknown)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not _can_reset_peak_rss():
        return None
    # Hand freed heap back to the kernel first, so reused pages count as growth again.
    gc.collect()
    _malloc_trim()
    _reset_peak_rss()
    before = _proc_status_bytes("VmRSS")
    fn()
    return _proc_status_bytes("VmHWM") - before


def _can_reset_peak_rss() -> bool:
    try:
        _reset_peak_rss()
    except OSError:
        return False
    return True


def _reset_peak_rss() -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0, proc(5)).
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"/proc/self/status has no {key}")


def _malloc_trim() -> None:
    libc = ctypes.CDLL(None)  # the process's own symbols, the C library's among them
    if hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)
