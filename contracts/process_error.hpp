// Defines pop::process_error, the exception that aborts a running process with a Status.
#pragma once

#include <exception>
#include <string>
#include <utility>

#include "absl/status/status.h"

namespace pop {

// Thrown inside a process to abort it with `status` (the context throws it on a contract breach
// or a failed typed read; user code may throw it too). The engine catches it at the boundary:
// nothing is committed and the caller receives the status, annotated with the process name.
class process_error : public std::exception {
 public:
  explicit process_error(absl::Status status)
      : status_(std::move(status)), what_(status_.ToString()) {}
  const absl::Status& status() const noexcept { return status_; }
  const char* what() const noexcept override { return what_.c_str(); }

 private:
  absl::Status status_;
  std::string what_;
};

}  // namespace pop
