// Tests of the NATS JetStream sink and ingress against a real nats-server started on 127.0.0.1
// (a free port, its store in a temporary directory, stopped by PID). Nothing about NATS is mocked.
#include <nats/nats.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>

#include <functional>
#include <map>
#include <random>
#include <thread>
#include "tests/support/must.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "pop/nats/nats_connection.hpp"
#include "pop/nats/nats_ingress.hpp"
#include "pop/nats/nats_sink.hpp"
#include "pop/relay/dead_letters.hpp"
#include "pop/relay/relay.hpp"
#include "pop/relay/topic_router.hpp"
#include "tests/support/asio_run.hpp"
#include "tests/support/nats_server.hpp"
#include "tests/support/temp_dir.hpp"
#include "tests/support/wait.hpp"

namespace asio = boost::asio;
using pop::json;
using pop::test::run_on;

namespace {

std::unique_ptr<pop::nats_connection> connect_to(const pop::test::nats_server& server) {
  pop::nats_connection_options o;
  o.servers = {server.url()};
  o.reconnect_wait = std::chrono::milliseconds(20);
  auto c = pop::nats_connection::connect(o);
  REQUIRE(c.ok());
  return *std::move(c);
}

pop::nats_stream_info make_stream(pop::nats_connection& c, const std::string& name = "EVENTS") {
  auto info = pop::ensure_stream(c, {.name = name, .subjects = {"evt.>"}});
  REQUIRE(info.ok());
  return *info;
}

std::uint64_t stored(pop::nats_connection& c, const std::string& name = "EVENTS") {
  auto info = pop::stream_info(c, name);
  REQUIRE(info.ok());
  return info->messages;
}

// A producer engine whose process `emit` emits args.n messages with key args.key, payload
// {key, seq} for seq from args.from.
std::unique_ptr<pop::engine> producer(pop::options o = {}) {
  auto e = pop::engine::open(std::move(o));
  REQUIRE(e.ok());
  REQUIRE(
      (*e)->register_process(
              {.name = "emit", .inputs = {}, .outputs = {"domain.sent"}, .emits = {"evt.created"}},
              [](const pop::context&, const json& args) -> absl::StatusOr<pop::result> {
                pop::result r;
                const int from = args.value("from", 0);
                for (int i = 0; i < args.at("n").get<int>(); ++i) {
                  r.emit("evt.created", {{"key", args.at("key")}, {"seq", from + i}},
                         args.at("key").get<std::string>(),
                         {{"trace", "t-" + std::to_string(from + i)}});
                }
                r.set("domain.sent." + args.at("key").get<std::string>(),
                      from + args.at("n").get<int>());
                return r;
              })
          .ok());
  return *std::move(e);
}

// A consuming engine: handler `apply_event` appends each event's seq to domain.got.<key> and
// counts applies per message id at domain.count.<id>.
struct consumer {
  explicit consumer(pop::options o = {}) {
    auto opened = pop::engine::open(std::move(o));
    REQUIRE(opened.ok());
    e = *std::move(opened);
    in = pop::test::must(pop::inbox::create(*e, pop::inbox_options{.path = "system.inbox.nats"}));
    REQUIRE(in->register_handler({.name = "apply_event",
                                  .inputs = {"domain.got", "domain.count"},
                                  .outputs = {"domain.got", "domain.count"}},
                                 [](const pop::context& ctx,
                                    const pop::outbox_message& m) -> absl::StatusOr<pop::result> {
                                   const std::string key = m.payload.at("key");
                                   json got = ctx.get_or<json>("domain.got." + key, json::array());
                                   got.push_back(m.payload.at("seq"));
                                   const int count = ctx.get_or<int>("domain.count." + m.id, 0);
                                   pop::result r;
                                   r.set("domain.got." + key, got);
                                   r.set("domain.count." + m.id, count + 1);
                                   return r;
                                 })
                .ok());
  }
  json got(const std::string& key) const {
    return e->snapshot().read("domain.got." + key).value_or(json::array());
  }
  std::unique_ptr<pop::engine> e;
  std::unique_ptr<pop::inbox> in;
};

std::unique_ptr<pop::nats_ingress> ingress_for(consumer& c, pop::nats_connection& nc,
                                               pop::nats_ingress_options o = {}) {
  if (o.stream.empty()) o.stream = "EVENTS";
  if (o.durable.empty()) o.durable = "consumer";
  if (o.handler.empty() && o.routes.empty()) o.handler = "apply_event";
  auto in = pop::nats_ingress::create(*c.e, *c.in, nc, std::move(o));
  REQUIRE(in.ok());
  return *std::move(in);
}

// Polls until `done` holds or 30 s pass.
template <class Pred>
void poll_until(pop::nats_ingress& in, Pred done) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!done() && std::chrono::steady_clock::now() < deadline) {
    auto n = in.poll(std::chrono::milliseconds(50));
    REQUIRE((n.ok() || n.status().code() == absl::StatusCode::kUnavailable));
  }
  REQUIRE(done());
}

