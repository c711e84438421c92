// Tests of fan-out steps: parallel branches and map over a list, run as children and joined with
// all or any, with a concurrency cap, cancellation of the children no longer needed, and the
// load-time checks.
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"

#include "absl/strings/match.h"
#include "pop/workflow/workflow.hpp"
#include "tests/workflow/helpers.hpp"

using pop::json;
using namespace pop::test::workflow_helpers;

namespace {

// The workflows the fan-outs call: "linear" appends its tag twice, "failing" fails, "forever"
// waits for a message that never comes.
struct fixture {
  pop::engine e;
  std::unique_ptr<pop::workflows> wf = pop::test::must(pop::workflows::create(e));

  fixture() {
    register_steps(*wf);
    for (const json& d : {json{{"name", "linear"},
                               {"start", "a"},
                               {"steps",
                                {{"a", {{"process", "append"}, {"next", "b"}}},
                                 {"b", {{"process", "append"}, {"next", "done"}}},
                                 {"done", {{"end", true}}}}}},
                          json{{"name", "failing"},
                               {"start", "x"},
                               {"steps", {{"x", {{"fail", "branch says no"}}}}}},
                          json{{"name", "forever"},
                               {"start", "w"},
                               {"steps",
                                {{"w", {{"wait", {{"never", "done"}}}, {"key", "tag"}}},
                                 {"done", {{"end", true}}}}}}}) {
      REQUIRE(wf->define(parse(d)).ok());
    }
  }
  void define(json step) {
    const bool fallback = step.contains("on_error");
    json d = {{"name", "fan"},
              {"start", "f"},
              {"steps",
               {{"f", std::move(step)},
                {"after", {{"process", "append"}, {"next", "done"}}},
                {"done", {{"end", true}}}}}};
    if (fallback) d["steps"]["fallback"] = {{"fail", "fell back"}};
    const absl::Status s = wf->define(parse(d));
    INFO(s);
    REQUIRE(s.ok());
    CHECK(parse(d).to_json() == d);
  }
  pop::workflow_instance get(const std::string& id) const { return wf->inspect(id).value(); }
  std::vector<std::string> children(const std::string& parent) const {
    std::vector<std::string> out;
    for (const pop::workflow_instance& w : wf->list()) {
      if (w.parent == parent) out.push_back(w.id);
    }
    return out;
  }
};

json branch(const std::string& call, const std::string& tag) {
  return {{"call", call}, {"inputs", {{"tag", tag}}}};
}

}  // namespace

TEST_CASE("parallel branches run as children and join all", "[workflow][parallel]") {
  fixture f;
  f.define({{"parallel", {branch("linear", "L"), branch("linear", "R")}}, {"next", "after"}});
  REQUIRE(f.wf->start("fan", "p", {{"tag", "P"}}).ok());
  REQUIRE(f.wf->advance("p").value());
  CHECK(f.get("p").status == "waiting");
  CHECK(f.children("p") == std::vector<std::string>{"p-f-1-0", "p-f-1-1"});
  CHECK(f.get("p-f-1-1").inputs == json{{"tag", "R"}});
  run_all(*f.wf);
  const pop::workflow_instance p = f.get("p");
  CHECK(p.status == "completed");
  CHECK(p.received.at("f") == json{{"p-f-1-0", "completed"}, {"p-f-1-1", "completed"}});
  json log = state(f.e, "domain.log");
  std::sort(log.begin(), log.end());
  CHECK(log == json::array({"L", "L", "P", "R", "R"}));
}

TEST_CASE("join all: the first branch that fails cancels the others and takes on_error",
          "[workflow][parallel]") {
  fixture f;
  f.define({{"parallel", {branch("forever", "w"), branch("failing", "x")}},
            {"next", "after"},
            {"on_error", "fallback"}});
  REQUIRE(f.wf->start("fan", "p").ok());
  run_all(*f.wf);
  const pop::workflow_instance p = f.get("p");
  CHECK(p.status == "failed");
  CHECK(p.error == "fell back");
  CHECK(p.received.at("f") == json{{"p-f-1-0", "cancelled"}, {"p-f-1-1", "failed"}});
  // The join's history names the child that failed and how.
  bool named = false;
  for (const pop::workflow_instance::event& ev : p.events) {
    named = named || absl::StartsWith(ev.outcome, "child 'p-f-1-1' failed: ");
  }
  CHECK(named);
  CHECK(f.get("p-f-1-0").status == "cancelled");
  CHECK(state(f.e, "domain.log").is_null());
}

