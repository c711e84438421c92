// Defines the relay's outcome policy: what a publish's outcome does to its stored message
// (removed, retried after a backoff, dead-lettered), as a pure function tested without Asio.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "pop/contracts/dead_letter.hpp"
#include "pop/contracts/json.hpp"
#include "pop/contracts/outbox_message.hpp"

namespace pop::detail {

// What the relay learned from one publish of message `id`.
struct publish_outcome {
  enum class kind { delivered, failed, malformed };
  kind what = kind::delivered;
  std::string id;
  std::string key;
  std::uint32_t attempts_before = 0;  // the stored attempt count when it was published
  absl::Status status;                // why it failed
  std::int64_t at_us = 0;             // when it was learned, on the engine's clock
  json raw;                           // malformed: the stored value
};

// The relay options the policy needs.
struct outcome_policy {
  std::uint32_t max_attempts = 10;
  std::int64_t initial_backoff_us = 100'000;
  std::int64_t max_backoff_us = 60'000'000;
};

// What recording one outcome writes.
struct outcome_decision {
  enum class kind {
    skip,         // the message is gone or changed since it was published: write nothing
    remove,       // delivered: delete it from the outbox
    retry,        // write `message` back (attempts, last error, history, next attempt time)
    dead_letter,  // delete it from the outbox and store `letter`
  };
  kind what = kind::skip;
  std::optional<outbox_message> message;
  std::optional<pop::dead_letter> letter;
};

// A delay drawn from [d/2, d] (the relay's jitter; tests pass a fixed one).
using jitter_fn = absl::FunctionRef<std::int64_t(std::int64_t d)>;

// Returns what outcome `o` does to its outbox entry, which the caller has checked still exists;
// `stored` is that entry read as a message (null if it is not needed: a delivery, or cannot be
// read), `policy` the relay's options, `outage_since_us` when the current run of
// destination_unavailable failures began (0: none).
// - delivered: remove. malformed: dead-letter the raw entry.
// - a failure of a message whose stored attempt count is not o.attempts_before: skip (someone
//   else recorded or requeued it meanwhile).
// - destination_unavailable (and not permanent): retry without counting an attempt or adding
//   history, after about as long as the outage has lasted (clamped to the backoffs, jittered).
// - otherwise count the attempt and append it to the history; permanent failures and the
//   max_attempts-th failure are dead-lettered with every reason, the rest retried after the
//   jittered exponential backoff initial * 2^(attempts-1), capped at max_backoff.
// Pure: reads nothing else, changes nothing.
outcome_decision decide_outcome(const outbox_message* stored, const publish_outcome& o,
                                const outcome_policy& policy, std::int64_t outage_since_us,
                                jitter_fn jitter);

}  // namespace pop::detail
