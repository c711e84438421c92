// Tests of workflow definition versions: versions side by side, instances parked when a deploy
// drops their version or step, and explicit migrations between versions.
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "absl/strings/match.h"
#include "pop/relay/inbox.hpp"
#include "pop/workflow/workflow.hpp"
#include "pop/workflow/workflow_runner.hpp"
#include "tests/support/temp_dir.hpp"
#include "tests/workflow/helpers.hpp"

using pop::json;
using namespace pop::test::workflow_helpers;

namespace {

// Version 1 of "order": record, wait for "paid" on the order's key, record again, end.
json order_v1() {
  return {{"name", "order"},
          {"version", "v1"},
          {"start", "a"},
          {"steps",
           {{"a", {{"process", "append"}, {"next", "w"}}},
            {"w", {{"wait", {{"paid", "b"}}}, {"key", "tag"}}},
            {"b", {{"process", "append"}, {"next", "done"}}},
            {"done", {{"end", true}}}}}};
}

// Version 2: an extra step after the payment.
json order_v2() {
  json d = order_v1();
  d["version"] = "v2";
  d["steps"]["b"]["next"] = "c";
  d["steps"]["c"] = {{"process", "append"}, {"next", "done"}};
  return d;
}

// Version 3 drops the wait step "w": it waits in "pay" instead.
json order_v3() {
  return {{"name", "order"},
          {"version", "v3"},
          {"start", "a"},
          {"steps",
           {{"a", {{"process", "append"}, {"next", "pay"}}},
            {"pay", {{"wait", {{"paid", "b"}}}, {"key", "tag"}}},
            {"b", {{"process", "append"}, {"next", "done"}}},
            {"done", {{"end", true}}}}}};
}

// One deploy of the service: an engine on `file` with the inbox wired and `defs` defined.
struct service {
  std::unique_ptr<pop::engine> e;
  std::unique_ptr<pop::workflows> wf;
  std::unique_ptr<pop::inbox> in;

  service(const std::string& file, const std::vector<json>& defs) {
    e = pop::test::must(pop::engine::open({.journal = file}));
    wf = pop::test::must(pop::workflows::create(*e));
    in = pop::test::must(pop::inbox::create(*e));
    REQUIRE(pop::register_workflow_resume(*in, *wf).ok());
    register_steps(*wf);
    for (const json& d : defs) {
      const absl::Status s = wf->define(parse(d));
      INFO(s);
      REQUIRE(s.ok());
    }
  }
  void pay(const std::string& msg_id, const std::string& tag) {
    REQUIRE(in->apply("workflow.resume", message(msg_id, "paid", tag)).value().applied);
  }
  pop::workflow_instance get(const std::string& id) const { return wf->inspect(id).value(); }
};

}  // namespace

TEST_CASE("versions run side by side: running instances keep theirs, new ones take the newest",
          "[workflow][versions]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("flows.db");
  {
    service s(file, {order_v1()});
    REQUIRE(s.wf->start("order", "i1", {{"tag", "one"}}).ok());
    run_all(*s.wf);
    REQUIRE(s.get("i1").status == "waiting");
    CHECK(s.get("i1").definition_version == "v1");
  }
  // The next deploy keeps v1 beside the new v2.
  service s(file, {order_v1(), order_v2()});
  CHECK(s.wf->versions("order") == std::vector<std::string>{"v1", "v2"});
  CHECK(s.wf->define(parse(order_v2())).code() == absl::StatusCode::kAlreadyExists);
  REQUIRE(s.wf->start("order", "i2", {{"tag", "two"}}).ok());
  CHECK(s.get("i2").definition_version == "v2");
  run_all(*s.wf);
  s.pay("m1", "one");
  s.pay("m2", "two");
  run_all(*s.wf);
  // i1 followed v1 (a, b); i2 followed v2 (a, b, c).
  CHECK(s.get("i1").status == "completed");
  CHECK(s.get("i2").status == "completed");
  CHECK(state(*s.e, "domain.count") == 5);
  std::vector<std::string> i2_steps;
  for (const auto& ev : s.get("i2").events) i2_steps.push_back(ev.step);
  CHECK(std::find(i2_steps.begin(), i2_steps.end(), "c") != i2_steps.end());
  std::vector<std::string> i1_steps;
  for (const auto& ev : s.get("i1").events) i1_steps.push_back(ev.step);
  CHECK(std::find(i1_steps.begin(), i1_steps.end(), "c") == i1_steps.end());
  // A version name that is not a path segment is refused.
  json bad = order_v1();
  bad["version"] = "1.0";
  CHECK(s.wf->define(parse(bad)).code() == absl::StatusCode::kInvalidArgument);
  // An unnamed version is named by its hash.
  json unnamed = order_v1();
  unnamed.erase("version");
  const pop::workflow_definition def = parse(unnamed);
  CHECK(pop::workflows::version_of(def).size() == 16);
  REQUIRE(s.wf->define(def).ok());
  CHECK(s.wf->versions("order").back() == pop::workflows::version_of(def));
}

