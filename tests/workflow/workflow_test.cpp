// Tests of pop::workflows and the workflow runner: every step kind, the failure path with
// compensation, timeouts, sub-workflows, resume after reopening a journal, and the load-time
// checks of bad definitions.
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"

#include <numeric>
#include <optional>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "absl/strings/match.h"
#include "pop/relay/inbox.hpp"
#include "pop/workflow/detail/workflow_parts.hpp"
#include "pop/workflow/workflow.hpp"
#include "pop/workflow/workflow_runner.hpp"
#include "tests/support/temp_dir.hpp"
#include "tests/workflow/helpers.hpp"

using pop::json;
using namespace pop::test::workflow_helpers;

namespace {

const json linear = {{"name", "linear"},
                     {"start", "a"},
                     {"steps",
                      {{"a", {{"process", "append"}, {"next", "b"}}},
                       {"b", {{"process", "append"}, {"next", "done"}}},
                       {"done", {{"end", true}}}}}};

// Waits for a message that never comes; its 20 ms timeout ends it.
const json timed = {
    {"name", "timed"},
    {"start", "w"},
    {"steps",
     {{"w",
       {{"wait", {{"never", "done"}}}, {"key", "tag"}, {"timeout_ms", 20}, {"on_timeout", "done"}}},
      {"done", {{"end", true}}}}}};

}  // namespace

TEST_CASE("an instance's status is typed in the logic and stored by its name", "[workflow]") {
  using pop::detail::instance_status;
  const std::vector<std::pair<instance_status, std::string>> all = {
      {instance_status::running, "running"},
      {instance_status::waiting, "waiting"},
      {instance_status::compensating, "compensating"},
      {instance_status::completed, "completed"},
      {instance_status::failed, "failed"},
      {instance_status::compensated, "compensated"},
      {instance_status::cancelled, "cancelled"},
      {instance_status::stuck, "stuck"}};
  for (const auto& [status, name] : all) {
    CHECK(pop::detail::status_name(status) == name);
    CHECK(pop::detail::parse_status(name) == status);
    CHECK(json(status) == name);
    CHECK(json(name).get<instance_status>() == status);
    const bool final =
        name == "completed" || name == "failed" || name == "compensated" || name == "cancelled";
    CHECK(pop::detail::is_final(status) == final);
    CHECK(pop::detail::is_runnable(status) == (name == "running" || name == "compensating"));
  }
  // A name from another program's version reads as unknown: neither runnable nor final.
  CHECK(pop::detail::parse_status("paused") == instance_status::unknown);
  CHECK(json("paused").get<instance_status>() == instance_status::unknown);
  CHECK(json(7).get<instance_status>() == instance_status::unknown);
  CHECK(json(instance_status::unknown) == "unknown");
  CHECK_FALSE(pop::detail::is_final(instance_status::unknown));
  CHECK_FALSE(pop::detail::is_runnable(instance_status::unknown));
}

TEST_CASE("a process step commits its writes and the cursor move in one transaction",
          "[workflow]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse(linear)).ok());
  const std::uint64_t started = wf.start("linear", "w1", {{"tag", "x"}}).value();
  CHECK(wf.inspect("w1").value().cursor == "a");
  REQUIRE(wf.advance("w1").value());
  // The business write and the new cursor appeared at the same version.
  CHECK(e.version() == started + 1);
  CHECK(state(e, "domain.log") == json::array({"x"}));
  CHECK(wf.inspect("w1").value().cursor == "b");
  REQUIRE(wf.advance("w1").value());
  REQUIRE(wf.advance("w1").value());
  const pop::workflow_instance w = wf.inspect("w1").value();
  CHECK(w.status == "completed");
  CHECK(w.history.size() == 3);
  CHECK(w.definition_version.size() == 16);
  CHECK(w.raw.at("definition").at("name") == "linear");
  CHECK(!wf.advance("w1").value());  // nothing left to do
  CHECK(state(e, "domain.count") == 2);
  CHECK(wf.runnable().empty());
  const absl::Status other = wf.start("linear", "w1").status();
  CHECK(other.code() == absl::StatusCode::kAlreadyExists);
  CHECK(absl::StrContains(other.message(), "with other inputs: {\"tag\":\"x\"}"));
  // The same start again (a retried request) changes nothing and is not an error.
  const std::uint64_t before = e.version();
  CHECK(wf.start("linear", "w1", {{"tag", "x"}}).value() == before);
  CHECK(e.version() == before);
  CHECK(wf.inspect("w1").value().status == "completed");
  CHECK(wf.start("nope", "w2").status().code() == absl::StatusCode::kNotFound);
  CHECK(wf.start("linear", "bad id").status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("branches choose by built-in comparisons and named predicates", "[workflow]") {
  auto e_owner = pop::test::must(pop::engine::open(pop::options{
      .initial_state = {{"domain", {{"orders", {{"o1", {{"total", 120}, {"tier", "gold"}}}}}}}}}));
  pop::engine& e = *e_owner;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.register_predicate("is_gold", {"domain.orders"},
                                [](const pop::context& ctx, const json& in) {
                                  return ctx.get<std::string>("domain.orders." +
                                                              in.at("order").get<std::string>() +
                                                              ".tier") == "gold";
                                })
              .ok());
  const auto flow = [&](const std::string& name, json condition) {
    condition["next"] = "yes";
    return parse({{"name", name},
                  {"start", "check"},
                  {"steps",
                   {{"check", {{"branch", json::array({condition})}, {"otherwise", "no"}}},
                    {"yes", {{"process", "append"}, {"next", "end"}}},
                    {"no", {{"process", "append"}, {"next", "end"}}},
                    {"end", {{"end", true}}}}}});
  };
  const std::vector<std::pair<json, bool>> cases = {
      {{{"path", "domain.orders.{order}.total"}, {"op", "gt"}, {"value", 100}}, true},
      {{{"path", "domain.orders.{order}.total"}, {"op", "lt"}, {"value", 100}}, false},
      {{{"path", "domain.orders.{order}.tier"}, {"op", "eq"}, {"value", "gold"}}, true},
      {{{"path", "domain.orders.{order}.tier"}, {"op", "ne"}, {"value", "gold"}}, false},
      {{{"path", "domain.orders.{order}.coupon"}, {"op", "exists"}}, false},
      {{{"predicate", "is_gold"}}, true}};
  for (std::size_t i = 0; i < cases.size(); ++i) {
    INFO("case " << i << ": " << cases[i].first.dump());
    const std::string name = "b" + std::to_string(i);
    REQUIRE(wf.define(flow(name, cases[i].first)).ok());
    REQUIRE(wf.start(name, name, {{"order", "o1"}, {"tag", name}}).ok());
    run_all(wf);
    const pop::workflow_instance w = wf.inspect(name).value();
    CHECK(w.status == "completed");
    CHECK(w.history.at(1).at("step") == (cases[i].second ? "yes" : "no"));
  }
}

TEST_CASE("a loop runs up to its bound and then takes the failure path", "[workflow]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(
      wf.define(parse({{"name", "loop"},
                       {"start", "work"},
                       {"steps",
                        {{"work", {{"process", "append"}, {"next", "again"}, {"max_visits", 3}}},
                         {"again",
                          {{"branch", json::array({{{"path", "domain.count"},
                                                    {"op", "lt"},
                                                    {"value", 10},
                                                    {"next", "work"}}})},
                           {"otherwise", "done"},
                           {"max_visits", 3}}},
                         {"done", {{"end", true}}}}}}))
          .ok());
  REQUIRE(wf.start("loop", "l1", {{"tag", "t"}}).ok());
  run_all(wf);
  const pop::workflow_instance w = wf.inspect("l1").value();
  CHECK(state(e, "domain.count") == 3);
  CHECK(w.status == "failed");
  CHECK(absl::StrContains(w.error, "step 'work' would run 4 times; its bound is 3"));
}

