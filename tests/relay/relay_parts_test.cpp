// Tests of the relay's parts: the topic router, the JSON-lines sink, Prometheus metrics and the
// inbox.
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

TEST_CASE("the topic router routes by topic and pattern and applies its unknown-topic policy",
          "[relay][sink]") {
  pop::engine e;
  register_emitter(e);
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
    auto r_owner = pop::test::must(pop::relay::create(e, router, quick_relay()));
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
    auto r_owner = pop::test::must(pop::relay::create(e, strict, quick_relay()));
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
    auto r_owner = pop::test::must(pop::relay::create(e, lenient, quick_relay()));
    pop::relay& r = *r_owner;
    asio::io_context io;
    REQUIRE(run_on(io, r.drain()).ok());
    CHECK(lenient.dropped() == 2);
    CHECK(e.snapshot().pending_count() == 0);
  }
}

TEST_CASE("the JSON-lines sink writes one line per message", "[relay][sink]") {
  pop::engine e;
  register_emitter(e);
  const std::string id = emit(e, "k", json{{"n", 1}});
  const std::string file = "relay_test_jsonl.out";
  std::remove(file.c_str());
  {
    auto sink = pop::jsonl_sink::open(file).value();
    auto r_owner = pop::test::must(pop::relay::create(e, *sink, quick_relay()));
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
  register_emitter(e);
  for (int i = 0; i < 3; ++i) emit(e, "");
  scripted_sink sink;
  auto r_owner = pop::test::must(pop::relay::create(e, sink, quick_relay()));
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
  // Flow control: the relay's hold, and its engine's figures (nothing waited here).
  CHECK(text.find("# TYPE pop_relay_holding_pace gauge\npop_relay_holding_pace ") !=
        std::string::npos);
  CHECK(
      text.find("# TYPE pop_relay_engine_paced_total counter\npop_relay_engine_paced_total 0\n") !=
      std::string::npos);
  CHECK(text.find("pop_relay_engine_pace_waiting 0\n") != std::string::npos);
  CHECK(text.find("pop_relay_engine_pace_timed_out_total 0\n") != std::string::npos);
  CHECK(text.find("pop_relay_engine_pace_stalled 0\n") != std::string::npos);
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
