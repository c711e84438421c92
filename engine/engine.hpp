// Defines pop::engine: the process registry, execution, commits (CAS) and commit notifications.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <mutex>
#include <shared_mutex>
#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "pop/contracts/clock.hpp"
#include "pop/contracts/json.hpp"
#include "pop/contracts/outbox_message.hpp"
#include "pop/contracts/path.hpp"
#include "pop/contracts/process_spec.hpp"
#include "pop/engine/audit_log.hpp"
#include "pop/engine/context.hpp"
#include "pop/engine/journal.hpp"
#include "pop/engine/result.hpp"
#include "pop/engine/snapshot.hpp"
#include "pop/engine/subscription.hpp"

namespace pop {

struct dry_run_result;
namespace detail {
struct journal_record;
struct precoded_record;
struct journal_start;
class journal;
struct prepared;
struct applied;
struct registered;
struct process_registry;
struct pace_gate;
class written_log;
}  // namespace detail

// A process: a pure function of the snapshot (through its context) and the call's arguments,
// returning the writes and messages to commit, or an error status (nothing is committed).
// A lambda returning pop::result converts to it.
using process_fn = std::function<absl::StatusOr<result>(const context& ctx, const json& args)>;

// How execute() retries a process whose commit conflicted.
struct retry_policy {
  int max_attempts = 16;                          // runs in all, including the first
  std::chrono::microseconds initial_backoff{10};  // doubled per retry, up to max_backoff,
  std::chrono::microseconds max_backoff{2000};    // and each wait drawn uniformly below it
};

// Engine settings; the defaults make a pure in-memory engine.
struct options {
  std::string outbox_path = "domain.outbox_queue";  // where pending messages live in the state
  json initial_state = json::object();              // the state at version 0 (an object)
  retry_policy retry{};
  std::size_t audit_capacity = 4096;    // attempts kept in the audit log; 0 disables it
  std::size_t conflict_window = 65536;  // recent commits whose written paths are kept to
                                        // validate commits; an attempt on an older snapshot
                                        // is re-run unless every path it read or wrote still
                                        // holds the same stored value (and existed then)
  std::size_t max_pending = 0;          // backpressure: a commit that would leave more messages
                                        // pending fails with kResourceExhausted; 0: no bound
  // Flow control. While a relay publishes the outbox (it holds the engine's pace: see
  // hold_pace), a process that may emit messages waits before it runs while more than
  // pace_pending messages are pending: each commit that removes messages (the relay's clears)
  // lets as many waiting processes run as it removed, so producers faster than the relay are held
  // to its pace instead of growing the outbox (and every journal snapshot with it) without
  // bound. A wait lasts at most pace_wait; one that times out (no clear came) stalls flow control
  // until the relay removes messages again. Nothing waits while no relay holds the pace, on a
  // thread a holder marked as its own (the relay's: it would wait for itself), or inside an
  // engine::batch of a journaled engine (the relay sees its commits only at its end).
  // 0: never waits.
  std::size_t pace_pending = 16384;
  // The longest one wait, 1 us to 60 s; real time (std::chrono::steady_clock), not options.clock.
  std::chrono::microseconds pace_wait{100'000};
  std::string journal{};  // SQLite journal file; empty: in memory only
  pop::durability durability = pop::durability::process;  // with a journal: process or power
  journal_options journal_tuning{};                       // snapshot interval, group size
  // Where the engine and everything built on it (relay, inbox, workflows, NATS adapters) read
  // the wall time: commit and message times, retry schedules, deadlines. A pop::manual_clock
  // lets tests move time instead of waiting.
  std::shared_ptr<const pop::clock> clock = pop::system_clock();
};

// What a successful execute() did.
struct commit {
  std::uint64_t version = 0;               // the new version, or the snapshot's if nothing changed
  bool changed = false;                    // false if the process returned no writes or messages
  int attempts = 1;                        // runs it took (1 + conflict retries)
  std::vector<std::string> message_ids{};  // ids of the messages it emitted, in order
};

// The two forms of compare_and_swap.
enum class cas_mode {
  strict,  // commit only if the state is still exactly at expected_version
  keys,    // commit if no commit after expected_version wrote a path overlapping these writes
};

// What compare_and_swap() did; a lost race is an ordinary outcome, not an error.
struct cas_result {
  bool committed = false;
  std::uint64_t version = 0;  // the new version if committed, else the current version
};

// What flow control has done (see options.pace_pending and engine::hold_pace).
struct pace_stats {
  std::size_t holds = 0;        // holds alive (running relays that publish)
  std::size_t pending = 0;      // messages pending at the last commit seen while one was alive
  std::size_t waiting = 0;      // processes waiting now
  std::uint64_t paced = 0;      // processes that waited, so far
  std::uint64_t timed_out = 0;  // of them, those whose wait lasted options.pace_wait
  bool stalled = false;         // a wait timed out: none waits until the relay moves again
  std::uint64_t taken = 0;      // holds taken, ever
};

// A hold on an engine's pace (see engine::hold_pace). Movable; destroying or resetting it ends
// the hold. It may outlive its engine.
class pace_hold {
 public:
  pace_hold() = default;
  pace_hold(pace_hold&& other) noexcept;
  pace_hold& operator=(pace_hold&& other) noexcept;
  pace_hold(const pace_hold&) = delete;
  pace_hold& operator=(const pace_hold&) = delete;
  ~pace_hold() { reset(); }