TEST_CASE("the failure path runs compensations in reverse order, once each", "[workflow]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse({{"name", "saga"},
                           {"start", "a"},
                           {"steps",
                            {{"a", {{"process", "append"}, {"next", "b"}, {"compensate", "undo"}}},
                             {"b", {{"process", "append"}, {"next", "c"}, {"compensate", "undo"}}},
                             {"c", {{"process", "append"}, {"next", "d"}}},
                             {"d", {{"process", "fail_now"}, {"next", "done"}}},
                             {"done", {{"end", true}}}}}}))
              .ok());
  REQUIRE(wf.start("saga", "s1", {{"tag", "t"}}).ok());
  run_all(wf);
  const pop::workflow_instance w = wf.inspect("s1").value();
  CHECK(w.status == "compensated");
  CHECK(absl::StrContains(w.error, "step 'd' failed"));
  CHECK(absl::StrContains(w.error, "refused on purpose"));
  // c has no compensation; b's undo runs before a's.
  CHECK(state(e, "domain.log") == json::array({"t", "t", "t", "undo:t", "undo:t"}));
  const json history = w.history;
  CHECK(history[history.size() - 2].at("step") == "b");
  CHECK(history[history.size() - 1].at("step") == "a");
}

TEST_CASE("a throwing step process takes the error transition", "[workflow]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(
      wf.define(parse({{"name", "boom"},
                       {"start", "x"},
                       {"steps",
                        {{"x", {{"process", "explode"}, {"next", "done"}, {"on_error", "recover"}}},
                         {"recover", {{"process", "append"}, {"next", "done"}}},
                         {"done", {{"end", true}}}}}}))
          .ok());
  REQUIRE(wf.start("boom", "b1", {{"tag", "r"}}).ok());
  run_all(wf);
  const pop::workflow_instance w = wf.inspect("b1").value();
  CHECK(w.status == "completed");
  CHECK(absl::StrContains(w.history.at(0).at("outcome").get<std::string>(), "boom"));
  CHECK(state(e, "domain.log") == json::array({"r"}));
}

TEST_CASE("a wait step resumes on its message once, and times out otherwise", "[workflow]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  auto in_owner = pop::test::must(pop::inbox::create(e));
  pop::inbox& in = *in_owner;
  REQUIRE(pop::register_workflow_resume(in, wf).ok());
  REQUIRE(wf.define(parse({{"name", "pay"},
                           {"start", "wait"},
                           {"steps",
                            {{"wait",
                              {{"wait", {{"payment.confirmed", "ok"}, {"payment.declined", "no"}}},
                               {"key", "order"},
                               {"timeout_ms", 30},
                               {"on_timeout", "no"}}},
                             {"ok", {{"process", "append"}, {"next", "done"}}},
                             {"no", {{"fail", "not paid"}}},
                             {"done", {{"end", true}}}}}}))
              .ok());
  REQUIRE(wf.start("pay", "p1", {{"order", "o-1"}, {"tag", "paid"}}).ok());
  REQUIRE(wf.start("pay", "p2", {{"order", "o-2"}, {"tag", "paid"}}).ok());
  run_all(wf);
  CHECK(wf.inspect("p1").value().status == "waiting");
  CHECK(wf.runnable().empty());
  // An unrelated key and an unrelated topic change nothing; the right message resumes p1 once.
  CHECK(in.apply("workflow.resume", message("m0", "payment.confirmed", "o-9")).value().applied);
  CHECK(wf.inspect("p1").value().status == "waiting");
  CHECK(in.apply("workflow.resume", message("m1", "payment.confirmed", "o-1", {{"ref", 7}}))
            .value()
            .applied);
  CHECK(!in.apply("workflow.resume", message("m1", "payment.confirmed", "o-1")).value().applied);
  run_all(wf);
  const pop::workflow_instance p1 = wf.inspect("p1").value();
  CHECK(p1.status == "completed");
  CHECK(p1.received.at("payment.confirmed") == json{{"ref", 7}});
  CHECK(state(e, "domain.log") == json::array({"paid"}));
  // p2 hears nothing: its timeout takes it to "no", which fails it.
  std::int64_t next_due = 0;
  CHECK(wf.expire(0, next_due).value() == 0);
  CHECK(next_due > 0);
  CHECK(wf.expire(next_due, next_due).value() == 1);
  run_all(wf);
  const pop::workflow_instance p2 = wf.inspect("p2").value();
  CHECK(p2.status == "failed");
  CHECK(p2.error == "not paid");
  // A late reply to p2 is absorbed.
  CHECK(in.apply("workflow.resume", message("m2", "payment.confirmed", "o-2")).value().applied);
  CHECK(wf.inspect("p2").value().status == "failed");
}

TEST_CASE("a reply cannot overtake its wait: the step before a wait enters it in the same commit",
          "[workflow]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  auto in_owner = pop::test::must(pop::inbox::create(e));
  pop::inbox& in = *in_owner;
  REQUIRE(pop::register_workflow_resume(in, wf).ok());
  REQUIRE(wf.define(parse({{"name", "ask"},
                           {"start", "request"},
                           {"steps",
                            {{"request", {{"process", "append"}, {"next", "await"}}},
                             {"await", {{"wait", {{"answer", "done"}}}, {"key", "order"}}},
                             {"done", {{"end", true}}}}}}))
              .ok());
  REQUIRE(wf.start("ask", "a1", {{"order", "o-1"}, {"tag", "asked"}}).ok());
  // One step: the request's commit parks the instance at the wait. Before this was so, an answer
  // applied between the two commits found no waiting instance and was absorbed: the instance then
  // waited forever (seen with the payment service across NATS).
  REQUIRE(wf.advance("a1").value());
  CHECK(wf.inspect("a1").value().status == "waiting");
  CHECK(wf.runnable().empty());
  CHECK(in.apply("workflow.resume", message("r1", "answer", "o-1")).value().applied);
  run_all(wf);
  CHECK(wf.inspect("a1").value().status == "completed");
}

