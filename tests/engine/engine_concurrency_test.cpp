// Concurrency tests of pop::engine: many threads executing and reading at once (run under TSan).
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"
#include "tests/support/temp_dir.hpp"

#include <algorithm>
#include <atomic>
#include <random>
#include <set>
#include <thread>

#include "pop/engine/engine.hpp"

using pop::json;

TEST_CASE("concurrent transfers conserve the total in every snapshot and lose no commit",
          "[engine][concurrency]") {
  constexpr int accounts = 8;
  constexpr int writers = 4;
  constexpr int transfers_per_writer = 400;
  const unsigned seed = std::random_device{}();
  INFO("seed " << seed);
  json initial = {{"domain", {{"accounts", json::object()}}}};
  for (int i = 0; i < accounts; ++i) initial["domain"]["accounts"]["a" + std::to_string(i)] = 100;
  auto e_owner = pop::test::must(
      pop::engine::open(pop::options{.initial_state = initial, .retry = {.max_attempts = 1000}}));
  pop::engine& e = *e_owner;
  REQUIRE(e.register_process(
               {.name = "transfer",
                .inputs = {"domain.accounts"},
                .outputs = {"domain.accounts", "domain.receipts"},
                .emits = {"transfer.done"}},
               [](const pop::context& ctx, const json& args) -> absl::StatusOr<pop::result> {
                 const std::string from = "domain.accounts." + args.at("from").get<std::string>();
                 const std::string to = "domain.accounts." + args.at("to").get<std::string>();
                 const int amount = args.at("amount");
                 const int balance = ctx.get<int>(from);
                 pop::result r;
                 r.set("domain.receipts." + args.at("id").get<std::string>(), amount);
                 if (balance < amount) return r;  // declined, but the receipt is recorded
                 r.set(from, balance - amount);
                 r.set(to, ctx.get<int>(to) + amount);
                 r.emit("transfer.done", args, args.at("from"));
                 return r;
               })
              .ok());

  std::atomic<bool> done{false};
  std::atomic<int> violations{0};
  std::atomic<long> snapshots{0};
  std::atomic<int> notified{0};
  pop::subscription sub = e.on_commit([&](std::uint64_t) { notified.fetch_add(1); });
  std::vector<std::thread> threads;
  // A view kept without its snapshot: commits applied in place must leave its version alone.
  threads.emplace_back([&] {
    while (!done.load()) {
      const pop::value_view held = e.snapshot().view(pop::path::parse("domain.accounts").value());
      for (int look = 0; look < 3; ++look) {
        int total = 0;
        held.for_each_member([&](std::string_view, const pop::value_view& v) {
          total += v.get<int>();
          return true;
        });
        if (total != accounts * 100) violations.fetch_add(1);
        std::this_thread::yield();  // (lets commits in while the view is held; not a wait)
      }
    }
  });
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&] {
      std::uint64_t last = 0;
      while (!done.load()) {
        const pop::snapshot s = e.snapshot();
        if (s.version() < last) violations.fetch_add(1);  // versions never go back
        last = s.version();
        int total = 0;
        s.view(pop::path::parse("domain.accounts").value())
            .for_each_member([&](std::string_view, const pop::value_view& v) {
              total += v.get<int>();
              return true;
            });
        if (total != accounts * 100) violations.fetch_add(1);
        snapshots.fetch_add(1);
      }
    });
  }
  std::atomic<int> committed{0};
  for (int w = 0; w < writers; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937 rng(seed + static_cast<unsigned>(w));
      for (int i = 0; i < transfers_per_writer; ++i) {
        const int from = static_cast<int>(rng() % accounts);
        const int to = (from + 1 + static_cast<int>(rng() % (accounts - 1))) % accounts;
        const std::string id = "w" + std::to_string(w) + "-" + std::to_string(i);
        const auto c = e.execute("transfer", {{"from", "a" + std::to_string(from)},
                                              {"to", "a" + std::to_string(to)},
                                              {"amount", static_cast<int>(rng() % 50)},
                                              {"id", id}});
        if (!c.ok()) {
          violations.fetch_add(1);
          continue;
        }
        committed.fetch_add(1);
        // An acknowledged commit is visible to every later snapshot.
        const pop::snapshot after = e.snapshot();
        if (after.version() < c->version || !after.read("domain.receipts." + id).ok()) {
          violations.fetch_add(1);
        }
      }
    });
  }
  for (std::size_t i = 3; i < threads.size(); ++i) threads[i].join();
  done = true;
  for (std::size_t i = 0; i < 3; ++i) threads[i].join();

  CHECK(violations == 0);
  CHECK(committed == writers * transfers_per_writer);
  const pop::snapshot end = e.snapshot();
  CHECK(end.version() == static_cast<std::uint64_t>(writers * transfers_per_writer));
  CHECK(end.read("domain.receipts").value().size() ==
        static_cast<std::size_t>(writers * transfers_per_writer));
  int total = 0;
  const json final_accounts = end.read("domain.accounts").value();
  for (const auto& [k, v] : final_accounts.items()) total += v.get<int>();
  CHECK(total == accounts * 100);
  // Every emitted message has a unique id and sits in the outbox once.
  const auto pending = end.pending_messages().value();
  std::set<std::string> ids;
  for (const auto& m : pending) ids.insert(m.id);
  CHECK(ids.size() == pending.size());
  CHECK(notified == writers * transfers_per_writer);
  CHECK(snapshots > 0);
}

