// Tests of pop::relay and its parts (sinks, dead letters, inbox, metrics) on a one-thread
// io_context with real Asio timers: deterministic apart from wall-clock backoff.
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "absl/strings/match.h"
#include "relay/dead_letters.hpp"
#include "relay/inbox.hpp"
#include "relay/jsonl_sink.hpp"
#include "relay/relay.hpp"
#include "relay/topic_router.hpp"
#include "support/scripted_sink.hpp"

namespace asio = boost::asio;
using pop::json;
using pop::test::act;
using pop::test::emit;
using pop::test::scripted_sink;

namespace {

// Runs `work` on `io` until it and everything it started are done; returns its status.
absl::Status run_on(asio::io_context& io, asio::awaitable<absl::Status> work) {
  std::optional<absl::Status> out;
  asio::co_spawn(io, std::move(work), [&](std::exception_ptr e, absl::Status s) {
    if (e) std::rethrow_exception(e);
    out = std::move(s);
  });
  io.run();
  io.restart();
  REQUIRE(out.has_value());
  return *out;
}

// Fast retries so tests finish quickly; real timers all the same.
pop::relay_options quick(std::uint32_t max_attempts = 4) {
  return {.max_in_flight = 64,
          .batch_size = 256,
          .publish_timeout = std::chrono::milliseconds(20),
          .max_attempts = max_attempts,
          .initial_backoff = std::chrono::microseconds(200),
          .max_backoff = std::chrono::microseconds(2000),
          .dead_letter_path = "system.dead_letters",
          .seed = 7};
}

pop::engine& emitting(pop::engine& e) {
  pop::test::register_emitter(e);
  return e;
}

// The acknowledged ids of `sink` grouped by message key, each in acknowledgement order.
std::map<std::string, std::vector<std::string>> acked_by_key(const scripted_sink& sink) {
  std::map<std::string, std::vector<std::string>> out;
  for (const auto& c : sink.calls) {
    if (c.what == act::ok) out[c.message.key].push_back(c.message.id);
  }
  return out;
}

}  // namespace

TEST_CASE("the relay publishes every pending message in commit order and empties the outbox",
          "[relay]") {
  pop::engine e;
  emitting(e);
  std::vector<std::string> ids;
  for (int i = 0; i < 300; ++i) ids.push_back(emit(e, i % 2 ? "a" : ""));
  scripted_sink sink;
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick()));
  pop::relay& r = *r_owner;
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  CHECK(sink.acked == ids);
  CHECK(e.snapshot().pending_count() == 0);
  const pop::relay_metrics m = r.metrics();
  CHECK(m.delivered == 300);
  CHECK(m.published == 300);
  CHECK(m.pending == 0);
  CHECK(m.commit_to_publish_latency.count == 300);
}

TEST_CASE("asynchronous publishes run several at once and keep per-key order", "[relay]") {
  pop::engine e;
  emitting(e);
  std::vector<std::string> ids;
  for (int i = 0; i < 120; ++i) ids.push_back(emit(e, "k" + std::to_string(i % 3)));
  scripted_sink sink;
  sink.synchronous = false;
  sink.latency = std::chrono::microseconds(500);
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick()));
  pop::relay& r = *r_owner;
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  REQUIRE(sink.acked.size() == 120);
  // Three keys publish side by side: no publish of a key starts before the previous one of that
  // key was acknowledged, and the keys interleave.
  for (const auto& [key, acked] : acked_by_key(sink)) {
    CHECK(std::is_sorted(acked.begin(), acked.end()));
    CHECK(acked.size() == 40);
  }
  CHECK(sink.calls[0].message.key != sink.calls[1].message.key);
  CHECK(e.snapshot().pending_count() == 0);
}

