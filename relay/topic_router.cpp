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
  const bool pattern = topic.size() >= 2 && topic.compare(topic.size() - 2, 2, ".*") == 0;
  const std::string checked = pattern ? topic.substr(0, topic.size() - 2) : topic;
  if (absl::Status s = validate_topic(checked); !s.ok()) return annotate(s, "topic_router");
  if (pattern) {
    std::string prefix = checked + ".";
    const auto same = [&](const auto& entry) { return entry.first == prefix; };
    if (std::any_of(prefixes_.begin(), prefixes_.end(), same)) {
      return absl::AlreadyExistsError(
          absl::StrCat("topic_router: '", topic, "' already has a handler"));
    }
    prefixes_.emplace_back(std::move(prefix), std::move(r));
    std::stable_sort(prefixes_.begin(), prefixes_.end(),
                     [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    return absl::OkStatus();
  }
  if (!exact_.emplace(topic, std::move(r)).second) {
    return absl::AlreadyExistsError(
        absl::StrCat("topic_router: '", topic, "' already has a handler"));
  }
  return absl::OkStatus();
}

const topic_router::route* topic_router::find(const std::string& topic) const {
  if (const auto it = exact_.find(topic); it != exact_.end()) return &it->second;
  for (const auto& [prefix, r] : prefixes_) {
    if (topic.size() > prefix.size() && topic.compare(0, prefix.size(), prefix) == 0) return &r;
  }
  return nullptr;
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
