#include "pop/engine/detail/journal_format.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"
#include "pop/engine/detail/message_record.hpp"
#include "pop/engine/detail/packed.hpp"

namespace pop {
namespace detail {
namespace {

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
  // The text 8 bytes at a time (little-endian words) by MurmurHash3's x64 body step, the last
  // 0-7 bytes by FNV-1a's: an eighth of format 1's steps (a record's text is most of a durable
  // commit's checksum time). A multiplication carries a word's bits only upward, so a step
  // that only xors and multiplies (FNV's on words) lets flips of top bits cancel out across
  // words: Murmur's rotations carry every bit into the low half before the next multiplication,
  // where a flip's effect depends on the data. mixed() ends with Murmur's finalizer.
  fnv64& add_words(std::string_view s) {
    std::size_t i = 0;
    for (; i + 8 <= s.size(); i += 8) {
      std::uint64_t k = 0;
      std::memcpy(&k, s.data() + i, 8);
      if constexpr (std::endian::native == std::endian::big) k = __builtin_bswap64(k);
      k *= 0x87c37b91114253d5ULL;
      k = std::rotl(k, 31);
      k *= 0x4cf5ad432745937fULL;
      h ^= k;
      h = std::rotl(h, 27) * 5 + 0x52dce729;
    }
    for (; i < s.size(); ++i) {
      h ^= static_cast<unsigned char>(s[i]);
      h *= 1099511628211ULL;
    }
    h ^= 0xff;  // field separator
    h *= 1099511628211ULL;
    return *this;
  }
  fnv64& add_words(std::int64_t v) { return add_words(std::to_string(v)); }
  std::int64_t value() const { return static_cast<std::int64_t>(h); }
  // value() through MurmurHash3's 64-bit finalizer (for add_words).
  std::int64_t mixed() const {
    std::uint64_t k = h;
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return static_cast<std::int64_t>(k);
  }
};

}  // namespace

std::int64_t record_checksum(std::int64_t version, std::int64_t at_us, std::string_view process,
                             std::string_view writes, std::string_view messages) {
  return fnv64()
      .add_words(version)
      .add_words(at_us)
      .add_words(process)
      .add_words(writes)
      .add_words(messages)
      .mixed();
}

std::int64_t record_checksum_v1(std::int64_t version, std::int64_t at_us, std::string_view process,
                                std::string_view writes, std::string_view messages) {
  return fnv64().add(version).add(at_us).add(process).add(writes).add(messages).value();
}

bool record_checksum_matches(std::int64_t stored, std::int64_t version, std::int64_t at_us,
                             std::string_view process, std::string_view writes,
                             std::string_view messages) {
  return record_checksum(version, at_us, process, writes, messages) == stored ||
         record_checksum_v1(version, at_us, process, writes, messages) == stored;
}

std::int64_t bytes_checksum(std::string_view bytes) {
  return fnv64().add(bytes).value();
}

std::int64_t snapshot_checksum(std::int64_t version, std::int64_t at_us, std::string_view state) {
  return fnv64().add(version).add(at_us).add(state).value();
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

std::string head_path(const std::string& path) {
  return path + "-head";
}

std::string log_path(const std::string& path) {
  return path + "-log";
}

std::vector<const commit_log::entry*> log_continuation(const commit_log::contents& log,
                                                       std::uint64_t after, std::uint64_t until) {
  std::vector<const commit_log::entry*> newer;
  for (const commit_log::entry& e : log.entries) {
    if (e.version > after && e.version <= until) newer.push_back(&e);
  }
  std::sort(newer.begin(), newer.end(), [](const commit_log::entry* a, const commit_log::entry* b) {
    return a->version < b->version;
  });
  std::vector<const commit_log::entry*> out;
  for (const commit_log::entry* e : newer) {
    const std::uint64_t expected = after + 1 + out.size();
    if (e->version < expected) continue;  // (a repeated version: never written so, but harmless)
    if (e->version != expected) break;
    out.push_back(e);
  }
  return out;
}

absl::Status check_log(sqlite3* db, const std::string& path, const journal_info& info,
                       commit_log::contents& log, std::uint32_t& known, bool reread) {
  POP_ASSIGN_OR_RETURN(const std::optional<std::string> value,
                       read_meta_value(db, path, "log_epoch"));
  known = value ? static_cast<std::uint32_t>(std::strtoul(value->c_str(), nullptr, 10)) : 0;
  const auto own = [&] { return known != 0 && (log.epoch == known || log.epoch == known + 1); };
  if (reread && !own() && known != 0) {
    // An engine opening the journal meanwhile may have put a new log in place (after moving the
    // old one's records into the database this reads): read it again.
    POP_ASSIGN_OR_RETURN(log, commit_log::read(log_path(path)));
  }
  // A journal closed cleanly had its log drained into the database: whatever the log holds is
  // there already (or, written by an older pop that knew no log, not this history's).
  if (own() && !info.clean) {
    if (log.damaged_at) {
      return absl::DataLossError(
          absl::StrCat("journal '", path, "': its commit log '", log_path(path),
                       "' is damaged at offset ", *log.damaged_at,
                       " of its ring, with acknowledged commits after it (a crash tears only "
                       "the last record); nothing was changed"));
    }
    return absl::OkStatus();
  }
  log.entries.clear();
  log.damaged_at.reset();
  if (known != 0 && !info.clean && file_size(log_path(path)) != 0) {
    return absl::DataLossError(absl::StrCat(
        "journal '", path, "' was not closed cleanly and its commit log '", log_path(path),
        "' is missing or not its own (epoch ", log.epoch, ", expected ", known,
        "): the commits it acknowledged last may be lost; restore the file (nothing was "
        "changed), or create it empty to accept the journal as it is"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<std::string>> read_meta_value(sqlite3* db, const std::string& path,
                                                           const char* key) {
  statement s;
  POP_RETURN_IF_ERROR(prepare(db, path, "SELECT value FROM pop_meta WHERE key = ?", s));
  sqlite3_bind_text(s.s, 1, key, -1, SQLITE_STATIC);
  const int rc = sqlite3_step(s.s);
  if (rc == SQLITE_DONE) return std::nullopt;
  if (rc != SQLITE_ROW) return sql_error(db, rc, path, absl::StrCat("reading metadata ", key));
  return column_text(s.s, 0);
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
absl::Status load(sqlite3* db, const std::string& path, journal_info& info, node_ptr& root,
                  std::uint64_t until) {
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
    root = make_root(parsed);
  }
  statement rows;
  POP_RETURN_IF_ERROR(prepare(db, path,
                              "SELECT version, at_us, process, writes, messages, checksum FROM "
                              "pop_commits WHERE version > ? AND version <= ? ORDER BY version",
                              rows));
  sqlite3_bind_int64(rows.s, 1, static_cast<std::int64_t>(info.snapshot_version));
  sqlite3_bind_int64(rows.s, 2,
                     static_cast<std::int64_t>(std::min<std::uint64_t>(until, INT64_MAX)));
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
    if (!record_checksum_matches(sqlite3_column_int64(rows.s, 5),
                                 static_cast<std::int64_t>(version),
                                 sqlite3_column_int64(rows.s, 1), process, writes, messages)) {
      return absl::DataLossError(absl::StrCat("journal '", path, "': the record of version ",
                                              version, " fails its checksum"));
    }
    POP_RETURN_IF_ERROR(replay(root, writes, version, path));
    ++info.records;
    info.record_bytes += record_text_bytes(process.size(), writes.size(), messages.size());
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
                             const std::string& state, std::int64_t at) {
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

absl::Status write_snapshot(sqlite3* db, const std::string& path, std::uint64_t version,
                            const std::string& state, std::int64_t at) {
  POP_RETURN_IF_ERROR(exec(db, path, "BEGIN IMMEDIATE"));
  absl::Status s = insert_snapshot(db, path, version, state, at);
  for (const auto& [sql, what] :
       {std::pair{"DELETE FROM pop_commits WHERE version <= ?", "pruning records"},
        std::pair{"DELETE FROM pop_snapshots WHERE version < ?", "pruning snapshots"}}) {
    if (!s.ok()) break;
    statement prune;
    s = prepare(db, path, sql, prune);
    if (!s.ok()) break;
    sqlite3_bind_int64(prune.s, 1, static_cast<std::int64_t>(version));
    if (const int rc = sqlite3_step(prune.s); rc != SQLITE_DONE) s = sql_error(db, rc, path, what);
  }
  if (s.ok()) s = exec(db, path, "COMMIT");
  if (!s.ok()) static_cast<void>(exec(db, path, "ROLLBACK"));
  return s;
}

// record_encoder: JSON text written as it goes, byte for byte what json::dump() would write.

namespace {

// Appends a message's headers as a JSON object (names in order, as std::map keeps them).
void append_headers(std::string& out, const std::map<std::string, std::string>& headers) {
  out += '{';
  bool first = true;
  for (const auto& [name, value] : headers) {
    if (!first) out += ',';
    first = false;
    append_json_string(out, name);
    out += ':';
    append_json_string(out, value);
  }
  out += '}';
}

}  // namespace

record_encoder::record_encoder() {
  text_.reserve(384);  // a small commit's record, without growing it step by step
}

void record_encoder::reset() {
  text_.assign("[");
  text_.reserve(384);
}

void record_encoder::set(std::string_view path, const json& value) {
  open(path);
  text_ += ',';
  append_json(text_, value);
  text_ += ']';
}

void record_encoder::set_stored(std::string_view path, const location& at) {
  open(path);
  text_ += ',';
  value(at);
  text_ += ']';
}

void record_encoder::set_packed(std::string_view path, const char* packed) {
  open(path);
  text_ += ',';
  packed_value(packed);
  text_ += ']';
}

void record_encoder::packed_value(const char* packed) {
  packed::write_json(
      packed, text_, [&](double d) { append_json(text_, json(d)); },
      [&](std::string_view s) { append_json_string(text_, s); });
}

void record_encoder::set_message(std::string_view path, const outbox_message& m) {
  open(path);
  text_ += ',';
  message(m);
  text_ += ']';
}

void record_encoder::message(const outbox_message& m) {
  // outbox_message::to_json()'s members, in its (alphabetical) order.
  text_ += "{\"attempts\":";
  append_integer(text_, m.attempts);
  text_ += ",\"created_at_us\":";
  append_integer(text_, m.created_at_us);
  text_ += ",\"failures\":";
  if (m.failures.empty()) {
    text_ += "[]";
  } else {
    append_json(text_, json(m.failures));
  }
  text_ += ",\"headers\":";
  append_headers(text_, m.headers);
  text_ += ",\"id\":";
  append_json_string(text_, m.id);
  text_ += ",\"key\":";
  append_json_string(text_, m.key);
  text_ += ",\"last_error\":";
  append_json_string(text_, m.last_error);
  text_ += ",\"next_attempt_at_us\":";
  append_integer(text_, m.next_attempt_at_us);
  text_ += ",\"payload\":";
  append_json(text_, m.payload);
  text_ += ",\"topic\":";
  append_json_string(text_, m.topic);
  text_ += ",\"version\":";
  append_integer(text_, m.version);
  text_ += '}';
}

void record_encoder::set_message_record(std::string_view path, const char* record) {
  open(path);
  text_ += ',';
  message_record(record);
  text_ += ']';
}

void record_encoder::message_record(const char* record) {
  const record_fields f = fields_of(record);
  // outbox_message::to_json()'s members, in its (alphabetical) order, as set_message writes them.
  const std::pair<const char*, const char*> members[] = {
      {"{\"attempts\":", f.attempts},
      {",\"created_at_us\":", f.created_at_us},
      {",\"failures\":", f.failures},
      {",\"headers\":", f.headers},
      {",\"id\":", f.id},
      {",\"key\":", f.key},
      {",\"last_error\":", f.last_error},
      {",\"next_attempt_at_us\":", f.next_attempt_at_us},
      {",\"payload\":", f.payload},
      {",\"topic\":", f.topic},
      {",\"version\":", f.version}};
  for (const auto& [name, at] : members) {
    text_ += name;
    const std::optional<std::int64_t> index =
        at == f.id ? packed::integer_at(at) : std::optional<std::int64_t>();
    if (index) {  // an id kept as its index in its commit
      const auto version = packed::decode(f.version).get<std::uint64_t>();
      append_json_string(text_, make_message_id(version, static_cast<std::uint32_t>(*index)));
    } else {
      packed_value(at);
    }
  }
  text_ += '}';
}

void record_encoder::value(const location& at) {
  if (const char* p = at.packed_value()) {
    packed_value(p);
  } else if (at.inner) {
    append_json(text_, *at.inner);
  } else if (at.node->is_message()) {
    if (const char* record = at.node->message_record()) {
      message_record(record);
    } else {
      message(*at.node->message());
    }
  } else if (!at.node->is_map()) {
    append_json(text_, at.node->as_json());
  } else {
    // A member map's keys come in order, as std::map (nlohmann's object) keeps them.
    text_ += '{';
    bool first = true;
    const pmap<node_ptr>& members = at.node->members();
    for (auto it = members.begin(); it != members.end(); ++it) {
      if (!first) text_ += ',';
      first = false;
      append_json_string(text_, it.key());
      text_ += ':';
      value({it.value().get(), nullptr});
    }
    text_ += '}';
  }
}

std::string record_encoder::value_text(const location& at) {
  record_encoder encoded;
  encoded.text_.clear();
  encoded.value(at);
  return std::move(encoded.text_);
}

void record_encoder::encode_draft(const message_draft& draft, draft_text& out) {
  // outbox_message::to_json()'s members, in its (alphabetical) order, as set_message writes them
  // for a message just appended: no attempts, failures or error yet, due at once.
  std::string& b = out.before_id;
  b.assign(",\"failures\":[],\"headers\":");
  append_headers(b, draft.headers);
  b += ",\"id\":";
  std::string& a = out.after_id;
  a.assign(",\"key\":");
  append_json_string(a, draft.key);
  a += ",\"last_error\":\"\",\"next_attempt_at_us\":0,\"payload\":";
  append_json(a, draft.payload);
  a += ",\"topic\":";
  append_json_string(a, draft.topic);
  a += ",\"version\":";
}

void record_encoder::set_draft(std::string_view outbox, std::string_view id, const draft_text& text,
                               std::int64_t created_at_us, std::uint64_t version) {
  text_ += text_.size() == 1 ? "[" : ",[";
  append_json_string(text_, outbox);
  text_.pop_back();  // (the closing quote: the id follows in the same string)
  text_ += '.';
  text_ += id;  // (an id is letters and digits: nothing to escape)
  text_ += "\",{\"attempts\":0,\"created_at_us\":";
  append_integer(text_, created_at_us);
  text_ += text.before_id;
  text_ += '"';
  text_ += id;
  text_ += '"';
  text_ += text.after_id;
  append_integer(text_, version);
  text_ += "}]";
}

std::string record_encoder::messages_text(const std::vector<std::string>& ids) {
  std::string text;
  messages_text_into(ids, text);
  return text;
}

void record_encoder::messages_text_into(const std::vector<std::string>& ids, std::string& out) {
  out.clear();
  out.reserve(2 + ids.size() * 32);
  out += '[';
  for (const std::string& id : ids) {
    if (out.size() > 1) out += ',';
    append_json_string(out, id);
  }
  out += ']';
}

void append_json(std::string& out, const json& value) {
  switch (value.type()) {
    case json::value_t::null:
      out += "null";
      return;
    case json::value_t::boolean:
      out += value.get<bool>() ? "true" : "false";
      return;
    case json::value_t::number_integer:
      append_integer(out, value.get<std::int64_t>());
      return;
    case json::value_t::number_unsigned:
      append_integer(out, value.get<std::uint64_t>());
      return;
    case json::value_t::number_float: {
      // As nlohmann's serializer writes a double: "null" if not finite, else Grisu2's shortest
      // form that reads back the same, from the same function into a buffer of the same size.
      const double d = value.get<double>();
      if (!std::isfinite(d)) {
        out += "null";
        return;
      }
      std::array<char, 64> digits{};
      const char* end = nlohmann::detail::to_chars(digits.data(), digits.data() + digits.size(), d);
      out.append(digits.data(), static_cast<std::size_t>(end - digits.data()));
      return;
    }
    case json::value_t::string:
      append_json_string(out, value.get_ref<const std::string&>());
      return;
    case json::value_t::array: {
      out += '[';
      bool first = true;
      for (const json& element : value.get_ref<const json::array_t&>()) {
        if (!first) out += ',';
        first = false;
        append_json(out, element);
      }
      out += ']';
      return;
    }
    case json::value_t::object: {
      out += '{';
      bool first = true;
      for (const auto& [key, member] : value.get_ref<const json::object_t&>()) {
        if (!first) out += ',';
        first = false;
        append_json_string(out, key);
        out += ':';
        append_json(out, member);
      }
      out += '}';
      return;
    }
    default:  // binary (never stored) and discarded
      nlohmann::detail::serializer<json>(nlohmann::detail::output_adapter<char>(out), ' ',
                                         json::error_handler_t::strict)
          .dump(value, false, false, 0);
  }
}

void append_json_string(std::string& out, std::string_view text) {
  // Bytes written as they are: printable ASCII but '"' and '\\'.
  static constexpr auto plain = [] {
    std::array<bool, 256> t{};
    for (int c = 0x20; c < 0x80; ++c) t[static_cast<std::size_t>(c)] = c != '"' && c != '\\';
    return t;
  }();
  const std::size_t start = out.size();
  out += '"';
  std::size_t run = 0;  // where the plain bytes not yet appended begin
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (plain[c]) continue;
    out.append(text.data() + run, i - run);
    run = i + 1;
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c >= 0x80) {
          // Text with bytes beyond ASCII goes through nlohmann, which also checks that it is
          // UTF-8 (rare in paths, ids and keys).
          out.resize(start);
          out += json(std::string(text)).dump();
          return;
        }
        static constexpr char hex[] = "0123456789abcdef";
        out += "\\u00";
        out += hex[(c >> 4) & 0xF];
        out += hex[c & 0xF];
    }
  }
  out.append(text.data() + run, text.size() - run);
  out += '"';
}

}  // namespace detail

namespace detail {

absl::Status open_read_only(const std::string& path, connection& c, journal_info& info) {
  if (!file_exists(path)) {
    return absl::NotFoundError(absl::StrCat("journal '", path, "' does not exist"));
  }
  bool found = false;
  const bool has_wal = file_exists(path + "-wal");
  if (!has_wal && file_size(path) > 0) {
    POP_RETURN_IF_ERROR(precheck_without_wal(path, info, found));
  }
  const std::string uri =
      absl::StrCat("file:", uri_escape(path), has_wal ? "?mode=ro" : "?immutable=1");
  const int rc =
      sqlite3_open_v2(uri.c_str(), &c.db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, nullptr);
  if (rc != SQLITE_OK) return sql_error(c.db, rc, path, "opening it read-only");
  sqlite3_busy_timeout(c.db, 5000);
  POP_RETURN_IF_ERROR(read_meta(c.db, path, info, found));
  if (!found) {
    POP_RETURN_IF_ERROR(check_foreign(c.db, path));
    return absl::FailedPreconditionError(
        absl::StrCat("'", path, "' is not a pop journal (it has no pop metadata)"));
  }
  return absl::OkStatus();
}

absl::Status load_read_only(sqlite3* db, const std::string& path, journal_info& info,
                            node_ptr& root, std::uint64_t until, std::uint64_t* newest) {
  // The commit log first (see check_log), then one read transaction: an engine writing a
  // snapshot (and pruning the records before it) while this reads must not make the records look
  // like they have a gap.
  POP_ASSIGN_OR_RETURN(commit_log::contents log, commit_log::read(log_path(path)));
  POP_RETURN_IF_ERROR(exec(db, path, "BEGIN"));
  absl::Status s = absl::OkStatus();
  if (newest) {
    absl::StatusOr<std::uint64_t> n = newest_version(db, path);
    if (n.ok()) {
      *newest = *n;
    } else {
      s = n.status();
    }
  }
  if (s.ok()) s = load(db, path, info, root, until);
  if (s.ok()) {
    // The commits acknowledged from the commit log and not yet in SQLite (an engine running, or
    // one that crashed and was not opened since).
    std::uint32_t known = 0;
    s = check_log(db, path, info, log, known, /*reread=*/true);
    if (s.ok()) {
      for (const commit_log::entry* e : log_continuation(log, info.last_version, until)) {
        s = replay(root, e->writes, e->version, path);
        if (!s.ok()) break;
        info.last_version = e->version;
        ++info.records;
        info.record_bytes +=
            record_text_bytes(e->process.size(), e->writes.size(), e->messages.size());
      }
    }
    if (s.ok() && newest) {
      const std::vector<const commit_log::entry*> after = log_continuation(log, *newest);
      if (!after.empty()) *newest = after.back()->version;
    }
  }
  static_cast<void>(exec(db, path, "COMMIT"));
  return s;
}

}  // namespace detail

absl::StatusOr<journal_info> verify_journal(const std::string& path) {
  journal_info info;
  detail::connection c;
  POP_RETURN_IF_ERROR(detail::open_read_only(path, c, info));
  detail::node_ptr root;
  POP_RETURN_IF_ERROR(detail::load_read_only(c.db, path, info, root));
  return info;
}

absl::StatusOr<journal_state> read_journal_state(const std::string& path,
                                                 std::optional<std::uint64_t> at) {
  journal_state out;
  detail::connection c;
  POP_RETURN_IF_ERROR(detail::open_read_only(path, c, out.info));
  detail::node_ptr root;
  std::uint64_t newest = 0;
  POP_RETURN_IF_ERROR(detail::load_read_only(
      c.db, path, out.info, root, at.value_or(std::numeric_limits<std::uint64_t>::max()), &newest));
  if (at && (*at < out.info.snapshot_version || *at > newest)) {
    return absl::NotFoundError(absl::StrCat(
        "journal '", path, "' does not retain version ", *at, ": it holds versions ",
        out.info.snapshot_version, " to ", newest,
        *at < out.info.snapshot_version ? " (older ones were folded into its snapshot)" : ""));
  }
  out.version = out.info.last_version;  // the newest version loaded: `at` if given
  out.state = detail::materialise({root.get(), nullptr});
  out.info.last_version = newest;
  return out;
}

absl::StatusOr<std::map<std::string, std::map<std::string, json>, std::less<>>>
read_journal_descriptions(const std::string& path) {
  journal_info info;
  detail::connection c;
  POP_RETURN_IF_ERROR(detail::open_read_only(path, c, info));
  detail::statement s;
  POP_RETURN_IF_ERROR(detail::prepare(
      c.db, path, "SELECT key, value FROM pop_meta WHERE instr(key, '/') > 0 ORDER BY key", s));
  std::map<std::string, std::map<std::string, json>, std::less<>> out;
  int rc;
  while ((rc = sqlite3_step(s.s)) == SQLITE_ROW) {
    const std::string key = detail::column_text(s.s, 0);
    const std::size_t slash = key.find('/');
    json value = json::parse(detail::column_text(s.s, 1), nullptr, false);
    if (value.is_discarded()) {
      return absl::DataLossError(
          absl::StrCat("journal '", path, "': the description '", key, "' is not JSON"));
    }
    out[key.substr(0, slash)][key.substr(slash + 1)] = std::move(value);
  }
  if (rc != SQLITE_DONE) return detail::sql_error(c.db, rc, path, "reading its descriptions");
  return out;
}

absl::StatusOr<std::vector<journal_record_info>> read_journal(const std::string& path,
                                                              std::uint64_t from_version,
                                                              std::size_t limit) {
  journal_info info;
  detail::connection c;
  POP_RETURN_IF_ERROR(detail::open_read_only(path, c, info));
  // The commit log first, then the database in one read transaction (see check_log): the records
  // it holds and those the log adds have no gap between them.
  POP_ASSIGN_OR_RETURN(detail::commit_log::contents log,
                       detail::commit_log::read(detail::log_path(path)));
  POP_RETURN_IF_ERROR(detail::exec(c.db, path, "BEGIN"));
  struct ending {
    sqlite3* db;
    const std::string& path;
    ~ending() { static_cast<void>(detail::exec(db, path, "COMMIT")); }
  } end_read{c.db, path};
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
  const auto add = [&](std::uint64_t version, std::int64_t at_us, std::string process,
                       const std::string& writes, const std::string& messages,
                       std::int64_t checksum) {
    journal_record_info r;
    r.version = version;
    r.at_us = at_us;
    r.process = std::move(process);
    if (!detail::record_checksum_matches(checksum, static_cast<std::int64_t>(r.version), r.at_us,
                                         r.process, writes, messages)) {
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
    return absl::OkStatus();
  };
  int step;
  while ((step = sqlite3_step(rows.s)) == SQLITE_ROW) {
    POP_RETURN_IF_ERROR(add(static_cast<std::uint64_t>(sqlite3_column_int64(rows.s, 0)),
                            sqlite3_column_int64(rows.s, 1), detail::column_text(rows.s, 2),
                            detail::column_text(rows.s, 3), detail::column_text(rows.s, 4),
                            sqlite3_column_int64(rows.s, 5)));
  }
  if (step != SQLITE_DONE) return detail::sql_error(c.db, step, path, "reading its records");
  if (out.size() < limit) {
    // Then the commits only the commit log holds yet (see load_read_only).
    POP_ASSIGN_OR_RETURN(const std::uint64_t newest, detail::newest_version(c.db, path));
    std::uint32_t known = 0;
    POP_RETURN_IF_ERROR(detail::check_log(c.db, path, info, log, known, /*reread=*/true));
    for (const detail::commit_log::entry* e : detail::log_continuation(log, newest)) {
      if (out.size() >= limit) break;
      if (e->version < from_version) continue;
      POP_RETURN_IF_ERROR(
          add(e->version, e->at_us, e->process, e->writes, e->messages, e->checksum));
    }
  }
  return out;
}

}  // namespace pop
