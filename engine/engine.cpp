#include "pop/engine/engine.hpp"

#include <algorithm>
#include <array>
#include <cassert>
#include <condition_variable>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <thread>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pop/contracts/process_error.hpp"
#include "pop/contracts/status.hpp"
#include "pop/engine/detail/journal.hpp"
#include "pop/engine/detail/journal_format.hpp"
#include "pop/engine/detail/outbox_form.hpp"
#include "pop/engine/detail/process_runner.hpp"
#include "pop/engine/detail/written_log.hpp"

namespace pop {

namespace detail {

// The registered processes by name, behind their own lock (kept out of engine.hpp).
struct process_registry {
  mutable std::shared_mutex mu;
  absl::flat_hash_map<std::string, std::shared_ptr<const registered>> by_name ABSL_GUARDED_BY(mu);
};

// Flow control's state (see options::pace_pending), shared by the engine and the holds.
struct pace_gate {
  static constexpr std::size_t slots = 8;  // holders whose threads are known (more hold, unmarked)
  std::atomic<std::size_t> holds{0};
  std::array<std::atomic<bool>, slots> slot_taken{};
  std::array<std::atomic<std::thread::id>, slots> holder_thread{};  // id(): none marked yet
  std::atomic<std::size_t> pending{0};  // at the last commit seen while holds > 0
  // Waiters the last commit that removed messages lets run: as many as it removed (a process
  // emits one message, usually), so producers add no more than the relay clears.
  std::atomic<std::int64_t> credits{0};
  std::atomic<bool> stalled{false};     // a wait timed out; until the relay moves again
  std::atomic<std::uint64_t> taken{0};  // holds taken, ever
  std::atomic<std::size_t> waiting{0};
  std::atomic<std::uint64_t> paced{0};
  std::atomic<std::uint64_t> timed_out{0};
  std::mutex mu;  // for cv only: the state above is atomic
  std::condition_variable cv;

  // Wakes the waiters, if any, to look at the state again (changed before this call).
  void wake() {
    if (waiting.load() == 0) return;
    const std::lock_guard lock(mu);
    cv.notify_all();
  }
  // Takes one credit if there is one.
  bool take_credit() {
    std::int64_t c = credits.load();
    while (c > 0 && !credits.compare_exchange_weak(c, c - 1)) {
    }
    return c > 0;
  }
  // Whether the calling thread is a holder's (see pace_hold::on_this_thread).
  bool held_by_this_thread() const {
    const std::thread::id me = std::this_thread::get_id();
    for (std::size_t i = 0; i < slots; ++i) {
      if (slot_taken[i].load() && holder_thread[i].load() == me) return true;
    }
    return false;
  }
};

}  // namespace detail

namespace {

using detail::process_runner;

// The engine::batch calls running on this thread, innermost first (one per engine: a nested
// batch of the same engine joins the outer one).
struct batch_frame {
  const engine* owner;
  std::uint64_t last = 0;  // the newest version committed in it
  batch_frame* outer;
};
thread_local batch_frame* innermost_batch = nullptr;

batch_frame* batch_of(const engine* e) {
  for (batch_frame* f = innermost_batch; f != nullptr; f = f->outer) {
    if (f->owner == e) return f;
  }
  return nullptr;
}

absl::Status validate_options(const options& o) {
  POP_RETURN_IF_ERROR(detail::parse_outbox_path(o.outbox_path, "options.outbox_path").status());
  if (!o.initial_state.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("options.initial_state must be a JSON object, not ",
                     detail::to_absl(type_with_article(o.initial_state))));
  }
  POP_RETURN_IF_ERROR(check_storable(o.initial_state, "options.initial_state"));
  if (o.retry.max_attempts < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("options.retry.max_attempts must be at least 1, not ", o.retry.max_attempts));
  }
  if (o.retry.initial_backoff.count() < 0 || o.retry.max_backoff < o.retry.initial_backoff) {
    return absl::InvalidArgumentError(
        "options.retry backoffs must satisfy 0 <= initial_backoff <= max_backoff");
  }
  if (!o.clock) return absl::InvalidArgumentError("options.clock must not be null");
  if (o.conflict_window < 1) {
    return absl::InvalidArgumentError("options.conflict_window must be at least 1");
  }
  if (!o.journal.empty() && o.durability == durability::none) {
    return absl::InvalidArgumentError(absl::StrCat(
        "options.durability is none but options.journal is '", o.journal,
        "': choose durability::process or durability::power, or leave the journal empty"));
  }
  if (o.pace_wait < std::chrono::microseconds(1) || o.pace_wait > std::chrono::seconds(60)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "options.pace_wait must be from 1 us to 60 s, not ", o.pace_wait.count(), " us"));
  }
  if (o.journal_tuning.snapshot_every < 1 || o.journal_tuning.max_group < 1 ||
      o.journal_tuning.max_batch_lag < 1) {
    return absl::InvalidArgumentError(
        "options.journal_tuning.snapshot_every, max_group and max_batch_lag must be at least 1");
  }
  if (o.journal_tuning.log_bytes > (std::size_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("options.journal_tuning.log_bytes is ",
                                                   o.journal_tuning.log_bytes,
                                                   ", above the largest commit log of 1 GiB"));
  }
  return absl::OkStatus();
}

void backoff(const retry_policy& policy, int attempt) {
  thread_local std::minstd_rand rng(std::random_device{}());
  const int shift = std::min(attempt - 1, 20);
  const auto ceiling = std::min<std::int64_t>(policy.max_backoff.count(),
                                              policy.initial_backoff.count() * (1LL << shift));
  if (ceiling <= 0) return;
  std::uniform_int_distribution<std::int64_t> pick(0, ceiling);
  std::this_thread::sleep_for(std::chrono::microseconds(pick(rng)));
}