TEST_CASE("a running relay is woken by commits, not by polling, and stops on cancellation",
          "[relay]") {
  pop::engine e;
  emitting(e);
  scripted_sink sink;
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick()));
  pop::relay& r = *r_owner;
  asio::io_context io;
  asio::cancellation_signal stop;
  std::optional<absl::Status> result;
  asio::co_spawn(io, r.run(),
                 asio::bind_cancellation_slot(stop.slot(), [&](std::exception_ptr, absl::Status s) {
                   result = std::move(s);
                 }));
  // The relay starts, finds nothing and waits; no timer is pending, so run_one blocks only
  // until a commit posts a wake-up.
  io.poll();
  CHECK(sink.calls.empty());
  std::vector<std::string> ids;
  for (int round = 0; round < 5; ++round) {
    ids.push_back(emit(e, "k"));
    // One handler: the wake-up posted by the commit notification.
    while (sink.acked.size() < ids.size()) io.run_one();
  }
  CHECK(sink.acked == ids);
  stop.emit(asio::cancellation_type::terminal);
  io.run();
  REQUIRE(result.has_value());
  CHECK(result->code() == absl::StatusCode::kCancelled);
  CHECK(e.snapshot().pending_count() == 0);
}

TEST_CASE("a failing message holds back only later messages with its key", "[relay]") {
  pop::engine e;
  emitting(e);
  const std::string poison = emit(e, "k1");
  const std::string after_poison = emit(e, "k1");
  std::vector<std::string> others;
  for (int i = 0; i < 10; ++i) others.push_back(emit(e, "k2"));
  scripted_sink sink;
  sink.script = [&](const pop::outbox_message& m) { return m.id == poison ? act::fail : act::ok; };
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick(3)));
  pop::relay& r = *r_owner;
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  // k2 went through untouched while k1 waited; k1's second message went only after the poison
  // message was dead-lettered.
  std::vector<std::string> k2;
  std::size_t poison_calls = 0;
  std::size_t after_at = 0;
  std::size_t last_poison_at = 0;
  for (std::size_t i = 0; i < sink.calls.size(); ++i) {
    const auto& c = sink.calls[i];
    if (c.message.key == "k2") k2.push_back(c.message.id);
    if (c.message.id == poison) {
      ++poison_calls;
      last_poison_at = i;
    }
    if (c.message.id == after_poison) after_at = i;
  }
  CHECK(k2 == others);
  CHECK(poison_calls == 3);
  CHECK(after_at > last_poison_at);
  CHECK(sink.calls.size() == 3 + 1 + 10);
  auto dead_owner = pop::test::must(pop::dead_letters::create(e));
  pop::dead_letters& dead = *dead_owner;
  REQUIRE(dead.count() == 1);
  CHECK(dead.list().value().at(0).message.id == poison);
  // Every k2 message was published before the poison message's second attempt.
  std::size_t second_poison = 0;
  for (std::size_t i = 0, seen = 0; i < sink.calls.size(); ++i) {
    if (sink.calls[i].message.id == poison && ++seen == 2) second_poison = i;
  }
  std::size_t last_k2 = 0;
  for (std::size_t i = 0; i < sink.calls.size(); ++i) {
    if (sink.calls[i].message.key == "k2") last_k2 = i;
  }
  CHECK(last_k2 < second_poison);
}

TEST_CASE("failed attempts are recorded in the state and retried with growing backoff", "[relay]") {
  pop::engine e;
  emitting(e);
  const std::string id = emit(e, "k");
  scripted_sink sink;
  sink.script = [](const pop::outbox_message& m) { return m.attempts < 4 ? act::fail : act::ok; };
  pop::relay_options o = quick(10);
  o.initial_backoff = std::chrono::microseconds(2000);
  o.max_backoff = std::chrono::microseconds(64000);
  auto r_owner = pop::test::must(pop::relay::create(e, sink, o));
  pop::relay& r = *r_owner;
  // Watch the stored message after every commit: the relay's records are in the state.
  std::vector<pop::outbox_message> seen;
  pop::subscription watch = e.on_commit([&](std::uint64_t) {
    const pop::value_view v = e.snapshot().view(e.outbox_path()).member(id);
    if (v) seen.push_back(pop::outbox_message::from_json(v.to_json()).value());
  });
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  watch.reset();
  REQUIRE(sink.calls.size() == 5);
  REQUIRE(seen.size() == 4);
  for (std::uint32_t i = 0; i < 4; ++i) {
    const pop::outbox_message& m = seen[i];
    CHECK(m.attempts == i + 1);
    REQUIRE(m.failures.size() == i + 1);
    CHECK(m.last_error == m.failures.back().error);
    CHECK(m.last_error.find("attempt " + std::to_string(i + 1)) != std::string::npos);
    // Backoff d = 2 ms * 2^i, drawn in [d/2, d].
    const std::int64_t d = 2000LL << i;
    const std::int64_t wait = m.next_attempt_at_us - m.failures.back().at_us;
    CHECK(wait >= d / 2);
    CHECK(wait <= d);
  }
  // The sink was not called again before the recorded time.
  for (std::size_t i = 1; i < sink.calls.size(); ++i) {
    const auto gap = std::chrono::duration_cast<std::chrono::microseconds>(sink.calls[i].at -
                                                                           sink.calls[i - 1].at);
    CHECK(gap.count() >= (2000LL << (i - 1)) / 2 - 200);
  }
  CHECK(sink.acked == std::vector<std::string>{id});
  CHECK(r.metrics().retried == 4);
}