TEST_CASE("join any: the first branch that completes moves on and cancels the others",
          "[workflow][parallel]") {
  fixture f;
  f.define({{"parallel", {branch("forever", "w"), branch("failing", "x"), branch("linear", "L")}},
            {"join", "any"},
            {"next", "after"}});
  REQUIRE(f.wf->start("fan", "p", {{"tag", "P"}}).ok());
  run_all(*f.wf);
  const pop::workflow_instance p = f.get("p");
  CHECK(p.status == "completed");
  CHECK(p.received.at("f") ==
        json{{"p-f-1-0", "cancelled"}, {"p-f-1-1", "failed"}, {"p-f-1-2", "completed"}});
  CHECK(f.get("p-f-1-0").status == "cancelled");
  // When none completes, on_error (here none: the failure path).
  fixture g;
  g.define({{"parallel", {branch("failing", "x"), branch("failing", "y")}},
            {"join", "any"},
            {"next", "after"}});
  REQUIRE(g.wf->start("fan", "q").ok());
  run_all(*g.wf);
  CHECK(g.get("q").status == "failed");
  CHECK(absl::StrContains(g.get("q").error, "no child completed"));
}

TEST_CASE("map runs a child per element, at most max_concurrency at once", "[workflow][map]") {
  fixture f;
  f.define({{"map",
             {{"over", "skus"},
              {"call", "linear"},
              {"as", "tag"},
              {"inputs", {{"order", "{order}"}}},
              {"max_concurrency", 2}}},
            {"next", "after"}});
  REQUIRE(
      f.wf->start("fan", "p", {{"skus", {"a", "b", "c", "d", "e"}}, {"order", "o-1"}, {"tag", "P"}})
          .ok());
  REQUIRE(f.wf->advance("p").value());
  CHECK(f.children("p").size() == 2);  // the cap
  CHECK(f.get("p-f-1-1").inputs == json{{"order", "o-1"}, {"tag", "b"}});
  // Each child that ends lets the next element start: never more than 2 unfinished.
  std::size_t most = 0;
  for (bool moved = true; moved;) {
    moved = false;
    for (const std::string& id : f.wf->runnable()) {
      moved = f.wf->advance(id).value() || moved;
      std::size_t unfinished = 0;
      for (const std::string& c : f.children("p")) {
        unfinished += pop::workflows::ended(f.get(c).status) ? 0 : 1;
      }
      most = std::max(most, unfinished);
    }
  }
  CHECK(most == 2);
  CHECK(f.children("p").size() == 5);
  CHECK(f.get("p").status == "completed");
  CHECK(f.get("p").received.at("f").size() == 5);
  CHECK(state(f.e, "domain.log").size() == 11);
  // An empty list moves on at once; a missing or non-list input fails the step, naming it.
  REQUIRE(
      f.wf->start("fan", "empty", {{"skus", json::array()}, {"order", "o"}, {"tag", "E"}}).ok());
  run_all(*f.wf);
  CHECK(f.get("empty").status == "completed");
  CHECK(f.children("empty").empty());
  REQUIRE(f.wf->start("fan", "bad", {{"skus", "abc"}, {"order", "o"}}).ok());
  run_all(*f.wf);
  CHECK(f.get("bad").status == "failed");
  CHECK(absl::StrContains(f.get("bad").error, "maps over input 'skus', which is not a list"));
}

TEST_CASE("cancelling a parent cancels every child of its fan-out", "[workflow][parallel]") {
  fixture f;
  f.define({{"map", {{"over", "tags"}, {"call", "forever"}, {"as", "tag"}}}, {"next", "after"}});
  REQUIRE(f.wf->start("fan", "p", {{"tags", {"a", "b", "c"}}}).ok());
  run_all(*f.wf);
  REQUIRE(f.children("p").size() == 3);
  REQUIRE(f.wf->cancel("p", "no longer wanted").ok());
  run_all(*f.wf);
  CHECK(f.get("p").status == "cancelled");
  for (const std::string& c : f.children("p")) CHECK(f.get(c).status == "cancelled");
}

