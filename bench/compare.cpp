// pop_compare: one end-to-end outbox workload on several designs, in one binary.
//
// P producer threads each run N/P transactions "update one order and emit one event" (the event
// keyed by its producer); one relay publishes the events to an in-process sink. Prints one JSON
// line: throughput (events published per second, from the first commit to the last publish),
// commit-to-publish latency p50/p99, and the delivery check: every committed event published at
// least once, in commit order per key, and nothing published that was not committed.
//
//   pop_compare --design pop-memory --producers 8 --commits 100000 [--rate 10000]
// Designs: mutex (std::mutex + unordered_map + deque, batched relay), sqlite (an outbox table,
// WAL, synchronous=NORMAL, a polling relay), pop-memory, pop-process, pop-power (pop with a
// journal at that durability). With --rate, the producers together commit at that paced rate
// (for latency without a backlog). Files go to the working directory.
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "bench/support/latency.hpp"
#include "pop/relay/relay.hpp"

namespace asio = boost::asio;
using pop::json;
using pop::bench::now_us;

namespace {

// What the sink saw: per producer, the sequence numbers in publish order; latencies.
class recorder {
 public:
  explicit recorder(int producers) : seen_(static_cast<std::size_t>(producers)) {}
  // Called by the one relay thread of each design.
  void published(int producer, std::int64_t seq, std::int64_t committed_at_us) {
    seen_[static_cast<std::size_t>(producer)].push_back(seq);
    latencies_.push_back(now_us() - committed_at_us);
    count_.fetch_add(1, std::memory_order_release);
  }
  std::size_t count() const { return count_.load(std::memory_order_acquire); }
  // "ok", or what is wrong: each producer's events 0..per-1 published in order, at least once.
  std::string check(std::int64_t per_producer) const {
    for (std::size_t p = 0; p < seen_.size(); ++p) {
      std::int64_t next = 0;  // the next first-time sequence expected
      for (const std::int64_t seq : seen_[p]) {
        if (seq >= per_producer) return "producer " + std::to_string(p) + ": uncommitted event";
        if (seq == next) {
          ++next;
        } else if (seq > next) {
          return "producer " + std::to_string(p) + ": event " + std::to_string(seq) +
                 " published before " + std::to_string(next);
        }  // seq < next: a re-publish (at least once)
      }
      if (next != per_producer) {
        return "producer " + std::to_string(p) + ": " + std::to_string(per_producer - next) +
               " events never published";
      }
    }
    return "ok";
  }
  std::vector<std::int64_t>& latencies() { return latencies_; }

 private:
  std::vector<std::vector<std::int64_t>> seen_;
  std::vector<std::int64_t> latencies_;
  std::atomic<std::size_t> count_{0};
};

struct workload {
  int producers = 1;
  std::int64_t commits = 10'000;
  double rate = 0;  // commits per second for all producers together; 0: as fast as possible
  std::int64_t per_producer() const { return commits / producers; }
};

// A design: start() brings up its relay; commit() runs one transaction on a producer thread;
// stop() shuts down (after every event is published).
struct design {
  virtual ~design() = default;
  virtual void commit(int producer, std::int64_t seq) = 0;
  virtual void stop() = 0;
  // Transactions the relay spent recording what it published (pop only).
  virtual std::uint64_t relay_commits() const { return 0; }
  // Commits that waited for the relay first (pop's flow control, options::pace_pending).
  virtual std::uint64_t paced() const { return 0; }
};

// pop's settings a run may change.
struct pop_tuning {
  std::optional<std::int64_t> spin_us;  // relay_options::spin
  std::optional<std::size_t> pace;      // options::pace_pending
};

// std::mutex over an unordered_map and a deque; a relay thread takes whole batches.
class mutex_design final : public design {
 public:
  explicit mutex_design(recorder& r) : rec_(r), relay_([this] { relay(); }) {}
  void commit(int producer, std::int64_t seq) override {
    {
      std::lock_guard lock(mu_);
      orders_["o" + std::to_string(producer) + "-" + std::to_string(seq % 1000)] = seq;
      outbox_.push_back({producer, seq, now_us()});
    }
    cv_.notify_one();
  }
  void stop() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_one();
    relay_.join();
  }

