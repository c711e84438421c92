// Benchmarks of the workflow engine beside a plain execute of the same process:
//   build/bench/workflow_bench --benchmark_counters_tabular=true
// BM_workflow_step_overhead: one process step (advance) against an execute of its process;
// BM_workflow_steps: 1,000 instances x 10 trivial steps, in memory and with a journal (each
// pass over the instances one engine::batch; journal_each: every step waits for its record);
// BM_workflow_history: the cost of a step once an instance has 10 or 10,000 history entries;
// BM_workflow_runner: the same 1,000 x 10 steps driven by workflow_runner::settle() on
// `threads` io_context threads with as many instances advanced at once (how a service runs it);
// BM_workflow_start: starting an instance.
#include <benchmark/benchmark.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "pop/workflow/workflow.hpp"
#include "pop/workflow/workflow_runner.hpp"

using pop::json;

namespace {

// "bump": increments domain.n.<tag>; the trivial step every benchmark runs.
void register_bump(pop::workflows& wf) {
  const absl::Status s = wf.register_process(
      {.name = "bump", .inputs = {"domain.n"}, .outputs = {"domain.n"}},
      [](const pop::context& ctx, const json& args) {
        const std::string at = "domain.n." + args.value("tag", std::string("x"));
        pop::result r;
        r.set(at, ctx.get_or<std::int64_t>(at, 0) + 1);
        return r;
      });
  if (!s.ok()) std::abort();
}

pop::workflow_definition definition(const json& j) {
  absl::StatusOr<pop::workflow_definition> d = pop::workflow_definition::from_json(j);
  if (!d.ok()) std::abort();
  return *d;
}

// Ten bump steps, then the end.
json ten_steps() {
  json steps = json::object();
  for (int i = 0; i < 10; ++i) {
    steps["s" + std::to_string(i)] = {{"process", "bump"},
                                      {"next", i == 9 ? "done" : "s" + std::to_string(i + 1)}};
  }
  steps["done"] = {{"end", true}};
  return {{"name", "ten"}, {"start", "s0"}, {"steps", steps}};
}

// A bump step that runs again and again (bounded by a large max_visits).
const json loop = {
    {"name", "loop"},
    {"start", "work"},
    {"steps", {{"work", {{"process", "bump"}, {"next", "work"}, {"max_visits", 100'000'000}}}}}};

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// An in-memory engine with instance "i" of the loop workflow started.
std::pair<std::unique_ptr<pop::engine>, std::unique_ptr<pop::workflows>> looping_instance() {
  pop::options o;
  o.audit_capacity = 0;
  auto e = pop::engine::open(o).value();
  auto wf = pop::workflows::create(*e).value();
  register_bump(*wf);
  if (!wf->define(definition(loop)).ok() || !wf->start("loop", "i", {{"tag", "t"}}).ok()) {
    std::abort();
  }
  return {std::move(e), std::move(wf)};
}

// A process step (advance) against an execute of the same process, in the same run.
void BM_workflow_step_overhead(benchmark::State& state) {
  auto [e, wf] = looping_instance();
  constexpr int plain_runs = 20'000;
  const auto plain_start = std::chrono::steady_clock::now();
  for (int i = 0; i < plain_runs; ++i) {
    if (!e->execute("bump", {{"tag", "p"}}).ok()) std::abort();
  }
  const double plain_us = seconds_since(plain_start) * 1e6 / plain_runs;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    if (!wf->advance("i").value()) std::abort();
  }
  const double step_us = seconds_since(start) * 1e6 / static_cast<double>(state.iterations());
  state.counters["execute_us"] = plain_us;
  state.counters["step_us"] = step_us;
  state.counters["overhead_us"] = step_us - plain_us;
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_workflow_step_overhead)->UseRealTime();

// Runs `drive(engine, workflows)` (timed) over fresh engines with 1,000 "ten" instances
// started, in memory or on a journal at the default `process` durability; counts `drive`'s steps.
template <class Drive>
void workflow_steps(benchmark::State& state, bool journal, Drive drive) {
  const std::string file = (std::filesystem::temp_directory_path() /
                            ("pop-workflow-bench-" + std::to_string(::getpid()) + ".db"))
                               .string();
  std::int64_t steps = 0;
  for (auto _ : state) {
    state.PauseTiming();
    for (const char* suffix : {"", "-wal", "-shm", "-head", "-log"})
      std::filesystem::remove(file + suffix);
    pop::options o;
    o.audit_capacity = 0;
    if (journal) o.journal = file;
    auto e = pop::engine::open(o).value();
    auto wf = pop::workflows::create(*e).value();
    register_bump(*wf);
    if (!wf->define(definition(ten_steps())).ok()) std::abort();
    for (int i = 0; i < 1000; ++i) {
      if (!wf->start("ten", "i" + std::to_string(i), {{"tag", std::to_string(i % 64)}}).ok()) {
        std::abort();
      }
    }
    state.ResumeTiming();
    steps += drive(*e, *wf);
    state.PauseTiming();
    wf.reset();
    e.reset();
    state.ResumeTiming();
  }
  for (const char* suffix : {"", "-wal", "-shm", "-head", "-log"})
    std::filesystem::remove(file + suffix);
  state.SetItemsProcessed(steps);
}