TEST_CASE("a sub-workflow runs as a child and its outcome moves the parent", "[workflow]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse(linear)).ok());
  REQUIRE(wf.define(parse({{"name", "failing"},
                           {"start", "x"},
                           {"steps", {{"x", {{"fail", "child says no"}}}}}}))
              .ok());
  REQUIRE(
      wf.define(parse({{"name", "parent"},
                       {"start", "child"},
                       {"steps",
                        {{"child", {{"call", "linear"}, {"next", "bad"}}},
                         {"bad", {{"call", "failing"}, {"next", "done"}, {"on_error", "handled"}}},
                         {"handled", {{"process", "append"}, {"next", "done"}}},
                         {"done", {{"end", true}}}}}}))
          .ok());
  REQUIRE(wf.start("parent", "p", {{"tag", "h"}}).ok());
  run_all(wf);
  const pop::workflow_instance p = wf.inspect("p").value();
  CHECK(p.status == "completed");
  CHECK(wf.inspect("p-child-1").value().status == "completed");
  CHECK(wf.inspect("p-bad-1").value().status == "failed");
  CHECK(state(e, "domain.log") == json::array({"h", "h", "h"}));
  // The history names each child's outcome by its status.
  std::vector<std::string> outcomes;
  for (const pop::workflow_instance::event& ev : p.events) outcomes.push_back(ev.outcome);
  CHECK(std::find(outcomes.begin(), outcomes.end(), "child p-child-1 completed") != outcomes.end());
  CHECK(std::find(outcomes.begin(), outcomes.end(), "child p-bad-1 failed") != outcomes.end());
  // Cancelling an ended instance says how it ended.
  const absl::Status again = wf.cancel("p-bad-1");
  CHECK(again.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(absl::StrContains(again.message(), "has already ended (failed)"));
}

TEST_CASE("a child is started with its own inputs, taken from the parent's", "[workflow]") {
  pop::engine e;
  auto wf = pop::test::must(pop::workflows::create(e));
  register_steps(*wf);
  REQUIRE(wf->define(parse(linear)).ok());
  const json parent = {
      {"name", "parent"},
      {"start", "child"},
      {"steps",
       {{"child",
         {{"call", "linear"},
          {"inputs", {{"tag", "item-{sku}"}, {"qty", "{qty}"}, {"source", "parent"}}},
          {"next", "done"}}},
        {"done", {{"end", true}}}}}};
  REQUIRE(wf->define(parse(parent)).ok());
  CHECK(parse(parent).to_json() == parent);
  REQUIRE(wf->start("parent", "p", {{"sku", "A1"}, {"qty", 3}, {"secret", "x"}}).ok());
  run_all(*wf);
  CHECK(wf->inspect("p").value().status == "completed");
  const pop::workflow_instance child = wf->inspect("p-child-1").value();
  CHECK(child.inputs == json{{"tag", "item-A1"}, {"qty", 3}, {"source", "parent"}});
  CHECK(state(e, "domain.log") == json::array({"item-A1", "item-A1"}));
  // An input the parent lacks fails the call step, naming it.
  REQUIRE(wf->start("parent", "q", {{"sku", "B2"}}).ok());
  run_all(*wf);
  const pop::workflow_instance q = wf->inspect("q").value();
  CHECK(q.status == "failed");
  CHECK(absl::StrContains(q.error, "child input 'qty' takes '{qty}'"));
  // Inputs on a step that is not a call are refused at load.
  json bad = linear;
  bad["name"] = "bad";
  bad["steps"]["a"]["inputs"] = {{"x", 1}};
  CHECK(absl::StrContains(wf->define(parse(bad)).message(), "only call steps have inputs"));
}

TEST_CASE("cancel and instance timeouts take the failure path", "[workflow]") {
  pop::engine e;
  // Kept forever: expire() below runs far in the future, past any retention period.
  pop::workflow_options keep;
  keep.retention = std::chrono::milliseconds(0);
  auto wf_owner = pop::test::must(pop::workflows::create(e, keep));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse({{"name", "held"},
                           {"start", "a"},
                           {"steps",
                            {{"a", {{"process", "append"}, {"next", "w"}, {"compensate", "undo"}}},
                             {"w", {{"wait", {{"go", "done"}}}, {"key", "k"}}},
                             {"done", {{"end", true}}}}}}))
              .ok());
  REQUIRE(wf.start("held", "c1", {{"k", "x1"}, {"tag", "c"}}).ok());
  REQUIRE(wf.start("held", "c2", {{"k", "x2"}, {"tag", "d"}}, 1).ok());
  run_all(wf);
  REQUIRE(wf.cancel("c1", "customer changed their mind").ok());
  run_all(wf);
  const pop::workflow_instance c1 = wf.inspect("c1").value();
  CHECK(c1.status == "cancelled");  // its compensation ran: see the log below
  CHECK(state(e, "domain.log") == json::array({"c", "d", "undo:c"}));
  CHECK(c1.error == "customer changed their mind");
  CHECK(wf.cancel("c1").code() == absl::StatusCode::kFailedPrecondition);
  CHECK(wf.cancel("zz").code() == absl::StatusCode::kNotFound);
  std::int64_t next = 0;
  CHECK(wf.expire(std::numeric_limits<std::int64_t>::max() / 2, next).value() == 1);
  run_all(wf);
  CHECK(wf.inspect("c2").value().status == "compensated");
  CHECK(wf.inspect("c2").value().error == "the instance ran past its timeout");
  CHECK(wf.list("compensated").size() == 1);
  CHECK(wf.list("cancelled").size() == 1);
}

TEST_CASE("cancelling a parent cancels the child it waits for", "[workflow]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse({{"name", "slow"},
                           {"start", "a"},
                           {"steps",
                            {{"a", {{"process", "append"}, {"next", "w"}, {"compensate", "undo"}}},
                             {"w", {{"wait", {{"go", "done"}}}, {"key", "tag"}}},
                             {"done", {{"end", true}}}}}}))
              .ok());
  REQUIRE(
      wf.define(parse({{"name", "outer"},
                       {"start", "c"},
                       {"steps",
                        {{"c", {{"call", "slow"}, {"next", "done"}}}, {"done", {{"end", true}}}}}}))
          .ok());
  REQUIRE(wf.start("outer", "o", {{"tag", "t"}}).ok());
  run_all(wf);
  REQUIRE(wf.inspect("o-c-1").value().status == "waiting");
  REQUIRE(wf.cancel("o", "stop").ok());
  run_all(wf);
  CHECK(wf.inspect("o").value().status == "cancelled");
  CHECK(wf.inspect("o-c-1").value().status == "cancelled");
  CHECK(state(e, "domain.log") == json::array({"t", "undo:t"}));
}