  // Marks the calling thread as the holder's: a process run on it never waits for the pace (it
  // would wait for itself). A relay calls it from each round (its strand may move between
  // threads: the mark is the last one's). The engine keeps the marks of 8 holds; more holds
  // still hold, unmarked.
  void on_this_thread();
  // Ends the hold (no effect on an empty one).
  void reset();
  explicit operator bool() const { return gate_ != nullptr; }

 private:
  friend class engine;
  pace_hold(std::shared_ptr<detail::pace_gate> gate, std::size_t slot)
      : gate_(std::move(gate)), slot_(slot) {}
  std::shared_ptr<detail::pace_gate> gate_;
  std::size_t slot_ = 0;  // where the gate keeps its holder's thread (or past the last slot)
};

// What clear_messages() did.
struct clear_result {
  std::uint64_t version = 0;  // the version committed, or the head's if nothing was removed
  std::size_t removed = 0;    // messages removed
};

// The embeddable state engine: versioned immutable state, registered processes run under their
// contracts, and serializable commits of their writes and outbox messages.
//
// Thread safety: every member function may be called from any number of threads at once.
// Processes run outside any lock; only commit validation and the pointer swap are serialized.
// Lifetime: not copyable or movable; snapshots and views taken from it may outlive it.
class engine {
 public:
  // An in-memory engine with default options. Cannot fail; every other engine comes from open().
  engine();
  // Returns a new engine, or kInvalidArgument naming the bad option (outbox path; initial state:
  // not an object, not storable JSON as check_storable says, or an outbox that is not [], a list
  // of new messages or an object of stored messages; retry policy, conflict window, durability).
  // An outbox seeded as a list (Theus's `outbox_queue: []`) starts as that many messages of
  // version 0; one seeded as an object of stored messages must hold ids of version 0 only (later
  // ones are given to the engine's own commits, whose messages would replace them). The engine
  // keeps no copy of options.initial_state. With options.journal, opens or
  // creates the journal:
  // a new one starts at version 0 with options.initial_state; an existing one resumes at its last
  // acknowledged version with its state and outbox (initial_state is ignored). Journal errors:
  // kFailedPrecondition (open in another engine, a newer format, another outbox path), kDataLoss
  // (damaged, or its write-ahead log lost after a crash; the file is left as it was),
  // kUnavailable (cannot be opened).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<engine>> open(options opts);
  ~engine();
  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;

