// Defines pop::nats_connection (a NATS client connection with JetStream) and stream management.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// The libnats handle types, declared as nats.h declares them so users need not include it.
typedef struct __natsConnection natsConnection;
typedef struct __jsCtx jsCtx;

namespace pop {

// TLS settings passed through to libnats. With `enabled` false the others are ignored, unless a
// server URL says tls://.
struct nats_tls_options {
  bool enabled = false;
  std::string ca_file{};            // PEM file of trusted certificate authorities
  std::string cert_file{};          // client certificate chain (PEM), with key_file
  std::string key_file{};           // client private key (PEM)
  std::string expected_hostname{};  // the name the server's certificate must carry
  std::string ciphers{};            // OpenSSL cipher list (TLS 1.2)
  bool skip_verify = false;         // do not verify the server's certificate (tests only)
};

// How to reach a NATS server or cluster.
struct nats_connection_options {
  std::vector<std::string> servers{"nats://127.0.0.1:4222"};  // tried in this order
  std::string name = "pop";                                   // shown by the server
  std::string credentials_file{};  // a .creds file (user JWT and NKey seed)
  std::string user{};              // user and password, or
  std::string password{};
  std::string token{};  // a token
  nats_tls_options tls{};
  std::chrono::milliseconds connect_timeout{2'000};  // per connection attempt
  std::chrono::milliseconds api_timeout{5'000};      // JetStream API requests (stream, consumer)
  // A socket write blocked this long (a server that stopped reading) drops the connection, which
  // then reconnects, instead of blocking the publishing or acknowledging thread for good.
  std::chrono::milliseconds write_deadline{2'000};
  int max_reconnect = -1;                         // attempts after a disconnect; -1: forever
  std::chrono::milliseconds reconnect_wait{100};  // between attempts to the same server
  int reconnect_buffer_bytes = 8 << 20;  // publishes buffered while disconnected (positive);
                                         // beyond, a publish fails (kUnavailable), retried later
  bool retry_initial_connect = false;    // connect() returns at once and connects in background
};

// Returns OK or kInvalidArgument naming the bad option.
[[nodiscard]] absl::Status validate(const nats_connection_options& opts);

// What a connection has seen since it was opened.
struct nats_connection_stats {
  bool connected = false;
  std::uint64_t disconnects = 0;
  std::uint64_t reconnects = 0;
};

// One NATS client connection, shared by sinks and ingresses of this process.
//
// libnats reconnects by itself (within max_reconnect); while disconnected, publishes are buffered
// up to reconnect_buffer_bytes and sent on reconnect. Thread safety: every member may be called
// from any thread. Lifetime: must outlive every nats_sink and nats_ingress made from it; not
// copyable or movable.
class nats_connection {
 public:
  // Returns an open connection, or kInvalidArgument (bad options), kUnavailable (no server could
  // be reached, credentials or TLS files rejected; the message carries libnats' reason).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<nats_connection>> connect(
      nats_connection_options opts);
  ~nats_connection();
  nats_connection(const nats_connection&) = delete;
  nats_connection& operator=(const nats_connection&) = delete;

  nats_connection_stats stats() const;
  const nats_connection_options& options() const { return options_; }
  // The libnats handle, for anything pop does not wrap. Owned by this object.
  natsConnection* handle() const { return nc_; }
  // A JetStream context for API requests (stream and consumer management), owned by this object.
  jsCtx* jetstream() const { return js_; }

 private:
  explicit nats_connection(nats_connection_options opts) : options_(std::move(opts)) {}
  static void on_disconnected(natsConnection*, void* self);
  static void on_reconnected(natsConnection*, void* self);
  static void on_connected(natsConnection*, void* self);
  static void on_closed(natsConnection*, void* self);

  const nats_connection_options options_;
  natsConnection* nc_ = nullptr;
  jsCtx* js_ = nullptr;
  std::atomic<std::uint64_t> disconnects_{0};
  std::atomic<std::uint64_t> reconnects_{0};
  // libnats runs connection callbacks on its own thread, the closed one last: the destructor
  // waits for it, so no callback runs on a destroyed object.
  std::mutex closed_mu_;
  std::condition_variable closed_cv_;
  bool closed_ = false;  // guarded by closed_mu_
};

// Where a stream keeps its messages.
enum class nats_storage { file, memory };

// A JetStream stream that sinks publish into and ingresses consume from.
struct nats_stream_options {
  std::string name{};                                   // letters, digits, '-' and '_'
  std::vector<std::string> subjects{};                  // e.g. {"orders.>"}
  std::chrono::milliseconds duplicate_window{120'000};  // publishes with a Nats-Msg-Id seen within
                                                        // it are stored once
  nats_storage storage = nats_storage::file;
  int replicas = 1;
  std::chrono::milliseconds max_age{0};  // 0: keep messages until limits (none by default)
  std::int64_t max_bytes = -1;           // -1: no limit
};

// The figures of a stream.
struct nats_stream_info {
  std::string name{};
  std::uint64_t messages = 0;
  std::uint64_t bytes = 0;
  std::uint64_t first_sequence = 0;
  std::uint64_t last_sequence = 0;
  std::chrono::milliseconds duplicate_window{0};
  std::vector<std::string> subjects{};
};

// Creates the stream if it does not exist, or updates its subjects and duplicate window if they
// differ; idempotent. Returns its figures, or kInvalidArgument (bad options), kUnavailable (the
// server did not answer), kFailedPrecondition (the server refused it: the message says why, e.g.
// subjects overlapping another stream, or a storage type that cannot change).
[[nodiscard]] absl::StatusOr<nats_stream_info> ensure_stream(nats_connection& c,
                                                             const nats_stream_options& opts);
// The figures of stream `name`, or kNotFound, kUnavailable.
[[nodiscard]] absl::StatusOr<nats_stream_info> stream_info(nats_connection& c,
                                                           const std::string& name);

}  // namespace pop