// Publishes `per_key` messages for each of keys k0..k<keys-1> to the stream (payload seq 0, 1,
// ...), through a producer engine, a relay and a nats_sink, and waits until all are stored.
void publish_keys(pop::nats_connection& nc, int keys, int per_key) {
  auto p = producer();
  for (int k = 0; k < keys; ++k) {
    for (int from = 0; from < per_key; from += 50) {
      REQUIRE(
          p->execute("emit", {{"key", "k" + std::to_string(k)}, {"n", 50}, {"from", from}}).ok());
    }
  }
  auto sink = pop::nats_sink::create(nc, {.source = "orders"});
  REQUIRE(sink.ok());
  auto relay_owner = pop::test::must(pop::relay::create(*p, **sink));
  asio::io_context io;
  // (One ack round trip at a time per key: under AddressSanitizer beside another test, 1,000 a key
  // took over a minute.)
  REQUIRE(run_on(io, relay_owner->drain(), std::chrono::seconds(240)).ok());
}

// A relay running on its own thread until stop(), or until this object goes, whichever comes
// first: declared after the relay and its sink, it cancels the relay and ends its coroutine (its
// frame included, which a pending publish's cleanup reaches into the sink from) before either
// goes, on every way out of a test.
class running_relay {
 public:
  explicit running_relay(pop::relay& relay) {
    asio::co_spawn(
        *io_, relay.run(),
        asio::bind_cancellation_slot(stop_.slot(), [this](std::exception_ptr, absl::Status s) {
          status_ = std::move(s);
          ended_ = true;
        }));
    thread_ = std::thread([this] { io_->run(); });
  }
  ~running_relay() {
    if (thread_.joinable()) static_cast<void>(stop());
  }
  running_relay(const running_relay&) = delete;
  running_relay& operator=(const running_relay&) = delete;

  // Cancels the relay, waits (at most 15 s) for it to end and returns how it ended.
  absl::Status stop() {
    asio::post(*io_, [this] { stop_.emit(asio::cancellation_type::terminal); });
    const bool ended =
        pop::test::eventually([&] { return ended_.load(); }, std::chrono::seconds(15));
    io_->stop();
    thread_.join();
    io_.reset();  // destroys what the relay left, while the relay and its sink still exist
    if (!ended) return absl::DeadlineExceededError("the relay did not stop within 15 s");
    return status_;
  }

 private:
  std::unique_ptr<asio::io_context> io_ = std::make_unique<asio::io_context>();
  asio::cancellation_signal stop_;
  absl::Status status_;
  std::atomic<bool> ended_{false};
  std::thread thread_;
};

}  // namespace

