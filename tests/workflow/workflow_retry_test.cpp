// Tests of step retry policies: attempts with exponential backoff on the engine's clock, the cap,
// jitter, non-retryable codes, and what happens when the attempts are used up.
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"

#include <atomic>
#include <set>

#include "absl/strings/match.h"
#include "pop/workflow/workflow.hpp"
#include "tests/workflow/helpers.hpp"

using pop::json;
using namespace pop::test::workflow_helpers;

namespace {

constexpr std::int64_t kMsUs = 1000;

// An engine on a manual clock with workflows, the helpers' steps, and "flaky": fails with
// `code` while `failures` is above 0 (counting down), then appends the tag like "append".
struct fixture {
  std::shared_ptr<pop::manual_clock> clock = std::make_shared<pop::manual_clock>(1'000'000'000);
  std::unique_ptr<pop::engine> e = pop::test::must(pop::engine::open({.clock = clock}));
  std::unique_ptr<pop::workflows> wf = pop::test::must(pop::workflows::create(*e));
  std::atomic<int> failures{0};
  std::atomic<int> calls{0};
  absl::StatusCode code = absl::StatusCode::kUnavailable;
  bool throws = false;

  fixture() {
    register_steps(*wf);
    REQUIRE(wf->register_process(
                  {.name = "flaky", .inputs = {"domain.log"}, .outputs = {"domain.log"}},
                  [this](const pop::context& ctx, const json& args) -> absl::StatusOr<pop::result> {
                    ++calls;
                    if (failures.load() > 0) {
                      --failures;
                      if (throws) throw std::runtime_error("flaky threw");
                      return absl::Status(code, "dependency down");
                    }
                    json log = ctx.get_or<json>("domain.log", json::array());
                    log.push_back(args.value("tag", std::string("?")));
                    pop::result r;
                    r.set("domain.log", log);
                    return r;
                  })
                .ok());
  }
  void define(json retry, const std::string& on_error = "") {
    json a = {{"process", "flaky"}, {"next", "done"}, {"retry", std::move(retry)}};
    if (!on_error.empty()) a["on_error"] = on_error;
    json steps = {{"a", a}, {"done", {{"end", true}}}};
    if (!on_error.empty()) steps[on_error] = {{"process", "append"}, {"next", "done"}};
    const absl::Status s = wf->define(parse({{"name", "r"}, {"start", "a"}, {"steps", steps}}));
    INFO(s);
    REQUIRE(s.ok());
  }
  pop::workflow_instance get(const std::string& id) const { return wf->inspect(id).value(); }
  // Moves the clock to `t_us` and fires what is due; returns how many moved.
  std::size_t at(std::int64_t t_us) {
    clock->set(t_us);
    std::int64_t next = 0;
    return wf->expire(t_us, next).value();
  }
};

}  // namespace

TEST_CASE("a failing step is retried with exponential backoff up to its cap, then succeeds",
          "[workflow][retry]") {
  fixture f;
  f.define({{"attempts", 4},
            {"initial_ms", 100},
            {"multiplier", 2},
            {"max_interval_ms", 250},
            {"jitter", 0}});
  f.failures = 3;
  REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
  const std::int64_t t0 = f.clock->now_us();
  REQUIRE(f.wf->advance("i").value());
  pop::workflow_instance w = f.get("i");
  CHECK(w.status == "waiting");
  CHECK(w.retry_at_us == t0 + 100 * kMsUs);
  CHECK(w.attempt == 2);
  CHECK(f.wf->runnable().empty());
  CHECK(absl::StrContains(w.events.back().outcome, "error (attempt 1 of 4)"));
  CHECK(absl::StrContains(w.events.back().outcome, "retrying in 100 ms"));
  // Not a microsecond early.
  CHECK(f.at(t0 + 100 * kMsUs - 1) == 0);
  CHECK(f.at(t0 + 100 * kMsUs) == 1);
  CHECK(f.get("i").status == "running");
  REQUIRE(f.wf->advance("i").value());  // attempt 2 fails: 200 ms
  CHECK(f.get("i").retry_at_us == t0 + 300 * kMsUs);
  CHECK(f.at(t0 + 300 * kMsUs) == 1);
  REQUIRE(f.wf->advance("i").value());  // attempt 3 fails: 400 ms, capped at 250
  CHECK(f.get("i").retry_at_us == t0 + 550 * kMsUs);
  CHECK(f.at(t0 + 550 * kMsUs) == 1);
  run_all(*f.wf);  // attempt 4 succeeds; retries are not visits, so max_visits 1 holds
  w = f.get("i");
  CHECK(w.status == "completed");
  CHECK(w.attempt == 0);
  CHECK(f.calls == 4);
  CHECK(state(*f.e, "domain.log") == json::array({"x"}));
}

TEST_CASE("a step that throws is retried like one that returns an error", "[workflow][retry]") {
  fixture f;
  f.throws = true;
  f.define({{"attempts", 2}, {"initial_ms", 10}, {"jitter", 0}});
  f.failures = 1;
  REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
  REQUIRE(f.wf->advance("i").value());
  CHECK(f.get("i").status == "waiting");
  CHECK(f.at(f.clock->now_us() + 10 * kMsUs) == 1);
  run_all(*f.wf);
  CHECK(f.get("i").status == "completed");
}

TEST_CASE("when the attempts are used up a step fails, compensates or pauses, as its policy says",
          "[workflow][retry]") {
  SECTION("fail: the step's on_error") {
    fixture f;
    f.define({{"attempts", 2}, {"initial_ms", 10}, {"jitter", 0}}, "fallback");
    f.failures = 100;
    REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
    REQUIRE(f.wf->advance("i").value());
    f.at(f.clock->now_us() + 10 * kMsUs);
    run_all(*f.wf);
    const pop::workflow_instance w = f.get("i");
    CHECK(w.status == "completed");
    CHECK(f.calls == 2);
    CHECK(state(*f.e, "domain.log") == json::array({"x"}));  // the fallback's
  }
  SECTION("compensate: the failure path even with on_error") {
    fixture f;
    f.define({{"attempts", 2}, {"initial_ms", 10}, {"jitter", 0}, {"on_exhausted", "compensate"}},
             "fallback");
    f.failures = 100;
    REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
    REQUIRE(f.wf->advance("i").value());
    f.at(f.clock->now_us() + 10 * kMsUs);
    run_all(*f.wf);
    const pop::workflow_instance w = f.get("i");
    CHECK(w.status == "failed");
    CHECK(absl::StrContains(w.error, "step 'a' failed after 2 attempts"));
    CHECK(state(*f.e, "domain.log").is_null());
  }
  SECTION("pause: stuck for an operator, whose resume gives fresh attempts") {
    fixture f;
    f.define({{"attempts", 2}, {"initial_ms", 10}, {"jitter", 0}, {"on_exhausted", "pause"}});
    f.failures = 3;
    REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
    REQUIRE(f.wf->advance("i").value());
    f.at(f.clock->now_us() + 10 * kMsUs);
    run_all(*f.wf);
    pop::workflow_instance w = f.get("i");
    CHECK(w.status == "stuck");
    CHECK(absl::StrContains(w.stuck_reason, "failed after 2 attempts"));
    CHECK(absl::StrContains(w.stuck_reason, "resume it to try again"));
    CHECK(f.wf->metrics().stuck == 1);
    REQUIRE(f.wf->resume("i").ok());  // the dependency is back after one more failure
    REQUIRE(f.wf->advance("i").value());
    CHECK(f.get("i").status == "waiting");
    f.at(f.clock->now_us() + 10 * kMsUs);
    run_all(*f.wf);
    w = f.get("i");
    CHECK(w.status == "completed");
    CHECK(f.calls == 4);
  }
}

TEST_CASE("a stuck instance resumes to a status this program does not know by its own name",
          "[workflow][retry]") {
  fixture f;
  f.define({{"attempts", 1}, {"initial_ms", 10}, {"jitter", 0}, {"on_exhausted", "pause"}});
  f.failures = 100;
  REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
  run_all(*f.wf);
  REQUIRE(f.get("i").status == "stuck");
  // As a later version of the program might have parked it: from a status this one lacks.
  const pop::snapshot s = f.e->snapshot();
  REQUIRE(f.e->compare_and_swap(s.version(), {{"system.workflows.i.stuck.status", "paused-by-v3"}},
                                pop::cas_mode::keys)
              .ok());
  REQUIRE(f.wf->resume("i").ok());
  CHECK(f.get("i").status == "paused-by-v3");  // kept as written, not "unknown" or null
  CHECK_FALSE(f.wf->advance("i").value());     // neither runnable
  CHECK(f.wf->runnable(10).empty());
  CHECK(f.wf->metrics().stuck == 0);
}

TEST_CASE("non-retryable codes fail at once, and jitter spreads the delay within its bounds",
          "[workflow][retry]") {
  {
    fixture f;
    f.code = absl::StatusCode::kInvalidArgument;
    f.define({{"attempts", 5}, {"non_retryable", {"INVALID_ARGUMENT"}}});
    f.failures = 1;
    REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
    REQUIRE(f.wf->advance("i").value());
    const pop::workflow_instance w = f.get("i");
    CHECK(w.status == "failed");
    CHECK(absl::StrContains(w.error, "(INVALID_ARGUMENT is not retryable)"));
    CHECK(f.calls == 1);
  }
  fixture f;
  f.define({{"attempts", 2}, {"initial_ms", 1000}, {"jitter", 0.5}});
  f.failures = 1;
  std::set<std::int64_t> delays;
  for (int i = 0; i < 20; ++i) {
    const std::string id = "j" + std::to_string(i);
    REQUIRE(f.wf->start("r", id, {{"tag", "x"}}).ok());
    f.failures = 1;
    REQUIRE(f.wf->advance(id).value());
    const std::int64_t delay = f.get(id).retry_at_us - f.clock->now_us();
    CHECK(delay >= 500 * kMsUs);
    CHECK(delay <= 1500 * kMsUs);
    delays.insert(delay);
  }
  CHECK(delays.size() > 10);  // spread, not one value
}

TEST_CASE("retry policies round-trip through JSON and bad ones are refused at load",
          "[workflow][retry]") {
  fixture f;
  const json full = {{"attempts", 3},          {"initial_ms", 5}, {"multiplier", 1.5},
                     {"max_interval_ms", 50},  {"jitter", 0.25},  {"non_retryable", {"NOT_FOUND"}},
                     {"on_exhausted", "pause"}};
  const json def = {{"name", "r"},
                    {"start", "a"},
                    {"steps",
                     {{"a", {{"process", "flaky"}, {"next", "done"}, {"retry", full}}},
                      {"done", {{"end", true}}}}}};
  CHECK(parse(def).to_json() == def);
  const auto refused = [&](json retry, const std::string& part) {
    json d = def;
    d["steps"]["a"]["retry"] = std::move(retry);
    absl::StatusOr<pop::workflow_definition> parsed = pop::workflow_definition::from_json(d);
    const absl::Status s = parsed.ok() ? f.wf->define(*parsed) : parsed.status();
    INFO(s);
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK(absl::StrContains(s.message(), part));
  };
  refused({{"attempts", 0}}, "attempts must be 1 to 1000");
  refused({{"initial_ms", 100}, {"max_interval_ms", 10}}, "max_interval_ms");
  refused({{"multiplier", 0.5}}, "multiplier must be 1 to 100");
  refused({{"jitter", 2}}, "jitter must be 0 to 1");
  refused({{"non_retryable", {"NOPE"}}}, "non_retryable names 'NOPE'");
  refused({{"on_exhausted", "shrug"}}, "use fail, compensate or pause");
  refused({{"tries", 3}}, "unknown field 'tries'");
  json on_end = def;
  on_end["steps"]["done"]["retry"] = {{"attempts", 2}};
  const absl::Status s = f.wf->define(parse(on_end));
  CHECK(absl::StrContains(s.message(), "only process steps retry"));
}

TEST_CASE("a failing compensation is retried as its step's policy says, then the instance ends",
          "[workflow][retry]") {
  // a succeeds and records its compensation ("flaky"); b fails: the failure path compensates a.
  const auto define = [](fixture& f, json retry) {
    json steps = {
        {"a", {{"process", "append"}, {"next", "b"}, {"compensate", "flaky"}, {"retry", retry}}},
        {"b", {{"fail", "b broke"}}}};
    const absl::Status s = f.wf->define(parse({{"name", "r"}, {"start", "a"}, {"steps", steps}}));
    INFO(s);
    REQUIRE(s.ok());
  };
  SECTION("it fails twice and succeeds on the third attempt: compensated") {
    fixture f;
    define(f, {{"attempts", 3}, {"initial_ms", 10}, {"multiplier", 2}, {"jitter", 0}});
    f.failures = 2;
    REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
    const std::int64_t t0 = f.clock->now_us();
    run_all(*f.wf);  // a, then b fails, then the compensation's first attempt fails
    pop::workflow_instance w = f.get("i");
    CHECK(w.status == "waiting");
    CHECK(w.retry_at_us == t0 + 10 * kMsUs);
    CHECK(w.attempt == 2);
    CHECK(
        absl::StrContains(w.events.back().outcome, "compensation 'flaky' failed (attempt 1 of 3)"));
    // Cancelling now changes nothing: a compensation runs to its end.
    CHECK(f.wf->cancel("i", "too late").ok());
    CHECK(f.get("i").status == "waiting");
    CHECK(f.at(t0 + 10 * kMsUs - 1) == 0);
    CHECK(f.at(t0 + 10 * kMsUs) == 1);
    CHECK(f.get("i").status == "compensating");
    run_all(*f.wf);  // the second attempt fails: 20 ms more
    CHECK(f.get("i").retry_at_us == t0 + 30 * kMsUs);
    CHECK(f.at(t0 + 30 * kMsUs) == 1);
    run_all(*f.wf);
    w = f.get("i");
    CHECK(w.status == "compensated");
    CHECK(f.calls == 3);
    CHECK(state(*f.e, "domain.log") == json::array({"x", "x"}));  // a's, then the compensation's
  }
  SECTION("it keeps failing: failed after its attempts, naming the compensation") {
    fixture f;
    define(f, {{"attempts", 2}, {"initial_ms", 10}, {"jitter", 0}});
    f.failures = 100;
    REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
    run_all(*f.wf);
    CHECK(f.at(f.clock->now_us() + 10 * kMsUs) == 1);
    run_all(*f.wf);
    const pop::workflow_instance w = f.get("i");
    CHECK(w.status == "failed");
    CHECK(f.calls == 2);
    CHECK(absl::StrContains(w.error, "b broke"));
    CHECK(absl::StrContains(w.error, "compensation 'flaky' failed after 2 attempts"));
  }
  SECTION("a non-retryable code fails at once") {
    fixture f;
    define(f, {{"attempts", 5}, {"non_retryable", {"INVALID_ARGUMENT"}}});
    f.code = absl::StatusCode::kInvalidArgument;
    f.failures = 100;
    REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
    run_all(*f.wf);
    const pop::workflow_instance w = f.get("i");
    CHECK(w.status == "failed");
    CHECK(f.calls == 1);
    CHECK(absl::StrContains(w.error, "(INVALID_ARGUMENT is not retryable)"));
  }
  SECTION("without a policy (one attempt) it fails at once, as before") {
    fixture f;
    define(f, json::object());
    f.failures = 1;
    REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
    run_all(*f.wf);
    CHECK(f.get("i").status == "failed");
    CHECK(f.calls == 1);
  }
  SECTION("a compensation that throws is retried too") {
    fixture f;
    f.throws = true;
    define(f, {{"attempts", 2}, {"initial_ms", 10}, {"jitter", 0}});
    f.failures = 1;
    REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
    run_all(*f.wf);
    CHECK(f.get("i").status == "waiting");
    CHECK(f.at(f.clock->now_us() + 10 * kMsUs) == 1);
    run_all(*f.wf);
    CHECK(f.get("i").status == "compensated");
  }
}

TEST_CASE(
    "a compensation retry waits out its backoff even after the instance's deadline, and "
    "a cancel leaves it to finish",
    "[workflow][retry]") {
  fixture f;
  // a succeeds (compensated by "flaky"); w waits for a reply that never comes.
  json steps = {{"a",
                 {{"process", "append"},
                  {"next", "w"},
                  {"compensate", "flaky"},
                  {"retry", {{"attempts", 3}, {"initial_ms", 100}, {"jitter", 0}}}}},
                {"w", {{"wait", {{"reply", "done"}}}, {"key", "tag"}}},
                {"done", {{"end", true}}}};
  REQUIRE(f.wf->define(parse({{"name", "r"}, {"start", "a"}, {"steps", steps}})).ok());
  f.failures = 1;
  const std::int64_t t0 = f.clock->now_us();
  REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}, 50).ok());  // a 50 ms deadline
  run_all(*f.wf);
  REQUIRE(f.get("i").status == "waiting");
  CHECK(f.at(t0 + 50 * kMsUs) == 1);  // the deadline: compensating
  run_all(*f.wf);                     // the compensation's first attempt fails
  pop::workflow_instance w = f.get("i");
  CHECK(w.status == "waiting");
  CHECK(w.retry_at_us == t0 + 150 * kMsUs);
  // The passed deadline does not cut the backoff short, nor replace the error.
  CHECK(f.at(t0 + 150 * kMsUs - 1) == 0);
  CHECK(absl::StrContains(f.get("i").error, "ran past its timeout"));
  // Cancelling through the operator process (a program without the definition) is refused.
  auto bare = pop::test::must(pop::workflows::create(*f.e));
  CHECK(bare->cancel("i", "stop").code() == absl::StatusCode::kFailedPrecondition);
  CHECK(f.at(t0 + 150 * kMsUs) == 1);
  run_all(*f.wf);
  w = f.get("i");
  CHECK(w.status == "compensated");
  CHECK(absl::StrContains(w.error, "ran past its timeout"));
}

