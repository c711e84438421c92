// The workflow engine's transitions as pure functions, without an engine: a definition compiled,
// an instance record in a fixture state, an event, and pop::dry_run showing what the transition
// would commit (the instance's new record, index entries, history, the step's own writes and
// messages).
#include <catch2/catch.hpp>

#include <string>
#include <variant>

#include "absl/strings/match.h"
#include "absl/strings/str_replace.h"
#include "pop/engine/dry_run.hpp"
#include "pop/workflow/detail/machine.hpp"
#include "pop/workflow/detail/model.hpp"
#include "pop/workflow/detail/workflow_parts.hpp"
#include "pop/workflow/workflow.hpp"

namespace {

using pop::json;
namespace d = pop::detail;

constexpr std::int64_t now = 1'000'000'000;

pop::workflow_definition parse(const json& j) {
  absl::StatusOr<pop::workflow_definition> def = pop::workflow_definition::from_json(j);
  INFO(def.status());
  REQUIRE(def.ok());
  return *def;
}

// A machine with `def` defined (unchecked: the transitions take what define() checked).
struct world {
  d::machine m{pop::workflow_options{}};
  std::shared_ptr<const d::defined_workflow> def;

  explicit world(const json& definition) {
    def = d::compile(parse(definition), "v1");
    m.add(def);
  }

  // A fixture state with `domain` and instance `id` running at `cursor` (its runnable index set),
  // as start() leaves one.
  json fixture(const json& domain, const std::string& cursor, json inputs = json::object()) const {
    json rec =
        d::new_record(def->def.name, def->version, cursor, std::move(inputs), now - 10, 0, "", "")
            .to_json();
    json state = {{"domain", domain}};
    state["system"]["workflows"]["i1"] = rec;
    state["system"]["workflow_index"]["runnable"]["i1"] = true;
    return state;
  }

  // What event `e` on instance i1 would commit, run on `state` without an engine.
  pop::dry_run_result control(const json& state, d::control_event e, std::int64_t at = now) const {
    const pop::process_spec spec{
        .name = "control", .inputs = {"domain", "system"}, .outputs = {"system"}};
    const d::control_call call{"i1", at, std::move(e)};
    absl::StatusOr<pop::dry_run_result> r = pop::dry_run(
        spec,
        [&](const pop::context& ctx, const json& args) -> absl::StatusOr<pop::result> {
          CHECK(args == d::to_args(call));
          return m.control(*def, ctx, d::control_call_from(args).value());
        },
        state, d::to_args(call));
    INFO(r.status());
    REQUIRE(r.ok());
    return *std::move(r);
  }

  // What running step `step`'s process `fn` on instance i1 would commit.
  pop::dry_run_result step(const json& state, const std::string& step, const pop::process_fn& fn,
                           bool compensation = false) const {
    const pop::process_spec spec{.name = "step",
                                 .inputs = {"domain", "system"},
                                 .outputs = {"domain", "system"},
                                 .emits = {"order.shipped"}};
    const d::step_call call{"i1", now, step, compensation};
    absl::StatusOr<pop::dry_run_result> r = pop::dry_run(
        spec,
        [&](const pop::context& ctx, const json& args) {
          return m.step(fn, ctx, d::step_call_from(args).value());
        },
        state, d::to_args(call));
    INFO(r.status());
    REQUIRE(r.ok());
    return *std::move(r);
  }
};

const json& instance(const pop::dry_run_result& r) {
  return r.state.at("system").at("workflows").at("i1");
}
bool indexed(const pop::dry_run_result& r, const std::string& kind) {
  const json& index = r.state.at("system").at("workflow_index");
  return index.contains(kind) && index.at(kind).contains("i1");
}
// True if `state` has a value at dotted path `at`.
bool has(const json& state, const std::string& at) {
  return state.contains(json::json_pointer("/" + absl::StrReplaceAll(at, {{".", "/"}})));
}
// The history entries the transition appended, oldest first.
std::vector<std::string> outcomes(const pop::dry_run_result& r) {
  std::vector<std::string> out;
  const json& state = r.state.at("system");
  if (!state.contains("workflow_history")) return out;
  for (const auto& [seq, entry] : state.at("workflow_history").at("i1").items()) {
    out.push_back(entry.at("step").get<std::string>() + ": " +
                  entry.at("outcome").get<std::string>());
  }
  return out;
}

const json branchy = {{"name", "ship"},
                      {"start", "check"},
                      {"steps",
                       {{"check",
                         {{"branch",
                           {{{"path", "domain.orders.{order}.status"},
                             {"op", "eq"},
                             {"value", "paid"},
                             {"next", "send"}}}},
                          {"next", "drop"}}},
                        {"send",
                         {{"process", "ship_it"},
                          {"next", "reply"},
                          {"compensate", "unship"},
                          {"retry", {{"attempts", 3}, {"initial_ms", 100}, {"jitter", 0.1}}}}},
                        {"reply",
                         {{"wait", {{"order.ack", "done"}}},
                          {"key", "order"},
                          {"timeout_ms", 5000},
                          {"on_timeout", "drop"}}},
                        {"nap", {{"sleep_ms", 250}, {"next", "done"}}},
                        {"drop", {{"fail", "nothing to ship"}}},
                        {"done", {{"end", true}}}}}};

}  // namespace

