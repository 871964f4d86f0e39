// The steps of a recurrence, each split over blocks of hidden units, in one parallel region.
//
// A region per step (at::parallel_for inside the time loop) costs its threads a fork and a
// join every step, a tenth of a small step's time (docs/CPU.md). Instead the threads open one
// region for the whole sequence and wait for each other between steps on a counter.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace bnlstm {

namespace detail {
inline void spin_pause() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}
}  // namespace detail

// Allocator of a block's own per-step buffers: each starts on a 128-byte boundary and
// spans whole 128-byte pairs of cache lines, so buffers that different threads write at
// every step never share a line, nor a pair the adjacent-line prefetcher fetches together.
// Where malloc packed two threads' small buffers into one line, the line moved between the
// cores at every step (docs/CPU.md).
template <typename T>
struct BlockAllocator {
  using value_type = T;
  static constexpr std::size_t kAlignment = 128;
  BlockAllocator() = default;
  template <typename U>
  BlockAllocator(const BlockAllocator<U>&) {}
  T* allocate(std::size_t n) {
    const std::size_t bytes = (n * sizeof(T) + kAlignment - 1) / kAlignment * kAlignment;
    return static_cast<T*>(::operator new(bytes, std::align_val_t(kAlignment)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(kAlignment)); }
  template <typename U>
  bool operator==(const BlockAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const BlockAllocator<U>&) const { return false; }
};

template <typename T>
using BlockVector = std::vector<T, BlockAllocator<T>>;

// How long a thread waits for a step's unstarted blocks before it runs them itself.
constexpr std::chrono::microseconds kTakeOverAfter{50};

// Calls task(step, block) for every step in [0, steps) and block in [0, blocks); every task
// of a step starts after every task of the step before has finished. Each thread runs the
// blocks at::parallel_for hands it, step after step, so a block's data stays in one core's
// cache. A thread that has waited kTakeOverAfter for a step runs the blocks of that step
// nobody has started: the loop completes however many threads the region really runs (one,
// when it is nested in another region) and in whatever order they start. An exception in a
// task stops every thread and reaches the caller.
//
// launch(count, body) must call body(begin, end) on ranges that cover [0, count) once; by
// default at::parallel_for with grain 1 (tests pass launchers that start the ranges one
// after another).
template <typename Task, typename Launch>
void run_steps(int64_t steps, int64_t blocks, const Task& task, const Launch& launch) {
  if (blocks == 1) {
    for (int64_t step = 0; step < steps; ++step) task(step, 0);
    return;
  }
  // next_step[k].value: the first step whose block k nobody has claimed. Each on lines of
  // its own: its owner claims it at every step.
  struct alignas(BlockAllocator<int64_t>::kAlignment) Claim {
    std::atomic<int64_t> value{0};
  };
  const std::unique_ptr<Claim[]> next_step(new Claim[blocks]);
  alignas(BlockAllocator<int64_t>::kAlignment) std::atomic<int64_t> finished{0};  // tasks finished, over all steps
  std::atomic<bool> failed{false};
  launch(blocks, [&](int64_t k0, int64_t k1) {
    const auto try_run = [&](int64_t step, int64_t k) {
      int64_t expected = step;
      if (!next_step[k].value.compare_exchange_strong(expected, step + 1, std::memory_order_acq_rel)) return;
      try {
        task(step, k);
      } catch (...) {
        failed.store(true, std::memory_order_release);
        throw;
      }
      finished.fetch_add(1, std::memory_order_acq_rel);
    };
    for (int64_t step = 0; step < steps; ++step) {
      for (int64_t k = k0; k < k1; ++k) try_run(step, k);
      const int64_t goal = (step + 1) * blocks;
      const auto start = std::chrono::steady_clock::now();
      bool taking_over = false;
      for (int64_t spins = 1; finished.load(std::memory_order_acquire) < goal; ++spins) {
        if (failed.load(std::memory_order_acquire)) return;
        if (taking_over) {
          for (int64_t k = 0; k < blocks; ++k) try_run(step, k);
          std::this_thread::yield();  // the threads we wait for may share our core
        } else {
          detail::spin_pause();
          if (spins % 64 == 0) taking_over = std::chrono::steady_clock::now() - start > kTakeOverAfter;
        }
      }
    }
  });
}

template <typename Task>
void run_steps(int64_t steps, int64_t blocks, const Task& task) {
  run_steps(steps, blocks, task, [](int64_t count, const auto& body) { at::parallel_for(0, count, 1, body); });
}

}  // namespace bnlstm
