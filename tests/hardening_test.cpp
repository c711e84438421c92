// Tests that bad input anywhere gets a status, never a throw, a hang or a change: invalid UTF-8,
// NaN, deep nesting, huge and empty values at every public entry point, in memory and on a
// journal; journals checkpointed by another SQLite client; workflow ids and inputs.
#include <catch2/catch.hpp>

#include <pthread.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "pop/engine/dry_run.hpp"
#include "pop/engine/engine.hpp"
#include "pop/relay/dead_letters.hpp"
#include "pop/relay/inbox.hpp"
#include "pop/workflow/workflow.hpp"
#include "tests/support/must.hpp"
#include "tests/support/temp_dir.hpp"

using pop::json;
using pop::test::must;
using pop::test::temp_dir;

namespace {

// A value nested `levels` deep: [[[...]]].
json nested(int levels) {
  json v = json::array();
  for (int i = 1; i < levels; ++i) v = json::array({std::move(v)});
  return v;
}

const std::string bad_utf8 = std::string("bad\xff", 4);

// Registers the processes the sweep drives: "put" writes args.v to domain.out; "emit" emits one
// message of topic "t" with payload args.v, key args.key and header h = args.header.
void register_sweep_processes(pop::engine& e) {
  REQUIRE(e.register_process({.name = "put", .outputs = {"domain.out"}}, [](const pop::context&,
                                                                            const json& args) {
             pop::result r;
             r.set("domain.out", args.at("v"));
             return r;
           }).ok());
  REQUIRE(e.register_process({.name = "emit", .emits = {"t"}}, [](const pop::context&,
                                                                  const json& args) {
             pop::result r;
             std::map<std::string, std::string> headers;
             if (args.contains("header")) headers["h"] = args.at("header").get<std::string>();
             r.emit(args.value("topic", "t"), args.value("v", json()), args.value("key", ""),
                    std::move(headers));
             return r;
           }).ok());
}

// One engine under test, in memory or on a journal, with everything the sweep calls.
struct subject {
  temp_dir dir;
  std::unique_ptr<pop::engine> engine;
  std::unique_ptr<pop::workflows> workflows;
  std::unique_ptr<pop::inbox> inbox;
  std::unique_ptr<pop::dead_letters> dead;

