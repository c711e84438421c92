// Tests of pop::relay and its parts (sinks, dead letters, inbox, metrics) on a one-thread
// io_context with real Asio timers: deterministic apart from wall-clock backoff.
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "absl/strings/match.h"
#include "pop/relay/dead_letters.hpp"
#include "pop/relay/inbox.hpp"
#include "pop/relay/jsonl_sink.hpp"
#include "pop/relay/relay.hpp"
#include "pop/relay/topic_router.hpp"
#include "tests/support/asio_run.hpp"
#include "tests/support/scripted_sink.hpp"

namespace asio = boost::asio;
using pop::json;
using pop::test::act;
using pop::test::emit;
using pop::test::quick_relay;
using pop::test::register_emitter;
using pop::test::run_on;
using pop::test::scripted_sink;

namespace {

// The acknowledged ids of `sink` grouped by message key, each in acknowledgement order.
std::map<std::string, std::vector<std::string>> acked_by_key(const scripted_sink& sink) {
  std::map<std::string, std::vector<std::string>> out;
  for (const auto& c : sink.calls) {
    if (c.what == act::ok) out[c.message.key].push_back(c.message.id);
  }
  return out;
}

// An asynchronous sink whose publishes finish only when the test releases them, in the order it
// chooses (no time involved).
class gated_sink final : public pop::sink {
 public:
  std::vector<std::string> acked;

  std::optional<absl::Status> publish_now(const pop::outbox_message&) override {
    return std::nullopt;
  }
  asio::awaitable<absl::Status> publish(const pop::outbox_message& m) override {
    asio::steady_timer gate(co_await asio::this_coro::executor,
                            asio::steady_timer::time_point::max());
    gates_[m.id] = &gate;
    co_await gate.async_wait(asio::as_tuple(asio::use_awaitable));
    gates_.erase(m.id);
    acked.push_back(m.id);
    co_return absl::OkStatus();
  }
  // Lets the publish of `id` finish; false if none is waiting.
  bool release(const std::string& id) {
    const auto g = gates_.find(id);
    if (g == gates_.end()) return false;
    g->second->cancel();
    return true;
  }

 private:
  std::map<std::string, asio::steady_timer*> gates_;
};

// A relay of `e` running on a one-thread io_context (polled once at the start) until stop().
struct polled_relay {
  polled_relay(pop::engine& e, pop::sink& sink, const pop::relay_options& o)
      : owner(pop::test::must(pop::relay::create(e, sink, o))) {
    pop::test::spawn_stoppable(io, owner->run(), signal, result);
    io.poll();
  }
  pop::relay& operator*() { return *owner; }
  pop::relay* operator->() { return owner.get(); }
  // Cancels the run and runs the io_context until it ended.
  void stop() {
    signal.emit(asio::cancellation_type::terminal);
    io.run();
  }

  std::unique_ptr<pop::relay> owner;  // (outlives the io_context and the run's frames in it)
  asio::io_context io;
  asio::cancellation_signal signal;
  std::optional<absl::Status> result;
};

// Holds this thread until 50 us after `posted` (a commit's wake-up), as a machine whose idle
// cores wake slowly would hold the relay's: spinning is then worth its processor time to it.
void wake_up_slowly(std::chrono::steady_clock::time_point posted) {
  while (std::chrono::steady_clock::now() - posted < std::chrono::microseconds(50)) {
  }
}

// Calls `fn` from a handler `turns` turns of `io` from now: behind what is queued meanwhile.
void after_turns(asio::io_context& io, int turns, std::function<void()> fn) {
  if (turns == 0) {
    fn();
    return;
  }
  asio::post(io, [&io, turns, fn = std::move(fn)]() mutable {
    after_turns(io, turns - 1, std::move(fn));
  });
}

}  // namespace

TEST_CASE("the relay publishes every pending message in commit order and empties the outbox",
          "[relay]") {
  pop::engine e;
  register_emitter(e);
  std::vector<std::string> ids;
  for (int i = 0; i < 300; ++i) ids.push_back(emit(e, i % 2 ? "a" : ""));
  scripted_sink sink;
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick_relay()));
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

