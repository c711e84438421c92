#include "pop/relay/relay.hpp"

#include <algorithm>
#include <deque>
#include <limits>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <utility>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"
#include "pop/relay/detail/engine_watch.hpp"
#include "pop/relay/detail/outcome_policy.hpp"

namespace pop {

namespace asio = boost::asio;

namespace detail {

struct relay_counters {
  std::atomic<std::size_t> in_flight{0};
  std::atomic<std::uint64_t> published{0};
  std::atomic<std::uint64_t> delivered{0};
  std::atomic<std::uint64_t> retried{0};
  std::atomic<std::uint64_t> dead_lettered{0};
  std::atomic<std::uint64_t> clears{0};
  std::atomic<std::uint64_t> clear_conflicts{0};
  std::atomic<std::uint64_t> spins{0};
  std::atomic<std::uint64_t> spin_catches{0};
  std::atomic<bool> holding_pace{false};
  atomic_histogram publish_latency;
  atomic_histogram commit_to_publish;
};

namespace {

using strand_type = asio::strand<asio::any_io_executor>;
using steady = std::chrono::steady_clock;

// One message being published asynchronously.
struct flight {
  outbox_message message;
  std::optional<snapshot> seen;  // the snapshot the message was read from (for its clear)
  asio::cancellation_signal cancel;
  steady::time_point started;    // for the latency metric: real time
  std::int64_t deadline_us = 0;  // on the engine's clock
  bool timed_out = false;
};

// A publish's result, waiting to be recorded in the state.
using outcome = detail::publish_outcome;

// One active run of a relay. Everything but the counters and `notified_` is touched only on
// strand_.
class relay_run : public std::enable_shared_from_this<relay_run> {
 public:
  relay_run(engine& e, sink& s, const relay_options& opts, const path& dead_letters,
            relay_counters& counters, strand_type strand)
      : engine_(e),
        sink_(s),
        options_(opts),
        outbox_(e.outbox_path().str()),
        dead_letters_(dead_letters.str()),
        counters_(counters),
        strand_(std::move(strand)),
        timer_(strand_),
        rng_(opts.seed != 0 ? opts.seed : std::random_device{}()) {}

  const strand_type& strand() const { return strand_; }
  std::atomic<bool>& notified() { return notified_; }
  // Makes the loop look again (strand only); `posted`: when the commit posted this wake-up.
  void wake(steady::time_point posted) {
    if (sleeping_ && posted >= slept_at_) {  // (a commit made while it slept)
      // How long waking the sleeping loop took, smoothed: what spinning saves (see spun).
      const double took = std::chrono::duration<double, std::micro>(steady::now() - posted).count();
      wake_us_ = wake_us_ < 0 ? took : 0.75 * wake_us_ + 0.25 * took;
      sleeping_ = false;
    }
    wake();
  }
  // Makes the loop look again (strand only), for what is not a commit (a publish finished).
  void wake() {
    wake_pending_ = true;
    timer_.cancel();
  }

