#include "pop/engine/context.hpp"

#include "pop/engine/detail/tree.hpp"

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"

namespace pop {

void context::fail(absl::Status status) const {
  if (failure_.ok()) failure_ = status;
  throw process_error(std::move(status));
}

absl::Status context::missing(std::string_view path) const {
  return absl::NotFoundError(absl::StrCat("process '", process(), "' read '", detail::to_absl(path),
                                          "', which does not exist in version ", version()));
}

absl::Status context::conversion_error(std::string_view path, const char* what) const {
  return absl::FailedPreconditionError(absl::StrCat("process '", process(), "' read '",
                                                    detail::to_absl(path), "' in version ",
                                                    version(), " as the wrong type: ", what));
}

value_view context::read(std::string_view path_text) const {
  if (deadline_ && std::chrono::steady_clock::now() > *deadline_) {
    fail(absl::DeadlineExceededError(
        absl::StrCat("process '", process(), "' ran past its timeout of ",
                     contract_->timeout().count(), " us (snapshot version ", version(), ")")));
  }
  absl::StatusOr<path> p = path::parse(path_text);
  if (!p.ok()) {
    fail(absl::InvalidArgumentError(absl::StrCat("process '", process(), "' (version ", version(),
                                                 "): ", p.status().message())));
  }
  if (!contract_->may_read(*p)) {
    fail(absl::PermissionDeniedError(absl::StrCat(
        "contract violation: process '", process(), "' read '", p->str(), "' (version ", version(),
        "), outside its declared inputs ", contract_->inputs().to_string())));
  }
  value_view found = snapshot_.view(*p);
  reads_.insert(*std::move(p));
  return found;
}

}  // namespace pop
