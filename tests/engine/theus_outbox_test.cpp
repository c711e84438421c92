// Tests of the list-shaped outbox forms of the Theus chapters: seeding the queue as [], producers
// returning the new queue, clears by process or by compare_and_swap in both modes, free-form
// messages; and a property test that no interleaving loses, resurrects or breaks anything.
#include <rapidcheck/catch.h>
#include <catch2/catch.hpp>

#include <future>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "pop/engine/dry_run.hpp"
#include "pop/engine/engine.hpp"
#include "tests/support/must.hpp"

using pop::json;
using pop::test::must;

namespace {

const json theus_seed = {{"domain", {{"outbox_queue", json::array()}, {"users", json::object()}}}};

// Chapter 25's producer: reads the queue, appends a free-form message, returns the new queue.
absl::StatusOr<pop::result> register_user(const pop::context& ctx, const json& args) {
  json queue = ctx.get<json>("domain.outbox_queue");
  json list = json::array();
  for (auto& [id, m] : queue.items()) list.push_back(m);
  list.push_back({{"topic", "SEND_EMAIL"},
                  {"to", args.at("email")},
                  {"body", "Welcome, " + args.at("name").get<std::string>()}});
  pop::result r;
  r.set("domain.users." + args.at("name").get<std::string>(), args.at("email"));
  r.set("domain.outbox_queue", std::move(list));
  return r;
}

const pop::process_spec register_user_spec{.name = "register_user",
                                           .inputs = {"domain.outbox_queue"},
                                           .outputs = {"domain.users", "domain.outbox_queue"},
                                           .emits = {"SEND_EMAIL"}};

// A clear through a process: returns [] (every message of the snapshot it ran on is removed).
const pop::process_spec clear_spec{
    .name = "clear", .inputs = {"domain.outbox_queue"}, .outputs = {"domain.outbox_queue"}};
absl::StatusOr<pop::result> clear_all(const pop::context&, const json&) {
  pop::result r;
  r.set("domain.outbox_queue", json::array());
  return r;
}

std::set<std::string> pending_ids(const pop::snapshot& s) {
  std::set<std::string> out;
  const auto messages = s.pending_messages();
  REQUIRE(messages.ok());
  for (const pop::outbox_message& m : *messages) out.insert(m.id);
  return out;
}

std::unique_ptr<pop::engine> theus_engine() {
  auto e = must(pop::engine::open({.initial_state = theus_seed}));
  REQUIRE(e->register_process(register_user_spec, register_user).ok());
  REQUIRE(e->register_process(clear_spec, clear_all).ok());
  REQUIRE(e->register_process({.name = "emit", .emits = {"SEND_EMAIL"}}, [](const pop::context&,
                                                                            const json& args) {
             pop::result r;
             r.emit("SEND_EMAIL", args);
             return r;
           }).ok());
  return e;
}

}  // namespace

TEST_CASE("a free-form list entry becomes a message whose payload is its other fields", "[theus]") {
  auto e = theus_engine();
  REQUIRE(e->execute("register_user", {{"name", "ann"}, {"email", "ann@x"}}).ok());
  const auto messages = e->snapshot().pending_messages().value();
  REQUIRE(messages.size() == 1);
  CHECK(messages[0].topic == "SEND_EMAIL");
  CHECK(messages[0].payload == json{{"to", "ann@x"}, {"body", "Welcome, ann"}});
  // A second producer keeps the first message (its entry has an id) and appends its own.
  REQUIRE(e->execute("register_user", {{"name", "bob"}, {"email", "bob@x"}}).ok());
  CHECK(e->snapshot().pending_count() == 2);
}

TEST_CASE("the chapters' unit tests check the returned list with dry_run, no mocks", "[theus]") {
  const pop::dry_run_result run = must(pop::dry_run(register_user_spec, register_user, theus_seed,
                                                    {{"name", "cy"}, {"email", "cy@x"}}, {}));
  REQUIRE(run.messages.size() == 1);
  CHECK(run.messages[0].topic == "SEND_EMAIL");
  CHECK(run.messages[0].payload.at("to") == "cy@x");
  CHECK(run.state.at("domain").at("users").at("cy") == "cy@x");
  const pop::dry_run_result cleared =
      must(pop::dry_run(clear_spec, clear_all, run.state, json::object(), {}));
  CHECK(cleared.state.at("domain").at("outbox_queue").empty());
}

TEST_CASE(
    "clearing with compare_and_swap of [] removes what was pending and keeps the outbox usable",
    "[theus]") {
  auto e = theus_engine();
  REQUIRE(e->execute("emit", {{"n", 1}}).ok());
  REQUIRE(e->execute("emit", {{"n", 2}}).ok());
  const std::uint64_t seen = e->version();
  SECTION("strict") {
    const auto r = must(
        e->compare_and_swap(seen, {{"domain.outbox_queue", json::array()}}, pop::cas_mode::strict));
    CHECK(r.committed);
    CHECK(e->snapshot().pending_count() == 0);
    // A strict clear based on an older version loses the race and writes nothing.
    REQUIRE(e->execute("emit", {{"n", 3}}).ok());
    const auto late = must(
        e->compare_and_swap(seen, {{"domain.outbox_queue", json::array()}}, pop::cas_mode::strict));
    CHECK(!late.committed);
    CHECK(e->snapshot().pending_count() == 1);
  }
  SECTION("keys: messages committed after the version it saw are kept") {
    REQUIRE(e->execute("emit", {{"n", 3}}).ok());
    const std::string newer = e->snapshot().pending_messages().value().back().id;
    const auto r = must(
        e->compare_and_swap(seen, {{"domain.outbox_queue", json::array()}}, pop::cas_mode::keys));
    CHECK(r.committed);
    CHECK(pending_ids(e->snapshot()) == std::set<std::string>{newer});
  }
  // Either way the outbox is still an outbox: emits and list producers work.
  REQUIRE(e->execute("emit", {{"n", 4}}).ok());
  REQUIRE(e->execute("register_user", {{"name", "dee"}, {"email", "dee@x"}}).ok());
  CHECK(e->snapshot().read("domain.outbox_queue").value().is_object());
}