attempt_outcome outcome_of(const absl::Status& s) {
  return s.code() == absl::StatusCode::kPermissionDenied ? attempt_outcome::contract_violation
                                                         : attempt_outcome::failed;
}

}  // namespace

engine::engine() : engine(options{}, nullptr, {0, detail::make_root(json::object())}) {}

engine::engine(options opts, std::unique_ptr<detail::journal> journal, detail::journal_start start)
    : options_(std::move(opts)),
      outbox_(std::make_shared<const path>(path::parse(options_.outbox_path).value())),
      registry_(std::make_unique<detail::process_registry>()),
      log_(std::make_unique<detail::written_log>()),
      listeners_(std::make_shared<detail::commit_listeners>()),
      pace_(std::make_shared<detail::pace_gate>()),
      audit_(options_.audit_capacity),
      journal_(std::move(journal)) {
  auto initial = std::make_shared<detail::version_state>();
  initial->outbox_path = outbox_;
  initial->version = start.version;
  initial->root = std::move(start.root);
  std::unique_lock lock(head_mu_);
  head_version_.store(initial->version, std::memory_order_release);
  head_ = std::move(initial);
}

engine::~engine() = default;

absl::StatusOr<std::unique_ptr<engine>> engine::open(options opts) {
  POP_RETURN_IF_ERROR(validate_options(opts));
  const path outbox = path::parse(opts.outbox_path).value();
  POP_ASSIGN_OR_RETURN(json initial, detail::initial_outbox(std::move(opts.initial_state), outbox,
                                                            opts.clock->now_us(), 0));
  // The engine keeps no copy of the initial state: once in the tree (or the journal) it is gone.
  opts.initial_state = json();
  detail::journal_start start;
  std::unique_ptr<detail::journal> journal;
  if (opts.journal.empty()) {
    start.root = detail::make_root(initial);
  } else {
    POP_ASSIGN_OR_RETURN(journal,
                         detail::journal::open(opts.journal, opts.durability, opts.journal_tuning,
                                               outbox.str(), initial, opts.clock, start));
  }
  // Messages pending at open (in the initial state or replayed from the journal) are kept typed
  // like those a commit appends, so the relay reads them without decoding.
  start.root = detail::with_typed_messages(start.root, outbox.str());
  // Freed only now, in one piece: the tree and its typed messages were allocated while it lived,
  // each in order at the top of the heap, not scattered over the holes of a freed state.
  initial = json();
  return std::unique_ptr<engine>(new engine(std::move(opts), std::move(journal), std::move(start)));
}

absl::Status engine::register_process(process_spec spec, process_fn fn) {
  POP_ASSIGN_OR_RETURN(process_contract contract, process_contract::from_spec(spec));
  if (!fn) {
    return absl::InvalidArgumentError(
        absl::StrCat("process '", contract.name(), "' was registered with an empty function"));
  }
  for (const path& p : contract.outputs()) {
    POP_RETURN_IF_ERROR(process_runner::check_not_outbox_parent(
        p, *outbox_, absl::StrCat("process '", contract.name(), "' declares an output that")));
  }
  auto entry = std::make_shared<const registered>(registered{std::move(contract), std::move(fn)});
  {
    std::unique_lock lock(registry_->mu);
    const auto [it, inserted] = registry_->by_name.try_emplace(entry->contract.name(), entry);
    if (!inserted) {
      return absl::AlreadyExistsError(
          absl::StrCat("a process named '", entry->contract.name(), "' is already registered"));
    }
  }
  if (journal_) {
    json d = {{"inputs", spec.inputs}, {"outputs", spec.outputs}, {"emits", spec.emits}};
    if (spec.timeout.count() > 0) d["timeout_us"] = spec.timeout.count();
    journal_->describe(absl::StrCat("process/", entry->contract.name()), d.dump());
  }
  return absl::OkStatus();
}

absl::Status engine::describe(std::string_view kind, std::string_view name, const json& what) {
  for (const auto& [field, text] : {std::pair{"kind", kind}, std::pair{"name", name}}) {
    if (text.empty() || text.size() > max_path_length || text.find('/') != std::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("engine::describe: the ", field, " '",
                                                     detail::to_absl(text), "' must be 1 to ",
                                                     max_path_length, " characters without '/'"));
    }
  }
  std::string text;
  try {
    text = what.dump();
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("engine::describe of ", detail::to_absl(kind),
                                                   " '", detail::to_absl(name),
                                                   "': not storable JSON: ", e.what()));
  }
  if (journal_)
    journal_->describe(absl::StrCat(detail::to_absl(kind), "/", detail::to_absl(name)),
                       std::move(text));
  return absl::OkStatus();
}