  asio::awaitable<absl::Status> loop(bool until_empty) {
    until_empty_ = until_empty;
    co_await asio::this_coro::throw_if_cancelled(false);
    // Backoffs and publish timeouts are times on the engine's clock: a clock moved by hand
    // (pop::manual_clock) makes the relay look again at once.
    detail::engine_watch watch = detail::watch_engine(engine_, shared_from_this());

    absl::Status status = absl::OkStatus();
    std::size_t busy_rounds = 0;
    // Spinning (see spun) is armed by a round that saw publishes acknowledged (since the round
    // before: a synchronous sink's in it, an asynchronous one's in between), while they come
    // apart: a linger or more between them on average, smoothed over rounds (denser ones gather
    // while the relay sleeps or lingers, in fewer, larger rounds), and while waking the sleeping
    // loop is slow (spin_worth_us or more, smoothed; until a wake-up is measured it is not).
    bool spin_armed = false;
    double gap_us = -1;             // the mean time between published messages; < 0: none yet
    bool caught = false;            // this round was started by a spin that caught a commit
    std::size_t empty_catches = 0;  // such rounds in a row that published nothing
    std::uint64_t acked_seen = 0;   // acked_total_ at the last round
    std::uint64_t failed_seen = 0;  // failed_total_ at the last round
    // Held while publishes succeed (from a round that saw publishes acknowledged, until one that
    // saw failures and no acknowledgement, or an outage of the destination): producers then wait
    // for this relay's clears when it falls far behind (options::pace_pending), never for one that
    // cannot publish.
    pace_hold pace;
    // (holding_pace follows it, also when the frame is destroyed while suspended.)
    struct pace_flag {
      std::atomic<bool>& holding;
      ~pace_flag() { holding.store(false, std::memory_order_relaxed); }
    } const pace_shown{counters_.holding_pace};
    steady::time_point last_published{};
    for (;;) {
      if (co_await cancelled()) {
        status =
            absl::CancelledError("relay stopped by cancellation; in-flight messages stay queued");
        break;
      }
      expire_flights();
      round_result r;
      if (status = run_round(r); !status.ok()) break;
      // Rounds in a row that each published several messages: eight say the commits keep coming
      // faster than rounds (a burst of a few commits at once is over sooner).
      busy_rounds = r.delivered >= 2 ? busy_rounds + 1 : 0;
      // Acknowledged since the last round: in it (a synchronous sink), or between (the
      // completions of asynchronous publishes).
      const std::uint64_t acked = acked_total_ - acked_seen;
      acked_seen = acked_total_;
      // (A failing key among published ones keeps it: the relay's clears of the others pace
      // producers, and a relay that clears nothing stalls their waits after pace_wait.)
      const bool failing = outage_since_us_ != 0 || (failed_total_ != failed_seen && acked == 0);
      failed_seen = failed_total_;
      if (failing) {
        pace.reset();
      } else if (acked > 0 && !pace) {
        pace = engine_.hold_pace();
      }
      pace.on_this_thread();  // (the strand may move between threads)
      counters_.holding_pace.store(static_cast<bool>(pace), std::memory_order_relaxed);
      if (acked > 0 && options_.spin.count() > 0) {
        const steady::time_point now = steady::now();
        if (gap_us >= 0) {
          const double gap =
              std::chrono::duration<double, std::micro>(now - last_published).count() /
              static_cast<double>(acked);
          gap_us = 0.75 * gap_us + 0.25 * gap;
        } else {
          gap_us = static_cast<double>(options_.spin.count());
        }
        last_published = now;
        spin_armed =
            gap_us >= static_cast<double>(options_.linger.count()) && wake_us_ >= spin_worth_us;
        empty_catches = 0;
      } else if (caught && !r.more && ++empty_catches >= 4) {
        // Spins keep catching commits that publish nothing (commits that emit no message, say,
        // or the relay's own clears): stop spinning until a round publishes again.
        spin_armed = false;
      }
      caught = false;
      if (busy_rounds >= 8 && !until_empty && options_.linger.count() > 0 &&
          engine_.clock().moves_by_itself() && !(co_await cancelled())) {
        // Commits keep coming faster than rounds: let more gather (what the round left to
        // record waits for the next one too). Commits meanwhile post no wake-up (the flag stays
        // set): the next round's snapshot, taken after it is cleared, has them. (A publish
        // finishing or a stop ends the wait early.)
        notified_.store(true);
        timer_.expires_after(options_.linger);
        co_await timer_.async_wait(asio::as_tuple(asio::use_awaitable));
        wake_pending_ = false;
        continue;
      }
      if (r.more) {
        // Synchronous publishes finished: record them and look again, letting other work (and a
        // cancellation) in between rounds.
        co_await asio::post(strand_, asio::use_awaitable);
        continue;
      }
      if (until_empty && r.idle) break;
      if (!wake_pending_ && !(co_await cancelled())) {
        steady::time_point deadline = next_deadline(r.earliest);
        if (waiting_outcomes() > 0)
          deadline = std::min(deadline, outcomes_since_ + options_.clear_delay);
        // (A spin that finds nothing disarms it until a round publishes again.)
        if (spin_armed) {
          if (co_await spun(until_empty, deadline)) {
            caught = spin_caught_commit_;
            continue;
          }
          spin_armed = false;
          // (A stop during the spin: a wait started after it would not see it.)
          if (co_await cancelled()) continue;
        }
        timer_.expires_at(deadline);
        sleeping_ = true;
        slept_at_ = steady::now();
        co_await timer_.async_wait(asio::as_tuple(asio::use_awaitable));
        sleeping_ = false;
      }
      wake_pending_ = false;
    }
    watch.commits.reset();
    pace.reset();
    pace_shown.holding.store(false, std::memory_order_relaxed);
    co_await stop_flights();
    if (absl::Status s = guarded([&] { return flush(); }); !s.ok() && status.ok()) status = s;
    merge_histograms();
    co_return status;
  }

 private:
  struct round_result {
    bool more = false;                     // outcomes are waiting to be recorded: go again at once
    bool idle = false;                     // nothing pending and nothing in flight
    std::size_t delivered = 0;             // messages the round published and saw acknowledged
    std::optional<std::int64_t> earliest;  // when the first held-back message becomes due
  };

  // Records known outcomes and starts what is due. Never throws: an unexpected exception (say,
  // bad_alloc) becomes kInternal and stops the relay, which still stops its publishes cleanly.
  absl::Status run_round(round_result& r) {
    return guarded([&]() -> absl::Status {
      notified_.store(false);
      if (clear_now()) POP_RETURN_IF_ERROR(flush());
      // Deliveries of this round view their ids in its snapshot: it is kept until they are
      // cleared (pinned before the scan, so even a scan cut short by an exception is covered).
      const std::size_t delivered_before = delivered_.size();
      round_pin_ = static_cast<std::uint32_t>(pinned_.size());
      const snapshot& snap = pinned_.emplace_back(engine_.snapshot());
      r.earliest = schedule(snap);
      r.delivered = delivered_.size() - delivered_before;
      r.more = clear_now();
      r.idle = flights_.empty() && snap.pending_count() == 0;
      if (delivered_.size() == delivered_before) pinned_.pop_back();  // (`snap` ends here)
      merge_histograms();
      return absl::OkStatus();
    });
  }

  // Whether the known outcomes are to be recorded now rather than gathered a while longer:
  // failures (their keys wait for the record), a full batch, drain(), a clock moved by hand (no
  // real-time waits) or clear_delay passed since the first of them.
  bool clear_now() const {
    if (waiting_outcomes() == 0) return false;
    return failures_waiting_ || until_empty_ || waiting_outcomes() >= clear_batch() ||
           options_.clear_delay.count() == 0 || !engine_.clock().moves_by_itself() ||
           steady::now() >= outcomes_since_ + options_.clear_delay;
  }
  // The most deliveries gathered before clearing: a round skips each of them in its scan.
  std::size_t clear_batch() const { return std::min<std::size_t>(options_.batch_size, 1024); }
  // Outcomes known and not yet recorded.
  std::size_t waiting_outcomes() const { return outcomes_.size() + delivered_.size(); }