TEST_CASE(
    "a destination outage longer than max_attempts dead-letters nothing and counts no attempt",
    "[relay]") {
  pop::engine e;
  emitting(e);
  const std::string a = emit(e, "k");
  const std::string b = emit(e, "k");
  scripted_sink sink;
  int calls = 0;
  // The destination is down for 12 publishes (max_attempts is 3), then one real failure.
  sink.script = [&](const pop::outbox_message&) {
    ++calls;
    if (calls <= 12) return act::down;
    return calls == 13 ? act::fail : act::ok;
  };
  pop::relay_options o = quick(3);
  o.initial_backoff = std::chrono::microseconds(500);
  o.max_backoff = std::chrono::microseconds(4000);
  auto r_owner = pop::test::must(pop::relay::create(e, sink, o));
  pop::relay& r = *r_owner;
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  CHECK(sink.acked == std::vector<std::string>{a, b});  // in order, nothing dead-lettered
  CHECK(pop::test::must(pop::dead_letters::create(e))->count() == 0);
  // Only the real failure counted: message a was delivered at its second counted attempt.
  const auto a_calls = std::count_if(sink.calls.begin(), sink.calls.end(),
                                     [&](const auto& c) { return c.message.id == a; });
  CHECK(a_calls == 14);
  CHECK(sink.calls.back().message.attempts == 0);  // b never failed
  const auto last_a = std::find_if(sink.calls.rbegin(), sink.calls.rend(),
                                   [&](const auto& c) { return c.message.id == a; });
  CHECK(last_a->message.attempts == 1);
  CHECK(last_a->message.failures.size() == 1);
}

TEST_CASE("after max attempts a message is dead-lettered with every reason and requeue delivers it",
          "[relay]") {
  pop::engine e;
  emitting(e);
  const std::string id = emit(e, "k", json{{"order", "o-1"}});
  scripted_sink sink;
  bool broken = true;
  sink.script = [&](const pop::outbox_message&) { return broken ? act::fail : act::ok; };
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick(3)));
  pop::relay& r = *r_owner;
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  CHECK(e.snapshot().pending_count() == 0);
  auto dead_owner = pop::test::must(pop::dead_letters::create(e));
  pop::dead_letters& dead = *dead_owner;
  const std::vector<pop::dead_letter> letters = dead.list().value();
  REQUIRE(letters.size() == 1);
  const pop::dead_letter& d = letters[0];
  CHECK(d.message.id == id);
  CHECK(d.message.payload == json{{"order", "o-1"}});
  CHECK(d.message.attempts == 3);
  REQUIRE(d.message.failures.size() == 3);
  for (std::uint32_t i = 0; i < 3; ++i) {
    CHECK(d.message.failures[i].attempt == i + 1);
    CHECK(d.message.failures[i].error.find("attempt " + std::to_string(i + 1)) !=
          std::string::npos);
    CHECK(d.message.failures[i].at_us > 0);
  }
  CHECK(d.reason.find("gave up after 3 failed attempts") != std::string::npos);
  CHECK(d.dead_at_us >= d.message.failures.back().at_us);
  CHECK(r.metrics().dead_lettered == 1);
  CHECK(r.metrics().dead_letters == 1);

  // Requeue: back under its old id, attempts reset, history kept; the relay delivers it.
  broken = false;
  REQUIRE(dead.requeue(id).ok());
  CHECK(dead.count() == 0);
  const pop::outbox_message back = e.snapshot().pending_messages().value().at(0);
  CHECK(back.id == id);
  CHECK(back.attempts == 0);
  CHECK(back.failures.size() == 3);
  REQUIRE(run_on(io, r.drain()).ok());
  CHECK(sink.acked == std::vector<std::string>{id});
  CHECK(e.snapshot().pending_count() == 0);

  // Requeue errors name the id and change nothing.
  const std::uint64_t v = e.version();
  const auto missing = dead.requeue("00000000000000000099-000000");
  CHECK(missing.status().code() == absl::StatusCode::kNotFound);
  CHECK(std::string(missing.status().message()).find("00000000000000000099-000000") !=
        std::string::npos);
  CHECK(e.version() == v);
}