TEST_CASE("step kinds compile to their variant alternative, with typed options", "[workflow]") {
  const world w(branchy);
  CHECK(std::holds_alternative<d::branch_kind>(*w.def->kind("check")));
  const auto& send = std::get<d::process_kind>(*w.def->kind("send"));
  CHECK(send.process == "ship_it");
  CHECK(send.compensate == "unship");
  CHECK(send.on_exhausted == d::exhausted_action::fail);
  const auto& reply = std::get<d::wait_kind>(*w.def->kind("reply"));
  CHECK(reply.topics.at("order.ack") == "done");
  CHECK(reply.timeout_ms == 5000);
  CHECK(std::get<d::sleep_kind>(*w.def->kind("nap")).ms == 250);
  CHECK(std::get<d::fail_kind>(*w.def->kind("drop")).reason == "nothing to ship");
  CHECK(std::holds_alternative<d::end_kind>(*w.def->kind("done")));
  CHECK(std::get<d::branch_kind>(*w.def->kind("check")).conditions.at(0).op == d::condition_op::eq);
  CHECK(w.def->kind("nowhere") == nullptr);
  CHECK(d::kind_name(*w.def->kind("reply")) == "wait");

  pop::workflow_step map;
  map.name = "each";
  map.map.call = "child";
  map.map.over = "items";
  map.join = "any";
  const d::step_kind k = d::kind_of(map);
  REQUIRE(std::holds_alternative<d::fan_out_kind>(k));
  CHECK(std::get<d::fan_out_kind>(k).join == d::join_mode::any);
  CHECK(d::kind_name(k) == "map");
}

TEST_CASE("a branch transition reads the snapshot and moves the cursor", "[workflow]") {
  const world w(branchy);
  const json inputs = {{"order", "o1"}};
  const pop::dry_run_result paid =
      w.control(w.fixture({{"orders", {{"o1", {{"status", "paid"}}}}}}, "check", inputs),
                d::run_step_event{});
  CHECK(instance(paid).at("cursor") == "send");
  CHECK(instance(paid).at("status") == "running");
  CHECK(indexed(paid, "runnable"));
  CHECK(outcomes(paid) == std::vector<std::string>{"check: -> send"});
  CHECK(paid.messages.empty());

  const pop::dry_run_result open =
      w.control(w.fixture({{"orders", {{"o1", {{"status", "open"}}}}}}, "check", inputs),
                d::run_step_event{});
  CHECK(instance(open).at("cursor") == "drop");
  // It read the instance and the one path its condition names, nothing else.
  CHECK(open.reads == std::vector<std::string>{"domain.orders.o1.status", "system.workflows.i1"});
}

