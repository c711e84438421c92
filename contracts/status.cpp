#include "pop/contracts/status.hpp"

#include <string>

namespace pop {

absl::Status annotate(const absl::Status& status, std::string_view context) {
  if (status.ok()) return status;
  std::string message(context);
  message += ": ";
  message += detail::to_std(status.message());
  return absl::Status(status.code(), message);
}

}  // namespace pop