TEST_CASE("a message rewritten after its publish and before the clear is published again",
          "[relay]") {
  // The clear removes exactly what was published: an entry another writer changed meanwhile (a
  // process rewriting a pending message) stays, and its new content is published.
  pop::engine e;
  register_emitter(e);
  const std::string id = emit(e, "k", json{{"v", 1}});
  scripted_sink sink;
  bool rewritten = false;
  // Rewrites `m`'s entry with payload {"v": 2}, once, as another writer would.
  const auto rewrite_once = [&](const pop::outbox_message& m) {
    if (rewritten) return;
    rewritten = true;
    pop::outbox_message changed = m;
    changed.payload = json{{"v", 2}};
    const auto r =
        e.compare_and_swap(e.version(), {{e.outbox_path().str() + "." + m.id, changed.to_json()}},
                           pop::cas_mode::keys);
    CHECK((r.ok() && r->committed));
  };
  sink.script = [&](const pop::outbox_message& m) {
    rewrite_once(m);
    return act::ok;
  };
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick_relay()));
  asio::io_context io;
  REQUIRE(run_on(io, r_owner->drain()).ok());
  REQUIRE(sink.calls.size() == 2);
  CHECK(sink.calls[0].message.payload == json{{"v", 1}});
  CHECK(sink.calls[1].message.id == id);
  CHECK(sink.calls[1].message.payload == json{{"v", 2}});
  CHECK(e.snapshot().pending_count() == 0);

  // The same when the delivery is recorded together with a failure (one transaction for both).
  const std::string failing = emit(e, "a", json{{"v", 1}});
  const std::string changing = emit(e, "b", json{{"v", 1}});
  sink.calls.clear();
  rewritten = false;
  bool failed = false;
  sink.script = [&](const pop::outbox_message& m) {
    if (m.id == failing && !failed) {
      failed = true;
      return act::fail;
    }
    if (m.id == changing) rewrite_once(m);
    return act::ok;
  };
  REQUIRE(run_on(io, r_owner->drain()).ok());
  std::vector<json> changing_payloads;
  for (const auto& c : sink.calls) {
    if (c.message.id == changing) changing_payloads.push_back(c.message.payload);
  }
  CHECK(changing_payloads == std::vector<json>{json{{"v", 1}}, json{{"v", 2}}});
  CHECK(e.snapshot().pending_count() == 0);
}

TEST_CASE("asynchronous publishes run several at once and keep per-key order", "[relay]") {
  pop::engine e;
  register_emitter(e);
  std::vector<std::string> ids;
  for (int i = 0; i < 120; ++i) ids.push_back(emit(e, "k" + std::to_string(i % 3)));
  scripted_sink sink;
  sink.synchronous = false;
  sink.latency = std::chrono::microseconds(500);
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick_relay()));
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
  register_emitter(e);
  scripted_sink sink;
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick_relay()));
  pop::relay& r = *r_owner;
  asio::io_context io;
  asio::cancellation_signal stop;
  std::optional<absl::Status> result;
  pop::test::spawn_stoppable(io, r.run(), stop, result);
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

TEST_CASE("deliveries are cleared together within clear_delay, failures and a stop at once",
          "[relay]") {
  pop::engine e;  // the system clock: clear_delay is real time
  register_emitter(e);
  scripted_sink sink;
  sink.script = [](const pop::outbox_message& m) {
    return m.key == "bad" && m.attempts == 0 ? act::fail : act::ok;
  };
  pop::relay_options o = quick_relay();
  o.clear_delay = std::chrono::hours(1);                      // never reached by this test
  o.initial_backoff = o.max_backoff = std::chrono::hours(1);  // nor is a retry
  auto r_owner = pop::test::must(pop::relay::create(e, sink, o));
  pop::relay& r = *r_owner;
  asio::io_context io;
  asio::cancellation_signal stop;
  std::optional<absl::Status> result;
  pop::test::spawn_stoppable(io, r.run(), stop, result);
  io.poll();
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) {
    ids.push_back(emit(e, "k" + std::to_string(i)));
    io.poll();
  }
  // Every message is published at once, none is cleared yet: no clearing commit so far.
  CHECK(sink.acked == ids);
  CHECK(r.metrics().clears == 0);
  CHECK(e.snapshot().pending_count() == 5);
  // A failure is recorded at once (with the deliveries gathered so far).
  const std::string bad = emit(e, "bad");
  io.poll();
  CHECK(r.metrics().clears == 1);
  const std::vector<pop::outbox_message> pending = e.snapshot().pending_messages().value();
  REQUIRE(pending.size() == 1);
  CHECK(pending[0].id == bad);
  CHECK(pending[0].attempts == 1);
  // Stopping records what is known: nothing delivered stays queued.
  ids.push_back(emit(e, "k9"));
  io.poll();
  stop.emit(asio::cancellation_type::terminal);
  io.run();
  REQUIRE(result.has_value());
  const std::vector<pop::outbox_message> left = e.snapshot().pending_messages().value();
  REQUIRE(left.size() == 1);
  CHECK(left[0].id == bad);
}