TEST_CASE(
    "a deploy that drops an instance's version parks it stuck with a reason, and a migration "
    "moves it on",
    "[workflow][versions]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("flows.db");
  {
    service s(file, {order_v1()});
    for (const char* id : {"i1", "i2", "i3"}) {
      REQUIRE(s.wf->start("order", id, {{"tag", std::string("t-") + id}}).ok());
    }
    run_all(*s.wf);
    REQUIRE(s.get("i1").status == "waiting");
  }
  service s(file, {order_v3()});
  // The runner parks what this program cannot run as soon as it starts, waiting ones included.
  {
    pop::workflow_runner runner(*s.e, *s.wf);
    boost::asio::io_context io;
    absl::Status done = absl::UnknownError("not run");
    boost::asio::co_spawn(io, runner.settle(),
                          [&](std::exception_ptr, absl::Status st) { done = st; });
    io.run();
    INFO(done);
    REQUIRE(done.ok());
  }
  for (const char* id : {"i1", "i2", "i3"}) {
    const pop::workflow_instance w = s.get(id);
    CHECK(w.status == "stuck");
    CHECK(absl::StrContains(w.stuck_reason, "its definition version 'v1' of workflow 'order'"));
    CHECK(absl::StrContains(w.stuck_reason, "it defines v3"));
    CHECK(absl::StrContains(w.stuck_reason, "migrate"));
  }
  CHECK(s.wf->metrics().stuck == 3);
  CHECK(s.wf->reconcile().value() == 0);  // parked once

  const std::uint64_t before = s.e->version();
  // Bad migrations change nothing: an unknown version, a step neither version has, an
  // instance whose wait step would not be a wait.
  CHECK(s.wf->migrate({.workflow = "order", .to_version = "v9"}).status().code() ==
        absl::StatusCode::kNotFound);
  CHECK(s.wf->migrate({.workflow = "order", .to_version = "v3", .steps = {{"w", "nowhere"}}})
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  const absl::Status unmapped = s.wf->migrate({.workflow = "order", .to_version = "v3"}).status();
  CHECK(unmapped.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(absl::StrContains(unmapped.message(), "it waits at step 'w'"));
  const absl::Status wrong_kind =
      s.wf->migrate({.workflow = "order", .to_version = "v3", .steps = {{"w", "b"}}}).status();
  CHECK(absl::StrContains(wrong_kind.message(), "a process step there"));
  CHECK(s.e->version() == before);
  CHECK(s.get("i1").status == "stuck");

  // One is migrated by id, one cancelled, the rest by workflow and version in one commit.
  CHECK(s.wf->migrate({.workflow = "order",
                       .from_version = "v1",
                       .to_version = "v3",
                       .steps = {{"w", "pay"}},
                       .ids = {"i1"}})
            .value() == 1);
  pop::workflow_instance i1 = s.get("i1");
  CHECK(i1.status == "waiting");
  CHECK(i1.definition_version == "v3");
  CHECK(i1.cursor == "pay");
  CHECK(absl::StrContains(i1.events.back().outcome, "migrated from version 'v1' to 'v3'"));
  REQUIRE(s.wf->cancel("i2", "order withdrawn").ok());
  CHECK(s.get("i2").status == "cancelled");
  CHECK(s.wf->migrate({.workflow = "order", .to_version = "v3", .steps = {{"w", "pay"}}}).value() ==
        1);
  CHECK(s.get("i3").status == "waiting");
  CHECK(s.wf->metrics().stuck == 0);
  // Migrated waits take their messages and finish on the new version.
  s.pay("m1", "t-i1");
  s.pay("m3", "t-i3");
  run_all(*s.wf);
  CHECK(s.get("i1").status == "completed");
  CHECK(s.get("i3").status == "completed");
  // Nothing left to move.
  CHECK(s.wf->migrate({.workflow = "order", .to_version = "v3"}).value() == 0);
}

TEST_CASE("a version defined again resumes the instances its absence parked",
          "[workflow][versions]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("flows.db");
  {
    service s(file, {order_v1()});
    REQUIRE(s.wf->start("order", "i1", {{"tag", "one"}}).ok());
  }
  {
    service s(file, {order_v2()});  // v1 forgotten: the running instance parks at its next step
    REQUIRE(s.wf->advance("i1").value());
    CHECK(s.get("i1").status == "stuck");
  }
  service s(file, {order_v1(), order_v2()});
  CHECK(s.get("i1").status == "running");
  run_all(*s.wf);
  s.pay("m1", "one");
  run_all(*s.wf);
  CHECK(s.get("i1").status == "completed");
  CHECK(s.get("i1").definition_version == "v1");
}

TEST_CASE(
    "an operator restarts an instance parked for lack of its version on a step of the new one",
    "[workflow][versions]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("flows.db");
  {
    service s(file, {order_v1()});
    REQUIRE(s.wf->start("order", "i1", {{"tag", "one"}}).ok());
    run_all(*s.wf);
  }
  service s(file, {order_v3()});
  // Its message comes while no program can take it: kept in the instance, which is parked.
  s.pay("m1", "one");
  pop::workflow_instance w = s.get("i1");
  CHECK(w.status == "stuck");
  CHECK(w.received.contains("paid"));
  CHECK(s.wf->resume("i1").status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(s.wf->restart_from("i1", "w").status().code() == absl::StatusCode::kNotFound);
  CHECK(s.wf->restart_from("i1", "b", "v9").status().code() == absl::StatusCode::kNotFound);
  REQUIRE(s.wf->restart_from("i1", "b").ok());  // onto the newest version, v3
  w = s.get("i1");
  CHECK(w.definition_version == "v3");
  CHECK(absl::StrContains(w.events.back().outcome, "from version 'v1' to 'v3'"));
  run_all(*s.wf);
  CHECK(s.get("i1").status == "completed");
}
