#include "engine/detail/journal.hpp"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "contracts/status.hpp"
#include "engine/snapshot.hpp"

namespace pop {
namespace detail {
namespace {

constexpr const char* schema = R"sql(
CREATE TABLE IF NOT EXISTS pop_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pop_commits(
  version INTEGER PRIMARY KEY,  -- the committed version; consecutive
  at_us INTEGER NOT NULL,       -- commit time, microseconds since the Unix epoch
  process TEXT NOT NULL,        -- the process name, or "compare_and_swap"
  writes TEXT NOT NULL,         -- JSON [[path, value] | [path] (delete), ...], messages included
  messages TEXT NOT NULL,       -- JSON [message id, ...]
  checksum INTEGER NOT NULL);   -- FNV-1a 64 of version, at_us, process, writes, messages
CREATE TABLE IF NOT EXISTS pop_snapshots(
  version INTEGER PRIMARY KEY,
  at_us INTEGER NOT NULL,
  state TEXT NOT NULL,          -- JSON of the whole state at that version
  checksum INTEGER NOT NULL);   -- FNV-1a 64 of version, at_us, state
)sql";

std::int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

struct fnv64 {
  std::uint64_t h = 1469598103934665603ULL;
  fnv64& add(std::string_view s) {
    for (const unsigned char c : s) {
      h ^= c;
      h *= 1099511628211ULL;
    }
    h ^= 0xff;  // field separator
    h *= 1099511628211ULL;
    return *this;
  }
  fnv64& add(std::int64_t v) { return add(std::to_string(v)); }
  std::int64_t value() const { return static_cast<std::int64_t>(h); }
};

std::int64_t record_checksum(std::int64_t version, std::int64_t at_us, std::string_view process,
                             std::string_view writes, std::string_view messages) {
  return fnv64().add(version).add(at_us).add(process).add(writes).add(messages).value();
}

std::int64_t snapshot_checksum(std::int64_t version, std::int64_t at_us, std::string_view state) {
  return fnv64().add(version).add(at_us).add(state).value();
}

bool file_exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

std::int64_t file_size(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 ? static_cast<std::int64_t>(st.st_size) : -1;
}

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

absl::Status sql_error(sqlite3* db, int rc, std::string_view path, std::string_view what) {
  const std::string text = absl::StrCat("journal '", to_absl(path), "': ", to_absl(what), ": ",
                                        db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
  if (rc == SQLITE_CORRUPT || rc == SQLITE_NOTADB || (rc & 0xff) == SQLITE_CORRUPT) {
    return absl::DataLossError(text);
  }
  if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED) {
    return absl::FailedPreconditionError(text);
  }
  if ((rc & 0xff) == SQLITE_IOERR || (rc & 0xff) == SQLITE_FULL) {
    return absl::UnavailableError(text);
  }
  return absl::DataLossError(text);
}

absl::Status exec(sqlite3* db, const std::string& path, const char* sql) {
  char* error = nullptr;
  const int rc = sqlite3_exec(db, sql, nullptr, nullptr, &error);
  if (rc == SQLITE_OK) return absl::OkStatus();
  std::string what = absl::StrCat("running '", sql, "'");
  if (error) sqlite3_free(error);
  return sql_error(db, rc, path, what);
}

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

absl::Status prepare(sqlite3* db, const std::string& path, const char* sql, statement& out) {
  const int rc = sqlite3_prepare_v2(db, sql, -1, &out.s, nullptr);
  if (rc != SQLITE_OK) return sql_error(db, rc, path, absl::StrCat("preparing '", sql, "'"));
  return absl::OkStatus();
}

std::string column_text(sqlite3_stmt* s, int i) {
  const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s, i));
  return p ? std::string(p, static_cast<std::size_t>(sqlite3_column_bytes(s, i))) : std::string();
}