TEST_CASE("instances resume after reopening the journal at every kind of step",
          "[workflow][journal]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("wf.db");
  const json def = {{"name", "long"},
                    {"start", "a"},
                    {"steps",
                     {{"a", {{"process", "append"}, {"next", "w"}, {"compensate", "undo"}}},
                      {"w", {{"wait", {{"go", "b"}, {"stop", "f"}}}, {"key", "k"}}},
                      {"b", {{"process", "append"}, {"next", "done"}}},
                      {"f", {{"fail", "stopped"}}},
                      {"done", {{"end", true}}}}}};
  const auto open = [&](auto&& body) {
    auto e = pop::engine::open(pop::options{.journal = file}).value();
    auto wf_owner = pop::test::must(pop::workflows::create(*e));
    pop::workflows& wf = *wf_owner;
    register_steps(wf);
    REQUIRE(wf.define(parse(def)).ok());
    auto in_owner = pop::test::must(pop::inbox::create(*e));
    pop::inbox& in = *in_owner;
    REQUIRE(pop::register_workflow_resume(in, wf).ok());
    body(*e, wf, in);
  };
  open([&](pop::engine&, pop::workflows& wf, pop::inbox&) {
    REQUIRE(wf.start("long", "r1", {{"k", "k1"}, {"tag", "1"}}).ok());  // at a process step
    REQUIRE(wf.start("long", "r2", {{"k", "k2"}, {"tag", "2"}}).ok());
    REQUIRE(wf.advance("r2").value());  // r2 waiting: a step enters the wait after it at once
    REQUIRE(wf.start("long", "r3", {{"k", "k3"}, {"tag", "3"}}).ok());
    REQUIRE(wf.advance("r3").value());  // r3 waiting
  });
  open([&](pop::engine& e, pop::workflows& wf, pop::inbox& in) {
    CHECK(wf.inspect("r1").value().cursor == "a");
    CHECK(wf.inspect("r2").value().status == "waiting");
    CHECK(wf.inspect("r3").value().status == "waiting");
    run_all(wf);
    CHECK(wf.inspect("r1").value().status == "waiting");
    CHECK(wf.inspect("r3").value().status == "waiting");  // still waiting
    REQUIRE(in.apply("workflow.resume", message("g3", "go", "k3")).value().applied);
    REQUIRE(in.apply("workflow.resume", message("s2", "stop", "k2")).value().applied);
    REQUIRE(wf.advance("r2").value());  // r2 now compensating, its undo not yet run
    CHECK(wf.inspect("r2").value().status == "compensating");
    static_cast<void>(e);
  });
  open([&](pop::engine& e, pop::workflows& wf, pop::inbox& in) {
    CHECK(wf.inspect("r2").value().status == "compensating");
    CHECK(!in.apply("workflow.resume", message("g3", "go", "k3")).value().applied);  // seen
    run_all(wf);
    CHECK(wf.inspect("r2").value().status == "compensated");
    CHECK(wf.inspect("r3").value().status == "completed");
    CHECK(wf.inspect("r1").value().status == "waiting");
    // Each step's effect happened once across the three lives of the engine.
    CHECK(state(e, "domain.log") == json::array({"2", "3", "1", "undo:2", "3"}));
  });
}

TEST_CASE("instances pending at a branch or inside a child resume after reopening",
          "[workflow][journal]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("wf2.db");
  const auto open = [&](auto&& body) {
    auto e = pop::engine::open(pop::options{.journal = file}).value();
    auto wf_owner = pop::test::must(pop::workflows::create(*e));
    pop::workflows& wf = *wf_owner;
    register_steps(wf);
    REQUIRE(wf.define(parse(linear)).ok());
    REQUIRE(
        wf
            .define(parse(
                {{"name", "outer"},
                 {"start", "pick"},
                 {"steps",
                  {{"pick",
                    {{"branch",
                      json::array({{{"path", "domain.count"}, {"op", "exists"}, {"next", "sub"}}})},
                     {"otherwise", "first"}}},
                   {"first", {{"process", "append"}, {"next", "sub"}}},
                   {"sub", {{"call", "linear"}, {"next", "done"}}},
                   {"done", {{"end", true}}}}}}))
            .ok());
    body(*e, wf);
  };
  open([&](pop::engine&, pop::workflows& wf) {
    REQUIRE(wf.start("outer", "q1", {{"tag", "q"}}).ok());  // pending at the branch
    REQUIRE(wf.start("outer", "q2", {{"tag", "r"}}).ok());
    REQUIRE(wf.advance("q2").value());        // branch taken: "first"
    REQUIRE(wf.advance("q2").value());        // "first" ran
    REQUIRE(wf.advance("q2").value());        // child started
    REQUIRE(wf.advance("q2-sub-1").value());  // the child ran one step
  });
  open([&](pop::engine& e, pop::workflows& wf) {
    CHECK(wf.inspect("q1").value().cursor == "pick");
    CHECK(wf.inspect("q2").value().status == "waiting");
    CHECK(wf.inspect("q2-sub-1").value().cursor == "b");
    run_all(wf);
    CHECK(wf.inspect("q1").value().status == "completed");
    CHECK(wf.inspect("q2").value().status == "completed");
    // q2: first + 2 child steps; q1: branch saw domain.count, so no "first", then 2 child steps.
    CHECK(state(e, "domain.count") == 5);
  });
}

TEST_CASE("the runner drives instances to the end with real timers", "[workflow][runner]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse(linear)).ok());
  REQUIRE(wf.define(parse(timed)).ok());
  for (int i = 0; i < 20; ++i)
    REQUIRE(wf.start("linear", "i" + std::to_string(i), {{"tag", "t"}}).ok());
  REQUIRE(wf.start("timed", "t1", {{"tag", "t"}}).ok());
  pop::workflow_runner runner(e, wf);
  boost::asio::io_context io;
  absl::Status done = absl::UnknownError("not run");
  boost::asio::co_spawn(io, runner.settle(), [&](std::exception_ptr, absl::Status s) { done = s; });
  io.run();
  REQUIRE(done.ok());
  CHECK(wf.list("completed").size() == 21);
  CHECK(runner.steps() == 20 * 3 + 2);
  CHECK(state(e, "domain.count") == 40);
}

TEST_CASE("the runner's wait timeouts run on the engine's clock: none fires a microsecond early",
          "[workflow]") {
  auto clock = std::make_shared<pop::manual_clock>();
  auto e_owner = pop::test::must(pop::engine::open({.clock = clock}));
  pop::engine& e = *e_owner;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse(timed)).ok());
  REQUIRE(wf.start("timed", "t1", {{"tag", "t"}}).ok());
  pop::workflow_runner runner(e, wf);
  boost::asio::io_context io;
  std::optional<absl::Status> done;
  boost::asio::co_spawn(io, runner.settle(), [&](std::exception_ptr ex, absl::Status s) {
    if (ex) std::rethrow_exception(ex);
    done = std::move(s);
  });
  // A clock moved by hand arms no real-time timer: with nothing due the runner just waits.
  io.poll();
  CHECK(wf.inspect("t1").value().status == "waiting");
  clock->advance(19'999);
  io.poll();
  CHECK(wf.inspect("t1").value().status == "waiting");
  CHECK_FALSE(done.has_value());
  clock->advance(1);  // the deadline: the wait times out and the instance completes
  io.poll();
  REQUIRE(done.has_value());
  CHECK(done->ok());
  CHECK(wf.inspect("t1").value().status == "completed");
}

