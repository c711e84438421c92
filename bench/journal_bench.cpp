// Durable commits: pop's journal (group commit) against the classic outbox-table pattern, in the
// same run, on the same disk (the working directory; never run this on a tmpfs).
//   build/bench/journal_bench --benchmark_counters_tabular=true
// Arguments: level (1 = durability::process, 2 = durability::power), writers.
#include <benchmark/benchmark.h>
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <thread>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "pop/contracts/status.hpp"
#include "pop/relay/relay.hpp"

namespace asio = boost::asio;
using pop::json;
using steady = std::chrono::steady_clock;

namespace {

constexpr int max_threads = 64;

std::string journal_file(const char* name) {
  const std::string file =
      (std::filesystem::current_path() /
       (std::string("journal-bench-") + name + "-" + std::to_string(::getpid()) + ".db"))
          .string();
  for (const char* suffix : {"", "-wal", "-shm", "-head", "-log"})
    std::filesystem::remove(file + suffix);
  return file;
}

void remove_journal(const std::string& file) {
  for (const char* suffix : {"", "-wal", "-shm", "-head", "-log"})
    std::filesystem::remove(file + suffix);
}

// Per-thread commit latencies, merged by thread 0 after the loop's closing barrier.
struct latencies {
  std::array<std::vector<std::int64_t>, max_threads> per_thread;
  void report(benchmark::State& state) {
    std::vector<std::int64_t> all;
    for (auto& v : per_thread) {
      all.insert(all.end(), v.begin(), v.end());
      v.clear();
    }
    if (all.empty()) return;
    std::sort(all.begin(), all.end());
    state.counters["p50_us"] = static_cast<double>(all[all.size() / 2]);
    state.counters["p99_us"] =
        static_cast<double>(all[std::min(all.size() - 1, all.size() * 99 / 100)]);
  }
};

// An in-process sink: acknowledges at once.
class null_sink final : public pop::sink {
 public:
  std::optional<absl::Status> publish_now(const pop::outbox_message&) override {
    return absl::OkStatus();
  }
  asio::awaitable<absl::Status> publish(const pop::outbox_message&) override {
    co_return absl::OkStatus();
  }
};

// Registers "place": writes args[1] at domain.items.<args[0]> and emits it, keyed by args[0].
void register_place(pop::engine& e) {
  const absl::Status s =
      e.register_process({.name = "place", .outputs = {"domain.items"}, .emits = {"item.placed"}},
                         [](const pop::context&, const json& args) {
                           pop::result r;
                           r.set("domain.items." + args.at(0).get<std::string>(), args.at(1));
                           r.emit("item.placed", args, args.at(0).get<std::string>());
                           return r;
                         });
  if (!s.ok()) std::abort();
}

// pop: each commit is one process run writing one value and emitting one message, journaled at
// the level, while a relay publishes and clears on its own thread.
struct pop_fixture {
  std::string file;
  std::unique_ptr<pop::engine> engine;
  null_sink sink;
  std::unique_ptr<pop::relay> relay;
  asio::io_context io;
  asio::cancellation_signal stop;
  std::thread relay_thread;

  explicit pop_fixture(pop::durability level) : file(journal_file("pop")) {
    pop::options o;
    o.journal = file;
    o.durability = level;
    o.audit_capacity = 0;
    engine = pop::engine::open(o).value();
    register_place(*engine);
    relay = pop::relay::create(*engine, sink).value();
    asio::co_spawn(
        io, relay->run(),
        asio::bind_cancellation_slot(stop.slot(), [](std::exception_ptr, absl::Status) {}));
    relay_thread = std::thread([this] { io.run(); });
  }
  ~pop_fixture() {
    asio::post(io, [this] { stop.emit(asio::cancellation_type::terminal); });
    relay_thread.join();
    relay.reset();
    engine.reset();
    remove_journal(file);
  }
};

pop_fixture* pop_shared = nullptr;
latencies pop_latencies;

void BM_durable_commit(benchmark::State& state) {
  const auto level = state.range(0) == 2 ? pop::durability::power : pop::durability::process;
  if (state.thread_index() == 0) pop_shared = new pop_fixture(level);
  auto& mine = pop_latencies.per_thread[static_cast<std::size_t>(state.thread_index())];
  const std::string key = "w" + std::to_string(state.thread_index());
  std::int64_t i = 0;
  for (auto _ : state) {
    const auto start = steady::now();
    if (!pop_shared->engine->execute("place", json::array({key, ++i})).ok()) std::abort();
    mine.push_back(
        std::chrono::duration_cast<std::chrono::microseconds>(steady::now() - start).count());
  }
  state.SetItemsProcessed(state.iterations());
  if (state.thread_index() == 0) {
    pop_latencies.report(state);
    delete pop_shared;
    pop_shared = nullptr;
  }
}

// The classic pattern: the business update and an outbox_events insert in one SQLite
// transaction per commit (one connection per writer), and a poller that selects pending rows in
// batches of 100, publishes them and marks them processed.
struct classic_fixture {
  std::string file;
  std::atomic<bool> stopping{false};
  std::atomic<std::uint64_t> published{0};
  std::thread poller;
  const char* sync;

