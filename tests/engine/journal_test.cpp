// Tests of the SQLite journal: round trips, snapshots, recovery of crash images, refusals of
// damaged, foreign, newer or busy journals (each leaving the file as it was), verify_journal.
#include <rapidcheck/catch.h>
#include <catch2/catch.hpp>

#include <bit>
#include <limits>

#include "tests/support/must.hpp"

#include <sqlite3.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <thread>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "absl/strings/match.h"
#include "pop/contracts/status.hpp"
#include "pop/engine/detail/journal_format.hpp"
#include "pop/engine/detail/message_record.hpp"
#include "pop/engine/detail/packed.hpp"
#include "pop/relay/dead_letters.hpp"
#include "pop/relay/relay.hpp"
#include "tests/support/json_gen.hpp"
#include "tests/support/scripted_sink.hpp"
#include "tests/support/temp_dir.hpp"

using pop::json;
using pop::test::file_bytes;
using pop::test::temp_dir;

namespace {

pop::options journaled(const std::string& file, pop::durability level = pop::durability::process) {
  pop::options o;
  o.journal = file;
  o.durability = level;
  o.initial_state = {{"domain", {{"stock", {{"A1", 10}, {"B2", 5}}}}}};
  return o;
}

// Registers "take" (moves stock into an order and emits order.placed) and "forget" (deletes an
// order) on `e`.
void register_shop(pop::engine& e) {
  REQUIRE(e.register_process(
               {.name = "take",
                .inputs = {"domain.stock"},
                .outputs = {"domain.stock", "domain.orders"},
                .emits = {"order.placed"}},
               [](const pop::context& ctx, const json& args) {
                 const std::string sku = args.at("sku");
                 const std::string order = args.at("order");
                 pop::result r;
                 r.set("domain.stock." + sku, ctx.get<int>("domain.stock." + sku) - 1);
                 r.set("domain.orders." + order, {{"sku", sku}, {"note", args.value("note", "")}});
                 r.emit("order.placed", {{"order", order}}, order);
                 return r;
               })
              .ok());
  REQUIRE(
      e.register_process({.name = "forget", .outputs = {"domain.orders"}}, [](const pop::context&,
                                                                              const json& args) {
         pop::result r;
         r.erase("domain.orders." + args.at("order").get<std::string>());
         return r;
       }).ok());
}

std::unique_ptr<pop::engine> open_engine(const pop::options& o) {
  absl::StatusOr<std::unique_ptr<pop::engine>> e = pop::engine::open(o);
  INFO(e.status());
  REQUIRE(e.ok());
  register_shop(**e);
  return *std::move(e);
}

void sql(const std::string& file, const std::string& statement) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(file.c_str(), &db) == SQLITE_OK);
  char* err = nullptr;
  const int rc = sqlite3_exec(db, statement.c_str(), nullptr, nullptr, &err);
  INFO((err ? err : ""));
  sqlite3_free(err);
  sqlite3_close(db);
  REQUIRE(rc == SQLITE_OK);
}

// Another SQLite client holding the journal's write lock from construction to release(): the
// journal's writer cannot write a group meanwhile (it retries for 5 s, then fails the journal),
// so commits are acknowledged from the commit log alone.
class write_lock {
 public:
  explicit write_lock(const std::string& file) {
    REQUIRE(sqlite3_open(file.c_str(), &db_) == SQLITE_OK);
    sqlite3_busy_timeout(db_, 5000);
    REQUIRE(sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) == SQLITE_OK);
  }
  write_lock(const write_lock&) = delete;
  write_lock& operator=(const write_lock&) = delete;
  ~write_lock() { release(); }
  void release() {
    if (db_ == nullptr) return;
    CHECK(sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr) == SQLITE_OK);
    sqlite3_close(db_);
    db_ = nullptr;
  }

 private:
  sqlite3* db_ = nullptr;
};

// Copies the journal's files as they are now: the image a crash at this moment would leave.
void copy_crash_image(const std::string& from, const std::string& to) {
  for (const char* suffix : {"", "-wal", "-head", "-log"}) {
    const std::string bytes = file_bytes(from + suffix);
    if (!bytes.empty()) pop::test::write_bytes(to + suffix, bytes);
  }
}

}  // namespace

TEST_CASE("a journaled engine reopens with the same version, state, outbox and dead letters",
          "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  json state_before;
  std::uint64_t version_before = 0;
  {
    auto e = open_engine(journaled(file));
    CHECK(e->version() == 0);
    for (int i = 0; i < 6; ++i) {
      REQUIRE(
          e->execute("take", {{"sku", i % 2 ? "A1" : "B2"}, {"order", "o-" + std::to_string(i)}})
              .ok());
    }
    REQUIRE(e->execute("forget", {{"order", "o-2"}}).ok());
    REQUIRE(e->compare_and_swap(e->version(), {{"domain.flags.open", true}}).value().committed);
    // The relay delivers some, dead-letters one: its clears and records are commits too.
    pop::test::scripted_sink sink;
    sink.script = [](const pop::outbox_message& m) {
      return m.key == "o-1" ? pop::test::act::permanent : pop::test::act::ok;
    };
    int calls = 0;
    sink.script = [&, base = sink.script](const pop::outbox_message& m) {
      return ++calls <= 3 ? base(m) : pop::test::act::hang;
    };
    auto r_owner = pop::test::must(pop::relay::create(
        *e, sink, {.publish_timeout = std::chrono::milliseconds(5), .max_attempts = 100}));
    pop::relay& r = *r_owner;
    boost::asio::io_context io;
    boost::asio::cancellation_signal stop;
    boost::asio::co_spawn(
        io, r.run(),
        boost::asio::bind_cancellation_slot(stop.slot(), [](std::exception_ptr, absl::Status) {}));
    while (calls < 4) io.run_one();
    stop.emit(boost::asio::cancellation_type::terminal);
    io.run();
    CHECK(pop::test::must(pop::dead_letters::create(*e))->count() == 1);
    state_before = e->snapshot().to_json();
    version_before = e->version();
    CHECK(e->durable_version() == version_before);
  }
  const pop::journal_info info = pop::verify_journal(file).value();
  CHECK(info.clean);
  CHECK(info.last_version == version_before);
  // The audit trail survives: which process made each version, when, what it wrote and emitted.
  const std::vector<pop::journal_record_info> history = pop::read_journal(file).value();
  REQUIRE(history.size() == version_before);
  CHECK(history[0].version == 1);
  CHECK(history[0].process == "take");
  CHECK(history[0].at_us > 0);
  CHECK(history[0].writes ==
        std::vector<std::string>{"domain.stock.B2", "domain.orders.o-0",
                                 "domain.outbox_queue." + history[0].message_ids.at(0)});
  CHECK(history[6].process == "forget");
  CHECK(history[6].writes == std::vector<std::string>{"domain.orders.o-2"});
  CHECK(history[7].process == "compare_and_swap");
  CHECK(history.back().process == "compare_and_swap");  // the relay's last record
  CHECK(info.format_version == pop::journal_format_version);

  auto again = open_engine(journaled(file));
  CHECK(again->version() == version_before);
  CHECK(again->snapshot().to_json() == state_before);
  CHECK(again->snapshot().pending_count() == 3);  // 6 emitted, 2 delivered, 1 dead letter
  CHECK(pop::test::must(pop::dead_letters::create(*again))->count() == 1);
  // It goes on from there, and the next reopen sees that too.
  REQUIRE(again->execute("take", {{"sku", "A1"}, {"order", "o-9"}}).value().version ==
          version_before + 1);
  const json after = again->snapshot().to_json();
  again.reset();
  CHECK(open_engine(journaled(file))->snapshot().to_json() == after);
  const std::vector<pop::journal_record_info> later = pop::read_journal(file).value();
  REQUIRE(later.size() == history.size() + 1);
  for (std::size_t i = 0; i < history.size(); ++i) {
    CHECK(later[i].version == history[i].version);
    CHECK(later[i].at_us == history[i].at_us);
    CHECK(later[i].process == history[i].process);
    CHECK(later[i].writes == history[i].writes);
    CHECK(later[i].message_ids == history[i].message_ids);
  }
}

