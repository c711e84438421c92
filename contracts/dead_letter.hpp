// Defines pop::dead_letter, a message the relay gave up on, and its stored form (its one codec).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "pop/contracts/json.hpp"
#include "pop/contracts/outbox_message.hpp"

namespace pop {

// A message the relay gave up on, as stored at `<dead-letter path>.<id>`:
// {"message": <the outbox message with its failure history>, "dead_at_us": ..., "reason": ...},
// or for an outbox entry that was not a valid message {"message": <the entry as it was>,
// "malformed": true, "dead_at_us": ..., "reason": ...}. A value type.
struct dead_letter {
  outbox_message message{};  // message.failures holds every failed attempt's reason and time
  std::int64_t dead_at_us = 0;
  std::string reason{};
  bool malformed = false;  // the outbox entry was not a valid message: `raw` holds it, and only
  json raw{};              // message.id is set; it cannot be requeued, only discarded

  // Returns the dead letter stored under `id` as `j`, or kInvalidArgument naming what is wrong.
  [[nodiscard]] static absl::StatusOr<dead_letter> from_json(std::string_view id, const json& j);
  // The stored form.
  json to_json() const;
};

}  // namespace pop