  // Moves the publishes and latencies counted on the strand into the shared counters (once per
  // round, not with atomics per message).
  void merge_histograms() {
    if (published_ > 0) counters_.published.fetch_add(published_, std::memory_order_relaxed);
    published_ = 0;
    counters_.publish_latency.add(publish_latency_);
    counters_.commit_to_publish.add(commit_to_publish_);
  }

  // Lets a scan see the deliveries not yet cleared: sorted_delivered_ holds them in id order, the
  // order the scan meets them in, so the scan skips each by one comparison (no hash of its id).
  // Done only when a scan comes before their clear: a busy relay clears first.
  void sort_deliveries() {
    if (merged_ == delivered_.size()) return;
    const auto mid = static_cast<std::ptrdiff_t>(sorted_delivered_.size());
    sorted_delivered_.insert(sorted_delivered_.end(),
                             delivered_.begin() + static_cast<std::ptrdiff_t>(merged_),
                             delivered_.end());
    merged_ = delivered_.size();
    // (A round delivers in scan order: the new ones are sorted, and usually all past the old.)
    const auto first_new = sorted_delivered_.begin() + mid;
    if (!std::is_sorted(first_new, sorted_delivered_.end())) {
      std::sort(first_new, sorted_delivered_.end());
    }
    if (mid > 0 && first_new != sorted_delivered_.end() && *first_new < *(first_new - 1)) {
      std::inplace_merge(sorted_delivered_.begin(), first_new, sorted_delivered_.end());
    }
  }

  template <class Fn>
  static absl::Status guarded(Fn fn) {
    try {
      return fn();
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("relay: unexpected exception: ", e.what()));
    }
  }

  // Looks for a commit (or anything else that would wake the loop) for up to options_.spin, on
  // the strand, letting other handlers run in between. True if one came: look again at once.
  // (A commit that set notified_ has posted a wake-up too; the round it brings finds the state
  // already looked at, at worst.)
  // Stops at `deadline` (then the timer, set to it, fires at once).
  asio::awaitable<bool> spun(bool until_empty, steady::time_point deadline) {
    if (options_.spin.count() <= 0 || until_empty || !engine_.clock().moves_by_itself()) {
      co_return false;
    }
    const steady::time_point until = std::min(deadline, steady::now() + options_.spin);
    counters_.spins.fetch_add(1, std::memory_order_relaxed);
    while (!notified_.load(std::memory_order_acquire) && !wake_pending_) {
      if (steady::now() >= until || co_await cancelled()) co_return false;
      co_await asio::post(strand_, asio::use_awaitable);
    }
    // (A wake-up queued by a commit a round already took, or a finished publish's, is not a
    // commit caught.)
    spin_caught_commit_ = notified_.load(std::memory_order_acquire);
    if (spin_caught_commit_) counters_.spin_catches.fetch_add(1, std::memory_order_relaxed);
    wake_pending_ = false;
    co_return true;
  }

  asio::awaitable<bool> cancelled() {
    const asio::cancellation_state state = co_await asio::this_coro::cancellation_state;
    co_return state.cancelled() != asio::cancellation_type::none;
  }

  // When to look again: the earliest of a backoff's end and a publish timeout, as a real-time
  // point (the clock's times converted at the current rate); max() if nothing is due.
  steady::time_point next_deadline(std::optional<std::int64_t> earliest_due_us) const {
    std::optional<std::int64_t> due = earliest_due_us;
    for (const auto& [id, f] : flights_) {
      if (!f->timed_out) due = std::min(due.value_or(f->deadline_us), f->deadline_us);
    }
    // A clock moved by hand says when it moves (the watcher in loop()); waiting real time for it
    // would spin.
    if (!due || !engine_.clock().moves_by_itself()) return steady::time_point::max();
    const std::int64_t wait = std::max<std::int64_t>(*due - engine_.clock().now_us(), 0);
    return steady::now() + std::chrono::microseconds(wait);
  }

  void expire_flights() {
    const std::int64_t now = engine_.clock().now_us();
    std::vector<std::shared_ptr<flight>> expired;
    for (const auto& [id, f] : flights_) {
      if (!f->timed_out && f->deadline_us <= now) expired.push_back(f);
    }
    for (const std::shared_ptr<flight>& f : expired) {
      f->timed_out = true;
      f->cancel.emit(asio::cancellation_type::terminal);
    }
  }

  // Cancels every publish in flight and waits for all of them to return.
  asio::awaitable<void> stop_flights() {
    stopping_ = true;
    std::vector<std::shared_ptr<flight>> all;
    for (const auto& [id, f] : flights_) all.push_back(f);
    for (const std::shared_ptr<flight>& f : all) f->cancel.emit(asio::cancellation_type::terminal);
    co_await asio::this_coro::reset_cancellation_state();
    while (!flights_.empty()) {
      if (!wake_pending_) {
        timer_.expires_at(steady::time_point::max());
        co_await timer_.async_wait(asio::as_tuple(asio::use_awaitable));
      }
      wake_pending_ = false;
    }
  }

