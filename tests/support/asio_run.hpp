// Defines run_on(): runs a coroutine that returns a status to completion on a one-thread
// io_context; spawn_stoppable(): starts one to be cancelled later; and quick_relay(): relay
// options with fast retries for tests.
#pragma once

#include <chrono>
#include <exception>
#include <optional>
#include <string>
#include <utility>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>

#include "absl/status/status.h"
#include "pop/relay/relay.hpp"

namespace pop::test {

// Runs `work` on `io` until it and everything it started are done; returns its status. An
// exception escaping `work` is rethrown; a coroutine that never finished fails the test, and so
// does one still running after `limit` (it is cancelled first, so the test ends with a message
// rather than at CTest's timeout).
inline absl::Status run_on(boost::asio::io_context& io, boost::asio::awaitable<absl::Status> work,
                           std::chrono::seconds limit = std::chrono::seconds(60)) {
  std::optional<absl::Status> out;
  boost::asio::cancellation_signal stop;
  boost::asio::co_spawn(
      io, std::move(work),
      boost::asio::bind_cancellation_slot(stop.slot(), [&](std::exception_ptr e, absl::Status s) {
        if (e) std::rethrow_exception(e);
        out = std::move(s);
      }));
  io.restart();
  io.run_for(limit);
  if (!io.stopped()) {  // work left at the limit
    stop.emit(boost::asio::cancellation_type::terminal);
    io.run_for(std::chrono::seconds(5));
    io.stop();
    FAIL("run_on: the coroutine (or what it started) was still running after "
         << limit.count() << " s; it was cancelled"
         << (out ? " and returned " + out->ToString() : std::string(" and did not return")));
  }
  io.restart();
  REQUIRE(out.has_value());
  return *out;
}

// Spawns `work` on `io`, to be stopped by emitting `stop`; its status is stored in `result`.
inline void spawn_stoppable(boost::asio::io_context& io, boost::asio::awaitable<absl::Status> work,
                            boost::asio::cancellation_signal& stop,
                            std::optional<absl::Status>& result) {
  boost::asio::co_spawn(
      io, std::move(work),
      boost::asio::bind_cancellation_slot(
          stop.slot(), [&result](std::exception_ptr, absl::Status s) { result = std::move(s); }));
}

// Fast retries so tests finish quickly; tests of time itself use a pop::manual_clock.
inline relay_options quick_relay(std::uint32_t max_attempts = 4) {
  return {.max_in_flight = 64,
          .batch_size = 256,
          .publish_timeout = std::chrono::milliseconds(20),
          .max_attempts = max_attempts,
          .initial_backoff = std::chrono::microseconds(200),
          .max_backoff = std::chrono::microseconds(2000),
          .dead_letter_path = "system.dead_letters",
          .seed = 7};
}

}  // namespace pop::test