TEST_CASE("requeue_all moves every dead letter back in one commit", "[relay]") {
  pop::engine e;
  emitting(e);
  for (int i = 0; i < 5; ++i) emit(e, "k" + std::to_string(i));
  scripted_sink sink;
  sink.script = [](const pop::outbox_message&) { return act::permanent; };
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick()));
  pop::relay& r = *r_owner;
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  // Permanent failures are dead-lettered at the first attempt.
  CHECK(sink.calls.size() == 5);
  auto dead_owner = pop::test::must(pop::dead_letters::create(e));
  pop::dead_letters& dead = *dead_owner;
  REQUIRE(dead.count() == 5);
  CHECK(dead.list().value().at(0).reason.find("permanent failure") != std::string::npos);
  const std::uint64_t before = e.version();
  CHECK(dead.requeue_all().value() == 5);
  CHECK(e.version() == before + 1);
  CHECK(dead.count() == 0);
  CHECK(e.snapshot().pending_count() == 5);
  CHECK(dead.requeue_all().value() == 0);
}

TEST_CASE("a publish that times out is cancelled, recorded and retried", "[relay]") {
  pop::engine e;
  emitting(e);
  const std::string id = emit(e, "k");
  scripted_sink sink;
  sink.script = [](const pop::outbox_message& m) {
    return m.attempts == 0 ? act::timeout : act::ok;
  };
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick()));
  pop::relay& r = *r_owner;
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  REQUIRE(sink.calls.size() == 2);
  CHECK(sink.calls[1].message.attempts == 1);
  CHECK(sink.calls[1].message.last_error.find("timed out after 20 ms") != std::string::npos);
  CHECK(absl::StrContains(sink.calls[1].message.failures.at(0).error, "DEADLINE_EXCEEDED"));
  CHECK(sink.acked == std::vector<std::string>{id});
}

TEST_CASE("an exception from the sink is a failed attempt, never a dead relay", "[relay]") {
  pop::engine e;
  emitting(e);
  const std::string first = emit(e, "k");
  const std::string second = emit(e, "k");
  scripted_sink sink;
  sink.script = [&](const pop::outbox_message& m) {
    return m.id == first && m.attempts == 0 ? act::raise : act::ok;
  };
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick()));
  pop::relay& r = *r_owner;
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  CHECK(sink.acked == std::vector<std::string>{first, second});
  REQUIRE(sink.calls.size() == 3);
  CHECK(sink.calls[1].message.last_error.find("sink exploded on " + first) != std::string::npos);
}

TEST_CASE("an outbox entry that is not a valid message is refused at commit and the relay goes on",
          "[relay]") {
  pop::engine e;
  emitting(e);
  const std::string good = emit(e, "");
  const std::string bad = pop::make_message_id(99, 0);
  const std::uint64_t before = e.version();
  const auto refused =
      e.compare_and_swap(e.version(), {{"domain.outbox_queue." + bad, json{{"topic", 5}}}});
  CHECK(refused.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains(bad));
  CHECK(e.version() == before);
  CHECK(e.snapshot().pending_count() == 1);
  scripted_sink sink;
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick()));
  pop::relay& r = *r_owner;
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  CHECK(sink.acked == std::vector<std::string>{good});
  CHECK(pop::test::must(pop::dead_letters::create(e))->count() == 0);
}