  // Starts publishing what is due in `snap`, in commit order, at most one message per non-empty
  // key at a time. Returns the earliest time a message held back by its backoff becomes due.
  std::optional<std::int64_t> schedule(const snapshot& snap) {
    std::optional<std::int64_t> earliest;
    const std::int64_t now = engine_.clock().now_us();
    // Only durable messages are published: otherwise a crash could leave a published message
    // whose commit never happened. Ids sort by version, so the first newer one ends the scan;
    // its commit notification comes once it is durable.
    const std::uint64_t durable = engine_.durable_version();
    blocked_.clear();
    const auto block = [&](const std::string& key) {
      if (!key.empty()) blocked_.insert(key);
    };
    // Keys busy with a publish, or with a failure not yet recorded, are blocked from the start:
    // a message with a lower id (a requeued one) must not overtake them.
    for (const auto& [id, f] : flights_) block(f->message.key);
    for (const outcome& o : outcomes_) block(o.key);  // (failures: deliveries are elsewhere)
    sort_deliveries();
    std::size_t next_delivered = 0;  // sorted_delivered_[0, this) are before the scan's position
    // When the snapshot is durable, no id can be newer than the durable version: skip parsing.
    const bool all_durable = snap.version() <= durable;
    if (key_cache_.size() > 4 * options_.batch_size + 65'536) key_cache_.clear();
    // Where the scan starts: past the entries an earlier round found all delivered (see cursor_).
    if (!cursor_.empty() && snap.outbox_rewritten_at() != cursor_rewritten_at_) cursor_.clear();
    cursor_rewritten_at_ = snap.outbox_rewritten_at();
    const std::string start = cursor_;
    // Whether every entry scanned so far is delivered (the cursor follows while it is), and
    // whether the entry being scanned was.
    bool delivered_prefix = true;
    bool passed_this = false;
    const auto passed = [&](std::string_view id) {
      // Only an id a commit made (of this version or older): every later append sorts after it.
      if (!delivered_prefix) return;
      if (const auto v = parse_message_id(id); v.ok() && v->first <= snap.version()) {
        cursor_.assign(id);
        passed_this = true;
      }
    };
    const auto visit = [&](std::string_view id, const value_view& stored) {
      // (An id claiming a version past the snapshot's was not made by a commit; it is left
      // to the checks below.)
      if (!all_durable) {
        if (const auto v = parse_message_id(id);
            v.ok() && v->first > durable && v->first <= snap.version()) {
          return false;
        }
      }
      // Looked up as a view: most entries are skipped, and need no copy of their id.
      const absl::string_view id_view = detail::to_absl(id);
      // (Both lookups are skipped when their maps are empty: a synchronous sink keeps
      // flights_ empty, and a round after a clear has nothing recorded.)
      if (const auto f = flights_.empty() ? flights_.end() : flights_.find(id_view);
          f != flights_.end()) {
        block(f->second->message.key);
        return true;
      }
      // Delivered and not yet cleared: skipped (a delivery does not block its key).
      while (next_delivered < sorted_delivered_.size() && sorted_delivered_[next_delivered] < id) {
        ++next_delivered;
      }
      if (next_delivered < sorted_delivered_.size() && sorted_delivered_[next_delivered] == id) {
        ++next_delivered;
        passed(id);
        return true;
      }
      if (const auto o = recorded_.empty() ? recorded_.end() : recorded_.find(id);
          o != recorded_.end()) {
        block(o->second->key);
        return true;
      }
      if (waiting_outcomes() >= options_.batch_size || flights_.size() >= options_.max_in_flight) {
        return false;
      }
      // A message's key never changes while it is queued: remember it, so messages behind a
      // busy key are skipped without reading them (the scan repeats every round).
      // A message as a commit stored it is read typed (its key and due time from its record,
      // decoded only to be published); one written as JSON (a retry's record, a requeue) is
      // read from its fields.
      const std::optional<value_view::message_schedule> typed = stored.schedule();
      std::string key;
      if (typed) {
        key = typed->key;
      } else if (const auto cached = key_cache_.find(id_view); cached != key_cache_.end()) {
        key = cached->second;
      } else {
        try {
          if (const value_view k = stored.member(outbox_fields::key)) key = k.get<std::string>();
        } catch (const json::exception&) {
          // Left to from_json below, which names the bad field.
        }
        key_cache_.emplace(std::string(id), key);
      }
      if (!key.empty() && blocked_.contains(key)) return true;
      std::int64_t due = typed ? typed->next_attempt_at_us : 0;
      if (!typed) {
        try {
          // Only an integer: converting another number would be undefined behaviour.
          if (const value_view d = stored.member(outbox_fields::next_attempt_at_us)) {
            if (const json v = d.to_json(); v.is_number_integer()) due = v.get<std::int64_t>();
          }
        } catch (const json::exception&) {
          // Left to from_json below, which names the bad field.
        }
      }
      if (due > now) {
        earliest = earliest ? std::min(*earliest, due) : due;
        block(key);
        return true;
      }
      // A message as a commit stored it is decoded into the relay's own message, whose
      // allocations serve message after message (nothing decoded is kept in the state).
      if (typed && stored.message_into(decoded_) && decoded_.id == id) {
        if (start_publish(decoded_, id, snap)) {
          passed(id);
        } else {
          block(key);
        }
        return true;
      }
      // Read straight from the stored value (no intermediate copy of it).
      absl::StatusOr<outbox_message> m = absl::UnknownError("unread");
      try {
        m = stored.get<outbox_message>();
      } catch (const std::exception&) {
        m = outbox_message::from_json(stored.to_json());  // for the precise error
      }
      const std::string id_text(id);
      if (!m.ok() || m->id != id_text) {
        json raw = stored.to_json();
        outcome o;
        o.what = outcome::kind::malformed;
        o.id = id_text;
        o.status = m.ok() ? absl::DataLossError(absl::StrCat("its id field is '", m->id, "'"))
                          : m.status();
        o.at_us = now;
        o.raw = std::move(raw);
        add_outcome(std::move(o));
        return true;
      }
      if (start_publish(*m, {}, snap)) {
        passed(id);
      } else {
        block(key);
      }
      return true;
    };
    snap.view(snap.outbox_path())
        .for_each_member(
            [&](std::string_view id, const value_view& stored) {
              passed_this = false;
              const bool go_on = visit(id, stored);
              delivered_prefix = delivered_prefix && passed_this;
              return go_on;
            },
            start);
    return earliest;
  }

  // Publishes `m` synchronously if the sink can, else launches it. Returns true if `m` was
  // acknowledged already (so its key is free for the next message). `stored`: `m`'s id as the
  // round's snapshot holds it (viewed until the snapshot is unpinned), or empty.
  // `from`: the round's snapshot, which `m` was read from.
  bool start_publish(const outbox_message& m, std::string_view stored, const snapshot& from) {
    const steady::time_point start = steady::now();
    std::optional<absl::Status> now;
    try {
      now = sink_.publish_now(m);
    } catch (const std::exception& e) {
      now = absl::UnknownError(absl::StrCat("the sink threw: ", e.what()));
    } catch (...) {
      now = absl::UnknownError("the sink threw an exception that is not a std::exception");
    }
    if (now) {
      const bool ok = now->ok();
      finish(m, *std::move(now), start, stored, round_pin_);
      return ok;
    }
    auto f = std::make_shared<flight>();
    f->message = m;
    f->seen = from;
    f->started = start;
    f->deadline_us =
        engine_.clock().now_us() +
        std::chrono::duration_cast<std::chrono::microseconds>(options_.publish_timeout).count();
    flights_.emplace(f->message.id, f);
    counters_.in_flight.fetch_add(1, std::memory_order_relaxed);
    // The completion handler keeps the flight, and so its cancellation signal, alive until the
    // spawned coroutine has detached from the signal's slot.
    asio::co_spawn(strand_, publish_one(shared_from_this(), f),
                   asio::bind_cancellation_slot(f->cancel.slot(), [f](std::exception_ptr) {}));
    return false;
  }

  static asio::awaitable<void> publish_one(std::shared_ptr<relay_run> self,
                                           std::shared_ptr<flight> f) {
    absl::Status status;
    try {
      status = co_await self->sink_.publish(f->message);
    } catch (const boost::system::system_error& e) {
      status = e.code() == asio::error::operation_aborted
                   ? absl::CancelledError("the publish was cancelled")
                   : absl::UnknownError(absl::StrCat("the sink threw: ", e.what()));
    } catch (const std::exception& e) {
      status = absl::UnknownError(absl::StrCat("the sink threw: ", e.what()));
    } catch (...) {
      status = absl::UnknownError("the sink threw an exception that is not a std::exception");
    }
    self->flights_.erase(f->message.id);
    self->counters_.in_flight.fetch_sub(1, std::memory_order_relaxed);
    if (f->timed_out && !status.ok() && !is_permanent_failure(status)) {
      status = absl::DeadlineExceededError(absl::StrCat("the publish timed out after ",
                                                        self->options_.publish_timeout.count(),
                                                        " ms (", status.message(), ")"));
    }
    // A publish cut short by the stop is not an attempt: the message stays queued unchanged.
    if (!(self->stopping_ && !status.ok())) {
      self->finish(f->message, std::move(status), f->started, {}, self->pin(*f->seen));
    }
    self->wake();
  }

  // The index in pinned_ of snapshot `s`, pinning it if it is not the newest pinned already.
  // (Called between rounds: a round pins its own snapshot first.)
  std::uint32_t pin(const snapshot& s) {
    if (pinned_.empty() || pinned_.back().version() != s.version()) pinned_.push_back(s);
    return static_cast<std::uint32_t>(pinned_.size() - 1);
  }

  // Records the outcome of publishing `m` (see start_publish for `stored`), read from
  // pinned_[from].
  void finish(const outbox_message& m, absl::Status status, steady::time_point started,
              std::string_view stored, std::uint32_t from) {
    const auto took =
        std::chrono::duration_cast<std::chrono::microseconds>(steady::now() - started);
    record_local(publish_latency_, took);
    const std::int64_t at_us = engine_.clock().now_us();
    if (is_destination_unavailable(status)) {
      if (outage_since_us_ == 0) outage_since_us_ = at_us;
    } else if (status.ok()) {
      outage_since_us_ = 0;
    }
    if (status.ok()) {
      ++published_;
      ++acked_total_;
      record_local(commit_to_publish_, std::chrono::microseconds(at_us - m.created_at_us));
      // A delivery is only an id to clear: a view of the stored entry's, else a copy.
      if (waiting_outcomes() == 0) outcomes_since_ = steady::now();
      if (!stored.empty()) {
        delivered_.push_back(stored);
      } else {
        delivered_.push_back(delivered_ids_.emplace_back(m.id));
      }
      delivered_from_.push_back(from);
      return;
    }
    ++failed_total_;
    outcome o;
    o.id = m.id;
    o.key = m.key;
    o.attempts_before = m.attempts;
    o.at_us = at_us;
    o.what = outcome::kind::failed;
    o.status = std::move(status);
    add_outcome(std::move(o));
  }

  // Keeps a failure or malformed entry to record (deliveries go to delivered_).
  void add_outcome(outcome o) {
    if (waiting_outcomes() == 0) outcomes_since_ = steady::now();
    failures_waiting_ = true;
    outcomes_.push_back(std::move(o));
    const outcome& kept = outcomes_.back();
    recorded_.erase(kept.id);  // (a key views its own outcome's id)
    recorded_.emplace(kept.id, &kept);
  }

  // A delay drawn uniformly from [d/2, d].
  std::int64_t jittered_us(std::int64_t d) {
    std::uniform_int_distribution<std::int64_t> pick(d / 2, d);
    return pick(rng_);
  }

  struct tally {
    std::uint64_t delivered = 0;
    std::uint64_t retried = 0;
    std::uint64_t dead = 0;
  };

  // Adds to `writes` what recording `o` on `queue` takes (detail::decide_outcome says what);
  // nothing if the message is gone or was changed by someone else since it was published.
  void build(const value_view& queue, const outcome& o, std::vector<write>& writes, tally& t) {
    const value_view entry = queue.member(o.id);
    if (!entry) return;
    std::optional<outbox_message> stored;
    if (o.what == outcome::kind::failed) {
      absl::StatusOr<outbox_message> m = absl::UnknownError("unread");
      try {
        m = entry.get<outbox_message>();
      } catch (const std::exception&) {
        m = outbox_message::from_json(entry.to_json());  // for the precise error
      }
      if (!m.ok()) return;
      stored = *std::move(m);
    }
    const detail::outcome_policy policy{options_.max_attempts, options_.initial_backoff.count(),
                                        options_.max_backoff.count()};
    detail::outcome_decision d =
        detail::decide_outcome(stored ? &*stored : nullptr, o, policy, outage_since_us_,
                               [this](std::int64_t delay) { return jittered_us(delay); });
    std::string at = absl::StrCat(outbox_, ".", o.id);
    switch (d.what) {
      case detail::outcome_decision::kind::skip:
        return;
      case detail::outcome_decision::kind::remove:
        writes.push_back({std::move(at), std::nullopt});
        ++t.delivered;
        return;
      case detail::outcome_decision::kind::retry:
        writes.push_back({std::move(at), std::move(*d.message).to_json()});
        ++t.retried;
        return;
      case detail::outcome_decision::kind::dead_letter:
        writes.push_back({std::move(at), std::nullopt});
        writes.push_back({absl::StrCat(dead_letters_, ".", o.id), d.letter->to_json()});
        ++t.dead;
        return;
    }
  }

  // Records every known outcome, batch_size per transaction: failures and malformed entries by
  // compare_and_swap, redone on a newer snapshot after a conflict (another writer of the same
  // ids); deliveries with engine::clear_message_views (never a conflict: a message changed or
  // removed since is left alone). Engine errors are returned.
  absl::Status flush() {
    std::size_t cleared = 0;  // delivered_[0, cleared) recorded with the failures
    while (!outcomes_.empty()) {
      // Failures, and as many deliveries as fit the batch, in one transaction.
      const std::size_t n = std::min(options_.batch_size, outcomes_.size());
      const std::size_t m = std::min(options_.batch_size - n, delivered_.size() - cleared);
      // The recorded_ entries view the outcomes' ids: forget them before the ids go.
      for (std::size_t i = 0; i < n; ++i) {
        if (const auto r = recorded_.find(outcomes_[i].id);
            r != recorded_.end() && r->second == &outcomes_[i]) {
          recorded_.erase(r);
        }
        if (!key_cache_.empty()) key_cache_.erase(outcomes_[i].id);
      }
      POP_RETURN_IF_ERROR(
          record_outcomes(n, std::span<const std::string_view>(delivered_).subspan(cleared, m),
                          std::span<const std::uint32_t>(delivered_from_).subspan(cleared, m)));
      outcomes_.erase(outcomes_.begin(), outcomes_.begin() + static_cast<std::ptrdiff_t>(n));
      cleared += m;
    }
    failures_waiting_ = false;
    // Each delivery is cleared against the snapshot it was read from, so exactly what was
    // published goes: an entry another writer changed since (a process rewriting a pending
    // message) stays, and is published again with its new content. An entry is the same in a
    // newer snapshot with the same outbox_rewritten_at if it is there at all (until then entries
    // were only appended or removed), so deliveries are cleared against the newest pinned
    // snapshot with their snapshot's outbox_rewritten_at: usually one clear for all. (pinned_ is
    // not in version order: a publish that finished late pins its older snapshot again.)
    absl::flat_hash_map<std::uint64_t, std::uint32_t> newest_of;  // rewritten_at -> pinned_ index
    for (std::uint32_t i = 0; i < pinned_.size(); ++i) {
      const auto [at, fresh] = newest_of.try_emplace(pinned_[i].outbox_rewritten_at(), i);
      if (!fresh && pinned_[at->second].version() < pinned_[i].version()) at->second = i;
    }
    std::vector<std::uint32_t> newest(pinned_.size());  // pinned_ index -> snapshot to clear by
    for (std::uint32_t i = 0; i < pinned_.size(); ++i) {
      newest[i] = newest_of.at(pinned_[i].outbox_rewritten_at());
    }
    absl::Status status = absl::OkStatus();
    std::vector<std::size_t> order;  // delivered_ indices from `cleared`, grouped by snapshot
    order.reserve(delivered_.size() - cleared);
    for (std::size_t i = cleared; i < delivered_.size(); ++i) order.push_back(i);
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return newest[delivered_from_[a]] < newest[delivered_from_[b]];
    });
    std::vector<std::string_view> group;
    for (std::size_t k = 0; k < order.size() && status.ok();) {
      const std::uint32_t from = newest[delivered_from_[order[k]]];
      group.clear();
      for (; k < order.size() && newest[delivered_from_[order[k]]] == from &&
             group.size() < options_.batch_size;
           ++k) {
        group.push_back(delivered_[order[k]]);
      }
      absl::StatusOr<clear_result> r = engine_.clear_message_views(pinned_[from], group);
      if (!r.ok()) {
        // Those messages stay queued and are published again (never lost).
        cursor_.clear();
        status = annotate(r.status(), "relay: clearing delivered messages");
        break;
      }
      // One left queued (changed since, so published again; or removed by someone else) may be
      // behind the cursor.
      if (r->removed != group.size()) cursor_.clear();
      if (r->removed > 0) counters_.clears.fetch_add(1, std::memory_order_relaxed);
      counters_.delivered.fetch_add(r->removed, std::memory_order_relaxed);
    }
    if (!key_cache_.empty()) {
      for (const std::string_view id : delivered_) key_cache_.erase(detail::to_absl(id));
    }
    delivered_.clear();
    delivered_from_.clear();
    sorted_delivered_.clear();
    merged_ = 0;
    delivered_ids_.clear();
    pinned_.clear();
    return status;
  }

