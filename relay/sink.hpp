// Defines pop::sink, the interface through which the relay publishes outbox messages.
#pragma once

#include <optional>

#include <boost/asio/awaitable.hpp>

#include "absl/status/status.h"
#include "pop/contracts/outbox_message.hpp"

namespace pop {

// Where the relay publishes outbox messages: a broker, an in-process handler, a file.
//
// The relay calls a sink only from its own strand. Several publishes may be in flight at once,
// but never two messages with the same non-empty key: the next one of a key starts only after
// the previous one was acknowledged, which is how per-key order holds end to end.
// Lifetime: the sink must outlive every relay run that uses it.
class sink {
 public:
  virtual ~sink() = default;

  // Publishes `m`. Returns OK once the destination has accepted the message; only then does the
  // relay remove it from the outbox. Any other status is a failed attempt: it is recorded on the
  // message, retried with backoff, and dead-lettered after the relay's max_attempts (at once if
  // the status is marked with permanent_failure()). An exception counts as a failed attempt
  // (kUnknown naming it). The relay cancels a publish (terminal cancellation of the awaiting
  // coroutine) at its timeout and when it stops: a publish must react promptly by returning or
  // throwing. May deliver `m` more than once across calls; consumers deduplicate by m.id.
  virtual boost::asio::awaitable<absl::Status> publish(const outbox_message& m) = 0;

  // The fast path for sinks that finish synchronously: returns the outcome of publishing `m`
  // right now, or nullopt if this message needs the asynchronous publish(). Called on the relay's
  // strand; it cannot be cancelled or timed out, so it must be short; `m` is valid only during
  // the call (copy what is kept). The default returns nullopt.
  virtual std::optional<absl::Status> publish_now(const outbox_message& m) {
    static_cast<void>(m);
    return std::nullopt;
  }
};

// Returns `status` (which must not be OK) marked as permanent: the relay dead-letters the message
// at once instead of retrying it. Keeps the code and message.
absl::Status permanent_failure(absl::Status status);
// True if `status` was marked by permanent_failure().
bool is_permanent_failure(const absl::Status& status);

// Returns `status` (which must not be OK) marked as "the destination is down", not a fault of
// this message: the relay retries it with backoff but does not count the attempt toward
// max_attempts, so an outage of the broker never dead-letters the queue. Keeps code and message.
absl::Status destination_unavailable(absl::Status status);
// True if `status` was marked by destination_unavailable().
bool is_destination_unavailable(const absl::Status& status);

}  // namespace pop