  explicit classic_fixture(pop::durability level)
      : file(journal_file("classic")),
        sync(level == pop::durability::power ? "PRAGMA synchronous=FULL"
                                             : "PRAGMA synchronous=NORMAL") {
    sqlite3* db = connect();
    exec(db,
         "CREATE TABLE business(k TEXT PRIMARY KEY, v INTEGER);"
         "CREATE TABLE outbox_events(id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, "
         "payload TEXT, processed INTEGER NOT NULL DEFAULT 0);"
         "CREATE INDEX outbox_pending ON outbox_events(processed, id);");
    sqlite3_close(db);
    poller = std::thread([this] { poll(); });
  }
  ~classic_fixture() {
    stopping = true;
    poller.join();
    remove_journal(file);
  }
  sqlite3* connect() const {
    sqlite3* db = nullptr;
    if (sqlite3_open(file.c_str(), &db) != SQLITE_OK) std::abort();
    sqlite3_busy_timeout(db, 60'000);
    exec(db, "PRAGMA journal_mode=WAL");
    exec(db, sync);
    return db;
  }
  static void exec(sqlite3* db, const char* sql) {
    if (sqlite3_exec(db, sql, nullptr, nullptr, nullptr) != SQLITE_OK) {
      std::fprintf(stderr, "classic: %s: %s\n", sql, sqlite3_errmsg(db));
      std::abort();
    }
  }
  void poll() {
    sqlite3* db = connect();
    sqlite3_stmt* select = nullptr;
    sqlite3_prepare_v2(db,
                       "SELECT id, topic, payload FROM outbox_events WHERE processed = 0 ORDER BY "
                       "id LIMIT 100",
                       -1, &select, nullptr);
    sqlite3_stmt* mark = nullptr;
    sqlite3_prepare_v2(db, "UPDATE outbox_events SET processed = 1 WHERE id = ?", -1, &mark,
                       nullptr);
    while (!stopping) {
      exec(db, "BEGIN IMMEDIATE");
      std::vector<std::int64_t> ids;
      while (sqlite3_step(select) == SQLITE_ROW) ids.push_back(sqlite3_column_int64(select, 0));
      sqlite3_reset(select);
      for (const std::int64_t id : ids) {
        sqlite3_bind_int64(mark, 1, id);
        sqlite3_step(mark);
        sqlite3_reset(mark);
      }
      exec(db, "COMMIT");
      published += ids.size();
      if (ids.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(1));  // poll interval
    }
    sqlite3_finalize(select);
    sqlite3_finalize(mark);
    sqlite3_close(db);
  }
};

classic_fixture* classic_shared = nullptr;
latencies classic_latencies;

void BM_classic_outbox_table(benchmark::State& state) {
  const auto level = state.range(0) == 2 ? pop::durability::power : pop::durability::process;
  if (state.thread_index() == 0) classic_shared = new classic_fixture(level);
  auto& mine = classic_latencies.per_thread[static_cast<std::size_t>(state.thread_index())];
  sqlite3* db = nullptr;
  sqlite3_stmt* update = nullptr;
  sqlite3_stmt* insert = nullptr;
  const std::string key = "w" + std::to_string(state.thread_index());
  std::int64_t i = 0;
  bool ready = false;
  for (auto _ : state) {
    if (!ready) {
      state.PauseTiming();
      db = classic_shared->connect();
      sqlite3_prepare_v2(db, "INSERT OR REPLACE INTO business(k, v) VALUES (?, ?)", -1, &update,
                         nullptr);
      sqlite3_prepare_v2(db, "INSERT INTO outbox_events(topic, payload) VALUES ('item.placed', ?)",
                         -1, &insert, nullptr);
      ready = true;
      state.ResumeTiming();
    }
    const auto start = steady::now();
    classic_fixture::exec(db, "BEGIN IMMEDIATE");
    sqlite3_bind_text(update, 1, key.c_str(), -1, SQLITE_STATIC);
    sqlite3_bind_int64(update, 2, ++i);
    sqlite3_step(update);
    sqlite3_reset(update);
    const std::string payload = json::array({key, i}).dump();
    sqlite3_bind_text(insert, 1, payload.c_str(), -1, SQLITE_STATIC);
    sqlite3_step(insert);
    sqlite3_reset(insert);
    classic_fixture::exec(db, "COMMIT");
    mine.push_back(
        std::chrono::duration_cast<std::chrono::microseconds>(steady::now() - start).count());
  }
  sqlite3_finalize(update);
  sqlite3_finalize(insert);
  sqlite3_close(db);
  state.SetItemsProcessed(state.iterations());
  if (state.thread_index() == 0) {
    classic_latencies.report(state);
    delete classic_shared;
    classic_shared = nullptr;
  }
}

// Reopening a journal: the snapshot loaded and every record after it replayed. Arg: records
// after the snapshot (each a write and a message, with a clear of the messages every 1,000).
// What snapshot_every and snapshot_bytes trade: how long an open may take.
void BM_reopen(benchmark::State& state) {
  const auto records = static_cast<std::int64_t>(state.range(0));
  const std::string file = journal_file("reopen");
  pop::options o;
  o.journal = file;
  o.durability = pop::durability::process;
  o.audit_capacity = 0;
  o.journal_tuning.snapshot_every = std::uint64_t{1} << 40;
  o.journal_tuning.snapshot_bytes = std::uint64_t{1} << 40;
  std::int64_t written = 0;
  {
    auto e = pop::engine::open(o).value();
    register_place(*e);
    const absl::Status s = e->batch([&]() -> absl::Status {
      while (written < records) {
        const std::string key = "w" + std::to_string(written % 64);
        POP_RETURN_IF_ERROR(e->execute("place", json::array({key, written})).status());
        ++written;
        if (written % 1000 == 0) {
          const pop::snapshot snap = e->snapshot();
          std::vector<std::string> ids;
          snap.view(e->outbox_path()).for_each_member([&](std::string_view id, const auto&) {
            ids.emplace_back(id);
            return true;
          });
          POP_RETURN_IF_ERROR(e->clear_messages(snap, ids).status());
          ++written;
        }
      }
      return absl::OkStatus();
    });
    if (!s.ok()) std::abort();
  }
  for (auto _ : state) {
    auto e = pop::engine::open(o);
    if (!e.ok()) std::abort();
    benchmark::DoNotOptimize(e);
    state.PauseTiming();
    e->reset();
    state.ResumeTiming();
  }
  state.counters["records"] = static_cast<double>(written);
  state.counters["records_per_s"] =
      benchmark::Counter(static_cast<double>(written) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
  remove_journal(file);
}
BENCHMARK(BM_reopen)->Arg(100'000)->Arg(250'000)->Unit(benchmark::kMillisecond)->UseRealTime();

void levels_and_writers(benchmark::internal::Benchmark* b) {
  for (const int level : {1, 2}) b->Arg(level);
}

}  // namespace

BENCHMARK(BM_durable_commit)
    ->Apply(levels_and_writers)
    ->Threads(1)
    ->Threads(8)
    ->Threads(64)
    ->UseRealTime();
BENCHMARK(BM_classic_outbox_table)
    ->Apply(levels_and_writers)
    ->Threads(1)
    ->Threads(8)
    ->Threads(64)
    ->UseRealTime();

BENCHMARK_MAIN();