TEST_CASE("concurrent appends to the outbox never conflict with each other or with clears by id",
          "[engine][concurrency]") {
  auto e_owner = pop::test::must(pop::engine::open(pop::options{.retry = {.max_attempts = 1}}));
  pop::engine& e = *e_owner;  // a conflict would fail the test
  REQUIRE(e.register_process({.name = "emit", .emits = {"t"}}, [](const pop::context&,
                                                                  const json& args) {
             pop::result r;
             r.emit("t", args, "", {{"from", std::to_string(args.at("p").get<int>())}});
             return r;
           }).ok());
  constexpr int producers = 3;
  constexpr int per_producer = 500;
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::atomic<int> cleared{0};
  // Every message as the clearer saw it: a commit rebuilt on a newer head keeps its payload and
  // headers (they are moved into the first build and copied from it).
  std::set<std::pair<int, int>> seen;
  std::atomic<int> bad_messages{0};
  std::thread clearer([&] {
    // A relay-like clearer: deletes whatever is pending, by id, with key-level CAS.
    while (!stop.load() || e.snapshot().pending_count() > 0) {
      const pop::snapshot s = e.snapshot();
      const auto pending = s.pending_messages(64).value();
      if (pending.empty()) continue;
      std::vector<pop::write> writes;
      for (const auto& m : pending) writes.push_back({"domain.outbox_queue." + m.id, std::nullopt});
      const auto r = e.compare_and_swap(s.version(), writes, pop::cas_mode::keys);
      if (!r.ok() || !r->committed) {
        failures.fetch_add(1);
        continue;
      }
      cleared.fetch_add(static_cast<int>(pending.size()));
      for (const auto& m : pending) {
        if (!m.payload.is_object()) {
          bad_messages.fetch_add(1);
          continue;
        }
        const int p = m.payload.value("p", -1);
        const auto from = m.headers.find("from");
        if (from == m.headers.end() || from->second != std::to_string(p) ||
            !seen.insert({p, m.payload.value("i", -1)}).second) {
          bad_messages.fetch_add(1);
        }
      }
    }
  });
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      for (int i = 0; i < per_producer; ++i) {
        if (!e.execute("emit", {{"p", p}, {"i", i}}).ok()) failures.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  stop = true;
  clearer.join();
  CHECK(failures == 0);
  CHECK(cleared == producers * per_producer);
  CHECK(e.snapshot().pending_count() == 0);
  CHECK(bad_messages == 0);
  CHECK(seen.size() == static_cast<std::size_t>(producers * per_producer));
  CHECK(seen.begin()->first == 0);
  CHECK(seen.rbegin()->first == producers - 1);
}

namespace {
// Registers "emit": one message of topic "t", key "k", its arguments as payload.
void register_emit(pop::engine& e) {
  REQUIRE(e.register_process({.name = "emit", .emits = {"t"}}, [](const pop::context&,
                                                                  const json& args) {
             pop::result r;
             r.emit("t", args, "k");
             return r;
           }).ok());
}
}  // namespace

TEST_CASE("threads reading one stored message as JSON at once all see the same value",
          "[engine][concurrency]") {
  pop::engine e;
  register_emit(e);
  const std::string id = e.execute("emit", {{"n", 1}}).value().message_ids.at(0);
  const pop::snapshot s = e.snapshot();
  // The message is kept typed; its JSON form is built by whichever reader comes first.
  const pop::value_view stored = s.view(e.outbox_path()).member(id);
  REQUIRE(stored.message() != nullptr);
  std::vector<json> seen(4);
  std::vector<std::thread> readers;
  for (std::size_t t = 0; t < seen.size(); ++t) {
    readers.emplace_back([&, t] { seen[t] = stored.member("payload").to_json(); });
  }
  for (auto& t : readers) t.join();
  for (const json& j : seen) CHECK(j == json{{"n", 1}});
  CHECK(stored.to_json() == stored.message()->to_json());
}

TEST_CASE("threads decoding one stored message at once all get the same message",
          "[engine][concurrency]") {
  pop::engine e;
  register_emit(e);
  for (int round = 0; round < 20; ++round) {
    const std::string id = e.execute("emit", {{"n", round}}).value().message_ids.at(0);
    const pop::snapshot s = e.snapshot();
    // Kept as a record: the first message() decodes it, whichever thread that is.
    const pop::value_view stored = s.view(e.outbox_path()).member(id);
    std::vector<const pop::outbox_message*> seen(4);
    std::vector<std::thread> readers;
    for (std::size_t t = 0; t < seen.size(); ++t) {
      readers.emplace_back([&, t] { seen[t] = stored.message(); });
    }
    for (auto& t : readers) t.join();
    REQUIRE(seen[0] != nullptr);
    for (const pop::outbox_message* m : seen) CHECK(m == seen[0]);
    CHECK(seen[0]->payload == json{{"n", round}});
    CHECK(seen[0]->id == id);
  }
}

TEST_CASE("concurrent journaled commits are durable when acknowledged, with snapshots meanwhile",
          "[engine][concurrency][journal]") {
  // Committers write their own groups when alone and the journal's thread writes them under
  // contention or builds snapshots (every 40 versions here) while they commit: every commit
  // acknowledged is durable at once, survives a reopen, and nothing else is there.
  constexpr int writers = 6;
  constexpr int commits_per_writer = 150;
  pop::test::temp_dir dir;
  pop::options o;
  o.journal = dir.file("j.db");
  o.durability = pop::durability::process;
  o.journal_tuning.snapshot_every = 40;
  o.journal_tuning.max_group = 4;  // several groups at once
  // The commit log as configured by default; none (every commit waits for SQLite); and the
  // smallest (wrapping around many times, committers waiting for room).
  o.journal_tuning.log_bytes =
      GENERATE(std::size_t{8} << 20, std::size_t{0}, std::size_t{64} << 10);
  INFO("log_bytes: " << o.journal_tuning.log_bytes);
  o.retry.max_attempts = 1000;
  json expected;
  {
    auto e = pop::test::must(pop::engine::open(o));
    REQUIRE(e->register_process({.name = "put", .outputs = {"domain.w"}, .emits = {"put.done"}},
                                [](const pop::context&, const json& args) {
                                  pop::result r;
                                  const std::string at = "domain.w." +
                                                         args.at("w").get<std::string>() + "." +
                                                         std::to_string(args.at("i").get<int>());
                                  r.set(at, args);
                                  r.emit("put.done", args, args.at("w").get<std::string>());
                                  return r;
                                })
                .ok());
    std::atomic<int> not_durable{0};
    std::atomic<int> failed{0};
    std::vector<std::thread> threads;
    // With `batched`, odd writers commit in engine::batch calls of 10: acknowledged when each
    // batch returns, while the even ones' commits are acknowledged one by one.
    const bool batched = GENERATE(false, true);
    INFO("batched: " << batched);
    for (int w = 0; w < writers; ++w) {
      threads.emplace_back([&, w] {
        const auto put = [&](int i) -> std::uint64_t {
          const absl::StatusOr<pop::commit> c =
              e->execute("put", {{"w", "w" + std::to_string(w)}, {"i", i}});
          if (!c.ok() || !c->changed) {
            failed.fetch_add(1);
            return 0;
          }
          return c->version;
        };
        if (batched && w % 2 == 1) {
          for (int i = 0; i < commits_per_writer; i += 10) {
            std::uint64_t last = 0;
            const absl::Status b = e->batch([&] {
              for (int k = i; k < i + 10 && k < commits_per_writer; ++k) {
                last = std::max(last, put(k));
              }
              return absl::OkStatus();
            });
            if (!b.ok()) failed.fetch_add(1);
            if (e->durable_version() < last) not_durable.fetch_add(1);
          }
          return;
        }
        for (int i = 0; i < commits_per_writer; ++i) {
          const std::uint64_t v = put(i);
          if (v != 0 && e->durable_version() < v) not_durable.fetch_add(1);
        }
      });
    }
    for (std::thread& t : threads) t.join();
    CHECK(failed.load() == 0);
    CHECK(not_durable.load() == 0);
    CHECK(e->version() == writers * commits_per_writer);
    expected = e->snapshot().to_json();
  }
  const pop::journal_info info = pop::test::must(pop::verify_journal(o.journal));
  CHECK(info.last_version == writers * commits_per_writer);
  CHECK(info.snapshot_version + o.journal_tuning.snapshot_every > info.last_version);
  auto reopened = pop::test::must(pop::engine::open(o));
  CHECK(reopened->version() == writers * commits_per_writer);
  CHECK(reopened->snapshot().to_json() == expected);
  CHECK(expected["domain"]["w"]["w0"].size() == commits_per_writer);
  CHECK(expected["domain"]["outbox_queue"].size() == writers * commits_per_writer);
}
