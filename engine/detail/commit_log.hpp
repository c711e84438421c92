// Defines pop::detail::commit_log: the journal's log of acknowledged commits at
// durability::process, a ring of records in a file mapped shared, ahead of SQLite.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace pop::detail {

// The commit log "<journal>-log" of a journal at durability::process.
//
// A commit is process-crash safe once its record is in the kernel's page cache: a record copied
// into this file, mapped MAP_SHARED, is there the moment the copy ends, with no system call, so a
// committer is acknowledged without waiting for SQLite (waiting, it slept and was woken once per
// commit: under 64 writers, context switches were two fifths of the machine). The journal's
// writer thread still writes every record into SQLite in groups; once a group is committed there,
// its records' space is given back (release_through). Opening a journal moves the records SQLite
// lacks from the log into it first (read()). A power loss may lose what the kernel had not
// written back: durability::power has no log.
//
// The file: a 64-byte header (magic, capacity, epoch, tail), then `capacity` bytes used as a ring
// addressed by absolute offsets (a record at absolute offset a lies at a % capacity, 8-aligned).
// A record is a 64-byte head (its absolute offset, the log's epoch, kind, size, version, time,
// field lengths, the record's checksum as in pop_commits, and a check over the head) and its
// fields (process, writes, messages). A record that would cross the ring's end is preceded by a
// padding record (or, with under 64 bytes left, by the implicit padding of that rest). Reading
// starts at the tail and stops at the first record whose head or fields do not check: records
// are appended one at a time (under the journal's lock), so a crash tears at most the last one,
// and bytes of an earlier lap or epoch carry another offset or epoch. Not thread-safe: the
// journal calls it under its lock.
class commit_log {
 public:
  struct entry {
    std::uint64_t version = 0;
    std::int64_t at_us = 0;
    std::string process;
    std::string writes;
    std::string messages;
    std::int64_t checksum = 0;  // record_checksum() of the fields, as in pop_commits
  };
  struct contents {
    std::vector<entry> entries;  // the valid records from the tail on, in the log's order
    std::uint32_t epoch = 0;     // the log's epoch (0 if there is no log)
    // Where a record that does not check is followed by valid ones: damage, not a crash (which
    // tears only the last record). Absent if the log ends cleanly or at a torn last record.
    std::optional<std::uint64_t> damaged_at;
  };

  // The log at `path`, read without changing it (an engine may be appending to it): empty if the
  // file does not exist or has no valid header (a log never used, or one torn while created).
  static absl::StatusOr<contents> read(const std::string& path);
  // Creates the log at `path` empty, with `capacity` bytes of ring (rounded up to 4 KiB, at least
  // 64 KiB), at `epoch`, replacing the file atomically (a new file renamed over it).
  static absl::StatusOr<std::unique_ptr<commit_log>> create(const std::string& path,
                                                            std::size_t capacity,
                                                            std::uint32_t epoch);
  ~commit_log();
  commit_log(const commit_log&) = delete;
  commit_log& operator=(const commit_log&) = delete;

  // True if a record with fields of `field_bytes` bytes can ever be appended (a quarter of the
  // ring at most; a larger one waits for SQLite instead).
  bool fits(std::size_t field_bytes) const { return record_size(field_bytes) <= capacity_ / 4; }
  // Appends a record; false if the ring has no room for it now (release_through() makes room).
  bool append(std::uint64_t version, std::int64_t at_us, std::string_view process,
              std::string_view writes, std::string_view messages, std::int64_t checksum);
  // Gives back the space of the records at the tail with versions <= `version` (in SQLite now),
  // up to the first record with a newer version.
  void release_through(std::uint64_t version);
  // Bytes in use (records and padding between the tail and the head).
  std::size_t used() const { return static_cast<std::size_t>(head_ - tail_); }
  std::size_t capacity() const { return capacity_; }

 private:
  commit_log(int fd, char* map, std::size_t map_bytes, std::size_t capacity, std::uint32_t epoch);
  static std::size_t record_size(std::size_t field_bytes) {
    return (64 + field_bytes + 7) & ~std::size_t{7};
  }
  void set_tail(std::uint64_t tail);

  const int fd_;
  char* const map_;
  const std::size_t map_bytes_;
  const std::size_t capacity_;
  const std::uint32_t epoch_;
  std::uint64_t head_ = 0;  // absolute offset of the next record
  std::uint64_t tail_ = 0;  // absolute offset of the oldest live record (or head_)
  // The live records in the log's order: (absolute offset, version).
  std::deque<std::pair<std::uint64_t, std::uint64_t>> live_;
};

}  // namespace pop::detail