TEST_CASE("deliveries read in many rounds are cleared by one commit", "[relay]") {
  // Nothing rewrote the outbox between the rounds, so each delivered entry is known unchanged in
  // the newest round's snapshot: one clear against it covers all (not one per round).
  pop::engine e;  // the system clock: clear_delay is real time
  register_emitter(e);
  scripted_sink sink;
  pop::relay_options o = quick_relay();
  o.clear_delay = std::chrono::hours(1);  // never reached by this test
  polled_relay r(e, sink, o);
  std::vector<std::string> ids;
  for (int i = 0; i < 8; ++i) {
    ids.push_back(emit(e, "k" + std::to_string(i % 3)));
    r.io.poll();  // a round (and a snapshot) per message
  }
  CHECK(sink.acked == ids);
  CHECK(r->metrics().clears == 0);
  const std::uint64_t before = e.version();
  r.stop();
  REQUIRE(r.result.has_value());
  CHECK(r->metrics().clears == 1);
  CHECK(r->metrics().delivered == 8);
  CHECK(e.version() == before + 1);
  CHECK(e.snapshot().pending_count() == 0);
}

namespace {

// An engine with the emitter, and a sink that fails the message whose id is `poison` and
// acknowledges every other.
struct poisoned {
  pop::engine e;
  scripted_sink sink;
  std::string poison;
  poisoned() {
    register_emitter(e);
    sink.script = [this](const pop::outbox_message& m) {
      return m.id == poison ? act::fail : act::ok;
    };
  }
};

}  // namespace

TEST_CASE("a relay holds its engine's pace while it publishes without failures",
          "[relay][pacing]") {
  poisoned p;
  auto& [e, sink, poison] = p;
  pop::relay_options o = quick_relay(1);  // (a failed message is dead-lettered at once)
  polled_relay r(e, sink, o);
  CHECK(e.pacing().holds == 0);  // nothing published yet
  CHECK(!r->metrics().holding_pace);
  emit(e, "k1");
  r.io.poll();
  REQUIRE(sink.acked.size() == 1);
  CHECK(e.pacing().holds == 1);
  CHECK(r->metrics().holding_pace);
  CHECK(pop::to_prometheus(r->metrics()).find("pop_relay_holding_pace 1\n") != std::string::npos);
  emit(e, "k1");
  r.io.poll();
  REQUIRE(sink.acked.size() == 2);
  CHECK(e.pacing().holds == 1);
  CHECK(e.pacing().taken == 1);  // (one hold, kept from round to round)
  poison = emit(e, "k2");
  r.io.poll();
  REQUIRE(sink.ids(act::fail) == std::vector<std::string>{poison});
  // A round whose publishes all failed lets it go: producers never wait for a relay that
  // cannot publish.
  CHECK(e.pacing().holds == 0);
  CHECK(!r->metrics().holding_pace);
  emit(e, "k3");
  r.io.poll();
  REQUIRE(sink.acked.size() == 3);
  CHECK(e.pacing().holds == 1);  // publishing again
  CHECK(e.pacing().taken == 2);
  r.stop();
  REQUIRE(r.result.has_value());
  CHECK(e.pacing().holds == 0);  // a stopped relay holds nothing
  CHECK(!r->metrics().holding_pace);
}

