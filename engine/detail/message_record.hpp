// Defines the compact record an outbox message is kept in while it is pending: its fields in
// the packed form of packed.hpp under one-letter names, so a queued message costs about its
// payload's text plus its id, topic and key, not a tree of nlohmann::json nodes.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "pop/contracts/outbox_message.hpp"
#include "pop/engine/detail/packed.hpp"
#include "pop/engine/result.hpp"
#include "pop/engine/value_view.hpp"

namespace pop::detail {

// Writes into `out` (cleared first) the record of `m`. False if its payload has no JSON text
// form (a binary or discarded value): then keep the message some other way.
bool encode_message_record(const outbox_message& m, std::string& out);
// Writes into `out` (cleared first) the record of message `draft` as commit `version` stores it
// as its `index`-th message (id make_message_id(version, index)), created at `created_at_us` and
// never attempted. Nothing is moved out of `draft`. False as above.
bool encode_message_record(std::uint32_t index, const message_draft& draft,
                           std::int64_t created_at_us, std::uint64_t version, std::string& out);

// The message whose record starts at `record` (bytes an encode_message_record wrote).
outbox_message decode_message_record(const char* record);
// The same, written over `into` (reusing the allocations of its strings).
void decode_message_record(const char* record, outbox_message& into);

// The fields of a record, each where its packed value starts: `id` is a string, or an integer
// (the index of make_message_id(version, index)); `version` an unsigned integer; `failures` an
// array of delivery_failure objects; `headers` an object of strings.
struct record_fields {
  const char* key = nullptr;
  const char* next_attempt_at_us = nullptr;
  const char* created_at_us = nullptr;
  const char* attempts = nullptr;
  const char* last_error = nullptr;
  const char* failures = nullptr;
  const char* headers = nullptr;
  const char* id = nullptr;
  const char* payload = nullptr;
  const char* topic = nullptr;
  const char* version = nullptr;
};
record_fields fields_of(const char* record);

// What the relay's scan reads of a pending message (value_view::schedule()).
using message_schedule = value_view::message_schedule;
// The schedule of the message whose record starts at `record`, read without decoding it.
message_schedule record_schedule(const char* record);

}  // namespace pop::detail