TEST_CASE("a relay on a reopened engine delivers what was pending", "[journal][relay]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  std::vector<std::string> ids;
  {
    auto e = open_engine(journaled(file));
    for (int i = 0; i < 5; ++i) {
      ids.push_back(e->execute("take", {{"sku", "A1"}, {"order", "o-" + std::to_string(i)}})
                        .value()
                        .message_ids.at(0));
    }
  }
  auto e = open_engine(journaled(file, pop::durability::power));
  pop::test::scripted_sink sink;
  auto r_owner = pop::test::must(pop::relay::create(*e, sink));
  pop::relay& r = *r_owner;
  boost::asio::io_context io;
  absl::Status drained = absl::UnknownError("not run");
  boost::asio::co_spawn(io, r.drain(), [&](std::exception_ptr, absl::Status s) { drained = s; });
  io.run();
  REQUIRE(drained.ok());
  CHECK(sink.acked == ids);
  e.reset();
  CHECK(open_engine(journaled(file))->snapshot().pending_count() == 0);
}

TEST_CASE("snapshots bound the journal and reopening replays only the records after them",
          "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  pop::options o = journaled(file);
  o.journal_tuning.snapshot_every = 10;
  json expected;
  {
    auto e = open_engine(o);
    for (int i = 0; i < 35; ++i) {
      REQUIRE(e->compare_and_swap(e->version(),
                                  {{"domain.counter", i}, {"domain.list.i" + std::to_string(i), i}})
                  .value()
                  .committed);
    }
    expected = e->snapshot().to_json();
  }
  const pop::journal_info info = pop::verify_journal(file).value();
  CHECK(info.last_version == 35);
  // A snapshot is taken at the newest version of the group that reaches snapshot_every versions
  // since the last one (groups form as the writer thread finds them: 27 happens as well as 30),
  // and the next is due snapshot_every versions later: never that many records to replay.
  CHECK(info.snapshot_version > 0);
  CHECK(info.last_version - info.snapshot_version < o.journal_tuning.snapshot_every);
  CHECK(info.records == 35 - info.snapshot_version);
  CHECK(open_engine(o)->snapshot().to_json() == expected);
}

TEST_CASE(
    "an open that replays a snapshot's worth of records writes a snapshot, so the next "
    "open replays none",
    "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  pop::options o = journaled(file);
  o.journal_tuning.snapshot_every = 1000;
  const auto commit = [&](int from, int to) {
    auto e = open_engine(o);
    for (int i = from; i < to; ++i) {
      REQUIRE(e->compare_and_swap(e->version(),
                                  {{"domain.counter", i}, {"domain.list.i" + std::to_string(i), i}})
                  .value()
                  .committed);
    }
    return e->snapshot().to_json();
  };
  // Engines that each run fewer commits than snapshot_every (as one killed every few hundred
  // commits does) never write a snapshot while they run.
  commit(0, 20);
  json expected = commit(20, 40);
  pop::journal_info info = pop::verify_journal(file).value();
  REQUIRE(info.snapshot_version == 0);
  REQUIRE(info.records == 40);
  const std::uint64_t bytes_of_40 = info.record_bytes;
  CHECK(bytes_of_40 > 40 * 32);
  // Fewer records than snapshot_every, fewer bytes than snapshot_bytes: the open writes nothing.
  o.journal_tuning.snapshot_every = 41;
  o.journal_tuning.snapshot_bytes = bytes_of_40 + 1;
  CHECK(open_engine(o)->snapshot().to_json() == expected);
  info = pop::verify_journal(file).value();
  CHECK(info.snapshot_version == 0);
  CHECK(info.records == 40);
  CHECK(info.record_bytes == bytes_of_40);
  // Exactly snapshot_every records: the open writes the snapshot of the version it opens at and
  // prunes the records before it.
  o.journal_tuning.snapshot_every = 40;
  CHECK(open_engine(o)->snapshot().to_json() == expected);
  info = pop::verify_journal(file).value();
  CHECK(info.snapshot_version == 40);
  CHECK(info.last_version == 40);
  CHECK(info.records == 0);
  CHECK(info.record_bytes == 0);
  CHECK(pop::read_journal(file).value().empty());
  CHECK(pop::read_journal_state(file, 40).value().state == expected);
  // By bytes: snapshot_bytes reached exactly, with fewer records than snapshot_every.
  o.journal_tuning.snapshot_every = 1000;
  expected = commit(40, 45);
  info = pop::verify_journal(file).value();
  REQUIRE(info.records == 5);
  o.journal_tuning.snapshot_bytes = info.record_bytes + 1;
  open_engine(o);
  CHECK(pop::verify_journal(file).value().snapshot_version == 40);
  o.journal_tuning.snapshot_bytes = info.record_bytes;
  {
    auto e = open_engine(o);
    CHECK(e->version() == 45);
    CHECK(e->snapshot().to_json() == expected);
  }
  info = pop::verify_journal(file).value();
  CHECK(info.snapshot_version == 45);
  CHECK(info.records == 0);
  // What the snapshot holds is the state: an engine opened on it goes on from there.
  auto e = open_engine(o);
  CHECK(e->snapshot().to_json() == expected);
  REQUIRE(e->compare_and_swap(45, {{"domain.counter", 45}}).value().committed);
  CHECK(e->version() == 46);
}

TEST_CASE("a batch's commits are acknowledged and notified when it returns, durable",
          "[journal][batch]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  pop::options o = journaled(file);
  o.journal_tuning.snapshot_every = 10;  // snapshots fall inside the batch
  json expected;
  {
    auto e = open_engine(o);
    std::vector<std::uint64_t> notified;
    pop::subscription sub = e->on_commit([&](std::uint64_t v) { notified.push_back(v); });
    std::vector<std::uint64_t> versions;
    const absl::Status batch = e->batch([&] {
      for (int i = 0; i < 35; ++i) {
        POP_ASSIGN_OR_RETURN(const pop::commit c,
                             e->execute("take", {{"sku", i % 2 ? "A1" : "B2"},
                                                 {"order", "o-" + std::to_string(i)}}));
        versions.push_back(c.version);
        // Each returns once installed: the next one sees it, nobody is told of it yet.
        if (e->snapshot().version() != c.version) return absl::InternalError("not installed");
        if (!notified.empty()) return absl::InternalError("notified inside the batch");
      }
      return absl::OkStatus();
    });
    REQUIRE(batch.ok());
    CHECK(versions.size() == 35);
    CHECK(versions.back() == 35);
    CHECK(e->durable_version() == 35);
    REQUIRE(!notified.empty());
    CHECK(notified.back() == 35);
    expected = e->snapshot().to_json();
  }
  const pop::journal_info info = pop::verify_journal(file).value();
  CHECK(info.last_version == 35);
  // Snapshots are written as they fall due (of the newest due version of a group), so the last
  // is fewer than snapshot_every versions behind.
  CHECK(info.snapshot_version > 0);
  CHECK(35 - info.snapshot_version < 10);
  CHECK(info.records == 35 - info.snapshot_version);
  CHECK(open_engine(o)->snapshot().to_json() == expected);
}

