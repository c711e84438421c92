// Defines pop::detail::process_runner: runs a process under its contract and turns what it returns
// into a validated change (prepared), then applies a change on top of a version (applied).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/contracts/json.hpp"
#include "pop/contracts/path.hpp"
#include "pop/contracts/process_spec.hpp"
#include "pop/engine/detail/outbox_form.hpp"
#include "pop/engine/detail/tree.hpp"
#include "pop/engine/engine.hpp"
#include "pop/engine/result.hpp"
#include "pop/engine/snapshot.hpp"

namespace pop::detail {

struct registered {
  process_contract contract;
  process_fn fn;
};

// One state change, validated, with its new value already built as a node (null: delete).
struct prepared_write {
  path target;
  node_ptr value;
};

// What one run of a process returned, validated against its contract and ready to apply.
struct prepared {
  prepared() = default;
  prepared(prepared&&) = default;
  prepared& operator=(prepared&&) = default;
  // (Payloads, usually small and flat, taken apart without nlohmann's stack: see discard.)
  ~prepared() {
    for (message_draft& m : messages) discard(m.payload);
  }

  path_set reads;
  std::vector<prepared_write> writes;
  std::vector<message_draft> messages;
  bool wrote_queue = false;  // wrote the whole outbox (list form): see prepare_writes
  bool empty() const { return writes.empty() && messages.empty(); }
  // What a newer commit must not overlap: what it read and what it wrote. A change that rewrote
  // the whole outbox at `outbox` depends on the messages it removed or changed (its writes), not
  // on the queue as a whole: messages appended meanwhile are kept, so they do not conflict with
  // it. Built on first use: a commit whose base is still the head never needs it.
  const path_set& access(const path& outbox) const;

 private:
  mutable std::optional<path_set> access_;
};

// A prepared change applied on top of one version.
struct applied {
  std::uint64_t version = 0;
  node_ptr root;
  std::string written;  // every path written, message paths included: written_paths' form
  // Where in `written` the paths of appended messages start (they come last): a check against a
  // change that does not touch the outbox can stop there.
  std::size_t messages_at = std::string::npos;
  // A write put a value into or over the outbox (see version_state::outbox_rewritten_at).
  bool rewrote_outbox = false;
  std::vector<std::string> message_ids;  // make_message_id(version, i) for each message i
  std::int64_t created_at_us = 0;        // the messages' creation time
};

// The paths one commit wrote, as the engine keeps them for conflict checks: their texts, each
// followed by '\n' (one allocation per commit, not one per path: the log holds many commits).
inline void add_written(std::string& written, std::string_view path_text) {
  written.append(path_text);
  written.push_back('\n');
}
// Whether `fn` returns true for one of the paths in `written` (add_written's form).
template <class Fn>
bool any_written(std::string_view written, Fn fn) {
  while (!written.empty()) {
    const std::size_t end = written.find('\n');
    if (fn(written.substr(0, end))) return true;
    written.remove_prefix(end + 1);
  }
  return false;
}

// The length of the deepest path that is or contains every path in `written` (add_written's
// form; a prefix of its first path), or 0 if they share no first segment. A change that does not
// overlap that path overlaps none of them: the conflict check skips a commit (say, a relay's
// clear of thousands of messages) by one comparison.
inline std::size_t common_ancestor(std::string_view written) {
  const std::string_view first = written.substr(0, written.find('\n'));
  std::size_t n = first.size();
  any_written(written, [&](std::string_view p) {
    std::size_t k = 0;
    const std::size_t most = std::min(n, p.size());
    while (k < most && first[k] == p[k]) ++k;
    if (k == n && (p.size() == n || p[n] == '.')) return false;  // p is below first[0, n)
    if (k == p.size() && first[k] == '.') {                      // p is itself above first[0, n)
      n = k;
      return false;
    }
    // Back to the last whole segment both share: a '.' before the first difference.
    n = k == 0 ? std::string_view::npos : first.rfind('.', k - 1);
    if (n == std::string_view::npos) n = 0;
    return n == 0;
  });
  return n;
}

// The outbox path `text`, or kInvalidArgument naming `what`: not a path, or no room below it for
// a message id (too deep or too long for one more segment of the longest id).
absl::StatusOr<path> parse_outbox_path(std::string_view text, std::string_view what);

// "process '<name>' (version <version>)", for messages.
std::string process_at(const process_contract& c, std::uint64_t version);

// Runs processes and turns what they return into a prepared change.
// The texts of `paths`, in order.
std::vector<std::string> path_texts(const path_set& paths);

// The steps between a process and a commit, shared by execute, compare_and_swap and dry runs.
// Stateless; every function is pure apart from running the user's process.
struct process_runner {
  static snapshot make_snapshot(std::shared_ptr<const version_state> state);
  // Runs `proc` once on `snap` and validates what it returned against its contract: writes
  // (paths, storable values, the outbox's forms), messages (topics, keys, headers, payloads).
  // Errors: the process's own status annotated with its name and version, kPermissionDenied for
  // a contract breach, kInvalidArgument for bad paths or values, kDeadlineExceeded past its
  // timeout.
  static absl::StatusOr<prepared> run(const registered& proc, const snapshot& snap,
                                      const json& args);
  // kPermissionDenied unless `c` may emit `topic`.
  static absl::Status check_topic(const process_contract& c, std::uint64_t version,
                                  const std::string& topic);
  // Validates the writes of `r` into `out` (a whole-outbox write becomes its changes).
  static absl::Status prepare_writes(const process_contract& c, const snapshot& snap, result& r,
                                     prepared& out);
  // Adds the changes a whole-outbox write means to `out`.
  static absl::Status add_changes(const path& outbox, outbox_changes changes, prepared& out);
  // OK unless writing `value` at `p` would replace the outbox or break the shape of a message.
  static absl::Status check_outbox_write(const path& p, const path& outbox,
                                         const std::optional<json>& value, const std::string& who);
  // OK if a message can be stored and published: its key, headers and payload are storable.
  static absl::Status check_message(const message_draft& m, const std::string& who);
  // kInvalidArgument if writing `p` would replace the outbox at `outbox` (p is its ancestor).
  static absl::Status check_not_outbox_parent(const path& p, const path& outbox,
                                              const std::string& who);
  // Applies `prep` on top of `base`, giving its messages ids of version base.version + 1 and
  // the creation time `now_us`. `prep` is left as it was: it may be applied again (on a newer
  // head).
  static absl::StatusOr<applied> apply(const version_state& base, const prepared& prep,
                                       std::int64_t now_us, const std::string& who);
  // Whether applying `prep` on `root` cannot fail (so may be done in place, apply_in_place): every
  // write's parents are objects or missing, no two writes and no write and the outbox overlap, and
  // the outbox, if messages are appended, is a member map under member maps; and whether it is
  // small (at most 16 writes and 64 messages: readers of the head wait for an in-place change).
  static bool can_apply_in_place(const value_node& root, const prepared& prep, const path& outbox);
  // apply() on `root`, changed in place wherever nothing else holds its nodes (see assign's
  // `owned`): the caller holds the only pointer to `root` and can_apply_in_place said yes. An
  // allocation failure part way ends the process (noexcept), as a half-applied change cannot be
  // taken back. Values it removes go to the thread's pmap retire_scope, if any.
  static applied apply_in_place(node_ptr root, std::uint64_t base_version, const path& outbox,
                                const prepared& prep, std::int64_t now_us,
                                const std::string& who) noexcept;
};

}  // namespace pop::detail
