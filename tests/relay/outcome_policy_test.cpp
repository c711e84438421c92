// Tests of the relay's outcome policy as a pure function: no engine, no Asio, no clock.
#include <catch2/catch.hpp>

#include "pop/relay/detail/outcome_policy.hpp"
#include "pop/relay/sink.hpp"

using pop::detail::decide_outcome;
using pop::detail::outcome_decision;
using pop::detail::publish_outcome;

namespace {

constexpr pop::detail::outcome_policy policy{
    .max_attempts = 3, .initial_backoff_us = 1'000, .max_backoff_us = 5'000};

// No jitter: the longest delay of the range.
std::int64_t no_jitter(std::int64_t d) {
  return d;
}

pop::outbox_message stored(std::uint32_t attempts) {
  pop::outbox_message m;
  m.id = pop::make_message_id(4, 0);
  m.topic = "t";
  m.attempts = attempts;
  for (std::uint32_t a = 1; a <= attempts; ++a) m.failures.push_back({a, 100 * a, "earlier"});
  return m;
}

publish_outcome failed(std::uint32_t attempts_before, absl::Status why) {
  publish_outcome o;
  o.what = publish_outcome::kind::failed;
  o.id = pop::make_message_id(4, 0);
  o.attempts_before = attempts_before;
  o.status = std::move(why);
  o.at_us = 1'000'000;
  return o;
}

}  // namespace

TEST_CASE("a delivered message is removed", "[relay][policy]") {
  publish_outcome o;
  o.what = publish_outcome::kind::delivered;
  CHECK(decide_outcome(nullptr, o, policy, 0, no_jitter).what == outcome_decision::kind::remove);
}

TEST_CASE("a failure counts an attempt, keeps its history and backs off exponentially",
          "[relay][policy]") {
  const pop::outbox_message m = stored(1);
  const outcome_decision d =
      decide_outcome(&m, failed(1, absl::UnavailableError("down")), policy, 0, no_jitter);
  REQUIRE(d.what == outcome_decision::kind::retry);
  CHECK(d.message->attempts == 2);
  REQUIRE(d.message->failures.size() == 2);
  CHECK(d.message->failures[1].attempt == 2);
  CHECK(d.message->failures[1].at_us == 1'000'000);
  CHECK(d.message->last_error.find("down") != std::string::npos);
  CHECK(d.message->next_attempt_at_us == 1'000'000 + 2'000);  // initial * 2^(2-1)
  // The backoff is capped.
  const pop::detail::outcome_policy many{
      .max_attempts = 99, .initial_backoff_us = 1'000, .max_backoff_us = 5'000};
  const pop::outbox_message late = stored(10);
  CHECK(decide_outcome(&late, failed(10, absl::UnavailableError("down")), many, 0, no_jitter)
            .message->next_attempt_at_us == 1'000'000 + 5'000);
  // The jitter is the relay's to choose, within [d/2, d].
  const auto half = [](std::int64_t d) { return d / 2; };
  CHECK(decide_outcome(&m, failed(1, absl::UnavailableError("down")), policy, 0, half)
            .message->next_attempt_at_us == 1'000'000 + 1'000);
}

TEST_CASE("the last allowed failure and a permanent failure dead-letter with every reason",
          "[relay][policy]") {
  const pop::outbox_message m = stored(2);
  const outcome_decision last =
      decide_outcome(&m, failed(2, absl::UnavailableError("down")), policy, 0, no_jitter);
  REQUIRE(last.what == outcome_decision::kind::dead_letter);
  CHECK(last.letter->reason.find("gave up after 3 failed attempts") != std::string::npos);
  CHECK(last.letter->message.failures.size() == 3);
  CHECK(last.letter->dead_at_us == 1'000'000);
  const pop::outbox_message first = stored(0);
  const outcome_decision permanent =
      decide_outcome(&first, failed(0, pop::permanent_failure(absl::InvalidArgumentError("no"))),
                     policy, 0, no_jitter);
  REQUIRE(permanent.what == outcome_decision::kind::dead_letter);
  CHECK(permanent.letter->reason.find("permanent failure") == 0);
  CHECK(permanent.letter->message.attempts == 1);
}

TEST_CASE("an unavailable destination counts no attempt and waits about as long as the outage",
          "[relay][policy]") {
  const pop::outbox_message m = stored(2);  // one more counted failure would dead-letter it
  const outcome_decision d = decide_outcome(
      &m, failed(2, pop::destination_unavailable(absl::UnavailableError("no broker"))), policy,
      1'000'000 - 3'000, no_jitter);
  REQUIRE(d.what == outcome_decision::kind::retry);
  CHECK(d.message->attempts == 2);
  CHECK(d.message->failures.size() == 2);
  CHECK(d.message->next_attempt_at_us == 1'000'000 + 3'000);
}

TEST_CASE("an outcome for a message changed since it was published writes nothing",
          "[relay][policy]") {
  const pop::outbox_message requeued = stored(0);  // attempts reset by a requeue meanwhile
  CHECK(decide_outcome(&requeued, failed(2, absl::UnavailableError("down")), policy, 0, no_jitter)
            .what == outcome_decision::kind::skip);
  CHECK(decide_outcome(nullptr, failed(2, absl::UnavailableError("down")), policy, 0, no_jitter)
            .what == outcome_decision::kind::skip);
}

TEST_CASE("a malformed entry becomes a malformed dead letter holding it as it was",
          "[relay][policy]") {
  publish_outcome o;
  o.what = publish_outcome::kind::malformed;
  o.id = pop::make_message_id(9, 0);
  o.raw = {{"topic", 5}};
  o.status = absl::InvalidArgumentError("bad topic");
  const outcome_decision d = decide_outcome(nullptr, o, policy, 0, no_jitter);
  REQUIRE(d.what == outcome_decision::kind::dead_letter);
  CHECK(d.letter->malformed);
  const pop::json stored_form = d.letter->to_json();
  CHECK(stored_form.at("message") == o.raw);
  const pop::dead_letter back = pop::dead_letter::from_json(o.id, stored_form).value();
  CHECK(back.malformed);
  CHECK(back.message.id == o.id);
  CHECK(back.reason.find("bad topic") != std::string::npos);
}
