// Defines pop::test::eventually: a bounded wait for a condition that offers nothing to wait on
// (a broker's state, other threads' counters), so a test that waits for something that never
// comes fails within its limit with a message instead of hanging until CTest's timeout.
#pragma once

#include <chrono>
#include <thread>

namespace pop::test {

// Checks `done` about every millisecond until it holds (true) or `limit` passes (false).
template <class Pred>
bool eventually(Pred done, std::chrono::milliseconds limit = std::chrono::seconds(30)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

}  // namespace pop::test
