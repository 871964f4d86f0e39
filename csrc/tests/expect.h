// The C++ unit tests' one assertion: expect(condition, what) reports a failed check on
// stderr and counts it; main returns failures == 0.
#pragma once

#include <cstdio>

namespace bnlstm_test {

inline int failures = 0;

inline void expect(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace bnlstm_test
