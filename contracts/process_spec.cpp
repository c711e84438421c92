#include "pop/contracts/process_spec.hpp"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"

namespace pop {
namespace {

bool is_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-' || c == '.' || c == ':';
}

absl::Status validate_name(std::string_view kind, std::string_view name, std::size_t limit) {
  if (name.empty())
    return absl::InvalidArgumentError(absl::StrCat(detail::to_absl(kind), " is empty"));
  if (name.size() > limit) {
    return absl::InvalidArgumentError(absl::StrCat(detail::to_absl(kind), " '",
                                                   detail::to_absl(name.substr(0, 32)),
                                                   "...' is longer than ", limit, " characters"));
  }
  for (std::size_t i = 0; i < name.size(); ++i) {
    if (!is_name_char(name[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat(detail::to_absl(kind), " '", detail::to_absl(name), "' has character '",
                       absl::string_view(&name[i], 1), "' at offset ", i,
                       "; allowed are letters, digits, '.', '_', '-' and ':'"));
    }
  }
  return absl::OkStatus();
}

// Parses one declared path list; rejects repeats and paths nested under another of the list.
absl::StatusOr<path_set> parse_paths(std::string_view process, std::string_view list,
                                     const std::vector<std::string>& texts) {
  path_set out;
  std::vector<path> parsed;
  for (const std::string& text : texts) {
    absl::StatusOr<path> p = path::parse(text);
    if (!p.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("process '", detail::to_absl(process),
                                                     "': ", detail::to_absl(list), ": ",
                                                     p.status().message()));
    }
    for (const path& q : parsed) {
      if (q.overlaps(*p)) {
        const bool same = q == *p;
        return absl::InvalidArgumentError(
            absl::StrCat("process '", detail::to_absl(process), "': ", detail::to_absl(list),
                         " declare '", q.str(), "' and '", p->str(), "'",
                         same ? ": a path is repeated"
                              : ": one is nested in the other; declare only the outer one"));
      }
    }
    parsed.push_back(*p);
    out.insert(*p);
  }
  return out;
}

}  // namespace

absl::Status validate_topic(std::string_view topic) {
  return validate_name("topic", topic, 256);
}

absl::StatusOr<process_contract> process_contract::from_spec(const process_spec& spec) {
  if (absl::Status s = validate_name("process name", spec.name, 128); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("invalid process spec: ", s.message()));
  }
  process_contract c;
  c.name_ = spec.name;
  POP_ASSIGN_OR_RETURN(c.inputs_, parse_paths(spec.name, "inputs", spec.inputs));
  POP_ASSIGN_OR_RETURN(c.outputs_, parse_paths(spec.name, "outputs", spec.outputs));
  c.emits_ = spec.emits;
  std::sort(c.emits_.begin(), c.emits_.end());
  for (std::size_t i = 0; i < c.emits_.size(); ++i) {
    if (absl::Status s = validate_topic(c.emits_[i]); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("process '", spec.name, "': emits: ", s.message()));
    }
    if (i > 0 && c.emits_[i] == c.emits_[i - 1]) {
      return absl::InvalidArgumentError(
          absl::StrCat("process '", spec.name, "': emits: topic '", c.emits_[i], "' is repeated"));
    }
  }
  if (c.outputs_.empty() && c.emits_.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("process '", spec.name,
                     "' declares no outputs and no topics: it could never commit anything"));
  }
  if (spec.timeout.count() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("process '", spec.name, "': timeout is negative"));
  }
  c.timeout_ = spec.timeout;
  return c;
}

bool process_contract::may_emit(std::string_view topic) const {
  return std::binary_search(emits_.begin(), emits_.end(), topic,
                            [](std::string_view a, std::string_view b) { return a < b; });
}

}  // namespace pop