TEST_CASE("a requeued message does not overtake a message of its key that is in flight",
          "[relay]") {
  pop::engine e;
  emitting(e);
  const std::string x = emit(e, "k");
  scripted_sink sink;
  sink.synchronous = false;
  bool first_round = true;
  sink.script = [&](const pop::outbox_message& m) {
    if (m.id == x && first_round) return act::permanent;
    if (m.id != x) return act::timeout;  // y: in flight until its timeout
    return act::ok;
  };
  pop::relay_options o = quick(1);
  o.publish_timeout = std::chrono::milliseconds(40);
  auto r_owner = pop::test::must(pop::relay::create(e, sink, o));
  pop::relay& r = *r_owner;
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  REQUIRE(pop::test::must(pop::dead_letters::create(e))->count() == 1);
  first_round = false;
  const std::string y = emit(e, "k");
  asio::cancellation_signal stop;
  asio::co_spawn(
      io, r.run(),
      asio::bind_cancellation_slot(stop.slot(), [](std::exception_ptr, absl::Status) {}));
  while (sink.calls.size() < 2) io.run_one();  // y is in flight
  REQUIRE(sink.calls.back().message.id == y);
  REQUIRE(pop::test::must(pop::dead_letters::create(e))->requeue(x).ok());
  while (sink.calls.size() < 3) io.run_one();
  // x (lower id, same key) went only after y's publish ended at its timeout.
  CHECK(sink.calls[2].message.id == x);
  CHECK(sink.calls[2].at - sink.calls[1].at >= std::chrono::milliseconds(35));
  stop.emit(asio::cancellation_type::terminal);
  io.run();
}

TEST_CASE("stopping mid-batch keeps in-flight messages queued and a new relay resumes", "[relay]") {
  pop::engine e;
  emitting(e);
  std::vector<std::string> ids;
  for (int i = 0; i < 40; ++i) ids.push_back(emit(e, "k" + std::to_string(i % 4)));
  scripted_sink first;
  first.synchronous = false;
  // The first 10 publishes succeed, then every publish hangs until cancelled.
  first.script = [&](const pop::outbox_message&) {
    return first.calls.size() < 10 ? act::ok : act::hang;
  };
  pop::relay_options o = quick();
  o.publish_timeout = std::chrono::hours(1);
  asio::io_context io;
  asio::cancellation_signal stop;
  std::optional<absl::Status> stopped;
  {
    auto r_owner = pop::test::must(pop::relay::create(e, first, o));
    pop::relay& r = *r_owner;
    asio::co_spawn(
        io, r.run(),
        asio::bind_cancellation_slot(
            stop.slot(), [&](std::exception_ptr, absl::Status s) { stopped = std::move(s); }));
    while (first.calls.size() < 14) io.run_one();
    stop.emit(asio::cancellation_type::terminal);
    io.run();
    io.restart();
    REQUIRE(stopped.has_value());
    CHECK(stopped->code() == absl::StatusCode::kCancelled);
  }
  const std::set<std::string> in_flight_at_stop = [&] {
    std::set<std::string> s;
    for (const auto& c : first.calls) {
      if (c.what == act::hang) s.insert(c.message.id);
    }
    return s;
  }();
  CHECK(in_flight_at_stop.size() == 4);  // one per key: the in-flight limit per key
  // Nothing acknowledged is still queued; every hanging one is, unchanged (no attempt counted).
  const std::vector<pop::outbox_message> pending = e.snapshot().pending_messages().value();
  CHECK(pending.size() == 30);
  for (const pop::outbox_message& m : pending) {
    CHECK(m.attempts == 0);
    CHECK(std::find(first.acked.begin(), first.acked.end(), m.id) == first.acked.end());
  }
  scripted_sink second;
  auto resumed_owner = pop::test::must(pop::relay::create(e, second, o));
  pop::relay& resumed = *resumed_owner;
  REQUIRE(run_on(io, resumed.drain()).ok());
  std::multiset<std::string> all(first.acked.begin(), first.acked.end());
  all.insert(second.acked.begin(), second.acked.end());
  CHECK(std::set<std::string>(all.begin(), all.end()) ==
        std::set<std::string>(ids.begin(), ids.end()));
  CHECK(all.size() == ids.size());  // nothing acknowledged twice: stop recorded its acks first
  for (const auto& [key, acked] : acked_by_key(second))
    CHECK(std::is_sorted(acked.begin(), acked.end()));
}