TEST_CASE("a batch runs at most max_batch_lag versions ahead of its journal", "[journal][batch]") {
  temp_dir dir;
  pop::options o = journaled(dir.file("shop.db"));
  o.journal_tuning.max_batch_lag = 16;
  auto e = open_engine(o);
  std::uint64_t worst = 0;
  const absl::Status batch = e->batch([&]() -> absl::Status {
    for (int i = 0; i < 300; ++i) {
      POP_RETURN_IF_ERROR(e->compare_and_swap(e->version(), {{"domain.n", i}}).status());
      worst = std::max(worst, e->version() - e->durable_version());
    }
    return absl::OkStatus();
  });
  REQUIRE(batch.ok());
  CHECK(worst <= 16);
  CHECK(e->durable_version() == 300);
  o.journal_tuning.max_batch_lag = 0;
  CHECK(pop::engine::open(o).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("a failing batch returns its body's error and keeps what it committed", "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  {
    auto e = open_engine(journaled(file));
    const absl::Status batch = e->batch([&]() -> absl::Status {
      POP_RETURN_IF_ERROR(e->execute("take", {{"sku", "A1"}, {"order", "o-1"}}).status());
      POP_RETURN_IF_ERROR(e->execute("take", {{"sku", "nope"}, {"order", "o-2"}}).status());
      return absl::OkStatus();
    });
    CHECK(batch.code() == absl::StatusCode::kNotFound);  // "take" read a stock that is not there
    CHECK(e->version() == 1);
    CHECK(e->durable_version() == 1);
  }
  auto reopened = open_engine(journaled(file));
  CHECK(reopened->version() == 1);
  CHECK(reopened->snapshot().root().at("domain.stock.A1").get<int>() == 9);
}

TEST_CASE("a batch defers only its own engine's commits, and nested batches join the outer one",
          "[journal][batch]") {
  temp_dir dir;
  auto a = open_engine(journaled(dir.file("a.db")));
  auto b = open_engine(journaled(dir.file("b.db")));
  auto memory = pop::engine::open({}).value();
  int a_told = 0;
  int b_told = 0;
  int memory_told = 0;
  pop::subscription sa = a->on_commit([&](std::uint64_t) { ++a_told; });
  pop::subscription sb = b->on_commit([&](std::uint64_t) { ++b_told; });
  pop::subscription sm = memory->on_commit([&](std::uint64_t) { ++memory_told; });
  const absl::Status outer = a->batch([&] {
    POP_RETURN_IF_ERROR(a->compare_and_swap(a->version(), {{"domain.x", 1}}).status());
    const absl::Status inner = a->batch([&] {
      return a->compare_and_swap(a->version(), {{"domain.y", 2}}).status();
    });
    POP_RETURN_IF_ERROR(inner);
    // The inner batch's end is the outer one's: nothing acknowledged yet.
    if (a_told != 0) return absl::InternalError("the inner batch notified");
    // Another engine's commit on this thread waits for its own journal as usual.
    POP_RETURN_IF_ERROR(b->compare_and_swap(b->version(), {{"domain.z", 3}}).status());
    if (b_told != 1 || b->durable_version() != 1) return absl::InternalError("b deferred");
    // b's own batch inside a's is a batch of b's.
    POP_RETURN_IF_ERROR(b->batch([&] {
      return b->compare_and_swap(b->version(), {{"domain.z", 4}}).status();
    }));
    if (b_told != 2 || b->durable_version() != 2) return absl::InternalError("b not settled");
    // An in-memory engine just runs the body.
    POP_RETURN_IF_ERROR(memory->batch([&] {
      POP_RETURN_IF_ERROR(memory->compare_and_swap(0, {{"domain.m", 1}}).status());
      return memory_told == 1 ? absl::OkStatus() : absl::InternalError("memory deferred");
    }));
    return absl::OkStatus();
  });
  REQUIRE(outer.ok());
  CHECK(a_told >= 1);
  CHECK(a->durable_version() == 2);
  CHECK(a->snapshot().root().at("domain.y").get<int>() == 2);
}

TEST_CASE("a crash image reopens at the last durable commit", "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  const std::string image = dir.file("image.db");
  auto e = open_engine(journaled(file));
  for (int i = 0; i < 20; ++i) {
    REQUIRE(e->execute("take", {{"sku", "B2"}, {"order", "o-" + std::to_string(i)}, {"note", "n"}})
                .ok());
  }
  copy_crash_image(file, image);
  const json expected = e->snapshot().to_json();
  const pop::journal_info info = pop::verify_journal(image).value();
  CHECK(!info.clean);
  CHECK(info.last_version == e->version());
  CHECK(open_engine(journaled(image))->snapshot().to_json() == expected);
}

// The journal's writer reuses the records it has written (their texts' buffers up to 2 KiB):
// notes of 0 bytes to 4 KB, from four threads at once (so groups of many records), each note its
// own, must come back exactly, whole and from a crash image taken between two runs of commits.
TEST_CASE("reused journal records carry only their own commit's texts", "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  const std::string image = dir.file("image.db");
  pop::options o = journaled(file);
  constexpr int threads = 4;
  for (int t = 0; t < threads; ++t) o.initial_state["domain"]["stock"]["S" + std::to_string(t)] = 0;
  // The note of order i of thread t, its own: its size cycles over and under the kept buffers'
  // 2 KiB.
  const auto note_of = [](int t, int i) {
    constexpr std::size_t sizes[] = {0, 40, 1900, 2100, 4000, 700};
    return "t" + std::to_string(t) + "-" + std::to_string(i) + ":" +
           std::string(sizes[static_cast<std::size_t>(i) % 6],
                       static_cast<char>('a' + (t * 7 + i) % 26));
  };
  const auto order_of = [](int t, int i) {
    return "t" + std::to_string(t) + "-" + std::to_string(i);
  };
  auto e = open_engine(o);
  const auto run = [&](int from, int to) {
    std::vector<std::thread> workers;
    std::atomic<int> failed{0};
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        for (int i = from; i < to; ++i) {
          const json args = {
              {"sku", "S" + std::to_string(t)}, {"order", order_of(t, i)}, {"note", note_of(t, i)}};
          if (!e->execute("take", args).ok()) ++failed;
        }
      });
    }
    for (std::thread& w : workers) w.join();
    REQUIRE(failed.load() == 0);
  };
  // Every order placed in [0, upto) of each thread is there with its own note, and no other.
  const auto check_orders = [&](const json& state, int upto) {
    const json& orders = state.at("domain").at("orders");
    CHECK(orders.size() == static_cast<std::size_t>(threads * upto));
    for (int t = 0; t < threads; ++t) {
      CHECK(state.at("domain").at("stock").at("S" + std::to_string(t)) == -upto);
      for (int i = 0; i < upto; ++i) {
        INFO(order_of(t, i));
        REQUIRE(orders.contains(order_of(t, i)));
        CHECK(orders.at(order_of(t, i)).at("note") == note_of(t, i));
      }
    }
  };
  run(0, 60);
  {
    // (While another client holds SQLite's write lock the journal's writer writes no group, so the
    // files are copied as one moment's: the image a crash then would leave.)
    write_lock other(file);
    copy_crash_image(file, image);
  }
  run(60, 120);
  const std::uint64_t version = e->version();
  e.reset();
  o.journal = image;
  check_orders(open_engine(o)->snapshot().to_json(), 60);
  o.journal = file;
  check_orders(open_engine(o)->snapshot().to_json(), 120);
  // Each record names its own order, once: none carries another commit's writes.
  const std::vector<pop::journal_record_info> history = pop::read_journal(file).value();
  REQUIRE(history.size() == version);
  std::set<std::string> orders;
  for (const pop::journal_record_info& r : history) {
    REQUIRE(r.writes.size() == 3);  // the stock, the order, the message
    for (const std::string& w : r.writes) {
      if (w.starts_with("domain.orders.")) CHECK(orders.insert(w).second);
    }
  }
  CHECK(orders.size() == history.size());
}

