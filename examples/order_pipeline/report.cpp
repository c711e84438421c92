#include <fmt/core.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "orders.hpp"
#include "pipeline.hpp"
#include "pop/relay/dead_letters.hpp"

namespace order_pipeline {
namespace {

struct tally {
  int confirmed = 0, cancelled = 0, rejected = 0, other = 0;
  int final_instances = 0;
  std::vector<double> latencies_ms;
};

tally count(const pop::engine& e, pop::workflows& wf, const settings& s) {
  tally t;
  const pop::snapshot snap = e.snapshot();
  for (int i = 1; i <= s.orders; ++i) {
    const pop::value_view order =
        snap.view(pop::path::parse("domain.orders." + order_id(i)).value());
    const std::string status =
        order && order.member("status") ? order.member("status").get<std::string>() : "";
    if (status == "confirmed")
      ++t.confirmed;
    else if (status == "cancelled")
      ++t.cancelled;
    else if (status == "rejected")
      ++t.rejected;
    else
      ++t.other;
    const absl::StatusOr<pop::workflow_instance> w = wf.inspect(order_id(i));
    if (w.ok() &&
        (w->status == "completed" || w->status == "compensated" || w->status == "failed")) {
      ++t.final_instances;
      const std::int64_t started = w->raw.value("started_at_us", std::int64_t{0});
      const std::int64_t ended =
          w->history.empty() ? started : w->history.back().value("at_us", started);
      t.latencies_ms.push_back(static_cast<double>(ended - started) / 1000.0);
    }
  }
  return t;
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))];
}

}  // namespace

bool pipeline::report(const run_result& r) {
  // The summary.
  const tally t = count(*engine_, *workflows_, s_);
  const pop::relay_metrics m = relay_->metrics();
  const std::size_t dead = pop::dead_letters::create(*engine_).value()->count();
  fmt::print("\n{:<32}{:>12}\n", "order pipeline", s_.in_memory ? "in memory" : s_.journal);
  fmt::print("{:-<44}\n", "");
  fmt::print("{:<32}{:>12}\n", "orders", s_.orders);
  fmt::print("{:<32}{:>12}\n", "  confirmed", t.confirmed);
  fmt::print("{:<32}{:>12}\n", "  cancelled (payment declined)", t.cancelled);
  fmt::print("{:<32}{:>12}\n", "  rejected (out of stock)", t.rejected);
  fmt::print("{:<32}{:>12}\n", "messages relayed (this run)", m.delivered);
  if (from_payments_) {
    const pop::nats_ingress_stats is = from_payments_->stats();
    fmt::print("{:<32}{:>12}\n", "payment requests via JetStream", to_payments_->stats().acked);
    fmt::print("{:<32}{:>12}\n", "payment answers applied", is.applied);
    fmt::print("{:<32}{:>12}\n", "duplicates absorbed (inbox)", is.duplicates);
  } else {
    fmt::print("{:<32}{:>12}\n", "payment requests served", payments_->requests());
    fmt::print("{:<32}{:>12}\n", "duplicates absorbed (inbox)", payments_->duplicates());
  }
  fmt::print("{:<32}{:>12}\n", "dead letters", dead);
  fmt::print("{:<32}{:>12}\n", "workflow steps (this run)", runner_->steps());
  fmt::print("{:<32}{:>12.0f}\n", "throughput, orders/s", s_.orders / std::max(r.seconds, 1e-9));
  fmt::print("{:<32}{:>12.1f}\n", "order latency p50, ms", percentile(t.latencies_ms, 0.50));
  fmt::print("{:<32}{:>12.1f}\n", "order latency p99, ms", percentile(t.latencies_ms, 0.99));
  fmt::print("{:<32}{:>12}\n", "state version", engine_->version());

  // The invariants.
  bool ok = true;
  const auto check = [&](bool holds, const std::string& what) {
    fmt::print("{:<44}{}\n", what, holds ? "ok" : "FAILED");
    ok = ok && holds;
  };
  fmt::print("{:-<44}\n", "");
  const json stock = engine_->snapshot().read("domain.inventory").value();
  bool never_negative = true;
  long total_now = 0;
  for (const auto& [sku, qty] : stock.items()) {
    never_negative = never_negative && qty.get<long>() >= 0;
    total_now += qty.get<long>();
  }
  long total_start = 0;  // the stock of version 0: a restart on the journal counts from there too
  const json initial = initial_inventory(s_);
  for (const auto& [sku, qty] : initial.items()) total_start += qty.get<long>();
  long confirmed_qty = 0;
  const json orders = engine_->snapshot().read("domain.orders").value();
  for (const auto& [id, order] : orders.items()) {
    if (order.value("status", "") == "confirmed") confirmed_qty += order.value("qty", 0L);
  }
  check(never_negative, "stock never negative");
  check(total_start == total_now + confirmed_qty, "stock conserved");
  check(t.final_instances == s_.orders && t.other == 0, "every order in a final state");
  std::optional<std::map<std::string, std::set<std::string>>> confirmations;
  if (events_out_ == &events_file_) {
    events_file_.flush();
    confirmations = confirmations_in(s_.sink);  // this run's and earlier runs' deliveries
  } else if (s_.in_memory) {
    confirmations = events_->confirmation_ids();
  }
  if (confirmations) {
    bool one_email = true;
    for (const auto& [id, order] : orders.items()) {
      const auto it = confirmations->find(id);
      const std::size_t emails = it == confirmations->end() ? 0 : it->second.size();
      one_email = one_email && emails == (order.value("status", "") == "confirmed" ? 1u : 0u);
    }
    check(one_email, "one confirmation email per confirmed order");
  } else {
    fmt::print("{:<44}{}\n", "one confirmation email per confirmed order", "not kept");
  }
  check(r.relay_status.code() == absl::StatusCode::kCancelled &&
            r.runner_status.code() == absl::StatusCode::kCancelled,
        "relay and runner stopped cleanly");
  check(r.finished, "the run finished");
  if (from_payments_) {
    check(r.ingress_status.ok() && from_payments_->stats().dead_lettered == 0,
          "every payment answer applied");
  }
  return ok;
}

}  // namespace order_pipeline
