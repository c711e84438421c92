// Defines pop::topic_router, a sink that hands each message to an in-process handler per topic.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "pop/contracts/topic_pattern.hpp"
#include "pop/relay/sink.hpp"

namespace pop {

// What a topic_router does with a message whose topic has no handler.
enum class unknown_topic {
  fail,         // a failed attempt (kNotFound): retried, then dead-lettered like any failure
  dead_letter,  // a permanent failure: dead-lettered at once
  drop,         // acknowledged without delivery, and counted in dropped()
};

// A sink delivering each message to the handler registered for its topic, in this process.
//
// A topic is matched exactly, or by the longest registered prefix pattern ending in ".*"
// ("order.*" matches "order.placed" and "order.paid.late", not "order"). Plain handlers run
// synchronously on the relay's strand (the relay's fast path); awaitable handlers run as
// coroutines, may suspend, and are cancelled at the relay's publish timeout. Register every
// handler before the relay starts; handlers must not throw (a throw counts as a failed attempt).
class topic_router final : public sink {
 public:
  using handler = std::function<absl::Status(const outbox_message&)>;
  using async_handler = std::function<boost::asio::awaitable<absl::Status>(const outbox_message&)>;

  explicit topic_router(unknown_topic policy = unknown_topic::fail) : policy_(policy) {}

  // Routes `topic` (a topic, or a prefix pattern "a.b.*") to `fn`. kInvalidArgument for a bad
  // topic or an empty function; kAlreadyExists if the topic already has a handler.
  [[nodiscard]] absl::Status on(std::string topic, handler fn);
  [[nodiscard]] absl::Status on(std::string topic, async_handler fn);

  boost::asio::awaitable<absl::Status> publish(const outbox_message& m) override;
  std::optional<absl::Status> publish_now(const outbox_message& m) override;

  // Messages acknowledged without delivery under unknown_topic::drop.
  std::uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }

 private:
  struct route {
    handler sync;
    async_handler async;
  };
  absl::Status add(std::string topic, route r);
  const route* find(const std::string& topic) const;
  absl::Status unrouted(const outbox_message& m);

  unknown_topic policy_;
  topic_table<route> routes_;
  std::atomic<std::uint64_t> dropped_{0};
};

}  // namespace pop
