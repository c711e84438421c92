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
  // The newest version whose commit wrote a value into or over the outbox (a process or
  // compare_and_swap rewriting or inserting an entry) rather than only appending messages
  // or removing entries; 0 if none since the engine opened.
  std::uint64_t outbox_rewritten_at = 0;
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

  // The newest version, at most this one, in which a commit wrote a value into the outbox other
  // than by emitting messages (a process or compare_and_swap rewriting or inserting an entry, a
  // relay recording a failed attempt); 0 if none since the engine opened. While it stays the
  // same, every entry added to the outbox was emitted, with an id above every earlier
  // commit's (new entries written by hand with ids of later versions are refused): a reader
  // that has seen the queue up to an id needs to look only past it.
  std::uint64_t outbox_rewritten_at() const { return state_->outbox_rewritten_at; }

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
