// Benchmarks across a real nats-server with JetStream (started by the benchmark on a free port
// on 127.0.0.1, file storage in a temporary directory, stopped by PID): messages/s from a relay
// into JetStream, from JetStream through an ingress into a second engine, and the end-to-end
// latency from a commit in one engine to its apply in the other.
//   build/bench/nats_bench --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <nats/nats.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "bench/support/latency.hpp"
#include "pop/nats/nats_ingress.hpp"
#include "pop/nats/nats_sink.hpp"
#include "pop/relay/relay.hpp"
#include "tests/support/nats_server.hpp"
#include "tests/support/temp_dir.hpp"

namespace asio = boost::asio;
using pop::json;

namespace {

using pop::bench::now_us;
using pop::bench::report_latency;

// One broker for the whole run; each benchmark makes its own stream.
pop::test::nats_server& server() {
  static pop::test::nats_server s;
  return s;
}

std::unique_ptr<pop::nats_connection> connect() {
  pop::nats_connection_options o;
  o.servers = {server().url()};
  return pop::nats_connection::connect(o).value();
}

void fresh_stream(pop::nats_connection& c, const std::string& name, const std::string& subjects) {
  jsCtx* js = c.jetstream();
  static_cast<void>(js_DeleteStream(js, name.c_str(), nullptr, nullptr));
  if (!pop::ensure_stream(c, {.name = name, .subjects = {subjects}}).ok()) std::abort();
}

// An engine whose process `emit` emits args.n messages over 256 keys.
std::unique_ptr<pop::engine> producer(pop::options o = {}) {
  auto e = pop::engine::open(std::move(o)).value();
  const absl::Status st =
      e->register_process({.name = "emit", .outputs = {"domain.sent"}, .emits = {"evt.created"}},
                          [](const pop::context&, const json& args) -> absl::StatusOr<pop::result> {
                            pop::result r;
                            const int from = args.at("from").get<int>();
                            for (int i = 0; i < args.at("n").get<int>(); ++i) {
                              const int seq = from + i;
                              r.emit("evt.created", {{"seq", seq}, {"sku", "A1"}, {"qty", 2}},
                                     "k" + std::to_string(seq % 256));
                            }
                            return r;
                          });
  if (!st.ok()) std::abort();
  return e;
}

void fill(pop::engine& e, int n, int per_commit) {
  for (int from = 0; from < n; from += per_commit) {
    if (!e.execute("emit", {{"from", from}, {"n", std::min(per_commit, n - from)}}).ok())
      std::abort();
  }
}

// The consuming engine: one counter per key, each message applied once through the inbox; the
// handler records commit-to-apply latency.
struct consumer {
  explicit consumer(pop::options o = {})
      : e(pop::engine::open(std::move(o)).value()),
        in_owner(pop::inbox::create(*e).value()),
        in(*in_owner) {
    const absl::Status st = in.register_handler(
        {.name = "apply", .inputs = {"domain.n"}, .outputs = {"domain.n"}},
        [this](const pop::context& ctx,
               const pop::outbox_message& m) -> absl::StatusOr<pop::result> {
          pop::result r;
          r.set("domain.n." + m.key, ctx.get_or<int>("domain.n." + m.key, 0) + 1);
          std::lock_guard lock(mu);
          latencies_us.push_back(now_us() - m.created_at_us);
          return r;
        });
    if (!st.ok()) std::abort();
  }
  std::unique_ptr<pop::engine> e;
  std::unique_ptr<pop::inbox> in_owner;
  pop::inbox& in;
  std::mutex mu;
  std::vector<std::int64_t> latencies_us;
};

absl::Status drain(pop::relay& r) {
  asio::io_context io;
  absl::Status out = absl::InternalError("not run");
  asio::co_spawn(io, r.drain(), [&](std::exception_ptr, absl::Status s) { out = s; });
  io.run();
  return out;
}

// Drains `e`'s outbox into the stream through a nats_sink; returns the relay's clear count.
std::uint64_t publish_all(pop::nats_connection& nc, pop::engine& e) {
  auto sink = pop::nats_sink::create(nc, {.source = "bench"}).value();
  auto r = pop::relay::create(e, *sink).value();
  if (!drain(*r).ok() || e.snapshot().pending_count() != 0) std::abort();
  return r->metrics().clears;
}

// Relay -> JetStream: drain N pending messages (256 keys) through a nats_sink; counted when
// every one is acknowledged by the stream and cleared from the outbox.
void BM_relay_to_jetstream(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  auto nc = connect();
  std::int64_t done = 0;
  for (auto _ : state) {
    state.PauseTiming();
    fresh_stream(*nc, "BENCH", "evt.>");
    auto p = producer();
    fill(*p, n, 500);
    state.ResumeTiming();
    const std::uint64_t clears = publish_all(*nc, *p);
    done += n;
    state.counters["clears"] = static_cast<double>(clears);
  }
  state.counters["msgs_per_s"] =
      benchmark::Counter(static_cast<double>(done), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_relay_to_jetstream)->Arg(20'000)->Unit(benchmark::kMillisecond)->UseRealTime();

// JetStream -> ingress -> engine: N stored messages consumed by a new durable consumer and
// applied once each through the inbox (in memory, or on a journal with durability=process).
void BM_jetstream_to_engine(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  const bool journaled = state.range(1) != 0;
  auto nc = connect();
  fresh_stream(*nc, "BENCH", "evt.>");
  {
    auto p = producer();
    fill(*p, n, 500);
    publish_all(*nc, *p);
  }
  std::int64_t done = 0;
  int round = 0;
  for (auto _ : state) {
    state.PauseTiming();
    pop::test::temp_dir dir;
    pop::options o;
    if (journaled) o.journal = dir.file("consumer.db");
    consumer c(o);
    auto in = pop::nats_ingress::create(*c.e, c.in, *nc,
                                        {.stream = "BENCH",
                                         .durable = "bench-" + std::to_string(round++),
                                         .handler = "apply",
                                         .batch = 512})
                  .value();
    state.ResumeTiming();
    while (in->stats().applied < static_cast<std::uint64_t>(n)) {
      if (!in->poll(std::chrono::milliseconds(100)).ok()) std::abort();
    }
    done += n;
  }
  state.counters["msgs_per_s"] =
      benchmark::Counter(static_cast<double>(done), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_jetstream_to_engine)
    ->Args({20'000, 0})
    ->Args({20'000, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// End to end, two engines: a producer commits `rate` messages/s (0: as fast as it can) while its
// relay publishes to JetStream and an ingress applies them to the consumer; latency is from the
// commit in the producer to the apply in the consumer, for every message.
void BM_engine_to_engine(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  const int rate = static_cast<int>(state.range(1));
  auto nc = connect();
  std::vector<std::int64_t> all_latencies;
  std::int64_t done = 0;
  for (auto _ : state) {
    state.PauseTiming();
    fresh_stream(*nc, "BENCH", "evt.>");
    auto p = producer();
    consumer c;
    auto sink = pop::nats_sink::create(*nc, {.source = "bench"}).value();
    auto r_owner = pop::relay::create(*p, *sink).value();
    pop::relay& r = *r_owner;
    auto in = pop::nats_ingress::create(*c.e, c.in, *nc,
                                        {.stream = "BENCH",
                                         .durable = "e2e",
                                         .handler = "apply",
                                         .batch = 512,
                                         .fetch_wait = std::chrono::milliseconds(20)})
                  .value();
    asio::io_context io;
    asio::cancellation_signal stop;
    asio::co_spawn(
        io, r.run(),
        asio::bind_cancellation_slot(stop.slot(), [](std::exception_ptr, absl::Status) {}));
    std::thread io_thread([&] { io.run(); });
    if (!in->start().ok()) std::abort();
    state.ResumeTiming();
    const int per_commit = rate == 0 ? 100 : 1;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < n; i += per_commit) {
      if (rate > 0) {
        std::this_thread::sleep_until(start + std::chrono::microseconds(1'000'000LL * i / rate));
      }
      if (!p->execute("emit", {{"from", i}, {"n", std::min(per_commit, n - i)}}).ok()) std::abort();
    }
    while (in->stats().applied < static_cast<std::uint64_t>(n)) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    state.PauseTiming();
    asio::post(io, [&] { stop.emit(asio::cancellation_type::terminal); });
    io_thread.join();
    if (!in->stop().ok()) std::abort();
    done += n;
    {
      std::lock_guard lock(c.mu);
      all_latencies.insert(all_latencies.end(), c.latencies_us.begin(), c.latencies_us.end());
    }
    state.ResumeTiming();
  }
  state.counters["msgs_per_s"] =
      benchmark::Counter(static_cast<double>(done), benchmark::Counter::kIsRate);
  report_latency(state, all_latencies);
}
BENCHMARK(BM_engine_to_engine)
    ->Args({20'000, 0})
    ->Args({5'000, 2'000})
    ->Args({20'000, 10'000})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