  // Records the first `n` outcomes and `deliveries` (read from pinned_[from[i]]) in one
  // transaction. After 64 lost races they are dropped: those messages stay queued and are
  // published again (a duplicate, never a loss).
  absl::Status record_outcomes(std::size_t n, std::span<const std::string_view> deliveries,
                               std::span<const std::uint32_t> from) {
    for (int tries = 0; tries < 64; ++tries) {
      const snapshot snap = engine_.snapshot();
      const value_view queue = snap.view(snap.outbox_path());
      std::vector<write> writes;
      tally t;
      for (std::size_t i = 0; i < n; ++i) build(queue, outcomes_[i], writes, t);
      for (std::size_t i = 0; i < deliveries.size(); ++i) {
        const std::string_view id = deliveries[i];
        const value_view now = queue.member(id);
        if (!now) continue;  // removed meanwhile
        const snapshot& then = pinned_[from[i]];
        if (!now.shares(then.view(then.outbox_path()).member(id))) {
          cursor_.clear();  // changed meanwhile: stays, and is published again
          continue;
        }
        writes.push_back({absl::StrCat(outbox_, ".", detail::to_absl(id)), std::nullopt});
        ++t.delivered;
      }
      if (writes.empty()) return absl::OkStatus();
      absl::StatusOr<cas_result> r =
          engine_.compare_and_swap(snap.version(), std::move(writes), cas_mode::keys);
      if (!r.ok()) {
        cursor_.clear();
        return annotate(r.status(), "relay: recording publish outcomes");
      }
      if (r->committed) {
        counters_.clears.fetch_add(1, std::memory_order_relaxed);
        counters_.delivered.fetch_add(t.delivered, std::memory_order_relaxed);
        counters_.retried.fetch_add(t.retried, std::memory_order_relaxed);
        counters_.dead_lettered.fetch_add(t.dead, std::memory_order_relaxed);
        return absl::OkStatus();
      }
      counters_.clear_conflicts.fetch_add(1, std::memory_order_relaxed);
    }
    cursor_.clear();  // given up: the deliveries stay queued
    return absl::OkStatus();
  }

