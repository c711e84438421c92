// Defines the durability settings of an engine and verify_journal, the journal integrity check.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace pop {

// How durable an acknowledged commit is. A commit is acknowledged when execute() or
// compare_and_swap() returns it.
enum class durability {
  none,     // no journal: the state lives in memory only and dies with the process
  process,  // survives a crash of the process (kill -9): SQLite WAL, synchronous=NORMAL; the last
            // acknowledged commits may be lost if the machine loses power
  power,    // survives power loss too: SQLite WAL, synchronous=FULL (every group commit syncs)
};

// Tuning of a journal; the defaults suit most engines.
struct journal_options {
  std::uint64_t snapshot_every = 100'000;      // versions between full-state snapshots
  std::uint64_t snapshot_bytes = 64ull << 20;  // or journal bytes written since the last one
  std::size_t max_group = 8192;                // most commits sharing one SQLite transaction
};

// The journal format this build writes and reads.
inline constexpr int journal_format_version = 1;

// What verify_journal() found.
struct journal_info {
  int format_version = 0;
  std::uint64_t last_version = 0;      // the version a reopened engine resumes at
  std::uint64_t snapshot_version = 0;  // the newest snapshot; commits after it are replayed
  std::uint64_t records = 0;           // commit records after the snapshot
  bool clean = false;                  // false: the last engine using it did not close it
  std::string outbox_path{};
};

// Checks the journal at `path` without changing it (and without taking it from an engine that
// has it open): SQLite integrity, format version, every record's checksum, no gap in versions,
// and that a journal left open by a crash still has its write-ahead log. Returns what it found,
// or kNotFound (no such file), kFailedPrecondition (a newer format), kDataLoss (damage, naming
// what and where).
[[nodiscard]] absl::StatusOr<journal_info> verify_journal(const std::string& path);

}  // namespace pop
