// Defines the journal's stored format: its schema, record and snapshot checksums, metadata, the
// head file, and loading (recovery) of a journal into a state tree.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/contracts/json.hpp"
#include "pop/contracts/outbox_message.hpp"
#include "pop/engine/detail/commit_log.hpp"
#include "pop/engine/detail/sqlite.hpp"
#include "pop/engine/detail/tree.hpp"
#include "pop/engine/journal.hpp"

namespace pop::detail {

// The tables of a journal (format 1).
inline constexpr const char* journal_schema = R"sql(
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

// The head file `<journal>-head` holds the newest durable version, rewritten after every group
// commit. It is the witness that tells a journal whose write-ahead log another SQLite client
// checkpointed into the main file and deleted (sound: the main file holds every acknowledged
// commit) from one whose log was lost after a crash (the main file lacks the last commits). It
// needs no sync: it only ever trails the log, and is read only when the log is absent.
inline constexpr std::size_t head_size = 38;  // "pop-journal-head " + 20 digits + '\n'

// Appends `text` as a JSON string, exactly as json(text).dump() writes it; throws json::type_error
// for text that is not UTF-8, as dump() does.
void append_json_string(std::string& out, std::string_view text);
// Appends `value` as JSON text, exactly as value.dump() writes it (throws as dump() does), without
// making a serializer (which allocates) for it.
void append_json(std::string& out, const json& value);

// Encodes a commit record's writes and message ids: the writes as JSON [[path, value] | [path]
// (a delete), ...], the ids as a JSON list. With replay() and read_journal(), the only code that
// knows the record's layout.
class record_encoder {
 public:
  record_encoder();
  record_encoder(const record_encoder&) = delete;
  record_encoder& operator=(const record_encoder&) = delete;
  // Starts a new record, keeping the text's buffer if it still has one (see writes_text).
  void reset();
  // The bytes its text's buffer holds.
  std::size_t capacity() const { return text_.capacity(); }
  // Appends a write of `value` at `path`; throws json::type_error for a value JSON text cannot
  // hold. The text is written straight into the record: no copy of the value is made.
  void set(std::string_view path, const json& value);
  // Appends a write at `path` of the packed value at `packed` (see packed.hpp): the same text as
  // set(path, packed::decode(packed)), without decoding it.
  void set_packed(std::string_view path, const char* packed);
  // Appends a write of message `m` at `path`: the same text as set(path, m.to_json()), without
  // building that JSON first.
  void set_message(std::string_view path, const outbox_message& m);
  // set_message(path, decode_message_record(record)), written from the message's compact record
  // (message_record.hpp) without decoding it.
  void set_message_record(std::string_view path, const char* record);
  // Appends a write at `path` of the value at `at` as it is stored: packed bytes, message records
  // and JSON written as they are, member maps member by member (see value_text).
  void set_stored(std::string_view path, const location& at);
  void erase(std::string_view path) {
    open(path);
    text_ += ']';
  }
  // What set_message() writes for a message a commit appends, encoded from its draft before the
  // commit gets its version: everything but its creation time, id and version.
  struct draft_text {
    std::string before_id;  // ,"failures":...,"id":
    std::string after_id;   // ,"key":...,"version":
  };
  // Encodes `draft` as its draft_text; throws json::type_error for a payload or string JSON text
  // cannot hold.
  static void encode_draft(const message_draft& draft, draft_text& out);
  // Appends the write at "<outbox>.<id>" of the message `text` was encoded from, as commit
  // `version` stores it, created at `created_at_us`: the text set_message() writes for it.
  void set_draft(std::string_view outbox, std::string_view id, const draft_text& text,
                 std::int64_t created_at_us, std::uint64_t version);
  // The JSON text of the value at `at` (which must exist): materialise(at).dump(), written from
  // the tree as it is stored (packed bytes and message records read in place) without building
  // that JSON. Throws json::type_error as dump() would.
  static std::string value_text(const location& at);
  // The writes as JSON text.
  std::string writes_text() && {
    text_ += ']';
    return std::move(text_);
  }
  // The same text into `out` (replacing what it held), keeping this encoder's buffer.
  void writes_text_into(std::string& out) const {
    out.reserve(text_.size() + 1);
    out.assign(text_);
    out += ']';
  }
  static std::string messages_text(const std::vector<std::string>& ids);
  // The same text into `out` (replacing what it held).
  static void messages_text_into(const std::vector<std::string>& ids, std::string& out);

