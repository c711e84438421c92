// Defines pop::value_view, a read-only handle on one value of a state snapshot.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "pop/contracts/json.hpp"
#include "pop/contracts/outbox_message.hpp"

namespace pop::detail {
class value_node;
struct location;
using node_ptr = std::shared_ptr<const value_node>;
}  // namespace pop::detail

namespace pop {

// A read-only handle on one value of a snapshot, or on nothing (an absent value).
//
// Holding a view keeps that value alive (not the whole snapshot). Navigating and iterating never
// copies; only to_json() and get<T>() materialise, and only the viewed value. Cheap to copy;
// safe to use from any thread.
class value_view {
 public:
  value_view() = default;

  // True if a value is there.
  bool exists() const { return node_ != nullptr; }
  explicit operator bool() const { return exists(); }
  // True if the value is a JSON object.
  bool is_object() const;
  // The number of members of an object, elements of an array, 0 for absent and scalar values.
  std::size_t size() const;
  // The string stored here, without copying it (valid while this view or its snapshot lives), or
  // nullopt if the value is not a string.
  std::optional<std::string_view> as_string() const;
  // The integer stored here (either JSON integer kind, converted as get<std::int64_t>() would),
  // or nullopt if the value is not an integer. Neither materialises anything.
  std::optional<std::int64_t> as_integer() const;

  // The member `key` of an object; absent if this is not an object or has no such member.
  value_view member(std::string_view key) const;
  // The value at a dotted `relative` path below this one (assumed valid); absent if missing.
  value_view at(std::string_view relative) const;
  // Visits the members of an object in key order, starting at the first key >= `from`, until
  // `visit` returns false. O(log n + members visited). The member view passed is valid only
  // during its call (members may share one view that moves on): copy it to keep it.
  void for_each_member(
      absl::FunctionRef<bool(std::string_view key, const value_view& member)> visit,
      std::string_view from = {}) const;
  // The member names of an object, in order.
  std::vector<std::string> keys() const;

  // The outbox message stored here as a commit appended it (typed: decoded from its compact
  // record on the first call, once, no JSON built), or nullptr if this value is not one or is
  // stored as JSON (read it with get<outbox_message>(), which uses this form when it can, without
  // keeping a decoded copy). Valid while this view or its snapshot lives.
  const outbox_message* message() const;
  // The typed message stored here (see message()) written over `into`, reusing the allocations
  // of its strings, and nothing kept: for a reader that goes through many messages once (a
  // relay). False, and `into` unchanged, if this value is not one.
  bool message_into(outbox_message& into) const;

  // What a relay's scan needs of a typed message (see message()), read without decoding it: its
  // key (a view valid while this view or its snapshot lives), next attempt and creation times.
  struct message_schedule {
    std::string_view key;
    std::int64_t next_attempt_at_us = 0;
    std::int64_t created_at_us = 0;
  };
  // The schedule of the typed message stored here, or nullopt if this value is not one.
  std::optional<message_schedule> schedule() const;

  // True if this view and `other` show the very same stored value (the same node of the state
  // tree and the same place in it). A commit shares every value it leaves unchanged with the
  // snapshot before it, so a view of the same path in two snapshots that does not share may have
  // changed, and one that shares has not (a cheap test of "did anything below here change?").
  bool shares(const value_view& other) const {
    return node_ == other.node_ && inner_ == other.inner_ && packed_ == other.packed_;
  }

  // The value as JSON (null if absent). O(size of this value).
  json to_json() const;
  // The value converted with nlohmann's from_json; throws json::exception on a type mismatch.
  // Scalars and small records convert without an intermediate copy.
  template <class T>
  T get() const {
    if constexpr (std::is_same_v<T, outbox_message>) {
      if (std::optional<outbox_message> m = typed_message()) return *std::move(m);
    }
    if (const json* j = direct()) return j->get<T>();
    json built = to_json();  // a member map or a packed value: built for this call only
    if constexpr (std::is_same_v<T, json>) {
      return built;
    } else if constexpr (std::is_same_v<T, std::string>) {
      if (std::string* text = built.get_ptr<std::string*>()) return std::move(*text);
    }
    return built.get<T>();
  }

 private:
  friend class snapshot;
  friend class context;
  value_view(detail::node_ptr node, const json* inner, const char* packed = nullptr)
      : node_(std::move(node)), inner_(inner), packed_(packed) {}
  detail::location location() const;
  // The JSON value itself when it is stored as JSON (not a member map, not packed), else null.
  const json* direct() const;
  // A copy of the typed message stored here (see message()), decoded for this call only if it
  // was not yet; nullopt if this value is not one.
  std::optional<outbox_message> typed_message() const;

  detail::node_ptr node_;         // the node holding the value (for inner values, the blob)
  const json* inner_ = nullptr;   // the value inside node_->blob, or null for node_ itself
  const char* packed_ = nullptr;  // the value inside node_'s packed bytes, or null for node_ itself
};

}  // namespace pop