std::vector<std::string> engine::processes() const {
  std::vector<std::string> names;
  {
    std::shared_lock lock(registry_->mu);
    for (const auto& [name, entry] : registry_->by_name) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::shared_ptr<const engine::registered> engine::find(std::string_view name) const {
  std::shared_lock lock(registry_->mu);
  const auto it = registry_->by_name.find(detail::to_absl(name));
  return it == registry_->by_name.end() ? nullptr : it->second;
}

namespace {

// A short pause in a spin-wait.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Encodes what of `prep`'s journal record does not depend on the version its commit gets (see
// detail::precoded_record); false if a value cannot be encoded (then the record is encoded
// from the tree, which reports it).
bool precode(const detail::prepared& prep, detail::precoded_record& out) {
  try {
    for (const detail::prepared_write& w : prep.writes) {
      if (w.value) {
        out.text.set_stored(w.target.str(), {w.value.get(), nullptr});
      } else {
        out.text.erase(w.target.str());
      }
    }
    out.messages.resize(prep.messages.size());
    for (std::size_t i = 0; i < prep.messages.size(); ++i) {
      detail::record_encoder::encode_draft(prep.messages[i], out.messages[i]);
    }
  } catch (const std::exception&) {
    return false;
  }
  return true;
}

// Tries `try_lock` a while, spinning, before `lock` (which may sleep).
template <class Try, class Lock>
void spin_then_lock(Try try_lock, Lock lock) {
  for (int i = 0; i < 128; ++i) {
    if (try_lock()) return;
    cpu_relax();
  }
  lock();
}

}  // namespace

std::shared_lock<std::shared_mutex> engine::lock_head_shared() const {
  spin_then_lock([&] { return head_mu_.try_lock_shared(); }, [&] { head_mu_.lock_shared(); });
  return std::shared_lock(head_mu_, std::adopt_lock);
}

std::unique_lock<std::shared_mutex> engine::lock_head() const {
  spin_then_lock([&] { return head_mu_.try_lock(); }, [&] { head_mu_.lock(); });
  return std::unique_lock(head_mu_, std::adopt_lock);
}

std::shared_ptr<const detail::version_state> engine::head() const {
  const std::shared_lock lock = lock_head_shared();
  return head_;
}

pop::snapshot engine::snapshot() const {
  return pop::snapshot(head());
}

std::uint64_t engine::version() const {
  return head_version_.load(std::memory_order_acquire);
}

std::uint64_t engine::durable_version() const {
  return journal_ ? journal_->durable_version() : version();
}

subscription engine::on_commit(std::function<void(std::uint64_t version)> on_version) {
  const std::uint64_t id = listeners_->add(std::move(on_version));
  return subscription(listeners_, id);
}

std::string engine::find_conflict(const path_set& access, std::uint64_t since) const {
  // Versions in the log are consecutive, so the first entry after `since` is found by offset.
  const detail::written_log& log = *log_;
  if (log.empty() || log.back().version <= since) return {};
  if (log.front().version > since + 1) {
    return absl::StrCat("its snapshot (version ", since, ") is older than the conflict window of ",
                        options_.conflict_window, " commits");
  }
  // Appended messages lie below the outbox: only a change that touches it can overlap them.
  const bool outbox_matters = access.overlaps(outbox_->str());
  std::string_view found;
  const auto overlapping = [&](std::string_view p) {
    found = p;
    return access.overlaps(p);
  };
  for (std::size_t i = since + 1 - log.front().version; i < log.size(); ++i) {
    const detail::written_log::entry it = log[i];
    const std::string_view written = it.written;
    // One comparison rules out a commit whose other paths all lie under a path this change does
    // not overlap (a relay clearing thousands of messages, for a producer writing elsewhere).
    const bool others_clear = it.ancestor > 0 && !access.overlaps(written.substr(0, it.ancestor));
    if ((!others_clear && detail::any_written(written.substr(0, it.messages_at), overlapping)) ||
        (outbox_matters && detail::any_written(written.substr(it.messages_at), overlapping))) {
      return absl::StrCat("'", detail::to_absl(found), "' (written by version ", it.version, ")");
    }
  }
  return {};
}

// True if every path of `access` holds the very same stored value in `now` as in `then` (an
// older version, held): then no commit between them changed any of them, or a path above or
// below one, so committing on `now` is what committing on `then` would have been. (A write makes
// new nodes all along its path and never changes a node an older version holds, and a held
// node's address is not reused.) It compares values, not writes: where find_conflict would also
// count a write that changed nothing (a delete of a path that did not exist) or a snapshot older
// than its window, this commits; both are serializable. A path absent in `then` is left to
// find_conflict: a write there and a delete after it leave no trace in the trees.
bool engine::untouched_since(const path_set& access, const detail::value_node& then,
                             const detail::value_node& now) {
  for (const path& p : access) {
    const detail::location a = detail::lookup(then, p.str());
    const detail::location b = detail::lookup(now, p.str());
    if (!a.exists() || a.node != b.node || a.inner != b.inner || a.packed != b.packed) {
      return false;
    }
  }
  return true;
}

std::shared_ptr<detail::journal_record> engine::install(std::uint64_t version,
                                                        detail::node_ptr root, std::string written,
                                                        std::size_t messages_at,
                                                        bool rewrote_outbox, bool head_locked) {
  auto next = std::make_shared<detail::version_state>();
  next->version = version;
  next->root = std::move(root);
  next->outbox_path = outbox_;
  // (head_ changes only under commit_mu_, which is held.)
  next->outbox_rewritten_at = rewrote_outbox ? version : head_->outbox_rewritten_at;
  const detail::value_node* const installed = next->root.get();  // (held by head_ below)
  std::shared_ptr<detail::journal_record> record;
  if (journal_) record = journal_->reserve(version, next);
  std::shared_ptr<const detail::version_state> previous;
  const auto publish = [&] {
    previous = std::exchange(head_, std::move(next));
    head_version_.store(version, std::memory_order_release);
  };
  if (head_locked) {
    publish();
  } else {
    const std::unique_lock lock = lock_head();
    publish();
  }
  if (options_.pace_pending != 0 && pace_->holds.load() != 0) {
    // (Waiters are woken by finish_commit, once head_mu_ is released.)
    const std::size_t now = pending_in(*installed);
    const std::size_t before = pace_->pending.exchange(now);
    if (now < before) {  // the relay moves: as many waiters may run as it removed
      // (Within the bound they all run anyway: no credit is left for later.)
      pace_->credits.store(now > options_.pace_pending ? static_cast<std::int64_t>(before - now)
                                                       : 0);
      pace_->stalled.store(false);
      pace_wake_ = true;
    } else if (now <= options_.pace_pending) {
      pace_wake_ = pace_wake_ || pace_->waiting.load() != 0;
    }
  }

  assert(written.empty() || written.back() == '\n');  // add_written's form
  messages_at = std::min(messages_at, written.size());
  const std::size_t ancestor =
      detail::common_ancestor(std::string_view(written).substr(0, messages_at));
  while (log_->size() >= options_.conflict_window) log_->pop_front();
  log_->push_back(version, written, messages_at, ancestor);
  // `previous` is released here, outside head_mu_: freeing an old version can take a while. (An
  // in-place commit calls this under head_mu_, with `previous` holding no tree any more.)
  return record;
}

absl::Status engine::finish_commit(const std::shared_ptr<detail::journal_record>& record,
                                   const prepared& prep, applied& done, std::string_view who,
                                   std::unique_lock<std::mutex>& lock,
                                   detail::precoded_record* precoded,
                                   std::span<const std::string_view> cleared) {
  // Processes waiting for the relay (see pace), woken now: head_mu_ is released, and they run
  // their processes before they want commit_mu_.
  if (std::exchange(pace_wake_, false)) pace_->wake();
  // Let the next commit find the new root held by the head alone (see commit_in_place) while this
  // one waits for its journal and its listeners run; the record is encoded from it first.
  detail::node_ptr root = std::move(done.root);
  if (record) {
    // Precoded, the record needs nothing of the tree. Otherwise the appended messages' nodes,
    // held while the record is encoded, so that the root is let go first: an in-place commit
    // needs the head's root held by the head alone. (null: not a member of a member-map outbox;
    // then the root is kept and the message found in it.)
    std::vector<detail::node_ptr> appended;
    bool all_found = true;
    try {
      if (!precoded && !done.message_ids.empty()) {
        const detail::location queue = detail::lookup(*root, outbox_->str());
        const bool map = queue.exists() && !queue.inner && !queue.packed && queue.node->is_map();
        appended.reserve(done.message_ids.size());
        for (const std::string& id : done.message_ids) {
          const detail::node_ptr* n = map ? queue.node->members().find(id) : nullptr;
          appended.push_back(n ? *n : nullptr);
          all_found = all_found && n != nullptr;
        }
      }
      if (all_found) root.reset();
      record->at_us = options_.clock->now_us();
      record->process.assign(who);  // (a reused record keeps its buffers: see journal::reserve)
      std::optional<detail::record_encoder> own;
      detail::record_encoder& encoded = precoded ? precoded->text : own.emplace();
      if (!precoded) {
        for (const detail::prepared_write& w : prep.writes) {
          if (w.value) {
            encoded.set_stored(w.target.str(), {w.value.get(), nullptr});
          } else {
            encoded.erase(w.target.str());
          }
        }
      }
      std::string at;  // (one buffer for every cleared id's path)
      for (const std::string_view id : cleared) {
        at.assign(outbox_->str()).append(".").append(id);
        encoded.erase(at);
      }
      for (std::size_t i = 0; i < done.message_ids.size(); ++i) {
        if (precoded) {
          encoded.set_draft(outbox_->str(), done.message_ids[i], precoded->messages[i],
                            done.created_at_us, done.version);
          continue;
        }
        const std::string at = absl::StrCat(outbox_->str(), ".", done.message_ids[i]);
        // (A typed message is written from its record, nothing decoded.)
        encoded.set_stored(at, appended[i] ? detail::location{appended[i].get(), nullptr}
                                           : detail::lookup(*root, at));
      }
      encoded.writes_text_into(record->writes);
      detail::record_encoder::messages_text_into(done.message_ids, record->messages);
    } catch (const std::exception& e) {
      // Values are checked before they are committed, so this is a bug (or memory ran out); never
      // leave the record unqueued (the journal would have a gap at its version): fail the
      // journal instead. (Should even that not be possible, the process ends: noexcept.)
      [&]() noexcept {
        journal_->fail(record, absl::InternalError(absl::StrCat(
                                   "cannot encode the journal record of version ", done.version,
                                   " by '", detail::to_absl(who), "': ", e.what())));
      }();
      lock.unlock();
      return journal_->wait_durable(done.version);
    }
    root.reset();
    if (batch_frame* batch = batch_of(this)) {
      // Acknowledged (and notified) when the batch ends, once durable. A batch far ahead of its
      // journal waits for part of it, so what it holds unwritten stays bounded.
      const std::uint64_t durable = journal_->fill(record, /*wake_writer=*/true);
      lock.unlock();
      batch->last = std::max(batch->last, done.version);
      const std::uint64_t lag = options_.journal_tuning.max_batch_lag;
      if (done.version > lag && durable < done.version - lag) {
        POP_RETURN_IF_ERROR(journal_->wait_durable(done.version - lag));
      }
      return absl::OkStatus();
    }
    // (At durability::process it is usually acknowledged once filled: copied into the log.)
    const std::uint64_t acked = journal_->fill(record);
    lock.unlock();
    if (acked < done.version) POP_RETURN_IF_ERROR(journal_->wait_durable(done.version));
  }
  root.reset();
  if (lock.owns_lock()) lock.unlock();
  listeners_->notify(done.version);
  return absl::OkStatus();
}

absl::Status engine::batch(absl::FunctionRef<absl::Status()> body) {
  if (!journal_ || batch_of(this) != nullptr) return body();
  batch_frame frame{this, 0, innermost_batch};
  innermost_batch = &frame;
  // Ends the batch however body leaves: its commits are waited for and notified even if it threw.
  struct ending {
    engine& e;
    batch_frame& frame;
    bool done = false;
    absl::Status finish() {
      done = true;
      innermost_batch = frame.outer;
      if (frame.last == 0) return absl::OkStatus();
      POP_RETURN_IF_ERROR(e.journal_->wait_durable(frame.last));
      e.listeners_->notify(frame.last);
      return absl::OkStatus();
    }
    ~ending() {
      if (done) return;
      try {  // (unwinding from body's exception: nothing may escape)
        static_cast<void>(finish());
      } catch (...) {
      }
    }
  } end{*this, frame};
  absl::Status status = body();
  absl::Status durable = end.finish();
  if (!durable.ok()) {
    return annotate(durable, absl::StrCat("batch: its commits up to version ", frame.last,
                                          " are not all durable"));
  }
  return status;
}

bool engine::commit_in_place(prepared& prep, applied& out,
                             std::shared_ptr<detail::journal_record>& record, bool applicable) {
  // The first looks without head_mu_ (head_ and its tree change only under commit_mu_, which is
  // held; readers only read): most commits of many producers find the head held by the others'
  // snapshots, and then need not wait for the exclusive lock, which readers coming and going can
  // keep away for long; and the checks below do not hold readers up.
  if (head_.use_count() != 1 || head_->root.use_count() != 1) return false;
  const detail::version_state& h = *head_;
  if (options_.max_pending != 0 && !prep.messages.empty()) {
    // Writes in place never touch the outbox: only the messages grow it.
    const detail::location at = detail::lookup(*h.root, outbox_->str());
    const std::size_t before = at.exists() ? detail::size_of(at) : 0;
    if (before + prep.messages.size() > options_.max_pending) return false;
  }
  if (!applicable && !process_runner::can_apply_in_place(*h.root, prep, *outbox_)) return false;
  const std::int64_t now_us = options_.clock->now_us();  // (user code: not under head_mu_)
  // What the change removes is freed after head_mu_ is released (declared before the lock).
  std::vector<detail::node_ptr> removed;
  removed.reserve(prep.writes.size());  // (a write removes at most one value)
  const std::unique_lock head_lock = lock_head();
  // Readers copy head_ only under head_mu_, so while it is held a count of 1 stays 1.
  if (!detail::sole_owner(head_) || !detail::sole_owner(head_->root)) return false;
  // From taking the root to installing the new head nothing may fail: the head would be left
  // without its root. Only an allocation can, and then the process ends (noexcept).
  [&]() noexcept {
    const detail::pmap<detail::node_ptr>::retire_scope retiring(removed);
    // The head's version is replaced below, and no one else can see it meanwhile.
    detail::node_ptr root = std::move(const_cast<detail::version_state&>(h).root);
    out = process_runner::apply_in_place(std::move(root), h.version, *outbox_, prep, now_us,
                                         "commit");
    record = install(out.version, out.root, std::move(out.written), out.messages_at,
                     out.rewrote_outbox, /*head_locked=*/true);
  }();
  return true;
}

absl::Status engine::check_pending_bound(const detail::version_state& base,
                                         const detail::node_ptr& next, std::string_view who) const {
  if (options_.max_pending == 0) return absl::OkStatus();
  const std::string& outbox = outbox_->str();
  const auto count = [&](const detail::value_node& root) -> std::size_t {
    const detail::location at = detail::lookup(root, outbox);
    if (!at.exists()) return 0;
    return detail::size_of(at);
  };
  const std::size_t after = count(*next);
  // Commits that do not grow the queue always pass, so a full outbox can still be drained.
  if (after <= options_.max_pending || after <= count(*base.root)) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      detail::to_absl(who), " would leave ", after, " messages pending in '", outbox,
      "' at version ", base.version + 1, ", above options.max_pending = ", options_.max_pending,
      "; nothing was committed: retry once the relay has drained the outbox"));
}