TEST_CASE(
    "relayed messages are stored in JetStream with their id, key and headers and applied once by "
    "the ingress",
    "[nats]") {
  pop::test::nats_server server;
  auto nc = connect_to(server);
  make_stream(*nc);
  auto p = producer();
  REQUIRE(p->execute("emit", {{"key", "k1"}, {"n", 5}}).ok());
  REQUIRE(p->execute("emit", {{"key", "k2"}, {"n", 3}}).ok());
  auto sink = pop::nats_sink::create(*nc, {.source = "orders"});
  REQUIRE(sink.ok());
  auto relay_owner = pop::test::must(pop::relay::create(*p, **sink));
  pop::relay& relay = *relay_owner;
  asio::io_context io;
  REQUIRE(run_on(io, relay.drain()).ok());
  CHECK(p->snapshot().pending_count() == 0);
  CHECK(stored(*nc) == 8);
  CHECK((*sink)->stats().acked == 8);

  // What arrived on the wire: read the first stored message directly.
  natsMsg* raw = nullptr;
  REQUIRE(js_GetMsg(&raw, nc->jetstream(), "EVENTS", 1, nullptr, nullptr) == NATS_OK);
  const char* v = nullptr;
  REQUIRE(natsMsgHeader_Get(raw, "Nats-Msg-Id", &v) == NATS_OK);
  CHECK(std::string(v) == "orders:" + pop::make_message_id(1, 0));
  REQUIRE(natsMsgHeader_Get(raw, "Pop-Key", &v) == NATS_OK);
  CHECK(std::string(v) == "k1");
  REQUIRE(natsMsgHeader_Get(raw, "trace", &v) == NATS_OK);
  CHECK(std::string(v) == "t-0");
  CHECK(std::string(natsMsg_GetSubject(raw)) == "evt.created");
  CHECK(json::parse(std::string(natsMsg_GetData(raw), natsMsg_GetDataLength(raw))) ==
        json{{"key", "k1"}, {"seq", 0}});
  natsMsg_Destroy(raw);

  consumer c;
  auto in = ingress_for(c, *nc);
  poll_until(*in, [&] { return in->stats().applied == 8; });
  CHECK(c.got("k1") == json::array({0, 1, 2, 3, 4}));
  CHECK(c.got("k2") == json::array({0, 1, 2}));
  // The handler saw the producer's topic, key, headers and a per-source id.
  const std::string mark = "orders-" + pop::make_message_id(1, 0);
  CHECK(c.in->contains(mark));
  CHECK(c.e->snapshot().read("domain.count." + mark).value() == 1);
  CHECK(in->stats().end_to_end.count == 8);
  const std::string ingress_text = pop::to_prometheus(in->stats());
  CHECK(ingress_text.find("pop_nats_ingress_applied_total 8\n") != std::string::npos);
  CHECK(ingress_text.find("pop_nats_ingress_end_to_end_latency_seconds_count 8\n") !=
        std::string::npos);
  CHECK(pop::to_prometheus((*sink)->stats()).find("pop_nats_sink_acked_total 8\n") !=
        std::string::npos);
}

TEST_CASE(
    "duplicate publishes of one message id store one message, and other sources' equal ids are "
    "kept",
    "[nats]") {
  pop::test::nats_server server;
  auto nc = connect_to(server);
  make_stream(*nc);
  auto a = pop::nats_sink::create(*nc, {.source = "a"});
  auto b = pop::nats_sink::create(*nc, {.source = "b"});
  REQUIRE((a.ok() && b.ok()));
  pop::outbox_message m;
  m.id = pop::make_message_id(7, 0);
  m.topic = "evt.created";
  m.key = "k";
  m.payload = {{"key", "k"}, {"seq", 0}};
  asio::io_context io;
  for (int i = 0; i < 3; ++i) {
    REQUIRE(run_on(io, (*a)->publish(m)).ok());
  }
  CHECK(stored(*nc) == 1);
  CHECK((*a)->stats().duplicates == 2);
  REQUIRE(run_on(io, (*b)->publish(m)).ok());
  CHECK(stored(*nc) == 2);
  CHECK((*b)->stats().duplicates == 0);
}

TEST_CASE(
    "a subject or header NATS cannot carry fails permanently, and a missing stream is retryable",
    "[nats]") {
  pop::test::nats_server server;
  auto nc = connect_to(server);
  auto sink = pop::nats_sink::create(*nc, {.source = "a", .subject_prefix = "evt."});
  REQUIRE(sink.ok());
  pop::outbox_message m;
  m.id = pop::make_message_id(1, 0);
  m.topic = "created";
  m.payload = 1;
  asio::io_context io;
  // No stream captures evt.created yet: JetStream has no responder for it.
  absl::Status none = run_on(io, (*sink)->publish(m));
  CHECK(none.code() == absl::StatusCode::kUnavailable);
  CHECK_FALSE(pop::is_permanent_failure(none));
  CHECK(pop::is_destination_unavailable(none));  // not counted as an attempt by the relay
  make_stream(*nc);
  CHECK(run_on(io, (*sink)->publish(m)).ok());
  m.headers = {{"Nats-Msg-Id", "forged"}};
  absl::Status forged = run_on(io, (*sink)->publish(m));
  CHECK(forged.code() == absl::StatusCode::kInvalidArgument);
  CHECK(pop::is_permanent_failure(forged));
  CHECK(std::string(forged.message()).find("Nats-Msg-Id") != std::string::npos);
  m.headers = {{"ok", "two\nlines"}};
  CHECK(pop::is_permanent_failure(run_on(io, (*sink)->publish(m))));
  m.headers = {};
  m.topic = "has space";
  CHECK(pop::is_permanent_failure(run_on(io, (*sink)->publish(m))));
  CHECK(stored(*nc) == 1);
}