TEST_CASE("seeded faults: every message ends delivered or dead-lettered and the counts add up",
          "[relay][faults]") {
  const std::uint64_t seed = GENERATE(1u, 2u, 3u);
  INFO("seed " << seed);
  pop::engine e;
  emitting(e);
  std::vector<std::string> ids;
  for (int i = 0; i < 400; ++i) ids.push_back(emit(e, "k" + std::to_string(i % 12)));
  scripted_sink sink;
  sink.synchronous = false;
  std::mt19937_64 rng(seed);
  sink.script = [&](const pop::outbox_message&) {
    const int roll = static_cast<int>(rng() % 100);
    if (roll < 15) return act::fail;
    if (roll < 25) return act::raise;
    if (roll < 32) return act::timeout;
    return act::ok;
  };
  pop::relay_options o = quick(3);
  o.publish_timeout = std::chrono::milliseconds(2);
  auto r_owner = pop::test::must(pop::relay::create(e, sink, o));
  pop::relay& r = *r_owner;
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  CHECK(e.snapshot().pending_count() == 0);
  const std::vector<pop::dead_letter> dead =
      pop::test::must(pop::dead_letters::create(e))->list().value();
  std::set<std::string> ended(sink.acked.begin(), sink.acked.end());
  CHECK(ended.size() == sink.acked.size());
  for (const pop::dead_letter& d : dead) {
    CHECK(ended.insert(d.message.id).second);
    CHECK(d.message.failures.size() == 3);
  }
  CHECK(ended == std::set<std::string>(ids.begin(), ids.end()));
  const pop::relay_metrics m = r.metrics();
  CHECK(m.delivered + m.dead_lettered == ids.size());
  CHECK(m.delivered == sink.acked.size());
  CHECK(m.dead_lettered == dead.size());
  std::size_t failed_calls = sink.calls.size() - sink.acked.size();
  CHECK(m.retried + m.dead_lettered == failed_calls);
  CHECK(!dead.empty());
  for (const auto& [key, acked] : acked_by_key(sink))
    CHECK(std::is_sorted(acked.begin(), acked.end()));
}

TEST_CASE("relay options are validated and a relay runs once at a time", "[relay]") {
  pop::engine e;
  scripted_sink sink;
  pop::relay_options bad;
  bad.max_attempts = 0;
  CHECK_THAT(std::string(pop::relay::create(e, sink, bad).status().message()),
             Catch::Contains("max_attempts"));
  bad = {};
  bad.dead_letter_path = "domain.outbox_queue.dead";
  CHECK_THAT(std::string(pop::relay::create(e, sink, bad).status().message()),
             Catch::Contains("overlaps the outbox"));
  bad = {};
  bad.dead_letter_path = "a..b";
  CHECK_THAT(std::string(pop::relay::create(e, sink, bad).status().message()),
             Catch::Contains("dead_letter_path"));

  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick()));
  pop::relay& r = *r_owner;
  asio::io_context io;
  asio::cancellation_signal stop;
  std::optional<absl::Status> first;
  asio::co_spawn(io, r.run(),
                 asio::bind_cancellation_slot(stop.slot(), [&](std::exception_ptr, absl::Status s) {
                   first = std::move(s);
                 }));
  io.poll();
  const absl::Status second = [&] {
    std::optional<absl::Status> out;
    asio::co_spawn(io, r.drain(), [&](std::exception_ptr, absl::Status s) { out = std::move(s); });
    io.poll();
    return *out;
  }();
  CHECK(second.code() == absl::StatusCode::kFailedPrecondition);
  stop.emit(asio::cancellation_type::terminal);
  io.run();
  CHECK(first->code() == absl::StatusCode::kCancelled);
}

