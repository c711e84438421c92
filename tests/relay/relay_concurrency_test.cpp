// Concurrency tests of pop::relay: producers on their own threads commit while the relay drains
// on an io_context thread. Run under ThreadSanitizer in CI.
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"

#include <algorithm>
#include <atomic>
#include <map>
#include <set>
#include <thread>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "pop/relay/inbox.hpp"
#include "pop/relay/relay.hpp"
#include "tests/support/asio_run.hpp"
#include "tests/support/scripted_sink.hpp"
#include "tests/support/wait.hpp"

namespace asio = boost::asio;
using pop::json;
using pop::test::act;
using pop::test::scripted_sink;

namespace {

struct race_result {
  std::set<std::string> committed;
  std::vector<scripted_sink::call> calls;
  std::vector<std::string> acked;
  std::size_t pending_after = 0;
  absl::Status stopped;
};

// `producers` threads each commit `per_producer` messages (keys shared between producers) while
// a relay runs on two io_context threads; stops the relay once everything was acknowledged.
race_result race(int producers, int per_producer, bool asynchronous, std::uint64_t seed) {
  pop::engine e;
  pop::test::register_emitter(e);
  scripted_sink sink;
  sink.synchronous = !asynchronous;
  sink.latency = std::chrono::microseconds(asynchronous ? 50 : 0);
  std::atomic<std::uint64_t> roll{seed};
  // 10% transient failures (only touched from the relay's strand).
  sink.script = [&](const pop::outbox_message&) {
    const std::uint64_t r = roll.load() * 6364136223846793005ULL + 1442695040888963407ULL;
    roll.store(r);
    return (r >> 33) % 10 == 0 ? act::fail : act::ok;
  };
  auto r_owner =
      pop::test::must(pop::relay::create(e, sink,
                                         {.max_in_flight = 32,
                                          .batch_size = 128,
                                          .publish_timeout = std::chrono::seconds(10),
                                          .max_attempts = 1000,
                                          .initial_backoff = std::chrono::microseconds(50),
                                          .max_backoff = std::chrono::microseconds(500),
                                          .dead_letter_path = "system.dead_letters",
                                          .seed = seed}));
  pop::relay& r = *r_owner;
  asio::io_context io;
  asio::cancellation_signal stop;
  race_result out;
  std::atomic<bool> done{false};
  asio::co_spawn(io, r.run(),
                 asio::bind_cancellation_slot(stop.slot(), [&](std::exception_ptr, absl::Status s) {
                   out.stopped = std::move(s);
                   done.store(true);
                 }));
  std::vector<std::thread> io_threads;
  for (int i = 0; i < 2; ++i) io_threads.emplace_back([&] { io.run(); });

  std::vector<std::vector<std::string>> ids(static_cast<std::size_t>(producers));
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      for (int i = 0; i < per_producer; ++i) {
        const std::string key = "k" + std::to_string((p * per_producer + i) % 7);
        absl::StatusOr<pop::commit> c = e.execute("emit", {{"key", key}, {"payload", i}});
        if (c.ok()) ids[static_cast<std::size_t>(p)].push_back(c->message_ids.at(0));
      }
    });
  }
  for (auto& t : threads) t.join();
  std::size_t total = 0;
  for (const auto& v : ids) {
    out.committed.insert(v.begin(), v.end());
    total += v.size();
  }
  // Wait (no timing asserted) until the relay acknowledged every committed message; a relay
  // that stops delivering fails here within a minute instead of hanging.
  const bool all_acked = pop::test::eventually([&] { return sink.acked_count.load() >= total; },
                                               std::chrono::seconds(60));
  if (!all_acked) {
    asio::post(io, [&] { stop.emit(asio::cancellation_type::terminal); });
    for (auto& t : io_threads) t.join();
    FAIL("the relay acknowledged " << sink.acked_count.load() << " of " << total
                                   << " committed messages within a minute");
  }
  asio::post(io, [&] { stop.emit(asio::cancellation_type::terminal); });
  for (auto& t : io_threads) t.join();
  REQUIRE(done.load());
  out.calls = sink.calls;
  out.acked = sink.acked;
  out.pending_after = e.snapshot().pending_count();
  return out;
}

void check_race(const race_result& r, std::size_t expected) {
  CHECK(r.committed.size() == expected);
  CHECK(r.stopped.code() == absl::StatusCode::kCancelled);
  const std::set<std::string> acked(r.acked.begin(), r.acked.end());
  CHECK(acked == r.committed);            // every committed message delivered
  CHECK(r.acked.size() == acked.size());  // and, with one relay, exactly once
  for (const auto& c : r.calls) CHECK(r.committed.contains(c.message.id));  // nothing invented
  CHECK(r.pending_after == 0);
  std::map<std::string, std::string> last_by_key;
  for (const auto& c : r.calls) {
    if (c.what != act::ok) continue;
    std::string& last = last_by_key[c.message.key];
    CHECK(last < c.message.id);  // per-key order
    last = c.message.id;
  }
}

}  // namespace

