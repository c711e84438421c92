// Defines pop::nats_ingress, a JetStream consumer that applies each message to an engine once,
// through its inbox, and acknowledges it only after the commit is durable.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/contracts/topic_pattern.hpp"
#include "pop/engine/engine.hpp"
#include "pop/nats/nats_connection.hpp"
#include "pop/relay/inbox.hpp"
#include "pop/relay/metrics.hpp"

typedef struct __natsConnection natsConnection;
typedef struct __natsSubscription natsSubscription;
typedef struct __natsMsg natsMsg;

namespace pop {

namespace detail {
class worker_pool;
}  // namespace detail

// Where an ingress reads from and how it applies what it reads.
struct nats_ingress_options {
  std::string stream{};          // the stream to consume; required
  std::string durable{};         // durable pull consumer name (letters, digits, '-', '_'); required
  std::string filter_subject{};  // only these subjects of the stream; empty: all
  // Which inbox handler applies a message: routes by topic (exact, or the longest "prefix.*"),
  // else `handler`. A message matching neither is dead-lettered.
  std::string handler{};
  std::map<std::string, std::string> routes{};
  int batch = 256;        // most messages one fetch asks for
  int apply_threads = 4;  // a batch's keys are applied on up to this many threads at once (one
                          // key's messages always in order, on one thread), so durable commits
                          // of different keys share the journal's group commit
  std::chrono::milliseconds fetch_wait{200};   // how long an empty fetch waits in run()
  std::chrono::milliseconds ack_wait{10'000};  // the server redelivers an unacked message then
  int max_ack_pending = 4'096;                 // the server sends no more while this many are
                                               // unacknowledged: the ingress's backpressure
  std::chrono::milliseconds retry_initial{1};  // first wait after a retryable engine error,
  std::chrono::milliseconds retry_max{200};    // doubled per retry up to this
  std::string dead_letter_path = "system.ingress_dead_letters";  // messages that cannot apply
  // After a restart, wait up to ack_wait for messages the previous run fetched but did not
  // acknowledge, so they are applied before newer ones (per-key order across a crash).
  bool redeliveries_first = true;
};

// What an ingress has done since it was made.
struct nats_ingress_stats {
  std::uint64_t fetched = 0;        // messages received (incl. redeliveries)
  std::uint64_t applied = 0;        // applied: the engine state changed once for them
  std::uint64_t duplicates = 0;     // already applied (redelivered or re-published): acked only
  std::uint64_t dead_lettered = 0;  // could not be applied: recorded at dead_letter_path, acked
  std::uint64_t retries = 0;        // applies retried after a retryable engine error
  std::uint64_t redelivered = 0;    // received more than once from the server
  latency_histogram end_to_end{};   // from the message's commit in the producer to its apply
};

// `s` in the Prometheus text format, every name starting with `prefix`.
std::string to_prometheus(const nats_ingress_stats& s,
                          std::string_view prefix = "pop_nats_ingress");

// Consumes a JetStream stream into an engine, each message applied once.
//
// A durable pull consumer (explicit acks) is created or updated on create(). poll() fetches a
// batch and handles its messages: those with the same Pop-Key in stream order on one thread,
// different keys side by side on up to apply_threads threads (messages without a key each on
// their own). Each message: decode (payload = the JSON text,
// topic/key/version/created from the Pop-* headers that nats_sink writes, other headers kept),
// pick the handler, inbox::apply(), and only then acknowledge. The inbox mark is
// "<Pop-Source>-<Pop-Id>" (else the Nats-Msg-Id, else "<stream>-<sequence>"), so a message that
// arrives many times — redelivered after a lost ack or a crash, or re-published by a relay —
// changes the state once. Retryable engine errors (kAborted, kResourceExhausted from
// options.max_pending, kUnavailable, kDeadlineExceeded) are retried in place with backoff while
// the server is told the message is in progress: engine backpressure slows the consumer, nothing
// is dropped, and later messages wait (order kept). Other errors (no route, undecodable payload,
// headers that are not UTF-8, a handler's contract violation or own error) dead-letter the
// message at `<dead_letter_path>.<durable>-<sequence>` with the reason (binary data as
// data_base64), then acknowledge it. kDataLoss or kInternal (an engine that can no longer commit;
// a handler returning kInternal is treated the same) stops the ingress with that error. Messages
// a batch did not settle (a stop, a fatal error) are nak'd, so the server redelivers them before
// newer ones. A duplicate is acknowledged only once the version showing its mark is durable.
//
// Thread safety: poll() from one thread at a time (start() runs it on a thread of its own);
// stats() from any thread. Lifetime: engine, inbox and connection must outlive the ingress.
class nats_ingress {
 public:
  // Returns a consuming ingress, or kInvalidArgument (bad options), kNotFound (no such stream),
  // kUnavailable (the server did not answer), kFailedPrecondition (the server refused the
  // consumer, e.g. a filter outside the stream's subjects).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<nats_ingress>> create(
      engine& e, inbox& in, nats_connection& c, nats_ingress_options opts);
  ~nats_ingress();  // stops the thread of start(), if running
  nats_ingress(const nats_ingress&) = delete;
  nats_ingress& operator=(const nats_ingress&) = delete;

