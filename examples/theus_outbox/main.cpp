// The Theus outbox chapters translated line by line into pop: chapter 25 ("The Outbox Pattern":
// a list-shaped queue, producers returning the new queue, a relay clearing through a process) and
// chapter 18 ("Transactional Outbox": a relay persisting the buffer into an SQLite table and
// clearing by compare_and_swap). Each runs with concurrent producers while its relay clears, then
// checks that every message was delivered (persisted) exactly once and none was lost.
// Usage: theus_outbox [producers] [messages per producer]   (exit 1 if a check fails)
#include <sqlite3.h>

#include <unistd.h>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "pop/engine/engine.hpp"

using pop::json;

namespace {

// Chapter 25: `outbox_queue: list = []` in the state.
const json seed = {{"domain", {{"outbox_queue", json::array()}, {"users", json::object()}}}};

// Chapter 25's producer: append a free-form message to the queue it read and return the queue.
// (pop's own form, r.emit("SEND_EMAIL", payload), does the same without reading the queue.)
absl::StatusOr<pop::result> register_user(const pop::context& ctx, const json& args) {
  const json queue = ctx.get<json>("domain.outbox_queue");
  json new_queue = json::array();
  for (const auto& [id, message] : queue.items()) new_queue.push_back(message);
  const std::string name = args.at("name");
  new_queue.push_back(
      {{"topic", "SEND_EMAIL"}, {"to", name + "@example.com"}, {"body", "Hi " + name}});
  pop::result r;
  r.set("domain.users." + name, true);
  r.set("domain.outbox_queue", std::move(new_queue));
  return r;
}

// Chapter 25's relay clears through a process: it returns the queue without what was sent.
// (Returning [] would be just as safe in pop: it removes exactly the messages of the snapshot
// the process ran on, and keeps any appended meanwhile.)
absl::StatusOr<pop::result> clear_sent(const pop::context& ctx, const json& args) {
  const json queue = ctx.get<json>("domain.outbox_queue");
  json kept = json::array();
  for (const auto& [id, message] : queue.items()) {
    bool sent = false;
    for (const json& s : args.at("sent")) sent = sent || s == id;
    if (!sent) kept.push_back(message);
  }
  pop::result r;
  r.set("domain.outbox_queue", std::move(kept));
  return r;
}

bool check(bool ok, const std::string& what) {
  std::cout << (ok ? "  ok    " : "  FAIL  ") << what << "\n";
  return ok;
}

std::unique_ptr<pop::engine> chapter_engine() {
  auto e = pop::engine::open({.initial_state = seed});
  if (!e.ok()) {
    std::cerr << e.status() << "\n";
    std::exit(2);
  }
  const auto must = [](absl::Status s) {
    if (!s.ok()) {
      std::cerr << s << "\n";
      std::exit(2);
    }
  };
  must((*e)->register_process({.name = "register_user",
                               .inputs = {"domain.outbox_queue"},
                               .outputs = {"domain.users", "domain.outbox_queue"},
                               .emits = {"SEND_EMAIL"}},
                              register_user));
  must((*e)->register_process(
      {.name = "clear_sent", .inputs = {"domain.outbox_queue"}, .outputs = {"domain.outbox_queue"}},
      clear_sent));
  return *std::move(e);
}

// Runs `producers` threads of `per` register_user calls while `relay_round` runs until they are
// done and the queue is empty; between rounds the relay sleeps until a commit or the producers'
// end wakes it (no polling). Returns false if a producer failed.
template <class Round>
bool run_with_producers(pop::engine& e, int producers, int per, Round relay_round) {
  std::mutex mu;
  std::condition_variable woken;
  std::uint64_t commits = 0;  // guarded by mu
  int running = producers;    // guarded by mu
  const pop::subscription sub = e.on_commit([&](std::uint64_t) {
    {
      std::lock_guard lock(mu);
      ++commits;
    }
    woken.notify_one();
  });
  std::atomic<bool> failed{false};
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      for (int i = 0; i < per; ++i) {
        const std::string name = "u" + std::to_string(p) + "-" + std::to_string(i);
        if (!e.execute("register_user", {{"name", name}}).ok()) failed = true;
      }
      {
        std::lock_guard lock(mu);
        --running;
      }
      woken.notify_one();
    });
  }
  for (;;) {
    std::uint64_t seen = 0;
    {
      std::lock_guard lock(mu);
      seen = commits;
    }
    relay_round();
    std::unique_lock lock(mu);
    if (running == 0 && e.snapshot().pending_count() == 0) break;
    // Sleep only if nothing was committed since this round looked.
    woken.wait(lock, [&] { return commits != seen || running == 0; });
  }
  for (std::thread& t : threads) t.join();
  return !failed;
}