TEST_CASE("a relay keeps the pace while other keys publish beside a failing one",
          "[relay][pacing]") {
  poisoned p;
  auto& [e, sink, poison] = p;
  pop::relay_options o = quick_relay(3);
  o.initial_backoff = std::chrono::minutes(10);  // (no retry within the test)
  o.max_backoff = std::chrono::minutes(10);
  polled_relay r(e, sink, o);
  emit(e, "k1");
  r.io.poll();
  CHECK(e.pacing().holds == 1);
  // One round: the failing message and another key's, published: its clears still pace
  // producers (and a relay that clears nothing would stall their waits after pace_wait).
  poison = emit(e, "k2");
  emit(e, "k3");
  r.io.poll();
  REQUIRE(sink.ids(act::fail) == std::vector<std::string>{poison});
  REQUIRE(sink.acked.size() == 2);
  CHECK(e.pacing().holds == 1);
  CHECK(e.pacing().taken == 1);
  r.stop();
}

TEST_CASE("deliveries that finish out of commit order are cleared once, none published again",
          "[relay]") {
  // Y (read in a later round) is acknowledged before X: the relay holds X's older snapshot after
  // Y's. Both must be cleared against a snapshot that has them.
  pop::engine e;
  register_emitter(e);
  gated_sink sink;
  pop::relay_options o = quick_relay();
  o.clear_delay = std::chrono::hours(1);  // clears come with the stop only
  polled_relay r(e, sink, o);
  const std::string x = emit(e, "a");
  r.io.poll();
  const std::string y = emit(e, "b");
  r.io.poll();
  REQUIRE(sink.release(y));
  r.io.poll();
  REQUIRE(sink.release(x));
  r.io.poll();
  CHECK(sink.acked == std::vector<std::string>{y, x});
  r.stop();
  REQUIRE(r.result.has_value());
  CHECK(r->metrics().delivered == 2);
  CHECK(e.snapshot().pending_count() == 0);
}

TEST_CASE("after rounds of several messages in a row the relay lingers, then publishes what came",
          "[relay]") {
  pop::engine e;  // the system clock: the linger is real time
  register_emitter(e);
  scripted_sink sink;
  pop::relay_options o = quick_relay();
  o.linger = std::chrono::milliseconds(10);
  o.clear_delay = std::chrono::hours(1);  // (clears come with the stop)
  polled_relay r(e, sink, o);
  std::vector<std::string> ids;
  // Eight rounds of two messages each (fewer could be a burst): then the relay lingers.
  auto round_end = std::chrono::steady_clock::now();
  for (int round = 0; round < 8; ++round) {
    for (int i = 0; i < 2; ++i) ids.push_back(emit(e, "k" + std::to_string(i)));
    r.io.poll();
    round_end = std::chrono::steady_clock::now();
    REQUIRE(sink.acked == ids);
  }
  ids.push_back(emit(e, "k0"));
  ids.push_back(emit(e, "k1"));
  r.io.poll();
  // Commits during the linger wake nothing: they wait for its end (unless this thread was held
  // up past it).
  if (std::chrono::steady_clock::now() - round_end < o.linger) CHECK(sink.acked.size() == 16);
  // The linger's timer ends it; the next round publishes both.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (sink.acked.size() < ids.size() && std::chrono::steady_clock::now() < deadline) {
    r.io.run_one_until(deadline);
  }
  CHECK(sink.acked == ids);
  r.stop();
  CHECK(e.snapshot().pending_count() == 0);
}