TEST_CASE("bad definitions are rejected at load with a precise error", "[workflow]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  const auto rejected = [&](json steps, const std::string& words, std::string start = "a") {
    const absl::StatusOr<pop::workflow_definition> d =
        pop::workflow_definition::from_json({{"name", "bad"}, {"start", start}, {"steps", steps}});
    const absl::Status s = d.ok() ? wf.define(*d) : d.status();
    INFO(s);
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK(absl::StrContains(s.message(), words));
  };
  rejected({{"a", {{"process", "nope"}, {"next", "a"}}}}, "runs unknown process 'nope'");
  rejected({{"a", {{"process", "append"}, {"next", "zz"}}}}, "next names a missing step 'zz'");
  rejected({{"a", {{"end", true}}}, {"b", {{"end", true}}}}, "step 'b' is unreachable from 'a'");
  rejected({{"a", {{"process", "append"}, {"next", "b"}}},
            {"b", {{"process", "append"}, {"next", "a"}}}},
           "is on a loop (a -> b -> a) with no bound");
  rejected({{"a", {{"process", "append"}, {"end", true}, {"next", "a"}}}}, "exactly one of");
  rejected({{"a",
             {{"branch", json::array({{{"predicate", "nope"}, {"next", "a"}}})},
              {"otherwise", "a"},
              {"max_visits", 2}}}},
           "unknown predicate 'nope'");
  rejected({{"a",
             {{"branch", json::array({{{"path", "domain.x"}, {"op", "like"}, {"next", "b"}}})},
              {"otherwise", "b"}}},
            {"b", {{"end", true}}}},
           "has op 'like'");
  rejected({{"a", {{"wait", {{"t", "b"}}}}}, {"b", {{"end", true}}}}, "needs 'key'");
  rejected({{"a", {{"call", "ghost"}, {"next", "b"}}}, {"b", {{"end", true}}}},
           "calls unknown workflow 'ghost'");
  rejected({{"a", {{"end", true}}}}, "the start step 'zz' is missing", "zz");
  rejected({{"a", {{"end", true}, {"colour", "red"}}}}, "unknown field 'colour'");
  // A value of the wrong type names its step and field.
  rejected({{"a", {{"process", "append"}, {"next", 7}}}}, "step 'a' field 'next'");
  rejected({{"a", {{"process", "append"}, {"next", "a"}, {"retry", {{"attempts", "three"}}}}}},
           "step 'a' field 'attempts'");
  rejected({{"a", {{"sleep_ms", "soon"}, {"next", "b"}}}, {"b", {{"end", true}}}},
           "step 'a' field 'sleep_ms'");
  rejected({{"a", {{"branch", json::array({"b"})}, {"otherwise", "b"}}}, {"b", {{"end", true}}}},
           "step 'a': a branch entry must be an object");
  rejected({{"a",
             {{"branch", json::array({{{"path", "{x}.y"}, {"op", "exists"}, {"next", "b"}}})},
              {"otherwise", "b"}}},
            {"b", {{"end", true}}}},
           "must start with a fixed segment");
  REQUIRE(wf.define(parse(linear)).ok());
  CHECK(wf.define(parse(linear)).code() == absl::StatusCode::kAlreadyExists);
}

TEST_CASE("definitions round-trip through JSON and load from files", "[workflow]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  const pop::workflow_definition d = parse(linear);
  CHECK(d.to_json() == linear);
  pop::test::temp_dir dir;
  const std::string file = dir.file("linear.json");
  pop::test::write_bytes(file, linear.dump(2));
  REQUIRE(wf.define_from_file(file).ok());
  const absl::Status missing = wf.define_from_file(dir.file("missing.json"));
  CHECK(missing.code() == absl::StatusCode::kNotFound);
  pop::test::write_bytes(file, "{not json");
  CHECK(absl::StrContains(wf.define_from_file(file).message(), file));
}

TEST_CASE("an instance whose workflow this program lacks is parked stuck, and the runner goes on",
          "[workflow][stuck]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("flows.db");
  const json other = {
      {"name", "other"},
      {"start", "check"},
      {"steps",
       {{"check",
         {{"branch", {{{"path", "domain.count"}, {"op", "exists"}, {"next", "done"}}}},
          {"next", "done"}}},
        {"done", {{"end", true}}}}}};
  // A program that runs both workflows starts one instance of each, then stops.
  const auto program = [&](bool with_linear) {
    auto e = pop::test::must(pop::engine::open({.journal = file}));
    auto wf = pop::test::must(pop::workflows::create(*e));
    register_steps(*wf);
    if (with_linear) REQUIRE(wf->define(parse(linear)).ok());
    REQUIRE(wf->define(parse(other)).ok());
    return std::pair{std::move(e), std::move(wf)};
  };
  {
    auto [e, wf] = program(true);
    REQUIRE(wf->start("linear", "lost", {{"tag", "x"}}).ok());
    REQUIRE(wf->start("other", "fine").ok());
  }
  {
    // The next deploy lost the definition of "linear".
    auto [e, wf] = program(false);
    pop::workflow_runner runner(*e, *wf);
    boost::asio::io_context io;
    absl::Status done = absl::UnknownError("not run");
    boost::asio::co_spawn(io, runner.settle(),
                          [&](std::exception_ptr, absl::Status s) { done = s; });
    io.run();
    INFO(done);
    REQUIRE(done.ok());  // not FAILED_PRECONDITION: the instance it cannot run did not stop it
    CHECK(wf->inspect("fine").value().status == "completed");
    const pop::workflow_instance stuck = wf->inspect("lost").value();
    CHECK(stuck.status == "stuck");
    CHECK(stuck.cursor == "a");
    CHECK(stuck.stuck_reason.find("'linear'") != std::string::npos);
    CHECK(stuck.stuck_reason.find("not defined in this program") != std::string::npos);
    CHECK(wf->list("stuck").size() == 1);
    CHECK(wf->runnable().empty());
    CHECK(!wf->advance("lost").value());  // parked: nothing moves it but an operator
    CHECK(wf->resume("fine").status().code() == absl::StatusCode::kFailedPrecondition);
    // An operator's resume puts it back; still undefined here, the next step parks it again.
    REQUIRE(wf->resume("lost").ok());
    CHECK(wf->inspect("lost").value().status == "running");
    REQUIRE(wf->advance("lost").value());
    CHECK(wf->inspect("lost").value().status == "stuck");
  }
  {
    // The definition is back: defining it resumes the instances its absence parked.
    auto [e, wf] = program(true);
    CHECK(wf->inspect("lost").value().status == "running");
    CHECK(wf->inspect("lost").value().events.back().outcome ==
          "resumed: version '" + wf->versions("linear").at(0) +
              "' of workflow 'linear' is defined again");
    CHECK(wf->resume("lost").status().code() == absl::StatusCode::kFailedPrecondition);
    CHECK(run_all(*wf) == 3);
    const pop::workflow_instance w = wf->inspect("lost").value();
    CHECK(w.status == "completed");
    CHECK(w.events.back().outcome == "completed");
    CHECK(state(*e, "domain.log") == json::array({"x", "x"}));
  }
}