// Chapter 25: the relay reads the queue, sends each message, then clears what it sent.
bool chapter_25(int producers, int per) {
  std::cout << "chapter 25: relay clearing through a process\n";
  auto e = chapter_engine();
  std::map<std::string, int> mailbox;  // the "email server": recipient -> emails received
  const bool produced = run_with_producers(*e, producers, per, [&] {
    const json queue = e->snapshot().read("domain.outbox_queue").value();
    if (queue.empty()) return;
    json sent = json::array();
    for (const auto& [id, message] : queue.items()) {
      ++mailbox[message.at("payload").at("to").get<std::string>()];
      sent.push_back(id);
    }
    if (!e->execute("clear_sent", {{"sent", sent}}).ok()) std::exit(2);
  });
  bool ok = check(produced, "every producer committed");
  ok &= check(static_cast<int>(mailbox.size()) == producers * per, "every email was sent");
  bool once = true;
  for (const auto& [to, n] : mailbox) once = once && n == 1;
  ok &= check(once, "no email was sent twice");
  return ok;
}

// Chapter 18: the relay persists the buffer it read at version v into an SQLite table, then
// clears with compare_and_swap(v, {outbox_queue: []}). A strict CAS loses the race whenever a
// producer committed meanwhile and retries; a keys CAS commits and keeps the newer messages.
bool chapter_18(int producers, int per, pop::cas_mode mode, const std::string& db_file) {
  std::cout << "chapter 18: relay persisting into SQLite, clearing by compare_and_swap ("
            << (mode == pop::cas_mode::strict ? "strict" : "keys") << ")\n";
  auto e = chapter_engine();
  sqlite3* db = nullptr;
  std::filesystem::remove(db_file);
  if (sqlite3_open(db_file.c_str(), &db) != SQLITE_OK) std::exit(2);
  sqlite3_exec(db,
               "CREATE TABLE sent_events(id TEXT PRIMARY KEY, topic TEXT, payload TEXT);"
               "PRAGMA journal_mode=WAL;",
               nullptr, nullptr, nullptr);
  int lost_races = 0;
  const bool produced = run_with_producers(*e, producers, per, [&] {
    const pop::snapshot snap = e->snapshot();
    const auto buffer = snap.pending_messages();
    if (!buffer.ok()) std::exit(2);
    if (buffer->empty()) return;
    sqlite3_exec(db, "BEGIN", nullptr, nullptr, nullptr);
    for (const pop::outbox_message& m : *buffer) {
      sqlite3_stmt* s = nullptr;
      sqlite3_prepare_v2(db, "INSERT OR IGNORE INTO sent_events VALUES (?, ?, ?)", -1, &s, nullptr);
      const std::string payload = m.payload.dump();
      sqlite3_bind_text(s, 1, m.id.c_str(), -1, SQLITE_TRANSIENT);
      sqlite3_bind_text(s, 2, m.topic.c_str(), -1, SQLITE_TRANSIENT);
      sqlite3_bind_text(s, 3, payload.c_str(), -1, SQLITE_TRANSIENT);
      sqlite3_step(s);
      sqlite3_finalize(s);
    }
    sqlite3_exec(db, "COMMIT", nullptr, nullptr, nullptr);
    const auto r =
        e->compare_and_swap(snap.version(), {{"domain.outbox_queue", json::array()}}, mode);
    if (!r.ok()) std::exit(2);
    if (!r->committed) ++lost_races;  // re-read, re-persist (ignored duplicates), retry
  });
  sqlite3_stmt* count = nullptr;
  sqlite3_prepare_v2(
      db, "SELECT count(*), count(DISTINCT json_extract(payload, '$.to')) FROM sent_events", -1,
      &count, nullptr);
  sqlite3_step(count);
  const int rows = sqlite3_column_int(count, 0);
  const int recipients = sqlite3_column_int(count, 1);
  sqlite3_finalize(count);
  sqlite3_close(db);
  std::cout << "  (" << lost_races << " compare_and_swap races lost and retried)\n";
  bool ok = check(produced, "every producer committed");
  ok &= check(rows == producers * per,
              "every message persisted once (" + std::to_string(rows) + " rows)");
  ok &= check(recipients == producers * per, "one message per registered user");
  ok &= check(e->snapshot().pending_count() == 0, "the outbox ended empty and usable");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const int producers = argc > 1 ? std::atoi(argv[1]) : 4;
  const int per = argc > 2 ? std::atoi(argv[2]) : 250;
  if (producers < 1 || per < 1) {
    std::cerr << "usage: theus_outbox [producers >= 1] [messages per producer >= 1]\n";
    return 2;
  }
  const std::string db = (std::filesystem::temp_directory_path() /
                          ("theus_outbox_" + std::to_string(::getpid()) + ".db"))
                             .string();
  bool ok = chapter_25(producers, per);
  ok &= chapter_18(producers, per, pop::cas_mode::strict, db);
  ok &= chapter_18(producers, per, pop::cas_mode::keys, db);
  for (const char* suffix : {"", "-wal", "-shm", "-head", "-log"})
    std::filesystem::remove(db + suffix);
  std::cout << (ok ? "all checks passed\n" : "a check failed\n");
  return ok ? 0 : 1;
}