absl::StatusOr<engine::commit_status> engine::commit_prepared(
    std::shared_ptr<const detail::version_state> base, prepared& prep, applied& out,
    std::string& conflict, std::string_view process_name) {
  const std::string who = "commit";
  std::shared_ptr<detail::journal_record> record;
  // A version that only the engine and this commit hold (no snapshot, view or journal record has
  // it) is changed in place under the lock: no path is copied, nothing is freed. Otherwise build
  // the new version outside the lock while the process's snapshot is still the head. If a commit
  // slipped in meanwhile (one that does not overlap), build again under the lock on the newer
  // head: at most one build is wasted, and none when the snapshot is already known to be stale
  // (redone builds were most of the work of many producers on few cores).
  bool built = false;
  // What of the record does not depend on the version it gets, encoded before the lock.
  // (One per thread, reused: its message texts keep their buffers from commit to commit.)
  thread_local std::unique_ptr<detail::precoded_record> spare;
  std::unique_ptr<detail::precoded_record> precoded;
  if (journal_) {
    precoded = spare ? std::move(spare) : std::make_unique<detail::precoded_record>();
    precoded->text.reset();
    if (!precode(prep, *precoded)) precoded.reset();
  }
  struct give_back {
    std::unique_ptr<detail::precoded_record>& p;
    ~give_back() {
      // (Not one a large commit grew: kept per thread, it would hold that memory for good.)
      constexpr std::size_t most = 64 << 10;  // bytes of buffers kept, in all
      if (!p || spare) return;
      std::size_t kept = p->text.capacity();
      for (const auto& m : p->messages) kept += m.before_id.capacity() + m.after_id.capacity();
      if (kept <= most && p->messages.size() <= 64) spare = std::move(p);
    }
  } const returned{precoded};
  detail::precoded_record* const pre = precoded.get();
  // (Holding `base`, no commit changes its tree meanwhile.)
  bool applicable = base.use_count() <= 2 && detail::sole_owner(base->root) &&
                    process_runner::can_apply_in_place(*base->root, prep, *outbox_);
  if (!applicable && version() == base->version) {
    POP_ASSIGN_OR_RETURN(out, process_runner::apply(*base, prep, options_.clock->now_us(), who));
    built = true;
  }
  {
    std::unique_lock lock(commit_mu_);
    std::shared_ptr<const detail::version_state> current = head();
    if (current->version != base->version) {
      const path_set& access = prep.access(*outbox_);
      // A snapshot many commits old (its thread was preempted, say) is checked on the trees:
      // cheaper than reading every commit since, under the lock every committer waits for.
      const bool untouched = current->version - base->version > 8 &&
                             untouched_since(access, *base->root, *current->root);
      if (!untouched) conflict = find_conflict(access, base->version);
      if (!conflict.empty()) return commit_status::conflict;
      base = std::move(current);
      built = false;
      applicable = false;  // (checked on another version)
    }
    current.reset();
    // (Not after a wasted build: its tree, still held, shares nodes with the head.)
    if (!built && !out.root) {
      base.reset();  // (the head is base: commit_in_place looks at who else holds it)
      if (commit_in_place(prep, out, record, applicable)) {
        POP_RETURN_IF_ERROR(finish_commit(record, prep, out, process_name, lock, pre));
        return commit_status::committed;
      }
      base = head();
    }
    if (!built) {
      POP_ASSIGN_OR_RETURN(out, process_runner::apply(*base, prep, options_.clock->now_us(), who));
    }
    if (options_.max_pending != 0) {
      POP_RETURN_IF_ERROR(check_pending_bound(
          *base, out.root, absl::StrCat("process '", detail::to_absl(process_name), "'")));
    }
    record =
        install(out.version, out.root, std::move(out.written), out.messages_at, out.rewrote_outbox);
    POP_RETURN_IF_ERROR(finish_commit(record, prep, out, process_name, lock, pre));
  }
  return commit_status::committed;
}