  // Registers `fn` under `spec`. Returns kInvalidArgument for a bad spec (name, paths, topics,
  // nested or repeated declarations) or an empty function, kAlreadyExists if the name is taken.
  [[nodiscard]] absl::Status register_process(process_spec spec, process_fn fn);
  // The registered process names, sorted.
  std::vector<std::string> processes() const;

  // Records a description of something built on this engine in its journal, for tools that read
  // the journal without the program (the `pop` command's graph and its defaults): `kind` and
  // `name` (each 1 to max_path_length characters, no '/') name it, `what` is any JSON. A later
  // description of the same kind and name replaces it. register_process() describes every process
  // ("process", its spec); the workflow engine and dead letters describe themselves. Written by the
  // journal's thread soon after, and at the latest when the engine closes; not a commit (no
  // version). No effect in memory. kInvalidArgument for a bad kind or name.
  absl::Status describe(std::string_view kind, std::string_view name, const json& what);

  // Runs process `name` with `args` on the newest snapshot and commits what it returns.
  // Returns the commit, or: kNotFound (no such process); kPermissionDenied (it read, wrote or
  // emitted outside its contract); kInvalidArgument (a bad path, or a write replacing the outbox);
  // kFailedPrecondition (a write through a non-object, a failed typed read); kDeadlineExceeded
  // (ran past its timeout); kAborted (still conflicting after retry.max_attempts runs);
  // kResourceExhausted (its messages would exceed options.max_pending; not retried); or the
  // status the process returned or threw, annotated with its name (kUnknown for a plain
  // exception). On any error nothing is committed. Conflicting runs are retried with jittered
  // exponential backoff on a fresh snapshot; each run starts clean, so messages are never
  // duplicated. A process that may emit can first wait for the relay, up to options.pace_wait
  // (flow control: see options.pace_pending).
  [[nodiscard]] absl::StatusOr<commit> execute(std::string_view name,
                                               const json& args = json::object());

  // Group commit on one thread. Runs `body`; the commits this thread makes on this engine inside
  // it (execute, compare_and_swap, clear_messages, and what is built on them, such as workflow
  // steps) return as soon as they are installed instead of each waiting for the journal, which
  // writes them in shared transactions (on its thread as groups of them queue up, the rest when
  // the batch ends). They are acknowledged when batch() returns OK, not before: only then are
  // they all durable at options.durability (a crash earlier may lose a suffix of them, never a
  // hole; the relay publishes none before it is durable), and commit notifications for them come
  // then. Returns the journal's failure if one of them could not be made durable, else body's
  // status (its commits stay committed either way). Commits of other threads, or of another
  // engine, are not affected; a nested batch of the same engine joins the outer one (so code
  // that acknowledges its own commits, such as a workflow runner's round, must not run inside
  // a batch of its engine). A batch holds what it has not yet written in memory: keep batches
  // to a bounded amount of work (the workflow runner's are one round). An in-memory engine just
  // runs body.
  [[nodiscard]] absl::Status batch(absl::FunctionRef<absl::Status()> body);

  // The low-level commit primitive: applies `writes` in order at a new version if `mode` allows.
  // Returns {committed, new version} or {not committed, current version}; kInvalidArgument for an
  // empty or bad write list, an expected_version ahead of the head, or a new outbox entry whose
  // id is of the committing version or later (those ids are given to emitted messages);
  // kResourceExhausted if it would grow the outbox past options.max_pending (nothing is written
  // on any error).
  [[nodiscard]] absl::StatusOr<cas_result> compare_and_swap(std::uint64_t expected_version,
                                                            std::vector<write> writes,
                                                            cas_mode mode = cas_mode::strict);