TEST_CASE("commits acknowledged while SQLite is locked survive a crash in the commit log",
          "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  const std::string image = dir.file("image.db");
  const std::string torn = dir.file("torn.db");
  const std::string damaged = dir.file("damaged.db");
  auto e = open_engine(journaled(file));
  REQUIRE(e->execute("take", {{"sku", "A1"}, {"order", "o-first"}}).ok());
  const std::uint64_t before = e->version();
  json expected;
  json expected_torn;
  {
    // What follows is acknowledged from the commit log alone.
    write_lock other(file);
    for (int i = 0; i < 6; ++i) {
      if (i == 5) expected_torn = e->snapshot().to_json();
      REQUIRE(e->execute("take", {{"sku", "B2"},
                                  {"order", "o-" + std::to_string(i)},
                                  {"note", "LOGGED" + std::to_string(1000 + i)}})
                  .ok());
    }
    CHECK(e->durable_version() == before + 6);
    copy_crash_image(file, image);
    copy_crash_image(file, torn);
    copy_crash_image(file, damaged);
    other.release();
    expected = e->snapshot().to_json();
  }
  // The database holds none of the six: a reader sees them through the log.
  const pop::journal_info info = pop::verify_journal(image).value();
  CHECK(info.last_version == before + 6);
  const std::vector<pop::journal_record_info> records =
      pop::read_journal(image, before + 1).value();
  REQUIRE(records.size() == 6);
  CHECK(records.back().version == before + 6);
  CHECK(records.back().process == "take");
  CHECK(pop::read_journal_state(image).value().state == expected);
  {
    auto reopened = open_engine(journaled(image));
    CHECK(reopened->version() == before + 6);
    CHECK(reopened->snapshot().to_json() == expected);
    REQUIRE(reopened->execute("take", {{"sku", "A1"}, {"order", "o-after"}}).ok());
  }
  // Moved into the database on reopening: whole without its log.
  CHECK(pop::verify_journal(image).value().last_version == before + 7);
  // A crash that tore the last record (its committer was never told) loses that record only.
  std::string bytes = file_bytes(torn + "-log");
  const std::size_t at = bytes.find("LOGGED1005");
  REQUIRE(at != std::string::npos);
  bytes[at + 7] = '9';
  pop::test::write_bytes(torn + "-log", bytes);
  auto reopened = open_engine(journaled(torn));
  CHECK(reopened->version() == before + 5);
  CHECK(reopened->snapshot().to_json() == expected_torn);
  // A record that fails its checksum with valid ones after it is damage, not a crash: refused,
  // and nothing is changed.
  bytes = file_bytes(damaged + "-log");
  const std::size_t middle = bytes.find("LOGGED1002");
  REQUIRE(middle != std::string::npos);
  bytes[middle + 7] = '9';
  pop::test::write_bytes(damaged + "-log", bytes);
  const std::string before_open = file_bytes(damaged);
  const auto refused = pop::engine::open(journaled(damaged));
  CHECK(refused.status().code() == absl::StatusCode::kDataLoss);
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains("commit log"));
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains("is damaged"));
  CHECK(pop::verify_journal(damaged).status().code() == absl::StatusCode::kDataLoss);
  CHECK(file_bytes(damaged) == before_open);
  CHECK(file_bytes(damaged + "-log") == bytes);
}

TEST_CASE(
    "records recovered from the commit log count toward the snapshot an open writes, and a "
    "failure after it loses nothing",
    "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  const std::string image = dir.file("image.db");
  const std::string short_of = dir.file("short.db");
  json expected;
  std::uint64_t before = 0;
  {
    auto e = open_engine(journaled(file));
    for (int i = 0; i < 4; ++i) {
      REQUIRE(e->execute("take", {{"sku", "A1"}, {"order", "o-" + std::to_string(i)}}).ok());
    }
    before = e->version();
    write_lock other(file);  // what follows is in the commit log alone
    for (int i = 0; i < 6; ++i) {
      REQUIRE(e->execute("take", {{"sku", "B2"}, {"order", "p-" + std::to_string(i)}}).ok());
    }
    copy_crash_image(file, image);
    copy_crash_image(file, short_of);
    other.release();
    expected = e->snapshot().to_json();
  }
  // The closed journal holds all ten records in SQLite; the image holds the last six in its log
  // alone (the first four in SQLite or the log, as far as the writer had got): a reader counts
  // the same records and bytes in both.
  const pop::journal_info whole = pop::verify_journal(file).value();
  const pop::journal_info logged = pop::verify_journal(image).value();
  REQUIRE(whole.snapshot_version == 0);
  REQUIRE(whole.records == before + 6);
  CHECK(logged.records == whole.records);
  CHECK(logged.record_bytes == whole.record_bytes);
  // One byte short of snapshot_bytes with the logged records counted: no snapshot at open.
  pop::options o = journaled(short_of);
  o.journal_tuning.snapshot_bytes = whole.record_bytes + 1;
  CHECK(open_engine(o)->snapshot().to_json() == expected);
  CHECK(pop::verify_journal(short_of).value().snapshot_version == 0);
  // Exactly snapshot_bytes: the open moves the logged records into SQLite, then writes the
  // snapshot. Its next step, a fresh commit log, fails here (a directory stands where its file is
  // made): the open fails with the snapshot already written, as a kill at that moment leaves it.
  o = journaled(image);
  o.journal_tuning.snapshot_bytes = whole.record_bytes;
  std::filesystem::create_directory(image + "-log.new");
  CHECK_FALSE(pop::engine::open(o).ok());
  pop::journal_info info = pop::verify_journal(image).value();
  CHECK(info.snapshot_version == before + 6);
  CHECK(info.records == 0);
  CHECK(info.record_bytes == 0);
  // The old log still holds the six records the snapshot covers: the next open replays none of
  // them again (they would take stock twice).
  std::filesystem::remove(image + "-log.new");
  {
    auto reopened = open_engine(o);
    CHECK(reopened->version() == before + 6);
    CHECK(reopened->snapshot().to_json() == expected);
    REQUIRE(reopened->execute("take", {{"sku", "A1"}, {"order", "o-after"}}).ok());
  }
  info = pop::verify_journal(image).value();
  CHECK(info.last_version == before + 7);
  CHECK(info.snapshot_version == before + 6);
  // One snapshot row is left: the older ones were pruned with the records.
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(image.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  sqlite3_stmt* count = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, "SELECT count(*), min(version) FROM pop_snapshots", -1, &count,
                             nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(count) == SQLITE_ROW);
  CHECK(sqlite3_column_int64(count, 0) == 1);
  CHECK(sqlite3_column_int64(count, 1) == static_cast<std::int64_t>(before + 6));
  sqlite3_finalize(count);
  sqlite3_close(db);
}

TEST_CASE("a commit log left by another journal is never replayed", "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  const std::string image = dir.file("image.db");
  {
    // A crash image whose log holds three commits SQLite lacks.
    auto e = open_engine(journaled(file));
    write_lock other(file);
    for (int i = 0; i < 3; ++i) {
      REQUIRE(e->execute("take", {{"sku", "A1"}, {"order", "o-" + std::to_string(i)}}).ok());
    }
    copy_crash_image(file, image);
    other.release();
  }
  REQUIRE(pop::verify_journal(image).value().last_version == 3);
  // Its database is deleted; its log is left behind. A new journal there starts afresh, and so
  // does it after a crash of its own.
  for (const char* suffix : {"", "-wal", "-head"}) std::remove((image + suffix).c_str());
  const json initial = journaled(image).initial_state;
  const std::string second = dir.file("second.db");
  {
    auto e = open_engine(journaled(image));
    CHECK(e->version() == 0);
    CHECK(e->snapshot().read("domain.stock").value() == initial["domain"]["stock"]);
    copy_crash_image(image, second);
  }
  CHECK(!std::filesystem::exists(image + "-log.new"));
  auto reopened = open_engine(journaled(second));
  CHECK(reopened->version() == 0);
  CHECK(reopened->snapshot().read("domain.stock").value() == initial["domain"]["stock"]);
}

