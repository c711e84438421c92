#include "pop/engine/detail/journal.hpp"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"
#include "pop/engine/detail/journal_format.hpp"
#include "pop/engine/detail/sqlite.hpp"
#include "pop/engine/snapshot.hpp"

namespace pop::detail {
namespace {

// Binds a pop_commits row to `insert` (version, at_us, process, writes, messages, checksum).
void bind_record(sqlite3_stmt* insert, std::uint64_t version, std::int64_t at_us,
                 const std::string& process, const std::string& writes, const std::string& messages,
                 std::int64_t checksum) {
  sqlite3_reset(insert);
  sqlite3_bind_int64(insert, 1, static_cast<std::int64_t>(version));
  sqlite3_bind_int64(insert, 2, at_us);
  sqlite3_bind_text(insert, 3, process.data(), static_cast<int>(process.size()), SQLITE_STATIC);
  sqlite3_bind_text(insert, 4, writes.data(), static_cast<int>(writes.size()), SQLITE_STATIC);
  sqlite3_bind_text(insert, 5, messages.data(), static_cast<int>(messages.size()), SQLITE_STATIC);
  sqlite3_bind_int64(insert, 6, checksum);
}

// Records worth waking the writer thread for (a group worth a transaction): a wake-up per record
// cost a committer more than its record.
constexpr std::size_t worth_waking = 32;
// How long the writer thread lets a group of logged records gather before it writes fewer.
constexpr std::chrono::milliseconds gather_time{2};

constexpr const char* insert_record_sql =
    "INSERT INTO pop_commits(version, at_us, process, writes, messages, checksum) VALUES (?, ?, "
    "?, ?, ?, ?)";

// Replays the records the commit log holds after the database's last version onto `root` and
// writes them into the database, in one transaction: the journal is then whole without its log.
absl::Status recover_logged(sqlite3* db, const std::string& path,
                            const std::vector<const commit_log::entry*>& recovered, node_ptr& root,
                            journal_info& info) {
  if (recovered.empty()) return absl::OkStatus();
  for (const commit_log::entry* e : recovered) {
    POP_RETURN_IF_ERROR(replay(root, e->writes, e->version, path));
  }
  statement insert;
  POP_RETURN_IF_ERROR(prepare(db, path, insert_record_sql, insert));
  POP_RETURN_IF_ERROR(exec(db, path, "BEGIN IMMEDIATE"));
  for (const commit_log::entry* e : recovered) {
    bind_record(insert.s, e->version, e->at_us, e->process, e->writes, e->messages, e->checksum);
    if (const int rc = sqlite3_step(insert.s); rc != SQLITE_DONE) {
      absl::Status s =
          sql_error(db, rc, path, absl::StrCat("moving version ", e->version, " from its log"));
      static_cast<void>(exec(db, path, "ROLLBACK"));
      return s;
    }
  }
  if (absl::Status s = exec(db, path, "COMMIT"); !s.ok()) {
    static_cast<void>(exec(db, path, "ROLLBACK"));
    return s;
  }
  info.last_version = recovered.back()->version;
  info.records += recovered.size();
  for (const commit_log::entry* e : recovered) {
    info.record_bytes += record_text_bytes(e->process.size(), e->writes.size(), e->messages.size());
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<journal>> journal::open(const std::string& path, durability level,
                                                       const journal_options& opts,
                                                       const std::string& outbox_path,
                                                       const json& initial_state,
                                                       std::shared_ptr<const clock> clock,
                                                       journal_start& start) {
  // The advisory lock first, so no other engine changes the file while it is checked.
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("journal '", path, "': cannot open it: ", std::strerror(errno)));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    return absl::FailedPreconditionError(
        absl::StrCat("journal '", path, "' is already open in another engine"));
  }
  const auto fail = [&](absl::Status s) {
    ::close(fd);
    return s;
  };
  journal_info info;
  bool existing = false;
  if (file_size(path) > 0 && !file_exists(path + "-wal")) {
    if (absl::Status s = precheck_without_wal(path, info, existing); !s.ok()) return fail(s);
  }
  connection c;
  int rc =
      sqlite3_open_v2(path.c_str(), &c.db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr);
  if (rc != SQLITE_OK) return fail(sql_error(c.db, rc, path, "opening it"));
  // Until the journal is known to be sound, closing must not checkpoint into the main file.
  sqlite3_db_config(c.db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, nullptr);
  sqlite3_busy_timeout(c.db, 5000);
  if (file_size(path) > 0) {
    // Through the log, if there is one: the metadata as last committed.
    if (absl::Status s = read_meta(c.db, path, info, existing); !s.ok()) return fail(s);
    if (!existing) {
      if (absl::Status s = check_foreign(c.db, path); !s.ok()) return fail(s);
    }
  }
  node_ptr root;
  if (existing) {
    if (info.outbox_path != outbox_path) {
      return fail(absl::FailedPreconditionError(absl::StrCat(
          "journal '", path, "' keeps its outbox at '", info.outbox_path,
          "', but options.outbox_path is '", outbox_path, "'; open it with the same outbox path")));
    }
    if (absl::Status s = load(c.db, path, info, root); !s.ok()) return fail(s);
  } else {
    if (absl::Status s = exec(c.db, path, "PRAGMA journal_mode=WAL"); !s.ok()) return fail(s);
    // Schema, metadata and the first snapshot in one transaction: a crash while creating the
    // journal leaves either all of it or none (then it is created again), never a half journal.
    if (absl::Status s = exec(c.db, path, "BEGIN IMMEDIATE"); !s.ok()) return fail(s);
    absl::Status s = exec(c.db, path, journal_schema);
    if (s.ok()) {
      s = set_meta(c.db, path, "format_version", std::to_string(journal_format_version));
    }
    if (s.ok()) s = set_meta(c.db, path, "outbox_path", outbox_path);
    if (s.ok()) s = set_meta(c.db, path, "created_at_us", std::to_string(clock->now_us()));
    if (s.ok()) s = insert_snapshot(c.db, path, 0, initial_state.dump(), clock->now_us());
    if (s.ok()) s = exec(c.db, path, "COMMIT");
    if (!s.ok()) {
      static_cast<void>(exec(c.db, path, "ROLLBACK"));
      return fail(s);
    }
    root = make_root(initial_state);
  }
  if (absl::Status s = exec(c.db, path, "PRAGMA journal_mode=WAL"); !s.ok()) return fail(s);
  if (absl::Status s = exec(
          c.db, path,
          level == durability::power ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL");
      !s.ok()) {
    return fail(s);
  }
  // Commits acknowledged from the commit log that a crash kept from SQLite go into SQLite first.
  std::uint32_t known_epoch = 0;
  absl::StatusOr<commit_log::contents> logged = commit_log::read(log_path(path));
  if (!logged.ok()) return fail(logged.status());
  if (absl::Status s = check_log(c.db, path, info, *logged, known_epoch, /*reread=*/false);
      !s.ok()) {
    return fail(s);
  }
  if (existing) {
    if (absl::Status s =
            recover_logged(c.db, path, log_continuation(*logged, info.last_version), root, info);
        !s.ok()) {
      return fail(s);
    }
    // A snapshot's worth replayed (an engine that never ran long enough to write one, say one
    // killed every few hundred commits): the snapshot now, so the next open does not replay them
    // again, and each restart of a crash loop is not slower than the one before. Only a saving: if
    // it cannot be written (rolled back, the journal as it was), the open goes on without it and
    // the writer thread writes it when the next commit finds it due.
    if (info.records > 0 &&
        (info.records >= opts.snapshot_every || info.record_bytes >= opts.snapshot_bytes)) {
      bool written = false;
      try {
        written = detail::write_snapshot(c.db, path, info.last_version,
                                         record_encoder::value_text({root.get(), nullptr}),
                                         clock->now_us())
                      .ok();
      } catch (const std::exception&) {  // (the state's text too large to build, say)
      }
      if (written) {
        info.snapshot_version = info.last_version;
        info.records = 0;
        info.record_bytes = 0;
      }
    }
  }
  std::unique_ptr<commit_log> log;
  if (level == durability::process && opts.log_bytes > 0) {
    // A new epoch above the journal's (a log one above it was made by an open that crashed
    // before recording it: it acknowledged nothing, and is replaced by a fresh file).
    const std::uint32_t epoch =
        logged->epoch == known_epoch + 1 ? logged->epoch : std::max(known_epoch, logged->epoch) + 1;
    absl::StatusOr<std::unique_ptr<commit_log>> created =
        commit_log::create(log_path(path), opts.log_bytes, epoch);
    if (!created.ok()) return fail(created.status());
    log = *std::move(created);
    if (absl::Status s = set_meta(c.db, path, "log_epoch", std::to_string(epoch)); !s.ok()) {
      return fail(s);
    }
  } else if (known_epoch != 0) {
    if (absl::Status s = set_meta(c.db, path, "log_epoch", "0"); !s.ok()) return fail(s);
    ::unlink(log_path(path).c_str());
  }
  if (existing && info.format_version < journal_format_version) {
    // Records appended from now on take format 2's checksums: say so (once the journal is known
    // sound and recovered), so that a build reading only format 1 refuses it instead of finding
    // its new records damaged.
    if (absl::Status s =
            set_meta(c.db, path, "format_version", std::to_string(journal_format_version));
        !s.ok()) {
      return fail(s);
    }
    info.format_version = journal_format_version;
  }
  // Mark the journal in use, in the main file itself, so a lost write-ahead log is noticed.
  if (absl::Status s = set_meta(c.db, path, "clean", "0"); !s.ok()) return fail(s);
  if (absl::Status s = exec(c.db, path, "PRAGMA wal_checkpoint(FULL)"); !s.ok()) return fail(s);
  sqlite3_db_config(c.db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 0, nullptr);
  const int head_fd = ::open(head_path(path).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (head_fd < 0) {
    return fail(
        absl::UnavailableError(absl::StrCat("journal '", path, "': cannot open its head file '",
                                            head_path(path), "': ", std::strerror(errno))));
  }
  if (absl::Status s = write_head(head_fd, path, info.last_version); !s.ok()) {
    ::close(head_fd);
    return fail(s);
  }
  start.version = info.last_version;
  start.root = std::move(root);
  std::unique_ptr<journal> j(new journal(path, level, opts, fd, head_fd, c.release(),
                                         info.last_version, info.snapshot_version,
                                         info.record_bytes, std::move(clock), std::move(log)));
  if (int prc = sqlite3_prepare_v2(j->db_, insert_record_sql, -1, &j->insert_, nullptr);
      prc != SQLITE_OK) {
    return sql_error(j->db_, prc, path, "preparing the record insert");
  }
  for (auto [sql, stmt] : {std::pair{"BEGIN IMMEDIATE", &j->begin_}, {"COMMIT", &j->commit_}}) {
    if (int prc = sqlite3_prepare_v2(j->db_, sql, -1, stmt, nullptr); prc != SQLITE_OK) {
      return sql_error(j->db_, prc, path, absl::StrCat("preparing ", sql));
    }
  }
  j->writer_ = std::thread([raw = j.get()] { raw->run_writer(); });
  return j;
}

journal::journal(std::string path, durability level, const journal_options& opts, int lock_fd,
                 int head_fd, sqlite3* db, std::uint64_t version, std::uint64_t snapshot_version,
                 std::uint64_t replayed_bytes, std::shared_ptr<const clock> clock,
                 std::unique_ptr<commit_log> log)
    : path_(std::move(path)),
      clock_(std::move(clock)),
      level_(level),
      options_(opts),
      lock_fd_(lock_fd),
      head_fd_(head_fd),
      db_(db),
      durable_(version),
      acked_(version),
      log_(std::move(log)),
      snapshot_base_(snapshot_version),
      filled_bytes_(replayed_bytes) {}

journal::~journal() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  if (writer_.joinable()) writer_.join();
  close_cleanly();
  for (sqlite3_stmt* stmt : {insert_, begin_, commit_}) {
    if (stmt) sqlite3_finalize(stmt);
  }
  sqlite3_close_v2(db_);
  ::close(head_fd_);
  ::close(lock_fd_);
}

void journal::close_cleanly() {
  std::unique_lock lock(mu_);
  // Records acknowledged from the log that SQLite lacks yet go into it first.
  while (failed_.ok() && !writing_ && !queue_.empty()) {
    write_front(lock);
  }
  if (!failed_.ok() || !queue_.empty()) return;  // leave it marked in use: reopening checks it
  unwritten_.insert(unwritten_.end(), described_.begin(), described_.end());
  described_.clear();
  // Best effort: a description that cannot be written never decides the clean marker.
  if (!unwritten_.empty()) static_cast<void>(write_descriptions(std::exchange(unwritten_, {})));
  if (set_meta(db_, path_, "clean", "1").ok()) {
    static_cast<void>(exec(db_, path_, "PRAGMA wal_checkpoint(TRUNCATE)"));
  }
}

std::shared_ptr<journal_record> journal::reserve(std::uint64_t version,
                                                 std::shared_ptr<const version_state> state) {
  std::shared_ptr<journal_record> r;
  {
    const std::lock_guard lock(spare_mu_);
    if (!spare_.empty()) {
      r = std::move(spare_.back());
      spare_.pop_back();
    }
  }
  if (!r) r = std::make_shared<journal_record>();
  r->version = version;
  // Kept until fill() (under the engine's commit lock, as this) decides whether a snapshot may
  // be due at it.
  r->state = std::move(state);
  return r;
}

// (Usually nobody needs waking: the committer that filled `r` calls wait_durable() next and
// writes it unless somebody else is writing, who then hands over to a waiter. Two cases do:
// committers already waiting for earlier records while nobody writes (at durability::power); and
// a batch's committer goes on without waiting, so an idle writer thread is woken once enough
// records wait to fill a group worth a transaction (a wake-up per record cost the committer more
// than the record). The rest of a batch's records are written when the writer next hands over,
// or at the batch's end, by the writer or by the batch's own thread.)
//
// A record keeps its version's state only if a snapshot may be due at it (snapshot_every versions
// or snapshot_bytes of records have passed since the last snapshot); any other drops it here, on
// the committing thread. (The writer thread used to drop them after each group, freeing the
// replaced tree nodes there: the committers' allocator arena then bounced between the two
// threads, a tenth of a batch's time.)
std::uint64_t journal::fill(const std::shared_ptr<journal_record>& r, bool wake_writer) noexcept {
  r->checksum = record_checksum(static_cast<std::int64_t>(r->version), r->at_us, r->process,
                                r->writes, r->messages);
  bool notify = false;
  std::uint64_t acked = 0;
  std::shared_ptr<const version_state> dropped;
  std::vector<waiter*> taken;
  {
    std::unique_lock lock(mu_);
    assert(queue_.empty() || queue_.back()->version + 1 == r->version);
    queue_.push_back(r);
    filled_bytes_ += record_bytes(*r);
    if (!snapshot_due(r->version)) dropped = std::move(r->state);
    if (log_) log_record(*r, lock);
    if (r->logged) {
      advance_acked();
      take_waiters(taken);  // committers of versions acknowledged now
    }
    // The writer is needed: without a log, by committers already waiting while nobody writes,
    // batch or not; with one, once a group's worth waits (or a committer waits for room), or if
    // it sleeps with nothing to gather (it then lets a group gather for a moment). (The queue
    // may be empty: the writer may have written `r` while it waited for room.)
    notify =
        log_ ? group_ready() || (writer_idle_ && !writing_ && !queue_.empty())
             : !writing_ && (!waiters_.empty() || (wake_writer && queue_.size() >= worth_waking));
    acked = acked_;
  }
  if (notify) work_cv_.notify_one();
  wake(taken);
  return acked;
}

void journal::log_record(journal_record& r, std::unique_lock<std::mutex>& lock) {
  if (!r.error.ok() || !log_->fits(r.process.size() + r.writes.size() + r.messages.size())) {
    return;  // acknowledged once SQLite holds it
  }
  for (;;) {
    // (While it waited for room the writer may have written it into SQLite: then nothing to do.)
    if (!failed_.ok() || r.version <= durable_) return;
    if (log_->append(r.version, r.at_us, r.process, r.writes, r.messages, r.checksum)) break;
    // No room until the writer has put older records into SQLite and freed theirs.
    ++room_waiters_;
    work_cv_.notify_one();
    room_cv_.wait(lock, [&] {
      return !failed_.ok() || r.version <= durable_ || log_->used() < log_->capacity() / 2;
    });
    --room_waiters_;
  }
  r.logged = true;
}

void journal::advance_acked() {
  acked_ = std::max(acked_, durable_);
  while (!queue_.empty() && acked_ + 1 >= queue_.front()->version) {
    const std::size_t i = acked_ + 1 - queue_.front()->version;
    if (i >= queue_.size() || !queue_[i]->logged) break;
    ++acked_;
  }
}

bool journal::group_ready() const {
  return !writing_ && !queue_.empty() &&
         (!waiters_.empty() || queue_.size() >= worth_waking || room_waiters_ > 0 || !log_);
}

std::size_t journal::record_bytes(const journal_record& r) {
  return record_text_bytes(r.process.size(), r.writes.size(), r.messages.size());
}

bool journal::snapshot_due(std::uint64_t version) const {
  return version - snapshot_base_ >= options_.snapshot_every ||
         filled_bytes_ >= options_.snapshot_bytes;
}

void journal::fail(const std::shared_ptr<journal_record>& r, absl::Status why) noexcept {
  std::lock_guard lock(mu_);
  queue_.push_back(r);
  r->error = std::move(why);
  r->state.reset();
}

absl::Status journal::wait_durable(std::uint64_t version) {
  waiter w(version);
  std::unique_lock lock(mu_);
  for (;;) {
    if (acked_ >= version) return absl::OkStatus();
    if (!failed_.ok()) return failed_;
    const bool ready = !writing_ && !queue_.empty();
    // A lone committer writes its record itself: no hand-off to the writer thread and back.
    // Under contention the writer thread writes the groups: they are larger, and a committer
    // preempted while it held the token would stall every other one.
    if (ready && active_.load(std::memory_order_relaxed) <= 1 && queue_.size() == 1 &&
        waiters_.empty()) {
      write_front(lock);
      continue;
    }
    w.ready.reset();
    waiters_.push_back(&w);
    lock.unlock();
    if (ready) work_cv_.notify_one();
    w.ready.wait();
    if (w.durable) return absl::OkStatus();  // (else woken by a failure)
    lock.lock();
  }
}

void journal::write_front(std::unique_lock<std::mutex>& lock) {
  writing_ = true;
  std::deque<std::shared_ptr<journal_record>> group;
  try {
    write_front_group(lock, group);
  } catch (const std::exception& e) {
    // (Say, bad_alloc.) The token must be handed back, or every later commit would wait forever.
    if (!lock.owns_lock()) lock.lock();
    has_failed_.store(true, std::memory_order_release);
    failed_ = absl::InternalError(absl::StrCat("the journal failed after version ", durable_,
                                               ": unexpected exception: ", e.what(),
                                               "; the engine refuses further commits"));
  }
  hand_over(lock, &group);
}

void journal::write_front_group(std::unique_lock<std::mutex>& lock,
                                std::deque<std::shared_ptr<journal_record>>& group) {
  while (!queue_.empty() && queue_.front()->error.ok() && group.size() < options_.max_group) {
    group.push_back(std::move(queue_.front()));
    queue_.pop_front();
  }
  absl::Status s;
  if (group.empty()) {  // the front record could not be encoded
    s = queue_.front()->error;
  } else {
    lock.unlock();
    const absl::Status written = write_group(group);
    const std::uint64_t last = group.back()->version;
    s = written.ok() ? write_head(head_fd_, path_, last) : written;
    lock.lock();
    if (written.ok()) {
      // In SQLite: durable even if the head file could not be written (the journal then fails).
      durable_ = last;
      advance_acked();
      if (log_) log_->release_through(durable_);
    }
    if (s.ok()) {
      const journal_record* due = nullptr;  // the group's newest record that kept its state
      for (const std::shared_ptr<journal_record>& r : group) {
        if (r->state) due = r.get();
      }
      if (due != nullptr && snapshot_due(due->version)) {
        // The group's committers go first; the token is kept for the snapshot, so no group is
        // written before it.
        std::vector<waiter*> taken;
        take_waiters(taken);
        lock.unlock();
        wake(taken);
        s = write_snapshot(*due);
        lock.lock();
        if (s.ok()) {
          // What was filled after the snapshot's version counts toward the next one.
          snapshot_base_ = due->version;
          filled_bytes_ = 0;
          for (const std::shared_ptr<journal_record>& r : group) {
            if (r->version > due->version) filled_bytes_ += record_bytes(*r);
          }
          for (const std::shared_ptr<journal_record>& r : queue_) {
            filled_bytes_ += record_bytes(*r);
          }
        }
      }
    }
  }
  if (!s.ok()) {
    has_failed_.store(true, std::memory_order_release);
    failed_ = annotate(s, absl::StrCat("the journal failed after version ", durable_,
                                       "; the engine refuses further commits"));
  }
}

void journal::hand_over(std::unique_lock<std::mutex>& lock,
                        std::deque<std::shared_ptr<journal_record>>* written) {
  writing_ = false;
  std::vector<waiter*> taken;
  take_waiters(taken);
  const bool writer_work = failed_.ok() && (!described_.empty() || group_ready());
  const bool room_waited = room_waiters_ > 0;
  lock.unlock();
  if (writer_work) work_cv_.notify_one();
  if (room_waited) room_cv_.notify_all();
  wake(taken);
  // Recycled (or freed) without mu_: committers fill their records under it (and under the
  // engine's commit lock), and freeing a group of hundreds of records held them all up.
  if (written != nullptr) recycle(*written);
  lock.lock();
}

void journal::recycle(std::deque<std::shared_ptr<journal_record>>& written) {
  std::vector<std::shared_ptr<journal_record>> kept;
  kept.reserve(std::min(written.size(), spare_records));
  for (std::shared_ptr<journal_record>& r : written) {
    // (A committer may still hold its record for a moment; then it is freed as before.)
    if (kept.size() == spare_records || r.use_count() != 1) continue;
    // (The count is read relaxed: order the committer's last use of it before the reuse.)
    std::atomic_thread_fence(std::memory_order_acquire);
    r->state.reset();
    r->error = absl::OkStatus();
    r->logged = false;
    r->at_us = 0;
    r->checksum = 0;
    for (std::string* text : {&r->process, &r->writes, &r->messages}) {
      if (text->capacity() > spare_text) {
        std::string().swap(*text);
      } else {
        text->clear();
      }
    }
    kept.push_back(std::move(r));
  }
  written.clear();
  if (kept.empty()) return;
  const std::lock_guard lock(spare_mu_);
  const std::size_t room = spare_records - std::min(spare_.size(), spare_records);
  for (std::size_t i = 0; i < kept.size() && i < room; ++i) spare_.push_back(std::move(kept[i]));
}

void journal::take_waiters(std::vector<waiter*>& out) {
  const bool all = !failed_.ok();
  std::erase_if(waiters_, [&](waiter* w) {
    if (!all && w->version > acked_) return false;
    w->durable = w->version <= acked_;
    out.push_back(w);
    return true;
  });
}

void journal::wake(std::vector<waiter*>& taken) {
  // A released waiter may return at once and take its waiter with it: never touched after.
  for (waiter* w : taken) w->ready.set();
  taken.clear();
}

std::uint64_t journal::durable_version() const {
  std::lock_guard lock(mu_);
  return acked_;
}

absl::Status journal::failure() const {
  // (Every commit asks: without the lock when the journal has not failed.)
  if (!has_failed_.load(std::memory_order_acquire)) return absl::OkStatus();
  std::lock_guard lock(mu_);
  return failed_;
}

void journal::describe(std::string key, std::string value) {
  {
    std::lock_guard lock(mu_);
    described_.emplace_back(std::move(key), std::move(value));
  }
  work_cv_.notify_one();
}

absl::Status journal::write_descriptions(std::vector<std::pair<std::string, std::string>> items) {
  POP_RETURN_IF_ERROR(exec(db_, path_, "BEGIN IMMEDIATE"));
  for (const auto& [key, value] : items) {
    if (absl::Status s = set_meta(db_, path_, key.c_str(), value); !s.ok()) {
      static_cast<void>(exec(db_, path_, "ROLLBACK"));
      return s;
    }
  }
  if (absl::Status s = exec(db_, path_, "COMMIT"); !s.ok()) {
    static_cast<void>(exec(db_, path_, "ROLLBACK"));
    return s;
  }
  return absl::OkStatus();
}

void journal::run_writer() {
  std::unique_lock lock(mu_);
  for (;;) {
    const auto work = [&] {
      return stop_ || (failed_.ok() && (group_ready() || (!writing_ && !described_.empty())));
    };
    if (log_ && failed_.ok() && !queue_.empty()) {
      // Logged records are acknowledged already: a group may gather, but not for long.
      if (!work_cv_.wait_for(lock, gather_time, work)) {
        if (failed_.ok() && !writing_ && !queue_.empty()) {
          write_front(lock);
        }
        continue;
      }
    } else {
      writer_idle_ = true;
      work_cv_.wait(lock, [&] { return work() || (log_ && failed_.ok() && !queue_.empty()); });
      writer_idle_ = false;
      if (!work()) continue;  // logged records arrived: let a group gather
    }
    if (stop_) return;
    if (group_ready()) {
      write_front(lock);
      continue;
    }
    writing_ = true;
    std::vector<std::pair<std::string, std::string>> described;
    described.swap(described_);
    lock.unlock();
    // Descriptions are not commits: one that cannot be written is not a reason to stop the
    // journal (the next close tries again).
    if (!write_descriptions(described).ok()) {
      unwritten_.insert(unwritten_.end(), described.begin(), described.end());
    }
    lock.lock();
    hand_over(lock);
  }
}

absl::Status journal::run_prepared(sqlite3_stmt* stmt, const char* what) {
  const int rc = sqlite3_step(stmt);
  sqlite3_reset(stmt);
  return rc == SQLITE_DONE ? absl::OkStatus() : sql_error(db_, rc, path_, what);
}

absl::Status journal::write_group(std::deque<std::shared_ptr<journal_record>>& group) {
  POP_RETURN_IF_ERROR(run_prepared(begin_, "BEGIN IMMEDIATE"));
  for (const std::shared_ptr<journal_record>& r : group) {
    bind_record(insert_, r->version, r->at_us, r->process, r->writes, r->messages, r->checksum);
    const int rc = sqlite3_step(insert_);
    if (rc != SQLITE_DONE) {
      absl::Status s = sql_error(db_, rc, path_, absl::StrCat("writing version ", r->version));
      static_cast<void>(exec(db_, path_, "ROLLBACK"));
      return s;
    }
  }
  sqlite3_reset(insert_);
  if (absl::Status s = run_prepared(commit_, "COMMIT"); !s.ok()) {
    static_cast<void>(exec(db_, path_, "ROLLBACK"));
    return s;
  }
  return absl::OkStatus();
}

absl::Status journal::write_snapshot(const journal_record& last) {
  std::string state;
  try {
    state = record_encoder::value_text({last.state->root.get(), nullptr});
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("cannot encode the snapshot of version ", last.version, ": ", e.what()));
  }
  return detail::write_snapshot(db_, path_, last.version, state, clock_->now_us());
}

}  // namespace pop::detail