TEST_CASE("the topic router routes by topic and pattern and applies its unknown-topic policy",
          "[relay][sink]") {
  pop::engine e;
  emitting(e);
  const std::string to_t = emit(e, "");
  const std::string to_u = e.execute("emit", {{"topic", "u"}}).value().message_ids.at(0);
  std::vector<std::string> got_t;
  std::vector<std::string> got_u;

  pop::topic_router router;
  REQUIRE(router
              .on("t",
                  [&](const pop::outbox_message& m) {
                    got_t.push_back(m.id);
                    return absl::OkStatus();
                  })
              .ok());
  CHECK(router.on("t", [](const pop::outbox_message&) { return absl::OkStatus(); }).code() ==
        absl::StatusCode::kAlreadyExists);
  CHECK(
      router.on("bad topic", [](const pop::outbox_message&) { return absl::OkStatus(); }).code() ==
      absl::StatusCode::kInvalidArgument);

  SECTION("an awaitable handler for a pattern") {
    REQUIRE(router
                .on("u.*",
                    [&](const pop::outbox_message& m) -> asio::awaitable<absl::Status> {
                      got_u.push_back(m.topic);
                      co_return absl::OkStatus();
                    })
                .ok());
    REQUIRE(router
                .on("*.x",
                    [&](const pop::outbox_message&) -> asio::awaitable<absl::Status> {
                      co_return absl::OkStatus();
                    })
                .code() == absl::StatusCode::kInvalidArgument);
    REQUIRE(router
                .on("u",
                    [&](const pop::outbox_message& m) -> asio::awaitable<absl::Status> {
                      got_u.push_back(m.id);
                      co_return absl::OkStatus();
                    })
                .ok());
    auto r_owner = pop::test::must(pop::relay::create(e, router, quick()));
    pop::relay& r = *r_owner;
    asio::io_context io;
    REQUIRE(run_on(io, r.drain()).ok());
    CHECK(got_t == std::vector<std::string>{to_t});
    CHECK(got_u == std::vector<std::string>{to_u});
  }
  SECTION("unknown topics are dead-lettered at once under unknown_topic::dead_letter") {
    pop::topic_router strict(pop::unknown_topic::dead_letter);
    REQUIRE(strict
                .on("t",
                    [&](const pop::outbox_message& m) {
                      got_t.push_back(m.id);
                      return absl::OkStatus();
                    })
                .ok());
    auto r_owner = pop::test::must(pop::relay::create(e, strict, quick()));
    pop::relay& r = *r_owner;
    asio::io_context io;
    REQUIRE(run_on(io, r.drain()).ok());
    const auto dead = pop::test::must(pop::dead_letters::create(e))->list().value();
    REQUIRE(dead.size() == 1);
    CHECK(dead[0].message.id == to_u);
    CHECK(dead[0].reason.find("no handler for topic 'u'") != std::string::npos);
  }
  SECTION("unknown topics are acknowledged and counted under unknown_topic::drop") {
    pop::topic_router lenient(pop::unknown_topic::drop);
    auto r_owner = pop::test::must(pop::relay::create(e, lenient, quick()));
    pop::relay& r = *r_owner;
    asio::io_context io;
    REQUIRE(run_on(io, r.drain()).ok());
    CHECK(lenient.dropped() == 2);
    CHECK(e.snapshot().pending_count() == 0);
  }
}

TEST_CASE("the JSON-lines sink writes one line per message", "[relay][sink]") {
  pop::engine e;
  emitting(e);
  const std::string id = emit(e, "k", json{{"n", 1}});
  const std::string file = "relay_test_jsonl.out";
  std::remove(file.c_str());
  {
    auto sink = pop::jsonl_sink::open(file).value();
    auto r_owner = pop::test::must(pop::relay::create(e, *sink, quick()));
    pop::relay& r = *r_owner;
    asio::io_context io;
    REQUIRE(run_on(io, r.drain()).ok());
    CHECK(sink->written() == 1);
  }
  std::ifstream in(file);
  std::string line;
  REQUIRE(std::getline(in, line));
  const json j = json::parse(line);
  CHECK(j.at("id") == id);
  CHECK(j.at("payload") == json{{"n", 1}});
  CHECK(j.at("key") == "k");
  CHECK(!std::getline(in, line));
  std::remove(file.c_str());
  CHECK(pop::jsonl_sink::open("/nonexistent-dir/x.jsonl").status().code() ==
        absl::StatusCode::kUnavailable);
}