TEST_CASE(
    "a compensation whose attempts are used up pauses for an operator when its policy says "
    "so",
    "[workflow][retry]") {
  fixture f;
  json steps = {
      {"a",
       {{"process", "append"},
        {"next", "b"},
        {"compensate", "flaky"},
        {"retry",
         {{"attempts", 2}, {"initial_ms", 10}, {"jitter", 0}, {"on_exhausted", "pause"}}}}},
      {"b", {{"fail", "b broke"}}}};
  REQUIRE(f.wf->define(parse({{"name", "r"}, {"start", "a"}, {"steps", steps}})).ok());
  f.failures = 100;
  REQUIRE(f.wf->start("r", "i", {{"tag", "x"}}).ok());
  run_all(*f.wf);
  CHECK(f.at(f.clock->now_us() + 10 * kMsUs) == 1);
  run_all(*f.wf);
  pop::workflow_instance w = f.get("i");
  CHECK(w.status == "stuck");
  CHECK(absl::StrContains(w.stuck_reason,
                          "compensation 'flaky' of step 'a' failed after 2 attempts"));
  CHECK(f.calls == 2);
  // The dependency is back; the operator resumes it and the compensation runs again.
  f.failures = 0;
  REQUIRE(f.wf->resume("i").ok());
  CHECK(f.get("i").status == "compensating");
  run_all(*f.wf);
  w = f.get("i");
  CHECK(w.status == "compensated");
  CHECK(f.calls == 3);
}
