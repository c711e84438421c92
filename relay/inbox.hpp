// Defines pop::inbox, the idempotent consumer: applying a message changes the state at most once.
#pragma once

#include <cstddef>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "pop/engine/engine.hpp"

namespace pop {

// Where an inbox records applied message ids, and how many it keeps.
struct inbox_options {
  std::string path = "system.inbox";  // one inbox per producer: ids are unique per producing engine
  std::size_t retention = 100'000;    // ids kept; beyond about 1/8 more, the ids applied
                                      // longest ago are pruned; 0 keeps every id
};

// What apply() did.
struct inbox_result {
  bool applied = false;  // false: this id was applied before, so nothing changed
  commit done{};         // the commit that applied it (done.changed == applied)
};

// A handler applies one received message: a process whose argument is the message.
using message_handler =
    std::function<absl::StatusOr<result>(const context& ctx, const outbox_message& m)>;

// An idempotent consumer for messages arriving from another engine (through a sink, NATS, ...).
//
// A handler is registered as an ordinary process whose contract also covers `<path>.<id>`.
// apply() runs it and writes the mark `<path>.<message id>` in the same commit, after checking
// in the same snapshot that the mark is absent; two concurrent applies of one id therefore
// conflict, and the re-run finds the mark and changes nothing. So a message delivered any number
// of times changes the state once, as long as its id is within the retention.
// Thread safety: as the engine's. Lifetime: the engine must outlive the inbox.
class inbox {
 public:
  // Returns an inbox on `e`, or kInvalidArgument for a bad path or one overlapping the outbox.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<inbox>> create(engine& e,
                                                                     inbox_options opts = {});
  inbox(const inbox&) = delete;
  inbox& operator=(const inbox&) = delete;

  // Registers `fn` as process `spec.name` (its inputs and outputs gain the inbox path). Errors as
  // engine::register_process, plus kInvalidArgument if a declared path is inside the inbox.
  [[nodiscard]] absl::Status register_handler(process_spec spec, message_handler fn);

  // Applies `m` with handler `name` unless m.id was applied before. Returns {applied, commit};
  // kNotFound if `name` is not a handler of this inbox; kInvalidArgument if m.id cannot be a path
  // segment; otherwise every error engine::execute returns (and nothing is applied or marked).
  [[nodiscard]] absl::StatusOr<inbox_result> apply(std::string_view name, const outbox_message& m);

  // True if `id` is marked as applied in the newest snapshot.
  bool contains(std::string_view id) const;
  // The number of marks kept. O(1).
  std::size_t size() const;
  // Removes the marks applied longest ago beyond the retention in one transaction; returns how
  // many. O(marks). Called by apply() when the marks exceed the retention by 1/8 (an error there
  // is ignored: the next apply prunes again); an error is the engine's.
  [[nodiscard]] absl::StatusOr<std::size_t> prune();

 private:
  inbox(engine& e, inbox_options opts, path p);  // validated by create()
  engine& engine_;
  const inbox_options options_;
  const path path_;
  mutable std::mutex mu_;
  std::set<std::string, std::less<>> handlers_;  // guarded by mu_
};

}  // namespace pop