  engine& engine_;
  sink& sink_;
  const relay_options& options_;
  const std::string outbox_;
  const std::string dead_letters_;
  relay_counters& counters_;
  strand_type strand_;
  asio::steady_timer timer_;
  std::mt19937_64 rng_;
  std::atomic<bool> notified_{false};
  bool wake_pending_ = false;
  bool spin_caught_commit_ = false;  // the last spin ended by a commit (see spun)
  std::uint64_t acked_total_ = 0;    // publishes acknowledged by the sink, ever
  std::uint64_t failed_total_ = 0;   // publishes that failed (timed out included), ever
  bool sleeping_ = false;            // the loop waits on timer_ (not lingering), since slept_at_
  steady::time_point slept_at_{};
  double wake_us_ = -1;  // how long waking the sleeping loop takes, smoothed; < 0: not known
  // A wake-up this slow (in microseconds) is worth spinning for: well above a thread's wake-up
  // on an idle core of a machine that keeps its cores ready (a few microseconds).
  static constexpr double spin_worth_us = 10;
  bool stopping_ = false;
  bool until_empty_ = false;           // drain(): clear at once
  bool failures_waiting_ = false;      // an outcome in outcomes_ is not a delivery
  steady::time_point outcomes_since_;  // when the first of outcomes_ was known
  absl::flat_hash_map<std::string, std::shared_ptr<flight>> flights_;
  std::deque<outcome> outcomes_;  // failures and malformed entries; a deque: recorded_ points
                                  // into it
  // The ids of deliveries not yet cleared: views of messages in pinned_ snapshots, or of
  // delivered_ids_ (copies, for messages that were not read from a snapshot).
  std::vector<std::string_view> delivered_;
  std::vector<std::uint32_t> delivered_from_;  // for each delivery, the pinned_ snapshot it was
                                               // read from
  std::deque<std::string> delivered_ids_;
  std::vector<snapshot> pinned_;
  std::uint32_t round_pin_ = 0;                     // the current round's snapshot in pinned_
  std::vector<std::string_view> sorted_delivered_;  // delivered_[0, merged_), in id order
  std::size_t merged_ = 0;
  // The ids of outcomes_, each viewing its outcome's id.
  absl::flat_hash_map<std::string_view, const outcome*> recorded_;
  latency_histogram publish_latency_;  // recorded this round; see merge_histograms
  latency_histogram commit_to_publish_;
  std::uint64_t published_ = 0;                              // publishes acknowledged this round
  absl::flat_hash_set<std::string> blocked_;                 // scratch for schedule()
  absl::flat_hash_map<std::string, std::string> key_cache_;  // queued id -> its key
  // The last id of the outbox's leading run of entries all delivered (empty: none): a round's
  // scan starts there, so it costs O(new messages), not O(pending). Valid while the outbox's
  // outbox_rewritten_at stays cursor_rewritten_at_ (until then, entries are only appended
  // after it or removed) and every delivery before it is cleared or waiting to be (forgotten
  // when a clear leaves one in the queue).
  std::string cursor_;
  std::uint64_t cursor_rewritten_at_ = 0;
  outbox_message decoded_;            // scratch for schedule(): the message being published
  std::int64_t outage_since_us_ = 0;  // first destination_unavailable since the last delivery
};

}  // namespace
}  // namespace detail

