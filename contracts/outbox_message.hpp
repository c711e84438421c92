// Defines pop::outbox_message (a committed, pending side effect) and its id scheme.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/contracts/json.hpp"

namespace pop {

// The most messages one commit may emit: the index part of an id has six digits.
inline constexpr std::uint32_t max_messages_per_commit = 999'999;

// Returns the id of the `index`-th message of commit `version`: the version zero-padded to 20
// digits, '-', the index zero-padded to 6 digits ("00000000000000000017-000000"), so ids sort in
// commit order as plain strings and are valid path segments.
std::string make_message_id(std::uint64_t version, std::uint32_t index);
// The same id written into `out` (its contents replaced; its allocation reused).
void make_message_id(std::uint64_t version, std::uint32_t index, std::string& out);

// The (version, index) an id encodes, or kInvalidArgument if `id` is not of make_message_id's form.
[[nodiscard]] absl::StatusOr<std::pair<std::uint64_t, std::uint32_t>> parse_message_id(
    std::string_view id);

// One failed publish attempt of a message, kept so a dead letter shows every reason.
struct delivery_failure {
  std::uint32_t attempt = 0;  // 1 for the first publish of the message
  std::int64_t at_us = 0;     // when it failed, microseconds since the Unix epoch
  std::string error{};        // the sink's status, as text

  friend bool operator==(const delivery_failure&, const delivery_failure&) = default;
};

void to_json(json& j, const delivery_failure& f);
void from_json(const json& j, delivery_failure& f);

// Field names of the stored message that code reads one at a time without decoding the whole
// message (the relay's scan skips busy keys and backoffs this way). The codec below is the only
// other place that spells them.
namespace outbox_fields {
inline constexpr const char* key = "key";
inline constexpr const char* next_attempt_at_us = "next_attempt_at_us";
inline constexpr const char* created_at_us = "created_at_us";
}  // namespace outbox_fields

// A message emitted by a committed process, waiting in the outbox until a sink acknowledges it.
//
// Stored in the state at `<outbox path>.<id>` as a JSON object with these field names, so every
// snapshot shows exactly the pending messages. A value type.
struct outbox_message {
  std::string id{};     // make_message_id(version, index): unique and in commit order
  std::string topic{};  // one of the emitting process's declared topics
  std::string key{};    // ordering scope: messages with the same key are published in order
  json payload{};       // any JSON value
  std::map<std::string, std::string> headers{};
  std::int64_t created_at_us = 0;            // commit time, microseconds since the Unix epoch
  std::uint64_t version = 0;                 // the version that committed it
  std::uint32_t attempts = 0;                // failed publish attempts so far
  std::string last_error{};                  // the reason of the last failed attempt, if any
  std::int64_t next_attempt_at_us = 0;       // earliest time of the next attempt; 0 means now
  std::vector<delivery_failure> failures{};  // every failed attempt, oldest first

  // Returns the message read from its stored JSON form, or kInvalidArgument naming the field that
  // is missing or of the wrong type. "failures" may be absent (no failures).
  [[nodiscard]] static absl::StatusOr<outbox_message> from_json(const json& j);
  // The stored JSON form; the rvalue form moves the payload instead of copying it.
  json to_json() const&;
  json to_json() &&;

  friend bool operator==(const outbox_message&, const outbox_message&) = default;
};

// nlohmann conversion (json::get<outbox_message>()): as outbox_message::from_json, throwing
// std::invalid_argument with its message for a malformed message.
void from_json(const json& j, outbox_message& m);

}  // namespace pop