TEST_CASE("an operator restarts a failed instance from a step, and cancels a stuck one",
          "[workflow][stuck]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse({{"name", "flaky"},
                           {"start", "a"},
                           {"steps",
                            {{"a", {{"process", "append"}, {"next", "b"}}},
                             {"b", {{"process", "fail_now"}, {"next", "done"}}},
                             {"done", {{"end", true}}}}}}))
              .ok());
  REQUIRE(wf.start("flaky", "f", {{"tag", "x"}}).ok());
  run_all(wf);
  REQUIRE(wf.inspect("f").value().status == "failed");
  CHECK(wf.restart_from("f", "nowhere").status().code() == absl::StatusCode::kNotFound);
  CHECK(wf.inspect("f").value().status == "failed");  // unchanged by the refused call
  REQUIRE(wf.restart_from("f", "a").ok());
  pop::workflow_instance w = wf.inspect("f").value();
  CHECK(w.status == "running");
  CHECK(w.cursor == "a");
  CHECK(w.error.empty());
  CHECK(w.events.back().outcome.find("restarted here by an operator") != std::string::npos);
  run_all(wf);  // a runs again (its loop count was reset), b fails again
  CHECK(wf.inspect("f").value().status == "failed");
  CHECK(state(e, "domain.log") == json::array({"x", "x"}));
  // Restarting a running instance is refused: it would lose its place.
  REQUIRE(wf.start("flaky", "g", {{"tag", "y"}}).ok());
  CHECK(wf.restart_from("g", "b").status().code() == absl::StatusCode::kFailedPrecondition);

  // A stuck instance can be cancelled without its definition.
  auto bare_owner = pop::test::must(pop::workflows::create(e));
  REQUIRE(bare_owner->advance("g").value());  // parks it: `bare` defines nothing
  REQUIRE(wf.inspect("g").value().status == "stuck");
  REQUIRE(bare_owner->cancel("g", "operator gave up").ok());
  w = wf.inspect("g").value();
  CHECK(w.status == "cancelled");
  CHECK(w.error == "operator gave up");
  CHECK(bare_owner->cancel("g").code() == absl::StatusCode::kFailedPrecondition);
}

TEST_CASE("a message that arrives before its instance waits is kept and taken by the wait",
          "[workflow][mailbox]") {
  auto clock = std::make_shared<pop::manual_clock>(10'000'000);
  auto e_owner = pop::test::must(pop::engine::open({.clock = clock}));
  pop::engine& e = *e_owner;
  pop::workflow_options o;
  o.mailbox_ttl = std::chrono::seconds(60);
  auto wf_owner = pop::test::must(pop::workflows::create(e, o));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  auto in_owner = pop::test::must(pop::inbox::create(e));
  pop::inbox& in = *in_owner;
  REQUIRE(pop::register_workflow_resume(in, wf).ok());
  REQUIRE(
      wf.define(
            parse({{"name", "ask"},
                   {"start", "request"},
                   {"steps",
                    {{"request", {{"process", "append"}, {"next", "await"}}},
                     {"await",
                      {{"wait", {{"answer", "done"}, {"refusal", "refused"}}}, {"key", "order"}}},
                     {"refused", {{"fail", "refused"}}},
                     {"done", {{"end", true}}}}}}))
          .ok());
  REQUIRE(wf.start("ask", "a1", {{"order", "o-1"}, {"tag", "asked"}}).ok());
  // The answer overtakes the instance: it has not reached its wait yet. Before, the inbox marked
  // it applied and dropped it, a resend was absorbed as a duplicate, and the instance waited on.
  CHECK(wf.inspect("a1").value().status == "running");
  CHECK(
      in.apply("workflow.resume", message("r1", "answer", "o-1", {{"ok", true}})).value().applied);
  CHECK(!in.apply("workflow.resume", message("r1", "answer", "o-1")).value().applied);  // resend
  // A topic no wait step takes is not kept.
  CHECK(in.apply("workflow.resume", message("x1", "unrelated", "o-1")).value().applied);
  CHECK(state(e, "system.workflow_index.mailbox.o-1") ==
        json({{"r1", {{"topic", "answer"}, {"payload", {{"ok", true}}}, {"at_us", 0}}}}));
  REQUIRE(wf.advance("a1").value());  // the request, then at once the kept answer
  pop::workflow_instance w = wf.inspect("a1").value();
  CHECK(w.cursor == "done");
  CHECK(w.received == json({{"answer", {{"ok", true}}}}));
  CHECK(w.events.back().outcome == "received answer (r1) from the mailbox");
  CHECK(state(e, "system.workflow_index.mailbox.o-1").is_null());  // taken once, key gone
  run_all(wf);
  CHECK(wf.inspect("a1").value().status == "completed");

  // Kept messages nobody takes are purged after mailbox_ttl by the runner's expire().
  CHECK(in.apply("workflow.resume", message("r9", "refusal", "o-9")).value().applied);
  std::int64_t next_due = 0;
  CHECK(wf.expire(clock->now_us(), next_due).ok());
  CHECK(!state(e, "system.workflow_index.mailbox.o-9").empty());
  clock->advance(61'000'000);
  CHECK(wf.expire(clock->now_us(), next_due).ok());
  CHECK(state(e, "system.workflow_index.mailbox.o-9").is_null());
}

TEST_CASE("a strict workflow engine refuses even an identical second start", "[workflow]") {
  pop::engine e;
  pop::workflow_options strict;
  strict.idempotent_start = false;
  auto wf_owner = pop::test::must(pop::workflows::create(e, strict));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse(linear)).ok());
  REQUIRE(wf.start("linear", "w1", {{"tag", "x"}}).ok());
  const absl::Status again = wf.start("linear", "w1", {{"tag", "x"}}).status();
  CHECK(again.code() == absl::StatusCode::kAlreadyExists);
  CHECK(absl::StrContains(again.message(), "workflow instance 'w1' already exists"));
}

