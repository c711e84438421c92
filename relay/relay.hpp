// Defines pop::relay, the Boost.Asio coroutine that publishes the outbox and clears it by CAS.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include <boost/asio/awaitable.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "pop/engine/engine.hpp"
#include "pop/relay/metrics.hpp"
#include "pop/relay/sink.hpp"

namespace pop {

namespace detail {
struct relay_counters;
}  // namespace detail

// How a relay publishes, retries and gives up.
struct relay_options {
  std::size_t max_in_flight = 256;  // asynchronous publishes awaiting the sink at once
  std::size_t batch_size = 4096;    // most outcomes recorded by one clearing transaction
  std::chrono::milliseconds publish_timeout{10'000};  // then the publish is cancelled and counts
                                                      // as a failed attempt (kDeadlineExceeded)
  std::uint32_t max_attempts = 8;  // failed attempts after which a message is dead-lettered
  std::chrono::microseconds initial_backoff{100'000};    // delay after the first failure; doubled
  std::chrono::microseconds max_backoff{60'000'000};     // per failure up to this, with jitter
  std::string dead_letter_path = "system.dead_letters";  // where given-up messages go
  std::uint64_t seed = 0;                                // jitter seed; 0 draws one at random
  // How long acknowledged messages may wait to be removed, so one clearing transaction covers
  // many of them instead of one commit per message (publishing is never delayed). 0 clears at
  // once; at most 1 hour. Failures are recorded at once; drain() and a clock moved by hand clear
  // at once too.
  std::chrono::microseconds clear_delay{500};
  // After eight rounds in a row that each published several messages (commits keep coming
  // faster than rounds: not a burst), how long the relay lets more gather before its next round,
  // with no wake-up per commit meanwhile: fewer rounds, each on more messages, and producers
  // that mostly find the head theirs alone. Publishing waits at most this much longer. 0 never
  // waits; at most 10 ms. Not in drain(), nor with a clock moved by hand.
  std::chrono::microseconds linger{20};
  // After a publish is acknowledged, how long the relay keeps looking for new commits before it
  // sleeps (yielding to other handlers on its executor in between): a commit within it is
  // published without waking a sleeping thread. It spins only where that is worth it: while
  // waking it has been taking 10 us or more (as where an idle processor must be woken first, seen
  // on virtual machines; measured on each wake-up by a commit) and while published messages come
  // a linger or more apart on average (denser ones are batched by sleeping and lingering); a spin
  // that catches nothing, or four in a row that catch only commits publishing nothing, end it
  // until a round publishes again. Its thread is busy meanwhile: at a steady few thousand commits
  // per second or more, about one core; metrics() counts spins. 0 never spins; at most 10 ms. Not
  // in drain(), nor with a clock moved by hand.
  std::chrono::microseconds spin{200};
};

// Returns OK, or kInvalidArgument naming the bad option (zero sizes or attempts, backoffs out of
// order, a bad dead-letter path or one overlapping the outbox at `outbox`).
[[nodiscard]] absl::Status validate(const relay_options& opts, const path& outbox);

// Publishes an engine's outbox through a sink, at least once and in commit order per key.
//
// run() is a coroutine the user spawns on any executor; the relay creates its own strand on it,
// so the executor may be multi-threaded. It is woken by the engine's commit notifications (no
// polling; timers only for retry backoff and publish timeouts). Each round it takes the pending
// messages in commit order from the newest snapshot, publishes those that are due (several in
// flight at once, at most one per non-empty key; messages with an empty key are not ordered
// relative to each other), and records outcomes in one compare_and_swap (cas_mode::keys) per
// batch (deliveries at most clear_delay later, so a busy relay spends one commit on many):
// acknowledged messages are removed by id, failed ones get their attempt count, last error,
// failure history and next attempt time, and those past max_attempts (or failing permanently)
// move to the dead-letter path with every failure. A failure marked destination_unavailable (the
// broker is down) is retried with a backoff growing over the outage and is not counted as an
// attempt, so an outage never dead-letters messages. Messages committed meanwhile are never
// touched, and the transaction conflicts only with another writer of the same ids (it is then
// redone on a newer snapshot). A failing message holds back only later messages with its key.
//
// Flow control: while it publishes (from a round with publishes acknowledged until one with
// failures and none acknowledged, or an outage of the destination), a running relay holds its
// engine's pace (engine::hold_pace): producers then wait for its clears when it falls more than
// options::pace_pending messages behind; never on the thread the relay runs on.
//
// Stopping: cancel the coroutine (terminal cancellation through the completion token's slot).
// In-flight publishes are cancelled and their messages stay queued unchanged; outcomes already
// known are recorded first. A new relay on the same engine resumes from the state alone; only
// messages in flight at the stop can be published twice.
//
// Thread safety: metrics() may be called from any thread at any time. Only one run()/drain() of
// a relay may be active at once. Lifetime: the engine and the sink must outlive the relay, and
// the relay must outlive any run()/drain() coroutine it started.
class relay {
 public:
  // Returns a relay of `e`'s outbox through `s`, or kInvalidArgument naming the bad option
  // (batch sizes, backoffs, attempts, a dead-letter path that is bad or overlaps the outbox).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<relay>> create(engine& e, sink& s,
                                                                     relay_options opts = {});
  ~relay();
  relay(const relay&) = delete;
  relay& operator=(const relay&) = delete;

  // Publishes until cancelled. Returns kCancelled when stopped by cancellation;
  // kFailedPrecondition if this relay is already running; or the engine's error if recording
  // outcomes failed for a reason other than a conflict (the relay stops then, never silently).
  boost::asio::awaitable<absl::Status> run();
  // Like run(), but returns OK as soon as the outbox is empty and nothing is in flight (waiting
  // out retry backoffs on the way). For tests, batch jobs and orderly shutdown.
  boost::asio::awaitable<absl::Status> drain();

  // The outbox figures from the newest snapshot plus this relay's counters (and its engine's flow
  // control figures). Any thread.
  relay_metrics metrics() const;

  const relay_options& options() const { return options_; }

 private:
  relay(engine& e, sink& s, relay_options opts);  // opts validated by create()
  boost::asio::awaitable<absl::Status> start(bool until_empty);

  engine& engine_;
  sink& sink_;
  const relay_options options_;
  const path dead_letters_;
  std::atomic<bool> running_{false};
  std::unique_ptr<detail::relay_counters> counters_;
};

}  // namespace pop