  // Removes from the outbox every message of `ids` that is still stored exactly as `seen` holds
  // it, in one commit (journaled like any); a message removed or changed since `seen` is left as
  // it is, and an id not pending is skipped. This is how a relay clears what it delivered:
  // unlike a compare_and_swap of deletes it never conflicts as a whole, and it costs
  // O(ids * log n) with no path parsing. Returns the commit's version and how many messages it
  // removed ({head version, 0} and no commit if none). kInvalidArgument for no ids, an id that is
  // not a path segment, or a snapshot of another engine; the journal's error if it failed.
  [[nodiscard]] absl::StatusOr<clear_result> clear_messages(const pop::snapshot& seen,
                                                            std::span<const std::string> ids);
  // clear_messages for ids held as views (say, of the messages in `seen`: nothing to copy).
  [[nodiscard]] absl::StatusOr<clear_result> clear_message_views(
      const pop::snapshot& seen, std::span<const std::string_view> ids);

  // The newest committed state. O(1); never blocks a commit for longer than a pointer copy, and
  // waits at most for a commit being applied in place (about a microsecond).
  pop::snapshot snapshot() const;
  // The newest committed version. O(1).
  std::uint64_t version() const;
  // The newest version that is as durable as options.durability promises (every version for an
  // in-memory engine). Snapshots may show newer versions; the relay publishes only up to this one.
  std::uint64_t durable_version() const;
  // Where the outbox lives in the state.
  const path& outbox_path() const { return *outbox_; }
  // The clock of options.clock; components built on this engine read the time from it.
  const pop::clock& clock() const { return *options_.clock; }

  // Holds producers to the pace of the caller, a relay that publishes the outbox: while any hold
  // returned here is alive, options.pace_pending applies (see there). A relay takes one while it
  // publishes without failures, and marks its thread with pace_hold::on_this_thread.
  [[nodiscard]] pace_hold hold_pace();
  // Flow control's counters.
  pace_stats pacing() const;

  // Calls `on_version` after every commit with a version >= the one just committed, until the
  // returned subscription is reset or destroyed (which waits for running calls to finish). Calls
  // come from committing threads, possibly several at once and out of order; keep them short and
  // do not subscribe or unsubscribe from inside one.
  [[nodiscard]] subscription on_commit(std::function<void(std::uint64_t version)> on_version);

  // Runs registered process `name` once against `fixture` instead of the engine state, exactly as
  // pop::dry_run does; the engine state is not touched. kNotFound if no such process.
  [[nodiscard]] absl::StatusOr<dry_run_result> dry_run(std::string_view name, const json& fixture,
                                                       const json& args = json::object()) const;

  // The audit records matching `q`, oldest first.
  std::vector<audit_record> audit(const audit_query& q = {}) const { return audit_.query(q); }

 private:
  engine(options opts, std::unique_ptr<detail::journal> journal, detail::journal_start start);

  using registered = detail::registered;
  using prepared = detail::prepared;
  using applied = detail::applied;
  enum class commit_status { committed, conflict };

