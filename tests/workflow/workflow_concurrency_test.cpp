// The workflow runner on a multi-threaded executor: different instances advance at the same time
// (their step processes run together, outside the engine's lock), one instance never twice at
// once, and every step's effect happens once. Runs under ThreadSanitizer in CI.
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"
#include "tests/support/temp_dir.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "absl/strings/str_cat.h"
#include "pop/workflow/workflow.hpp"
#include "pop/workflow/workflow_runner.hpp"
#include "tests/workflow/helpers.hpp"

using pop::json;
using namespace pop::test::workflow_helpers;

namespace {

// Runs `runner.settle()` on an io_context served by `threads` threads; returns its status.
absl::Status settle_on_threads(pop::workflow_runner& runner, int threads) {
  boost::asio::io_context io;
  absl::Status done = absl::UnknownError("not run");
  boost::asio::co_spawn(io, runner.settle(), [&](std::exception_ptr, absl::Status s) { done = s; });
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) pool.emplace_back([&io] { io.run(); });
  for (std::thread& t : pool) t.join();
  return done;
}

}  // namespace

TEST_CASE("the runner advances different instances at the same time", "[workflow][concurrency]") {
  pop::engine e;
  auto wf = pop::test::must(pop::workflows::create(e));
  // "meet" waits (at most 10 s) until another step process runs beside it: a runner that
  // advanced one instance at a time, or an engine that ran processes under its lock, fails it.
  std::mutex mu;
  std::condition_variable cv;
  int inside = 0;
  REQUIRE(wf->register_process(
                {.name = "meet", .outputs = {"domain.met"}},
                [&](const pop::context&, const json& args) -> absl::StatusOr<pop::result> {
                  std::unique_lock lock(mu);
                  ++inside;
                  cv.notify_all();
                  const bool met =
                      cv.wait_for(lock, std::chrono::seconds(10), [&] { return inside >= 2; });
                  if (!met) return absl::DeadlineExceededError("no other step ran beside this one");
                  pop::result r;
                  r.set("domain.met." + args.at("_instance").get<std::string>(), true);
                  return r;
                })
              .ok());
  REQUIRE(wf->define(parse({{"name", "pair"},
                            {"start", "m"},
                            {"steps",
                             {{"m", {{"process", "meet"}, {"next", "done"}}},
                              {"done", {{"end", true}}}}}}))
              .ok());
  REQUIRE(wf->start("pair", "a").ok());
  REQUIRE(wf->start("pair", "b").ok());
  pop::workflow_runner runner(e, *wf, {.parallelism = 2});
  const absl::Status s = settle_on_threads(runner, 2);
  INFO(s);
  REQUIRE(s.ok());
  for (const char* id : {"a", "b"}) {
    const pop::workflow_instance w = wf->inspect(id).value();
    INFO(id << ": " << w.error);
    CHECK(w.status == "completed");
  }
}

TEST_CASE("a parallel runner takes every instance to the end, each step once, none twice at once",
          "[workflow][concurrency]") {
  // In memory, and on a journal, where each worker's steps of a round form one engine::batch:
  // when settle() returns, every step is durable and a reopened engine has them all.
  const bool journaled = GENERATE(false, true);
  INFO("journaled: " << journaled);
  pop::test::temp_dir dir;
  pop::options o;
  if (journaled) o.journal = dir.file("wf.db");
  auto owner = pop::test::must(pop::engine::open(o));
  pop::engine& e = *owner;
  auto wf = pop::test::must(pop::workflows::create(e));
  constexpr int kInstances = 200;
  std::mutex mu;
  std::map<std::string, int> running;  // instance -> step processes running for it now
  std::atomic<int> overlaps{0};
  REQUIRE(wf->register_process(
                {.name = "count", .inputs = {"domain.count"}, .outputs = {"domain.count"}},
                [&](const pop::context& ctx, const json& args) -> absl::StatusOr<pop::result> {
                  const std::string id = args.at("_instance").get<std::string>();
                  {
                    std::lock_guard lock(mu);
                    if (++running[id] > 1) ++overlaps;
                  }
                  const std::string at = "domain.count." + id;
                  pop::result r;
                  r.set(at, ctx.get_or<int>(at, 0) + 1);
                  std::lock_guard lock(mu);
                  --running[id];
                  return r;
                })
              .ok());
  json steps = json::object();
  for (int i = 0; i < 5; ++i) {
    steps["s" + std::to_string(i)] = {{"process", "count"},
                                      {"next", i == 4 ? "done" : "s" + std::to_string(i + 1)}};
  }
  steps["done"] = {{"end", true}};
  REQUIRE(wf->define(parse({{"name", "five"}, {"start", "s0"}, {"steps", steps}})).ok());
  for (int i = 0; i < kInstances; ++i) REQUIRE(wf->start("five", "i" + std::to_string(i)).ok());
  pop::workflow_runner runner(e, *wf, {.max_steps_per_round = 64, .parallelism = 4});
  const absl::Status s = settle_on_threads(runner, 4);
  INFO(s);
  REQUIRE(s.ok());
  CHECK(overlaps == 0);
  CHECK(wf->list("completed").size() == kInstances);
  const json counts = state(e, "domain.count");
  REQUIRE(counts.size() == kInstances);
  for (const auto& [id, n] : counts.items()) {
    INFO(id);
    CHECK(n == 5);  // each of its five steps once, though a conflicting commit runs a step again
  }
  CHECK(runner.steps() == kInstances * 6);
  if (journaled) {
    CHECK(e.durable_version() == e.version());
    const json before = e.snapshot().to_json();
    wf.reset();
    owner.reset();
    auto reopened = pop::test::must(pop::engine::open(o));
    CHECK(reopened->snapshot().to_json() == before);
  }
}