  explicit subject(bool journaled) {
    pop::options o;
    o.initial_state = {{"domain", {{"out", 0}}}};
    if (journaled) o.journal = dir.file("sweep.db");
    engine = must(pop::engine::open(std::move(o)));
    register_sweep_processes(*engine);
    workflows = must(pop::workflows::create(*engine));
    REQUIRE(workflows
                ->define(must(pop::workflow_definition::from_json(
                    {{"name", "w"}, {"start", "done"}, {"steps", {{"done", {{"end", true}}}}}})))
                .ok());
    inbox = must(pop::inbox::create(*engine));
    REQUIRE(inbox
                ->register_handler({.name = "take", .outputs = {"domain.taken"}},
                                   [](const pop::context&, const pop::outbox_message& m) {
                                     pop::result r;
                                     r.set("domain.taken", m.payload);
                                     return absl::StatusOr<pop::result>(std::move(r));
                                   })
                .ok());
    dead = must(pop::dead_letters::create(*engine));
  }
};

// Calls `call` and checks the promise every entry point makes: no exception, and on an error
// nothing changed (same version, same state, nothing waiting to become durable).
void expect_status_and_no_change(subject& s, const std::string& what,
                                 const std::function<absl::Status()>& call) {
  INFO(what);
  const pop::snapshot before = s.engine->snapshot();
  absl::Status status;
  REQUIRE_NOTHROW(status = call());
  if (!status.ok()) {
    INFO(status.ToString());
    CHECK(status.code() != absl::StatusCode::kUnknown);
    CHECK(status.code() != absl::StatusCode::kInternal);
    CHECK(s.engine->version() == before.version());
    CHECK(s.engine->snapshot().to_json() == before.to_json());
  }
  CHECK(s.engine->durable_version() == s.engine->version());
}

// Runs `body` on a thread with a 1 GiB stack (reserved, not committed) and rethrows what it
// threw. nlohmann::json copies recursively, so the test's own copies of a 10,000-level value
// need a deep stack under AddressSanitizer; pop refuses such a value after looking at most
// max_value_depth levels into it.
void on_deep_stack(const std::function<void()>& body) {
  struct job {
    const std::function<void()>* body;
    std::exception_ptr thrown;
  } j{&body, nullptr};
  pthread_attr_t attr;
  REQUIRE(pthread_attr_init(&attr) == 0);
  REQUIRE(pthread_attr_setstacksize(&attr, std::size_t{1} << 30) == 0);
  pthread_t thread;
  const int created = pthread_create(
      &thread, &attr,
      [](void* p) -> void* {
        auto* jp = static_cast<job*>(p);
        try {
          (*jp->body)();
        } catch (...) {
          jp->thrown = std::current_exception();
        }
        return nullptr;
      },
      &j);
  pthread_attr_destroy(&attr);
  REQUIRE(created == 0);
  pthread_join(thread, nullptr);
  if (j.thrown) std::rethrow_exception(j.thrown);
}

// Bad or extreme text, for every parameter that takes a string.
struct text_case {
  const char* name;
  std::string text;
};

std::vector<text_case> texts() {
  return {{"invalid UTF-8", bad_utf8},
          {"an empty string", ""},
          {"control characters", std::string("a\n\r\t\x01\x7f b", 9)},
          {"a lone NUL", std::string(1, '\0')},
          {"10 MB", std::string(10u << 20, 'x')}};
}

// Bad or extreme JSON values, for every parameter that takes one.
struct value_case {
  const char* name;
  json value;
};

std::vector<value_case> values() {
  return {{"a string that is not UTF-8", bad_utf8},
          {"an object key that is not UTF-8", json{{bad_utf8, 1}}},
          {"NaN", std::numeric_limits<double>::quiet_NaN()},
          {"infinity", std::numeric_limits<double>::infinity()},
          {"10,000 levels of nesting", nested(10'000)},
          {"a 10 MB string", std::string(10u << 20, 'y')},
          {"control characters", std::string("\x01\x02\n", 3)},
          {"an empty object", json::object()},
          {"null", json()}};
}

// Every public entry point that takes a string: one line each.
using text_call = std::function<absl::Status(subject&, const std::string&)>;
const std::vector<std::pair<const char*, text_call>> text_entry_points = {
    {"execute(name)",
     [](subject& s, const std::string& t) { return s.engine->execute(t).status(); }},
    {"register_process(name)",
     [](subject& s, const std::string& t) {
       return s.engine->register_process(
           {.name = t}, [](const pop::context&, const json&) { return pop::result{}; });
     }},
    {"register_process(inputs)",
     [](subject& s, const std::string& t) {
       return s.engine->register_process(
           {.name = "p_in", .inputs = {t}},
           [](const pop::context&, const json&) { return pop::result{}; });
     }},
    {"snapshot().read(path)",
     [](subject& s, const std::string& t) { return s.engine->snapshot().read(t).status(); }},
    {"emit(topic)",
     [](subject& s, const std::string& t) {
       return s.engine->execute("emit", {{"topic", t}}).status();
     }},
    {"emit(key)",
     [](subject& s, const std::string& t) {
       return s.engine->execute("emit", {{"key", t}}).status();
     }},
    {"emit(header)",
     [](subject& s, const std::string& t) {
       return s.engine->execute("emit", {{"header", t}}).status();
     }},
    {"compare_and_swap(path)",
     [](subject& s, const std::string& t) {
       return s.engine->compare_and_swap(s.engine->version(), {{t, 1}}).status();
     }},
    {"workflows.start(id)",
     [](subject& s, const std::string& t) { return s.workflows->start("w", t, {}).status(); }},
    {"workflows.start(workflow)",
     [](subject& s, const std::string& t) { return s.workflows->start(t, "w1", {}).status(); }},
    {"workflows.inspect(id)",
     [](subject& s, const std::string& t) { return s.workflows->inspect(t).status(); }},
    {"inbox.apply(message id)",
     [](subject& s, const std::string& t) {
       pop::outbox_message m;
       m.id = t;
       m.topic = "t";
       return s.inbox->apply("take", m).status();
     }},
    {"inbox.apply(handler)",
     [](subject& s, const std::string& t) {
       pop::outbox_message m;
       m.id = pop::make_message_id(1, 0);
       return s.inbox->apply(t, m).status();
     }},
    {"dead_letters.requeue(id)",
     [](subject& s, const std::string& t) { return s.dead->requeue(t).status(); }},
    {"dead_letters.discard(id)",
     [](subject& s, const std::string& t) { return s.dead->discard(t).status(); }},
    {"engine::open(outbox_path)",
     [](subject&, const std::string& t) { return pop::engine::open({.outbox_path = t}).status(); }},
    {"inbox::create(path)",
     [](subject& s, const std::string& t) {
       return pop::inbox::create(*s.engine, {.path = t}).status();
     }},
};

// Every public entry point that takes a JSON value: one line each.
using value_call = std::function<absl::Status(subject&, const json&)>;
const std::vector<std::pair<const char*, value_call>> value_entry_points = {
    {"a process's write",
     [](subject& s, const json& v) {
       return s.engine->execute("put", {{"v", v}}).status();
     }},
    {"a message payload",
     [](subject& s, const json& v) {
       return s.engine->execute("emit", {{"v", v}}).status();
     }},
    {"compare_and_swap(value)",
     [](subject& s, const json& v) {
       return s.engine->compare_and_swap(s.engine->version(), {{"domain.cas", v}}).status();
     }},
    {"compare_and_swap(outbox queue)",
     [](subject& s, const json& v) {
       return s.engine
           ->compare_and_swap(s.engine->version(), {{"domain.outbox_queue", json::array({v})}})
           .status();
     }},
    {"workflows.start(inputs)",
     [](subject& s, const json& v) {
       return s.workflows->start("w", "w1", {{"x", v}}).status();
     }},
    {"inbox.apply(payload)",
     [](subject& s, const json& v) {
       pop::outbox_message m;
       m.id = pop::make_message_id(7, 0);
       m.topic = "t";
       m.payload = v;
       return s.inbox->apply("take", m).status();
     }},
    {"engine::open(initial_state) in memory",
     [](subject&, const json& v) {
       return pop::engine::open({.initial_state = {{"domain", {{"x", v}}}}}).status();
     }},
    {"dry_run(fixture)",
     [](subject& s, const json& v) {
       return s.engine->dry_run("put", {{"domain", {{"x", v}}}}, {{"v", 1}}).status();
     }},
};

}  // namespace

TEST_CASE("every entry point given bad text returns a status and changes nothing", "[hardening]") {
  const bool journaled = GENERATE(false, true);
  subject s(journaled);
  for (const text_case& t : texts()) {
    for (const auto& [name, call] : text_entry_points) {
      expect_status_and_no_change(
          s, std::string(name) + " with " + t.name + (journaled ? " on a journal" : " in memory"),
          [&, &call = call] { return call(s, t.text); });
    }
  }
}

TEST_CASE("every entry point given a bad value returns a status and changes nothing",
          "[hardening]") {
  const bool journaled = GENERATE(false, true);
  subject s(journaled);
  on_deep_stack([&] {
    for (const value_case& v : values()) {
      for (const auto& [name, call] : value_entry_points) {
        expect_status_and_no_change(
            s, std::string(name) + " with " + v.name + (journaled ? " on a journal" : " in memory"),
            [&, &call = call] { return call(s, v.value); });
      }
    }
  });
  // The engine still commits and (on a journal) still reopens with what it acknowledged.
  REQUIRE(s.engine->execute("put", {{"v", "fine"}}).ok());
  if (journaled) {
    const json state = s.engine->snapshot().to_json();
    const std::string file = s.dir.file("sweep.db");
    s.dead.reset();
    s.inbox.reset();
    s.workflows.reset();
    s.engine.reset();
    CHECK(must(pop::engine::open({.journal = file}))->snapshot().to_json() == state);
  }
}

TEST_CASE("a string that is not UTF-8 is refused before commit, and the journal goes on",
          "[hardening]") {
  temp_dir dir;
  const std::string file = dir.file("utf8.db");
  auto e = must(pop::engine::open({.journal = file}));
  register_sweep_processes(*e);
  const auto written = e->execute("put", {{"v", bad_utf8}});
  CHECK(written.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(written.status().message()), Catch::Contains("process 'put'") &&
                                                          Catch::Contains("domain.out") &&
                                                          Catch::Contains("UTF-8"));
  const auto payload = e->execute("emit", {{"v", {{"to", bad_utf8}}}});
  CHECK(payload.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(payload.status().message()), Catch::Contains("/to"));
  CHECK(e->execute("emit", {{"key", bad_utf8}}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(e->version() == 0);
  CHECK(e->durable_version() == 0);
  // Later commits are neither refused nor stuck behind the refused one.
  REQUIRE(e->execute("put", {{"v", "good"}}).ok());
  REQUIRE(e->execute("emit", {{"v", 1}}).ok());
  CHECK(e->durable_version() == 2);
  e.reset();
  const auto reopened = must(pop::engine::open({.journal = file}));
  CHECK(reopened->snapshot().read("domain.out").value() == "good");
  CHECK(reopened->snapshot().pending_count() == 1);
}

TEST_CASE("an initial state a journal cannot hold is refused before the journal is created",
          "[hardening]") {
  temp_dir dir;
  const std::string file = dir.file("initial.db");
  for (const json& bad : {json(bad_utf8), json(std::nan("")), nested(1000)}) {
    const auto e =
        pop::engine::open({.initial_state = {{"domain", {{"x", bad}}}}, .journal = file});
    CHECK(e.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(e.status().message()), Catch::Contains("options.initial_state"));
    CHECK(!std::filesystem::exists(file));
  }
}

TEST_CASE("an outbox seeded as an empty list is an empty outbox, and other seeds say what to write",
          "[hardening]") {
  auto e =
      must(pop::engine::open({.initial_state = {{"domain", {{"outbox_queue", json::array()}}}}}));
  register_sweep_processes(*e);
  CHECK(e->snapshot().pending_count() == 0);
  REQUIRE(e->execute("emit", {{"v", 1}}).ok());
  CHECK(e->snapshot().pending_count() == 1);
  const auto scalar = pop::engine::open({.initial_state = {{"domain", {{"outbox_queue", 5}}}}});
  CHECK(scalar.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(scalar.status().message()),
             Catch::Contains("holds a number") && Catch::Contains("seed it as []"));
}

TEST_CASE("workflow ids must be one path segment, and null inputs mean none", "[hardening]") {
  pop::engine e;
  auto wf = must(pop::workflows::create(e));
  REQUIRE(wf
              ->define(must(pop::workflow_definition::from_json(
                  {{"name", "loan"}, {"start", "done"}, {"steps", {{"done", {{"end", true}}}}}})))
              .ok());
  const auto dotted = wf->start("loan", "L.1", json::object());
  CHECK(dotted.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(dotted.status().message()), Catch::Contains("L.1"));
  CHECK(e.version() == 0);
  REQUIRE(wf->start("loan", "L-1", {}).ok());
  CHECK(wf->inspect("L-1").value().inputs == json::object());
  CHECK(wf->start("loan", "L-2", json::array()).status().code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE("construction errors are statuses from create() and open()", "[hardening]") {
  pop::engine e;
  CHECK(pop::engine::open({.outbox_path = "bad..path"}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(pop::inbox::create(e, {.path = "domain.outbox_queue.marks"}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(pop::dead_letters::create(e, "domain").status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(pop::workflows::create(e, {.instances = "a..b"}).status().code() ==
        absl::StatusCode::kInvalidArgument);
}
