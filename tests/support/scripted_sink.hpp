// Defines test support for relay tests: a sink whose outcome per publish a test scripts, and an
// engine helper that emits messages.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "pop/engine/engine.hpp"
#include "pop/relay/sink.hpp"

namespace pop::test {

// What one publish of a scripted_sink does.
enum class act { ok, fail, permanent, timeout, hang, raise, down };

// A sink whose outcome per publish is chosen by `script` (a fake is fine: the sink's failures are
// what these tests script; the relay is the real one). Records every publish and every
// acknowledgement. Used from the relay's strand only; `acked_count` may be read from any thread.
class scripted_sink final : public pop::sink {
 public:
  struct call {
    outbox_message message;
    act what;
    std::chrono::steady_clock::time_point at;
  };

  std::function<act(const outbox_message&)> script = [](const outbox_message&) { return act::ok; };
  bool synchronous = true;               // ok/fail/permanent/raise finish in publish_now
  std::chrono::microseconds latency{0};  // asynchronous publishes wait this long first
  std::vector<call> calls;               // every publish, in order
  std::vector<std::string> acked;        // ids acknowledged, in order
  std::atomic<std::size_t> acked_count{0};

  std::optional<absl::Status> publish_now(const outbox_message& m) override {
    if (!synchronous) return std::nullopt;
    const act what = script(m);
    if (what == act::timeout || what == act::hang) {
      pending_ = what;
      pending_for_ = m.id;
      return std::nullopt;
    }
    calls.push_back({m, what, std::chrono::steady_clock::now()});
    return outcome(m, what);
  }

  boost::asio::awaitable<absl::Status> publish(const outbox_message& m) override {
    act what;
    if (pending_for_ == m.id) {
      what = pending_;
      pending_for_.clear();
    } else {
      what = script(m);
    }
    calls.push_back({m, what, std::chrono::steady_clock::now()});
    boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
    if (what == act::timeout || what == act::hang) {
      timer.expires_after(std::chrono::hours(1));
      co_await timer.async_wait(boost::asio::use_awaitable);  // throws when cancelled
      co_return absl::InternalError("a hanging publish was never cancelled");
    }
    if (latency.count() > 0) {
      timer.expires_after(latency);
      co_await timer.async_wait(boost::asio::use_awaitable);
    }
    co_return outcome(m, what);
  }

  // The ids of the calls with outcome `what`, in order.
  std::vector<std::string> ids(act what) const {
    std::vector<std::string> out;
    for (const call& c : calls) {
      if (c.what == what) out.push_back(c.message.id);
    }
    return out;
  }

 private:
  absl::Status outcome(const outbox_message& m, act what) {
    switch (what) {
      case act::ok:
        acked.push_back(m.id);
        acked_count.fetch_add(1);
        return absl::OkStatus();
      case act::fail:
        return absl::UnavailableError("broker down for " + m.id + " attempt " +
                                      std::to_string(m.attempts + 1));
      case act::permanent:
        return pop::permanent_failure(absl::InvalidArgumentError("rejected " + m.id));
      case act::down:
        return pop::destination_unavailable(absl::UnavailableError("destination down"));
      case act::raise:
        throw std::runtime_error("sink exploded on " + m.id);
      case act::timeout:
      case act::hang:
        break;
    }
    return absl::InternalError("unreachable");
  }

  act pending_ = act::ok;
  std::string pending_for_;
};

// Registers process "emit" on `e`: args {"topic", "key", "payload", "count"} emits `count`
// messages (default 1) on topic "t" or "u", with the given key.
inline void register_emitter(pop::engine& e) {
  const absl::Status s = e.register_process(
      {.name = "emit", .emits = {"t", "u"}}, [](const context&, const json& args) {
        result r;
        const int count = args.value("count", 1);
        for (int i = 0; i < count; ++i) {
          r.emit(args.value("topic", "t"), args.value("payload", json(i)), args.value("key", ""));
        }
        return r;
      });
  if (!s.ok()) throw std::runtime_error(s.ToString());
}

// Emits one message with `key` and returns its id.
inline std::string emit(pop::engine& e, const std::string& key, json payload = 0) {
  absl::StatusOr<commit> c = e.execute("emit", {{"key", key}, {"payload", std::move(payload)}});
  if (!c.ok()) throw std::runtime_error(c.status().ToString());
  return c->message_ids.at(0);
}

}  // namespace pop::test