TEST_CASE("wait_for calls back once when an instance ends, and its awaitable form completes",
          "[workflow][wait_for]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse(linear)).ok());
  REQUIRE(wf.start("linear", "w1", {{"tag", "x"}}).ok());

  std::vector<absl::StatusOr<pop::workflow_instance>> seen;
  pop::subscription sub =
      wf.wait_for("w1", [&](absl::StatusOr<pop::workflow_instance> w) { seen.push_back(w); });
  REQUIRE(wf.advance("w1").value());
  REQUIRE(wf.advance("w1").value());
  CHECK(seen.empty());  // still running
  REQUIRE(wf.advance("w1").value());
  REQUIRE(seen.size() == 1);
  REQUIRE(seen[0].ok());
  CHECK(seen[0]->status == "completed");
  CHECK(e.execute("append", {{"tag", "later"}}).ok());  // more commits: no second call
  CHECK(seen.size() == 1);

  // Already ended, or unknown: called at once.
  std::optional<absl::StatusOr<pop::workflow_instance>> at_once;
  pop::subscription done_sub =
      wf.wait_for("w1", [&](absl::StatusOr<pop::workflow_instance> w) { at_once = w; });
  REQUIRE(at_once.has_value());
  CHECK(at_once->value().status == "completed");
  at_once.reset();
  pop::subscription missing_sub =
      wf.wait_for("nobody", [&](absl::StatusOr<pop::workflow_instance> w) { at_once = w; });
  REQUIRE(at_once.has_value());
  CHECK(at_once->status().code() == absl::StatusCode::kNotFound);

  // The awaitable: a coroutine waits for an instance the runner drives on the same io_context.
  REQUIRE(wf.start("linear", "w2", {{"tag", "y"}}).ok());
  boost::asio::io_context io;
  std::optional<absl::StatusOr<pop::workflow_instance>> awaited;
  boost::asio::co_spawn(io, pop::wait_for(wf, "w2"),
                        [&](std::exception_ptr ex, absl::StatusOr<pop::workflow_instance> w) {
                          if (ex) std::rethrow_exception(ex);
                          awaited = std::move(w);
                        });
  pop::workflow_runner runner(e, wf);
  absl::Status settled = absl::UnknownError("not run");
  boost::asio::co_spawn(io, runner.settle(),
                        [&](std::exception_ptr, absl::Status s) { settled = s; });
  io.run();
  REQUIRE(settled.ok());
  REQUIRE(awaited.has_value());
  REQUIRE(awaited->ok());
  CHECK((*awaited)->status == "completed");
  CHECK((*awaited)->id == "w2");

  // Cancelled before the instance ends: kCancelled, and the instance is untouched.
  REQUIRE(wf.start("linear", "w3", {{"tag", "z"}}).ok());
  boost::asio::cancellation_signal stop;
  awaited.reset();
  boost::asio::co_spawn(
      io, pop::wait_for(wf, "w3"),
      boost::asio::bind_cancellation_slot(
          stop.slot(), [&](std::exception_ptr ex, absl::StatusOr<pop::workflow_instance> w) {
            if (ex) std::rethrow_exception(ex);
            awaited = std::move(w);
          }));
  io.restart();
  io.poll();
  CHECK(!awaited.has_value());
  stop.emit(boost::asio::cancellation_type::terminal);
  io.run();
  REQUIRE(awaited.has_value());
  CHECK(awaited->status().code() == absl::StatusCode::kCancelled);
  CHECK(wf.inspect("w3").value().status == "running");
}

