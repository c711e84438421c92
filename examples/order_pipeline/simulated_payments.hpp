// Defines the simulated payment service of the single-process pipeline: it answers each
// payment.requested once per order, after a random latency, sometimes twice, through the inbox.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <string>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/steady_timer.hpp>

#include "pop/relay/inbox.hpp"
#include "settings.hpp"

namespace order_pipeline {

// The simulated payment service: answers each payment.requested once (per order, by a
// deterministic decision), after a random latency, sometimes twice, through the inbox.
class payment_service {
 public:
  payment_service(const settings& s, pop::inbox& in, boost::asio::any_io_executor ex)
      : settings_(s), inbox_(in), executor_(std::move(ex)), rng_(s.seed) {}

  // Accepts the request at once and answers later, so the relay is never held up.
  absl::Status on_request(const pop::outbox_message& m) {
    const std::string order = m.payload.at("order");
    std::mt19937_64 decide(settings_.seed ^ std::hash<std::string>{}(order));
    const bool declined =
        std::uniform_real_distribution<double>(0, 1)(decide) < settings_.decline_rate;
    pop::outbox_message reply;
    reply.id = "pay-" + order;  // one answer per order: redeliveries and duplicates share it
    reply.topic = declined ? "payment.declined" : "payment.confirmed";
    reply.key = order;
    reply.payload = {{"order", order}, {"amount", m.payload.value("amount", 0)}};
    reply.created_at_us = pop::system_clock()->now_us();
    const bool twice =
        std::uniform_real_distribution<double>(0, 1)(rng_) < settings_.duplicate_rate;
    for (int copy = 0; copy < (twice ? 2 : 1); ++copy) {
      const auto delay = std::chrono::milliseconds(
          rng_() % static_cast<std::uint64_t>(settings_.max_latency_ms + 1));
      auto timer = std::make_shared<boost::asio::steady_timer>(executor_, delay);
      // Answers arrive after a random latency: out of order with other orders' answers.
      timer->async_wait([this, timer, reply](const boost::system::error_code& ec) {
        if (ec) return;
        const absl::StatusOr<pop::inbox_result> r = inbox_.apply("workflow.resume", reply);
        if (!r.ok()) {
          failures_.fetch_add(1);
        } else if (!r->applied) {
          duplicates_.fetch_add(1);
        }
      });
    }
    requests_.fetch_add(1);
    return absl::OkStatus();
  }

  std::uint64_t duplicates() const { return duplicates_.load(); }
  std::uint64_t requests() const { return requests_.load(); }
  std::uint64_t failures() const { return failures_.load(); }

 private:
  const settings& settings_;
  pop::inbox& inbox_;
  boost::asio::any_io_executor executor_;
  std::mt19937_64 rng_;
  std::atomic<std::uint64_t> duplicates_{0};
  std::atomic<std::uint64_t> requests_{0};
  std::atomic<std::uint64_t> failures_{0};
};

}  // namespace order_pipeline
