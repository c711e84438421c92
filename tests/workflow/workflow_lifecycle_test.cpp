// Tests of an instance's life beyond its steps: retention and purging of ended instances, the
// history bound, and continue-as-new.
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"

#include "absl/strings/match.h"
#include "pop/relay/inbox.hpp"
#include "pop/workflow/workflow.hpp"
#include "pop/workflow/workflow_runner.hpp"
#include "tests/workflow/helpers.hpp"

using pop::json;
using namespace pop::test::workflow_helpers;

namespace {

constexpr std::int64_t kHourUs = 3'600'000'000;

// Appends the tag, then counts up to `runs` runs with continue-as-new.
json pager(int runs) {
  return {{"name", "pager"},
          {"start", "page"},
          {"steps",
           {{"page", {{"process", "append"}, {"next", "more"}}},
            {"more",
             {{"branch",
               {{{"path", "domain.count"}, {"op", "lt"}, {"value", runs}, {"next", "again"}}}},
              {"otherwise", "done"}}},
            {"again", {{"continue_as_new", true}}},
            {"done", {{"end", true}}}}}};
}

// A workflow engine on `e` whose runs hold at most `max_history` entries, with the test steps.
auto bounded_workflows(pop::engine& e, std::int64_t max_history) {
  pop::workflow_options opts;
  opts.max_history = max_history;
  auto wf = pop::test::must(pop::workflows::create(e, opts));
  register_steps(*wf);
  return wf;
}

// An engine on a manual clock with workflows that keep ended instances for an hour, and the
// test steps.
struct retained {
  std::shared_ptr<pop::manual_clock> clock = std::make_shared<pop::manual_clock>(1'000'000'000'000);
  std::unique_ptr<pop::engine> e = pop::test::must(pop::engine::open({.clock = clock}));
  std::unique_ptr<pop::workflows> wf = make();

 private:
  std::unique_ptr<pop::workflows> make() {
    pop::workflow_options opts;
    opts.retention = std::chrono::hours(1);
    auto w = pop::test::must(pop::workflows::create(*e, opts));
    register_steps(*w);
    return w;
  }
};

}  // namespace

TEST_CASE("ended instances are purged after the retention period, record, history and index",
          "[workflow][retention]") {
  retained r;
  auto& clock = r.clock;
  auto& e = r.e;
  auto& wf = r.wf;
  REQUIRE(wf->define(parse({{"name", "linear"},
                            {"start", "a"},
                            {"steps",
                             {{"a", {{"process", "append"}, {"next", "b"}}},
                              {"b", {{"process", "fail_now"}, {"next", "done"}}},
                              {"done", {{"end", true}}}}}}))
              .ok());
  REQUIRE(wf->define(parse({{"name", "quick"},
                            {"start", "a"},
                            {"steps",
                             {{"a", {{"process", "append"}, {"next", "done"}}},
                              {"done", {{"end", true}}}}}}))
              .ok());
  REQUIRE(wf->start("quick", "old", {{"tag", "x"}}).ok());
  REQUIRE(wf->start("linear", "again", {{"tag", "y"}}).ok());
  REQUIRE(wf->start("quick", "young", {{"tag", "z"}}).ok());
  run_all(*wf);  // all three end now; "again" failed at b
  const std::int64_t t0 = clock->now_us();
  CHECK(wf->inspect("old").value().ended_at_us == t0);
  REQUIRE(wf->inspect("again").value().status == "failed");
  // Half an hour later "again" is restarted (no longer due) and ends again.
  clock->advance(kHourUs / 2);
  REQUIRE(wf->restart_from("again", "a").ok());
  CHECK(wf->inspect("again").value().ended_at_us == 0);
  CHECK(state(*e, "system.workflow_index.ended.again").is_null());
  run_all(*wf);
  CHECK(wf->inspect("again").value().ended_at_us == clock->now_us());

  std::int64_t next_due = 0;
  clock->set(t0 + kHourUs - 1);
  REQUIRE(wf->expire(clock->now_us(), next_due).ok());
  CHECK(wf->list().size() == 3);  // nothing is an hour old yet
  // A purge runs at most once a minute (or a tenth of a shorter retention): not yet here...
  constexpr std::int64_t kMinuteUs = 60'000'000;
  clock->set(t0 + kHourUs - 1 + kMinuteUs - 1);
  REQUIRE(wf->expire(clock->now_us(), next_due).ok());
  CHECK(wf->list().size() == 3);
  // ...but here.
  clock->set(t0 + kHourUs - 1 + kMinuteUs);
  REQUIRE(wf->expire(clock->now_us(), next_due).ok());
  for (const char* gone : {"old", "young"}) {
    CHECK(wf->inspect(gone).status().code() == absl::StatusCode::kNotFound);
    CHECK(state(*e, std::string("system.workflow_history.") + gone).is_null());
    CHECK(state(*e, std::string("system.workflow_index.ended.") + gone).is_null());
  }
  CHECK(wf->inspect("again").value().status == "failed");
  // Purged, its id is free: the same start runs a new instance.
  REQUIRE(wf->start("quick", "old", {{"tag", "x"}}).ok());
  CHECK(wf->inspect("old").value().status == "running");
  // An hour after it ended the second time, "again" goes too.
  clock->set(t0 + kHourUs + kHourUs / 2 + kMinuteUs);
  REQUIRE(wf->expire(clock->now_us(), next_due).ok());
  CHECK(wf->inspect("again").status().code() == absl::StatusCode::kNotFound);
  CHECK(wf->inspect("old").value().status == "running");
  CHECK(state(*e, "domain.log").size() == 4);  // the business state is never purged
}