TEST_CASE("bad fan-out steps are refused at load", "[workflow][parallel]") {
  fixture f;
  const auto refused = [&](json step, const std::string& part) {
    const json d = {{"name", "bad"},
                    {"start", "f"},
                    {"steps", {{"f", std::move(step)}, {"done", {{"end", true}}}}}};
    absl::StatusOr<pop::workflow_definition> parsed = pop::workflow_definition::from_json(d);
    const absl::Status s = parsed.ok() ? f.wf->define(*parsed) : parsed.status();
    INFO(s);
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK(absl::StrContains(s.message(), part));
  };
  refused({{"parallel", {branch("ghost", "x")}}, {"next", "done"}}, "unknown workflow 'ghost'");
  refused({{"parallel", {branch("linear", "x")}}, {"join", "most"}, {"next", "done"}},
          "join is 'most'");
  refused({{"parallel", {branch("linear", "x")}}}, "needs 'next'");
  refused({{"map", {{"call", "linear"}}}, {"next", "done"}}, "needs 'over'");
  refused({{"map", {{"over", "x"}, {"call", "linear"}, {"max_concurrency", -1}}}, {"next", "done"}},
          "max_concurrency must not be negative");
  refused({{"map", {{"over", "x"}, {"call", "linear"}, {"size", 3}}}, {"next", "done"}},
          "unknown field 'size'");
  refused({{"end", true}, {"join", "any"}}, "only parallel and map steps join");
  refused({{"parallel", {branch("linear", "x")}}, {"call", "linear"}, {"next", "done"}},
          "exactly one of");
}

TEST_CASE("a restarted parent cancels the children it started, and new children get new ids",
          "[workflow][parallel]") {
  fixture f;
  f.define({{"parallel", {branch("forever", "a"), branch("forever", "b")}}, {"next", "after"}});
  REQUIRE(f.wf->start("fan", "p", {{"tag", "P"}}).ok());
  run_all(*f.wf);
  REQUIRE(f.children("p").size() == 2);
  // A deploy that lacks "fan" parks it; the operator restarts it from the fan-out step.
  auto bare = pop::test::must(pop::workflows::create(f.e));
  REQUIRE(bare->cancel("p-f-1-0", "operator").ok());  // one child, by an operator without "fan"
  const pop::workflow_instance parked = f.get("p");
  CHECK(parked.status == "stuck");
  CHECK(absl::StrContains(parked.stuck_reason, "its child 'p-f-1-0' was cancelled by an operator"));
  REQUIRE(f.wf->restart_from("p", "f").ok());
  CHECK(f.get("p-f-1-1").status == "cancelled");  // the other child of the old fan-out
  run_all(*f.wf);
  // The new children have ids of their own: the old records are intact.
  CHECK(f.get("p").status == "waiting");
  CHECK(f.get("p-f-2-0").status == "waiting");
  CHECK(f.get("p-f-2-1").status == "waiting");
  CHECK(f.get("p-f-1-0").status == "cancelled");
}

TEST_CASE("an operator's cancel of a fan-out child reaches its parent", "[workflow][parallel]") {
  fixture f;
  f.define({{"parallel", {branch("forever", "a"), branch("linear", "b")}},
            {"next", "after"},
            {"on_error", "fallback"}});
  REQUIRE(f.wf->start("fan", "p", {{"tag", "P"}}).ok());
  run_all(*f.wf);
  REQUIRE(f.get("p-f-1-1").status == "completed");
  REQUIRE(f.wf->cancel("p-f-1-0", "not needed").ok());
  run_all(*f.wf);
  const pop::workflow_instance p = f.get("p");
  CHECK(p.status == "failed");  // join all: a cancelled child takes on_error
  CHECK(p.error == "fell back");
  CHECK(p.received.at("f") == json{{"p-f-1-0", "cancelled"}, {"p-f-1-1", "completed"}});
}