 private:
  // Appends the value at `at` / message `m` / the message of `record` / packed value `packed`
  // as JSON.
  void value(const location& at);
  void packed_value(const char* packed);
  void message(const outbox_message& m);
  void message_record(const char* record);
  void open(std::string_view path) {
    text_ += text_.size() == 1 ? "[" : ",[";
    append_json_string(text_, path);
  }
  std::string text_ = "[";
};

// A commit's record encoded before the commit lock, from what does not depend on the version the
// commit gets: its writes (in `text`), then its messages' drafts. The commit appends its messages
// with set_draft once it has their ids.
struct precoded_record {
  record_encoder text;
  std::vector<record_encoder::draft_text> messages;
};

// The checksum of a pop_commits row (from journal format 2): its fields 8 bytes at a time by
// MurmurHash3's x64 step, their last 0-7 bytes and separators by FNV-1a 64's, then Murmur's
// finalizer.
std::int64_t record_checksum(std::int64_t version, std::int64_t at_us, std::string_view process,
                             std::string_view writes, std::string_view messages);
// The checksum format 1 gave a record: FNV-1a 64 over its fields byte by byte. A journal of
// format 1 opened by a format 2 build keeps its records' and takes new ones' in the new form.
std::int64_t record_checksum_v1(std::int64_t version, std::int64_t at_us, std::string_view process,
                                std::string_view writes, std::string_view messages);
// Whether `stored` is the record's checksum in either form. (A damaged record matches neither
// but by a chance of about 2^-63.)
bool record_checksum_matches(std::int64_t stored, std::int64_t version, std::int64_t at_us,
                             std::string_view process, std::string_view writes,
                             std::string_view messages);
// FNV-1a 64 of `bytes` (the check of a commit log record's head).
std::int64_t bytes_checksum(std::string_view bytes);
// The checksum of a pop_snapshots row: FNV-1a 64 over its fields.
std::int64_t snapshot_checksum(std::int64_t version, std::int64_t at_us, std::string_view state);
// Reads pop_meta into `info`; `found` is false if the table does not exist.
absl::Status read_meta(sqlite3* db, const std::string& path, journal_info& info, bool& found);
// The head file of journal `path`: "<path>-head".
std::string head_path(const std::string& path);
// The commit log of journal `path`: "<path>-log" (see commit_log.hpp).
std::string log_path(const std::string& path);
// The records of `log` that continue a database holding the versions up to `after`: versions
// after + 1, after + 2, ... (up to `until`) without a gap, oldest first. (Records past a gap were
// never acknowledged: the record before them was torn by a crash.)
std::vector<const commit_log::entry*> log_continuation(
    const commit_log::contents& log, std::uint64_t after,
    std::uint64_t until = std::numeric_limits<std::uint64_t>::max());
// Keeps `log` (the commit log of journal `path`, as commit_log::read() gave it) only if it is the
// log the journal open at `db` (with `info` read from it) last used and may hold commits the
// database lacks: its epoch is the journal's "log_epoch" or one above (a log made just before a
// crash kept the journal from recording it), and the journal was not closed cleanly (closing
// drains the log); else clears its entries. kDataLoss if the journal was not closed cleanly and
// its log is missing, another, or damaged (unless the file exists empty: the journal is then
// accepted as it is). `known` gets the journal's "log_epoch" (0: it has used no log). Read the
// log before the database: the writer frees log records only once the database holds them.
// `reread`: a reader alongside a possible engine; a log older than the database names is read
// again (an engine opening meanwhile replaces it).
absl::Status check_log(sqlite3* db, const std::string& path, const journal_info& info,
                       commit_log::contents& log, std::uint32_t& known, bool reread);
// The value of metadata `key`, or nullopt if it has none.
absl::StatusOr<std::optional<std::string>> read_meta_value(sqlite3* db, const std::string& path,
                                                           const char* key);
// The head file's content for `version` (head_size bytes).
std::string head_text(std::uint64_t version);
// The version the head file of `path` names, or nullopt if it is missing or unreadable.
std::optional<std::uint64_t> read_head(const std::string& path);
// The newest version the database holds (in a record or a snapshot), read through `db`.
absl::StatusOr<std::uint64_t> newest_version(sqlite3* db, const std::string& path);
// Records `version` as the newest durable one in the head file `fd`.
absl::Status write_head(int fd, const std::string& path, std::uint64_t version);
// Checks a journal whose write-ahead log is absent, reading only the main database file (which is
// then self-contained): its format is readable, and either it was closed cleanly, or it holds
// every version its head file says was acknowledged (another SQLite client checkpointed the log
// into it and deleted the log, as the sqlite3 tool does on closing). Otherwise its log, holding
// the last acknowledged commits, was lost: kDataLoss. (With the log present the main file alone
// may be mid-checkpoint and is never read on its own.) `found` is false for a file with no
// metadata.
absl::Status precheck_without_wal(const std::string& path, journal_info& info, bool& found);
// kFailedPrecondition if the database holds tables that are not a pop journal's.
absl::Status check_foreign(sqlite3* db, const std::string& path);
// Applies one record's writes (JSON text) to `root`.
absl::Status replay(node_ptr& root, const std::string& writes, std::uint64_t version,
                    const std::string& path);
// Loads the newest snapshot and replays every record after it, checking checksums, integrity
// and that versions are consecutive.
// Stops after version `until`.
absl::Status load(sqlite3* db, const std::string& path, journal_info& info, node_ptr& root,
                  std::uint64_t until = std::numeric_limits<std::uint64_t>::max());
// Opens journal `path` read-only without changing it (an engine may have it open; nothing is
// checkpointed) and reads its metadata into `info`. kNotFound (no file), kFailedPrecondition (a
// newer format, or not a pop journal), kDataLoss (damaged, or its write-ahead log lost).
absl::Status open_read_only(const std::string& path, connection& c, journal_info& info);
// load() inside one read transaction; `newest`, if given, gets the newest version the journal
// holds, read in the same transaction.
absl::Status load_read_only(sqlite3* db, const std::string& path, journal_info& info,
                            node_ptr& root,
                            std::uint64_t until = std::numeric_limits<std::uint64_t>::max(),
                            std::uint64_t* newest = nullptr);
// Writes metadata `key` = `value` in pop_meta.
absl::Status set_meta(sqlite3* db, const std::string& path, const char* key,
                      const std::string& value);
// Writes the snapshot of `version` (the state as JSON text) taken at `at` microseconds.
absl::Status insert_snapshot(sqlite3* db, const std::string& path, std::uint64_t version,
                             const std::string& state, std::int64_t at);
// In one transaction: the snapshot of `version` (as insert_snapshot), and the records up to it and
// older snapshots pruned. On failure the journal is as before.
absl::Status write_snapshot(sqlite3* db, const std::string& path, std::uint64_t version,
                            const std::string& state, std::int64_t at);
// The bytes a record counts toward journal_options::snapshot_bytes.
constexpr std::uint64_t record_text_bytes(std::size_t process, std::size_t writes,
                                          std::size_t messages) {
  return process + writes + messages + 32;
}

}  // namespace pop::detail