TEST_CASE("retention 0 keeps ended instances forever", "[workflow][retention]") {
  auto clock = std::make_shared<pop::manual_clock>(1'000'000'000'000);
  auto e = pop::test::must(pop::engine::open({.clock = clock}));
  pop::workflow_options opts;
  opts.retention = std::chrono::milliseconds(0);
  auto wf = pop::test::must(pop::workflows::create(*e, opts));
  register_steps(*wf);
  REQUIRE(wf->define(parse(pager(1))).ok());
  REQUIRE(wf->start("pager", "p", {{"tag", "x"}}).ok());
  run_all(*wf);
  REQUIRE(wf->inspect("p").value().status == "completed");
  clock->advance(1000 * 24 * kHourUs);
  std::int64_t next_due = 0;
  REQUIRE(wf->expire(clock->now_us(), next_due).ok());
  CHECK(wf->inspect("p").value().status == "completed");
}

TEST_CASE("continue-as-new starts the next run with a fresh history, so history stays bounded",
          "[workflow][continue_as_new]") {
  pop::engine e;
  auto wf = pop::test::must(pop::workflows::create(e));
  register_steps(*wf);
  REQUIRE(wf->define(parse(pager(50))).ok());
  REQUIRE(wf->start("pager", "p", {{"tag", "x"}}).ok());
  run_all(*wf);
  const pop::workflow_instance w = wf->inspect("p").value();
  CHECK(w.status == "completed");
  CHECK(w.run == 49);
  CHECK(state(e, "domain.count") == 50);
  // Only the last run's entries are kept: continued, page, more, done.
  REQUIRE(w.events.size() == 4);
  CHECK(w.events.front().outcome == "continued as new: run 49");
  CHECK(state(e, "system.workflow_history.p").size() == 4);
  CHECK(w.inputs == json{{"tag", "x"}});
  // The JSON form round-trips.
  CHECK(parse(pager(3)).to_json() == pager(3));
  // A continue_as_new step with another kind is refused.
  json bad = pager(3);
  bad["steps"]["again"]["end"] = true;
  const absl::Status s = wf->define(parse(bad));
  CHECK(s.code() == absl::StatusCode::kInvalidArgument);
  CHECK(absl::StrContains(s.message(), "exactly one of"));
}

TEST_CASE("a run whose history reaches max_history takes the failure path",
          "[workflow][continue_as_new]") {
  pop::engine e;
  auto wf = bounded_workflows(e, 10);
  REQUIRE(
      wf->define(parse({{"name", "spin"},
                        {"start", "a"},
                        {"steps",
                         {{"a", {{"process", "append"}, {"next", "a"}, {"max_visits", 1000}}}}}}))
          .ok());
  REQUIRE(wf->start("spin", "s", {{"tag", "x"}}).ok());
  run_all(*wf);
  const pop::workflow_instance w = wf->inspect("s").value();
  CHECK(w.status == "failed");
  CHECK(absl::StrContains(w.error, "its history reached 10 entries"));
  CHECK(state(e, "domain.count") == 10);
  // With continue-as-new the same bound never trips.
  REQUIRE(wf->define(parse(pager(30))).ok());
  REQUIRE(wf->start("pager", "p", {{"tag", "y"}}).ok());
  run_all(*wf);
  CHECK(wf->inspect("p").value().status == "completed");
  // An operator's restart counts the bound afresh: without that the restarted instance would fail
  // again at its first step, with domain.count unchanged.
  const int before = state(e, "domain.count").get<int>();
  REQUIRE(wf->restart_from("s", "a").ok());
  run_all(*wf);
  CHECK(wf->inspect("s").value().status == "failed");
  CHECK(state(e, "domain.count").get<int>() > before + 5);
}

