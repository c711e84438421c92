// Heap allocations per commit: the BM_execute_small process (read 2, write 2, emit 1) on 1,000
// accounts, counted by this binary's own operator new. Counters: allocations_per_commit (all of
// an execute) and process_allocations_per_commit (those made while the process function runs: its
// own JSON, strings and result, plus the context's work for its two reads).
//   build/bench/alloc_bench --benchmark_min_time=0.5
// A figure to compare builds with, not a time: it does not depend on the machine's speed.
#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "bench/support/transfer.hpp"
#include "pop/engine/engine.hpp"

namespace {

std::atomic<bool> counting{false};
std::atomic<std::uint64_t> allocations{0};
std::atomic<std::uint64_t> process_allocations{0};
thread_local bool in_process = false;

void count_one() {
  if (!counting.load(std::memory_order_relaxed)) return;
  allocations.fetch_add(1, std::memory_order_relaxed);
  if (in_process) process_allocations.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

// Every allocation through operator new (the engine's, nlohmann's, the standard containers').
void* operator new(std::size_t size) {
  count_one();
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) {
  return ::operator new(size);
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete[](void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  std::free(p);
}

namespace {

using pop::json;

// The engine benchmarks' small process, its allocations counted apart.
pop::result transfer(const pop::context& ctx, const json& args) {
  in_process = true;
  pop::result r = pop::bench::transfer(ctx, args);
  in_process = false;
  return r;
}

void BM_allocations_per_commit(benchmark::State& state) {
  json accounts = json::object();
  for (int i = 0; i < 1000; ++i) accounts["acct-" + std::to_string(i)] = 1000;
  auto e = pop::engine::open(
               pop::options{.initial_state = {{"domain", {{"accounts", std::move(accounts)}}}},
                            .audit_capacity = 0})
               .value();
  if (!e->register_process({.name = "transfer",
                            .inputs = {"domain.accounts"},
                            .outputs = {"domain.accounts"},
                            .emits = {"transfer.done"}},
                           transfer)
           .ok()) {
    std::abort();
  }
  std::mt19937 rng(1);
  std::vector<json> args;
  for (int i = 0; i < 1024; ++i) {
    args.push_back(json::array({"domain.accounts.acct-" + std::to_string(rng() % 500),
                                "domain.accounts.acct-" + std::to_string(500 + rng() % 500)}));
  }
  // Warm up: the outbox and the block caches reach their working size.
  for (int i = 0; i < 2000; ++i) {
    if (!e->execute("transfer", args[static_cast<std::size_t>(i) & 1023]).ok()) std::abort();
  }
  allocations = 0;
  process_allocations = 0;
  std::size_t i = 0;
  for (auto _ : state) {
    counting = true;
    auto c = e->execute("transfer", args[i++ & 1023]);
    counting = false;
    if (!c.ok()) std::abort();
    benchmark::DoNotOptimize(c);
  }
  const auto n = static_cast<double>(state.iterations());
  state.counters["allocations_per_commit"] = static_cast<double>(allocations.load()) / n;
  state.counters["process_allocations_per_commit"] =
      static_cast<double>(process_allocations.load()) / n;
}
BENCHMARK(BM_allocations_per_commit);

}  // namespace

BENCHMARK_MAIN();
