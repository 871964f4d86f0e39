// C++ unit test of run_steps (csrc/step_loop.h): every (step, block) task runs once, after
// every task of the step before; the loop finishes when its ranges run one after another
// (a thread takes over the blocks of one that has not started), nested in another parallel
// region, and passes a task's exception to the caller. BlockVector's buffers start on and
// fill whole 128-byte pairs of cache lines.
#include "step_loop.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "expect.h"

namespace {

using bnlstm_test::expect;
using bnlstm_test::failures;

// Runs steps x blocks tasks through `launch`; checks each ran once and in step order.
template <typename Launch>
void check_order(int64_t steps, int64_t blocks, const Launch& launch, const char* what) {
  std::vector<std::atomic<int>> runs(steps * blocks);
  std::atomic<int64_t> done{0};
  std::atomic<bool> in_order{true};
  bnlstm::run_steps(
      steps, blocks,
      [&](int64_t step, int64_t block) {
        // Every task of the previous steps has finished, none of a later one has started.
        if (done.load() < step * blocks) in_order = false;
        runs[step * blocks + block].fetch_add(1);
        done.fetch_add(1);
      },
      launch);
  bool once = true;
  for (const auto& count : runs) once = once && count.load() == 1;
  expect(once, what);
  expect(in_order.load(), what);
  expect(done.load() == steps * blocks, what);
}

}  // namespace

int main() {
  at::set_num_threads(3);
  const auto parallel = [](int64_t count, const auto& body) { at::parallel_for(0, count, 1, body); };
  // Ranges of one block, started one after another on this thread: the first must run
  // every block of every step (the others never start while it waits).
  const auto one_after_another = [](int64_t count, const auto& body) {
    for (int64_t k = 0; k < count; ++k) body(k, k + 1);
  };
  check_order(50, 3, parallel, "parallel: each task once, in step order");
  check_order(7, 5, parallel, "more blocks than threads");
  check_order(1, 4, parallel, "one step");
  check_order(0, 3, parallel, "no step");
  check_order(9, 1, parallel, "one block");
  check_order(20, 3, one_after_another, "ranges run one after another");
  at::parallel_for(0, 2, 1, [&](int64_t, int64_t) {
    check_order(10, 3, parallel, "nested in a parallel region");
  });

  bool thrown = false;
  try {
    bnlstm::run_steps(10, 3, [](int64_t step, int64_t block) {
      if (step == 4 && block == 1) throw std::runtime_error("task failed");
    });
  } catch (const std::exception& error) {
    thrown = std::string(error.what()).find("task failed") != std::string::npos;
  }
  expect(thrown, "a task's exception reaches the caller");

  // Buffers of every size, allocated one after another as the blocks' scratch is: none
  // starts inside another's 128-byte pair.
  std::vector<bnlstm::BlockVector<float>> buffers;
  for (int64_t size : {1, 3, 16, 31, 32, 33, 100, 1000}) buffers.emplace_back(size, 1.0f);
  const auto pair_of = [](const void* p) { return reinterpret_cast<uintptr_t>(p) / 128; };
  bool aligned = true, apart = true;
  for (size_t i = 0; i < buffers.size(); ++i) {
    aligned = aligned && reinterpret_cast<uintptr_t>(buffers[i].data()) % 128 == 0;
    for (size_t j = 0; j < buffers.size(); ++j) {
      if (i == j) continue;
      const float* first = buffers[j].data();
      const float* last = first + buffers[j].size() - 1;
      apart = apart && pair_of(buffers[i].data()) != pair_of(last) && pair_of(buffers[i].data()) != pair_of(first);
    }
  }
  expect(aligned, "a BlockVector starts on a 128-byte boundary");
  expect(apart, "no BlockVector starts in a pair of lines another one uses");

  if (failures == 0) std::printf("test_step_loop: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
