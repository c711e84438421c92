// Defines the benchmarks' shared latency helpers: wall-clock microseconds and percentile counters.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

namespace pop::bench {

// Microseconds since the Unix epoch, as outbox messages' created_at_us.
inline std::int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Sets counters p50_us and p99_us of `state` from the latencies `us` (sorted in place).
inline void report_latency(benchmark::State& state, std::vector<std::int64_t>& us) {
  if (us.empty()) return;
  std::sort(us.begin(), us.end());
  const auto at = [&](double q) {
    return static_cast<double>(
        us[std::min(us.size() - 1, static_cast<std::size_t>(q * static_cast<double>(us.size())))]);
  };
  state.counters["p50_us"] = at(0.50);
  state.counters["p99_us"] = at(0.99);
}

}  // namespace pop::bench
