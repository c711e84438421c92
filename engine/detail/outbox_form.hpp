// Defines how writes that touch the outbox are read: the whole-queue forms (Theus's list of
// messages, or an object of id -> message) and writes of one stored message.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/contracts/json.hpp"
#include "pop/contracts/path.hpp"
#include "pop/engine/result.hpp"
#include "pop/engine/value_view.hpp"

namespace pop::detail {

// What a write of the whole outbox means, as changes to single messages.
struct outbox_changes {
  std::vector<std::pair<std::string, json>> updates;  // pending id -> its new stored form
  std::vector<std::string> removals;                  // pending ids to remove
  std::vector<message_draft> appends;                 // new messages, in the queue's order
};

// Returns the changes that writing `queue` at the outbox means, against `pending` (the outbox of
// the newest version) for a write based on version `based_on`:
// - `queue` is a list (Theus's form) or an object of messages; its entries without an "id" are
//   new messages (see draft_from_entry); entries with the id of a pending message keep it
//   (updated if the entry differs);
// - every message pending at `based_on` that the queue does not list is removed; messages
//   committed after `based_on` (their ids name a newer version) are kept whatever the queue says.
// kInvalidArgument naming `who`: a queue that is neither a list nor an object (or a delete), an
// entry that is not an object, an id listed twice or not pending, an entry that is not a valid
// stored message.
[[nodiscard]] absl::StatusOr<outbox_changes> diff_outbox(const std::optional<json>& queue,
                                                         const value_view& pending,
                                                         std::uint64_t based_on,
                                                         std::string_view who);

// Returns the message a new queue entry (an object without an "id") means: "topic" (a string,
// required), "key" (a string, optional), "headers" (an object of strings, optional), and the
// payload: the entry's "payload" if it has one, otherwise an object of all its other fields
// (Theus's free-form messages: {"topic": "SEND_EMAIL", "to": ..., "body": ...} has the payload
// {"to": ..., "body": ...}). An entry with both "payload" and other fields is kInvalidArgument.
[[nodiscard]] absl::StatusOr<message_draft> draft_from_entry(const json& entry,
                                                             std::string_view who);

// OK if `value` may be written at `target`, a path strictly below the outbox `outbox`: `target`
// must be `<outbox>.<message id>` and the value a stored message with that id, or a delete.
// Otherwise kInvalidArgument naming `who` and saying what to write instead.
[[nodiscard]] absl::Status check_message_write(const path& target, const path& outbox,
                                               const std::optional<json>& value,
                                               std::string_view who);

// Returns `state` (options.initial_state) with its outbox in stored form: absent stays absent,
// a list becomes messages of version 0 (ids make_message_id(0, i), created at `now_us`), an
// object must already hold stored messages, with ids of version `newest` (the state's) or older
// if given (later ones are given to emitted messages). kInvalidArgument otherwise, saying what
// to write. `newest_seen`, if given, is raised to the newest version of an id held.
[[nodiscard]] absl::StatusOr<json> initial_outbox(json state, const path& outbox,
                                                  std::int64_t now_us,
                                                  std::optional<std::uint64_t> newest,
                                                  std::uint64_t* newest_seen = nullptr);

}  // namespace pop::detail
