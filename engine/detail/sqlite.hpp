// Defines the small SQLite helpers the journal is built on: owning handles, errors as statuses,
// and file checks.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"

namespace pop::detail {

// An open SQLite connection, closed on destruction (without checkpointing unless allowed).
struct connection {
  sqlite3* db = nullptr;
  connection() = default;
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;
  ~connection() {
    if (db) sqlite3_close_v2(db);
  }
  sqlite3* release() { return std::exchange(db, nullptr); }
};

// A prepared statement, finalized on destruction.
struct statement {
  sqlite3_stmt* s = nullptr;
  statement() = default;
  statement(const statement&) = delete;
  statement& operator=(const statement&) = delete;
  ~statement() {
    if (s) sqlite3_finalize(s);
  }
};

// True if a file exists at `p`.
bool file_exists(const std::string& p);
// The size of file `p` in bytes, or -1 if it cannot be read.
std::int64_t file_size(const std::string& p);
// SQLite result `rc` while doing `what` to journal `path` as a status: kDataLoss for corruption
// (and anything unexpected), kFailedPrecondition for busy or locked, kUnavailable for I/O errors
// and a full disk. The message carries SQLite's own text.
absl::Status sql_error(sqlite3* db, int rc, std::string_view path, std::string_view what);
// Runs `sql` (one or more statements without results); errors as sql_error.
absl::Status exec(sqlite3* db, const std::string& path, const char* sql);
// Prepares `sql` into `out`; errors as sql_error.
absl::Status prepare(sqlite3* db, const std::string& path, const char* sql, statement& out);
// Column `i` of the current row of `s` as text ("" for NULL).
std::string column_text(sqlite3_stmt* s, int i);
// `p` with the characters that end a file: URI's path escaped ('%', '?', '#').
std::string uri_escape(const std::string& p);

}  // namespace pop::detail
