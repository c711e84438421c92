// Tests of pop::engine: contracts, commits, conflicts, retries, registration and options (CAS, the
// outbox, notifications and audit are in engine_outbox_test.cpp).
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"
#include "tests/support/processes.hpp"
#include "tests/support/temp_dir.hpp"
#include "tests/support/wait.hpp"

#include <atomic>
#include <map>
#include <optional>
#include <random>
#include <thread>

#include "pop/engine/dry_run.hpp"
#include "pop/engine/engine.hpp"

using pop::json;
using pop::test::register_setter;

namespace {

struct account {
  std::string owner;
  int balance = 0;
};
void from_json(const json& j, account& a) {
  j.at("owner").get_to(a.owner);
  j.at("balance").get_to(a.balance);
}
void to_json(json& j, const account& a) {
  j = json{{"owner", a.owner}, {"balance", a.balance}};
}

json state_at(const pop::engine& e, const std::string& p) {
  return e.snapshot().read(p).value();
}

}  // namespace

TEST_CASE("a process commits its writes and messages atomically at one new version", "[engine]") {
  auto e_owner = pop::test::must(
      pop::engine::open(pop::options{.initial_state = {{"domain", {{"inventory", {{"A1", 5}}}}}}}));
  pop::engine& e = *e_owner;
  REQUIRE(e.register_process(
               {.name = "place_order",
                .inputs = {"domain.inventory"},
                .outputs = {"domain.inventory", "domain.orders"},
                .emits = {"order.placed"}},
               [](const pop::context& ctx, const json& args) -> absl::StatusOr<pop::result> {
                 const std::string sku = args.at("sku");
                 const int qty = args.at("qty");
                 const int stock = ctx.get<int>("domain.inventory." + sku);
                 if (stock < qty) return absl::FailedPreconditionError("out of stock");
                 pop::result r;
                 r.set("domain.inventory." + sku, stock - qty);
                 r.set("domain.orders.o-1", {{"sku", sku}, {"qty", qty}, {"status", "placed"}});
                 r.emit("order.placed", {{"order", "o-1"}}, "o-1", {{"trace", "t-9"}});
                 return r;
               })
              .ok());

  const auto done = e.execute("place_order", {{"sku", "A1"}, {"qty", 2}});
  REQUIRE(done.ok());
  CHECK(done->version == 1);
  CHECK(done->changed);
  CHECK(done->attempts == 1);
  REQUIRE(done->message_ids == std::vector<std::string>{pop::make_message_id(1, 0)});
  CHECK(e.version() == 1);
  CHECK(state_at(e, "domain.inventory.A1") == 3);
  CHECK(state_at(e, "domain.orders.o-1.status") == "placed");

  const auto pending = e.snapshot().pending_messages();
  REQUIRE(pending.ok());
  REQUIRE(pending->size() == 1);
  const pop::outbox_message& m = pending->front();
  CHECK(m.id == "00000000000000000001-000000");
  CHECK(m.topic == "order.placed");
  CHECK(m.key == "o-1");
  CHECK(m.payload == json{{"order", "o-1"}});
  CHECK(m.headers.at("trace") == "t-9");
  CHECK(m.version == 1);
  CHECK(m.attempts == 0);
  CHECK(m.created_at_us > 0);
  // The message is in the state itself, at the outbox path.
  CHECK(state_at(e, "domain.outbox_queue." + m.id + ".topic") == "order.placed");

  const auto refused = e.execute("place_order", {{"sku", "A1"}, {"qty", 9}});
  CHECK(refused.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(refused.status().message()).find("place_order") != std::string::npos);
  CHECK(e.version() == 1);
  CHECK(e.snapshot().pending_count() == 1);
}

TEST_CASE("a snapshot never changes after later commits", "[engine]") {
  pop::engine e;
  register_setter(e, "set", "domain.x");
  REQUIRE(e.execute("set", {{"value", 1}}).ok());
  const pop::snapshot before = e.snapshot();
  const pop::value_view view = before.view(pop::path::parse("domain.x").value());
  REQUIRE(e.execute("set", {{"value", 2}}).ok());
  CHECK(before.version() == 1);
  CHECK(before.read("domain.x").value() == 1);
  CHECK(view.get<int>() == 1);
  CHECK(e.snapshot().read("domain.x").value() == 2);
  CHECK(e.snapshot().version() == 2);
}

TEST_CASE("breaking the contract is kPermissionDenied naming process and path, and commits nothing",
          "[engine]") {
  auto e_owner = pop::test::must(
      pop::engine::open(pop::options{.initial_state = {{"domain", {{"secret", 1}, {"open", 2}}}}}));
  pop::engine& e = *e_owner;
  REQUIRE(e.register_process({.name = "peek", .inputs = {"domain.open"}, .outputs = {"domain.out"}},
                             [](const pop::context& ctx, const json&) {
                               pop::result r;
                               r.set("domain.out", ctx.get<int>("domain.secret"));
                               return r;
                             })
              .ok());
  REQUIRE(e.register_process({.name = "scribble", .inputs = {}, .outputs = {"domain.out"}},
                             [](const pop::context&, const json&) {
                               pop::result r;
                               r.set("domain.out", 1);
                               r.set("domain.open", 3);
                               return r;
                             })
              .ok());
  REQUIRE(e.register_process({.name = "shout", .outputs = {"domain.out"}, .emits = {"a.ok"}},
                             [](const pop::context&, const json&) {
                               pop::result r;
                               r.emit("a.ok", 1);
                               r.emit("b.forbidden", 2);
                               return r;
                             })
              .ok());
  REQUIRE(
      e.register_process({.name = "sneaky", .inputs = {"domain.open"}, .outputs = {"domain.out"}},
                         [](const pop::context& ctx, const json&) {
                           pop::result r;
                           try {
                             r.set("domain.out", ctx.get<int>("domain.secret"));
                           } catch (const pop::process_error&) {
                             r.set("domain.out", -1);  // swallowed: must still fail
                           }
                           return r;
                         })
          .ok());
  REQUIRE(e.register_process(
               {.name = "parent_reader", .inputs = {"domain.open"}, .outputs = {"domain.out"}},
               [](const pop::context& ctx, const json&) {
                 pop::result r;
                 r.set("domain.out", ctx.get("domain"));
                 return r;
               })
              .ok());

  const json before = e.snapshot().to_json();
  const struct {
    const char* process;
    const char* path;
  } cases[] = {{"peek", "domain.secret"},
               {"scribble", "domain.open"},
               {"shout", "b.forbidden"},
               {"sneaky", "domain.secret"},
               {"parent_reader", "'domain'"}};
  for (const auto& c : cases) {
    INFO(c.process);
    const auto r = e.execute(c.process);
    REQUIRE(r.status().code() == absl::StatusCode::kPermissionDenied);
    const std::string message(r.status().message());
    CHECK(message.find(c.process) != std::string::npos);
    CHECK(message.find(c.path) != std::string::npos);
  }
  CHECK(e.version() == 0);
  CHECK(e.snapshot().to_json() == before);
  CHECK(e.audit({.outcome = pop::attempt_outcome::contract_violation}).size() == 5);
}