TEST_CASE("a wait transition waits, or takes a message kept in the mailbox", "[workflow]") {
  const world w(branchy);
  const json inputs = {{"order", "o1"}};
  const pop::dry_run_result waits =
      w.control(w.fixture(json::object(), "reply", inputs), d::run_step_event{});
  CHECK(instance(waits).at("status") == "waiting");
  CHECK(instance(waits).at("wait_deadline_us") == now + 5'000'000);
  CHECK(!indexed(waits, "runnable"));
  CHECK(waits.state.at("system").at("workflow_index").at("timers").at("i1") == now + 5'000'000);
  CHECK(waits.state.at("system").at("workflow_index").at("waits").at("o1").at("i1") ==
        json::array({"order.ack"}));

  json early = w.fixture(json::object(), "reply", inputs);
  early["system"]["workflow_index"]["mailbox"]["o1"]["m-1"] = {
      {"topic", "order.ack"}, {"payload", {{"ok", true}}}, {"at_us", now - 5}};
  const pop::dry_run_result taken = w.control(early, d::run_step_event{});
  CHECK(instance(taken).at("cursor") == "done");
  CHECK(instance(taken).at("status") == "running");
  CHECK(instance(taken).at("received").at("order.ack") == json{{"ok", true}});
  CHECK(!has(taken.state, "system.workflow_index.mailbox.o1"));
  CHECK(outcomes(taken) ==
        std::vector<std::string>{"reply: received order.ack (m-1) from the mailbox"});
}

TEST_CASE("a timer transition acts only once the time is up", "[workflow]") {
  const world w(branchy);
  const json inputs = {{"order", "o1"}};
  const pop::dry_run_result waiting =
      w.control(w.fixture(json::object(), "reply", inputs), d::run_step_event{});
  const json waiting_state = waiting.state;
  // Before the deadline nothing changes.
  const pop::dry_run_result early = w.control(waiting_state, d::timer_event{}, now + 4'999'999);
  CHECK(early.writes.empty());
  const pop::dry_run_result late = w.control(waiting_state, d::timer_event{}, now + 5'000'000);
  CHECK(instance(late).at("cursor") == "drop");
  CHECK(instance(late).at("status") == "running");
  CHECK(!instance(late).contains("wait_key"));
  CHECK(has(waiting_state, "system.workflow_index.waits.o1.i1"));
  CHECK(!has(late.state, "system.workflow_index.waits.o1.i1"));
  CHECK(indexed(late, "runnable"));
}

TEST_CASE("a process step's effects and the instance's move are one result", "[workflow]") {
  const world w(branchy);
  const json state = w.fixture({{"shipped", 0}}, "send", {{"order", "o1"}});
  const pop::dry_run_result r =
      w.step(state, "send", [](const pop::context& ctx, const json& args) {
        CHECK(args.at("_instance") == "i1");
        pop::result out;
        out.set("domain.shipped", ctx.get<int>("domain.shipped") + 1);
        out.emit("order.shipped", {{"order", args.at("order")}}, "o1");
        return out;
      });
  CHECK(r.state.at("domain").at("shipped") == 1);
  REQUIRE(r.messages.size() == 1);
  CHECK(r.messages[0].topic == "order.shipped");
  // Moved on, and the wait after it entered in the same result.
  CHECK(instance(r).at("cursor") == "reply");
  CHECK(instance(r).at("status") == "waiting");
  CHECK(instance(r).at("done") == json::array({"send"}));
  CHECK(outcomes(r) == std::vector<std::string>{"send: ok", "reply: waiting"});
  // A step call for a step the instance is not at changes nothing.
  const pop::dry_run_result other =
      w.step(state, "nap", [](const pop::context&, const json&) { return pop::result{}; });
  CHECK(other.writes.empty());
}

