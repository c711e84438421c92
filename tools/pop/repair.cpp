#include "pop/tools/pop/repair.hpp"

#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace pop::detail {

bool journal_held(const std::string& path) {
  // Read from /proc/locks rather than by trying the lock: taking it, however briefly, could make
  // the owning program's own open fail.
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return false;
  const std::string file_id = absl::StrFormat("%02x:%02x:%u", major(st.st_dev), minor(st.st_dev),
                                              static_cast<unsigned long>(st.st_ino));
  std::ifstream locks("/proc/locks");
  std::string line;
  while (std::getline(locks, line)) {
    // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
    std::istringstream fields(line);
    std::string number, kind, mode, access, pid, id;
    if (!(fields >> number >> kind)) continue;
    if (kind == "->") fields >> kind;  // a waiting lock
    if (fields >> mode >> access >> pid >> id && kind == "FLOCK" && id == file_id) return true;
  }
  return false;
}

absl::StatusOr<std::unique_ptr<engine>> open_for_repair(const std::string& path,
                                                        const std::string& outbox_path) {
  options o;
  o.journal = path;
  o.outbox_path = outbox_path;
  o.durability = durability::process;
  absl::StatusOr<std::unique_ptr<engine>> e = engine::open(std::move(o));
  if (!e.ok() && e.status().code() == absl::StatusCode::kFailedPrecondition &&
      absl::StrContains(e.status().message(), "already open in another engine")) {
    absl::Status held = absl::FailedPreconditionError(absl::StrCat(
        "journal '", path,
        "' is held by a running engine: stop the program that owns it, or make this change "
        "through that program; nothing was changed"));
    held.SetPayload(held_payload, absl::Cord("1"));
    return held;
  }
  return e;
}

}  // namespace pop::detail
