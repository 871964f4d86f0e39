"""How long one cache line takes to go from one core to another and back.

On a cloud VM the host may move the virtual CPUs: two of them can share a physical core, sit
on cores of one CCX (one L3), or on different dies, and the placement changes from one minute
to the next. A recurrence split over threads hands h_t and its gradient from core to core at
every step, so its two-thread timings follow the placement (docs/CPU.md, "Two threads on a VM
whose cores move"). Run this before and after a benchmark to see which placement it met:

    python -m benchmarks.core_round_trip --seconds 20

prints, every 0.3 s, the mean round trip in nanoseconds of a line bounced between two threads
pinned to the two CPUs, then the share of samples in each placement band.
"""

from __future__ import annotations

import argparse
import functools
import os

# Two threads pinned to two CPUs take turns incrementing one atomic counter; a sample is the
# mean time of `trips` round trips.
_SOURCE = r"""
#include <torch/extension.h>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>
#include <pthread.h>
#include <sched.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {
void spin_pause() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}
void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  TORCH_CHECK(pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0, "cannot pin a thread to CPU ", cpu);
}
}  // namespace

std::vector<double> round_trips(int64_t first_cpu, int64_t second_cpu, int64_t samples, int64_t trips,
                                double gap_seconds) {
  alignas(128) std::atomic<int64_t> turn{0};
  std::atomic<bool> stop{false};
  // The calling thread is pinned for the measurement only.
  cpu_set_t caller;
  TORCH_CHECK(pthread_getaffinity_np(pthread_self(), sizeof(caller), &caller) == 0, "cannot read this thread's CPUs");
  std::thread other([&] {
    pin(second_cpu);
    for (int64_t value = 1;; value += 2) {
      while (turn.load(std::memory_order_acquire) != value) {
        if (stop.load(std::memory_order_relaxed)) return;
        spin_pause();
      }
      turn.store(value + 1, std::memory_order_release);
    }
  });
  // However the measurement ends: the other thread stopped, the caller's CPUs given back.
  struct Teardown {
    std::atomic<bool>& stop;
    std::thread& other;
    const cpu_set_t& caller;
    ~Teardown() {
      stop = true;
      other.join();
      pthread_setaffinity_np(pthread_self(), sizeof(caller), &caller);
    }
  } teardown{stop, other, caller};
  pin(first_cpu);
  std::vector<double> result;
  int64_t value = 0;
  for (int64_t s = 0; s < samples; ++s) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < trips; ++i, value += 2) {
      turn.store(value + 1, std::memory_order_release);
      while (turn.load(std::memory_order_acquire) != value + 2) spin_pause();
    }
    result.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count() /
                     double(trips));
    std::this_thread::sleep_for(std::chrono::duration<double>(gap_seconds));
  }
  return result;
}
"""

# Round-trip bands (ns) of the placements seen on 2-vCPU AMD EPYC VMs (docs/CPU.md).
BANDS = ((0.0, 45.0, "one physical core"), (45.0, 150.0, "one L3"), (150.0, float("inf"), "apart"))


@functools.lru_cache(maxsize=None)
def _extension():
    from torch.utils.cpp_extension import load_inline

    return load_inline(name="bnlstm_core_round_trip", cpp_sources=[_SOURCE], functions=["round_trips"],
                       extra_cflags=["-O2"], verbose=False)


def round_trips(seconds: float = 10.0, cpus: tuple[int, int] = (0, 1), gap: float = 0.3,
                trips: int = 100_000) -> list[float]:
    """Mean round trip (ns) of a line between `cpus`, one sample every `gap` seconds for about
    `seconds` (each sample takes about trips * 0.1-0.7 us on top of the gap)."""
    available = os.sched_getaffinity(0)
    missing = [cpu for cpu in cpus if cpu not in available]
    if len(set(cpus)) != 2 or missing:
        raise ValueError(f"cpus must be two different CPUs this process may run on ({sorted(available)}), got {cpus}")
    samples = max(1, int(seconds / (gap + trips * 1e-7)))
    return list(_extension().round_trips(cpus[0], cpus[1], samples, trips, gap))


def placement_shares(samples: list[float]) -> dict[str, float]:
    """The share of `samples` in each band of BANDS."""
    return {name: sum(low <= s < high for s in samples) / len(samples) for low, high, name in BANDS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cpus", default="0,1", help="the two CPUs, comma-separated (default 0,1)")
    args = parser.parse_args(argv)
    cpus = tuple(int(c) for c in args.cpus.split(","))
    samples = round_trips(args.seconds, cpus)  # type: ignore[arg-type]
    print(" ".join(f"{s:.0f}" for s in samples))
    shares = placement_shares(samples)
    print("round trip (ns), median %.0f; " % sorted(samples)[len(samples) // 2]
          + ", ".join(f"{name} {share:.0%}" for name, share in shares.items()))


if __name__ == "__main__":
    main()