void engine::record(const registered& proc, int attempt, std::uint64_t seen, const prepared* prep,
                    const applied* done, attempt_outcome outcome, std::string detail,
                    std::chrono::steady_clock::time_point start) {
  if (!audit_.enabled()) return;
  audit_record r;
  r.process = proc.contract.name();
  r.attempt = attempt;
  r.snapshot_version = seen;
  r.outcome = outcome;
  r.detail = std::move(detail);
  if (prep) {
    r.reads = detail::path_texts(prep->reads);
    for (const auto& w : prep->writes) r.writes.push_back(w.target.str());
    for (const auto& m : prep->messages) r.topics.push_back(m.topic);
  }
  if (done) {
    r.commit_version = done->version;
    r.message_ids = done->message_ids;
  }
  r.duration = std::chrono::steady_clock::now() - start;
  r.at = std::chrono::system_clock::time_point(std::chrono::microseconds(options_.clock->now_us()));
  audit_.append(std::move(r));
}

std::size_t engine::pending_in(const detail::value_node& root) const {
  const detail::location at = detail::lookup(root, outbox_->str());
  return at.exists() ? detail::size_of(at) : 0;
}

pace_hold engine::hold_pace() {
  detail::pace_gate& gate = *pace_;
  {
    // The count was not kept while no one held the pace: take it first, as a commit would (under
    // commit_mu_, so no commit's count is overwritten by an older one).
    const std::lock_guard lock(commit_mu_);
    if (gate.holds.load() == 0) {
      gate.pending.store(pending_in(*head()->root));
      gate.credits.store(0);
      gate.stalled.store(false);
    }
    gate.holds.fetch_add(1);
  }
  gate.taken.fetch_add(1, std::memory_order_relaxed);
  std::size_t slot = 0;
  for (; slot < detail::pace_gate::slots; ++slot) {
    bool free = false;
    if (gate.slot_taken[slot].compare_exchange_strong(free, true)) break;
  }
  return pace_hold(pace_, slot);
}