TEST_CASE("many waiters: each is called once, when its own instance ends, however it ends",
          "[workflow][wait_for]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse(linear)).ok());
  constexpr int n = 40;
  std::vector<int> calls(n, 0);
  std::vector<std::string> statuses(n);
  std::vector<pop::subscription> subs;
  for (int i = 0; i < n; ++i) {
    const std::string id = "m" + std::to_string(i);
    REQUIRE(wf.start("linear", id, {{"tag", id}}).ok());
    subs.push_back(
        wf.wait_for(id, [&calls, &statuses, i](absl::StatusOr<pop::workflow_instance> w) {
          ++calls[static_cast<std::size_t>(i)];
          statuses[static_cast<std::size_t>(i)] = w.ok() ? w->status : w.status().ToString();
        }));
  }
  // Commits that end no instance call nobody.
  for (int i = 0; i < n; ++i) REQUIRE(wf.advance("m" + std::to_string(i)).value());
  CHECK(std::count(calls.begin(), calls.end(), 0) == n);
  // Ended one at a time, in an order of their own: exactly the one that ended is called.
  for (int k = 0; k < n; ++k) {
    const int i = (k * 7) % n;
    const std::string id = "m" + std::to_string(i);
    if (i % 5 == 0) {
      REQUIRE(wf.cancel(id, "not needed").ok());  // ends it without running its steps
    } else {
      while (wf.advance(id).value()) {
      }
    }
    CHECK(calls[static_cast<std::size_t>(i)] == 1);
    CHECK(std::accumulate(calls.begin(), calls.end(), 0) == k + 1);
  }
  CHECK(statuses[0] == "cancelled");
  CHECK(statuses[1] == "completed");
  // A waiter reset before its instance ends is never called.
  REQUIRE(wf.start("linear", "late", {{"tag", "x"}}).ok());
  int late_calls = 0;
  pop::subscription late =
      wf.wait_for("late", [&](absl::StatusOr<pop::workflow_instance>) { ++late_calls; });
  late.reset();
  while (wf.advance("late").value()) {
  }
  CHECK(late_calls == 0);
  CHECK(std::accumulate(calls.begin(), calls.end(), 0) == n);

  // A record gone before its waiter saw the instance end (as a purge removes one): kNotFound.
  REQUIRE(wf.start("linear", "gone", {{"tag", "x"}}).ok());
  std::optional<absl::StatusOr<pop::workflow_instance>> gone;
  pop::subscription gone_sub =
      wf.wait_for("gone", [&](absl::StatusOr<pop::workflow_instance> w) { gone = w; });
  REQUIRE(e.register_process({.name = "remove_record", .inputs = {"system"}, .outputs = {"system"}},
                             [](const pop::context&, const json&) {
                               pop::result r;
                               r.erase("system.workflows.gone");
                               r.set("system.workflow_index.ended.someone_else",
                                     1);  // the index changes
                               return r;
                             })
              .ok());
  REQUIRE(e.execute("remove_record", json::object()).ok());
  REQUIRE(gone.has_value());
  CHECK(gone->status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("list filters instances and metrics count them in the Prometheus format",
          "[workflow][metrics]") {
  auto clock = std::make_shared<pop::manual_clock>(1'000'000'000);
  auto e_owner = pop::test::must(pop::engine::open({.clock = clock}));
  pop::engine& e = *e_owner;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse(linear)).ok());
  REQUIRE(wf.define(parse(timed)).ok());
  REQUIRE(wf.start("linear", "a", {{"tag", "1"}}).ok());
  clock->advance(1'000'000);
  REQUIRE(wf.start("linear", "b", {{"tag", "2"}}).ok());
  REQUIRE(wf.start("timed", "c", {{"tag", "3"}}).ok());
  for (int i = 0; i < 3; ++i) REQUIRE(wf.advance("a").value());

  pop::workflow_query q;
  q.workflow = "linear";
  CHECK(wf.list(q).size() == 2);
  q.status = "running";
  REQUIRE(wf.list(q).size() == 1);
  CHECK(wf.list(q)[0].id == "b");
  q = {};
  q.started_from_us = 1'000'500'000;
  CHECK(wf.list(q).size() == 2);  // b and c
  q.started_from_us = 0;
  q.started_before_us = 1'000'500'000;
  CHECK(wf.list(q).size() == 1);  // a
  q = {};
  q.limit = 2;
  CHECK(wf.list(q).size() == 2);
  q = {};
  q.definition_version = wf.inspect("c").value().definition_version;
  REQUIRE(wf.list(q).size() == 1);
  CHECK(wf.list(q)[0].id == "c");

  const pop::workflow_metrics m = wf.metrics();
  CHECK(m.instances.at({"linear", "completed"}) == 1);
  CHECK(m.instances.at({"linear", "running"}) == 1);
  CHECK(m.instances.at({"timed", "running"}) == 1);
  CHECK(m.steps == 3);
  CHECK(m.step_latency.count == 3);
  const std::string text = pop::to_prometheus(m);
  CHECK(absl::StrContains(text,
                          "pop_workflow_instances{workflow=\"linear\",status=\"completed\"} 1\n"));
  CHECK(absl::StrContains(text, "# TYPE pop_workflow_stuck gauge\npop_workflow_stuck 0\n"));
  CHECK(absl::StrContains(text, "pop_workflow_steps_total 3\n"));
  CHECK(absl::StrContains(text, "pop_workflow_step_latency_seconds_count 3\n"));
}

TEST_CASE("a sleep step is a durable timer on the engine's clock", "[workflow][sleep]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("sleep.db");
  auto clock = std::make_shared<pop::manual_clock>(1'000'000'000);
  const json nap = {{"name", "nap"},
                    {"start", "rest"},
                    {"steps",
                     {{"rest", {{"sleep_ms", 5000}, {"next", "work"}}},
                      {"work", {{"process", "append"}, {"next", "done"}}},
                      {"done", {{"end", true}}}}}};
  std::int64_t next_due = 0;
  {
    auto e = pop::test::must(pop::engine::open({.journal = file, .clock = clock}));
    auto wf = pop::test::must(pop::workflows::create(*e));
    register_steps(*wf);
    REQUIRE(wf->define(parse(nap)).ok());
    REQUIRE(wf->start("nap", "n", {{"tag", "z"}}).ok());
    REQUIRE(wf->advance("n").value());
    const pop::workflow_instance w = wf->inspect("n").value();
    CHECK(w.status == "waiting");
    CHECK(w.sleep_until_us == 1'005'000'000);
    CHECK(!wf->advance("n").value());  // asleep: nothing to do
    CHECK(wf->expire(clock->now_us(), next_due).value() == 0);
    CHECK(next_due == 1'005'000'000);
  }
  // The wake time is in the state: a restarted program wakes it on time, not a moment early.
  clock->advance(4'999'999);
  auto e = pop::test::must(pop::engine::open({.journal = file, .clock = clock}));
  auto wf = pop::test::must(pop::workflows::create(*e));
  register_steps(*wf);
  REQUIRE(wf->define(parse(nap)).ok());
  CHECK(wf->expire(clock->now_us(), next_due).value() == 0);
  CHECK(next_due == 1'005'000'000);
  clock->advance(1);
  CHECK(wf->expire(clock->now_us(), next_due).value() == 1);
  CHECK(wf->inspect("n").value().status == "running");
  run_all(*wf);
  const pop::workflow_instance w = wf->inspect("n").value();
  CHECK(w.status == "completed");
  CHECK(state(*e, "domain.log") == json::array({"z"}));
  CHECK(!parse(nap).to_json().at("steps").at("rest").contains("wait"));
  CHECK(parse(nap).to_json().at("steps").at("rest").at("sleep_ms") == 5000);
  // A sleep without next parses, and define() refuses it naming the step.
  const json no_next = {{"name", "bad"}, {"start", "s"}, {"steps", {{"s", {{"sleep_ms", 10}}}}}};
  REQUIRE(pop::workflow_definition::from_json(no_next).ok());
  const absl::Status refused = wf->define(parse(no_next));
  CHECK(refused.code() == absl::StatusCode::kInvalidArgument);
  CHECK(absl::StrContains(refused.message(), "step 's' (sleep) needs 'next'"));
}

TEST_CASE("a workflows object made after another on the same engine starts its own workflows",
          "[workflow]") {
  // The engine keeps the processes the first registered (it cannot unregister): the shared start
  // process must not reach into the first object once it is gone.
  pop::engine e;
  {
    auto first = pop::test::must(pop::workflows::create(e));
    register_steps(*first);
    REQUIRE(first->define(parse(linear)).ok());
    REQUIRE(first->start("linear", "l1", {{"tag", "x"}}).ok());
  }
  auto second = pop::test::must(pop::workflows::create(e));
  // (Its own steps need no process: the first's stay registered under their names.)
  const json other = {
      {"name", "other"},
      {"start", "nap"},
      {"steps", {{"nap", {{"sleep_ms", 1000}, {"next", "done"}}}, {"done", {{"end", true}}}}}};
  REQUIRE(second->define(parse(other)).ok());
  REQUIRE(second->start("other", "o1", {{"tag", "y"}}).ok());
  const pop::workflow_instance w = second->inspect("o1").value();
  CHECK(w.workflow == "other");
  CHECK(w.status == "running");
  CHECK(w.cursor == "nap");
  // The first's instance is parked by the second, which does not define its workflow.
  CHECK(second->start("linear", "l2").status().code() == absl::StatusCode::kNotFound);
  REQUIRE(second->advance("l1").value());
  CHECK(second->inspect("l1").value().status == "stuck");
}

TEST_CASE("a child that ends at the wait right after a process step moves its parent on",
          "[workflow]") {
  pop::engine e;
  auto wf = pop::test::must(pop::workflows::create(e));
  register_steps(*wf);
  // The kid's wait is entered in its step's commit, and fails there: it waits on an input the
  // kid does not have.
  REQUIRE(wf->define(parse({{"name", "kid"},
                            {"start", "a"},
                            {"steps",
                             {{"a", {{"process", "append"}, {"next", "w"}}},
                              {"w", {{"wait", {{"reply", "done"}}}, {"key", "missing"}}},
                              {"done", {{"end", true}}}}}}))
              .ok());
  REQUIRE(
      wf->define(parse({{"name", "mom"},
                        {"start", "c"},
                        {"steps",
                         {{"c", {{"call", "kid"}, {"next", "done"}}}, {"done", {{"end", true}}}}}}))
          .ok());
  REQUIRE(wf->start("mom", "m", {{"tag", "x"}}).ok());
  run_all(*wf);
  int kids = 0;
  for (const pop::workflow_instance& w : wf->list()) {
    if (w.workflow != "kid") continue;
    ++kids;
    CHECK(w.status == "failed");
  }
  CHECK(kids == 1);
  CHECK(wf->inspect("m").value().status == "failed");  // it waited forever before
}

TEST_CASE("the engine's workflow processes refuse malformed arguments and change nothing",
          "[workflow]") {
  pop::engine e;
  auto wf_owner = pop::test::must(pop::workflows::create(e));
  pop::workflows& wf = *wf_owner;
  register_steps(wf);
  REQUIRE(wf.define(parse(linear)).ok());
  REQUIRE(wf.start("linear", "ok1", {{"tag", "x"}}).ok());
  const std::uint64_t before = e.version();
  const std::vector<std::pair<std::string, json>> calls = {
      {"workflow.start", {{"id", "x"}}},
      {"workflow.start",
       {{"id", "a.b"},
        {"now", 1},
        {"workflow", "linear"},
        {"version", "v"},
        {"start", "s"},
        {"inputs", json::object()}}},
      {"workflow.operate", {{"id", "ok1"}, {"now", 1}, {"action", "dance"}}},
      {"workflow.operate", {{"id", "ok1"}, {"action", "resume"}}},
      {"workflow.operate", json::array()},
  };
  for (const auto& [process, args] : calls) {
    INFO(process << " " << args.dump());
    const absl::StatusOr<pop::commit> c = e.execute(process, args);
    CHECK(c.status().code() == absl::StatusCode::kInvalidArgument);
  }
  CHECK(e.version() == before);
  CHECK(wf.inspect("ok1").value().status == "running");
}
