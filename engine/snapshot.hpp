// Defines pop::snapshot, one immutable version of the whole state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/contracts/json.hpp"
#include "pop/contracts/outbox_message.hpp"
#include "pop/contracts/path.hpp"
#include "pop/engine/value_view.hpp"

namespace pop {

namespace detail {
struct process_runner;
// One committed version: its number, its state tree and where its outbox lives.
struct version_state {
  std::uint64_t version = 0;
  node_ptr root;
  std::shared_ptr<const path> outbox_path;
};
}  // namespace detail

// One immutable version of the state.
//
// Taking a snapshot is O(1) (one shared pointer) and never blocks a writer; a snapshot never
// changes, and keeps its version alive until the last copy is gone. Safe to share between threads.
class snapshot {
 public:
  // An empty state at version 0 with the default outbox path.
  snapshot();

  // The version this snapshot shows.
  std::uint64_t version() const { return state_->version; }
  // Where this state keeps its outbox (by default "domain.outbox_queue").
  const path& outbox_path() const { return *state_->outbox_path; }

  // The whole state.
  value_view root() const { return value_view(state_->root, nullptr); }
  // The value at `p`, or an absent view. O(depth * log n); copies nothing.
  value_view view(const path& p) const { return root().at(p.str()); }
  // The value at `path_text`, materialised. kInvalidArgument for a bad path; kNotFound, naming the
  // path and version, if nothing is there. O(depth * log n + size of the value).
  [[nodiscard]] absl::StatusOr<json> read(std::string_view path_text) const;
  // The whole state as JSON. O(n).
  json to_json() const { return root().to_json(); }

  // The number of pending outbox messages. O(1).
  std::size_t pending_count() const { return view(outbox_path()).size(); }
  // Up to `limit` pending messages in commit order, starting at the first id >= `from_id`.
  // A stored entry that is not a valid message is reported as kDataLoss naming its id.
  [[nodiscard]] absl::StatusOr<std::vector<outbox_message>> pending_messages(
      std::size_t limit = std::numeric_limits<std::size_t>::max(),
      std::string_view from_id = {}) const;

 private:
  friend class engine;
  friend class context;
  friend struct detail::process_runner;
  explicit snapshot(std::shared_ptr<const detail::version_state> state)
      : state_(std::move(state)) {}
  std::shared_ptr<const detail::version_state> state_;
};

}  // namespace pop