// Reads pop_meta into `info`; `found` is false if the table does not exist.
absl::Status read_meta(sqlite3* db, const std::string& path, journal_info& info, bool& found) {
  statement s;
  int rc = sqlite3_prepare_v2(db, "SELECT key, value FROM pop_meta", -1, &s.s, nullptr);
  if (rc != SQLITE_OK) {
    const std::string msg = sqlite3_errmsg(db);
    if (msg.find("no such table") != std::string::npos) {
      found = false;
      return absl::OkStatus();
    }
    return sql_error(db, rc, path, "reading its metadata");
  }
  found = true;
  bool has_format = false;
  while ((rc = sqlite3_step(s.s)) == SQLITE_ROW) {
    const std::string key = column_text(s.s, 0);
    const std::string value = column_text(s.s, 1);
    if (key == "format_version") {
      has_format = true;
      info.format_version = std::atoi(value.c_str());
    } else if (key == "clean") {
      info.clean = value == "1";
    } else if (key == "outbox_path") {
      info.outbox_path = value;
    }
  }
  if (rc != SQLITE_DONE) return sql_error(db, rc, path, "reading its metadata");
  if (!has_format) {
    return absl::DataLossError(
        absl::StrCat("journal '", path, "': its metadata has no format_version"));
  }
  if (info.format_version > journal_format_version) {
    return absl::FailedPreconditionError(
        absl::StrCat("journal '", path, "' was written by journal format ", info.format_version,
                     "; this build of pop reads format ", journal_format_version,
                     " and leaves the file untouched: open it with a newer pop"));
  }
  if (info.format_version < 1) {
    return absl::DataLossError(
        absl::StrCat("journal '", path, "' has an invalid format version ", info.format_version));
  }
  return absl::OkStatus();
}

