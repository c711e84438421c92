// Defines pop::detail::journal_view: what the `pop` command reads from a journal, read-only.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/contracts/dead_letter.hpp"
#include "pop/contracts/json.hpp"
#include "pop/contracts/outbox_message.hpp"
#include "pop/engine/journal.hpp"
#include "pop/workflow/workflow.hpp"

namespace pop::detail {

// A journal's state at one version with the descriptions its programs recorded, decoded with the
// library's codecs. Opened without changing the file: an engine may have it open.
class journal_view {
 public:
  // The journal at `path` at version `at` (the newest if absent). Errors as read_journal_state().
  [[nodiscard]] static absl::StatusOr<journal_view> open(const std::string& path,
                                                         std::optional<std::uint64_t> at = {});

  const std::string& file() const { return file_; }
  std::uint64_t version() const { return state_.version; }
  const journal_info& info() const { return state_.info; }
  const json& state() const { return state_.state; }
  // kind -> name -> description (engine::describe).
  const std::map<std::string, std::map<std::string, json>, std::less<>>& descriptions() const {
    return descriptions_;
  }

  // The value at dotted `path` ("" is the whole state); kInvalidArgument for a malformed path,
  // kNotFound naming the path and version if nothing is there.
  [[nodiscard]] absl::StatusOr<const json*> at(std::string_view path) const;

  // Where the outbox, the dead letters and the workflow instances live (described by the program,
  // or the defaults).
  const std::string& outbox_path() const { return state_.info.outbox_path; }
  std::string dead_letter_path() const;
  workflow_options workflow_paths() const;

  // Pending messages in commit (id) order; an entry that is not a valid message is kDataLoss.
  [[nodiscard]] absl::StatusOr<std::vector<outbox_message>> messages() const;
  // Dead letters in id order.
  [[nodiscard]] absl::StatusOr<std::vector<dead_letter>> dead_letters() const;
  // Workflow instances in id order.
  std::vector<workflow_instance> instances() const;
  // The definition of workflow `name` as its program last described it (with `version`: that
  // version, as a program that defined it described it), or kNotFound.
  [[nodiscard]] absl::StatusOr<workflow_definition> definition(std::string_view name,
                                                               std::string_view version = {}) const;

 private:
  std::string file_;
  journal_state state_;
  std::map<std::string, std::map<std::string, json>, std::less<>> descriptions_;
};

// One difference between two JSON states, at a dotted path.
struct state_change {
  std::string path;
  std::optional<json> before;  // absent: added
  std::optional<json> after;   // absent: removed
};

// The differences between `a` and `b` under dotted `prefix`: objects are compared member by
// member, any other value as a whole. In path order.
void diff_states(const json& a, const json& b, const std::string& prefix,
                 std::vector<state_change>& out);

}  // namespace pop::detail