TEST_CASE("a clear by process removes exactly the messages of the snapshot it ran on", "[theus]") {
  auto e = theus_engine();
  REQUIRE(e->execute("emit", {{"n", 1}}).ok());
  std::promise<void> started;
  std::promise<void> go_on;
  std::shared_future<void> go = go_on.get_future().share();
  int runs = 0;
  REQUIRE(e->register_process({.name = "slow_clear",
                               .inputs = {"domain.outbox_queue"},
                               .outputs = {"domain.outbox_queue"}},
                              [&](const pop::context& ctx, const json& args) {
                                if (runs++ == 0) {
                                  started.set_value();
                                  go.wait();
                                }
                                return clear_all(ctx, args);
                              })
              .ok());
  std::thread clearing([&] { REQUIRE(e->execute("slow_clear").ok()); });
  started.get_future().wait();
  // A producer commits while the clear runs on the older snapshot.
  REQUIRE(e->execute("emit", {{"n", 2}}).ok());
  const std::string newer = e->snapshot().pending_messages().value().back().id;
  go_on.set_value();
  clearing.join();
  CHECK(runs == 1);  // the append did not conflict with the clear
  CHECK(pending_ids(e->snapshot()) == std::set<std::string>{newer});
}

TEST_CASE("writes that would break the outbox's shape are refused and say what to write",
          "[theus]") {
  auto e = theus_engine();
  REQUIRE(e->execute("emit", {{"n", 1}}).ok());
  const std::string id = e->snapshot().pending_messages().value()[0].id;
  const std::uint64_t v = e->version();
  const auto refused = [&](std::vector<pop::write> writes, const char* says) {
    const auto r = e->compare_and_swap(v, std::move(writes));
    CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(r.status().message()), Catch::Contains(says));
    CHECK(e->version() == v);
  };
  refused({{"domain.outbox_queue", "nope"}}, "write a list of messages");
  refused({{"domain.outbox_queue", std::nullopt}}, "write []");
  refused({{"domain.outbox_queue", json::array({{{"to", "x"}}})}}, "'topic'");
  refused({{"domain.outbox_queue", json::array({{{"topic", "t"}, {"payload", 1}, {"to", "x"}}})}},
          "put them inside 'payload'");
  refused({{"domain.outbox_queue", json::array({{{"id", "00000000000000000099-000000"}}})}},
          "not pending");
  refused({{"domain.outbox_queue." + id + ".topic", "other"}}, "write the whole message");
  refused({{"domain.outbox_queue.mine", json{{"topic", "t"}}}}, "not one");
  CHECK(e->snapshot().pending_count() == 1);
}

TEST_CASE("no interleaving of list and emit producers and clears loses, resurrects or breaks",
          "[theus][property]") {
  rc::prop("list-form operations keep every committed message until a clear that saw it", [] {
    auto e = theus_engine();
    std::vector<pop::snapshot> history{e->snapshot()};  // history[v] is version v
    std::set<std::string> removed;
    const int steps = *rc::gen::inRange(1, 40);
    for (int i = 0; i < steps; ++i) {
      const pop::snapshot head = e->snapshot();
      const int op = *rc::gen::inRange(0, 5);
      const std::uint64_t base = *rc::gen::inRange<std::uint64_t>(0, head.version() + 1);
      std::set<std::string> expected_gone;
      if (op == 0) {
        RC_ASSERT(
            e->execute("register_user", {{"name", "u" + std::to_string(i)}, {"email", "e"}}).ok());
      } else if (op == 1) {
        RC_ASSERT(e->execute("emit", {{"i", i}}).ok());
      } else if (op == 2) {
        expected_gone = pending_ids(head);
        RC_ASSERT(e->execute("clear").ok());
      } else {
        const auto mode = op == 3 ? pop::cas_mode::strict : pop::cas_mode::keys;
        const auto r = e->compare_and_swap(base, {{"domain.outbox_queue", json::array()}}, mode);
        RC_ASSERT(r.ok());
        if (r->committed) expected_gone = pending_ids(history[base]);
      }
      const pop::snapshot after = e->snapshot();
      const std::set<std::string> now = pending_ids(after);  // parses: the outbox is usable
      // Never resurrected.
      for (const std::string& id : now) RC_ASSERT(removed.count(id) == 0u);
      // Never lost: whatever was pending before and is gone now was pending at the clear's base.
      for (const std::string& id : pending_ids(head)) {
        if (now.count(id) == 0u) {
          RC_ASSERT(expected_gone.count(id) == 1u);
          removed.insert(id);
        }
      }
      for (std::uint64_t v = history.size(); v <= after.version(); ++v) history.push_back(after);
    }
    // And the outbox still takes both kinds of producer.
    RC_ASSERT(e->execute("emit", {{"last", true}}).ok());
    RC_ASSERT(e->execute("register_user", {{"name", "last"}, {"email", "e"}}).ok());
  });
}
