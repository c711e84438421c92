// Defines pop::nats_sink, a relay sink that publishes to NATS JetStream and counts a message as
// delivered only on the stream's acknowledgement.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "pop/nats/nats_connection.hpp"
#include "pop/relay/metrics.hpp"
#include "pop/relay/sink.hpp"

typedef struct __natsMsg natsMsg;
typedef struct jsPubAck jsPubAck;
typedef struct jsPubAckErr jsPubAckErr;

namespace pop {

// The longest nats_sink_options::source.
inline constexpr std::size_t max_source_length = 100;

// How a nats_sink names and sends messages.
struct nats_sink_options {
  // The producing engine's name: a path segment (letters, digits, '_', '-'), at most
  // max_source_length characters. Message ids are
  // unique per engine only, so the Nats-Msg-Id is "<source>:<id>" and consumers keep one inbox
  // mark per source and id. Required.
  std::string source{};
  // The subject of a message is subject_prefix + topic ("orders." + "payment.requested"), unless
  // subject_for is set, which then decides alone.
  std::string subject_prefix{};
  std::function<std::string(const outbox_message&)> subject_for{};
  // If set, an acknowledgement from any other stream is a failure (a subject captured by the
  // wrong stream).
  std::string expect_stream{};
  // How long libnats waits for one acknowledgement before reporting the publish failed
  // (kUnavailable, retried by the relay). Keep it below the relay's publish_timeout.
  std::chrono::milliseconds ack_timeout{5'000};
  int max_pending_acks = 65'536;  // publishes awaiting acknowledgement at once (libnats' bound)
};

// What a nats_sink has done since it was made.
struct nats_sink_stats {
  std::uint64_t published = 0;   // publishes handed to libnats
  std::uint64_t acked = 0;       // acknowledged by the stream (incl. duplicates)
  std::uint64_t duplicates = 0;  // acknowledged as duplicates: the stream had the id already
  std::uint64_t failed = 0;      // failed: refused, no stream, ack timeout, connection closed
  std::uint64_t abandoned = 0;   // cancelled by the relay before their acknowledgement
  std::size_t in_flight = 0;     // awaiting acknowledgement now
};

// `s` in the Prometheus text format, every name starting with `prefix`.
std::string to_prometheus(const nats_sink_stats& s, std::string_view prefix = "pop_nats_sink");

// A sink publishing each outbox message to NATS JetStream.
//
// On the wire: the subject from the options; the payload as JSON text; headers Nats-Msg-Id
// ("<source>:<id>", so the stream stores a message once within its duplicate window however often
// it is re-sent), Pop-Id, Pop-Source, Pop-Topic, Pop-Key (if any), Pop-Version and
// Pop-Created-At-Us, then the message's own headers. publish() does not block the relay's thread:
// it hands the message to libnats and suspends until the acknowledgement arrives (on a libnats
// thread, posted back to the relay's strand), so many acknowledgements are outstanding at once.
// Only a positive acknowledgement returns OK. Outcomes:
//   OK                          stored (or already stored: a duplicate)
//   kUnavailable                the stream refused it (retried, counted as an attempt), or,
//     destination_unavailable   marked so, the broker is down: disconnected past the reconnect
//                               buffer, no ack in time, no stream answering (retried with
//                               backoff, never counted: an outage dead-letters nothing)
//   kInvalidArgument, permanent a subject or header that NATS cannot carry, or a header named
//                               Nats-* or Pop-* (dead-lettered at once)
//   kCancelled                  the relay cancelled the wait (timeout or stop); a late
//                               acknowledgement is then ignored and the relay re-sends
// Reconnects: libnats buffers publishes while it reconnects; an acknowledgement lost with the
// connection times out and the relay re-sends, deduplicated by Nats-Msg-Id. The relay starts a
// key's next message only after the previous one is acknowledged, so per-key order holds across
// reconnects. Thread safety: publish() is called from the relay's strand; stats() from any
// thread. Lifetime: the connection must outlive the sink, and the sink every relay using it;
// destroy the sink before the executor the relay ran on.
class nats_sink final : public sink {
 public:
  // Returns a sink on `c`, or kInvalidArgument naming the bad option, or libnats' error.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<nats_sink>> create(nats_connection& c,
                                                                         nats_sink_options opts);
  ~nats_sink() override;
  nats_sink(const nats_sink&) = delete;
  nats_sink& operator=(const nats_sink&) = delete;

  boost::asio::awaitable<absl::Status> publish(const outbox_message& m) override;

  // The Nats-Msg-Id that `m` is published with.
  std::string msg_id(const outbox_message& m) const;
  // The subject that `m` is published to.
  std::string subject(const outbox_message& m) const;
  nats_sink_stats stats() const;

 private:
  struct pending;
  explicit nats_sink(nats_sink_options opts);
  static void on_ack(jsCtx* js, natsMsg* msg, jsPubAck* pa, jsPubAckErr* pae, void* self);

  const nats_sink_options options_;
  jsCtx* js_ = nullptr;
  mutable std::mutex mu_;
  absl::flat_hash_map<natsMsg*, std::shared_ptr<pending>> pending_;  // guarded by mu_
  bool closed_ = false;                                              // guarded by mu_
  std::atomic<std::uint64_t> published_{0}, acked_{0}, duplicates_{0}, failed_{0}, abandoned_{0};
};

}  // namespace pop