TEST_CASE("where waking the relay is slow it spins after publishing and catches the next commit",
          "[relay]") {
  pop::engine e;  // the system clock: spins are real time
  register_emitter(e);
  scripted_sink sink;
  for (const auto spin : {std::chrono::microseconds(0), std::chrono::microseconds(10'000)}) {
    CAPTURE(spin.count());
    pop::relay_options o = quick_relay();
    o.spin = spin;
    o.clear_delay = std::chrono::hours(1);  // (clears come with the stop)
    polled_relay r(e, sink, o);             // asleep: nothing to publish
    sink.acked.clear();
    const std::string a = emit(e, "a");
    wake_up_slowly(std::chrono::steady_clock::now());
    // A commit made from a handler queued behind the relay's round: after a few turns of the
    // io_context, when the relay, done with "a", looks for commits or sleeps.
    std::string b;
    after_turns(r.io, 20, [&] { b = emit(e, "b"); });
    r.io.poll();
    // Published either way; with a spin, without sleeping in between.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (sink.acked.size() < 2 && std::chrono::steady_clock::now() < deadline) {
      r.io.run_one_until(deadline);
    }
    CHECK(sink.acked == std::vector<std::string>{a, b});
    const pop::relay_metrics m = r->metrics();
    if (spin.count() == 0) {
      CHECK(m.spins == 0);
    } else {
      CHECK(m.spin_catches >= 1);
      CHECK(m.spins >= m.spin_catches);
    }
    // Stopped while it spins, after publishing "c": the run ends at once, not when its next timer
    // would fire (an hour away: the clear_delay). (A wait begun after a stop does not see it.)
    // (The spin under way when "c" came, if any, is counted already: the next one starts after
    // c's round.)
    const std::uint64_t spins = r->metrics().spins;
    const std::string c = emit(e, "c");
    while (sink.acked.size() < 3 && std::chrono::steady_clock::now() < deadline) {
      r.io.run_one_until(deadline);
    }
    REQUIRE(sink.acked.size() == 3);
    std::function<void()> stop_when_spinning = [&] {
      if (spin.count() == 0 || r->metrics().spins > spins ||
          std::chrono::steady_clock::now() > deadline) {
        r.signal.emit(asio::cancellation_type::terminal);
      } else {
        asio::post(r.io, [&stop_when_spinning] { stop_when_spinning(); });
      }
    };
    stop_when_spinning();
    r.io.run_for(std::chrono::seconds(5));
    REQUIRE(r.result.has_value());
    CHECK(r.result->code() == absl::StatusCode::kCancelled);
    r.stop();
    CHECK(e.snapshot().pending_count() == 0);
  }
}

TEST_CASE("with an asynchronous sink the relay spins too, after an acknowledgement", "[relay]") {
  pop::engine e;  // the system clock: spins are real time
  register_emitter(e);
  gated_sink sink;  // each publish waits until the test releases it
  pop::relay_options o = quick_relay();
  o.spin = std::chrono::microseconds(10'000);
  o.clear_delay = std::chrono::hours(1);  // (clears come with the stop)
  polled_relay r(e, sink, o);
  const std::string a = emit(e, "a");
  wake_up_slowly(std::chrono::steady_clock::now());
  r.io.poll();  // a's publish starts; the test acknowledges it next
  REQUIRE(sink.release(a));
  std::string b;
  after_turns(r.io, 20, [&] { b = emit(e, "b"); });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (b.empty() && std::chrono::steady_clock::now() < deadline) r.io.run_one_until(deadline);
  REQUIRE(!b.empty());
  while (!sink.release(b) && std::chrono::steady_clock::now() < deadline) {
    r.io.run_one_until(deadline);
  }
  while (sink.acked.size() < 2 && std::chrono::steady_clock::now() < deadline) {
    r.io.run_one_until(deadline);
  }
  CHECK(sink.acked == std::vector<std::string>{a, b});
  CHECK(r->metrics().spin_catches >= 1);  // b came while it spun after a's acknowledgement
  r.stop();
  REQUIRE(r.result.has_value());
  CHECK(e.snapshot().pending_count() == 0);
}

TEST_CASE("a message rewritten behind the relay's scan position is published again", "[relay]") {
  // A round starts its scan after the leading entries it found delivered. X is delivered, then
  // rewritten; the next round passes X (delivered, not yet cleared) and delivers Y; the clear
  // then leaves X (changed since its publish): the scan must start before X again.
  pop::engine e;
  register_emitter(e);
  scripted_sink sink;
  sink.script = [](const pop::outbox_message& m) { return m.key == "bad" ? act::fail : act::ok; };
  pop::relay_options o = quick_relay(/*max_attempts=*/1);  // a failure is dead-lettered at once
  o.clear_delay = std::chrono::hours(1);  // clears come with the failure and the stop only
  polled_relay r(e, sink, o);
  const std::string x = emit(e, "a", json{{"v", 1}});
  r.io.poll();
  REQUIRE(sink.acked == std::vector<std::string>{x});
  pop::outbox_message changed = e.snapshot().pending_messages().value().at(0);
  changed.payload = json{{"v", 2}};
  const auto rewrite = e.compare_and_swap(
      e.version(), {{e.outbox_path().str() + "." + x, changed.to_json()}}, pop::cas_mode::keys);
  REQUIRE((rewrite.ok() && rewrite->committed));
  const std::string y = emit(e, "b");
  r.io.poll();
  CHECK(sink.acked == std::vector<std::string>{x, y});
  // The failure is recorded at once, with the deliveries: Y is cleared, X stays.
  emit(e, "bad");
  r.io.poll();
  CHECK(r->metrics().dead_lettered == 1);
  REQUIRE(sink.calls.size() == 4);
  CHECK(sink.calls[3].message.id == x);
  CHECK(sink.calls[3].message.payload == json{{"v", 2}});
  r.stop();
  CHECK(e.snapshot().pending_count() == 0);
}

TEST_CASE("a dead letter requeued behind the relay's scan position is published", "[relay]") {
  // A requeued message keeps its old id, below those the relay has passed since.
  pop::engine e;
  register_emitter(e);
  scripted_sink sink;
  bool failed = false;
  sink.script = [&](const pop::outbox_message& m) {
    if (m.key != "x" || failed) return act::ok;
    failed = true;
    return act::fail;
  };
  polled_relay r(e, sink, quick_relay(/*max_attempts=*/1));
  const std::string a = emit(e, "x");
  r.io.poll();
  REQUIRE(r->metrics().dead_lettered == 1);
  std::vector<std::string> later;
  for (int i = 0; i < 3; ++i) {
    later.push_back(emit(e, "y"));
    r.io.poll();
  }
  CHECK(sink.acked == later);
  REQUIRE(pop::test::must(pop::dead_letters::create(e))->requeue(a).ok());
  r.io.poll();
  CHECK(sink.acked.size() == 4);
  CHECK(sink.acked.back() == a);
  r.stop();
  CHECK(e.snapshot().pending_count() == 0);
}

TEST_CASE("a failing message holds back only later messages with its key", "[relay]") {
  pop::engine e;
  register_emitter(e);
  const std::string poison = emit(e, "k1");
  const std::string after_poison = emit(e, "k1");
  std::vector<std::string> others;
  for (int i = 0; i < 10; ++i) others.push_back(emit(e, "k2"));
  scripted_sink sink;
  sink.script = [&](const pop::outbox_message& m) { return m.id == poison ? act::fail : act::ok; };
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick_relay(3)));
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

TEST_CASE("failed attempts are recorded in the state and retried with growing backoff",
          "[relay][clock]") {
  auto clock = std::make_shared<pop::manual_clock>();
  auto e_owner = pop::test::must(pop::engine::open({.clock = clock}));
  pop::engine& e = *e_owner;
  register_emitter(e);
  const std::string id = emit(e, "k");
  scripted_sink sink;
  sink.script = [](const pop::outbox_message& m) { return m.attempts < 4 ? act::fail : act::ok; };
  pop::relay_options o = quick_relay(10);
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
  std::optional<absl::Status> done;
  asio::co_spawn(io, r.drain(), [&](std::exception_ptr ex, absl::Status st) {
    if (ex) std::rethrow_exception(ex);
    done = std::move(st);
  });
  io.poll();
  for (std::uint32_t i = 0; i < 4; ++i) {
    REQUIRE(sink.calls.size() == i + 1);
    REQUIRE(seen.size() == i + 1);
    const pop::outbox_message m = seen[i];
    CHECK(m.attempts == i + 1);
    REQUIRE(m.failures.size() == i + 1);
    CHECK(m.failures.back().at_us == clock->now_us());
    CHECK(m.last_error == m.failures.back().error);
    CHECK(m.last_error.find("attempt " + std::to_string(i + 1)) != std::string::npos);
    // Backoff d = 2 ms * 2^i, drawn in [d/2, d].
    const std::int64_t d = 2000LL << i;
    const std::int64_t wait = m.next_attempt_at_us - m.failures.back().at_us;
    CHECK(wait >= d / 2);
    CHECK(wait <= d);
    // Not a microsecond early: the sink is called only once the recorded time has come.
    clock->set(m.next_attempt_at_us - 1);
    io.poll();
    CHECK(sink.calls.size() == i + 1);
    clock->set(m.next_attempt_at_us);
    io.poll();
  }
  watch.reset();
  REQUIRE(done.has_value());
  CHECK(done->ok());
  CHECK(sink.calls.size() == 5);
  CHECK(sink.acked == std::vector<std::string>{id});
  CHECK(r.metrics().retried == 4);
}

TEST_CASE(
    "a destination outage longer than max_attempts dead-letters nothing and counts no attempt",
    "[relay]") {
  pop::engine e;
  register_emitter(e);
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
  pop::relay_options o = quick_relay(3);
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
  register_emitter(e);
  const std::string id = emit(e, "k", json{{"order", "o-1"}});
  scripted_sink sink;
  bool broken = true;
  sink.script = [&](const pop::outbox_message&) { return broken ? act::fail : act::ok; };
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick_relay(3)));
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
  register_emitter(e);
  for (int i = 0; i < 5; ++i) emit(e, "k" + std::to_string(i));
  scripted_sink sink;
  sink.script = [](const pop::outbox_message&) { return act::permanent; };
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick_relay()));
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

