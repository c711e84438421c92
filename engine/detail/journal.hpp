// Defines pop::detail::journal: the SQLite journal with group commit, snapshots and recovery.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "pop/contracts/clock.hpp"
#include "pop/contracts/json.hpp"
#include "pop/engine/detail/commit_log.hpp"
#include "pop/engine/detail/tree.hpp"
#include "pop/engine/detail/wake_event.hpp"
#include "pop/engine/journal.hpp"

struct sqlite3;
struct sqlite3_stmt;

namespace pop::detail {

struct version_state;

// One committed version on its way to the journal. Made by reserve() and filled (or failed) by
// the committing thread, in version order under the engine's commit lock; written by the
// journal's thread.
struct journal_record {
  std::uint64_t version = 0;
  std::int64_t at_us = 0;
  std::string process;
  std::string writes;         // JSON: [[path, value] or [path] (a delete), ...], messages included
  std::string messages;       // JSON: the ids of the messages it emitted
  std::int64_t checksum = 0;  // record_checksum() of the above, set by fill()
  // Its version's state: from reserve() until fill(), which keeps it only if a snapshot may be
  // due at it.
  std::shared_ptr<const version_state> state;
  bool logged = false;  // copied into the commit log (journal::mu_)
  absl::Status error;   // set by fail(): the journal stops at this record
};

// The state a journal was opened at.
struct journal_start {
  std::uint64_t version = 0;
  node_ptr root;
};

// The journal of one engine: an SQLite database in WAL mode holding a snapshot of the whole state
// and one record per committed version after it.
//
// Writing: whoever holds the token (writing_) takes the records at the front of the queue (fill()
// queues them whole; up to max_group) and writes them in one transaction, so concurrent commits
// share one sync
// (group commit); then it advances durable_version() and wakes the committers whose records it
// wrote. The writer thread does this under contention; a lone committer (no other commit call in
// progress, its record the only one queued) writes its own record on its own thread, with no
// hand-off to the writer thread and back. Every snapshot_every versions
// (or snapshot_bytes of records) the token holder writes a snapshot of the newest record past the
// bound in the group that crossed it (its committers released first) and prunes the records and
// snapshots before it. Prefix
// property: a record is written only after every record before it, so a crash loses a suffix, never
// a hole.
//
// Commit log: at durability::process, fill() also copies each record into the commit log (see
// commit_log.hpp), a file mapped shared: the record then survives a crash of the process, so its
// committer is acknowledged at once (acked_) instead of waiting for the group that writes it into
// SQLite. The writer thread writes the groups as above, woken once a group's worth of records
// waits (or after a short wait for one), and frees their space in the log once SQLite holds them;
// opening a journal moves what SQLite lacks from the log into it. A record too large for the log,
// or one filled while the log has no room and the writer has written it meanwhile, is
// acknowledged once SQLite holds it, as at durability::power; the versions after it wait for it.
//
// Failure: if SQLite fails, the journal stops, failure() returns the error from then on, and
// every waiter gets it; the engine refuses further commits.
// Ownership: the journal holds an exclusive advisory lock (flock) on the file while open.
class journal {
 public:
  // Opens or creates the journal at `path`, loads its newest snapshot and replays the records
  // after it. kFailedPrecondition: held by another engine, a newer format, or a different outbox
  // path; kDataLoss: damaged (named), with nothing written to the file.
  static absl::StatusOr<std::unique_ptr<journal>> open(const std::string& path, durability level,
                                                       const journal_options& opts,
                                                       const std::string& outbox_path,
                                                       const json& initial_state,
                                                       std::shared_ptr<const clock> clock,
                                                       journal_start& start);
  ~journal();
  journal(const journal&) = delete;
  journal& operator=(const journal&) = delete;

