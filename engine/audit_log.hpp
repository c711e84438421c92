// Defines pop::audit_log, the bounded record of every process attempt, and its query types.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <mutex>
#include <shared_mutex>
#include "absl/base/thread_annotations.h"

namespace pop {

// How one attempt to run a process ended.
enum class attempt_outcome {
  committed,           // its writes and messages are in a new version (or it changed nothing)
  conflict_retried,    // a newer commit overlapped what it read or wrote; it runs again
  aborted,             // it kept conflicting until the retry budget was spent (kAborted)
  contract_violation,  // it read, wrote or emitted outside its contract (kPermissionDenied)
  failed,              // it threw, returned an error, timed out or returned invalid writes
};

// The outcome's name: "committed", "conflict_retried", "aborted", "contract_violation", "failed".
std::string_view to_string(attempt_outcome outcome);

// One attempt of one process, as the audit log keeps it.
struct audit_record {
  std::uint64_t sequence = 0;  // increasing, unique per engine
  std::string process{};
  int attempt = 1;                     // 1 for the first run, 2 for the first retry, ...
  std::uint64_t snapshot_version = 0;  // the version it ran on
  std::uint64_t commit_version = 0;    // the version it committed, 0 if none
  attempt_outcome outcome = attempt_outcome::committed;
  std::vector<std::string> reads{};        // paths it read
  std::vector<std::string> writes{};       // paths it wrote (deletes included)
  std::vector<std::string> topics{};       // topics of the messages it emitted
  std::vector<std::string> message_ids{};  // ids they were committed under (committed only)
  std::string detail{};                    // the error or conflict, empty when committed
  std::chrono::nanoseconds duration{0};    // from the start of the run to the end of the attempt
  std::chrono::system_clock::time_point at{};
};

// Which records to return; every set field must match.
struct audit_query {
  std::string process{};                     // empty: any process
  std::optional<attempt_outcome> outcome{};  // empty: any outcome
  std::uint64_t after_sequence = 0;          // only records with a larger sequence
  std::size_t limit = 1000;                  // at most this many, the newest ones
};

// A bounded, thread-safe log of attempts: it keeps the newest `capacity` records and forgets the
// oldest. Appends take one short lock; a capacity of 0 keeps nothing.
class audit_log {
 public:
  explicit audit_log(std::size_t capacity) : capacity_(capacity) {}

  bool enabled() const { return capacity_ > 0; }
  // Stores `record`, giving it the next sequence number.
  void append(audit_record record);
  // The matching records, oldest first. O(records kept).
  std::vector<audit_record> query(const audit_query& q) const;

 private:
  const std::size_t capacity_;
  mutable std::shared_mutex mu_;
  std::uint64_t next_sequence_ ABSL_GUARDED_BY(mu_) = 1;
  std::deque<audit_record> records_ ABSL_GUARDED_BY(mu_);
};

}  // namespace pop
