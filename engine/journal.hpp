// Defines the durability settings of an engine and verify_journal, the journal integrity check.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/contracts/json.hpp"

namespace pop {

// How durable an acknowledged commit is. A commit is acknowledged when execute() or
// compare_and_swap() returns it.
enum class durability {
  none,     // no journal: the state lives in memory only and dies with the process
  process,  // survives a crash of the process (kill -9): each commit is copied into the commit
            // log "<journal>-log" (a file mapped shared: in the kernel's page cache once copied)
            // and written into SQLite (WAL, synchronous=NORMAL) in groups soon after; the last
            // acknowledged commits may be lost if the machine loses power
  power,    // survives power loss too: SQLite WAL, synchronous=FULL (every group commit syncs)
};

// Tuning of a journal; the defaults suit most engines.
struct journal_options {
  // Versions between full-state snapshots, or journal bytes written since the last one. An open
  // that replays that many records (engines that never ran long enough to write one) writes one.
  std::uint64_t snapshot_every = 100'000;
  std::uint64_t snapshot_bytes = 64ull << 20;
  std::size_t max_group = 8192;        // most commits sharing one SQLite transaction
  std::uint64_t max_batch_lag = 8192;  // versions an engine::batch may run ahead of the journal
                                       // before its next commit waits for part of them
  // Bytes of the commit log at durability::process (rounded up to 4 KiB, at least 64 KiB, at most
  // 1 GiB; a record over a quarter of it waits for SQLite instead). 0: no log, every commit waits
  // for SQLite (about half the throughput under many writers). The log is a file mapped into
  // memory, its blocks reserved when it is created: on a copy-on-write file system (btrfs, ZFS)
  // a full disk can still fail a write into it, which ends the process (SIGBUS); there, prefer 0.
  std::size_t log_bytes = 8u << 20;
};

// The journal format this build writes and reads. 2: records' checksums are taken 8 bytes at a
// time (see detail::record_checksum); records of format 1 keep theirs. A format 1 journal opened
// for writing becomes format 2 (a build that reads only format 1 then refuses it, clearly).
inline constexpr int journal_format_version = 2;

// What verify_journal() found.
struct journal_info {
  int format_version = 0;
  std::uint64_t last_version = 0;      // the version a reopened engine resumes at
  std::uint64_t snapshot_version = 0;  // the newest snapshot; commits after it are replayed
  std::uint64_t records = 0;           // commit records after the snapshot
  std::uint64_t record_bytes = 0;      // bytes of their texts (as options.snapshot_bytes counts)
  bool clean = false;                  // false: the last engine using it did not close it
  std::string outbox_path{};
};

// One committed version as the journal recorded it: what the audit needs after a restart.
struct journal_record_info {
  std::uint64_t version = 0;
  std::int64_t at_us = 0;             // commit time, microseconds since the Unix epoch
  std::string process{};              // the process, or "compare_and_swap"
  std::vector<std::string> writes{};  // the paths written or deleted, messages included
  std::vector<std::string> message_ids{};
};

// Up to `limit` records with versions >= `from_version`, oldest first, read without changing
// the file (an engine may have it open). Records before the newest snapshot are pruned and not
// returned. Errors as verify_journal().
[[nodiscard]] absl::StatusOr<std::vector<journal_record_info>> read_journal(
    const std::string& path, std::uint64_t from_version = 0, std::size_t limit = 1'000'000);

// The state a journal holds at one version.
struct journal_state {
  std::uint64_t version = 0;
  json state{};       // the whole state at `version`, the outbox included
  journal_info info;  // snapshot_version .. last_version: the versions it retains
};

// The state of the journal at `path` at version `at` (the newest if absent), read without changing
// the file (an engine may have it open). A journal retains the versions from its newest snapshot
// on; kNotFound names the retained range for another. Errors as verify_journal().
[[nodiscard]] absl::StatusOr<journal_state> read_journal_state(
    const std::string& path, std::optional<std::uint64_t> at = std::nullopt);

// What engine::describe() recorded in the journal at `path`: kind -> name -> description, read
// without changing the file. Errors as verify_journal().
[[nodiscard]] absl::StatusOr<std::map<std::string, std::map<std::string, json>, std::less<>>>
read_journal_descriptions(const std::string& path);

// Checks the journal at `path` without changing it (and without taking it from an engine that
// has it open): SQLite integrity, format version, every record's checksum, no gap in versions,
// and that a journal left open by a crash still has its write-ahead log. Returns what it found,
// or kNotFound (no such file), kFailedPrecondition (a newer format, or a file that is not a pop
// journal), kDataLoss (damage, naming what and where).
[[nodiscard]] absl::StatusOr<journal_info> verify_journal(const std::string& path);

}  // namespace pop