TEST_CASE("an open that crashed after making its log is redone with the same log epoch",
          "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  json expected;
  {
    auto e = open_engine(journaled(file));
    REQUIRE(e->execute("take", {{"sku", "A1"}, {"order", "o-1"}}).ok());
    expected = e->snapshot().to_json();
  }
  const auto meta_epoch = [&] {
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open(file.c_str(), &db) == SQLITE_OK);
    sqlite3_stmt* s = nullptr;
    REQUIRE(sqlite3_prepare_v2(db, "SELECT value FROM pop_meta WHERE key = 'log_epoch'", -1, &s,
                               nullptr) == SQLITE_OK);
    REQUIRE(sqlite3_step(s) == SQLITE_ROW);
    const auto epoch = static_cast<std::uint32_t>(sqlite3_column_int64(s, 0));
    sqlite3_finalize(s);
    sqlite3_close(db);
    return epoch;
  };
  const std::uint32_t known = meta_epoch();
  REQUIRE(known != 0);
  // An open that crashed between putting its new log in place and recording its epoch: the
  // journal not closed cleanly, its log one epoch ahead and empty.
  sql(file, "UPDATE pop_meta SET value = '0' WHERE key = 'clean'");
  REQUIRE(pop::detail::commit_log::create(file + "-log", 64 << 10, known + 1).ok());
  // Opening again reuses that epoch: two such crashes in a row leave a log the journal accepts.
  for (int round = 0; round < 2; ++round) {
    auto e = open_engine(journaled(file));
    CHECK(e->snapshot().to_json() == expected);
    CHECK(pop::detail::commit_log::read(file + "-log").value().epoch == known + 1);
    CHECK(meta_epoch() == known + 1);
    if (round == 0) {
      e.reset();
      sql(file, "UPDATE pop_meta SET value = '0' WHERE key = 'clean'");
      sql(file,
          "UPDATE pop_meta SET value = '" + std::to_string(known) + "' WHERE key = 'log_epoch'");
    }
  }
}

TEST_CASE("commits acknowledged from the commit log reach SQLite without further commits",
          "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  auto e = open_engine(journaled(file));
  REQUIRE(e->execute("take", {{"sku", "A1"}, {"order", "o-1"}}).ok());
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(file.c_str(), &db) == SQLITE_OK);
  sqlite3_busy_timeout(db, 5000);
  const auto rows = [&] {
    sqlite3_stmt* s = nullptr;
    REQUIRE(sqlite3_prepare_v2(db, "SELECT count(*) FROM pop_commits", -1, &s, nullptr) ==
            SQLITE_OK);
    REQUIRE(sqlite3_step(s) == SQLITE_ROW);
    const int n = sqlite3_column_int(s, 0);
    sqlite3_finalize(s);
    return n;
  };
  // The writer thread, idle when the record came, lets a group gather briefly and writes it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (rows() < 1 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  CHECK(rows() == 1);
  sqlite3_close(db);
}

TEST_CASE("a full commit log holds committers back until SQLite takes its records", "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  pop::options o = journaled(file);
  o.journal_tuning.log_bytes = 64 << 10;  // the smallest: 6 records of about 10 KiB fit
  auto e = open_engine(o);
  constexpr std::uint64_t fit = 6;
  constexpr int commits = 40;
  const std::string note(9800, 'n');
  write_lock other(file);
  const std::uint64_t base = e->version();
  std::atomic<int> failed{0};
  std::thread committer([&] {
    for (int i = 0; i < commits; ++i) {
      if (!e->execute("take", {{"sku", "B2"}, {"order", "o-" + std::to_string(i)}, {"note", note}})
               .ok()) {
        failed.fetch_add(1);
      }
    }
  });
  // The writer cannot write while `other` holds the lock, so the log fills: the commit after the
  // sixth is installed (versions are, before their records are logged) and waits for room.
  // (Within 3 s: the writer gives up on the lock after 5, failing the journal.)
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  while (e->version() < base + fit + 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
  const std::uint64_t installed = e->version();
  const std::uint64_t acknowledged = e->durable_version();
  other.release();
  committer.join();
  CHECK(installed == base + fit + 1);
  CHECK(acknowledged == base + fit);
  CHECK(failed.load() == 0);
  CHECK(e->durable_version() == base + commits);
  const json expected = e->snapshot().to_json();
  e.reset();
  CHECK(open_engine(o)->snapshot().to_json() == expected);
}

TEST_CASE("the commit log wraps around its end, reuses released space and reads whole records",
          "[journal]") {
  using pop::detail::commit_log;
  temp_dir dir;
  const std::string path = dir.file("unit.db-log");
  auto log = commit_log::create(path, 64 << 10, 7).value();
  const auto record = [](std::uint64_t v) {
    return "[\"W" + std::to_string(10000 + v) + "\"," + std::string(900 + v % 17, 'x') + "]";
  };
  const auto append = [&](std::uint64_t v) {
    const std::string w = record(v);
    return log->append(v, 5, "p", w, "[]",
                       pop::detail::record_checksum(static_cast<std::int64_t>(v), 5, "p", w, "[]"));
  };
  const auto versions = [&] {
    std::vector<std::uint64_t> out;
    const commit_log::contents c = commit_log::read(path).value();
    CHECK(c.epoch == 7);
    for (const commit_log::entry& e : c.entries) {
      CHECK(e.writes == record(e.version));
      CHECK(e.process == "p");
      out.push_back(e.version);
    }
    return out;
  };
  const auto range = [](std::uint64_t from, std::uint64_t to) {
    std::vector<std::uint64_t> out;
    for (std::uint64_t v = from; v <= to; ++v) out.push_back(v);
    return out;
  };
  CHECK(log->fits(1000));
  CHECK(!log->fits(16 << 10));
  std::uint64_t v = 0;
  while (append(v + 1)) ++v;
  REQUIRE(v > 50);
  CHECK(versions() == range(1, v));
  // Space comes back from the tail only; the ring then wraps (a padding record at its end).
  log->release_through(v / 2);
  const std::uint64_t full = v;
  while (append(v + 1)) ++v;
  CHECK(v > full + full / 3);
  CHECK(versions() == range(full / 2 + 1, v));
  log->release_through(v);
  CHECK(log->used() == 0);
  CHECK(versions().empty());
  for (std::uint64_t i = 0; i < 3; ++i) REQUIRE(append(++v));
  CHECK(versions() == range(v - 2, v));
  // A torn last record ends the log there; a bad record with valid ones after it is damage.
  const std::string whole = file_bytes(path);
  const auto spoil = [&](std::uint64_t version) {
    std::string bytes = whole;
    const std::size_t at = bytes.rfind("W" + std::to_string(10000 + version));
    REQUIRE(at != std::string::npos);
    bytes[at + 1] = '#';
    pop::test::write_bytes(path, bytes);
  };
  spoil(v);
  CHECK(versions() == range(v - 2, v - 1));
  CHECK(!commit_log::read(path).value().damaged_at);
  spoil(v - 1);
  CHECK(versions() == range(v - 2, v - 2));
  CHECK(commit_log::read(path).value().damaged_at.has_value());
  // A new epoch reads nothing of the old one's bytes.
  log = commit_log::create(path, 64 << 10, 8).value();
  const commit_log::contents fresh = commit_log::read(path).value();
  CHECK(fresh.epoch == 8);
  CHECK(fresh.entries.empty());
  CHECK(commit_log::read(dir.file("none-log")).value().entries.empty());
}

TEST_CASE("a crash image whose log the sqlite3 tool checkpointed reopens with every commit",
          "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  const std::string image = dir.file("image.db");
  auto e = open_engine(journaled(file));
  for (int i = 0; i < 20; ++i) {
    REQUIRE(e->execute("take", {{"sku", "B2"}, {"order", "o-" + std::to_string(i)}}).ok());
  }
  copy_crash_image(file, image);
  const json expected = e->snapshot().to_json();
  const std::uint64_t version = e->version();
  REQUIRE(std::filesystem::exists(image + "-wal"));
  // The sqlite3 command-line tool checkpoints the log into the main file and deletes it on exit.
  const std::string command = "sqlite3 '" + image + "' .tables > /dev/null";
  REQUIRE(std::system(command.c_str()) == 0);
  REQUIRE(!std::filesystem::exists(image + "-wal"));
  const pop::journal_info info = pop::verify_journal(image).value();
  CHECK(info.last_version == version);
  auto reopened = open_engine(journaled(image));
  CHECK(reopened->version() == version);
  CHECK(reopened->snapshot().to_json() == expected);
  // And it keeps working as a journal.
  REQUIRE(reopened->execute("take", {{"sku", "A1"}, {"order", "o-after"}}).ok());
}

TEST_CASE(
    "a format 1 journal (checksums byte by byte) opens, keeps its records and becomes format 2",
    "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("old.db");
  json expected;
  {
    auto e = open_engine(journaled(file));
    for (int i = 0; i < 12; ++i) {
      REQUIRE(e->execute("take", {{"sku", "A1"},
                                  {"order", "o-" + std::to_string(i)},
                                  {"note", "MARK" + std::to_string(1000 + i)}})
                  .ok());
    }
    expected = e->snapshot().to_json();
  }
  // What a format 1 build wrote: every record's checksum in the byte-by-byte form.
  {
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open(file.c_str(), &db) == SQLITE_OK);
    sqlite3_stmt* rows = nullptr;
    REQUIRE(sqlite3_prepare_v2(db,
                               "SELECT version, at_us, process, writes, messages FROM pop_commits",
                               -1, &rows, nullptr) == SQLITE_OK);
    std::vector<std::pair<std::int64_t, std::int64_t>> sums;
    const auto text = [&](int column) {
      return std::string(reinterpret_cast<const char*>(sqlite3_column_text(rows, column)),
                         static_cast<std::size_t>(sqlite3_column_bytes(rows, column)));
    };
    while (sqlite3_step(rows) == SQLITE_ROW) {
      const std::int64_t v = sqlite3_column_int64(rows, 0);
      const std::int64_t at = sqlite3_column_int64(rows, 1);
      const std::int64_t old_sum =
          pop::detail::record_checksum_v1(v, at, text(2), text(3), text(4));
      CHECK(old_sum != pop::detail::record_checksum(v, at, text(2), text(3), text(4)));
      sums.emplace_back(v, old_sum);
    }
    sqlite3_finalize(rows);
    REQUIRE(sums.size() == 12);
    sqlite3_close(db);
    for (const auto& [v, sum] : sums) {
      sql(file, "UPDATE pop_commits SET checksum = " + std::to_string(sum) +
                    " WHERE version = " + std::to_string(v));
    }
    sql(file, "UPDATE pop_meta SET value = '1' WHERE key = 'format_version'");
  }
  CHECK(pop::verify_journal(file).value().format_version == 1);  // (reading changes nothing)

  SECTION("it opens with its state, takes new commits and is format 2 from then on") {
    {
      auto e = open_engine(journaled(file));
      CHECK(e->snapshot().to_json() == expected);
      REQUIRE(e->execute("take", {{"sku", "A1"}, {"order", "o-new"}}).ok());
      expected = e->snapshot().to_json();
    }
    const pop::journal_info info = pop::verify_journal(file).value();
    CHECK(info.format_version == 2);
    CHECK(info.last_version == 13);
    CHECK(open_engine(journaled(file))->snapshot().to_json() == expected);
  }
  SECTION("a damaged record of it still fails its checksum") {
    std::string bytes = file_bytes(file);
    const std::size_t at = bytes.find("MARK1007");
    REQUIRE(at != std::string::npos);
    bytes[at + 5] = '9';
    pop::test::write_bytes(file, bytes);
    const absl::StatusOr<std::unique_ptr<pop::engine>> e = pop::engine::open(journaled(file));
    REQUIRE(!e.ok());
    CHECK(e.status().code() == absl::StatusCode::kDataLoss);
    CHECK(absl::StrContains(e.status().message(), "fails its checksum"));
  }
}

