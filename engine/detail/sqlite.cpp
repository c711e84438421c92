#include "pop/engine/detail/sqlite.hpp"

#include <sys/stat.h>

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"

namespace pop::detail {

bool file_exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

std::int64_t file_size(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 ? static_cast<std::int64_t>(st.st_size) : -1;
}

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

absl::Status prepare(sqlite3* db, const std::string& path, const char* sql, statement& out) {
  const int rc = sqlite3_prepare_v2(db, sql, -1, &out.s, nullptr);
  if (rc != SQLITE_OK) return sql_error(db, rc, path, absl::StrCat("preparing '", sql, "'"));
  return absl::OkStatus();
}

std::string column_text(sqlite3_stmt* s, int i) {
  const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s, i));
  return p ? std::string(p, static_cast<std::size_t>(sqlite3_column_bytes(s, i))) : std::string();
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

}  // namespace pop::detail
