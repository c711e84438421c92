// Defines the status helpers shared by every part of pop (POP_RETURN_IF_ERROR and friends).
#pragma once

#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Evaluates `expr` (an absl::Status or absl::StatusOr) and returns its status from the enclosing
// function if it is not OK. Debian's abseil 20220623 has no ABSL_RETURN_IF_ERROR.
#define POP_RETURN_IF_ERROR(expr)                                                                 \
  do {                                                                                            \
    if (auto pop_status_ = ::pop::detail::status_of(expr); !pop_status_.ok()) return pop_status_; \
  } while (false)

#define POP_DETAIL_CONCAT_INNER(a, b) a##b
#define POP_DETAIL_CONCAT(a, b) POP_DETAIL_CONCAT_INNER(a, b)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status, otherwise moves the value
// into `lhs` (a declaration such as `auto x` or an existing variable).
#define POP_ASSIGN_OR_RETURN(lhs, rexpr) \
  POP_DETAIL_ASSIGN_OR_RETURN(POP_DETAIL_CONCAT(pop_statusor_, __LINE__), lhs, rexpr)

#define POP_DETAIL_ASSIGN_OR_RETURN(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                                \
  if (!tmp.ok()) return std::move(tmp).status();     \
  lhs = std::move(tmp).value()

namespace pop::detail {

inline absl::Status status_of(absl::Status s) {
  return s;
}
template <class T>
absl::Status status_of(const absl::StatusOr<T>& s) {
  return s.status();
}

// Converts a std::string_view to absl::string_view; Debian's abseil keeps the two distinct.
inline absl::string_view to_absl(std::string_view s) {
  return absl::string_view(s.data(), s.size());
}
inline std::string_view to_std(absl::string_view s) {
  return std::string_view(s.data(), s.size());
}

}  // namespace pop::detail

namespace pop {

// Returns `status` with `context` prepended to its message ("context: message"), keeping the code.
// An OK status is returned unchanged.
absl::Status annotate(const absl::Status& status, std::string_view context);

}  // namespace pop
