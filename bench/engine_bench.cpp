// Benchmarks of the engine core, with a mutable baseline doing the same work in the same binary.
//   build/bench/engine_bench --benchmark_format=json
#include <benchmark/benchmark.h>

#include <malloc.h>
#include <unistd.h>

#include <fstream>
#include <mutex>
#include <random>
#include <unordered_map>

#include "bench/support/transfer.hpp"
#include "pop/engine/engine.hpp"

using pop::json;

namespace {

std::vector<std::string> account_names(std::size_t n) {
  std::vector<std::string> names;
  names.reserve(n);
  for (std::size_t i = 0; i < n; ++i) names.push_back("acct-" + std::to_string(i));
  return names;
}

using pop::bench::transfer;  // the small process: reads 2 paths, writes 2, emits 1 message

std::unique_ptr<pop::engine> make_engine(const std::vector<std::string>& names, bool audit) {
  json accounts = json::object();
  for (const auto& n : names) accounts[n] = 1000;
  auto e = pop::engine::open(
               pop::options{.initial_state = {{"domain", {{"accounts", std::move(accounts)}}}},
                            .audit_capacity = audit ? 4096u : 0u})
               .value();
  const absl::Status s = e->register_process({.name = "transfer",
                                              .inputs = {"domain.accounts"},
                                              .outputs = {"domain.accounts"},
                                              .emits = {"transfer.done"}},
                                             transfer);
  if (!s.ok()) std::abort();
  return e;
}

// Empties the outbox so a long run measures commits, not an ever-growing queue.
void drain(pop::engine& e) {
  const pop::snapshot s = e.snapshot();
  std::vector<pop::write> writes;
  s.view(e.outbox_path()).for_each_member([&](std::string_view id, const pop::value_view&) {
    writes.push_back({e.outbox_path().str() + "." + std::string(id), std::nullopt});
    return true;
  });
  if (!writes.empty() && !e.compare_and_swap(s.version(), writes, pop::cas_mode::keys).ok())
    std::abort();
}

void run_transfers(benchmark::State& state, pop::engine& e, const std::vector<std::string>& names) {
  std::mt19937_64 rng(42);
  std::vector<json> args;
  for (int i = 0; i < 1024; ++i) {
    const auto& x = names[rng() % names.size()];
    auto y = names[rng() % names.size()];
    if (y == x)
      y = names[(rng() + 1) % names.size()] == x ? names[0] : names[(rng() + 1) % names.size()];
    args.push_back(json::array({"domain.accounts." + x, "domain.accounts." + y}));
  }
  std::size_t i = 0;
  for (auto _ : state) {
    auto c = e.execute("transfer", args[i++ & 1023]);
    benchmark::DoNotOptimize(c);
    if ((i & 4095) == 0) {
      state.PauseTiming();
      drain(e);
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_execute_small(benchmark::State& state) {
  const auto names = account_names(1000);
  auto e = make_engine(names, state.range(0) != 0);
  run_transfers(state, *e, names);
  state.SetLabel(state.range(0) ? "audit on" : "audit off");
}
BENCHMARK(BM_execute_small)->Arg(1)->Arg(0);

void BM_commit_state_size(benchmark::State& state) {
  const auto names = account_names(static_cast<std::size_t>(state.range(0)));
  auto e = make_engine(names, true);
  run_transfers(state, *e, names);
}
BENCHMARK(BM_commit_state_size)
    ->Arg(1'000)
    ->Arg(100'000)
    ->Arg(1'000'000)
    ->Unit(benchmark::kMicrosecond);

void BM_snapshot(benchmark::State& state) {
  const auto names = account_names(static_cast<std::size_t>(state.range(0)));
  auto e = make_engine(names, false);
  for (auto _ : state) {
    pop::snapshot s = e->snapshot();
    benchmark::DoNotOptimize(s);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_snapshot)->Arg(1'000)->Arg(1'000'000);

void BM_snapshot_read_deep(benchmark::State& state) {
  const auto names = account_names(static_cast<std::size_t>(state.range(0)));
  auto e = make_engine(names, false);
  const pop::snapshot s = e->snapshot();
  std::vector<pop::path> paths;
  for (std::size_t i = 0; i < 1024; ++i) {
    paths.push_back(
        pop::path::parse("domain.accounts." + names[(i * 7919) % names.size()]).value());
  }
  std::size_t i = 0;
  for (auto _ : state) {
    const std::int64_t v = s.view(paths[i++ & 1023]).get<std::int64_t>();
    benchmark::DoNotOptimize(v);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_snapshot_read_deep)->Arg(1'000)->Arg(1'000'000);

// Resident memory of the process, in bytes, after returning freed memory to the system.
std::int64_t resident_bytes() {
  ::malloc_trim(0);
  std::ifstream statm("/proc/self/statm");
  std::int64_t pages = 0;
  std::int64_t resident = 0;
  statm >> pages >> resident;
  return resident * ::sysconf(_SC_PAGESIZE);
}

// Memory per byte of state: an engine opened on 10^6 small accounts (the caller's JSON freed),
// after 100,000 small commits with the outbox drained. Counter bytes_per_json_byte: resident
// memory the engine added, over the length of the state as JSON text.
void BM_memory_per_state_byte(benchmark::State& state) {
  const auto names = account_names(static_cast<std::size_t>(state.range(0)));
  for (auto _ : state) {
    const std::int64_t before = resident_bytes();
    std::size_t text_bytes = 0;
    std::unique_ptr<pop::engine> e;
    {
      json accounts = json::object();
      for (std::size_t i = 0; i < names.size(); ++i) {
        accounts[names[i]] = {{"balance", 1000}, {"owner", "owner-" + std::to_string(i)}};
      }
      json initial = {{"domain", {{"accounts", std::move(accounts)}}}};
      text_bytes = initial.dump().size();
      e = pop::engine::open(pop::options{.initial_state = std::move(initial), .audit_capacity = 0})
              .value();
    }
    if (!e->register_process({.name = "touch",
                              .inputs = {"domain.accounts"},
                              .outputs = {"domain.accounts"},
                              .emits = {"touched"}},
                             [](const pop::context& ctx, const json& args) {
                               const std::string at =
                                   "domain.accounts." + args.get<std::string>() + ".balance";
                               pop::result r;
                               r.set(at, ctx.get<std::int64_t>(at) + 1);
                               r.emit("touched", args);
                               return r;
                             })
             .ok()) {
      std::abort();
    }
    for (std::size_t i = 0; i < 100'000; ++i) {
      if (!e->execute("touch", names[(i * 7919) % names.size()]).ok()) std::abort();
      if (i % 4096 == 4095) drain(*e);
    }
    drain(*e);
    const std::int64_t used = resident_bytes() - before;
    state.counters["json_mb"] = static_cast<double>(text_bytes) / 1e6;
    state.counters["resident_mb"] = static_cast<double>(used) / 1e6;
    state.counters["bytes_per_json_byte"] =
        static_cast<double>(used) / static_cast<double>(text_bytes);
  }
}
BENCHMARK(BM_memory_per_state_byte)->Arg(1'000'000)->Iterations(1)->Unit(benchmark::kMillisecond);

// Memory per pending message: 100,000 messages of a ~100-byte payload left in the outbox.
// Counters: bytes_per_message (resident memory added per message) and payload_bytes (its payload
// as JSON text); the target is at most 2 x payload + 200 bytes.
void BM_memory_per_pending_message(benchmark::State& state) {
  for (auto _ : state) {
    const std::int64_t before = resident_bytes();
    auto e = pop::engine::open(pop::options{.audit_capacity = 0}).value();
    if (!e->register_process({.name = "emit", .emits = {"order.placed"}}, [](const pop::context&,
                                                                             const json& args) {
            pop::result r;
            r.emit("order.placed", args,
                   "customer-" + std::to_string(args.at("n").get<int>() % 977));
            return r;
          }).ok()) {
      std::abort();
    }
    const auto payload = [](int i) {
      return json{{"n", i}, {"sku", "SKU-000042"}, {"qty", 3}, {"note", std::string(48, 'x')}};
    };
    constexpr int n = 100'000;
    for (int i = 0; i < n; ++i) {
      if (!e->execute("emit", payload(i)).ok()) std::abort();
    }
    const std::int64_t used = resident_bytes() - before;
    state.counters["bytes_per_message"] = static_cast<double>(used) / n;
    state.counters["payload_bytes"] = static_cast<double>(payload(n / 2).dump().size());
  }
}
BENCHMARK(BM_memory_per_pending_message)->Iterations(1)->Unit(benchmark::kMillisecond);

// The same work as BM_execute_small on a mutex-guarded std::unordered_map plus a std::vector
// outbox: no versions, no contracts, no conflict checks, no audit.
void BM_baseline_mutable_map(benchmark::State& state) {
  const auto names = account_names(1000);
  std::mutex mu;
  std::unordered_map<std::string, json> accounts;
  std::vector<json> outbox;
  for (const auto& n : names) accounts["domain.accounts." + n] = 1000;
  std::mt19937_64 rng(42);
  std::vector<json> args;
  for (int i = 0; i < 1024; ++i) {
    args.push_back(json::array({"domain.accounts." + names[rng() % names.size()],
                                "domain.accounts." + names[rng() % names.size()]}));
  }
  std::size_t i = 0;
  for (auto _ : state) {
    const json& a = args[i++ & 1023];
    std::lock_guard<std::mutex> lock(mu);
    const std::string& from = a[0].get_ref<const std::string&>();
    const std::string& to = a[1].get_ref<const std::string&>();
    const std::int64_t x = accounts.at(from).get<std::int64_t>();
    const std::int64_t y = accounts.at(to).get<std::int64_t>();
    accounts[from] = x - 1;
    accounts[to] = y + 1;
    outbox.push_back(json{{"topic", "transfer.done"}, {"key", to}, {"payload", a}});
    if (outbox.size() == 4096) outbox.clear();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_baseline_mutable_map);

}  // namespace

BENCHMARK_MAIN();