TEST_CASE("a throwing or failing process leaves version, state and outbox unchanged", "[engine]") {
  pop::engine e;
  register_setter(e, "set", "domain.x");
  REQUIRE(e.execute("set", {{"value", 1}}).ok());
  REQUIRE(e.register_process({.name = "thrower", .outputs = {"domain.x"}, .emits = {"t"}},
                             [](const pop::context&, const json&) -> pop::result {
                               throw std::runtime_error("boom");
                             })
              .ok());
  REQUIRE(e.register_process({.name = "refuser", .outputs = {"domain.x"}, .emits = {"t"}},
                             [](const pop::context&, const json&) -> absl::StatusOr<pop::result> {
                               return absl::UnavailableError("payment gateway down");
                             })
              .ok());
  const json before = e.snapshot().to_json();
  const auto thrown = e.execute("thrower");
  CHECK(thrown.status().code() == absl::StatusCode::kUnknown);
  CHECK(std::string(thrown.status().message()).find("thrower") != std::string::npos);
  CHECK(std::string(thrown.status().message()).find("boom") != std::string::npos);
  const auto refused = e.execute("refuser");
  CHECK(refused.status().code() == absl::StatusCode::kUnavailable);
  CHECK(std::string(refused.status().message()).find("refuser") != std::string::npos);
  CHECK(e.version() == 1);
  CHECK(e.snapshot().to_json() == before);
  CHECK(e.snapshot().pending_count() == 0);
}

