// Tests of pop::engine: compare_and_swap, the outbox forms, commit notifications, the audit log and
// dry runs.
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"
#include "tests/support/processes.hpp"
#include "tests/support/temp_dir.hpp"

#include <atomic>
#include <thread>

#include "pop/engine/dry_run.hpp"
#include "pop/engine/engine.hpp"

using pop::json;
using pop::test::register_setter;

TEST_CASE("compare_and_swap commits only at the expected version, or when its keys are untouched",
          "[engine]") {
  pop::engine e;
  auto first = e.compare_and_swap(0, {{"domain.a", 1}, {"domain.b", 1}});
  REQUIRE(first.ok());
  CHECK(first->committed);
  CHECK(first->version == 1);

  auto stale = e.compare_and_swap(0, {{"domain.a", 2}});
  REQUIRE(stale.ok());
  CHECK_FALSE(stale->committed);
  CHECK(stale->version == 1);
  CHECK(e.snapshot().read("domain.a").value() == 1);

  auto ahead = e.compare_and_swap(7, {{"domain.a", 2}});
  CHECK(ahead.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(ahead.status().message()).find("7") != std::string::npos);

  // Key-level: domain.c was not written since version 0, so a stale expected version is fine.
  auto keyed = e.compare_and_swap(0, {{"domain.c", 3}}, pop::cas_mode::keys);
  REQUIRE(keyed.ok());
  CHECK(keyed->committed);
  CHECK(keyed->version == 2);
  auto keyed_conflict = e.compare_and_swap(0, {{"domain.a.deep", 3}}, pop::cas_mode::keys);
  REQUIRE(keyed_conflict.ok());
  CHECK_FALSE(keyed_conflict->committed);
  CHECK(keyed_conflict->version == 2);

  auto deleted = e.compare_and_swap(2, {{"domain.b", std::nullopt}});
  REQUIRE(deleted.ok());
  CHECK(deleted->committed);
  CHECK(e.snapshot().to_json() == json{{"domain", {{"a", 1}, {"c", 3}}}});

  CHECK(e.compare_and_swap(3, {}).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(e.compare_and_swap(3, {{"domain.ok", 1}, {"bad..path", 1}}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(e.compare_and_swap(3, {{"domain", 1}}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(e.version() == 3);
}

TEST_CASE("outbox appends commute with each other and with clearing by id", "[engine]") {
  pop::engine e;
  const auto producer = [&e](std::string topic, bool nested) {
    return [topic, nested, &e](const pop::context&, const json&) {
      if (nested) {
        // A second producer commits while this one runs, and a relay clears its message by id.
        const auto other = e.execute("p2");
        REQUIRE(other.ok());
        const auto cleared = e.compare_and_swap(
            other->version, {{"domain.outbox_queue." + other->message_ids[0], std::nullopt}},
            pop::cas_mode::keys);
        REQUIRE(cleared.ok());
        REQUIRE(cleared->committed);
      }
      pop::result r;
      r.emit(topic, {{"from", topic}});
      return r;
    };
  };
  REQUIRE(e.register_process({.name = "p2", .emits = {"two"}}, producer("two", false)).ok());
  REQUIRE(e.register_process({.name = "p1", .emits = {"one"}}, producer("one", true)).ok());
  const auto done = e.execute("p1");
  REQUIRE(done.ok());
  CHECK(done->attempts == 1);
  CHECK(done->version == 3);
  const auto pending = e.snapshot().pending_messages().value();
  REQUIRE(pending.size() == 1);
  CHECK(pending[0].topic == "one");
}

TEST_CASE("clear_messages removes what is stored as seen and leaves changed, removed and new ones",
          "[engine]") {
  pop::test::temp_dir dir;
  const std::string journal = dir.file("clear.db");
  const auto pending_ids = [](const pop::snapshot& snap) {
    std::vector<std::string> out;
    for (const pop::outbox_message& m : pop::test::must(snap.pending_messages())) {
      out.push_back(m.id);
    }
    return out;
  };
  std::vector<std::string> ids;
  {
    auto e = pop::test::must(pop::engine::open(pop::options{.journal = journal}));
    REQUIRE(e->register_process({.name = "emit", .emits = {"t"}}, [](const pop::context&,
                                                                     const json& args) {
               pop::result r;
               r.emit("t", args, "k");
               return r;
             }).ok());
    for (int i = 0; i < 5; ++i)
      ids.push_back(pop::test::must(e->execute("emit", i)).message_ids[0]);
    const pop::snapshot seen = e->snapshot();
    const std::string outbox = "domain.outbox_queue.";
    // After `seen`: message 1 is rewritten (a retry's record), message 2 removed, one appended.
    json changed = seen.read(outbox + ids[1]).value();
    changed["attempts"] = 1;
    REQUIRE(
        pop::test::must(e->compare_and_swap(e->version(), {{outbox + ids[1], changed}})).committed);
    REQUIRE(pop::test::must(e->compare_and_swap(e->version(), {{outbox + ids[2], std::nullopt}}))
                .committed);
    const std::string appended = pop::test::must(e->execute("emit", 9)).message_ids[0];
    const std::uint64_t before = e->version();

    // Bad calls change nothing.
    CHECK(e->clear_messages(seen, {}).status().code() == absl::StatusCode::kInvalidArgument);
    const std::vector<std::string> bad{ids[0], "not.an.id"};
    const absl::Status bad_id = e->clear_messages(seen, bad).status();
    CHECK(bad_id.code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(bad_id.message()).find("not.an.id") != std::string::npos);
    pop::engine other;
    const std::vector<std::string> one{ids[0]};
    CHECK(e->clear_messages(other.snapshot(), one).status().code() ==
          absl::StatusCode::kInvalidArgument);
    CHECK(e->version() == before);
    CHECK(e->snapshot().pending_count() == 5);

    // Ids 0, 3 and 4 are as seen; 1 changed, 2 is gone, an unknown id and a repeat are skipped.
    const std::vector<std::string> clear{
        ids[0], ids[1], ids[2], ids[3], ids[4], ids[3], pop::make_message_id(999, 0)};
    const pop::clear_result r = pop::test::must(e->clear_messages(seen, clear));
    CHECK(r.removed == 3);
    CHECK(r.version == before + 1);
    CHECK(pending_ids(e->snapshot()) == std::vector<std::string>{ids[1], appended});

    // Nothing left to remove: no commit.
    const pop::clear_result again = pop::test::must(e->clear_messages(seen, clear));
    CHECK(again.removed == 0);
    CHECK(again.version == before + 1);
    CHECK(e->version() == before + 1);
  }
  // The removal is journaled like any commit.
  auto reopened = pop::test::must(pop::engine::open(pop::options{.journal = journal}));
  const std::vector<std::string> left = pending_ids(reopened->snapshot());
  CHECK(left.size() == 2);
  CHECK(left[0] == ids[1]);
  // The same by views, in any order.
  const std::vector<std::string_view> views{left[1], left[0]};
  const pop::clear_result r =
      pop::test::must(reopened->clear_message_views(reopened->snapshot(), views));
  CHECK(r.removed == 2);
  CHECK(reopened->snapshot().pending_count() == 0);
}

TEST_CASE("the seed-style form returns a whole new queue and is diffed into appends and removals",
          "[engine]") {
  pop::engine e;
  REQUIRE(e.register_process({.name = "emit", .emits = {"t"}}, [](const pop::context&,
                                                                  const json& args) {
             pop::result r;
             r.emit("t", args);
             return r;
           }).ok());
  for (int i = 0; i < 3; ++i) REQUIRE(e.execute("emit", {{"n", i}}).ok());
  REQUIRE(
      e.register_process({.name = "rewrite",
                          .inputs = {"domain.outbox_queue"},
                          .outputs = {"domain.outbox_queue"},
                          .emits = {"t"}},
                         [](const pop::context& ctx, const json&) {
                           json queue = json::array();
                           const json current = ctx.get("domain.outbox_queue");
                           for (const auto& [id, m] : current.items()) {
                             if (m["payload"]["n"] != 0) queue.push_back(m);  // drop n == 0
                           }
                           queue.push_back({{"topic", "t"}, {"payload", {{"n", 3}}}, {"key", "k"}});
                           pop::result r;
                           r.set("domain.outbox_queue", queue);
                           return r;
                         })
          .ok());
  const auto done = e.execute("rewrite");
  REQUIRE(done.ok());
  REQUIRE(done->message_ids.size() == 1);
  const auto pending = e.snapshot().pending_messages().value();
  REQUIRE(pending.size() == 3);
  CHECK(pending[0].payload == json{{"n", 1}});
  CHECK(pending[1].payload == json{{"n", 2}});
  CHECK(pending[2].payload == json{{"n", 3}});
  CHECK(pending[2].key == "k");
  CHECK(pending[2].id == done->message_ids[0]);
}

TEST_CASE("commit notifications report every commit until the subscription ends", "[engine]") {
  pop::engine e;
  register_setter(e, "set", "domain.x");
  std::vector<std::uint64_t> seen;
  pop::subscription sub = e.on_commit([&](std::uint64_t v) { seen.push_back(v); });
  REQUIRE(e.execute("set", {{"value", 1}}).ok());
  REQUIRE(e.compare_and_swap(1, {{"domain.y", 2}}).ok());
  CHECK(seen == std::vector<std::uint64_t>{1, 2});
  sub.reset();
  REQUIRE(e.execute("set", {{"value", 3}}).ok());
  CHECK(seen.size() == 2);
}

TEST_CASE("the audit log records reads, writes, messages and outcome, and stays bounded",
          "[engine]") {
  auto e_owner = pop::test::must(pop::engine::open(
      pop::options{.initial_state = {{"domain", {{"x", 1}}}}, .audit_capacity = 3}));
  pop::engine& e = *e_owner;
  REQUIRE(e.register_process(
               {.name = "p", .inputs = {"domain.x"}, .outputs = {"domain.y"}, .emits = {"t"}},
               [](const pop::context& ctx, const json&) {
                 pop::result r;
                 r.set("domain.y", ctx.get<int>("domain.x"));
                 r.emit("t", 1);
                 return r;
               })
              .ok());
  for (int i = 0; i < 5; ++i) REQUIRE(e.execute("p").ok());
  const auto records = e.audit();
  REQUIRE(records.size() == 3);
  CHECK(records.back().sequence == 5);
  CHECK(records.back().reads == std::vector<std::string>{"domain.x"});
  CHECK(records.back().writes == std::vector<std::string>{"domain.y"});
  CHECK(records.back().topics == std::vector<std::string>{"t"});
  CHECK(records.back().message_ids == std::vector<std::string>{pop::make_message_id(5, 0)});
  CHECK(records.back().commit_version == 5);
  CHECK(records.back().snapshot_version == 4);
  CHECK(e.audit({.after_sequence = 4}).size() == 1);
  CHECK(e.audit({.limit = 2}).front().sequence == 4);
}

TEST_CASE("a process is tested against a fixture with no engine and nothing mocked",
          "[engine][dry_run]") {
  const pop::process_spec spec{.name = "reserve",
                               .inputs = {"domain.inventory"},
                               .outputs = {"domain.inventory"},
                               .emits = {"stock.reserved"}};
  const pop::process_fn reserve = [](const pop::context& ctx, const json& args) {
    const std::string p = "domain.inventory." + args.at("sku").get<std::string>();
    pop::result r;
    r.set(p, ctx.get<int>(p) - 1);
    r.emit("stock.reserved", args, args.at("sku"));
    return r;
  };
  const json fixture = {{"domain", {{"inventory", {{"A1", 3}, {"B2", 1}}}}}};
  const auto run = pop::dry_run(spec, reserve, fixture, {{"sku", "A1"}}, {.version = 41});
  REQUIRE(run.ok());
  CHECK(run->writes == std::vector<pop::write>{{"domain.inventory.A1", json(2)}});
  REQUIRE(run->messages.size() == 1);
  CHECK(run->messages[0].id == pop::make_message_id(42, 0));
  CHECK(run->messages[0].key == "A1");
  CHECK(run->reads == std::vector<std::string>{"domain.inventory.A1"});
  CHECK(run->state["domain"]["inventory"] == json{{"A1", 2}, {"B2", 1}});

  const auto denied =
      pop::dry_run({.name = "x", .inputs = {"domain.other"}, .outputs = {"domain.inventory"}},
                   reserve, fixture, {{"sku", "A1"}});
  CHECK(denied.status().code() == absl::StatusCode::kPermissionDenied);

  pop::engine e;
  REQUIRE(e.register_process(spec, reserve).ok());
  const auto via_engine = e.dry_run("reserve", fixture, {{"sku", "B2"}});
  REQUIRE(via_engine.ok());
  CHECK(via_engine->writes == std::vector<pop::write>{{"domain.inventory.B2", json(0)}});
  CHECK(e.version() == 0);

  // A run's state is a fixture for the next: its message's id is of a later version than the
  // given one, which the next run takes as the fixture's, so the ids never collide.
  const auto next = pop::dry_run(spec, reserve, run->state, {{"sku", "A1"}}, {.version = 5});
  REQUIRE(next.ok());
  REQUIRE(next->messages.size() == 1);
  CHECK(next->messages[0].id == pop::make_message_id(43, 0));
  CHECK(next->state["domain"]["outbox_queue"].size() == 2);
}

TEST_CASE("outbox_rewritten_at moves only when a commit writes a value into the outbox",
          "[engine]") {
  pop::engine e;
  REQUIRE(e.register_process({.name = "emit", .outputs = {"domain.n"}, .emits = {"t"}},
                             [](const pop::context&, const json&) {
                               pop::result r;
                               r.set("domain.n", 1);
                               r.emit("t", json{{"a", 1}}, "k");
                               return r;
                             })
              .ok());
  const auto rewritten_at = [&] { return e.snapshot().outbox_rewritten_at(); };
  const std::string outbox = e.outbox_path().str();
  CHECK(rewritten_at() == 0);
  const pop::commit first = pop::test::must(e.execute("emit", json::object()));
  pop::test::must(e.execute("emit", json::object()));
  CHECK(rewritten_at() == 0);  // appends
  pop::test::must(e.compare_and_swap(e.version(), {{"domain.other", 1}}));
  CHECK(rewritten_at() == 0);  // elsewhere
  const std::vector<std::string> ids = {first.message_ids.at(0)};
  CHECK(pop::test::must(e.clear_messages(e.snapshot(), ids)).removed == 1);
  CHECK(rewritten_at() == 0);  // removals
  pop::outbox_message m = e.snapshot().pending_messages().value().at(0);
  m.payload = 2;
  const pop::cas_result rewrite = pop::test::must(
      e.compare_and_swap(e.version(), {{outbox + "." + m.id, m.to_json()}}, pop::cas_mode::keys));
  REQUIRE(rewrite.committed);
  CHECK(rewritten_at() == rewrite.version);
  pop::test::must(e.execute("emit", json::object()));
  pop::test::must(e.compare_and_swap(e.version(), {{outbox + "." + m.id, std::nullopt}}));
  CHECK(rewritten_at() == rewrite.version);  // kept by later appends and removals
  m.id = pop::make_message_id(2, 5);         // an old version's id, as a requeue writes back
  const pop::cas_result inserted = pop::test::must(
      e.compare_and_swap(e.version(), {{outbox + "." + m.id, m.to_json()}}, pop::cas_mode::keys));
  CHECK(rewritten_at() == inserted.version);  // an entry inserted by hand
  // A failed commit changes nothing.
  CHECK_FALSE(e.compare_and_swap(e.version(), {{outbox + ".x-2", json()}}).ok());
  CHECK(rewritten_at() == inserted.version);
}

TEST_CASE("an outbox entry written by hand with an id of a version to come is refused",
          "[engine]") {
  // Ids of the committing version and later are given to emitted messages: an entry written
  // under one would be replaced by a later commit's message.
  pop::engine e;
  const std::string outbox = e.outbox_path().str();
  pop::outbox_message m;
  m.topic = "t";
  m.payload = 1;
  pop::test::must(e.compare_and_swap(0, {{"domain.a", 1}}));
  const std::uint64_t before = e.version();  // 1
  for (const std::uint64_t v : {before + 1, before + 5}) {
    m.id = pop::make_message_id(v, 0);
    const auto r = e.compare_and_swap(before, {{outbox + "." + m.id, m.to_json()}});
    CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(r.status().message()),
               Catch::Contains(m.id) && Catch::Contains("version " + std::to_string(v)));
    CHECK(e.version() == before);
    CHECK(e.snapshot().pending_count() == 0);
  }
  m.id = pop::make_message_id(before, 3);  // of a version already committed: fine
  CHECK(
      pop::test::must(e.compare_and_swap(before, {{outbox + "." + m.id, m.to_json()}})).committed);

  // options.initial_state likewise (the state is version 0).
  m.id = pop::make_message_id(1, 0);
  const auto opened =
      pop::engine::open({.initial_state = {{"domain", {{"outbox_queue", {{m.id, m.to_json()}}}}}}});
  CHECK(opened.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(opened.status().message()), Catch::Contains(m.id));
  m.id = pop::make_message_id(0, 4);
  CHECK(
      pop::engine::open({.initial_state = {{"domain", {{"outbox_queue", {{m.id, m.to_json()}}}}}}})
          .ok());
}

TEST_CASE("message_into decodes a stored message over one reused, leaving nothing of the last",
          "[engine]") {
  pop::engine e;
  REQUIRE(
      e.register_process({.name = "emit", .emits = {"t", "u"}}, [](const pop::context&,
                                                                   const json& args) {
         pop::result r;
         if (args.at("n") == 1) {
           r.emit("t", json{{"a", json::array({1, 2})}}, "key-one", {{"h", "v"}, {"trace", "x"}});
         } else {
           r.emit("u", 7);
         }
         return r;
       }).ok());
  pop::test::must(e.execute("emit", {{"n", 1}}));
  pop::test::must(e.execute("emit", {{"n", 2}}));
  const pop::snapshot s = e.snapshot();
  std::vector<pop::outbox_message> expected = s.pending_messages().value();
  REQUIRE(expected.size() == 2);
  pop::outbox_message into;
  into.last_error = "left from before";
  into.failures.push_back({.at_us = 1, .error = "old"});
  std::size_t i = 0;
  s.view(s.outbox_path()).for_each_member([&](std::string_view id, const pop::value_view& v) {
    REQUIRE(v.message_into(into));
    CHECK(into == expected.at(i++));
    CHECK(into.id == id);
    return true;
  });
  CHECK(i == 2);
  // A value that is not a typed message leaves `into` as it was.
  CHECK_FALSE(s.root().message_into(into));
  CHECK(into == expected.at(1));
}