TEST_CASE("metrics render in the Prometheus text format", "[relay][metrics]") {
  pop::engine e;
  emitting(e);
  for (int i = 0; i < 3; ++i) emit(e, "");
  scripted_sink sink;
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick()));
  pop::relay& r = *r_owner;
  CHECK(r.metrics().pending == 3);
  CHECK(r.metrics().oldest_pending_age_s >= 0);
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  const std::string text = pop::to_prometheus(r.metrics());
  CHECK(text.find("# TYPE pop_relay_delivered_total counter\npop_relay_delivered_total 3\n") !=
        std::string::npos);
  CHECK(text.find("pop_relay_pending 0\n") != std::string::npos);
  CHECK(text.find("pop_relay_publish_latency_seconds_bucket{le=\"+Inf\"} 3\n") !=
        std::string::npos);
  CHECK(text.find("pop_relay_commit_to_publish_latency_seconds_count 3\n") != std::string::npos);
  const pop::latency_histogram h = r.metrics().commit_to_publish_latency;
  CHECK(h.quantile_us(0.5) > 0);
  CHECK(h.quantile_us(0.5) <= h.quantile_us(1.0));
}

TEST_CASE("an inbox applies the same message once however often it arrives", "[relay][inbox]") {
  auto e_owner = pop::test::must(
      pop::engine::open(pop::options{.initial_state = {{"domain", {{"paid", 0}}}}}));
  pop::engine& e = *e_owner;
  auto in_owner =
      pop::test::must(pop::inbox::create(e, {.path = "system.inbox.orders", .retention = 8}));
  pop::inbox& in = *in_owner;
  REQUIRE(in.register_handler(
                {.name = "on_payment", .inputs = {"domain.paid"}, .outputs = {"domain.paid"}},
                [](const pop::context& ctx, const pop::outbox_message& m) {
                  pop::result r;
                  r.set("domain.paid",
                        ctx.get<int>("domain.paid") + m.payload.at("amount").get<int>());
                  return r;
                })
              .ok());
  pop::outbox_message m;
  m.id = pop::make_message_id(3, 0);
  m.topic = "payment.confirmed";
  m.payload = {{"amount", 5}};
  const pop::inbox_result first = in.apply("on_payment", m).value();
  CHECK(first.applied);
  const pop::inbox_result again = in.apply("on_payment", m).value();
  CHECK(!again.applied);
  CHECK(again.done.version == first.done.version);
  CHECK(e.snapshot().read("domain.paid").value() == 5);
  CHECK(in.contains(m.id));

  // A failing application commits nothing, not even the mark, so a redelivery applies it.
  pop::outbox_message broken = m;
  broken.id = pop::make_message_id(4, 0);
  broken.payload = {{"amount", "five"}};
  const std::uint64_t v = e.version();
  CHECK(!in.apply("on_payment", broken).ok());
  CHECK(e.version() == v);
  CHECK(!in.contains(broken.id));

  CHECK(in.apply("nope", m).status().code() == absl::StatusCode::kNotFound);
  pop::outbox_message odd = m;
  odd.id = "has space";
  CHECK(in.apply("on_payment", odd).status().code() == absl::StatusCode::kInvalidArgument);

  // Retention: beyond 8 + 1 marks the lowest ids are pruned back to 8.
  for (std::uint64_t i = 10; i < 20; ++i) {
    m.id = pop::make_message_id(i, 0);
    REQUIRE(in.apply("on_payment", m).value().applied);
  }
  CHECK(in.size() <= 9);
  CHECK(!in.contains(pop::make_message_id(3, 0)));
  CHECK(in.contains(pop::make_message_id(19, 0)));
  CHECK(e.snapshot().read("domain.paid").value() == 55);
}