TEST_CASE("the history bound never stops a run's end or its continue-as-new step",
          "[workflow][continue_as_new]") {
  pop::engine e;
  auto wf = bounded_workflows(e, 2);
  REQUIRE(wf->define(parse(pager(1))).ok());
  // page (1 entry), more (2): the end step comes at the bound and still ends the run.
  REQUIRE(wf->start("pager", "ends").ok());
  run_all(*wf);
  CHECK(wf->inspect("ends").value().status == "completed");
  // With two pages the continue_as_new step comes at the bound: it starts run 1, whose third
  // entry is past the bound.
  pop::engine e2;
  auto wf2 = bounded_workflows(e2, 2);
  REQUIRE(wf2->define(parse(pager(2))).ok());
  REQUIRE(wf2->start("pager", "continues").ok());
  run_all(*wf2);
  const pop::workflow_instance w = wf2->inspect("continues").value();
  CHECK(w.run == 1);
  CHECK(w.status == "failed");
  CHECK(absl::StrContains(w.error, "its history reached 2 entries"));
}

TEST_CASE("signal-with-start starts a missing instance and delivers the signal in one commit",
          "[workflow][signal_with_start]") {
  pop::engine e;
  auto wf = pop::test::must(pop::workflows::create(e));
  auto in = pop::test::must(pop::inbox::create(e));
  REQUIRE(pop::register_workflow_resume(*in, *wf).ok());
  register_steps(*wf);
  REQUIRE(wf->define(parse({{"name", "cart"},
                            {"start", "add"},
                            {"steps",
                             {{"add", {{"process", "append"}, {"next", "w"}}},
                              {"w", {{"wait", {{"checkout", "pay"}}}, {"key", "cart"}}},
                              {"pay", {{"process", "append"}, {"next", "done"}}},
                              {"done", {{"end", true}}}}}}))
              .ok());
  const std::string handler = wf->resume_spec().name;
  const auto signal = [](std::string id, std::string key) {
    return message(std::move(id), "checkout", std::move(key), {{"total", 12}});
  };
  // No instance "c1" yet: the signal starts it and waits in its mailbox for its wait step.
  const pop::outbox_message first =
      pop::workflows::with_start(signal("m1", "cart-1"), "cart", "c1", {{"cart", "cart-1"}})
          .value();
  const std::uint64_t before = e.version();
  REQUIRE(in->apply(handler, first).value().applied);
  CHECK(e.version() == before + 1);  // one commit: the start, the signal and the inbox mark
  CHECK(wf->inspect("c1").value().status == "running");
  CHECK(!state(e, "system.workflow_index.mailbox.cart-1").is_null());
  CHECK(!in->apply(handler, first).value().applied);  // a resend is absorbed
  run_all(*wf);
  pop::workflow_instance c1 = wf->inspect("c1").value();
  CHECK(c1.status == "completed");
  CHECK(c1.received.at("checkout") == json{{"total", 12}});
  CHECK(c1.events.front().outcome == "started by signal checkout (m1)");
  // An instance that exists and waits is signalled, not started again.
  REQUIRE(wf->start("cart", "c2", {{"cart", "cart-2"}, {"tag", "t"}}).ok());
  run_all(*wf);
  REQUIRE(wf->inspect("c2").value().status == "waiting");
  REQUIRE(in->apply(handler, pop::workflows::with_start(signal("m2", "cart-2"), "cart", "c2",
                                                        {{"cart", "other inputs"}})
                                 .value())
              .value()
              .applied);
  run_all(*wf);
  c1 = wf->inspect("c2").value();
  CHECK(c1.status == "completed");
  CHECK(c1.inputs.at("cart") == "cart-2");
  CHECK(state(e, "domain.count") == 4);
  // Bad input is refused and changes nothing.
  CHECK(pop::workflows::with_start(signal("m3", "k"), "cart", "a.b").status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(
      pop::workflows::with_start(signal("m3", "k"), "cart", "c3", json::array()).status().code() ==
      absl::StatusCode::kInvalidArgument);
  const std::uint64_t at = e.version();
  CHECK(in->apply(handler, pop::workflows::with_start(signal("m4", "k"), "ghost", "c4", {}).value())
            .status()
            .code() == absl::StatusCode::kNotFound);
  CHECK(e.version() == at);
  CHECK(wf->inspect("c4").status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("hardening: child ids across runs, duration bounds, signals for ended instances",
          "[workflow][continue_as_new]") {
  pop::engine e;
  auto wf = bounded_workflows(e, 6);
  auto in = pop::test::must(pop::inbox::create(e));
  REQUIRE(pop::register_workflow_resume(*in, *wf).ok());
  REQUIRE(wf->define(parse({{"name", "one"},
                            {"start", "a"},
                            {"steps",
                             {{"a", {{"process", "append"}, {"next", "done"}}},
                              {"done", {{"end", true}}}}}}))
              .ok());
  // Each run calls a child: run 2's child must not overwrite run 1's.
  REQUIRE(
      wf
          ->define(parse(
              {{"name", "runs"},
               {"start", "c"},
               {"steps",
                {{"c", {{"call", "one"}, {"next", "more"}}},
                 {"more",
                  {{"branch",
                    {{{"path", "domain.count"}, {"op", "lt"}, {"value", 2}, {"next", "again"}}}},
                   {"otherwise", "done"}}},
                 {"again", {{"continue_as_new", true}}},
                 {"done", {{"end", true}}}}}}))
          .ok());
  REQUIRE(wf->start("runs", "r", {{"tag", "x"}}).ok());
  run_all(*wf);
  CHECK(wf->inspect("r").value().status == "completed");
  CHECK(wf->inspect("r-c-1").value().status == "completed");
  CHECK(wf->inspect("r-c-2").value().status == "completed");
  // The bound is 6 entries per run: "runs" makes 6 (c called, child completed, more, again...)
  // and its continue_as_new step is always allowed.
  CHECK(state(e, "domain.count") == 2);

  // Durations past a year are refused (their wake times would overflow).
  json sleepy = {{"name", "sleepy"},
                 {"start", "s"},
                 {"steps",
                  {{"s", {{"sleep_ms", 400LL * 24 * 3600 * 1000}, {"next", "done"}}},
                   {"done", {{"end", true}}}}}};
  CHECK(absl::StrContains(wf->define(parse(sleepy)).message(), "sleep_ms must be 0 to"));
  CHECK(wf->start("one", "t", {}, -5).status().code() == absl::StatusCode::kInvalidArgument);

  // A signal-with-start whose key cannot be a wait key is refused; one for an ended instance is
  // absorbed, not kept for another instance on its key.
  pop::outbox_message m = message("m1", "go", "a.b");
  CHECK(pop::workflows::with_start(m, "one", "z").status().code() ==
        absl::StatusCode::kInvalidArgument);
  REQUIRE(wf->define(parse({{"name", "waits"},
                            {"start", "w"},
                            {"steps",
                             {{"w", {{"wait", {{"go", "done"}}}, {"key", "k"}}},
                              {"done", {{"end", true}}}}}}))
              .ok());
  m.key = "k1";
  const std::string handler = wf->resume_spec().name;
  REQUIRE(in->apply(handler, pop::workflows::with_start(m, "waits", "w1", {{"k", "k1"}}).value())
              .value()
              .applied);
  run_all(*wf);
  REQUIRE(wf->inspect("w1").value().status == "completed");
  m.id = "m2";
  REQUIRE(in->apply(handler, pop::workflows::with_start(m, "waits", "w1", {{"k", "k1"}}).value())
              .value()
              .applied);
  CHECK(state(e, "system.workflow_index.mailbox.k1").is_null());
}

TEST_CASE("continue-as-new moves the next run to the newest version of its workflow",
          "[workflow][continue_as_new]") {
  pop::engine e;
  auto wf = pop::test::must(pop::workflows::create(e));
  register_steps(*wf);
  json v1 = pager(3);
  v1["version"] = "1";
  REQUIRE(wf->define(parse(v1)).ok());
  REQUIRE(wf->start("pager", "p", {{"tag", "x"}}).ok());
  for (int i = 0; i < 3; ++i) REQUIRE(wf->advance("p").value());  // page, more, again: run 1
  CHECK(wf->inspect("p").value().run == 1);
  // Version 2 pages with "undo" (it appends "undo:x"); the running run 1 keeps version 1.
  json v2 = pager(3);
  v2["version"] = "2";
  v2["steps"]["page"]["process"] = "undo";
  REQUIRE(wf->define(parse(v2)).ok());
  REQUIRE(wf->advance("p").value());  // run 1's page, on version 1
  CHECK(wf->inspect("p").value().definition_version == "1");
  run_all(*wf);
  const pop::workflow_instance w = wf->inspect("p").value();
  CHECK(w.status == "completed");
  CHECK(w.definition_version == "2");
  CHECK(w.run == 2);
  CHECK(w.events.front().outcome == "continued as new: run 2 on version '2' (was '1')");
  CHECK(state(e, "domain.log") == json::array({"x", "x", "undo:x"}));
}

TEST_CASE("instances that ended before the ended index existed are purged too",
          "[workflow][retention]") {
  retained r;
  auto& clock = r.clock;
  auto& e = r.e;
  auto& wf = r.wf;
  const std::int64_t t0 = clock->now_us();
  // Records as an older pop left them: ended, with no entry in the ended index (one knows when
  // it ended), beside a running one.
  REQUIRE(e->compare_and_swap(
               e->version(),
               {{"system.workflows.old1",
                 json{{"workflow", "linear"}, {"status", "completed"}, {"cursor", "done"}}},
                {"system.workflows.old2", json{{"workflow", "linear"},
                                               {"status", "failed"},
                                               {"cursor", "b"},
                                               {"ended_at_us", t0 - 2 * kHourUs}}},
                {"system.workflows.live",
                 json{{"workflow", "linear"}, {"status", "waiting"}, {"cursor", "b"}}}})
              .value()
              .committed);
  std::int64_t next = 0;
  REQUIRE(wf->expire(t0, next).ok());
  CHECK(wf->inspect("old2").status().code() == absl::StatusCode::kNotFound);  // 2 h ago
  CHECK(wf->inspect("old1").ok());  // its retention counts from now
  CHECK(state(*e, "system.workflow_index.ended.old1") == t0);
  clock->set(t0 + kHourUs + 10 * 60'000'000);
  REQUIRE(wf->expire(clock->now_us(), next).ok());
  CHECK(wf->inspect("old1").status().code() == absl::StatusCode::kNotFound);
  CHECK(wf->inspect("live").ok());
}

TEST_CASE("an old ended instance restarted after its indexing is not purged while it runs",
          "[workflow][retention]") {
  retained r;
  auto& clock = r.clock;
  auto& e = r.e;
  auto& wf = r.wf;
  REQUIRE(wf->define(parse({{"name", "waiter"},
                            {"start", "w"},
                            {"steps",
                             {{"w", {{"wait", {{"reply", "done"}}}, {"key", "tag"}}},
                              {"done", {{"end", true}}}}}}))
              .ok());
  const std::string version = wf->versions("waiter").at(0);
  const std::int64_t t0 = clock->now_us();
  REQUIRE(e->compare_and_swap(e->version(),
                              {{"system.workflows.old",
                                json{{"workflow", "waiter"},
                                     {"definition", {{"name", "waiter"}, {"version", version}}},
                                     {"status", "failed"},
                                     {"cursor", "w"},
                                     {"inputs", {{"tag", "t"}}},
                                     {"done", json::array()},
                                     {"visits", json::object()},
                                     {"error", "long ago"}}}})
              .value()
              .committed);
  std::int64_t next = 0;
  REQUIRE(wf->expire(t0, next).ok());  // indexes it, and its record learns when it ended
  CHECK(state(*e, "system.workflow_index.ended.old") == t0);
  CHECK(state(*e, "system.workflows.old.ended_at_us") == t0);
  // An operator restarts it: it waits again and is no longer due for purging.
  REQUIRE(wf->restart_from("old", "w").ok());
  run_all(*wf);
  CHECK(wf->inspect("old").value().status == "waiting");
  CHECK(state(*e, "system.workflow_index.ended.old").is_null());
  clock->set(t0 + 2 * kHourUs);
  REQUIRE(wf->expire(clock->now_us(), next).ok());
  CHECK(wf->inspect("old").value().status == "waiting");
}