// One pass: advance() on every runnable instance, one after the other on this thread; the
// number of steps taken.
std::int64_t advance_pass(pop::workflows& wf) {
  std::int64_t steps = 0;
  for (const std::string& id : wf.runnable(100'000)) {
    if (wf.advance(id).value()) ++steps;
  }
  return steps;
}

// Passes until none moves; each pass is one engine::batch (as workflow_runner's rounds are): its
// steps share journal transactions and are durable when the pass ends.
std::int64_t advance_all(pop::engine& e, pop::workflows& wf) {
  std::int64_t steps = 0;
  for (std::int64_t moved = 1; moved > 0; steps += moved) {
    const absl::Status durable = e.batch([&] {
      moved = advance_pass(wf);
      return absl::OkStatus();
    });
    if (!durable.ok()) std::abort();
  }
  return steps;
}

// The same without a batch: every advance() returns only once its step is durable.
std::int64_t advance_each(pop::engine&, pop::workflows& wf) {
  std::int64_t steps = 0;
  for (std::int64_t moved = 1; moved > 0; steps += moved) moved = advance_pass(wf);
  return steps;
}

void workflow_steps(benchmark::State& state, bool journal) {
  workflow_steps(state, journal, advance_all);
}

// A workflow_runner settling every instance, on `threads` threads advancing as many at once.
void workflow_runner(benchmark::State& state, bool journal) {
  const auto threads = static_cast<std::size_t>(state.range(0));
  workflow_steps(state, journal, [threads](pop::engine& e, pop::workflows& wf) -> std::int64_t {
    pop::workflow_runner runner(e, wf, {.parallelism = threads});
    boost::asio::io_context io;
    absl::Status settled = absl::UnknownError("not run");
    boost::asio::co_spawn(io, runner.settle(),
                          [&](std::exception_ptr, absl::Status s) { settled = s; });
    std::vector<std::thread> pool;
    for (std::size_t i = 0; i < threads; ++i) pool.emplace_back([&io] { io.run(); });
    for (std::thread& t : pool) t.join();
    if (!settled.ok()) {
      std::fprintf(stderr, "runner: %s after %llu steps\n", settled.ToString().c_str(),
                   static_cast<unsigned long long>(runner.steps()));
      std::abort();
    }
    return static_cast<std::int64_t>(runner.steps());
  });
}
void BM_workflow_steps_memory(benchmark::State& state) {
  workflow_steps(state, false);
}
void BM_workflow_steps_journal(benchmark::State& state) {
  workflow_steps(state, true);
}
// Wall-clock time: with a journal a step also waits for its record to be written.
BENCHMARK(BM_workflow_steps_memory)
    ->Name("BM_workflow_steps/memory")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_workflow_steps_journal)
    ->Name("BM_workflow_steps/journal")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
void BM_workflow_steps_journal_each(benchmark::State& state) {
  workflow_steps(state, true, advance_each);
}
BENCHMARK(BM_workflow_steps_journal_each)
    ->Name("BM_workflow_steps/journal_each")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_workflow_runner_memory(benchmark::State& state) {
  workflow_runner(state, false);
}
void BM_workflow_runner_journal(benchmark::State& state) {
  workflow_runner(state, true);
}
BENCHMARK(BM_workflow_runner_memory)
    ->Name("BM_workflow_runner/memory")
    ->Arg(1)
    ->Arg(2)
    ->Arg(8)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_workflow_runner_journal)
    ->Name("BM_workflow_runner/journal")
    ->Arg(1)
    ->Arg(2)
    ->Arg(8)
    ->Arg(32)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_workflow_history(benchmark::State& state) {
  const auto history = static_cast<int>(state.range(0));
  auto [e, wf] = looping_instance();
  for (int i = 0; i < history; ++i) {
    if (!wf->advance("i").value()) std::abort();
  }
  for (auto _ : state) {
    if (!wf->advance("i").value()) std::abort();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_workflow_history)->Arg(10)->Arg(10'000)->Unit(benchmark::kMicrosecond);

void BM_workflow_start(benchmark::State& state) {
  pop::options o;
  o.audit_capacity = 0;
  auto e = pop::engine::open(o).value();
  auto wf = pop::workflows::create(*e).value();
  register_bump(*wf);
  if (!wf->define(definition(ten_steps())).ok()) std::abort();
  std::int64_t n = 0;
  for (auto _ : state) {
    if (!wf->start("ten", "i" + std::to_string(n++)).ok()) std::abort();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_workflow_start);

}  // namespace

BENCHMARK_MAIN();