 private:
  struct event {
    int producer;
    std::int64_t seq;
    std::int64_t at_us;
  };
  void relay() {
    std::deque<event> batch;
    for (;;) {
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || !outbox_.empty(); });
        if (outbox_.empty()) return;
        batch.swap(outbox_);
      }
      for (const event& e : batch) rec_.published(e.producer, e.seq, e.at_us);
      batch.clear();
    }
  }
  recorder& rec_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<std::string, std::int64_t> orders_;
  std::deque<event> outbox_;
  bool stopping_ = false;
  std::thread relay_;
};

std::string fresh_file(const char* name) {
  const std::string file =
      (std::filesystem::current_path() /
       (std::string("compare-") + name + "-" + std::to_string(::getpid()) + ".db"))
          .string();
  for (const char* suffix : {"", "-wal", "-shm", "-head", "-log"})
    std::filesystem::remove(file + suffix);
  return file;
}

void exec(sqlite3* db, const char* sql) {
  if (sqlite3_exec(db, sql, nullptr, nullptr, nullptr) != SQLITE_OK) {
    std::fprintf(stderr, "sqlite: %s: %s\n", sql, sqlite3_errmsg(db));
    std::abort();
  }
}

// An outbox table: producers insert the event in their business transaction; a relay polls
// (every millisecond when idle), publishes, and deletes what it published.
class sqlite_design final : public design {
 public:
  sqlite_design(recorder& r, int producers) : rec_(r), file_(fresh_file("sqlite")) {
    sqlite3* db = connect();
    exec(db,
         "CREATE TABLE orders(k TEXT PRIMARY KEY, v INTEGER);"
         "CREATE TABLE outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, producer INTEGER, "
         "seq INTEGER, at_us INTEGER);");
    sqlite3_close(db);
    for (int p = 0; p < producers; ++p) conns_.push_back(std::make_unique<conn>(connect()));
    relay_ = std::thread([this] { relay(); });
  }
  ~sqlite_design() override {
    for (const char* suffix : {"", "-wal", "-shm", "-head", "-log"})
      std::filesystem::remove(file_ + suffix);
  }
  void commit(int producer, std::int64_t seq) override {
    conn& c = *conns_[static_cast<std::size_t>(producer)];
    exec(c.db, "BEGIN IMMEDIATE");
    const std::string k = "o" + std::to_string(producer) + "-" + std::to_string(seq % 1000);
    sqlite3_bind_text(c.update, 1, k.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(c.update, 2, seq);
    step(c.update);
    sqlite3_bind_int(c.insert, 1, producer);
    sqlite3_bind_int64(c.insert, 2, seq);
    sqlite3_bind_int64(c.insert, 3, now_us());
    step(c.insert);
    exec(c.db, "COMMIT");
  }
  void stop() override {
    stopping_ = true;
    relay_.join();
    conns_.clear();
  }

 private:
  struct conn {
    explicit conn(sqlite3* d) : db(d) {
      sqlite3_prepare_v2(db, "INSERT OR REPLACE INTO orders(k, v) VALUES (?, ?)", -1, &update,
                         nullptr);
      sqlite3_prepare_v2(db, "INSERT INTO outbox(producer, seq, at_us) VALUES (?, ?, ?)", -1,
                         &insert, nullptr);
    }
    ~conn() {
      sqlite3_finalize(update);
      sqlite3_finalize(insert);
      sqlite3_close(db);
    }
    sqlite3* db;
    sqlite3_stmt* update = nullptr;
    sqlite3_stmt* insert = nullptr;
  };
  static void step(sqlite3_stmt* s) {
    if (sqlite3_step(s) != SQLITE_DONE) std::abort();
    sqlite3_reset(s);
  }
  sqlite3* connect() const {
    sqlite3* db = nullptr;
    if (sqlite3_open(file_.c_str(), &db) != SQLITE_OK) std::abort();
    sqlite3_busy_timeout(db, 60'000);
    exec(db, "PRAGMA journal_mode=WAL");
    exec(db, "PRAGMA synchronous=NORMAL");
    return db;
  }
  void relay() {
    conn c(connect());
    sqlite3_stmt* select = nullptr;
    sqlite3_stmt* remove = nullptr;
    sqlite3_prepare_v2(c.db, "SELECT id, producer, seq, at_us FROM outbox ORDER BY id LIMIT 1000",
                       -1, &select, nullptr);
    sqlite3_prepare_v2(c.db, "DELETE FROM outbox WHERE id <= ?", -1, &remove, nullptr);
    for (;;) {
      std::int64_t last = -1;
      while (sqlite3_step(select) == SQLITE_ROW) {
        last = sqlite3_column_int64(select, 0);
        rec_.published(sqlite3_column_int(select, 1), sqlite3_column_int64(select, 2),
                       sqlite3_column_int64(select, 3));
      }
      sqlite3_reset(select);
      if (last >= 0) {
        sqlite3_bind_int64(remove, 1, last);
        step(remove);
        continue;
      }
      if (stopping_) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // the poll interval
    }
    sqlite3_finalize(select);
    sqlite3_finalize(remove);
  }
  recorder& rec_;
  std::string file_;
  std::vector<std::unique_ptr<conn>> conns_;
  std::atomic<bool> stopping_{false};
  std::thread relay_;
};

// pop's in-process sink: hands each message to the recorder.
class recording_sink final : public pop::sink {
 public:
  explicit recording_sink(recorder& r) : rec_(r) {}
  std::optional<absl::Status> publish_now(const pop::outbox_message& m) override {
    rec_.published(m.payload.at(0).get<int>(), m.payload.at(1).get<std::int64_t>(),
                   m.created_at_us);
    return absl::OkStatus();
  }
  asio::awaitable<absl::Status> publish(const pop::outbox_message& m) override {
    co_return *publish_now(m);
  }

 private:
  recorder& rec_;
};

// pop: a process updates one order and emits one event; a relay runs on its own thread.
class pop_design final : public design {
 public:
  pop_design(recorder& r, pop::durability level, const pop_tuning& tuning) : sink_(r) {
    pop::options o;
    o.audit_capacity = 0;
    if (tuning.pace) o.pace_pending = *tuning.pace;
    if (level != pop::durability::none) {
      file_ = fresh_file(level == pop::durability::power ? "pop-power" : "pop-process");
      o.journal = file_;
      o.durability = level;
    }
    engine_ = pop::engine::open(std::move(o)).value();
    const absl::Status s = engine_->register_process(
        {.name = "place", .outputs = {"domain.orders"}, .emits = {"order.placed"}},
        [](const pop::context&, const json& args) {
          const int producer = args.at(0).get<int>();
          const std::int64_t seq = args.at(1).get<std::int64_t>();
          pop::result r;
          r.set("domain.orders.o" + std::to_string(producer) + "-" + std::to_string(seq % 1000),
                seq);
          r.emit("order.placed", args, "p" + std::to_string(producer));
          return r;
        });
    if (!s.ok()) std::abort();
    pop::relay_options ro;
    if (tuning.spin_us) ro.spin = std::chrono::microseconds(*tuning.spin_us);
    relay_ = pop::relay::create(*engine_, sink_, ro).value();
    asio::co_spawn(
        io_, relay_->run(),
        asio::bind_cancellation_slot(stop_.slot(), [](std::exception_ptr, absl::Status) {}));
    thread_ = std::thread([this] { io_.run(); });
  }
  ~pop_design() override {
    if (!file_.empty()) {
      for (const char* suffix : {"", "-wal", "-shm", "-head", "-log"})
        std::filesystem::remove(file_ + suffix);
    }
  }
  void commit(int producer, std::int64_t seq) override {
    const absl::StatusOr<pop::commit> c = engine_->execute("place", json::array({producer, seq}));
    if (!c.ok()) {
      std::fprintf(stderr, "pop: %s\n", c.status().ToString().c_str());
      std::abort();
    }
  }
  std::uint64_t relay_commits() const override { return clears_; }
  std::uint64_t paced() const override { return paced_; }
  void stop() override {
    asio::post(io_, [this] { stop_.emit(asio::cancellation_type::terminal); });
    thread_.join();
    clears_ = relay_->metrics().clears;
    paced_ = engine_->pacing().paced;
    relay_.reset();
    engine_.reset();
  }

 private:
  recording_sink sink_;
  std::uint64_t clears_ = 0;
  std::uint64_t paced_ = 0;
  std::string file_;
  std::unique_ptr<pop::engine> engine_;
  std::unique_ptr<pop::relay> relay_;
  asio::io_context io_;
  asio::cancellation_signal stop_;
  std::thread thread_;
};

std::unique_ptr<design> make_design(const std::string& name, recorder& r, int producers,
                                    const pop_tuning& tuning) {
  if (name == "mutex") return std::make_unique<mutex_design>(r);
  if (name == "sqlite") return std::make_unique<sqlite_design>(r, producers);
  if (name == "pop-memory") return std::make_unique<pop_design>(r, pop::durability::none, tuning);
  if (name == "pop-process") {
    return std::make_unique<pop_design>(r, pop::durability::process, tuning);
  }
  if (name == "pop-power") return std::make_unique<pop_design>(r, pop::durability::power, tuning);
  return nullptr;
}

int usage() {
  std::fprintf(stderr,
               "usage: pop_compare --design mutex|sqlite|pop-memory|pop-process|pop-power "
               "[--producers P] [--commits N] [--rate COMMITS_PER_S] [--spin US] [--pace N]\n"
               "  --spin: pop's relay_options::spin in microseconds (default: the relay's)\n"
               "  --pace: pop's options::pace_pending (default: the engine's; 0: no flow "
               "control)\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string name;
  workload w;
  pop_tuning tuning;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const std::string value = argv[i + 1];
    if (flag == "--design") {
      name = value;
    } else if (flag == "--producers") {
      w.producers = std::stoi(value);
    } else if (flag == "--commits") {
      w.commits = std::stoll(value);
    } else if (flag == "--rate") {
      w.rate = std::stod(value);
    } else if (flag == "--spin") {
      tuning.spin_us = std::stoll(value);
    } else if (flag == "--pace") {
      tuning.pace = std::stoull(value);
    } else {
      return usage();
    }
  }
  if (argc % 2 == 0 || w.producers < 1 || w.per_producer() < 1) return usage();
  recorder rec(w.producers);
  std::unique_ptr<design> d = make_design(name, rec, w.producers, tuning);
  if (!d) return usage();
  const std::int64_t per = w.per_producer();
  const std::size_t total = static_cast<std::size_t>(per) * static_cast<std::size_t>(w.producers);
  rec.latencies().reserve(total + total / 4);
  // Each producer's commit i is due at start + i * interval (paced) or at once.
  const auto interval = std::chrono::nanoseconds(
      w.rate > 0 ? static_cast<std::int64_t>(1e9 * w.producers / w.rate) : 0);
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> producers;
  for (int p = 0; p < w.producers; ++p) {
    producers.emplace_back([&, p] {
      for (std::int64_t i = 0; i < per; ++i) {
        if (interval.count() > 0) {
          const auto due = start + interval * i;
          while (std::chrono::steady_clock::now() < due) std::this_thread::yield();
        }
        d->commit(p, i);
      }
    });
  }
  for (std::thread& t : producers) t.join();
  // Wait for the relay to publish everything, at most a minute.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (rec.count() < total && std::chrono::steady_clock::now() < give_up)
    std::this_thread::yield();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  d->stop();
  std::vector<std::int64_t>& lat = rec.latencies();
  std::sort(lat.begin(), lat.end());
  const auto pct = [&](double q) {
    return lat.empty() ? 0
                       : lat[std::min(lat.size() - 1, static_cast<std::size_t>(q * lat.size()))];
  };
  const std::string check = rec.check(per);
  std::printf("%s\n", json{{"design", name},
                           {"producers", w.producers},
                           {"commits", total},
                           {"rate", w.rate},
                           {"seconds", seconds},
                           {"published_per_s", static_cast<double>(rec.count()) / seconds},
                           {"p50_us", pct(0.50)},
                           {"p99_us", pct(0.99)},
                           {"relay_commits", d->relay_commits()},
                           {"paced", d->paced()},
                           {"check", check}}
                          .dump()
                          .c_str());
  return check == "ok" ? 0 : 1;
}