TEST_CASE("typed reads convert through from_json and a wrong type names the path", "[engine]") {
  auto e_owner = pop::test::must(pop::engine::open(pop::options{
      .initial_state = {
          {"domain", {{"accounts", {{"alice", {{"owner", "Alice"}, {"balance", 7}}}}}}}}}));
  pop::engine& e = *e_owner;
  REQUIRE(e.register_process(
               {.name = "copy", .inputs = {"domain.accounts"}, .outputs = {"domain.copy"}},
               [](const pop::context& ctx, const json& args) {
                 const account a = ctx.get<account>(args.at("from").get<std::string>());
                 pop::result r;
                 r.set("domain.copy", account{a.owner + "!", a.balance + 1});
                 return r;
               })
              .ok());
  REQUIRE(e.execute("copy", {{"from", "domain.accounts.alice"}}).ok());
  CHECK(state_at(e, "domain.copy") == json{{"owner", "Alice!"}, {"balance", 8}});
  const auto wrong = e.execute("copy", {{"from", "domain.accounts.alice.balance"}});
  CHECK(wrong.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(wrong.status().message()).find("domain.accounts.alice.balance") !=
        std::string::npos);
  const auto missing = e.execute("copy", {{"from", "domain.accounts.bob"}});
  CHECK(missing.status().code() == absl::StatusCode::kNotFound);
  CHECK(std::string(missing.status().message()).find("domain.accounts.bob") != std::string::npos);
  const auto bad = e.execute("copy", {{"from", "domain..accounts"}});
  CHECK(bad.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(e.version() == 1);
}

TEST_CASE("a delete is committed and visible, and deleting a missing path is harmless",
          "[engine]") {
  auto e_owner = pop::test::must(pop::engine::open(
      pop::options{.initial_state = {{"domain", {{"orders", {{"o1", {{"a", 1}}}, {"o2", 2}}}}}}}));
  pop::engine& e = *e_owner;
  REQUIRE(e.register_process({.name = "drop", .outputs = {"domain.orders"}}, [](const pop::context&,
                                                                                const json& args) {
             pop::result r;
             r.erase(args.at("path").get<std::string>());
             return r;
           }).ok());
  REQUIRE(e.execute("drop", {{"path", "domain.orders.o1.a"}}).ok());
  CHECK(e.snapshot().to_json()["domain"]["orders"] == json{{"o1", json::object()}, {"o2", 2}});
  REQUIRE(e.execute("drop", {{"path", "domain.orders.o1"}}).ok());
  CHECK(e.snapshot().read("domain.orders.o1").status().code() == absl::StatusCode::kNotFound);
  REQUIRE(e.execute("drop", {{"path", "domain.orders.nothing.here"}}).ok());
  CHECK(e.snapshot().to_json()["domain"]["orders"] == json{{"o2", 2}});
}

TEST_CASE("deep disjoint writes never conflict", "[engine]") {
  auto e_owner = pop::test::must(pop::engine::open(
      pop::options{.initial_state = {{"domain", {{"accounts", {{"alice", 10}, {"bob", 10}}}}}}}));
  pop::engine& e = *e_owner;
  REQUIRE(
      e.register_process(
           {.name = "bob", .inputs = {"domain.accounts.bob"}, .outputs = {"domain.accounts.bob"}},
           [](const pop::context& ctx, const json&) {
             pop::result r;
             r.set("domain.accounts.bob", ctx.get<int>("domain.accounts.bob") + 1);
             return r;
           })
          .ok());
  std::atomic<int> runs{0};
  REQUIRE(e.register_process({.name = "alice",
                              .inputs = {"domain.accounts.alice"},
                              .outputs = {"domain.accounts.alice"}},
                             [&](const pop::context& ctx, const json&) {
                               // Another commit lands while this run is in flight.
                               if (runs++ == 0) REQUIRE(e.execute("bob").ok());
                               pop::result r;
                               r.set("domain.accounts.alice",
                                     ctx.get<int>("domain.accounts.alice") + 1);
                               return r;
                             })
              .ok());
  const auto done = e.execute("alice");
  REQUIRE(done.ok());
  CHECK(done->attempts == 1);
  CHECK(runs == 1);
  CHECK(done->version == 2);
  CHECK(state_at(e, "domain.accounts") == json{{"alice", 11}, {"bob", 11}});
}

TEST_CASE("a conflicting process re-runs on the newer snapshot and emits its messages once",
          "[engine]") {
  auto e_owner = pop::test::must(
      pop::engine::open(pop::options{.initial_state = {{"domain", {{"counter", 0}}}}}));
  pop::engine& e = *e_owner;
  register_setter(e, "bump", "domain.counter");
  std::atomic<int> runs{0};
  REQUIRE(e.register_process({.name = "incr",
                              .inputs = {"domain.counter"},
                              .outputs = {"domain.counter"},
                              .emits = {"counted"}},
                             [&](const pop::context& ctx, const json&) {
                               const int seen = ctx.get<int>("domain.counter");
                               if (runs++ == 0) REQUIRE(e.execute("bump", {{"value", 100}}).ok());
                               pop::result r;
                               r.set("domain.counter", seen + 1);
                               r.emit("counted", {{"seen", seen}});
                               return r;
                             })
              .ok());
  const auto done = e.execute("incr");
  REQUIRE(done.ok());
  CHECK(done->attempts == 2);
  CHECK(runs == 2);
  CHECK(state_at(e, "domain.counter") == 101);  // no lost update
  const auto pending = e.snapshot().pending_messages().value();
  REQUIRE(pending.size() == 1);
  CHECK(pending[0].payload == json{{"seen", 100}});
  CHECK(pending[0].id == pop::make_message_id(done->version, 0));
  const auto audit = e.audit({.process = "incr"});
  REQUIRE(audit.size() == 2);
  CHECK(audit[0].outcome == pop::attempt_outcome::conflict_retried);
  CHECK(audit[0].detail.find("domain.counter") != std::string::npos);
  CHECK(audit[1].outcome == pop::attempt_outcome::committed);
  CHECK(audit[1].message_ids == done->message_ids);
}

TEST_CASE("a message appended meanwhile conflicts with a process that read the outbox, only",
          "[engine]") {
  auto e_owner = pop::test::must(pop::engine::open(
      pop::options{.initial_state = {{"domain", {{"x", 0}, {"count", 0}, {"other", 0}}}}}));
  pop::engine& e = *e_owner;
  // Emits a message and writes elsewhere: the commit's other paths do not overlap either reader.
  REQUIRE(e.register_process({.name = "emit", .outputs = {"domain.other"}, .emits = {"t"}},
                             [](const pop::context&, const json&) {
                               pop::result r;
                               r.set("domain.other", 1);
                               r.emit("t", {{"n", 1}}, "k");
                               return r;
                             })
              .ok());
  int runs = 0;
  REQUIRE(e.register_process(
               {.name = "count", .inputs = {"domain.outbox_queue"}, .outputs = {"domain.count"}},
               [&](const pop::context& ctx, const json&) {
                 const std::size_t seen = ctx.view("domain.outbox_queue").size();
                 if (runs++ == 0) REQUIRE(e.execute("emit").ok());
                 pop::result r;
                 r.set("domain.count", static_cast<std::int64_t>(seen));
                 return r;
               })
              .ok());
  const auto counted = e.execute("count");
  REQUIRE(counted.ok());
  CHECK(counted->attempts == 2);  // its read of the queue was stale
  CHECK(state_at(e, "domain.count") == 1);
  int elsewhere_runs = 0;
  REQUIRE(e.register_process({.name = "elsewhere", .inputs = {"domain.x"}, .outputs = {"domain.x"}},
                             [&](const pop::context& ctx, const json&) {
                               const int x = ctx.get<int>("domain.x");
                               if (elsewhere_runs++ == 0) REQUIRE(e.execute("emit").ok());
                               pop::result r;
                               r.set("domain.x", x + 1);
                               return r;
                             })
              .ok());
  const auto moved = e.execute("elsewhere");
  REQUIRE(moved.ok());
  CHECK(moved->attempts == 1);  // nothing it read or wrote was touched
  CHECK(state_at(e, "domain.x") == 1);
}

TEST_CASE("write skew never commits both sides", "[engine]") {
  // Each withdrawal keeps alice + bob >= 0 on its own snapshot; together they would break it.
  auto e_owner = pop::test::must(
      pop::engine::open(pop::options{.initial_state = {{"domain", {{"a", 50}, {"b", 50}}}}}));
  pop::engine& e = *e_owner;
  const auto withdraw = [&e](std::string mine, std::function<void()> meanwhile) {
    return
        [mine, meanwhile, &e](const pop::context& ctx, const json&) -> absl::StatusOr<pop::result> {
          const int total = ctx.get<int>("domain.a") + ctx.get<int>("domain.b");
          if (meanwhile) meanwhile();
          if (total < 100) return absl::FailedPreconditionError("insufficient funds");
          pop::result r;
          r.set("domain." + mine, ctx.get<int>("domain." + mine) - 100);
          return r;
        };
  };
  int b_runs = 0;
  REQUIRE(e.register_process(
               {.name = "withdraw_b", .inputs = {"domain.a", "domain.b"}, .outputs = {"domain.b"}},
               withdraw("b", [&] { ++b_runs; }))
              .ok());
  int a_runs = 0;
  REQUIRE(e.register_process(
               {.name = "withdraw_a", .inputs = {"domain.a", "domain.b"}, .outputs = {"domain.a"}},
               withdraw("a",
                        [&] {
                          if (a_runs++ == 0) REQUIRE(e.execute("withdraw_b").ok());
                        }))
              .ok());
  const auto a = e.execute("withdraw_a");
  CHECK(a.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(a_runs == 2);
  CHECK(state_at(e, "domain.a").get<int>() + state_at(e, "domain.b").get<int>() == 0);
  CHECK(state_at(e, "domain.a") == 50);
}

TEST_CASE("reads of missing paths, parents and children are validated at any depth", "[engine]") {
  auto e_owner = pop::test::must(
      pop::engine::open(pop::options{.outbox_path = "system.outbox",
                                     .initial_state = {{"domain", {{"x", {{"y", {{"z", 1}}}}}}}}}));
  pop::engine& e = *e_owner;
  register_setter(e, "set", "domain");
  // With other commits around the concurrent one, the snapshot is many versions old: past 8 the
  // check compares the trees instead of reading the commits' log, and must agree with it.
  const int noise = GENERATE(0, 10);
  INFO("unrelated commits before it: " << noise);
  struct scenario {
    const char* read;
    const char* concurrent_write;
    bool conflicts;
  };
  const scenario scenarios[] = {
      {"domain.flag", "domain.flag", true},       // read of a missing path, then created
      {"domain.x", "domain.x.y.z", true},         // read a parent, a deep child changes
      {"domain.x.y.z", "domain.x", true},         // read a deep child, its parent is replaced
      {"domain.x.y.z", "domain.x.y.w", false},    // a sibling deep down
      {"domain.x.y", "domain.x.yy", false},       // a prefix as text, not as a path
      {"domain.x.y.z", "domain.x.y.z.q", true},   // below what was read
      {"domain.x.y.z", "domain.noise", false},    // nothing it read
      {"domain.gone", "domain.gone.deep", true},  // a missing path, created below
  };
  int n = 0;
  for (const scenario& s : scenarios) {
    INFO(s.read << " vs " << s.concurrent_write);
    const std::string name = "reader" + std::to_string(n++);
    int runs = 0;
    REQUIRE(
        e.register_process(
             {.name = name, .inputs = {"domain"}, .outputs = {"domain.out"}},
             [&, s](const pop::context& ctx, const json&) {
               (void)ctx.find(s.read);
               if (runs++ == 0) {
                 for (int i = 0; i < noise; ++i) {
                   REQUIRE(e.execute("set", {{"path", "domain.noise"}, {"value", i}}).ok());
                 }
                 REQUIRE(
                     e.execute("set", {{"path", s.concurrent_write}, {"value", {{"v", n}}}}).ok());
                 if (noise > 0) {
                   REQUIRE(e.execute("set", {{"path", "domain.noise"}, {"value", -1}}).ok());
                 }
               }
               pop::result r;
               r.set("domain.out", n);
               return r;
             })
            .ok());
    const auto done = e.execute(name);
    REQUIRE(done.ok());
    CHECK(done->attempts == (s.conflicts ? 2 : 1));
    CHECK(state_at(e, "domain.out") == n);
  }
}

TEST_CASE("a snapshot older than the conflict window commits if nothing it read or wrote changed",
          "[engine]") {
  // An object of more than blob_max_elements members is a map of nodes: a write to one member
  // leaves the others' nodes as they were. (In a small object, packed in one node, a path whose
  // sibling changed is left to the log of commits.)
  json domain = {{"x", 1}, {"out", 0}, {"noise", 0}};
  for (int i = 0; i < 100; ++i) domain["f" + std::to_string(i)] = i;
  auto e_owner =
      pop::test::must(pop::engine::open(pop::options{.outbox_path = "system.outbox",
                                                     .initial_state = {{"domain", domain}},
                                                     .conflict_window = 4}));
  pop::engine& e = *e_owner;
  register_setter(e, "set", "domain");
  int runs = 0;
  REQUIRE(e.register_process(
               {.name = "slow", .inputs = {"domain.x"}, .outputs = {"domain.out"}},
               [&](const pop::context& ctx, const json&) {
                 if (runs++ == 0) {
                   for (int i = 0; i < 12; ++i) {
                     REQUIRE(e.execute("set", {{"path", "domain.noise"}, {"value", i}}).ok());
                   }
                 }
                 pop::result r;
                 r.set("domain.out", ctx.get<int>("domain.x") + 1);
                 return r;
               })
              .ok());
  const auto done = e.execute("slow");
  REQUIRE(done.ok());
  CHECK(done->attempts == 1);
  CHECK(done->version == 13);
  domain["out"] = 2;
  domain["noise"] = 11;
  CHECK(state_at(e, "domain") == domain);
}

TEST_CASE("a change exactly conflict_window commits old is checked, one older is refused",
          "[engine]") {
  for (const std::size_t window : {std::size_t{1}, std::size_t{3}}) {
    INFO("conflict_window " << window);
    auto e = pop::test::must(pop::engine::open(pop::options{
        .initial_state = {{"domain", {{"a", 0}, {"b", 0}}}}, .conflict_window = window}));
    const auto cas = [&](std::uint64_t expected, const char* path, int value) {
      return pop::test::must(e->compare_and_swap(expected, {{path, value}}, pop::cas_mode::keys));
    };
    for (int i = 1; i <= 5; ++i) REQUIRE(cas(e->version(), "domain.a", i).committed);
    // `window` commits since it, all in the log: checked, and none wrote domain.b.
    CHECK(cas(e->version() - window, "domain.b", 1).committed);
    // One more (none of them wrote domain.c): the log no longer has them all, so it cannot be
    // checked.
    CHECK(!cas(e->version() - window - 1, "domain.c", 2).committed);
    // The oldest commit in the window, the only one that wrote domain.d, is found.
    REQUIRE(cas(e->version(), "domain.d", 1).committed);
    const std::uint64_t before_d = e->version() - 1;
    for (std::size_t i = 1; i < window; ++i) REQUIRE(cas(e->version(), "domain.a", 6).committed);
    CHECK(!cas(before_d, "domain.d", 2).committed);
    CHECK(cas(before_d, "domain.e", 3).committed);  // (checked against the same commits)
    CHECK(pop::test::must(e->snapshot().read("domain")) ==
          json{{"a", window > 1 ? 6 : 5}, {"b", 1}, {"d", 1}, {"e", 3}});
  }
}

TEST_CASE("a process that keeps conflicting is aborted after the retry budget", "[engine]") {
  auto e_owner = pop::test::must(pop::engine::open(pop::options{.retry = {.max_attempts = 3}}));
  pop::engine& e = *e_owner;
  register_setter(e, "set", "domain.hot");
  int runs = 0;
  REQUIRE(
      e.register_process(
           {.name = "loser", .inputs = {"domain.hot"}, .outputs = {"domain.out"}, .emits = {"t"}},
           [&](const pop::context& ctx, const json&) {
             (void)ctx.find("domain.hot");
             REQUIRE(e.execute("set", {{"value", ++runs}}).ok());
             pop::result r;
             r.set("domain.out", 1);
             r.emit("t", 1);
             return r;
           })
          .ok());
  const auto r = e.execute("loser");
  CHECK(r.status().code() == absl::StatusCode::kAborted);
  CHECK(std::string(r.status().message()).find("domain.hot") != std::string::npos);
  CHECK(runs == 3);
  CHECK(e.snapshot().read("domain.out").status().code() == absl::StatusCode::kNotFound);
  CHECK(e.snapshot().pending_count() == 0);
  CHECK(e.audit({.process = "loser", .outcome = pop::attempt_outcome::aborted}).size() == 1);
  CHECK(e.audit({.process = "loser", .outcome = pop::attempt_outcome::conflict_retried}).size() ==
        2);
}

TEST_CASE("registration rejects bad specs with clear errors", "[engine]") {
  pop::engine e;
  const auto ok = [](const pop::context&, const json&) { return pop::result{}; };
  CHECK(e.register_process({.name = "p", .outputs = {"domain.a"}}, ok).ok());
  const auto dup = e.register_process({.name = "p", .outputs = {"domain.b"}}, ok);
  CHECK(dup.code() == absl::StatusCode::kAlreadyExists);
  struct bad {
    pop::process_spec spec;
    const char* mentions;
  };
  const bad cases[] = {
      {{.name = "", .outputs = {"domain.a"}}, "empty"},
      {{.name = "has space", .outputs = {"domain.a"}}, "has space"},
      {{.name = "q", .inputs = {"domain..a"}, .outputs = {"domain.a"}}, "domain..a"},
      {{.name = "q", .outputs = {"domain.a", "domain.a.b"}}, "nested"},
      {{.name = "q", .outputs = {"domain.a", "domain.a"}}, "repeated"},
      {{.name = "q", .outputs = {"domain.a"}, .emits = {"t", "t"}}, "'t'"},
      {{.name = "q", .outputs = {"domain.a"}, .emits = {"bad topic"}}, "bad topic"},
      {{.name = "q", .inputs = {"domain.a"}}, "no outputs"},
      {{.name = "q", .outputs = {"domain"}}, "outbox"},
  };
  for (const bad& c : cases) {
    const auto s = e.register_process(c.spec, ok);
    INFO(s.ToString());
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(s.message()).find(c.mentions) != std::string::npos);
  }
  CHECK(e.register_process({.name = "nofn", .outputs = {"domain.a"}}, nullptr).code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(e.processes() == std::vector<std::string>{"p"});
  CHECK(e.execute("nobody").status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("commits applied in place change nothing that a snapshot or a view still holds",
          "[engine]") {
  // A commit on a version that only the engine holds changes its nodes in place; one that
  // anything else holds (a snapshot, or a view kept after its snapshot is gone) copies what it
  // changes. Random transfers, clears and holds, checked against a model.
  constexpr int accounts = 300;  // enough for a map of several levels
  for (const unsigned seed : {1u, 2u, 3u}) {
    CAPTURE(seed);
    std::mt19937 rng(seed);
    json initial = {{"domain", {{"accounts", json::object()}, {"meta", {{"name", "bank"}}}}}};
    std::map<std::string, int> model;
    const auto name = [](int i) {
      std::string n = std::to_string(i);
      return "a" + std::string(3 - n.size(), '0') + n;
    };
    for (int i = 0; i < accounts; ++i) {
      initial["domain"]["accounts"][name(i)] = 100;
      model[name(i)] = 100;
    }
    auto e_owner = pop::test::must(
        pop::engine::open(pop::options{.outbox_path = "system.outbox", .initial_state = initial}));
    pop::engine& e = *e_owner;
    REQUIRE(e.register_process({.name = "transfer",
                                .inputs = {"domain.accounts"},
                                .outputs = {"domain.accounts"},
                                .emits = {"t.done"}},
                               [](const pop::context& ctx, const json& a) {
                                 const std::string from =
                                     "domain.accounts." + a.at(0).get<std::string>();
                                 const std::string to =
                                     "domain.accounts." + a.at(1).get<std::string>();
                                 pop::result r;
                                 r.set(from, ctx.get<int>(from) - 1);
                                 r.set(to, ctx.get<int>(to) + 1);
                                 r.emit("t.done", a, a.at(1).get<std::string>());
                                 return r;
                               })
                .ok());
    const auto accounts_json = [&] {
      json j = json::object();
      for (const auto& [k, v] : model) j[k] = v;
      return j;
    };
    struct held {
      std::optional<pop::snapshot> snap;    // a whole version
      std::optional<pop::value_view> view;  // a view kept after its snapshot is gone
      json expected;
    };
    std::vector<held> kept;
    std::size_t pending = 0;
    const auto check_kept = [&] {
      for (const held& h : kept) {
        if (h.snap) {
          REQUIRE(h.snap->read("domain.accounts").value() == h.expected);
        } else {
          REQUIRE(h.view->to_json() == h.expected);
        }
      }
    };
    for (int step = 0; step < 400; ++step) {
      const unsigned what = rng() % 10;
      if (what < 6) {
        const int from = static_cast<int>(rng() % accounts);
        const int to = (from + 1 + static_cast<int>(rng() % (accounts - 1))) % accounts;
        REQUIRE(e.execute("transfer", json::array({name(from), name(to)})).ok());
        --model[name(from)];
        ++model[name(to)];
        ++pending;
      } else if (what == 6) {
        kept.push_back({e.snapshot(), std::nullopt, accounts_json()});
      } else if (what == 7) {
        // A view of the accounts, of one account, or of the outbox, without its snapshot.
        const int pick = static_cast<int>(rng() % 3);
        const pop::snapshot s = e.snapshot();
        if (pick == 0) {
          kept.push_back(
              {std::nullopt, s.view(pop::path::parse("domain.accounts").value()), accounts_json()});
        } else if (pick == 1) {
          const std::string a = name(static_cast<int>(rng() % accounts));
          kept.push_back(
              {std::nullopt, s.view(pop::path::parse("domain.accounts." + a).value()), model[a]});
        } else {
          const pop::value_view q = s.view(pop::path::parse("system.outbox").value());
          kept.push_back({std::nullopt, q, q.exists() ? q.to_json() : json()});
        }
      } else if (what == 8 && !kept.empty()) {
        kept.erase(kept.begin() + static_cast<std::ptrdiff_t>(rng() % kept.size()));
      } else if (pending > 0) {
        // The relay's clear: the oldest messages, by id.
        const pop::snapshot s = e.snapshot();
        std::vector<std::string> ids;
        const std::vector<pop::outbox_message> queued = s.pending_messages().value();
        for (const auto& m : queued) {
          if (ids.size() < 1 + rng() % 8) ids.push_back(m.id);
        }
        const auto cleared = e.clear_messages(s, ids);
        REQUIRE(cleared.ok());
        pending -= cleared->removed;
      }
      const pop::snapshot now = e.snapshot();
      REQUIRE(now.read("domain.accounts").value() == accounts_json());
      REQUIRE(now.read("domain.meta.name").value() == "bank");
      REQUIRE(now.pending_messages().value().size() == pending);
      if (step % 20 == 0) check_kept();
    }
    check_kept();
  }
}

TEST_CASE("invalid writes are refused and commit nothing", "[engine]") {
  auto e_owner =
      pop::test::must(pop::engine::open(pop::options{.initial_state = {{"domain", {{"n", 1}}}}}));
  pop::engine& e = *e_owner;
  REQUIRE(e.register_process({.name = "w", .outputs = {"domain"}}, [](const pop::context&,
                                                                      const json& args) {
             pop::result r;
             r.set("domain.ok", 1);
             r.set(args.at("path").get<std::string>(), 2);
             return r;
           }).ok() == false);  // "domain" is the outbox's parent: refused at registration
  REQUIRE(
      e.register_process({.name = "w", .outputs = {"domain.n", "domain.ok", "domain.outbox_queue"}},
                         [](const pop::context&, const json& args) {
                           pop::result r;
                           r.set("domain.ok", 1);
                           r.set(args.at("path").get<std::string>(), args.value("value", json(2)));
                           return r;
                         })
          .ok());
  const json before = e.snapshot().to_json();
  CHECK(e.execute("w", {{"path", "domain.n.deeper"}}).status().code() ==
        absl::StatusCode::kFailedPrecondition);  // through a number
  CHECK(e.execute("w", {{"path", "domain.ok."}}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(e.execute("w", {{"path", "domain.outbox_queue"}, {"value", 5}}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(e.version() == 0);
  CHECK(e.snapshot().to_json() == before);
}

TEST_CASE("a process past its timeout commits nothing", "[engine]") {
  pop::engine e;
  REQUIRE(e.register_process(
               {.name = "slow", .outputs = {"domain.x"}, .timeout = std::chrono::milliseconds(5)},
               [](const pop::context&, const json&) {
                 std::this_thread::sleep_for(std::chrono::milliseconds(20));
                 pop::result r;
                 r.set("domain.x", 1);
                 return r;
               })
              .ok());
  CHECK(e.execute("slow").status().code() == absl::StatusCode::kDeadlineExceeded);
  CHECK(e.version() == 0);
}

TEST_CASE("a process that changes nothing creates no version", "[engine]") {
  auto e_owner =
      pop::test::must(pop::engine::open(pop::options{.initial_state = {{"domain", {{"x", 1}}}}}));
  pop::engine& e = *e_owner;
  REQUIRE(e.register_process({.name = "look", .inputs = {"domain.x"}, .outputs = {"domain.y"}},
                             [](const pop::context& ctx, const json&) {
                               (void)ctx.get<int>("domain.x");
                               return pop::result{};
                             })
              .ok());
  const auto r = e.execute("look");
  REQUIRE(r.ok());
  CHECK_FALSE(r->changed);
  CHECK(r->version == 0);
  CHECK(e.version() == 0);
}

TEST_CASE("engine options are validated", "[engine]") {
  CHECK(pop::engine::open({.outbox_path = "a..b"}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(pop::engine::open({.initial_state = json::array()}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(pop::engine::open({.retry = {.max_attempts = 0}}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(pop::engine::open({.outbox_path = ""}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  // A valid path with no room below it for a message id (depth or length) is refused at open,
  // not at the first emit.
  std::string deep = "a";
  for (int i = 1; i < static_cast<int>(pop::max_path_depth); ++i) deep += ".a";
  const absl::Status no_room = pop::engine::open({.outbox_path = deep}).status();
  CHECK(no_room.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(no_room.message()).find("no room for message ids") != std::string::npos);
  // (segments of 100 characters and one of 88: 997 characters in all)
  std::string long_path;
  for (int i = 0; i < 9; ++i) long_path += std::string(100, 'x') + ".";
  long_path += std::string(88, 'x');
  REQUIRE(long_path.size() == pop::max_path_length - 27);
  CHECK(pop::engine::open({.outbox_path = long_path}).status().code() ==
        absl::StatusCode::kInvalidArgument);
  // One segment or character less leaves room for a '.' and a 27-character id.
  CHECK(pop::engine::open({.outbox_path = deep.substr(2)}).ok());
  CHECK(pop::engine::open({.outbox_path = long_path.substr(1)}).ok());
  const auto custom = pop::engine::open({.outbox_path = "system.out"});
  REQUIRE(custom.ok());
  REQUIRE((*custom)
              ->register_process({.name = "e", .emits = {"t"}},
                                 [](const pop::context&, const json&) {
                                   pop::result r;
                                   r.emit("t", 1);
                                   return r;
                                 })
              .ok());
  REQUIRE((*custom)->execute("e").ok());
  CHECK((*custom)->snapshot().read("system.out").value().size() == 1);
}

namespace {

// An engine of options `o` with two processes: "emit" (args.n messages) and
// "quiet" (a write, no messages declared).
std::unique_ptr<pop::engine> emitting_engine(pop::options o) {
  auto e = pop::test::must(pop::engine::open(std::move(o)));
  REQUIRE(e->register_process({.name = "emit", .outputs = {"domain.n"}, .emits = {"t"}},
                              [](const pop::context&, const json& args) {
                                pop::result r;
                                r.set("domain.n", args.at("n"));
                                for (int i = 0; i < args.at("n").get<int>(); ++i) r.emit("t", i);
                                return r;
                              })
              .ok());
  REQUIRE(e->register_process({.name = "quiet", .outputs = {"domain.q"}}, [](const pop::context&,
                                                                             const json& args) {
             pop::result r;
             r.set("domain.q", args);
             return r;
           }).ok());
  return e;
}

// Clears the `n` oldest pending messages of `e`; returns the clear's version.
std::uint64_t clear_oldest(pop::engine& e, std::size_t n) {
  const pop::snapshot s = e.snapshot();
  std::vector<std::string> ids;
  const std::vector<pop::outbox_message> pending = s.pending_messages().value();
  for (const auto& m : pending) {
    if (ids.size() < n) ids.push_back(m.id);
  }
  const absl::StatusOr<pop::clear_result> r = e.clear_messages(s, ids);
  REQUIRE(r.status().ToString() == "OK");
  REQUIRE(r->removed == n);
  return r->version;
}

}  // namespace

TEST_CASE(
    "a commit that would exceed max_pending fails with kResourceExhausted and commits nothing",
    "[engine][backpressure]") {
  auto e_owner = emitting_engine({.max_pending = 3});
  pop::engine& e = *e_owner;
  REQUIRE(e.execute("emit", {{"n", 2}}).ok());
  const pop::snapshot before = e.snapshot();
  const absl::StatusOr<pop::commit> over = e.execute("emit", {{"n", 2}});
  REQUIRE(over.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(std::string(over.status().message()).find("process 'emit'") != std::string::npos);
  CHECK(std::string(over.status().message()).find("max_pending = 3") != std::string::npos);
  CHECK(e.version() == before.version());
  CHECK(e.snapshot().to_json() == before.to_json());
  // Exactly at the bound is fine; so is a commit that shrinks a full queue.
  REQUIRE(e.execute("emit", {{"n", 1}}).ok());
  CHECK(e.snapshot().pending_count() == 3);
  const auto pending = e.snapshot().pending_messages().value();
  const auto cleared =
      e.compare_and_swap(e.version(), {{"domain.outbox_queue." + pending[0].id, std::nullopt}});
  REQUIRE(cleared.ok());
  CHECK(cleared->committed);
  // compare_and_swap that would grow a full queue is refused the same way.
  REQUIRE(e.execute("emit", {{"n", 1}}).ok());
  pop::outbox_message copy = pending[0];
  copy.id = pop::make_message_id(1, 99);  // an id of a past version no message has
  const auto grow =
      e.compare_and_swap(e.version(), {{"domain.outbox_queue." + copy.id, copy.to_json()}});
  CHECK(grow.status().code() == absl::StatusCode::kResourceExhausted);
  CHECK(e.snapshot().pending_count() == 3);
}

TEST_CASE("with the pace held, a process that emits waits while the outbox is over pace_pending",
          "[engine][pacing]") {
  // (A wait of 10 s at most: if the test fails, its thread still ends soon.)
  auto owner = emitting_engine({.pace_pending = 3, .pace_wait = std::chrono::seconds(10)});
  pop::engine& e = *owner;
  // Nobody holds the pace: the outbox grows past the bound without a wait.
  REQUIRE(e.execute("emit", {{"n", 6}}).ok());
  CHECK(e.pacing().paced == 0);
  pop::pace_hold hold = e.hold_pace();
  CHECK(static_cast<bool>(hold));
  CHECK(e.pacing().holds == 1);
  CHECK(e.pacing().pending == 6);
  // A process that declares no messages never waits.
  REQUIRE(e.execute("quiet", 1).ok());
  CHECK(e.pacing().paced == 0);
  std::uint64_t paced = 0;
  for (const std::size_t clear : {1, 3}) {
    const std::uint64_t before = e.version();
    std::optional<absl::StatusOr<pop::commit>> done;
    std::jthread producer([&] { done = e.execute("emit", {{"n", 1}}); });
    ++paced;
    const bool waiting =
        pop::test::eventually([&] { return e.pacing().paced == paced; }, std::chrono::seconds(10));
    CHECK(waiting);
    // It waits before it runs: nothing of it is committed.
    CHECK(e.version() == before);
    // A clear lets it run, whether it leaves the outbox above the bound (6 - 1: the relay moves)
    // or within it (6 - 3); the clear's version comes first.
    const std::uint64_t cleared_at = clear_oldest(e, clear);
    producer.join();
    REQUIRE(done.has_value());
    REQUIRE(done->ok());
    CHECK((*done)->version == cleared_at + 1);
  }
  CHECK(e.snapshot().pending_count() == 4);
  CHECK(e.pacing().paced == 2);
  CHECK(e.pacing().timed_out == 0);
  CHECK(e.pacing().waiting == 0);
  hold.reset();
  CHECK(!hold);
  CHECK(e.pacing().holds == 0);
}

TEST_CASE("a clear lets as many waiting processes run as messages it removed", "[engine][pacing]") {
  auto owner = emitting_engine({.pace_pending = 1, .pace_wait = std::chrono::seconds(10)});
  pop::engine& e = *owner;
  REQUIRE(e.execute("emit", {{"n", 5}}).ok());
  pop::pace_hold hold = e.hold_pace();
  std::atomic<int> failed{0};
  std::vector<std::jthread> producers;
  for (int i = 0; i < 3; ++i) {
    producers.emplace_back([&] {
      if (!e.execute("emit", {{"n", 1}}).ok()) ++failed;
    });
  }
  REQUIRE(pop::test::eventually([&] { return e.pacing().paced == 3; }, std::chrono::seconds(10)));
  const std::uint64_t cleared_at = clear_oldest(e, 2);
  // Two run; the third waits for the next clear.
  CHECK(pop::test::eventually([&] { return e.version() == cleared_at + 2; },
                              std::chrono::seconds(10)));
  CHECK(e.pacing().waiting == 1);
  CHECK(e.snapshot().pending_count() == 5);
  clear_oldest(e, 1);
  producers.clear();  // (joins)
  CHECK(failed == 0);
  CHECK(e.snapshot().pending_count() == 5);
  CHECK(e.pacing().timed_out == 0);
}

TEST_CASE("releasing the last hold of the pace lets waiting processes run", "[engine][pacing]") {
  auto owner = emitting_engine({.pace_pending = 1, .pace_wait = std::chrono::seconds(10)});
  pop::engine& e = *owner;
  REQUIRE(e.execute("emit", {{"n", 2}}).ok());
  pop::pace_hold hold = e.hold_pace();
  pop::pace_hold second = e.hold_pace();
  CHECK(e.pacing().holds == 2);
  const std::uint64_t before = e.version();
  std::optional<absl::StatusOr<pop::commit>> done;
  std::jthread producer([&] { done = e.execute("emit", {{"n", 1}}); });
  REQUIRE(pop::test::eventually([&] { return e.pacing().paced == 1; }, std::chrono::seconds(10)));
  hold.reset();
  CHECK(e.pacing().holds == 1);
  // (Still held by the other: it keeps waiting.)
  CHECK(e.pacing().waiting == 1);
  CHECK(e.version() == before);
  second.reset();
  producer.join();
  REQUIRE(done->ok());
  CHECK(e.snapshot().pending_count() == 3);
  CHECK(e.pacing().timed_out == 0);
  // A moved hold is one hold, released once.
  pop::pace_hold held = e.hold_pace();
  pop::pace_hold moved = std::move(held);
  CHECK(e.pacing().holds == 1);
  held.reset();
  CHECK(e.pacing().holds == 1);
  moved.reset();
  CHECK(e.pacing().holds == 0);
  CHECK(e.pacing().taken == 3);
  // A hold may outlive its engine.
  pop::pace_hold late = e.hold_pace();
  owner.reset();
  late.reset();
}

TEST_CASE("on the thread that holds the pace a process never waits for it", "[engine][pacing]") {
  // (A wrong wait would last 10 s and be counted.)
  auto owner = emitting_engine({.pace_pending = 1, .pace_wait = std::chrono::seconds(10)});
  pop::engine& e = *owner;
  REQUIRE(e.execute("emit", {{"n", 3}}).ok());
  pop::pace_hold hold = e.hold_pace();
  hold.on_this_thread();
  REQUIRE(e.execute("emit", {{"n", 1}}).ok());
  CHECK(e.pacing().paced == 0);
  CHECK(e.snapshot().pending_count() == 4);
  // Another thread waits.
  std::jthread producer([&] { (void)e.execute("emit", {{"n", 1}}); });
  CHECK(pop::test::eventually([&] { return e.pacing().paced == 1; }, std::chrono::seconds(10)));
  hold.reset();  // (lets it run)
}

TEST_CASE("after a pace wait times out nothing waits until the relay removes messages again",
          "[engine][pacing]") {
  // (The wait is real time, a millisecond: it ends by itself, nothing is synchronized by it.)
  auto owner = emitting_engine({.pace_pending = 2, .pace_wait = std::chrono::milliseconds(1)});
  pop::engine& e = *owner;
  REQUIRE(e.execute("emit", {{"n", 4}}).ok());
  pop::pace_hold hold = e.hold_pace();
  REQUIRE(e.execute("emit", {{"n", 1}}).ok());
  CHECK(e.pacing().paced == 1);
  CHECK(e.pacing().timed_out == 1);
  CHECK(e.pacing().stalled);
  // Stalled: the next ones run at once and the outbox still grows.
  REQUIRE(e.execute("emit", {{"n", 1}}).ok());
  REQUIRE(e.execute("emit", {{"n", 1}}).ok());
  CHECK(e.pacing().paced == 1);
  CHECK(e.snapshot().pending_count() == 7);
  // A clear ends the stall and lets one run (it removed one); the next waits (and times out:
  // nothing clears).
  clear_oldest(e, 1);
  CHECK(!e.pacing().stalled);
  REQUIRE(e.execute("emit", {{"n", 1}}).ok());
  CHECK(e.pacing().paced == 1);
  REQUIRE(e.execute("emit", {{"n", 1}}).ok());
  CHECK(e.pacing().paced == 2);
  CHECK(e.pacing().timed_out == 2);
  // A hold taken anew ends a stall too.
  hold.reset();
  hold = e.hold_pace();
  CHECK(!e.pacing().stalled);
}

TEST_CASE("inside a batch nothing waits for the relay: it sees the batch's commits at its end",
          "[engine][pacing]") {
  pop::test::temp_dir dir;
  // (A wait would last 10 s and time out: counted in paced.)
  auto e = emitting_engine(
      {.pace_pending = 1, .pace_wait = std::chrono::seconds(10), .journal = dir.file("j.db")});
  pop::pace_hold hold = e->hold_pace();
  REQUIRE(e->batch([&] {
             for (int i = 0; i < 3; ++i) {
               if (const auto c = e->execute("emit", {{"n", 2}}); !c.ok()) return c.status();
             }
             return absl::OkStatus();
           }).ok());
  CHECK(e->snapshot().pending_count() == 6);
  CHECK(e->pacing().paced == 0);
  // Outside it the same commit waits (until the hold is released below).
  std::jthread producer([&] { (void)e->execute("emit", {{"n", 1}}); });
  CHECK(pop::test::eventually([&] { return e->pacing().paced == 1; }, std::chrono::seconds(10)));
  hold.reset();  // (lets it run)
}

TEST_CASE("options.pace_wait out of range is refused by name", "[engine][pacing]") {
  for (const auto wait : {std::chrono::microseconds(0), std::chrono::microseconds(-5),
                          std::chrono::microseconds(std::chrono::seconds(61))}) {
    const auto e = pop::engine::open(pop::options{.pace_wait = wait});
    REQUIRE(e.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(e.status().message()).find("options.pace_wait") != std::string::npos);
  }
}