TEST_CASE("a failing process step drops its writes and waits for its retry", "[workflow]") {
  const world w(branchy);
  const json state = w.fixture({{"shipped", 0}}, "send", {{"order", "o1"}});
  const auto failing = [](const pop::context&, const json&) -> absl::StatusOr<pop::result> {
    return absl::UnavailableError("carrier down");
  };
  const pop::dry_run_result r = w.step(state, "send", failing);
  CHECK(r.state.at("domain").at("shipped") == 0);
  CHECK(r.messages.empty());
  CHECK(instance(r).at("status") == "waiting");
  CHECK(instance(r).at("retry") == json{{"step", "send"}, {"attempt", 2}});
  const std::int64_t at = instance(r).at("retry_at_us").get<std::int64_t>();
  CHECK(at >= now + 90'000);
  CHECK(at <= now + 110'000);
  CHECK(r.state.at("system").at("workflow_index").at("timers").at("i1") == at);
  // A function of its inputs: the same state and event decide the same (the jitter included).
  CHECK(w.step(state, "send", failing).writes == r.writes);
  // Its retry time up, the timer makes it runnable again, at attempt 2.
  const pop::dry_run_result again = w.control(r.state, d::timer_event{}, at);
  CHECK(instance(again).at("status") == "running");
  CHECK(indexed(again, "runnable"));
  CHECK(outcomes(again).back() == "send: retrying: attempt 2");
}

TEST_CASE("a step that failed outside its transaction takes the failure path", "[workflow]") {
  const world w({{"name", "one"},
                 {"start", "go"},
                 {"steps",
                  {{"go", {{"process", "p"}, {"next", "done"}, {"on_error", "sorry"}}},
                   {"sorry", {{"end", true}}},
                   {"done", {{"end", true}}}}}});
  const json state = w.fixture(json::object(), "go");
  const pop::dry_run_result r = w.control(
      state, d::step_failed_event{"go", absl::StatusCode::kInternal, "threw: boom", false});
  CHECK(instance(r).at("cursor") == "sorry");
  CHECK(outcomes(r) == std::vector<std::string>{"go: error: threw: boom"});
  // An event for another step than the cursor's is stale: nothing changes.
  CHECK(w.control(state, d::step_failed_event{"sorry", absl::StatusCode::kInternal, "x", false})
            .writes.empty());
}

TEST_CASE("a cancel transition fails the instance; compensations run first", "[workflow]") {
  const world w(branchy);
  json state = w.fixture(json::object(), "reply", {{"order", "o1"}});
  const pop::dry_run_result plain = w.control(state, d::cancel_event{"customer asked"});
  CHECK(instance(plain).at("status") == "cancelled");
  CHECK(instance(plain).at("error") == "customer asked");
  CHECK(plain.state.at("system").at("workflow_index").at("ended").at("i1") == now);

  state["system"]["workflows"]["i1"]["done"] = json::array({"send"});
  const pop::dry_run_result undo = w.control(state, d::cancel_event{"customer asked"});
  CHECK(instance(undo).at("status") == "compensating");
  CHECK(indexed(undo, "runnable"));
}

TEST_CASE("the events' codecs round-trip and name what is wrong", "[workflow]") {
  const std::vector<d::control_call> calls = {
      {"a", 1, d::run_step_event{}},
      {"b", 2, d::step_failed_event{"s", absl::StatusCode::kDataLoss, "e", true}},
      {"c", 3, d::timer_event{}},
      {"d", 4, d::cancel_event{"why"}},
  };
  for (const d::control_call& c : calls) {
    const d::control_call back = d::control_call_from(d::to_args(c)).value();
    CHECK(back.id == c.id);
    CHECK(back.now == c.now);
    CHECK(back.event.index() == c.event.index());
    CHECK(d::to_args(back) == d::to_args(c));
  }
  // The migration's: the new version's steps by kind, typed both ways.
  d::migrate_call m{.workflow = "ship",
                    .to = "v2",
                    .from = "v1",
                    .steps = {{"old", "new"}},
                    .ids = {"i1", "i2"},
                    .now = 7};
  m.target["new"] = {d::kind_id::wait, false, {"order.ack"}, "order", 500};
  m.target["pay"] = {d::kind_id::process, true, {}, "", 0};
  const d::migrate_call mb = d::migrate_call_from(d::to_args(m)).value();
  CHECK(mb.target.at("new").kind == d::kind_id::wait);
  CHECK(mb.target.at("new").topics == std::vector<std::string>{"order.ack"});
  CHECK(mb.target.at("pay").compensate);
  CHECK(mb.steps == m.steps);
  CHECK(mb.ids == m.ids);
  CHECK(d::to_args(mb) == d::to_args(m));
  json odd_kind = d::to_args(m);
  odd_kind["target"]["new"]["kind"] = "teleport";
  CHECK(d::migrate_call_from(odd_kind).status().code() == absl::StatusCode::kInvalidArgument);
  json dotted = d::to_args(m);
  dotted["ids"] = {"a.b"};
  CHECK(d::migrate_call_from(dotted).status().code() == absl::StatusCode::kInvalidArgument);

  const auto failed =
      std::get<d::step_failed_event>(d::control_call_from(d::to_args(calls[1])).value().event);
  CHECK(failed.code == absl::StatusCode::kDataLoss);
  CHECK(failed.compensation);

  const std::vector<d::operator_call> ops = {
      {"a", 1, d::park_action{"running", "r", d::park_kind::by_operator}},
      {"b", 2, d::resume_action{d::park_kind::undefined, "by"}},
      {"c", 3, d::restart_action{"s", "v2"}},
      {"d", 4, d::cancel_action{"why"}},
  };
  for (const d::operator_call& c : ops) {
    CHECK(d::to_args(d::operator_call_from(d::to_args(c)).value()) == d::to_args(c));
  }
  const d::step_call s{"i", 5, "send", true};
  CHECK(d::to_args(d::step_call_from(d::to_args(s)).value()) == d::to_args(s));

  const d::start_call start{"s1", 6, "ship", "v1", "check", {{"order", "o1"}}, 99, false};
  const d::start_call start_back = d::start_call_from(d::to_args(start)).value();
  CHECK(d::to_args(start_back) == d::to_args(start));
  CHECK(start_back.deadline_us == 99);
  CHECK(!start_back.idempotent);
  // An id that is not one path segment would nest one instance in another: refused.
  const absl::StatusOr<d::start_call> nested =
      d::start_call_from(d::to_args(d::start_call{"a.b", 1, "ship", "v1", "check"}));
  CHECK(nested.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(absl::StrContains(nested.status().message(), "'id'"));
  CHECK(d::control_call_from({{"id", "a.b"}, {"now", 1}, {"action", "step"}}).status().code() ==
        absl::StatusCode::kInvalidArgument);

  const absl::StatusOr<d::control_call> unknown =
      d::control_call_from({{"id", "i"}, {"now", 1}, {"action", "dance"}});
  CHECK(unknown.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(absl::StrContains(unknown.status().message(), "'dance'"));
  const absl::StatusOr<d::control_call> no_id = d::control_call_from({{"now", 1}});
  CHECK(absl::StrContains(no_id.status().message(), "'id'"));
  const absl::StatusOr<d::step_call> bad_now =
      d::step_call_from({{"id", "i"}, {"now", "soon"}, {"step", "s"}});
  CHECK(absl::StrContains(bad_now.status().message(), "'now'"));
}

namespace {

// A stored instance record with every field this program knows set.
json record_with_every_field() {
  return {{"workflow", "ship"},
          {"definition", {{"name", "ship"}, {"version", "v1"}}},
          {"status", "paused_by_v9"},  // a status a newer program wrote
          {"cursor", "reply"},
          {"inputs", {{"order", "o1"}, {"n", 3}}},
          {"received", {{"order.ack", {{"ok", true}}}}},
          {"visits", {{"check", 1}, {"reply", 2}}},
          {"calls", {{"call", 4}}},
          {"done", {"send"}},
          {"error", "earlier"},
          {"started_at_us", 5},
          {"deadline_us", 6},
          {"wait_deadline_us", 7},
          {"sleep_until_us", 8},
          {"retry_at_us", 9},
          {"ended_at_us", 10},
          {"history_next", 11},
          {"history_base", 2},
          {"run", 1},
          {"parent", "p"},
          {"parent_step", "fan"},
          {"child", "c"},
          {"parent_step_of_child", "call"},
          {"wait_key", "o1"},
          {"stuck",
           {{"status", "waiting"},
            {"reason", "why"},
            {"kind", "operator"},
            {"at_us", 12},
            {"resumable", false}}},
          {"retry", {{"step", "send"}, {"attempt", 3}, {"compensation", true}}},
          {"cancelled", {{"reason", "asked"}, {"at_us", 13}}},
          {"fan_out",
           {{"kind", "map"},
            {"step", "fan"},
            {"base", "i1-fan-1"},
            {"children", {{"i1-fan-1-0", "completed"}, {"i1-fan-1-1", "running"}}},
            {"next", 2},
            {"total", 5}}}};
}

}  // namespace

TEST_CASE("the instance record has one codec: every field round-trips, unknown members are kept",
          "[workflow]") {
  json stored = record_with_every_field();
  stored["history"] = json::array({{{"step", "old"}, {"outcome", "ok"}, {"at_us", 1}}});
  stored["added_by_v9"] = {{"anything", json::array({1, "two"})}};
  const d::instance_record r = d::instance_record::from_json(stored);
  CHECK(r.status == d::instance_status::unknown);
  CHECK(r.status_name() == "paused_by_v9");
  CHECK(r.stuck->status == "waiting");
  CHECK(r.stuck->kind == d::park_kind::by_operator);
  CHECK(!r.stuck->resumable);
  CHECK(r.retry->attempt == 3);
  CHECK(r.fan_out->children.at("i1-fan-1-0") == d::instance_status::completed);
  CHECK(r.wait_key == "o1");
  CHECK(r.extra == json{{"added_by_v9", {{"anything", json::array({1, "two"})}}}});
  CHECK(r.to_json() == stored);
  CHECK(d::instance_record(r).to_json() == stored);  // the moving form too

  // Read straight from the stored value, member by member, it is the same record (this one is
  // too large to be packed; the transitions above read packed ones).
  const pop::process_spec spec{.name = "read", .inputs = {"system"}, .outputs = {"domain"}};
  const absl::StatusOr<pop::dry_run_result> read = pop::dry_run(
      spec,
      [&](const pop::context& ctx, const json&) {
        CHECK(d::instance_record::from_view(ctx.view("system.workflows.i1")) == r);
        return pop::result{};
      },
      json{{"system", {{"workflows", {{"i1", stored}}}}}}, json::object());
  INFO(read.status());
  REQUIRE(read.ok());

  // A reason for parking this program does not know is kept by name, as a status is.
  json future = stored;
  future["stuck"]["kind"] = "quarantined_by_v9";
  const d::instance_record f = d::instance_record::from_json(future);
  CHECK(f.stuck->kind == d::park_kind::unknown);
  CHECK(!d::for_lack_of_definition(f.stuck->kind));
  CHECK(f.to_json() == future);

  // Optional members are absent when unset; members of the wrong type read as absent.
  const json minimal = d::instance_record().to_json();
  CHECK(!minimal.contains("wait_key"));
  CHECK(!minimal.contains("stuck"));
  CHECK(!minimal.contains("history"));
  const d::instance_record odd =
      d::instance_record::from_json({{"visits", "many"}, {"wait_key", 3}, {"cursor", "x"}});
  CHECK(odd.visits.empty());
  CHECK(!odd.wait_key);
  CHECK(odd.cursor == "x");
}

TEST_CASE("a record's packed form is exactly its JSON form packed", "[workflow]") {
  // Every field set (with unknown status and park kind, inputs of every JSON kind), some unset,
  // and the empty record. (Unknown members and a legacy history are written through JSON.)
  json full = record_with_every_field();
  full["inputs"] = {
      {"order", "o1"}, {"n", -3}, {"f", 1.5}, {"deep", {{"a", json::array({1, -2})}}}};
  full["received"]["order.ack"]["none"] = nullptr;
  full["visits"]["reply"] = 2000000;
  full["started_at_us"] = 1733356800000000;
  full["stuck"]["kind"] = "quarantined_by_v9";
  json some = full;
  for (const char* key : {"calls", "cancelled", "child", "stuck", "retry", "fan_out", "run"}) {
    some.erase(key);
  }
  some["status"] = "running";
  some["retry"] = {{"step", "send"}, {"attempt", 1}};  // without "compensation"
  for (const json& stored : {full, some, d::instance_record().to_json()}) {
    const d::instance_record r = d::instance_record::from_json(stored);
    const std::optional<std::string> bytes = r.to_packed();
    REQUIRE(bytes);
    std::string want;
    REQUIRE(d::packed::encode(r.to_json(), want));
    CHECK(*bytes == want);
    CHECK(d::packed::decode(bytes->data()) == r.to_json());
  }
  // Records this does not write in packed form: with unknown members or a legacy history.
  json legacy = full;
  legacy["history"] = json::array();
  CHECK_FALSE(d::instance_record::from_json(legacy).to_packed());
  json newer = full;
  newer["added_by_v9"] = 1;
  CHECK_FALSE(d::instance_record::from_json(newer).to_packed());
}

TEST_CASE("a member a newer program added to a record survives a step of this one", "[workflow]") {
  const world w(branchy);
  json state = w.fixture({{"orders", {{"o1", {{"status", "paid"}}}}}}, "check", {{"order", "o1"}});
  state["system"]["workflows"]["i1"]["added_by_v9"] = {{"keep", "me"}};
  const pop::dry_run_result r = w.control(state, d::run_step_event{});
  CHECK(instance(r).at("cursor") == "send");
  CHECK(instance(r).at("added_by_v9") == json{{"keep", "me"}});
}
