// Benchmarks of the relay with an in-process sink: draining a large queue, end to end with a
// producer, and commit-to-publish latency.
//   build/bench/relay_bench --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <thread>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "bench/support/latency.hpp"
#include "pop/relay/relay.hpp"

namespace asio = boost::asio;
using pop::json;

namespace {

using pop::bench::now_us;
using pop::bench::report_latency;

// An in-process sink that acknowledges at once and records commit-to-publish latency.
class counting_sink final : public pop::sink {
 public:
  std::atomic<std::size_t> count{0};
  std::vector<std::int64_t> latencies_us;

  std::optional<absl::Status> publish_now(const pop::outbox_message& m) override {
    latencies_us.push_back(now_us() - m.created_at_us);
    count.fetch_add(1, std::memory_order_release);
    return absl::OkStatus();
  }
  asio::awaitable<absl::Status> publish(const pop::outbox_message& m) override {
    co_return *publish_now(m);
  }
};

// A queue of `n` pending messages over 1024 keys, as the initial state.
json pending_queue(std::size_t n) {
  json queue = json::object();
  const std::int64_t created = now_us();
  for (std::size_t i = 0; i < n; ++i) {
    pop::outbox_message m;
    // (Of version 0, the initial state's: later ids are given to the engine's own commits.)
    m.version = 0;
    m.id = pop::make_message_id(0, static_cast<std::uint32_t>(i));
    m.topic = "order.placed";
    m.key = "k" + std::to_string(i % 1024);
    m.payload = {{"order", i}, {"qty", 2}};
    m.created_at_us = created;
    queue[m.id] = m.to_json();
  }
  return queue;
}

void BM_relay_drain(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  const json queue = pending_queue(n);
  for (auto _ : state) {
    state.PauseTiming();
    auto e =
        pop::engine::open(pop::options{.initial_state = {{"domain", {{"outbox_queue", queue}}}},
                                       .audit_capacity = 0})
            .value();
    counting_sink sink;
    auto r_owner = pop::relay::create(*e, sink).value();
    pop::relay& r = *r_owner;
    asio::io_context io;
    absl::Status result;
    asio::co_spawn(io, r.drain(), [&](std::exception_ptr, absl::Status s) { result = s; });
    state.ResumeTiming();
    io.run();
    state.PauseTiming();
    if (!result.ok() || sink.count != n || e->snapshot().pending_count() != 0) {
      state.SkipWithError("the relay did not drain the queue");
    }
    e.reset();
    state.ResumeTiming();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(n) * state.iterations());
}
BENCHMARK(BM_relay_drain)->Arg(100'000)->Unit(benchmark::kMillisecond)->UseRealTime();

std::unique_ptr<pop::engine> emitting_engine() {
  auto e = pop::engine::open(pop::options{.audit_capacity = 0}).value();
  const absl::Status s = e->register_process(
      {.name = "place", .emits = {"order.placed"}}, [](const pop::context&, const json& args) {
        pop::result r;
        r.emit("order.placed", args, "k" + std::to_string(args.get<int>() % 1024));
        return r;
      });
  if (!s.ok()) std::abort();
  return e;
}

// A producer thread executes processes that each emit one message while the relay runs on an
// io_context thread; measures messages delivered per second and commit-to-publish latency.
// With `paced`, the producer waits for each message to be delivered before the next commit,
// which measures latency without a queue.
void relay_with_producer(benchmark::State& state, bool paced) {
  const auto n = static_cast<std::size_t>(state.range(0));
  std::vector<std::int64_t> latencies;
  for (auto _ : state) {
    state.PauseTiming();
    auto e = emitting_engine();
    counting_sink sink;
    sink.latencies_us.reserve(n);
    auto r_owner = pop::relay::create(*e, sink).value();
    pop::relay& r = *r_owner;
    asio::io_context io;
    asio::cancellation_signal stop;
    asio::co_spawn(
        io, r.run(),
        asio::bind_cancellation_slot(stop.slot(), [](std::exception_ptr, absl::Status) {}));
    std::thread relay_thread([&] { io.run(); });
    state.ResumeTiming();
    for (std::size_t i = 0; i < n; ++i) {
      if (!e->execute("place", static_cast<int>(i)).ok()) std::abort();
      if (paced) {
        while (sink.count.load(std::memory_order_acquire) <= i) {
        }
      }
    }
    while (sink.count.load(std::memory_order_acquire) < n) std::this_thread::yield();
    state.PauseTiming();
    asio::post(io, [&] { stop.emit(asio::cancellation_type::terminal); });
    relay_thread.join();
    latencies.insert(latencies.end(), sink.latencies_us.begin(), sink.latencies_us.end());
    e.reset();
    state.ResumeTiming();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(n) * state.iterations());
  report_latency(state, latencies);
}

void BM_relay_end_to_end(benchmark::State& state) {
  relay_with_producer(state, false);
}
BENCHMARK(BM_relay_end_to_end)->Arg(200'000)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_relay_commit_to_publish_paced(benchmark::State& state) {
  relay_with_producer(state, true);
}
BENCHMARK(BM_relay_commit_to_publish_paced)
    ->Arg(20'000)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