TEST_CASE("concurrency: producers commit while the relay drains and nothing is lost or invented",
          "[relay][concurrency]") {
  check_race(race(4, 1500, false, 11), 6000);
}

TEST_CASE("concurrency: asynchronous publishes on a two-thread io_context race producers",
          "[relay][concurrency]") {
  check_race(race(3, 600, true, 12), 1800);
}

TEST_CASE("concurrency: concurrent applications of one message id change the state once",
          "[relay][inbox][concurrency]") {
  auto e_owner =
      pop::test::must(pop::engine::open(pop::options{.initial_state = {{"domain", {{"n", 0}}}}}));
  pop::engine& e = *e_owner;
  auto in_owner = pop::test::must(pop::inbox::create(e));
  pop::inbox& in = *in_owner;
  REQUIRE(in.register_handler({.name = "count", .inputs = {"domain.n"}, .outputs = {"domain.n"}},
                              [](const pop::context& ctx, const pop::outbox_message&) {
                                pop::result r;
                                r.set("domain.n", ctx.get<int>("domain.n") + 1);
                                return r;
                              })
              .ok());
  pop::outbox_message m;
  m.id = pop::make_message_id(1, 0);
  std::vector<std::thread> threads;
  std::atomic<int> applied{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 50; ++i) {
        if (in.apply("count", m).value().applied) applied.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(applied == 1);
  CHECK(e.snapshot().read("domain.n").value() == 1);
}

TEST_CASE("producers faster than the relay wait for its clears and every message is published",
          "[relay][pacing]") {
  // A slow sink (asynchronous, one key: one publish at a time) and four producers: the outbox
  // goes past the bound of 16 at once, so producers wait for the relay's clears, which wake them
  // (no wait lasts its 10 s).
  auto e = pop::test::must(
      pop::engine::open(pop::options{.pace_pending = 16, .pace_wait = std::chrono::seconds(10)}));
  pop::test::register_emitter(*e);
  scripted_sink sink;
  sink.synchronous = false;
  sink.latency = std::chrono::microseconds(200);
  pop::relay_options o = pop::test::quick_relay();
  o.publish_timeout = std::chrono::seconds(10);  // (a slow machine must not time a publish out)
  auto relay = pop::test::must(pop::relay::create(*e, sink, o));
  asio::io_context io;
  asio::cancellation_signal signal;
  std::optional<absl::Status> result;
  pop::test::spawn_stoppable(io, relay->run(), signal, result);
  std::jthread relay_thread([&] { io.run(); });
  // The relay holds the pace once it has published.
  (void)pop::test::emit(*e, "k");
  REQUIRE(pop::test::eventually([&] { return e->pacing().holds == 1; }, std::chrono::seconds(10)));
  constexpr int producers = 4;
  constexpr int each = 150;
  // The most messages any producer saw pending after its commit: each clear lets as many
  // producers run as it removed, so the outbox stays near the bound (each producer may find it
  // within the bound at once, then commit).
  std::atomic<std::size_t> most{0};
  {
    std::vector<std::jthread> threads;
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&] {
        for (int i = 0; i < each; ++i) {
          (void)pop::test::emit(*e, "k");
          const std::size_t now = e->snapshot().pending_count();
          std::size_t seen = most.load();
          while (now > seen && !most.compare_exchange_weak(seen, now)) {
          }
        }
      });
    }
  }
  CHECK(most.load() <= 16 + 2 * producers);
  const bool all = pop::test::eventually(
      [&] { return sink.acked_count.load() == producers * each + 1; }, std::chrono::seconds(30));
  CHECK(all);
  CHECK(e->pacing().paced > 0);
  CHECK(e->pacing().timed_out == 0);
  // The relay's metrics report the same (metrics() may be called from any thread).
  const pop::relay_metrics m = relay->metrics();
  CHECK(m.paced == e->pacing().paced);
  CHECK(m.pace_timed_out == 0);
  CHECK(!m.pace_stalled);
  asio::post(io, [&] { signal.emit(asio::cancellation_type::terminal); });
  relay_thread.join();
  // Published once each, in commit order (one key).
  std::vector<std::string> committed;
  for (const auto& c : sink.calls) committed.push_back(c.message.id);
  CHECK(std::is_sorted(committed.begin(), committed.end()));
  CHECK(std::adjacent_find(committed.begin(), committed.end()) == committed.end());
  CHECK(committed.size() == producers * each + 1);
}
