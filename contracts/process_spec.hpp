// Defines pop::process_spec (what a process declares) and pop::process_contract (its checked form).
#pragma once

#include <chrono>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/contracts/path.hpp"

namespace pop {

// What a process promises, as written by the user:
//   {.name = "place_order", .inputs = {"domain.inventory"}, .outputs = {"domain.orders"},
//    .emits = {"order.placed"}}
// A process may read only under `inputs`, write only under `outputs` and emit only `emits` topics.
struct process_spec {
  std::string name{};
  std::vector<std::string> inputs{};
  std::vector<std::string> outputs{};
  std::vector<std::string> emits{};
  // A process running longer than this commits nothing (kDeadlineExceeded); zero means no limit.
  std::chrono::microseconds timeout{0};
};

// Returns OK if `topic` is a valid outbox topic: 1 to 256 characters, letters, digits, '.', '_',
// '-' and ':'; otherwise kInvalidArgument naming the topic.
absl::Status validate_topic(std::string_view topic);

// A validated process_spec: parsed path sets and a sorted topic list.
//
// Invariant: the name is valid, no declared path is repeated or nested under another in the same
// list, topics are valid and unique, and the process can write or emit something.
class process_contract {
 public:
  // Returns the checked contract, or kInvalidArgument naming the process and the offending path,
  // topic or name.
  [[nodiscard]] static absl::StatusOr<process_contract> from_spec(const process_spec& spec);

  const std::string& name() const { return name_; }
  const path_set& inputs() const { return inputs_; }
  const path_set& outputs() const { return outputs_; }
  const std::vector<std::string>& emits() const { return emits_; }
  std::chrono::microseconds timeout() const { return timeout_; }

  // True if the process may read `p` (some input contains it).
  bool may_read(const path& p) const { return inputs_.covers(p); }
  // True if the process may write `p` (some output contains it).
  bool may_write(const path& p) const { return outputs_.covers(p); }
  // True if the process declared `topic`.
  bool may_emit(std::string_view topic) const;

 private:
  std::string name_{};
  path_set inputs_{};
  path_set outputs_{};
  std::vector<std::string> emits_{};
  std::chrono::microseconds timeout_{0};
};

}  // namespace pop
