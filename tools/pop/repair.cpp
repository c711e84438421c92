#include "pop/tools/pop/repair.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"

namespace pop::detail {

bool journal_held(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool held = ::flock(fd, LOCK_EX | LOCK_NB) != 0;
  ::close(fd);  // releases the lock if this took it
  return held;
}

absl::StatusOr<std::unique_ptr<engine>> open_for_repair(const std::string& path,
                                                        const std::string& outbox_path) {
  if (journal_held(path)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "journal '", path,
        "' is held by a running engine: stop the program that owns it, or make this change "
        "through that program; nothing was changed"));
  }
  options o;
  o.journal = path;
  o.outbox_path = outbox_path;
  o.durability = durability::process;
  return engine::open(std::move(o));
}

}  // namespace pop::detail