TEST_CASE("a publish that times out is cancelled, recorded and retried", "[relay][clock]") {
  auto clock = std::make_shared<pop::manual_clock>();
  auto e_owner = pop::test::must(pop::engine::open({.clock = clock}));
  pop::engine& e = *e_owner;
  register_emitter(e);
  const std::string id = emit(e, "k");
  scripted_sink sink;
  sink.script = [](const pop::outbox_message& m) {
    return m.attempts == 0 ? act::timeout : act::ok;
  };
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick_relay()));
  pop::relay& r = *r_owner;
  asio::io_context io;
  std::optional<absl::Status> done;
  asio::co_spawn(io, r.drain(), [&](std::exception_ptr ex, absl::Status st) {
    if (ex) std::rethrow_exception(ex);
    done = std::move(st);
  });
  io.poll();
  REQUIRE(sink.calls.size() == 1);  // hanging until the clock passes the 20 ms timeout
  clock->advance(19'999);
  io.poll();
  CHECK(e.snapshot().pending_messages().value().at(0).attempts == 0);
  clock->advance(1);  // the timeout: cancelled and recorded as a failed attempt
  io.poll();
  clock->advance(2'000);  // past quick_relay()'s largest first backoff
  io.poll();
  REQUIRE(done.has_value());
  CHECK(done->ok());
  REQUIRE(sink.calls.size() == 2);
  CHECK(sink.calls[1].message.attempts == 1);
  CHECK(sink.calls[1].message.last_error.find("timed out after 20 ms") != std::string::npos);
  CHECK(absl::StrContains(sink.calls[1].message.failures.at(0).error, "DEADLINE_EXCEEDED"));
  CHECK(sink.acked == std::vector<std::string>{id});
}

TEST_CASE("an exception from the sink is a failed attempt, never a dead relay", "[relay]") {
  pop::engine e;
  register_emitter(e);
  const std::string first = emit(e, "k");
  const std::string second = emit(e, "k");
  scripted_sink sink;
  sink.script = [&](const pop::outbox_message& m) {
    return m.id == first && m.attempts == 0 ? act::raise : act::ok;
  };
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick_relay()));
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
  register_emitter(e);
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
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick_relay()));
  pop::relay& r = *r_owner;
  asio::io_context io;
  REQUIRE(run_on(io, r.drain()).ok());
  CHECK(sink.acked == std::vector<std::string>{good});
  CHECK(pop::test::must(pop::dead_letters::create(e))->count() == 0);
}