absl::Status validate(const relay_options& o, const path& outbox) {
  if (o.max_in_flight == 0) {
    return absl::InvalidArgumentError("relay_options.max_in_flight must be at least 1");
  }
  if (o.batch_size == 0) {
    return absl::InvalidArgumentError("relay_options.batch_size must be at least 1");
  }
  if (o.max_attempts == 0) {
    return absl::InvalidArgumentError("relay_options.max_attempts must be at least 1");
  }
  if (o.publish_timeout.count() <= 0) {
    return absl::InvalidArgumentError("relay_options.publish_timeout must be positive");
  }
  if (o.linger.count() < 0 || o.linger > std::chrono::milliseconds(10)) {
    return absl::InvalidArgumentError("relay_options.linger must be from 0 to 10 ms");
  }
  if (o.spin.count() < 0 || o.spin > std::chrono::milliseconds(10)) {
    return absl::InvalidArgumentError("relay_options.spin must be from 0 to 10 ms");
  }
  if (o.clear_delay.count() < 0 || o.clear_delay > std::chrono::hours(1)) {
    return absl::InvalidArgumentError("relay_options.clear_delay must be from 0 to 1 hour");
  }
  if (o.initial_backoff.count() <= 0 || o.max_backoff < o.initial_backoff) {
    return absl::InvalidArgumentError(
        "relay_options backoffs must satisfy 0 < initial_backoff <= max_backoff");
  }
  return parse_path_outside(o.dead_letter_path, outbox, "relay_options.dead_letter_path").status();
}