TEST_CASE("bad options are refused with errors naming them", "[nats]") {
  pop::test::nats_server server;
  auto nc = connect_to(server);
  CHECK(pop::nats_sink::create(*nc, {.source = ""}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(pop::nats_sink::create(*nc, {.source = "a.b"}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  auto bad_prefix = pop::nats_sink::create(*nc, {.source = "a", .subject_prefix = "evt"});
  CHECK(bad_prefix.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad_prefix.status().message()).find("subject_prefix") != std::string::npos);
  CHECK(pop::ensure_stream(*nc, {.name = "a.b", .subjects = {"x"}}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(pop::ensure_stream(*nc, {.name = "S", .subjects = {}}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  consumer c;
  auto no_stream = pop::nats_ingress::create(
      *c.e, *c.in, *nc, {.stream = "NOPE", .durable = "d", .handler = "apply_event"});
  CHECK(no_stream.status().code() == absl::StatusCode::kNotFound);
  CHECK(std::string(no_stream.status().message()).find("NOPE") != std::string::npos);
  make_stream(*nc);
  CHECK(pop::nats_ingress::create(*c.e, *c.in, *nc, {.stream = "EVENTS", .durable = "d"})
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(pop::nats_ingress::create(*c.e, *c.in, *nc,
                                  {.stream = "EVENTS", .durable = "d.x", .handler = "apply_event"})
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  CHECK(pop::nats_ingress::create(*c.e, *c.in, *nc,
                                  {.stream = "EVENTS",
                                   .durable = "d",
                                   .handler = "apply_event",
                                   .dead_letter_path = "domain.outbox_queue.x"})
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  pop::nats_connection_options o;
  o.servers = {"nats://127.0.0.1:1"};
  auto refused = pop::nats_connection::connect(o);
  CHECK(refused.status().code() == absl::StatusCode::kUnavailable);
  CHECK(std::string(refused.status().message()).find("127.0.0.1:1") != std::string::npos);
  o.servers = {};
  CHECK(pop::nats_connection::connect(o).status().code() == absl::StatusCode::kInvalidArgument);
  o.servers = {server.url()};
  o.write_deadline = std::chrono::milliseconds(0);
  const absl::StatusOr<std::unique_ptr<pop::nats_connection>> no_deadline =
      pop::nats_connection::connect(o);
  CHECK(no_deadline.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(no_deadline.status().message()).find("write_deadline") != std::string::npos);
  // The engine state is untouched by every refusal.
  CHECK(c.e->version() == 0);
  // A sink that never published goes away cleanly (libnats made nothing for its acks).
  auto idle = pop::nats_sink::create(*nc, {.source = "idle"});
  REQUIRE(idle.ok());
  idle->reset();
}

TEST_CASE("stream creation is idempotent and updates the duplicate window", "[nats]") {
  pop::test::nats_server server;
  auto nc = connect_to(server);
  pop::nats_stream_options so{.name = "EVENTS",
                              .subjects = {"evt.>"},
                              .duplicate_window = std::chrono::milliseconds(60'000)};
  auto first = pop::ensure_stream(*nc, so);
  REQUIRE(first.ok());
  CHECK(first->duplicate_window == std::chrono::milliseconds(60'000));
  auto again = pop::ensure_stream(*nc, so);
  REQUIRE(again.ok());
  CHECK(again->name == "EVENTS");
  so.duplicate_window = std::chrono::milliseconds(30'000);
  auto changed = pop::ensure_stream(*nc, so);
  REQUIRE(changed.ok());
  CHECK(changed->duplicate_window == std::chrono::milliseconds(30'000));
  CHECK(pop::stream_info(*nc, "EVENTS")->duplicate_window == std::chrono::milliseconds(30'000));
}

TEST_CASE("a message re-published after the duplicate window changes the consuming state once",
          "[nats]") {
  pop::test::nats_server server;
  auto nc = connect_to(server);
  // A short duplicate window: re-publishes after it are stored again, and the inbox absorbs them.
  REQUIRE(pop::ensure_stream(*nc, {.name = "EVENTS",
                                   .subjects = {"evt.>"},
                                   .duplicate_window = std::chrono::milliseconds(100)})
              .ok());
  auto sink = pop::nats_sink::create(*nc, {.source = "orders"});
  REQUIRE(sink.ok());
  pop::outbox_message m;
  m.id = pop::make_message_id(3, 0);
  m.topic = "evt.created";
  m.key = "k";
  m.payload = {{"key", "k"}, {"seq", 0}};
  asio::io_context io;
  REQUIRE(run_on(io, (*sink)->publish(m)).ok());
  // Re-publish until the broker's window has passed and it stores the copy (within it, the copy
  // is dropped as a duplicate, which is the other test's subject).
  const bool stored_again = pop::test::eventually(
      [&] { return run_on(io, (*sink)->publish(m)).ok() && stored(*nc) == 2; });
  INFO("the re-publish after the 100 ms duplicate window was never stored");
  REQUIRE(stored_again);

  // Both stored copies reach the consumer; the inbox applies one. (Redeliveries after a crash are
  // the kill -9 case's.)
  consumer c;
  {
    auto first = ingress_for(c, *nc, {.ack_wait = std::chrono::milliseconds(300)});
    poll_until(*first, [&] { return first->stats().applied + first->stats().duplicates == 2; });
    CHECK(first->stats().duplicates == 1);
  }
  CHECK(c.got("k") == json::array({0}));
  CHECK(c.e->snapshot().read("domain.count.orders-" + m.id).value() == 1);
}

TEST_CASE(
    "a message that cannot be applied is dead-lettered with its reason and later ones still apply",
    "[nats]") {
  pop::test::nats_server server;
  auto nc = connect_to(server);
  make_stream(*nc);
  // Raw publishes, as a foreign producer would send them.
  REQUIRE(natsConnection_PublishString(nc->handle(), "evt.bad", "{not json") == NATS_OK);
  natsMsg* raw = nullptr;
  REQUIRE(natsMsg_Create(&raw, "evt.good", nullptr, R"({"key":"k","seq":5})", 19) == NATS_OK);
  REQUIRE(natsMsgHeader_Set(raw, "Nats-Msg-Id", "foreign-1") == NATS_OK);
  REQUIRE(js_PublishMsg(nullptr, nc->jetstream(), raw, nullptr, nullptr) == NATS_OK);
  natsMsg_Destroy(raw);
  REQUIRE(natsConnection_Flush(nc->handle()) == NATS_OK);
  INFO("the stream never held both raw messages");
  REQUIRE(pop::test::eventually([&] { return stored(*nc) == 2; }));

  consumer c;
  auto in = ingress_for(c, *nc, {.routes = {{"evt.good", "apply_event"}}});
  poll_until(*in, [&] { return in->stats().applied + in->stats().dead_lettered == 2; });
  CHECK(in->stats().applied == 1);
  CHECK(in->stats().dead_lettered == 1);
  CHECK(c.got("k") == json::array({5}));
  const json dead = c.e->snapshot().read("system.ingress_dead_letters").value();
  REQUIRE(dead.size() == 1);
  const json& d = dead.begin().value();
  CHECK(d.at("subject") == "evt.bad");
  CHECK(d.at("data") == "{not json");
  CHECK(d.at("sequence") == 1);
  CHECK(d.at("error").get<std::string>().find("not JSON") != std::string::npos);
}

TEST_CASE("engine backpressure slows the ingress instead of dropping messages", "[nats]") {
  pop::test::nats_server server;
  auto nc = connect_to(server);
  make_stream(*nc);
  auto p = producer();
  REQUIRE(p->execute("emit", {{"key", "k"}, {"n", 40}}).ok());
  auto sink = pop::nats_sink::create(*nc, {.source = "orders"});
  REQUIRE(sink.ok());
  {
    auto relay_owner = pop::test::must(pop::relay::create(*p, **sink));
    pop::relay& relay = *relay_owner;
    asio::io_context io;
    REQUIRE(run_on(io, relay.drain()).ok());
  }
  // The consumer forwards each event to its own outbox, which holds at most 10 messages.
  pop::options o;
  o.max_pending = 10;
  auto e = pop::engine::open(o);
  REQUIRE(e.ok());
  auto inbox_owner = pop::test::must(pop::inbox::create(**e));
  pop::inbox& inbox = *inbox_owner;
  REQUIRE(inbox
              .register_handler({.name = "forward", .outputs = {"domain.n"}, .emits = {"fwd"}},
                                [](const pop::context&,
                                   const pop::outbox_message& m) -> absl::StatusOr<pop::result> {
                                  pop::result r;
                                  r.emit("fwd", m.payload, m.key);
                                  return r;
                                })
              .ok());
  auto in = pop::nats_ingress::create(**e, inbox, *nc,
                                      {.stream = "EVENTS", .durable = "fwd", .handler = "forward"});
  REQUIRE(in.ok());
  REQUIRE((*in)->start().ok());
  // The ingress fills the outbox and then waits, retrying, instead of failing messages.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (((*in)->stats().applied < 10 || (*in)->stats().retries == 0) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  CHECK((*in)->stats().applied == 10);
  CHECK((*in)->stats().retries > 0);
  CHECK((*e)->snapshot().pending_count() == 10);
  // Draining the consumer's outbox lets it continue: every message arrives, in order.
  std::vector<int> forwarded;
  pop::topic_router router;
  REQUIRE(router
              .on("fwd",
                  [&](const pop::outbox_message& m) {
                    forwarded.push_back(m.payload.at("seq").get<int>());
                    return absl::OkStatus();
                  })
              .ok());
  auto relay_owner = pop::test::must(pop::relay::create(**e, router));
  pop::relay& relay = *relay_owner;
  asio::io_context io;
  while (forwarded.size() < 40 &&
         std::chrono::steady_clock::now() < deadline + std::chrono::seconds(20)) {
    REQUIRE(run_on(io, relay.drain()).ok());
  }
  REQUIRE((*in)->stop().ok());
  REQUIRE(forwarded.size() == 40);
  for (int i = 0; i < 40; ++i) CHECK(forwarded[static_cast<std::size_t>(i)] == i);
  CHECK((*in)->stats().dead_lettered == 0);
}

TEST_CASE("a broker restart in the middle of a run loses nothing and keeps per-key order",
          "[nats]") {
  pop::test::nats_server server;
  auto nc = connect_to(server);
  make_stream(*nc);
  pop::test::temp_dir dir;
  pop::options po;
  po.journal = dir.file("producer.db");
  auto p = producer(po);
  auto sink = pop::nats_sink::create(
      *nc, {.source = "orders", .ack_timeout = std::chrono::milliseconds(500)});
  REQUIRE(sink.ok());
  consumer c;
  auto in = ingress_for(c, *nc);
  REQUIRE(in->start().ok());

  constexpr int keys = 8, rounds = 60, per_round = 5;
  auto relay_owner = pop::test::must(
      pop::relay::create(*p, **sink,
                         {.publish_timeout = std::chrono::milliseconds(1'000),
                          // The outages below outlast two attempts' backoff: they must not count.
                          .max_attempts = 2,
                          .initial_backoff = std::chrono::milliseconds(20),
                          .max_backoff = std::chrono::milliseconds(200)}));
  running_relay relay(*relay_owner);
  for (int r = 0; r < rounds; ++r) {
    for (int k = 0; k < keys; ++k) {
      REQUIRE(
          p->execute("emit",
                     {{"key", "k" + std::to_string(k)}, {"n", per_round}, {"from", r * per_round}})
              .ok());
    }
    if (r == rounds / 3 || r == 2 * rounds / 3) {
      // Two broker restarts while messages are in flight and unacknowledged; the run goes on once
      // the connection is back, so traffic crosses both. (A kill -9 of the broker is not among
      // them: a JetStream ack does not mean the message reached the disk — see README.)
      const std::uint64_t before = nc->stats().reconnects;
      server.stop();
      std::this_thread::sleep_for(std::chrono::milliseconds(r == rounds / 3 ? 50 : 1'500));
      server.start();
      const auto back = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (nc->stats().reconnects == before && std::chrono::steady_clock::now() < back) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      REQUIRE(nc->stats().reconnects > before);  // reconnected within 20 s
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  const std::size_t total = static_cast<std::size_t>(keys * rounds * per_round);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  // Until every message is applied and the relay has cleared it: the consumer can apply the last
  // message before the broker's ack of it reaches the relay, and a message whose ack is still
  // out when the relay stops stays pending (to be published again: at least once).
  while ((in->stats().applied < total || p->snapshot().pending_count() > 0) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  INFO("applied " << in->stats().applied << " of " << total << ", pending "
                  << p->snapshot().pending_count() << ", reconnects " << nc->stats().reconnects);
  const absl::Status relay_status = relay.stop();
  REQUIRE(in->stop().ok());
  CHECK(relay_status.code() == absl::StatusCode::kCancelled);
  CHECK(nc->stats().reconnects >= 2);
  CHECK(in->stats().applied == total);
  CHECK(in->stats().dead_lettered == 0);
  CHECK(pop::test::must(pop::dead_letters::create(*p))->count() == 0);
  for (int k = 0; k < keys; ++k) {
    json expected = json::array();
    for (int i = 0; i < rounds * per_round; ++i) expected.push_back(i);
    CHECK(c.got("k" + std::to_string(k)) == expected);  // each once, in commit order
  }
  CHECK(p->snapshot().pending_count() == 0);
}

TEST_CASE("a batch never holds more than options.batch messages even with late deliveries queued",
          "[nats]") {
  // A fetch whose wait ends before the server has sent all it asked for leaves the rest to arrive
  // afterwards, queued in the client for the next fetch. libnats 3.4.1 (Debian 12) then overfills
  // its own batch array when those are more than half the batch: the ingress must not let it.
  pop::test::nats_server server;
  auto nc = connect_to(server);
  make_stream(*nc);
  constexpr int keys = 8, per_key = 400, batch = 64;
  publish_keys(*nc, keys, per_key);
  consumer c;
  auto in = ingress_for(c, *nc, {.batch = batch});
  const std::size_t total = static_cast<std::size_t>(keys * per_key);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  std::size_t largest = 0;
  int round = 0;
  while (in->stats().applied < total && std::chrono::steady_clock::now() < deadline) {
    // Waits too short for a whole batch, then longer ones that find the late arrivals queued.
    const auto wait = std::chrono::milliseconds(round++ % 3 == 0 ? 1 : 100);
    absl::StatusOr<std::size_t> n = in->poll(wait);
    REQUIRE((n.ok() || n.status().code() == absl::StatusCode::kUnavailable));
    if (n.ok()) largest = std::max(largest, *n);
  }
  CHECK(largest <= static_cast<std::size_t>(batch));
  CHECK(in->stats().applied == total);
  for (int k = 0; k < keys; ++k) {
    json expected = json::array();
    for (int i = 0; i < per_key; ++i) expected.push_back(i);
    CHECK(c.got("k" + std::to_string(k)) == expected);
  }
}

TEST_CASE(
    "a consumer killed with kill -9 and restarted applies every message exactly once, in order per "
    "key",
    "[nats][crash]") {
  pop::test::nats_server server;
  auto nc = connect_to(server);
  make_stream(*nc);
  constexpr int keys = 8, per_key = 1000;
  publish_keys(*nc, keys, per_key);
  REQUIRE(stored(*nc) == keys * per_key);

  pop::test::temp_dir dir;
  const std::string journal = dir.file("consumer.db");
  const std::string expected = std::to_string(keys * per_key);
  const std::string url = server.url();  // built before the fork: the child must not allocate
  const auto spawn = [&] {
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      execl(POP_NATS_INGRESS_CHILD, POP_NATS_INGRESS_CHILD, url.c_str(), journal.c_str(),
            expected.c_str(), "30", static_cast<char*>(nullptr));
      _exit(127);
    }
    return pid;
  };
  const std::uint64_t seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  int kills = 0;
  for (int round = 0; round < 8; ++round) {
    const pid_t child = spawn();
    // Past the child's start and its wait for redeliveries (ack_wait 500 ms), while it applies.
    std::this_thread::sleep_for(std::chrono::milliseconds(550 + rng() % 600));
    REQUIRE(::kill(child, SIGKILL) == 0);
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    if (WIFSIGNALED(status)) {
      ++kills;
    } else {
      REQUIRE((WIFEXITED(status) && WEXITSTATUS(status) == 0));  // finished before the kill
      break;
    }
  }
  // The last run goes to the end, within a bound.
  const pid_t child = spawn();
  int status = 0;
  const bool exited = pop::test::eventually(
      [&] { return ::waitpid(child, &status, WNOHANG) == child; }, std::chrono::seconds(60));
  if (!exited) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
  }
  INFO("the last consumer run " << (exited ? "exited" : "was still running after 60 s"));
  REQUIRE(exited);
  REQUIRE((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  CHECK(kills > 0);

  auto e = pop::engine::open(pop::options{.journal = journal});
  REQUIRE(e.ok());
  const json counts = (*e)->snapshot().read("domain.count").value();
  CHECK(counts.size() == static_cast<std::size_t>(keys * per_key));
  std::size_t more_than_once = 0;
  for (const auto& [id, n] : counts.items()) more_than_once += n.get<int>() != 1 ? 1 : 0;
  CHECK(more_than_once == 0);
  for (int k = 0; k < keys; ++k) {
    json expected_seqs = json::array();
    for (int i = 0; i < per_key; ++i) expected_seqs.push_back(i);
    CHECK((*e)->snapshot().read("domain.got.k" + std::to_string(k)).value() == expected_seqs);
  }
}

TEST_CASE("binary data that is not UTF-8 is dead-lettered as base64 by an engine on a journal",
          "[nats]") {
  pop::test::nats_server server;
  auto nc = connect_to(server);
  make_stream(*nc);
  const std::string bytes("\xff\xfe\x00\x01", 4);
  REQUIRE(js_Publish(nullptr, nc->jetstream(), "evt.bin", bytes.data(),
                     static_cast<int>(bytes.size()), nullptr, nullptr) == NATS_OK);
  natsMsg* raw = nullptr;
  REQUIRE(natsMsg_Create(&raw, "evt.good", nullptr, R"({"key":"k","seq":1})", 19) == NATS_OK);
  REQUIRE(natsMsgHeader_Set(raw, "Pop-Key", "k") == NATS_OK);
  REQUIRE(natsMsgHeader_Set(raw, "x-bad", "\xc3\x28") == NATS_OK);  // not UTF-8
  REQUIRE(js_PublishMsg(nullptr, nc->jetstream(), raw, nullptr, nullptr) == NATS_OK);
  natsMsg_Destroy(raw);
  pop::test::temp_dir dir;
  {
    consumer c(pop::options{.journal = dir.file("c.db")});
    auto in = ingress_for(c, *nc);
    poll_until(*in, [&] { return in->stats().dead_lettered == 2; });
    const json dead = c.e->snapshot().read("system.ingress_dead_letters").value();
    REQUIRE(dead.size() == 2);
    CHECK(dead.begin().value().at("data_base64") == "//4AAQ==");
    CHECK(std::next(dead.begin()).value().at("error").get<std::string>().find("not UTF-8") !=
          std::string::npos);
  }
  // Both records are in the journal: it reopens with them.
  consumer again(pop::options{.journal = dir.file("c.db")});
  CHECK(again.e->snapshot().read("system.ingress_dead_letters").value().size() == 2);
}

TEST_CASE("a background initial connect returns at once and keeps trying", "[nats]") {
  pop::test::nats_server server;
  server.stop();  // its port is known and nothing listens on it yet
  pop::nats_connection_options o;
  o.servers = {server.url()};
  o.retry_initial_connect = true;
  o.reconnect_wait = std::chrono::milliseconds(20);
  const auto start = std::chrono::steady_clock::now();
  auto c = pop::nats_connection::connect(o);
  REQUIRE(c.ok());
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
  CHECK_FALSE((*c)->stats().connected);
  server.start();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!(*c)->stats().connected && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK((*c)->stats().connected);
}