pace_hold::pace_hold(pace_hold&& other) noexcept
    : gate_(std::move(other.gate_)), slot_(other.slot_) {}

pace_hold& pace_hold::operator=(pace_hold&& other) noexcept {
  if (this != &other) {
    reset();
    gate_ = std::move(other.gate_);
    slot_ = other.slot_;
  }
  return *this;
}

void pace_hold::on_this_thread() {
  if (gate_ && slot_ < detail::pace_gate::slots) {
    gate_->holder_thread[slot_].store(std::this_thread::get_id());
  }
}

void pace_hold::reset() {
  if (!gate_) return;
  if (slot_ < detail::pace_gate::slots) {
    gate_->holder_thread[slot_].store(std::thread::id());
    gate_->slot_taken[slot_].store(false);
  }
  gate_->holds.fetch_sub(1);
  gate_->wake();
  gate_.reset();
}

pace_stats engine::pacing() const {
  return {pace_->holds.load(), pace_->pending.load(),   pace_->waiting.load(),
          pace_->paced.load(), pace_->timed_out.load(), pace_->stalled.load(),
          pace_->taken.load()};
}

void engine::pace(const registered& proc) {
  detail::pace_gate& gate = *pace_;
  const std::size_t bound = options_.pace_pending;
  if (bound == 0 || proc.contract.emits().empty() || gate.holds.load() == 0) return;
  if (gate.pending.load() <= bound || gate.stalled.load()) return;
  // Not inside a batch of a journaled engine: its commits are published only once it ends
  // (durable), so no clear could come for what it adds (max_batch_lag bounds a batch instead).
  if (batch_of(this) != nullptr) return;
  if (gate.held_by_this_thread()) return;  // (the relay's own thread would wait for itself)
  // (A credit is taken last: only by a waiter nothing else lets run.)
  const auto free_to_run = [&] {
    return gate.pending.load() <= bound || gate.holds.load() == 0 || gate.stalled.load() ||
           gate.take_credit();
  };
  // (waiting is raised before the state is looked at again under mu: a commit that changes it
  // after that look sees the waiter and takes mu to wake it.)
  gate.waiting.fetch_add(1);
  {
    std::unique_lock lock(gate.mu);
    if (!free_to_run()) {
      gate.paced.fetch_add(1, std::memory_order_relaxed);
      if (!gate.cv.wait_for(lock, options_.pace_wait, free_to_run)) {
        // No clear for pace_wait: the relay is stuck (a sink that hangs, a journal that cannot
        // keep up). Nothing waits until it removes messages again.
        gate.timed_out.fetch_add(1, std::memory_order_relaxed);
        gate.stalled.store(true);
        // (A commit that removed messages meanwhile may have cleared it just before.)
        if (gate.credits.load() > 0 || gate.pending.load() <= bound) gate.stalled.store(false);
        gate.cv.notify_all();
      }
    }
  }
  gate.waiting.fetch_sub(1);
}

