// Defines the relay's metrics: latency histograms, the metrics record and its Prometheus form.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace pop {

// A latency distribution: counts per fixed bucket (upper bounds in microseconds, 1-2-5 steps from
// 1 us to 10 s, then +Inf), their sum and count. A value type.
struct latency_histogram {
  static constexpr std::array<std::int64_t, 22> bounds_us{
      1,       2,       5,         10,        20,        50,        100,    200,
      500,     1'000,   2'000,     5'000,     10'000,    20'000,    50'000, 100'000,
      200'000, 500'000, 1'000'000, 2'000'000, 5'000'000, 10'000'000};
  std::array<std::uint64_t, bounds_us.size() + 1> counts{};  // last: above the largest bound
  std::uint64_t count = 0;
  std::int64_t sum_us = 0;

  // The upper bound (us) of the bucket holding quantile `q` in [0, 1]; 0 if empty, -1 if it lies
  // above the largest bound.
  std::int64_t quantile_us(double q) const;
};

namespace detail {
// A histogram that many threads may record into; snapshot() reads it without locking.
class atomic_histogram {
 public:
  void record(std::chrono::microseconds latency);
  // Adds every value recorded in `local` (one thread's, gathered without atomics) and empties it.
  void add(latency_histogram& local);
  latency_histogram snapshot() const;

 private:
  std::array<std::atomic<std::uint64_t>, latency_histogram::bounds_us.size() + 1> counts_{};
  std::atomic<std::uint64_t> count_{0};
  std::atomic<std::int64_t> sum_us_{0};
};

// Records `latency` in `h` (one thread's histogram; see atomic_histogram::add).
void record_local(latency_histogram& h, std::chrono::microseconds latency);

// `value` escaped for a Prometheus label value (backslash, double quote, newline).
std::string prometheus_label(std::string_view value);
// Appends one Prometheus metric (HELP, TYPE and value) named `<prefix>_<name>` to `out`.
void append_metric(std::string& out, std::string_view prefix, std::string_view name,
                   std::string_view type, std::string_view help, double value);
// Appends `h` as a Prometheus histogram in seconds named `<prefix>_<name>` to `out`.
void append_histogram(std::string& out, std::string_view prefix, std::string_view name,
                      std::string_view help, const latency_histogram& h);
}  // namespace detail

// What a relay reports: the outbox as one snapshot shows it, plus the relay's own counters since
// it was constructed (and its engine's flow control figures).
struct relay_metrics {
  std::uint64_t version = 0;          // the snapshot the outbox figures come from
  std::size_t pending = 0;            // messages in the outbox
  double oldest_pending_age_s = 0;    // age of the oldest pending message; 0 if none
  std::size_t dead_letters = 0;       // messages at the dead-letter path
  std::size_t in_flight = 0;          // publishes awaiting the sink now
  std::uint64_t published = 0;        // publishes the sink acknowledged
  std::uint64_t delivered = 0;        // acknowledged messages removed from the outbox
  std::uint64_t retried = 0;          // failed attempts recorded for a later retry
  std::uint64_t dead_lettered = 0;    // messages moved to the dead-letter path
  std::uint64_t clears = 0;           // transactions that recorded outcomes
  std::uint64_t clear_conflicts = 0;  // such transactions that lost a race and were redone
  std::uint64_t spins = 0;         // times the relay looked for commits instead of sleeping (spin)
  std::uint64_t spin_catches = 0;  // such times a commit came before the spin ended
  // Flow control: whether this relay holds its engine's pace now; and, from engine::pacing() (the
  // engine's figures, the same in every relay of one engine, not this relay's own), its processes
  // waiting for a relay's clears now, that waited so far, and whose wait timed out; stalled: a
  // wait timed out and none waits until a relay removes messages again.
  bool holding_pace = false;
  std::size_t pace_waiting = 0;
  std::uint64_t paced = 0;
  std::uint64_t pace_timed_out = 0;
  bool pace_stalled = false;
  latency_histogram publish_latency{};            // from the start of a publish to its outcome
  latency_histogram commit_to_publish_latency{};  // from a message's commit to its acknowledgement
};

// `m` in the Prometheus text exposition format, every name starting with `prefix`.
std::string to_prometheus(const relay_metrics& m, std::string_view prefix = "pop_relay");

}  // namespace pop