  std::shared_ptr<const detail::version_state> head() const;
  std::shared_lock<std::shared_mutex> lock_head_shared() const;
  std::unique_lock<std::shared_mutex> lock_head() const;
  std::shared_ptr<const registered> find(std::string_view name) const;
  // Commits `prep`, computed on `snap`, unless a newer commit overlaps prep.access(). Pass the
  // caller's only pointer to `snap`: a version no one else holds is changed in place.
  absl::StatusOr<commit_status> commit_prepared(std::shared_ptr<const detail::version_state> snap,
                                                prepared& prep, applied& out, std::string& conflict,
                                                std::string_view process_name);
  // Applies `prep` to the head in place and installs it, if no one but the engine holds the head
  // and can_apply_in_place says it cannot fail (nor pass max_pending); false if not (nothing is
  // changed then).
  // `applicable`: can_apply_in_place said yes for the head already.
  bool commit_in_place(prepared& prep, applied& out,
                       std::shared_ptr<detail::journal_record>& record, bool applicable)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(commit_mu_);
  // kResourceExhausted naming `who` if `next` grows the outbox of `base` past max_pending.
  absl::Status check_pending_bound(const detail::version_state& base, const detail::node_ptr& next,
                                   std::string_view who) const;
  // True if every path of `access` holds the same stored value in `now` as in `then` (see
  // engine.cpp): no commit between them could conflict.
  static bool untouched_since(const path_set& access, const detail::value_node& then,
                              const detail::value_node& now);
  // The first logged write after `since` that overlaps `access`, as "path (version N)", or empty.
  std::string find_conflict(const path_set& access, std::uint64_t since) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(commit_mu_);
  // True if a commit after `since` removed or changed an outbox message of version <= `since`.
  bool outbox_entries_changed(std::uint64_t since) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(commit_mu_);
  // Makes `root` the head at `version`; returns the journal record to fill, if journaling.
  // `written`: the paths it wrote, those of appended messages from `messages_at` on (see
  // applied). `rewrote_outbox`: see applied. `head_locked`: the caller holds head_mu_ already
  // (exclusively).
  std::shared_ptr<detail::journal_record> install(std::uint64_t version, detail::node_ptr root,
                                                  std::string written,
                                                  std::size_t messages_at = std::string::npos,
                                                  bool rewrote_outbox = false,
                                                  bool head_locked = false)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(commit_mu_);
  // Journals the commit `done` of `prep` by `who`, waits until it is durable, then notifies.
  // Releases done.root (when the record is encoded). Called with `lock` holding commit_mu_ (the
  // lock of the install that reserved `record`); releases it once the record is filled, before
  // any wait: records are filled in version order, so no committer waits for an earlier one
  // still being encoded by a thread preempted after its install. `precoded`: prep's part of the
  // record, encoded before the lock (or null). `cleared`: ids of messages removed from the
  // outbox (by clear_messages), journaled as deletes after prep's writes.
  absl::Status finish_commit(const std::shared_ptr<detail::journal_record>& record,
                             const prepared& prep, applied& done, std::string_view who,
                             std::unique_lock<std::mutex>& lock,
                             detail::precoded_record* precoded = nullptr,
                             std::span<const std::string_view> cleared = {});
  // Waits before `proc` runs while flow control says so (options.pace_pending).
  void pace(const registered& proc);
  // The messages pending in `root`.
  std::size_t pending_in(const detail::value_node& root) const;
  void record(const registered& proc, int attempt, std::uint64_t seen, const prepared* prep,
              const applied* done, attempt_outcome outcome, std::string detail,
              std::chrono::steady_clock::time_point start);

  const options options_;
  const std::shared_ptr<const path> outbox_;

  const std::unique_ptr<detail::process_registry> registry_;  // its own lock inside

  // Lock order: commit_mu_ before head_mu_.
  std::mutex commit_mu_;
  // The paths each recent commit wrote (options.conflict_window of them), for find_conflict.
  const std::unique_ptr<detail::written_log> log_ ABSL_PT_GUARDED_BY(commit_mu_);
  // A commit applied in place holds it for the microsecond the change takes: it is taken by
  // trying a while before sleeping (lock_head_shared / lock_head), as a futex sleep and wake-up
  // would cost more. (A std::shared_mutex: ThreadSanitizer sees it, unlike a prebuilt
  // absl::Mutex.)
  mutable std::shared_mutex head_mu_;
  std::shared_ptr<const detail::version_state> head_ ABSL_GUARDED_BY(head_mu_);
  std::atomic<std::uint64_t> head_version_{0};  // head_->version, read without the lock

  std::shared_ptr<detail::commit_listeners> listeners_{};
  std::shared_ptr<detail::pace_gate> pace_;  // shared with the holds, which may outlive the engine
  bool pace_wake_ ABSL_GUARDED_BY(commit_mu_) = false;  // install saw a reason to wake waiters
  audit_log audit_;
  std::unique_ptr<detail::journal> journal_;
};

}  // namespace pop