TEST_CASE("damaged, foreign, newer and busy journals are refused and left as they were",
          "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("shop.db");
  {
    auto e = open_engine(journaled(file));
    for (int i = 0; i < 40; ++i) {
      REQUIRE(e->execute("take", {{"sku", "A1"},
                                  {"order", "o-" + std::to_string(i)},
                                  {"note", "MARK" + std::to_string(1000 + i)}})
                  .ok());
    }
  }
  const std::string pristine = file_bytes(file);
  REQUIRE(!pristine.empty());
  const auto refused = [&](const std::string& path, absl::StatusCode code,
                           const std::string& words) {
    const std::string before = file_bytes(path);
    const absl::StatusOr<std::unique_ptr<pop::engine>> e = pop::engine::open(journaled(path));
    INFO(e.status());
    REQUIRE(!e.ok());
    CHECK(e.status().code() == code);
    CHECK(absl::StrContains(e.status().message(), words));
    CHECK(absl::StrContains(e.status().message(), path));
    CHECK(file_bytes(path) == before);
    CHECK(pop::verify_journal(path).status().code() == code);
  };

  SECTION("a file truncated in the middle of a record") {
    pop::test::write_bytes(file, pristine.substr(0, pristine.size() * 2 / 3));
    refused(file, absl::StatusCode::kDataLoss, "");
  }
  SECTION("a flipped byte inside a record") {
    std::string bytes = pristine;
    const std::size_t at = bytes.find("MARK1017");
    REQUIRE(at != std::string::npos);
    bytes[at + 5] = '9';
    pop::test::write_bytes(file, bytes);
    refused(file, absl::StatusCode::kDataLoss, "fails its checksum");
  }
  SECTION("flipped bytes in the database structure") {
    std::string bytes = pristine;
    for (std::size_t i = 4096 + 8; i < 4096 + 40; ++i) bytes[i] = static_cast<char>(~bytes[i]);
    pop::test::write_bytes(file, bytes);
    refused(file, absl::StatusCode::kDataLoss, "");
  }
  SECTION("a gap in versions") {
    sql(file, "DELETE FROM pop_commits WHERE version = 17");
    refused(file, absl::StatusCode::kDataLoss, "gap: after version 16 comes version 18");
  }
  SECTION("a newer format version") {
    sql(file, "UPDATE pop_meta SET value = '3' WHERE key = 'format_version'");
    refused(file, absl::StatusCode::kFailedPrecondition, "journal format 3");
  }
  SECTION("a lost write-ahead log after a crash") {
    const std::string image = dir.file("image.db");
    {
      // Without a commit log an acknowledged commit is in SQLite's write-ahead log alone.
      pop::options o = journaled(file);
      o.journal_tuning.log_bytes = 0;
      auto e = open_engine(o);
      REQUIRE(e->execute("take", {{"sku", "A1"}, {"order", "o-x"}}).ok());
      copy_crash_image(file, image);
    }
    std::remove((image + "-wal").c_str());
    refused(image, absl::StatusCode::kDataLoss, "write-ahead log");
    CHECK_THAT(std::string(pop::verify_journal(image).status().message()),
               Catch::Contains("was acknowledged, but the main file holds only"));
    // Without the head file there is no telling what was lost: still refused.
    std::remove((image + "-head").c_str());
    refused(image, absl::StatusCode::kDataLoss, "write-ahead log");
  }
  SECTION("a lost commit log after a crash") {
    const std::string image = dir.file("image.db");
    {
      auto e = open_engine(journaled(file));
      REQUIRE(e->execute("take", {{"sku", "A1"}, {"order", "o-x"}}).ok());
      copy_crash_image(file, image);
    }
    REQUIRE(std::filesystem::exists(image + "-log"));
    std::remove((image + "-log").c_str());
    refused(image, absl::StatusCode::kDataLoss, "commit log");
    // An empty log accepts the journal as it is.
    pop::test::write_bytes(image + "-log", "");
    CHECK(pop::engine::open(journaled(image)).ok());
  }
  SECTION("a journal with another outbox path") {
    pop::options o = journaled(file);
    o.outbox_path = "domain.other_queue";
    const auto e = pop::engine::open(o);
    CHECK(e.status().code() == absl::StatusCode::kFailedPrecondition);
    CHECK(absl::StrContains(e.status().message(), "domain.outbox_queue"));
  }
  SECTION("a journal already open in another engine") {
    auto first = open_engine(journaled(file));
    const auto second = pop::engine::open(journaled(file));
    CHECK(second.status().code() == absl::StatusCode::kFailedPrecondition);
    CHECK(absl::StrContains(second.status().message(), "already open in another engine"));
    REQUIRE(first->execute("take", {{"sku", "A1"}, {"order", "o-y"}}).ok());
  }
  SECTION("a file that is not a journal") {
    pop::test::write_bytes(file, std::string(10000, 'x'));
    refused(file, absl::StatusCode::kDataLoss, "");
  }
}