std::string uri_escape(const std::string& p) {
  std::string out;
  for (const char c : p) {
    if (c == '%' || c == '?' || c == '#') {
      char buf[4];
      std::snprintf(buf, sizeof buf, "%%%02X", static_cast<unsigned char>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

// The head file `<journal>-head` holds the newest durable version, rewritten after every group
// commit. It is the witness that tells a journal whose write-ahead log another SQLite client
// checkpointed into the main file and deleted (sound: the main file holds every acknowledged
// commit) from one whose log was lost after a crash (the main file lacks the last commits). It
// needs no sync: it only ever trails the log, and is read only when the log is absent.
constexpr std::size_t head_size = 38;  // "pop-journal-head " + 20 digits + '\n'

std::string head_path(const std::string& path) {
  return path + "-head";
}

std::string head_text(std::uint64_t version) {
  char buf[head_size + 1];
  std::snprintf(buf, sizeof buf, "pop-journal-head %020llu\n",
                static_cast<unsigned long long>(version));
  return std::string(buf, head_size);
}

// The version the head file of `path` names, or nullopt if it is missing or unreadable.
std::optional<std::uint64_t> read_head(const std::string& path) {
  const int fd = ::open(head_path(path).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  char buf[head_size];
  const ssize_t n = ::pread(fd, buf, head_size, 0);
  ::close(fd);
  constexpr std::string_view prefix = "pop-journal-head ";
  const std::string_view text(buf, n > 0 ? static_cast<std::size_t>(n) : 0);
  if (text.size() != head_size || text.substr(0, prefix.size()) != prefix) return std::nullopt;
  std::uint64_t version = 0;
  const char* digits = buf + prefix.size();
  if (auto r = std::from_chars(digits, digits + 20, version); r.ec != std::errc()) {
    return std::nullopt;
  }
  return version;
}

// The newest version the database holds (in a record or a snapshot), read through `db`.
absl::StatusOr<std::uint64_t> newest_version(sqlite3* db, const std::string& path) {
  statement s;
  POP_RETURN_IF_ERROR(prepare(db, path,
                              "SELECT max(coalesce((SELECT max(version) FROM pop_commits), 0), "
                              "coalesce((SELECT max(version) FROM pop_snapshots), 0))",
                              s));
  const int rc = sqlite3_step(s.s);
  if (rc != SQLITE_ROW) return sql_error(db, rc, path, "reading its newest version");
  return static_cast<std::uint64_t>(sqlite3_column_int64(s.s, 0));
}

// Records `version` as the newest durable one in the head file `fd`.
absl::Status write_head(int fd, const std::string& path, std::uint64_t version) {
  const std::string text = head_text(version);
  if (::pwrite(fd, text.data(), text.size(), 0) == static_cast<ssize_t>(text.size())) {
    return absl::OkStatus();
  }
  return absl::UnavailableError(absl::StrCat("journal '", path, "': cannot write its head file '",
                                             head_path(path), "': ", std::strerror(errno)));
}

// Checks a journal whose write-ahead log is absent, reading only the main database file (which is
// then self-contained): its format is readable, and either it was closed cleanly, or it holds
// every version its head file says was acknowledged (another SQLite client checkpointed the log
// into it and deleted the log, as the sqlite3 tool does on closing). Otherwise its log, holding
// the last acknowledged commits, was lost: kDataLoss. (With the log present the main file alone
// may be mid-checkpoint and is never read on its own.) `found` is false for a file with no
// metadata.
absl::Status precheck_without_wal(const std::string& path, journal_info& info, bool& found) {
  connection c;
  const std::string uri = absl::StrCat("file:", uri_escape(path), "?immutable=1");
  int rc = sqlite3_open_v2(uri.c_str(), &c.db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, nullptr);
  if (rc != SQLITE_OK) return sql_error(c.db, rc, path, "opening it to check it");
  POP_RETURN_IF_ERROR(read_meta(c.db, path, info, found));
  if (!found || info.clean) return absl::OkStatus();
  const std::optional<std::uint64_t> head = read_head(path);
  if (!head) {
    return absl::DataLossError(absl::StrCat(
        "journal '", path, "' was not closed cleanly, its write-ahead log '", path,
        "-wal' is missing and so is its head file '", head_path(path),
        "' that would tell whether the main file holds every acknowledged commit; restore the "
        "-wal file (nothing was changed)"));
  }
  POP_ASSIGN_OR_RETURN(const std::uint64_t newest, newest_version(c.db, path));
  if (newest >= *head) return absl::OkStatus();
  return absl::DataLossError(
      absl::StrCat("journal '", path, "' was not closed cleanly and its write-ahead log '", path,
                   "-wal' is missing: version ", *head,
                   " was acknowledged, but the main file holds only up to ", "version ", newest,
                   "; restore the -wal file (nothing was changed). If this file was "
                   "restored from a backup on purpose, delete '",
                   head_path(path), "' to accept it as it is"));
}

// kFailedPrecondition if the database holds tables that are not a pop journal's.
absl::Status check_foreign(sqlite3* db, const std::string& path) {
  statement s;
  POP_RETURN_IF_ERROR(prepare(
      db, path,
      "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'pop\\_%' ESCAPE '\\'",
      s));
  const int rc = sqlite3_step(s.s);
  if (rc == SQLITE_ROW) {
    return absl::FailedPreconditionError(
        absl::StrCat("'", path, "' is an SQLite database with table '", column_text(s.s, 0),
                     "', not a pop journal; it was left untouched"));
  }
  if (rc != SQLITE_DONE) return sql_error(db, rc, path, "listing its tables");
  return absl::OkStatus();
}

// Applies one record's writes (JSON text) to `root`.
absl::Status replay(node_ptr& root, const std::string& writes, std::uint64_t version,
                    const std::string& path) {
  const json parsed = json::parse(writes, nullptr, false);
  const auto bad = [&](std::string_view why) {
    return absl::DataLossError(absl::StrCat("journal '", path, "': the record of version ", version,
                                            " is damaged: ", to_absl(why)));
  };
  if (!parsed.is_array()) return bad("its writes are not a JSON list");
  for (const json& w : parsed) {
    if (!w.is_array() || w.empty() || w.size() > 2 || !w[0].is_string()) {
      return bad("a write is not [path] or [path, value]");
    }
    const std::string& p = w[0].get_ref<const std::string&>();
    if (w.size() == 1) {
      root = erase(root, p);
      continue;
    }
    absl::StatusOr<node_ptr> next = assign(root, p, make_node(w[1]));
    if (!next.ok()) return bad(to_std(next.status().message()));
    root = *std::move(next);
  }
  return absl::OkStatus();
}

// Loads the newest snapshot and replays every record after it, checking checksums, integrity
// and that versions are consecutive.
absl::Status load(sqlite3* db, const std::string& path, journal_info& info, node_ptr& root) {
  {
    statement check;
    POP_RETURN_IF_ERROR(prepare(db, path, "PRAGMA quick_check", check));
    const int rc = sqlite3_step(check.s);
    if (rc != SQLITE_ROW) return sql_error(db, rc, path, "checking its integrity");
    const std::string verdict = column_text(check.s, 0);
    if (verdict != "ok") {
      return absl::DataLossError(
          absl::StrCat("journal '", path, "' is damaged (SQLite integrity check: ", verdict, ")"));
    }
  }
  {
    statement snap;
    POP_RETURN_IF_ERROR(prepare(
        db, path,
        "SELECT version, at_us, state, checksum FROM pop_snapshots ORDER BY version DESC LIMIT 1",
        snap));
    const int rc = sqlite3_step(snap.s);
    if (rc == SQLITE_DONE) {
      return absl::DataLossError(absl::StrCat("journal '", path, "' has no snapshot"));
    }
    if (rc != SQLITE_ROW) return sql_error(db, rc, path, "reading its snapshot");
    const std::int64_t version = sqlite3_column_int64(snap.s, 0);
    const std::int64_t at = sqlite3_column_int64(snap.s, 1);
    const std::string state = column_text(snap.s, 2);
    if (snapshot_checksum(version, at, state) != sqlite3_column_int64(snap.s, 3)) {
      return absl::DataLossError(absl::StrCat("journal '", path, "': the snapshot of version ",
                                              version, " fails its checksum"));
    }
    json parsed = json::parse(state, nullptr, false);
    if (!parsed.is_object()) {
      return absl::DataLossError(absl::StrCat("journal '", path, "': the snapshot of version ",
                                              version, " is not a JSON object"));
    }
    info.snapshot_version = static_cast<std::uint64_t>(version);
    root = make_root(std::move(parsed));
  }
  statement rows;
  POP_RETURN_IF_ERROR(prepare(db, path,
                              "SELECT version, at_us, process, writes, messages, checksum FROM "
                              "pop_commits WHERE version > ? ORDER BY version",
                              rows));
  sqlite3_bind_int64(rows.s, 1, static_cast<std::int64_t>(info.snapshot_version));
  std::uint64_t expected = info.snapshot_version + 1;
  int rc;
  while ((rc = sqlite3_step(rows.s)) == SQLITE_ROW) {
    const auto version = static_cast<std::uint64_t>(sqlite3_column_int64(rows.s, 0));
    if (version != expected) {
      return absl::DataLossError(absl::StrCat("journal '", path, "' has a gap: after version ",
                                              expected - 1, " comes version ", version));
    }
    const std::string process = column_text(rows.s, 2);
    const std::string writes = column_text(rows.s, 3);
    const std::string messages = column_text(rows.s, 4);
    if (record_checksum(static_cast<std::int64_t>(version), sqlite3_column_int64(rows.s, 1),
                        process, writes, messages) != sqlite3_column_int64(rows.s, 5)) {
      return absl::DataLossError(absl::StrCat("journal '", path, "': the record of version ",
                                              version, " fails its checksum"));
    }
    POP_RETURN_IF_ERROR(replay(root, writes, version, path));
    ++info.records;
    ++expected;
  }
  if (rc != SQLITE_DONE) return sql_error(db, rc, path, "reading its records");
  info.last_version = expected - 1;
  return absl::OkStatus();
}

absl::Status set_meta(sqlite3* db, const std::string& path, const char* key,
                      const std::string& value) {
  statement s;
  POP_RETURN_IF_ERROR(
      prepare(db, path, "INSERT OR REPLACE INTO pop_meta(key, value) VALUES (?, ?)", s));
  sqlite3_bind_text(s.s, 1, key, -1, SQLITE_STATIC);
  sqlite3_bind_text(s.s, 2, value.c_str(), static_cast<int>(value.size()), SQLITE_TRANSIENT);
  const int rc = sqlite3_step(s.s);
  if (rc != SQLITE_DONE) return sql_error(db, rc, path, absl::StrCat("writing metadata ", key));
  return absl::OkStatus();
}

absl::Status insert_snapshot(sqlite3* db, const std::string& path, std::uint64_t version,
                             const std::string& state) {
  const std::int64_t at = now_us();
  statement s;
  POP_RETURN_IF_ERROR(
      prepare(db, path,
              "INSERT OR REPLACE INTO pop_snapshots(version, at_us, state, checksum) "
              "VALUES (?, ?, ?, ?)",
              s));
  sqlite3_bind_int64(s.s, 1, static_cast<std::int64_t>(version));
  sqlite3_bind_int64(s.s, 2, at);
  sqlite3_bind_text(s.s, 3, state.data(), static_cast<int>(state.size()), SQLITE_STATIC);
  sqlite3_bind_int64(s.s, 4, snapshot_checksum(static_cast<std::int64_t>(version), at, state));
  const int rc = sqlite3_step(s.s);
  if (rc != SQLITE_DONE) return sql_error(db, rc, path, "writing a snapshot");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<journal>> journal::open(const std::string& path, durability level,
                                                       const journal_options& opts,
                                                       const std::string& outbox_path,
                                                       const json& initial_state,
                                                       journal_start& start) {
  // The advisory lock first, so no other engine changes the file while it is checked.
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("journal '", path, "': cannot open it: ", std::strerror(errno)));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    return absl::FailedPreconditionError(
        absl::StrCat("journal '", path, "' is already open in another engine"));
  }
  const auto fail = [&](absl::Status s) {
    ::close(fd);
    return s;
  };
  journal_info info;
  bool existing = false;
  if (file_size(path) > 0 && !file_exists(path + "-wal")) {
    if (absl::Status s = precheck_without_wal(path, info, existing); !s.ok()) return fail(s);
  }
  connection c;
  int rc =
      sqlite3_open_v2(path.c_str(), &c.db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr);
  if (rc != SQLITE_OK) return fail(sql_error(c.db, rc, path, "opening it"));
  // Until the journal is known to be sound, closing must not checkpoint into the main file.
  sqlite3_db_config(c.db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, nullptr);
  sqlite3_busy_timeout(c.db, 5000);
  if (file_size(path) > 0) {
    // Through the log, if there is one: the metadata as last committed.
    if (absl::Status s = read_meta(c.db, path, info, existing); !s.ok()) return fail(s);
    if (!existing) {
      if (absl::Status s = check_foreign(c.db, path); !s.ok()) return fail(s);
    }
  }
  node_ptr root;
  if (existing) {
    if (info.outbox_path != outbox_path) {
      return fail(absl::FailedPreconditionError(absl::StrCat(
          "journal '", path, "' keeps its outbox at '", info.outbox_path,
          "', but options.outbox_path is '", outbox_path, "'; open it with the same outbox path")));
    }
    if (absl::Status s = load(c.db, path, info, root); !s.ok()) return fail(s);
  } else {
    if (absl::Status s = exec(c.db, path, "PRAGMA journal_mode=WAL"); !s.ok()) return fail(s);
    // Schema, metadata and the first snapshot in one transaction: a crash while creating the
    // journal leaves either all of it or none (then it is created again), never a half journal.
    if (absl::Status s = exec(c.db, path, "BEGIN IMMEDIATE"); !s.ok()) return fail(s);
    absl::Status s = exec(c.db, path, schema);
    if (s.ok()) {
      s = set_meta(c.db, path, "format_version", std::to_string(journal_format_version));
    }
    if (s.ok()) s = set_meta(c.db, path, "outbox_path", outbox_path);
    if (s.ok()) s = set_meta(c.db, path, "created_at_us", std::to_string(now_us()));
    if (s.ok()) s = insert_snapshot(c.db, path, 0, initial_state.dump());
    if (s.ok()) s = exec(c.db, path, "COMMIT");
    if (!s.ok()) {
      static_cast<void>(exec(c.db, path, "ROLLBACK"));
      return fail(s);
    }
    root = make_root(initial_state);
  }
  if (absl::Status s = exec(c.db, path, "PRAGMA journal_mode=WAL"); !s.ok()) return fail(s);
  if (absl::Status s = exec(
          c.db, path,
          level == durability::power ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL");
      !s.ok()) {
    return fail(s);
  }
  // Mark the journal in use, in the main file itself, so a lost write-ahead log is noticed.
  if (absl::Status s = set_meta(c.db, path, "clean", "0"); !s.ok()) return fail(s);
  if (absl::Status s = exec(c.db, path, "PRAGMA wal_checkpoint(FULL)"); !s.ok()) return fail(s);
  sqlite3_db_config(c.db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 0, nullptr);
  const int head_fd = ::open(head_path(path).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (head_fd < 0) {
    return fail(
        absl::UnavailableError(absl::StrCat("journal '", path, "': cannot open its head file '",
                                            head_path(path), "': ", std::strerror(errno))));
  }
  if (absl::Status s = write_head(head_fd, path, info.last_version); !s.ok()) {
    ::close(head_fd);
    return fail(s);
  }
  start.version = info.last_version;
  start.root = std::move(root);
  std::unique_ptr<journal> j(new journal(path, level, opts, fd, head_fd, c.release(),
                                         info.last_version, info.snapshot_version));
  if (int prc = sqlite3_prepare_v2(j->db_,
                                   "INSERT INTO pop_commits(version, at_us, process, writes, "
                                   "messages, checksum) VALUES (?, ?, ?, ?, ?, ?)",
                                   -1, &j->insert_, nullptr);
      prc != SQLITE_OK) {
    return sql_error(j->db_, prc, path, "preparing the record insert");
  }
  j->writer_ = std::thread([raw = j.get()] { raw->run_writer(); });
  return j;
}

journal::journal(std::string path, durability level, const journal_options& opts, int lock_fd,
                 int head_fd, sqlite3* db, std::uint64_t version, std::uint64_t snapshot_version)
    : path_(std::move(path)),
      level_(level),
      options_(opts),
      lock_fd_(lock_fd),
      head_fd_(head_fd),
      db_(db),
      snapshot_version_(snapshot_version),
      durable_(version) {}

journal::~journal() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  if (writer_.joinable()) writer_.join();
  close_cleanly();
  if (insert_) sqlite3_finalize(insert_);
  sqlite3_close_v2(db_);
  ::close(head_fd_);
  ::close(lock_fd_);
}

void journal::close_cleanly() {
  std::lock_guard lock(mu_);
  if (!failed_.ok() || !queue_.empty()) return;  // leave it marked in use: reopening checks it
  if (set_meta(db_, path_, "clean", "1").ok()) {
    static_cast<void>(exec(db_, path_, "PRAGMA wal_checkpoint(TRUNCATE)"));
  }
}

std::shared_ptr<journal_record> journal::reserve(std::uint64_t version,
                                                 std::shared_ptr<const version_state> state) {
  auto r = std::make_shared<journal_record>();
  r->version = version;
  r->state = std::move(state);
  std::lock_guard lock(mu_);
  queue_.push_back(r);
  return r;
}

void journal::fill(const std::shared_ptr<journal_record>& r) {
  {
    std::lock_guard lock(mu_);
    r->filled = true;
  }
  work_cv_.notify_one();
}

void journal::fail(const std::shared_ptr<journal_record>& r, absl::Status why) {
  {
    std::lock_guard lock(mu_);
    r->error = std::move(why);
    r->filled = true;
  }
  work_cv_.notify_one();
}

absl::Status journal::wait_durable(std::uint64_t version) {
  std::unique_lock lock(mu_);
  done_cv_.wait(lock, [&] { return durable_ >= version || !failed_.ok(); });
  if (durable_ >= version) return absl::OkStatus();
  return failed_;
}

std::uint64_t journal::durable_version() const {
  std::lock_guard lock(mu_);
  return durable_;
}

absl::Status journal::failure() const {
  std::lock_guard lock(mu_);
  return failed_;
}

void journal::run_writer() {
  std::deque<std::shared_ptr<journal_record>> group;
  for (;;) {
    {
      std::unique_lock lock(mu_);
      work_cv_.wait(lock, [&] { return stop_ || (!queue_.empty() && queue_.front()->filled); });
      while (!queue_.empty() && queue_.front()->filled && queue_.front()->error.ok() &&
             group.size() < options_.max_group) {
        group.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      if (group.empty() && !queue_.empty() && queue_.front()->filled) {
        failed_ = annotate(queue_.front()->error,
                           absl::StrCat("the journal failed after version ", durable_,
                                        "; the engine refuses further commits"));
        lock.unlock();
        done_cv_.notify_all();
        return;
      }
      if (group.empty()) {
        if (stop_) return;
        continue;
      }
    }
    absl::Status s = write_group(group);
    const std::uint64_t last = group.back()->version;
    if (s.ok()) s = write_head(head_fd_, path_, last);
    if (s.ok()) {
      {
        std::lock_guard lock(mu_);
        durable_ = last;
      }
      done_cv_.notify_all();
      // Snapshots are written after the group's committers were released.
      if (last - snapshot_version_ >= options_.snapshot_every ||
          bytes_since_snapshot_ >= options_.snapshot_bytes) {
        s = write_snapshot(*group.back());
      }
    }
    if (!s.ok()) {
      {
        std::lock_guard lock(mu_);
        failed_ = annotate(s, absl::StrCat("the journal failed after version ", durable_,
                                           "; the engine refuses further commits"));
      }
      done_cv_.notify_all();
      return;
    }
    group.clear();
  }
}

absl::Status journal::write_group(std::deque<std::shared_ptr<journal_record>>& group) {
  POP_RETURN_IF_ERROR(exec(db_, path_, "BEGIN IMMEDIATE"));
  for (const std::shared_ptr<journal_record>& r : group) {
    const auto v = static_cast<std::int64_t>(r->version);
    sqlite3_reset(insert_);
    sqlite3_bind_int64(insert_, 1, v);
    sqlite3_bind_int64(insert_, 2, r->at_us);
    sqlite3_bind_text(insert_, 3, r->process.data(), static_cast<int>(r->process.size()),
                      SQLITE_STATIC);
    sqlite3_bind_text(insert_, 4, r->writes.data(), static_cast<int>(r->writes.size()),
                      SQLITE_STATIC);
    sqlite3_bind_text(insert_, 5, r->messages.data(), static_cast<int>(r->messages.size()),
                      SQLITE_STATIC);
    sqlite3_bind_int64(insert_, 6,
                       record_checksum(v, r->at_us, r->process, r->writes, r->messages));
    const int rc = sqlite3_step(insert_);
    if (rc != SQLITE_DONE) {
      absl::Status s = sql_error(db_, rc, path_, absl::StrCat("writing version ", r->version));
      static_cast<void>(exec(db_, path_, "ROLLBACK"));
      return s;
    }
    bytes_since_snapshot_ += r->writes.size() + r->messages.size() + r->process.size() + 32;
  }
  sqlite3_reset(insert_);
  if (absl::Status s = exec(db_, path_, "COMMIT"); !s.ok()) {
    static_cast<void>(exec(db_, path_, "ROLLBACK"));
    return s;
  }
  // Older states are no longer needed once written (except the last one, for a snapshot).
  for (std::size_t i = 0; i + 1 < group.size(); ++i) group[i]->state.reset();
  return absl::OkStatus();
}

absl::Status journal::write_snapshot(const journal_record& last) {
  std::string state;
  try {
    state = materialise({last.state->root.get(), nullptr}).dump();
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("cannot encode the snapshot of version ", last.version, ": ", e.what()));
  }
  POP_RETURN_IF_ERROR(exec(db_, path_, "BEGIN IMMEDIATE"));
  absl::Status s = insert_snapshot(db_, path_, last.version, state);
  if (s.ok()) {
    statement prune;
    s = prepare(db_, path_, "DELETE FROM pop_commits WHERE version <= ?", prune);
    if (s.ok()) {
      sqlite3_bind_int64(prune.s, 1, static_cast<std::int64_t>(last.version));
      if (const int rc = sqlite3_step(prune.s); rc != SQLITE_DONE) {
        s = sql_error(db_, rc, path_, "pruning records");
      }
    }
  }
  if (s.ok()) {
    statement old;
    s = prepare(db_, path_, "DELETE FROM pop_snapshots WHERE version < ?", old);
    if (s.ok()) {
      sqlite3_bind_int64(old.s, 1, static_cast<std::int64_t>(last.version));
      if (const int rc = sqlite3_step(old.s); rc != SQLITE_DONE) {
        s = sql_error(db_, rc, path_, "pruning snapshots");
      }
    }
  }
  if (s.ok()) s = exec(db_, path_, "COMMIT");
  if (!s.ok()) {
    static_cast<void>(exec(db_, path_, "ROLLBACK"));
    return s;
  }
  snapshot_version_ = last.version;
  bytes_since_snapshot_ = 0;
  return absl::OkStatus();
}

}  // namespace detail

absl::StatusOr<journal_info> verify_journal(const std::string& path) {
  if (!detail::file_exists(path)) {
    return absl::NotFoundError(absl::StrCat("journal '", path, "' does not exist"));
  }
  journal_info info;
  bool found = false;
  const bool has_wal = detail::file_exists(path + "-wal");
  if (!has_wal) POP_RETURN_IF_ERROR(detail::precheck_without_wal(path, info, found));
  detail::connection c;
  const std::string uri =
      absl::StrCat("file:", detail::uri_escape(path), has_wal ? "?mode=ro" : "?immutable=1");
  const int rc =
      sqlite3_open_v2(uri.c_str(), &c.db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, nullptr);
  if (rc != SQLITE_OK) return detail::sql_error(c.db, rc, path, "opening it to verify it");
  POP_RETURN_IF_ERROR(detail::read_meta(c.db, path, info, found));
  if (!found) {
    return absl::DataLossError(absl::StrCat("'", path, "' is not a pop journal (no metadata)"));
  }
  detail::node_ptr root;
  POP_RETURN_IF_ERROR(detail::load(c.db, path, info, root));
  return info;
}

absl::StatusOr<std::vector<journal_record_info>> read_journal(const std::string& path,
                                                              std::uint64_t from_version,
                                                              std::size_t limit) {
  if (!detail::file_exists(path)) {
    return absl::NotFoundError(absl::StrCat("journal '", path, "' does not exist"));
  }
  detail::connection c;
  const bool has_wal = detail::file_exists(path + "-wal");
  const std::string uri =
      absl::StrCat("file:", detail::uri_escape(path), has_wal ? "?mode=ro" : "?immutable=1");
  const int rc =
      sqlite3_open_v2(uri.c_str(), &c.db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, nullptr);
  if (rc != SQLITE_OK) return detail::sql_error(c.db, rc, path, "opening it to read it");
  journal_info info;
  bool found = false;
  POP_RETURN_IF_ERROR(detail::read_meta(c.db, path, info, found));
  if (!found) {
    return absl::DataLossError(absl::StrCat("'", path, "' is not a pop journal (no metadata)"));
  }
  detail::statement rows;
  POP_RETURN_IF_ERROR(
      detail::prepare(c.db, path,
                      "SELECT version, at_us, process, writes, messages, checksum "
                      "FROM pop_commits WHERE version >= ? ORDER BY version LIMIT ?",
                      rows));
  sqlite3_bind_int64(rows.s, 1, static_cast<std::int64_t>(from_version));
  sqlite3_bind_int64(rows.s, 2,
                     static_cast<std::int64_t>(std::min<std::size_t>(limit, 1ULL << 62)));
  std::vector<journal_record_info> out;
  int step;
  while ((step = sqlite3_step(rows.s)) == SQLITE_ROW) {
    journal_record_info r;
    r.version = static_cast<std::uint64_t>(sqlite3_column_int64(rows.s, 0));
    r.at_us = sqlite3_column_int64(rows.s, 1);
    r.process = detail::column_text(rows.s, 2);
    const std::string writes = detail::column_text(rows.s, 3);
    const std::string messages = detail::column_text(rows.s, 4);
    if (detail::record_checksum(static_cast<std::int64_t>(r.version), r.at_us, r.process, writes,
                                messages) != sqlite3_column_int64(rows.s, 5)) {
      return absl::DataLossError(absl::StrCat("journal '", path, "': the record of version ",
                                              r.version, " fails its checksum"));
    }
    const json w = json::parse(writes, nullptr, false);
    const json m = json::parse(messages, nullptr, false);
    if (!w.is_array() || !m.is_array()) {
      return absl::DataLossError(
          absl::StrCat("journal '", path, "': the record of version ", r.version, " is damaged"));
    }
    for (const json& one : w) {
      if (one.is_array() && !one.empty() && one[0].is_string()) r.writes.push_back(one[0]);
    }
    for (const json& id : m) {
      if (id.is_string()) r.message_ids.push_back(id);
    }
    out.push_back(std::move(r));
  }
  if (step != SQLITE_DONE) return detail::sql_error(c.db, step, path, "reading its records");
  return out;
}

}  // namespace pop
