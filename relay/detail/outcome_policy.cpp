#include "pop/relay/detail/outcome_policy.hpp"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "pop/relay/sink.hpp"

namespace pop::detail {
namespace {

std::int64_t backoff_us(const outcome_policy& p, std::uint32_t failures, jitter_fn jitter) {
  std::int64_t d = p.initial_backoff_us;
  for (std::uint32_t i = 1; i < failures && d < p.max_backoff_us; ++i) d *= 2;
  return jitter(std::min(d, p.max_backoff_us));
}

}  // namespace

outcome_decision decide_outcome(const outbox_message* stored, const publish_outcome& o,
                                const outcome_policy& policy, std::int64_t outage_since_us,
                                jitter_fn jitter) {
  outcome_decision d;
  if (o.what == publish_outcome::kind::delivered) {
    d.what = outcome_decision::kind::remove;
    return d;
  }
  if (o.what == publish_outcome::kind::malformed) {
    pop::dead_letter letter;
    letter.malformed = true;
    letter.raw = o.raw;
    letter.message.id = o.id;
    letter.dead_at_us = o.at_us;
    letter.reason = absl::StrCat("not a valid outbox message: ", o.status.ToString());
    d.what = outcome_decision::kind::dead_letter;
    d.letter = std::move(letter);
    return d;
  }
  if (!stored || stored->attempts != o.attempts_before) return d;
  outbox_message m = *stored;
  const std::string error = o.status.ToString();
  if (is_destination_unavailable(o.status) && !is_permanent_failure(o.status)) {
    // The destination is down: not this message's attempt. It keeps its attempt count and
    // history (an outage of any length dead-letters nothing).
    m.last_error = error;
    const std::int64_t lasted = outage_since_us == 0 ? 0 : o.at_us - outage_since_us;
    m.next_attempt_at_us = o.at_us + jitter(std::clamp<std::int64_t>(
                                         lasted, policy.initial_backoff_us, policy.max_backoff_us));
    d.what = outcome_decision::kind::retry;
    d.message = std::move(m);
    return d;
  }
  const std::uint32_t attempts = o.attempts_before + 1;
  m.failures.push_back({attempts, o.at_us, error});
  m.attempts = attempts;
  m.last_error = error;
  if (attempts >= policy.max_attempts || is_permanent_failure(o.status)) {
    m.next_attempt_at_us = 0;
    pop::dead_letter letter;
    letter.reason =
        is_permanent_failure(o.status)
            ? absl::StrCat("permanent failure: ", error)
            : absl::StrCat("gave up after ", attempts, " failed attempts; the last: ", error);
    letter.dead_at_us = o.at_us;
    letter.message = std::move(m);
    d.what = outcome_decision::kind::dead_letter;
    d.letter = std::move(letter);
    return d;
  }
  m.next_attempt_at_us = o.at_us + backoff_us(policy, attempts, jitter);
  d.what = outcome_decision::kind::retry;
  d.message = std::move(m);
  return d;
}

}  // namespace pop::detail