absl::StatusOr<commit> engine::execute(std::string_view name, const json& args) {
  const std::shared_ptr<const registered> proc = find(name);
  if (!proc) {
    return absl::NotFoundError(
        absl::StrCat("no process named '", detail::to_absl(name), "' is registered"));
  }
  if (journal_) POP_RETURN_IF_ERROR(journal_->failure());
  pace(*proc);
  const detail::journal::activity active(journal_.get());
  const int max_attempts = options_.retry.max_attempts;
  std::string conflict;
  for (int attempt = 1; attempt <= max_attempts; ++attempt) {
    // (The attempt's duration is only for the audit log: no clock read without one.)
    const auto start = audit_.enabled() ? std::chrono::steady_clock::now()
                                        : std::chrono::steady_clock::time_point();
    pop::snapshot snap(head());
    const std::uint64_t seen = snap.version();
    absl::StatusOr<prepared> prep = process_runner::run(*proc, snap, args);
    if (!prep.ok()) {
      record(*proc, attempt, seen, nullptr, nullptr, outcome_of(prep.status()),
             prep.status().ToString(), start);
      return prep.status();
    }
    if (prep->empty()) {
      record(*proc, attempt, seen, &*prep, nullptr, attempt_outcome::committed, {}, start);
      return commit{seen, false, attempt, {}};
    }
    applied done;
    absl::StatusOr<commit_status> status =
        commit_prepared(std::move(snap.state_), *prep, done, conflict, proc->contract.name());
    if (!status.ok()) {
      record(*proc, attempt, seen, &*prep, nullptr, outcome_of(status.status()),
             status.status().ToString(), start);
      return status.status();
    }
    if (*status == commit_status::committed) {
      record(*proc, attempt, seen, &*prep, &done, attempt_outcome::committed, {}, start);
      return commit{done.version, true, attempt, std::move(done.message_ids)};
    }
    const bool last = attempt == max_attempts;
    record(*proc, attempt, seen, &*prep, nullptr,
           last ? attempt_outcome::aborted : attempt_outcome::conflict_retried,
           absl::StrCat("conflict on ", conflict), start);
    if (!last) backoff(options_.retry, attempt);
  }
  return absl::AbortedError(absl::StrCat("process '", proc->contract.name(), "' conflicted ",
                                         max_attempts, " times; the last conflict was on ",
                                         conflict, "; nothing was committed"));
}

absl::StatusOr<cas_result> engine::compare_and_swap(std::uint64_t expected_version,
                                                    std::vector<write> writes, cas_mode mode) {
  const std::string who = absl::StrCat("compare_and_swap(expected version ", expected_version, ")");
  if (writes.empty()) return absl::InvalidArgumentError(absl::StrCat(who, ": no writes given"));
  if (journal_) POP_RETURN_IF_ERROR(journal_->failure());
  const detail::journal::activity active(journal_.get());
  prepared prep;
  // A write of the whole outbox is read against the head, under the commit lock, below.
  std::optional<std::optional<json>> queue;
  for (write& w : writes) {
    absl::StatusOr<path> p = path::parse(w.path);
    if (!p.ok()) return annotate(p.status(), who);
    if (w.value && !check_storable(*w.value, {}).ok()) {
      return check_storable(*w.value, absl::StrCat(who, ", writing '", p->str(), "'"));
    }
    if (*p == *outbox_) {
      if (queue) {
        return absl::InvalidArgumentError(absl::StrCat(who, ": writes the outbox twice"));
      }
      queue = std::move(w.value);
      continue;
    }
    POP_RETURN_IF_ERROR(process_runner::check_outbox_write(*p, *outbox_, w.value, who));
    prep.writes.push_back(
        {*std::move(p), w.value ? detail::make_node(*std::move(w.value)) : nullptr});
  }
  applied out;
  std::shared_ptr<detail::journal_record> record;
  {
    std::unique_lock lock(commit_mu_);
    const std::shared_ptr<const detail::version_state> current = head();
    if (expected_version > current->version) {
      return absl::InvalidArgumentError(absl::StrCat(
          who, ": the expected version is ahead of the head version ", current->version));
    }
    if (expected_version != current->version) {
      if (mode == cas_mode::strict) return cas_result{false, current->version};
      if (!find_conflict(prep.access(*outbox_), expected_version).empty()) {
        return cas_result{false, current->version};
      }
      // The queue write removes the messages pending at expected_version: if one of them was
      // removed or changed since, the state it was based on is gone.
      if (queue && outbox_entries_changed(expected_version)) {
        return cas_result{false, current->version};
      }
    }
    if (queue) {
      const pop::snapshot head_snap(current);
      POP_ASSIGN_OR_RETURN(
          detail::outbox_changes changes,
          detail::diff_outbox(*queue, head_snap.view(*outbox_), expected_version, who));
      POP_RETURN_IF_ERROR(process_runner::add_changes(*outbox_, std::move(changes), prep));
      for (const message_draft& m : prep.messages) {
        POP_RETURN_IF_ERROR(process_runner::check_message(m, who));
      }
    }
    POP_ASSIGN_OR_RETURN(out, process_runner::apply(*current, prep, options_.clock->now_us(), who));
    POP_RETURN_IF_ERROR(check_pending_bound(*current, out.root, who));
    record =
        install(out.version, out.root, std::move(out.written), out.messages_at, out.rewrote_outbox);
    POP_RETURN_IF_ERROR(finish_commit(record, prep, out, "compare_and_swap", lock));
  }
  return cas_result{true, out.version};
}

