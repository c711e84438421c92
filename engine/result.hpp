// Defines pop::result (what a process returns) and pop::write (one state change).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "pop/contracts/json.hpp"

namespace pop {

// One change to the state: set `path` to `value`, or delete `path` when `value` is empty.
struct write {
  std::string path{};
  std::optional<json> value{};

  friend bool operator==(const write&, const write&) = default;
};

// A message a process asks to emit; it gets its id, version and time when the process commits.
struct message_draft {
  std::string topic{};
  json payload{};
  std::string key{};  // ordering scope; messages with equal keys are published in commit order
  std::map<std::string, std::string> headers{};

  friend bool operator==(const message_draft&, const message_draft&) = default;
};

// What a process returns: its state writes and outbox messages, applied in order and committed
// atomically at one new version, or not at all. A plain value built by the process; nothing in it
// takes effect until the engine commits it.
class result {
 public:
  // Sets `path` to `value`.
  result& set(std::string path, json value) {
    room_for_writes();
    writes_.push_back({std::move(path), std::move(value)});
    return *this;
  }
  // Sets `path` to `value` (anything nlohmann can convert to JSON).
  template <class T>
  result& set(std::string path, T&& value) {
    room_for_writes();
    writes_.push_back({std::move(path), json(std::forward<T>(value))});
    return *this;
  }
  // Deletes `path` and everything below it (no effect if absent).
  result& erase(std::string path) {
    room_for_writes();
    writes_.push_back({std::move(path), std::nullopt});
    return *this;
  }
  // Queues a message on `topic`; `key` scopes its ordering.
  result& emit(std::string topic, json payload, std::string key = {},
               std::map<std::string, std::string> headers = {}) {
    messages_.push_back({std::move(topic), std::move(payload), std::move(key), std::move(headers)});
    return *this;
  }

  const std::vector<write>& writes() const { return writes_; }
  const std::vector<message_draft>& messages() const { return messages_; }
  std::vector<write>& writes() { return writes_; }
  std::vector<message_draft>& messages() { return messages_; }

 private:
  // Most processes write a few paths: room for four at the first, not a reallocation per write.
  void room_for_writes() {
    if (writes_.capacity() == 0) writes_.reserve(4);
  }

  std::vector<write> writes_{};
  std::vector<message_draft> messages_{};
};

}  // namespace pop
