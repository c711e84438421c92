// Defines pop::topic_table: topics and prefix patterns ("order.*") mapped to values, the one
// place pop matches a message's topic against patterns (the topic router, the NATS ingress).
#pragma once

#include <algorithm>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "pop/contracts/process_spec.hpp"
#include "pop/contracts/status.hpp"

namespace pop {

// Topics ("order.placed") and prefix patterns ("order.*": every topic that starts with "order.")
// mapped to values of type T. find() prefers an exact topic, then the longest matching prefix.
// A value type; not synchronized (fill it before sharing it).
template <class T>
class topic_table {
 public:
  // Adds `pattern` -> `value`. kInvalidArgument if the topic (or a pattern's stem) is not a valid
  // topic; kAlreadyExists if the pattern is already there.
  [[nodiscard]] absl::Status insert(std::string pattern, T value) {
    const bool prefix = pattern.size() >= 2 && pattern.compare(pattern.size() - 2, 2, ".*") == 0;
    const std::string stem = prefix ? pattern.substr(0, pattern.size() - 2) : pattern;
    POP_RETURN_IF_ERROR(validate_topic(stem));
    if (!prefix) {
      if (!exact_.emplace(std::move(pattern), std::move(value)).second) return taken(stem);
      return absl::OkStatus();
    }
    std::string with_dot = stem + ".";
    if (std::any_of(prefixes_.begin(), prefixes_.end(),
                    [&](const auto& e) { return e.first == with_dot; })) {
      return taken(pattern);
    }
    prefixes_.emplace_back(std::move(with_dot), std::move(value));
    std::stable_sort(prefixes_.begin(), prefixes_.end(),
                     [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    return absl::OkStatus();
  }

  // The value for `topic`: an exact entry, else the longest prefix pattern it matches, else null.
  // O(log n + prefixes).
  const T* find(std::string_view topic) const {
    if (const auto it = exact_.find(topic); it != exact_.end()) return &it->second;
    for (const auto& [prefix, value] : prefixes_) {
      if (topic.size() > prefix.size() && topic.compare(0, prefix.size(), prefix) == 0) {
        return &value;
      }
    }
    return nullptr;
  }

  bool empty() const { return exact_.empty() && prefixes_.empty(); }

 private:
  static absl::Status taken(std::string_view pattern) {
    return absl::AlreadyExistsError(
        absl::StrCat("'", detail::to_absl(pattern), "' already has an entry"));
  }

  std::map<std::string, T, std::less<>> exact_;
  std::vector<std::pair<std::string, T>> prefixes_;  // "a.b." -> value, longest first
};

}  // namespace pop