TEST_CASE("a journal whose creation was interrupted is created afresh", "[journal]") {
  temp_dir dir;
  const std::string file = dir.file("half.db");
  sql(file, "PRAGMA journal_mode=WAL");  // a crash right after this leaves no tables
  auto e = open_engine(journaled(file));
  CHECK(e->version() == 0);
  CHECK(e->snapshot().read("domain.stock.A1").value() == 10);
  REQUIRE(e->execute("take", {{"sku", "A1"}, {"order", "o-1"}}).ok());
  e.reset();
  CHECK(pop::verify_journal(file).value().last_version == 1);
  // A database of someone else's is refused, not taken over.
  const std::string foreign = dir.file("foreign.db");
  sql(foreign, "CREATE TABLE customers(id INTEGER)");
  const auto refused = pop::engine::open(journaled(foreign));
  CHECK(refused.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(absl::StrContains(refused.status().message(), "customers"));
}

TEST_CASE("journal options are validated", "[journal]") {
  pop::options o;
  o.journal = "x.db";
  o.durability = pop::durability::none;
  CHECK(pop::engine::open(o).status().code() == absl::StatusCode::kInvalidArgument);
  o.durability = pop::durability::process;
  o.journal_tuning.max_group = 0;
  CHECK(pop::engine::open(o).status().code() == absl::StatusCode::kInvalidArgument);
  o.journal_tuning.max_group = 8;
  o.journal_tuning.log_bytes = (std::size_t{1} << 30) + 1;
  CHECK(pop::engine::open(o).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(pop::engine::open(journaled("/nonexistent-dir/x.db")).status().code() ==
        absl::StatusCode::kUnavailable);
  CHECK(pop::verify_journal("/nonexistent-dir/x.db").status().code() ==
        absl::StatusCode::kNotFound);
}

namespace {

// Text the journal must escape: quotes, backslashes, control characters (some with short
// escapes), DEL, and UTF-8 of two, three and four bytes.
rc::Gen<std::string> tricky_text() {
  return rc::gen::map(rc::gen::container<std::vector<std::string>>(rc::gen::element<std::string>(
                          "a", "Z", "0", ".", " ", "\"", "\\", "/", "\n", "\t", "\b", "\f", "\r",
                          std::string(1, '\0'), "\x01", "\x1f", "\x7f", "\xc3\xa9", "\xe2\x98\x83",
                          "\xf0\x9f\x98\x80")),
                      [](const std::vector<std::string>& parts) {
                        std::string out;
                        for (const std::string& p : parts) out += p;
                        return out;
                      });
}

// A message a process emits, of tricky text and any payload.
rc::Gen<pop::message_draft> any_draft() {
  return rc::gen::exec([] {
    pop::message_draft d;
    d.topic = *tricky_text();
    d.key = *tricky_text();
    d.payload = *pop::test::any_json(2, pop::test::valid_text());
    const int headers = *rc::gen::inRange(0, 3);
    for (int h = 0; h < headers; ++h) d.headers[*tricky_text()] = *tricky_text();
    return d;
  });
}

// The message `d` becomes as commit `version`'s `index`-th, created at `created`.
pop::outbox_message as_appended(const pop::message_draft& d, std::uint64_t version,
                                std::uint32_t index, std::int64_t created) {
  pop::outbox_message m;
  m.id = pop::make_message_id(version, index);
  m.topic = d.topic;
  m.key = d.key;
  m.payload = d.payload;
  m.headers = d.headers;
  m.created_at_us = created;
  m.version = version;
  return m;
}

}  // namespace

TEST_CASE("the journal's record encoder writes exactly what json::dump() would") {
  rc::prop("writes, deletes and messages", [] {
    pop::detail::record_encoder encoded;
    json expected = json::array();
    const int n = *rc::gen::inRange(0, 5);
    for (int i = 0; i < n; ++i) {
      const std::string path = *tricky_text();
      switch (*rc::gen::inRange(0, 3)) {
        case 0: {
          const json value = {{"text", *tricky_text()},
                              {"n", *rc::gen::arbitrary<int>()},
                              {"list", {1.5, nullptr, true}}};
          encoded.set(path, value);
          expected.push_back({path, value});
          break;
        }
        case 1:
          encoded.erase(path);
          expected.push_back({path});
          break;
        default: {
          pop::outbox_message m;
          m.id = *tricky_text();
          m.topic = *tricky_text();
          m.key = *tricky_text();
          m.payload = {{"p", *tricky_text()}};
          const int headers = *rc::gen::inRange(0, 3);
          for (int h = 0; h < headers; ++h) m.headers[*tricky_text()] = *tricky_text();
          m.created_at_us = *rc::gen::arbitrary<std::int64_t>();
          m.version = *rc::gen::arbitrary<std::uint64_t>();
          m.attempts = *rc::gen::arbitrary<std::uint32_t>();
          m.last_error = *tricky_text();
          m.next_attempt_at_us = *rc::gen::arbitrary<std::int64_t>();
          if (*rc::gen::arbitrary<bool>()) m.failures.push_back({2, 17, *tricky_text()});
          encoded.set_message(path, m);
          expected.push_back({path, m.to_json()});
        }
      }
    }
    const std::string text = std::move(encoded).writes_text();
    RC_ASSERT(text == expected.dump());
    RC_ASSERT(json::parse(text) == expected);
  });
  rc::prop("packed values of valid text: the text of the value they decode to", [] {
    const json value = *pop::test::any_json(2, pop::test::valid_text());
    const std::string path = *tricky_text();
    std::string packed;
    RC_ASSERT(pop::detail::packed::encode(value, packed));
    pop::detail::record_encoder want;
    want.set(path, value);
    pop::detail::record_encoder got;
    got.set_packed(path, packed.data());
    RC_ASSERT(std::move(got).writes_text() == std::move(want).writes_text());
  });
  rc::prop("packed values of any text: the same text, or the same refusal", [] {
    const json value = *pop::test::any_json(2);
    const std::string path = *tricky_text();
    std::string packed;
    RC_ASSERT(pop::detail::packed::encode(value, packed));
    std::optional<std::string> want;
    std::optional<std::string> got;
    try {
      pop::detail::record_encoder encoded;
      encoded.set(path, value);
      want = std::move(encoded).writes_text();
    } catch (const json::type_error&) {
    }
    try {
      pop::detail::record_encoder encoded;
      encoded.set_packed(path, packed.data());
      got = std::move(encoded).writes_text();
    } catch (const json::type_error&) {
    }
    RC_ASSERT(got == want);
  });
  rc::prop("message records: the text of the message they decode to", [] {
    pop::outbox_message m;
    m.version = *rc::gen::arbitrary<std::uint64_t>();
    m.id = *rc::gen::arbitrary<bool>()
               ? pop::make_message_id(m.version, *rc::gen::inRange<std::uint32_t>(0, 999'999))
               : *tricky_text();
    m.topic = *tricky_text();
    m.key = *tricky_text();
    m.payload = *pop::test::any_json(2, pop::test::valid_text());
    const int headers = *rc::gen::inRange(0, 3);
    for (int h = 0; h < headers; ++h) m.headers[*tricky_text()] = *tricky_text();
    m.created_at_us = *rc::gen::arbitrary<std::int64_t>();
    m.attempts = *rc::gen::arbitrary<std::uint32_t>();
    m.last_error = *tricky_text();
    m.next_attempt_at_us = *rc::gen::arbitrary<std::int64_t>();
    if (*rc::gen::arbitrary<bool>()) m.failures.push_back({2, 17, *tricky_text()});
    std::string record;
    RC_ASSERT(pop::detail::encode_message_record(m, record));
    const std::string path = *tricky_text();
    pop::detail::record_encoder want;
    want.set_message(path, m);
    pop::detail::record_encoder got;
    got.set_message_record(path, record.data());
    RC_ASSERT(std::move(got).writes_text() == std::move(want).writes_text());
  });
  rc::prop("an emitted message's record: the bytes of the same message never tried", [] {
    const pop::message_draft d = *any_draft();
    const auto version = *rc::gen::arbitrary<std::uint64_t>();
    const auto index = *rc::gen::inRange<std::uint32_t>(0, 999'999);
    const auto created = *rc::gen::arbitrary<std::int64_t>();
    const pop::outbox_message m = as_appended(d, version, index, created);
    std::string want;
    RC_ASSERT(pop::detail::encode_message_record(m, want));
    std::string got = "left over";
    RC_ASSERT(pop::detail::encode_message_record(index, d, created, version, got));
    RC_ASSERT(got == want);
  });
  rc::prop("an emitted message precoded from its draft: the bytes set_message writes", [] {
    const pop::message_draft d = *any_draft();
    const auto version = *rc::gen::arbitrary<std::uint64_t>();
    const auto index = *rc::gen::inRange<std::uint32_t>(0, 999'999);
    const auto created = *rc::gen::arbitrary<std::int64_t>();
    const std::string outbox = *tricky_text();
    const bool after_a_write = *rc::gen::arbitrary<bool>();
    const pop::outbox_message m = as_appended(d, version, index, created);
    pop::detail::record_encoder want;
    if (after_a_write) want.erase("a.b");
    want.set_message(outbox + "." + m.id, m);
    pop::detail::record_encoder::draft_text text{"left", "over"};
    pop::detail::record_encoder::encode_draft(d, text);
    pop::detail::record_encoder got;
    if (after_a_write) got.erase("a.b");
    got.set_draft(outbox, m.id, text, created, version);
    RC_ASSERT(std::move(got).writes_text() == std::move(want).writes_text());
  });
  rc::prop("a state's text written from its tree: what materialise().dump() writes", [] {
    // Objects of up to 40 members: past blob_max_members some become member maps.
    json state = json::object();
    const auto members = *rc::gen::resize(
        40, rc::gen::container<std::map<std::string, json>>(
                pop::test::valid_text(), pop::test::any_json(3, pop::test::valid_text())));
    for (const auto& [k, v] : members) state["k" + k] = v;
    pop::detail::node_ptr root = pop::detail::make_root(state);
    // Messages kept typed: from a record (an emitted one) and decoded (one given whole).
    const int messages = *rc::gen::inRange(0, 4);
    for (int i = 0; i < messages; ++i) {
      pop::message_draft d;
      d.topic = *tricky_text();
      d.key = *tricky_text();
      d.payload = *pop::test::any_json(2, pop::test::valid_text());
      d.headers[*tricky_text()] = *tricky_text();
      const auto index = static_cast<std::uint32_t>(i);
      const std::string id = pop::make_message_id(9, index);
      pop::detail::node_ptr node = pop::detail::make_message_node(index, d, 1234, 9);
      if (i % 2 == 1) {
        pop::outbox_message m = node->message_copy();
        m.attempts = 2;
        m.failures.push_back({5, 6, *tricky_text()});
        node = pop::detail::make_message_node(m);
      }
      root = pop::test::must(pop::detail::assign(root, "outbox." + id, std::move(node)));
    }
    const pop::detail::location all{root.get(), nullptr};
    RC_ASSERT(pop::detail::record_encoder::value_text(all) == pop::detail::materialise(all).dump());
  });
  rc::prop("append_json writes what dump() writes, and throws where it throws", [] {
    // Any text (invalid UTF-8 too) and any double (NaN and infinities, every bit pattern).
    const json value = *rc::gen::oneOf(
        pop::test::any_json(3),
        rc::gen::map(rc::gen::arbitrary<std::uint64_t>(),
                     [](std::uint64_t bits) { return json(std::bit_cast<double>(bits)); }),
        rc::gen::map(rc::gen::arbitrary<std::vector<double>>(),
                     [](std::vector<double> v) { return json(std::move(v)); }),
        rc::gen::map(rc::gen::element(std::numeric_limits<double>::quiet_NaN(),
                                      std::numeric_limits<double>::infinity(),
                                      -std::numeric_limits<double>::infinity(), -0.0, 1e-320,
                                      std::numeric_limits<double>::max()),
                     [](double d) { return json(d); }));
    std::optional<std::string> expected;
    try {
      expected = value.dump();
    } catch (const json::type_error&) {
    }
    std::string out = "prefix";
    try {
      pop::detail::append_json(out, value);
    } catch (const json::type_error&) {
      RC_ASSERT(!expected.has_value());
      return;
    }
    RC_ASSERT(expected.has_value());
    RC_ASSERT(out == "prefix" + *expected);
  });
  rc::prop("a record's checksum changes with one to four flipped bits of its fields", [] {
    std::string writes = *rc::gen::container<std::string>(rc::gen::arbitrary<char>());
    std::string messages = *rc::gen::container<std::string>(rc::gen::arbitrary<char>());
    RC_PRE(writes.size() + messages.size() >= 1);
    const std::string writes_before = writes;
    const std::string messages_before = messages;
    const auto sum = [&] { return pop::detail::record_checksum(7, 9, "p", writes, messages); };
    const std::int64_t before = sum();
    const auto flip = [&](std::size_t bit) {
      std::string& field = bit / 8 < writes.size() ? writes : messages;
      const std::size_t byte = bit / 8 < writes.size() ? bit / 8 : bit / 8 - writes.size();
      field[byte] = static_cast<char>(static_cast<unsigned char>(field[byte]) ^ (1u << (bit % 8)));
    };
    const std::size_t bytes = writes.size() + messages.size();
    // Half the time only top bits (the ones a multiplication cannot carry down).
    const bool top_bits = *rc::gen::arbitrary<bool>();
    const int flips = *rc::gen::inRange(1, 5);
    for (int f = 0; f < flips; ++f) {
      const std::size_t byte = *rc::gen::inRange<std::size_t>(0, bytes);
      flip(8 * byte + (top_bits ? 7 : *rc::gen::inRange<std::size_t>(0, 8)));
    }
    RC_PRE(writes != writes_before || messages != messages_before);
    RC_ASSERT(sum() != before);
  });
  SECTION("flipping the top bits of two words of a record does not cancel out") {
    // (Word-wise FNV without folding would give the same checksum: a multiplication carries a
    // bit only upward, and 2^63 times an odd number is 2^63.)
    std::string writes(24, 'a');
    const std::int64_t before = pop::detail::record_checksum(7, 9, "p", writes, "[]");
    for (const std::size_t byte : {std::size_t{7}, std::size_t{15}}) writes[byte] ^= '\x80';
    CHECK(pop::detail::record_checksum(7, 9, "p", writes, "[]") != before);
    writes[15] ^= '\x80';
    std::string messages(16, 'b');
    messages[7] ^= '\x80';
    CHECK(pop::detail::record_checksum(7, 9, "p", writes, messages) !=
          pop::detail::record_checksum(7, 9, "p", std::string(24, 'a'), std::string(16, 'b')));
    // Nor three (top bits of bytes 7, 11 and 15: with FNV's step on words and the high half
    // folded down after each, the second and third cancel what the first left).
    const std::string record = R"([["orders.o1",{"status":"paid"}]])";
    std::string flipped = record;
    for (const std::size_t byte : {std::size_t{7}, std::size_t{11}, std::size_t{15}}) {
      flipped[byte] ^= '\x80';
    }
    CHECK(pop::detail::record_checksum(7, 9, "p", flipped, "[]") !=
          pop::detail::record_checksum(7, 9, "p", record, "[]"));
  }
  rc::prop("message ids", [] {
    const auto ids = *rc::gen::container<std::vector<std::string>>(tricky_text());
    RC_ASSERT(pop::detail::record_encoder::messages_text(ids) == json(ids).dump());
  });
  SECTION("text that is not UTF-8 is refused, as dump() refuses it") {
    pop::detail::record_encoder encoded;
    CHECK_THROWS_AS(encoded.erase("bad\xff"), json::type_error);
  }
}