absl::StatusOr<std::unique_ptr<relay>> relay::create(engine& e, sink& s, relay_options opts) {
  POP_RETURN_IF_ERROR(validate(opts, e.outbox_path()));
  // Tools reading the journal (`pop dead`) find the dead letters where this relay puts them.
  POP_RETURN_IF_ERROR(e.describe(
      "dead_letters", opts.dead_letter_path,
      {{"path", opts.dead_letter_path}, {"by", "relay"}, {"at_us", e.clock().now_us()}}));
  return std::unique_ptr<relay>(new relay(e, s, std::move(opts)));
}

relay::relay(engine& e, sink& s, relay_options opts)
    : engine_(e),
      sink_(s),
      options_(std::move(opts)),
      dead_letters_(path::parse(options_.dead_letter_path).value()),
      counters_(std::make_unique<detail::relay_counters>()) {}

relay::~relay() = default;

asio::awaitable<absl::Status> relay::run() {
  return start(false);
}

asio::awaitable<absl::Status> relay::drain() {
  return start(true);
}

asio::awaitable<absl::Status> relay::start(bool until_empty) {
  if (running_.exchange(true)) {
    co_return absl::FailedPreconditionError(
        "relay: run() or drain() is already active on this relay; stop it first");
  }
  struct running_guard {
    std::atomic<bool>& flag;
    ~running_guard() { flag.store(false); }
  } guard{running_};
  const asio::any_io_executor executor = co_await asio::this_coro::executor;
  auto active = std::make_shared<detail::relay_run>(engine_, sink_, options_, dead_letters_,
                                                    *counters_, asio::make_strand(executor));
  const absl::Status status =
      co_await asio::co_spawn(active->strand(), active->loop(until_empty), asio::use_awaitable);
  co_return status;
}

relay_metrics relay::metrics() const {
  relay_metrics m;
  const snapshot snap = engine_.snapshot();
  m.version = snap.version();
  const value_view queue = snap.view(snap.outbox_path());
  m.pending = queue.size();
  queue.for_each_member([&](std::string_view, const value_view& first) {
    if (const auto typed = first.schedule()) {
      const auto age_us = engine_.clock().now_us() - typed->created_at_us;
      m.oldest_pending_age_s = static_cast<double>(std::max<std::int64_t>(age_us, 0)) / 1e6;
      return false;
    }
    try {
      if (const value_view c = first.member(outbox_fields::created_at_us);
          c && c.to_json().is_number_integer()) {
        const auto age_us = engine_.clock().now_us() - c.to_json().get<std::int64_t>();
        m.oldest_pending_age_s = static_cast<double>(std::max<std::int64_t>(age_us, 0)) / 1e6;
      }
    } catch (const json::exception&) {
      // A malformed entry has no age; the relay dead-letters it.
    }
    return false;
  });
  m.dead_letters = snap.view(dead_letters_).size();
  const detail::relay_counters& c = *counters_;
  m.in_flight = c.in_flight.load(std::memory_order_relaxed);
  m.published = c.published.load(std::memory_order_relaxed);
  m.delivered = c.delivered.load(std::memory_order_relaxed);
  m.retried = c.retried.load(std::memory_order_relaxed);
  m.dead_lettered = c.dead_lettered.load(std::memory_order_relaxed);
  m.clears = c.clears.load(std::memory_order_relaxed);
  m.clear_conflicts = c.clear_conflicts.load(std::memory_order_relaxed);
  m.spins = c.spins.load(std::memory_order_relaxed);
  m.spin_catches = c.spin_catches.load(std::memory_order_relaxed);
  m.holding_pace = c.holding_pace.load(std::memory_order_relaxed);
  const pace_stats pacing = engine_.pacing();
  m.pace_waiting = pacing.waiting;
  m.paced = pacing.paced;
  m.pace_timed_out = pacing.timed_out;
  m.pace_stalled = pacing.stalled;
  m.publish_latency = c.publish_latency.snapshot();
  m.commit_to_publish_latency = c.commit_to_publish.snapshot();
  return m;
}

}  // namespace pop