TEST_CASE("a requeued message does not overtake a message of its key that is in flight",
          "[relay]") {
  pop::engine e;
  register_emitter(e);
  const std::string x = emit(e, "k");
  scripted_sink sink;
  sink.synchronous = false;
  bool first_round = true;
  sink.script = [&](const pop::outbox_message& m) {
    if (m.id == x && first_round) return act::permanent;
    if (m.id != x) return act::timeout;  // y: in flight until its timeout
    return act::ok;
  };
  pop::relay_options o = quick_relay(1);
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
  register_emitter(e);
  std::vector<std::string> ids;
  for (int i = 0; i < 40; ++i) ids.push_back(emit(e, "k" + std::to_string(i % 4)));
  scripted_sink first;
  first.synchronous = false;
  // The first 10 publishes succeed, then every publish hangs until cancelled.
  first.script = [&](const pop::outbox_message&) {
    return first.calls.size() < 10 ? act::ok : act::hang;
  };
  pop::relay_options o = quick_relay();
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
  register_emitter(e);
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
  pop::relay_options o = quick_relay(3);
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
  bad.linger = std::chrono::milliseconds(11);
  CHECK_THAT(std::string(pop::relay::create(e, sink, bad).status().message()),
             Catch::Contains("linger"));
  bad = {};
  bad.linger = std::chrono::microseconds(-1);
  CHECK_THAT(std::string(pop::relay::create(e, sink, bad).status().message()),
             Catch::Contains("linger"));
  bad = {};
  bad.spin = std::chrono::microseconds(10'001);
  CHECK_THAT(std::string(pop::relay::create(e, sink, bad).status().message()),
             Catch::Contains("spin"));
  bad = {};
  bad.spin = std::chrono::microseconds(-1);
  CHECK_THAT(std::string(pop::relay::create(e, sink, bad).status().message()),
             Catch::Contains("spin"));
  bad = {};
  bad.clear_delay = std::chrono::hours(2);
  CHECK_THAT(std::string(pop::relay::create(e, sink, bad).status().message()),
             Catch::Contains("clear_delay"));
  bad = {};
  bad.dead_letter_path = "domain.outbox_queue.dead";
  CHECK_THAT(std::string(pop::relay::create(e, sink, bad).status().message()),
             Catch::Contains("overlaps the outbox"));
  bad = {};
  bad.dead_letter_path = "a..b";
  CHECK_THAT(std::string(pop::relay::create(e, sink, bad).status().message()),
             Catch::Contains("dead_letter_path"));

  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick_relay()));
  pop::relay& r = *r_owner;
  asio::io_context io;
  asio::cancellation_signal stop;
  std::optional<absl::Status> first;
  pop::test::spawn_stoppable(io, r.run(), stop, first);
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

