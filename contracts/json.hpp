// Defines pop::json, the JSON value type used for state values, arguments and payloads, and the
// checks a value passes before the engine stores it.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"

namespace pop {

// The JSON value type of every state value, process argument and message payload. Objects are
// ordered by key, so materialised state is deterministic.
using json = nlohmann::json;

// The deepest nesting of arrays and objects a stored value may have (the value itself is level 1).
inline constexpr std::size_t max_value_depth = 512;

// Returns OK if `value` can be stored, journaled and published: every string and object key is
// valid UTF-8, every number is finite (JSON has no NaN or infinity), and arrays and objects nest
// at most max_value_depth levels. Otherwise kInvalidArgument: "<what>: <what is wrong> at
// <JSON pointer inside the value>". O(size of the value); allocates nothing when the value is good.
[[nodiscard]] absl::Status check_storable(const json& value, std::string_view what);

// Returns OK if `text` is valid UTF-8 (no overlong forms, surrogates or code points above
// U+10FFFF), otherwise kInvalidArgument naming `what` and the byte offset of the first bad byte.
[[nodiscard]] absl::Status check_utf8(std::string_view text, std::string_view what);

// The type of `value` with its article, for messages: "an object", "an array", "a string",
// "a number", "a boolean", "null", "binary data".
std::string_view type_with_article(const json& value);

// Empties `value` (it becomes null) at the cost of its parts. nlohmann's destructor takes every
// array and object apart through a heap-allocated stack (so that deep nesting cannot overflow the
// call stack): for a small flat payload, an argument list say, that allocation and the moves cost
// more than the parts. A container holding no container is cleared directly here; a nested one is
// left to nlohmann.
inline void discard(json& value) noexcept {
  const auto flat = [](const auto& items, auto element) {
    for (const auto& item : items) {
      if (element(item).is_structured()) return false;
    }
    return true;
  };
  if (value.is_array()) {
    auto& items = value.get_ref<json::array_t&>();
    if (flat(items, [](const json& j) -> const json& { return j; })) items.clear();
  } else if (value.is_object()) {
    auto& members = value.get_ref<json::object_t&>();
    if (flat(members, [](const auto& m) -> const json& { return m.second; })) members.clear();
  }
  value = nullptr;
}

}  // namespace pop