  // Makes the record of `version` (the next version), holding `state` until fill(): a written
  // one reused if there is one (its texts emptied, their buffers kept).
  std::shared_ptr<journal_record> reserve(std::uint64_t version,
                                          std::shared_ptr<const version_state> state);
  // Queues a reserved record, filled, and lets the writer take it; drops its state unless a
  // snapshot may be due at it. Records are filled (or failed) in version order, each once. A
  // committer that will not wait for it next (one in an engine::batch) passes `wake_writer`: an
  // idle writer thread is then woken once a group's worth of records waits. Returns
  // durable_version() as of the call.
  // noexcept: a record reserved and neither filled nor failed would leave a gap at its version
  // (only an allocation could fail here; then the process ends).
  std::uint64_t fill(const std::shared_ptr<journal_record>& r, bool wake_writer = false) noexcept;
  // Queues a reserved record as impossible to write (instead of fill()): the journal fails with
  // `why` when it reaches it (every waiter gets the failure), so no later commit waits for it
  // forever.
  void fail(const std::shared_ptr<journal_record>& r, absl::Status why) noexcept;
  // Blocks until `version` is durable at the journal's level (in the log or in SQLite). OK, or
  // the journal's failure.
  absl::Status wait_durable(std::uint64_t version);

  // Marks a commit call in progress for its lifetime (from before its process runs to its
  // return): a committer writes its own record only when it is the only one (else the writer
  // thread writes the groups). `j` may be null (no journal).
  class activity {
   public:
    explicit activity(journal* j) : j_(j) {
      if (j_ != nullptr) j_->active_.fetch_add(1, std::memory_order_relaxed);
    }
    ~activity() {
      if (j_ != nullptr) j_->active_.fetch_sub(1, std::memory_order_relaxed);
    }
    activity(const activity&) = delete;
    activity& operator=(const activity&) = delete;

   private:
    journal* j_;
  };
  // The newest version durable at the journal's level (acked_).
  std::uint64_t durable_version() const;
  absl::Status failure() const;
  // Records metadata `key` = `value` (a description for tools: a process spec, a workflow
  // definition), written by the journal's thread soon, and at the latest when it closes.
  void describe(std::string key, std::string value);

