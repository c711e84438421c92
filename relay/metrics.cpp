#include "pop/relay/metrics.hpp"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"

namespace pop {

std::int64_t latency_histogram::quantile_us(double q) const {
  if (count == 0) return 0;
  const double rank = std::clamp(q, 0.0, 1.0) * static_cast<double>(count);
  std::uint64_t seen = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    seen += counts[i];
    if (static_cast<double>(seen) >= rank && seen > 0) {
      return i < bounds_us.size() ? bounds_us[i] : -1;
    }
  }
  return -1;
}

namespace detail {

namespace {

// The bucket of a latency of `us` microseconds (negative counts as 0).
std::size_t bucket_of(std::int64_t us) {
  const auto it = std::lower_bound(latency_histogram::bounds_us.begin(),
                                   latency_histogram::bounds_us.end(), us);
  return static_cast<std::size_t>(it - latency_histogram::bounds_us.begin());
}

}  // namespace

void atomic_histogram::record(std::chrono::microseconds latency) {
  const std::int64_t us = std::max<std::int64_t>(latency.count(), 0);
  counts_[bucket_of(us)].fetch_add(1, std::memory_order_relaxed);
  sum_us_.fetch_add(us, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
}

void atomic_histogram::add(latency_histogram& local) {
  if (local.count == 0) return;
  for (std::size_t i = 0; i < counts_.size(); ++i) {
    if (local.counts[i] != 0) counts_[i].fetch_add(local.counts[i], std::memory_order_relaxed);
  }
  sum_us_.fetch_add(local.sum_us, std::memory_order_relaxed);
  count_.fetch_add(local.count, std::memory_order_relaxed);
  local = latency_histogram{};
}

void record_local(latency_histogram& h, std::chrono::microseconds latency) {
  const std::int64_t us = std::max<std::int64_t>(latency.count(), 0);
  ++h.counts[bucket_of(us)];
  h.sum_us += us;
  ++h.count;
}

latency_histogram atomic_histogram::snapshot() const {
  latency_histogram h;
  for (std::size_t i = 0; i < counts_.size(); ++i) {
    h.counts[i] = counts_[i].load(std::memory_order_relaxed);
    h.count += h.counts[i];
  }
  h.sum_us = sum_us_.load(std::memory_order_relaxed);
  return h;
}

std::string prometheus_label(std::string_view value) {
  std::string out;
  for (const char c : value) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

void append_metric(std::string& out, std::string_view prefix, std::string_view name,
                   std::string_view type, std::string_view help, double value) {
  const std::string full = absl::StrCat(detail::to_absl(prefix), "_", detail::to_absl(name));
  absl::StrAppend(&out, "# HELP ", full, " ", detail::to_absl(help), "\n# TYPE ", full, " ",
                  detail::to_absl(type), "\n", full, " ", value, "\n");
}

void append_histogram(std::string& out, std::string_view prefix, std::string_view name,
                      std::string_view help, const latency_histogram& h) {
  const std::string full = absl::StrCat(detail::to_absl(prefix), "_", detail::to_absl(name));
  absl::StrAppend(&out, "# HELP ", full, " ", detail::to_absl(help), "\n# TYPE ", full,
                  " histogram\n");
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < latency_histogram::bounds_us.size(); ++i) {
    cumulative += h.counts[i];
    absl::StrAppend(&out, full, "_bucket{le=\"",
                    static_cast<double>(latency_histogram::bounds_us[i]) / 1e6, "\"} ", cumulative,
                    "\n");
  }
  absl::StrAppend(&out, full, "_bucket{le=\"+Inf\"} ", h.count, "\n", full, "_sum ",
                  static_cast<double>(h.sum_us) / 1e6, "\n", full, "_count ", h.count, "\n");
}

}  // namespace detail

using detail::append_histogram;
using detail::append_metric;

std::string to_prometheus(const relay_metrics& m, std::string_view prefix) {
  std::string out;
  const auto d = [](auto v) { return static_cast<double>(v); };
  append_metric(out, prefix, "pending", "gauge", "Messages in the outbox.", d(m.pending));
  append_metric(out, prefix, "oldest_pending_age_seconds", "gauge",
                "Age of the oldest pending message.", m.oldest_pending_age_s);
  append_metric(out, prefix, "dead_letters", "gauge", "Messages at the dead-letter path.",
                d(m.dead_letters));
  append_metric(out, prefix, "in_flight", "gauge", "Publishes awaiting the sink.", d(m.in_flight));
  append_metric(out, prefix, "published_total", "counter", "Publishes the sink acknowledged.",
                d(m.published));
  append_metric(out, prefix, "delivered_total", "counter",
                "Acknowledged messages removed from the outbox.", d(m.delivered));
  append_metric(out, prefix, "retried_total", "counter",
                "Failed attempts recorded for a later retry.", d(m.retried));
  append_metric(out, prefix, "dead_lettered_total", "counter",
                "Messages moved to the dead-letter path.", d(m.dead_lettered));
  append_metric(out, prefix, "clears_total", "counter", "Transactions that recorded outcomes.",
                d(m.clears));
  append_metric(out, prefix, "clear_conflicts_total", "counter",
                "Outcome transactions that lost a race and were redone.", d(m.clear_conflicts));
  append_metric(out, prefix, "spins_total", "counter",
                "Times the relay looked for commits instead of sleeping.", d(m.spins));
  append_metric(out, prefix, "spin_catches_total", "counter",
                "Spins that a commit ended before their time was up.", d(m.spin_catches));
  append_metric(out, prefix, "holding_pace", "gauge",
                "1 while the relay holds its engine's pace (producers wait for its clears).",
                m.holding_pace ? 1 : 0);
  // (The engine's figures, the same in every relay of one engine: named engine_*.)
  append_metric(out, prefix, "engine_pace_waiting", "gauge",
                "The engine's processes waiting for a relay's clears now.", d(m.pace_waiting));
  append_metric(out, prefix, "engine_paced_total", "counter",
                "The engine's processes that waited for a relay's clears.", d(m.paced));
  append_metric(out, prefix, "engine_pace_timed_out_total", "counter",
                "The engine's waits for a relay's clears that lasted options.pace_wait.",
                d(m.pace_timed_out));
  append_metric(out, prefix, "engine_pace_stalled", "gauge",
                "1 while the engine's flow control is off after a timed-out wait, until clears "
                "resume.",
                m.pace_stalled ? 1 : 0);
  append_histogram(out, prefix, "publish_latency_seconds",
                   "Time from the start of a publish to its outcome.", m.publish_latency);
  append_histogram(out, prefix, "commit_to_publish_latency_seconds",
                   "Time from a message's commit to its acknowledgement.",
                   m.commit_to_publish_latency);
  return out;
}

}  // namespace pop