  // Fetches up to options.batch messages, waiting up to `wait` for the first, and handles them.
  // Returns how many were settled (applied, duplicate or dead-lettered): 0 if none came. Errors:
  // kUnavailable (not connected; nothing lost, the server redelivers), kCancelled (stop() was
  // called mid-batch: the rest stays unacknowledged), or the engine's fatal error.
  [[nodiscard]] absl::StatusOr<std::size_t> poll(std::chrono::milliseconds wait);

  // Runs poll() on a thread of its own until stop() or a fatal error; kFailedPrecondition if
  // already running.
  [[nodiscard]] absl::Status start();
  // Stops the thread and returns why it ended: OK if by stop(), else the fatal error.
  absl::Status stop();
  // True while the thread of start() runs.
  bool running() const { return running_.load(); }

  nats_ingress_stats stats() const;
  const nats_ingress_options& options() const { return options_; }

 private:
  struct counters;
  nats_ingress(engine& e, inbox& in, nats_ingress_options opts, topic_table<std::string> routes,
               path dead_letters);  // validated by create()
  // Up to options_.batch deliveries: those already queued, then those a pull request brings
  // within `wait`. kUnavailable if none came and the server could not be asked.
  absl::StatusOr<std::vector<natsMsg*>> pull(std::chrono::milliseconds wait);
  // Naks every delivery queued or still due from the open request, in arrival order (after a
  // batch failed: they come back after what it did not settle, so per-key order holds).
  void nak_pending();
  // Forgets the open request if `m`, a pull status (`status`, pull_status's), ends it (any but
  // 100, an idle heartbeat).
  void forget_if_ended(natsMsg* m, const char* status);
  // Handles one message; returns OK once it is settled and acknowledged.
  absl::Status handle(natsMsg* msg);
  // Handles `msgs` (one key's, in order) until one fails; returns how many were settled.
  std::size_t handle_lane(const std::vector<natsMsg*>& msgs, absl::Status& failure,
                          std::atomic<bool>& failed);
  absl::Status dead_letter(natsMsg* msg, std::uint64_t seq, const absl::Status& why);
  const std::string* route(const std::string& topic) const;

  engine& engine_;
  inbox& inbox_;
  const nats_ingress_options options_;
  const topic_table<std::string> routes_;
  const path dead_letters_;
  // Pull requests go to next_subject_ with replies to "<reply_prefix_>.<n>", n counting requests;
  // the deliveries arrive on sub_, a plain subscription to "<reply_prefix_>.*". (libnats 3.4.1's
  // own pull fetch overfills its batch array when deliveries from an earlier fetch are still
  // queued.)
  natsConnection* nc_ = nullptr;
  natsSubscription* sub_ = nullptr;
  jsCtx* js_ = nullptr;
  std::string reply_prefix_;
  std::string next_subject_;
  std::uint64_t requests_ = 0;
  // The waiting request still open on the server, if any (one at a time: each would hold a
  // batch's worth of the consumer's max_waiting and deliveries), and when it expires.
  std::string open_reply_;
  std::chrono::steady_clock::time_point open_until_{};
  std::chrono::steady_clock::time_point hold_until_{};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> running_{false};
  std::thread thread_;
  std::mutex status_mu_;
  absl::Status thread_status_;  // guarded by status_mu_
  std::unique_ptr<counters> counters_;
  // Started at the first batch with several keys; used by whichever thread polls.
  std::unique_ptr<detail::worker_pool> pool_;
};

}  // namespace pop