 private:
  journal(std::string path, durability level, const journal_options& opts, int lock_fd, int head_fd,
          sqlite3* db, std::uint64_t version, std::uint64_t snapshot_version,
          std::uint64_t replayed_bytes, std::shared_ptr<const clock> clock,
          std::unique_ptr<commit_log> log);
  // Writes the records at the front of the queue (up to max_group) as one group, with
  // the token (writing_) that one committer or the writer thread holds at a time; then
  // hand_over(). Called with mu_ held (through `lock`); returns with it held.
  void write_front(std::unique_lock<std::mutex>& lock) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // write_front's work, which may throw (write_front then fails the journal).
  // The records written are left in `group` (recycled by hand_over, without mu_).
  void write_front_group(std::unique_lock<std::mutex>& lock,
                         std::deque<std::shared_ptr<journal_record>>& group)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Gives the token back: wakes the committers whose versions are durable (all of them after a
  // failure) and the writer thread if it has work.
  // `written`: records to recycle (or free) once mu_ is released (or null).
  void hand_over(std::unique_lock<std::mutex>& lock,
                 std::deque<std::shared_ptr<journal_record>>* written = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Empties `written`, keeping the records nobody else holds for reserve() (see spare_).
  void recycle(std::deque<std::shared_ptr<journal_record>>& written);
  // The bytes a record counts for toward snapshot_bytes.
  static std::size_t record_bytes(const journal_record& r);
  // True if a snapshot is due at `version`: snapshot_every versions or snapshot_bytes of records
  // since the last one.
  bool snapshot_due(std::uint64_t version) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The writer thread: groups under contention, and descriptions.
  void run_writer();
  absl::Status write_group(std::deque<std::shared_ptr<journal_record>>& group);
  absl::Status write_snapshot(const journal_record& last);
  // Writes what is queued, then marks the journal closed cleanly (on destruction).
  void close_cleanly();
  // Advances acked_ over durable_ and the logged records after it.
  void advance_acked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Copies `r` into the log if it fits, waiting for room (unless SQLite gets it first).
  void log_record(journal_record& r, std::unique_lock<std::mutex>& lock)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // True if the writer thread should write now: a group's worth of records waits, or a
  // committer waits for one.
  bool group_ready() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes the committers waiting for a version up to acked_ (every one after a failure) out of
  // waiters_ into `out`; the caller releases them with wake() after leaving mu_. Each waits on its
  // own event, so a group wakes exactly its committers, and none takes mu_ again to return.
  struct waiter;
  void take_waiters(std::vector<waiter*>& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static void wake(std::vector<waiter*>& taken);
  // Steps a prepared statement without results once and resets it; errors as sql_error.
  absl::Status run_prepared(sqlite3_stmt* stmt, const char* what);
  // Writes the descriptions taken from described_ (with the token, or after the writer
  // thread stopped).
  absl::Status write_descriptions(std::vector<std::pair<std::string, std::string>> items);

  const std::string path_;
  const std::shared_ptr<const clock> clock_;
  const durability level_;
  const journal_options options_;
  const int lock_fd_;
  const int head_fd_;  // the head file: the newest durable version (see journal.cpp)
  sqlite3* db_;
  sqlite3_stmt* insert_ = nullptr;
  // A group's transaction, prepared once (parsing the SQL of each was a tenth of a lone commit).
  sqlite3_stmt* begin_ = nullptr;
  sqlite3_stmt* commit_ = nullptr;
  // The token holder's only (the token's hand-over through mu_ orders their accesses):
  std::vector<std::pair<std::string, std::string>> unwritten_;  // (then close)

  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  struct waiter {
    explicit waiter(std::uint64_t v) : version(v) {}
    std::uint64_t version;
    bool durable = false;  // set before `ready` is set
    wake_event ready;
  };
  std::vector<waiter*> waiters_ ABSL_GUARDED_BY(mu_);
  std::deque<std::shared_ptr<journal_record>> queue_ ABSL_GUARDED_BY(mu_);
  std::uint64_t durable_ ABSL_GUARDED_BY(mu_);  // the newest version SQLite holds
  // The newest version acknowledged: every version up to it is in SQLite or in the log.
  std::uint64_t acked_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<commit_log> log_ ABSL_GUARDED_BY(mu_);  // null at durability::power
  std::condition_variable room_cv_;                // the log has room again (or the journal failed)
  int room_waiters_ ABSL_GUARDED_BY(mu_) = 0;      // committers waiting on room_cv_
  bool writer_idle_ ABSL_GUARDED_BY(mu_) = false;  // the writer thread waits with no timeout
  // When the next snapshot is due (see fill()): the version of the last one and the record bytes
  // filled since (those replayed at open included).
  std::uint64_t snapshot_base_ ABSL_GUARDED_BY(mu_);
  std::uint64_t filled_bytes_ ABSL_GUARDED_BY(mu_);
  absl::Status failed_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> has_failed_{false};  // set (under mu_) when failed_ is
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::pair<std::string, std::string>> described_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;  // the token: somebody is writing to db_
  std::atomic<int> active_{0};                 // commit calls in progress (activity)
  // Written records kept for reserve() to reuse, with their buffers: committers then allocate no
  // record and the writer frees none (records made on the committers' threads and freed on the
  // writer's kept the allocator busy moving memory between them: a fifth of a commit under many
  // writers). At most spare_records of them, each keeping buffers of at most spare_text bytes
  // each (12 MiB at most in all; typically a record's few hundred bytes).
  static constexpr std::size_t spare_records = 2048;
  static constexpr std::size_t spare_text = 2048;
  std::mutex spare_mu_;
  std::vector<std::shared_ptr<journal_record>> spare_ ABSL_GUARDED_BY(spare_mu_);
  std::thread writer_;
};

}  // namespace pop::detail