TEST_CASE("backoffs and publish timeouts run on the engine's clock, which a test moves by hand",
          "[relay][clock]") {
  auto clock = std::make_shared<pop::manual_clock>();
  auto e = pop::test::must(pop::engine::open({.clock = clock}));
  register_emitter(*e);
  const std::string id = emit(*e, "k");
  scripted_sink sink;
  int attempt = 0;
  sink.script = [&](const pop::outbox_message&) {
    ++attempt;
    return attempt == 1 ? act::fail : attempt == 2 ? act::hang : act::ok;
  };
  // A minute of backoff and half a minute of publish timeout: real waits would fail this test.
  pop::relay_options o = quick_relay(5);
  o.initial_backoff = std::chrono::seconds(60);
  o.max_backoff = std::chrono::seconds(60);
  o.publish_timeout = std::chrono::seconds(30);
  auto r = pop::test::must(pop::relay::create(*e, sink, o));
  asio::io_context io;
  std::optional<absl::Status> done;
  asio::co_spawn(io, r->drain(), [&](std::exception_ptr ex, absl::Status s) {
    if (ex) std::rethrow_exception(ex);
    done = std::move(s);
  });
  io.poll();
  REQUIRE(sink.calls.size() == 1);  // failed; the retry waits for the clock
  io.poll();
  CHECK(sink.calls.size() == 1);
  clock->advance(60'000'000);  // past any jittered backoff
  io.poll();
  REQUIRE(sink.calls.size() == 2);  // the second attempt hangs until its publish timeout
  CHECK(sink.calls[1].what == act::hang);
  CHECK(!done);
  clock->advance(30'000'000);  // the publish times out on the clock, and backs off again
  io.poll();
  CHECK(sink.calls.size() == 2);
  clock->advance(60'000'000);
  io.poll();
  REQUIRE(done.has_value());
  CHECK(done->ok());
  CHECK(sink.acked == std::vector<std::string>{id});
  CHECK(attempt == 3);
  CHECK(e->snapshot().pending_count() == 0);
}
