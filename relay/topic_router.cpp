#include "pop/relay/topic_router.hpp"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "pop/contracts/process_spec.hpp"
#include "pop/contracts/status.hpp"

namespace pop {

absl::Status topic_router::on(std::string topic, handler fn) {
  if (!fn) {
    return absl::InvalidArgumentError(
        absl::StrCat("topic_router: the handler for '", topic, "' is empty"));
  }
  return add(std::move(topic), route{std::move(fn), nullptr});
}

absl::Status topic_router::on(std::string topic, async_handler fn) {
  if (!fn) {
    return absl::InvalidArgumentError(
        absl::StrCat("topic_router: the handler for '", topic, "' is empty"));
  }
  return add(std::move(topic), route{nullptr, std::move(fn)});
}

absl::Status topic_router::add(std::string topic, route r) {
  const std::string shown = topic;
  if (absl::Status s = routes_.insert(std::move(topic), std::move(r)); !s.ok()) {
    if (s.code() == absl::StatusCode::kAlreadyExists) {
      return absl::AlreadyExistsError(
          absl::StrCat("topic_router: '", shown, "' already has a handler"));
    }
    return annotate(s, "topic_router");
  }
  return absl::OkStatus();
}

const topic_router::route* topic_router::find(const std::string& topic) const {
  return routes_.find(topic);
}

absl::Status topic_router::unrouted(const outbox_message& m) {
  switch (policy_) {
    case unknown_topic::drop:
      dropped_.fetch_add(1, std::memory_order_relaxed);
      return absl::OkStatus();
    case unknown_topic::dead_letter:
      return permanent_failure(absl::NotFoundError(
          absl::StrCat("topic_router: no handler for topic '", m.topic, "' (message ", m.id, ")")));
    case unknown_topic::fail:
      break;
  }
  return absl::NotFoundError(
      absl::StrCat("topic_router: no handler for topic '", m.topic, "' (message ", m.id, ")"));
}

std::optional<absl::Status> topic_router::publish_now(const outbox_message& m) {
  const route* r = find(m.topic);
  if (!r) return unrouted(m);
  if (r->sync) return r->sync(m);
  return std::nullopt;
}

boost::asio::awaitable<absl::Status> topic_router::publish(const outbox_message& m) {
  const route* r = find(m.topic);
  if (!r) co_return unrouted(m);
  if (r->sync) co_return r->sync(m);
  co_return co_await r->async(m);
}

}  // namespace pop