absl::StatusOr<clear_result> engine::clear_messages(const pop::snapshot& seen,
                                                    std::span<const std::string> ids) {
  const std::vector<std::string_view> views(ids.begin(), ids.end());
  return clear_message_views(seen, views);
}

absl::StatusOr<clear_result> engine::clear_message_views(const pop::snapshot& seen,
                                                         std::span<const std::string_view> ids) {
  const std::string who = absl::StrCat("clear_messages(seen version ", seen.version(), ")");
  if (!seen.state_ || seen.state_->outbox_path != outbox_) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": the snapshot was not taken from this engine"));
  }
  if (ids.empty()) return absl::InvalidArgumentError(absl::StrCat(who, ": no message ids given"));
  if (journal_) POP_RETURN_IF_ERROR(journal_->failure());
  const detail::journal::activity active(journal_.get());
  // An id found in the outbox is a valid segment (it was written through a path): only the ids
  // not removed are checked, after the erase and before anything is installed.
  const auto check_ids = [&](const std::vector<std::string_view>& removed) -> absl::Status {
    if (removed.size() == ids.size()) return absl::OkStatus();
    absl::flat_hash_set<std::string_view> gone(removed.begin(), removed.end());
    for (const std::string_view id : ids) {
      if (gone.contains(id)) continue;
      if (absl::Status valid = validate_segment(id); !valid.ok()) {
        return annotate(valid, absl::StrCat(who, ", message id '", detail::to_absl(id), "'"));
      }
    }
    return absl::OkStatus();
  };
  const std::string& outbox = outbox_->str();
  prepared prep;  // empty: the ids removed are journaled as deletes (finish_commit)
  applied out;
  std::vector<std::string_view> removed;
  std::shared_ptr<detail::journal_record> record;
  {
    std::unique_lock lock(commit_mu_);
    const std::shared_ptr<const detail::version_state> current = head();
    const bool moved = current->version != seen.version();
    // Erasing only removes: every entry still in the head's outbox is the head's own node, so an
    // entry is unchanged since `seen` exactly when both hold the same node (nodes are never
    // reused while `seen` holds them).
    const detail::location then_queue =
        moved ? detail::lookup(*seen.state_->root, outbox) : detail::location{};
    const auto unchanged = [&](std::string_view id, const detail::node_ptr& now) {
      if (!moved) return true;
      const detail::location then = detail::member(then_queue, id);
      return then.exists() && then.inner == nullptr && then.packed == nullptr &&
             then.node == now.get();
    };
    const std::uint64_t edit = detail::new_edit();
    detail::node_ptr root =
        detail::erase_members(current->root, outbox, ids, unchanged, removed, edit);
    if (!root) {
      // The outbox is kept as a member map; should it not be, remove entry by entry.
      root = current->root;
      for (const std::string_view id : ids) {
        if (absl::Status valid = validate_segment(id); !valid.ok()) {
          return annotate(valid, absl::StrCat(who, ", message id '", detail::to_absl(id), "'"));
        }
      }
      for (const std::string_view id : ids) {
        const std::string at = absl::StrCat(outbox, ".", detail::to_absl(id));
        // Compared in the head, not in the root being edited: each erase below makes a new
        // outbox node, so positions in it never match `seen`'s after the first.
        const detail::location now = detail::lookup(*current->root, at);
        const detail::location then = moved ? detail::lookup(*seen.state_->root, at) : now;
        if (!now.exists() || then.node != now.node || then.inner != now.inner ||
            then.packed != now.packed || !detail::lookup(*root, at).exists()) {
          continue;  // changed since `seen`, absent, or a repeated id already removed
        }
        root = detail::erase(root, at, edit);
        removed.push_back(id);
      }
    }
    POP_RETURN_IF_ERROR(check_ids(removed));
    if (removed.empty()) return clear_result{current->version, 0};
    out.version = current->version + 1;
    out.root = std::move(root);
    std::string written;
    written.reserve(removed.size() * (outbox.size() + 29));
    for (const std::string_view id : removed) {
      written.append(outbox).append(".").append(id).append("\n");
    }
    record = install(out.version, out.root, std::move(written));
    POP_RETURN_IF_ERROR(finish_commit(record, prep, out, "clear_messages", lock, nullptr, removed));
  }
  return clear_result{out.version, removed.size()};
}

bool engine::outbox_entries_changed(std::uint64_t since) const {
  const detail::written_log& log = *log_;
  if (log.empty() || log.back().version <= since) return false;
  if (log.front().version > since + 1) return true;  // older than the window: assume so
  const std::string& outbox = outbox_->str();
  for (std::size_t i = since + 1 - log.front().version; i < log.size(); ++i) {
    const bool changed = detail::any_written(log[i].written, [&](std::string_view text) {
      if (text.size() <= outbox.size() + 1 || text.compare(0, outbox.size(), outbox) != 0 ||
          text[outbox.size()] != '.') {
        return false;
      }
      std::string_view rest = text.substr(outbox.size() + 1);
      const absl::StatusOr<std::pair<std::uint64_t, std::uint32_t>> id =
          parse_message_id(detail::take_segment(rest));
      return !id.ok() || id->first <= since;
    });
    if (changed) return true;
  }
  return false;
}

}  // namespace pop
