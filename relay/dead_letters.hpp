// Defines pop::dead_letters: listing and requeueing the messages a relay gave up on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/contracts/dead_letter.hpp"
#include "pop/engine/engine.hpp"

namespace pop {

// The dead letters of one engine at one path (relay_options::dead_letter_path). Every operation is
// a transaction on the engine, so it is journaled and visible like any commit.
// Thread safety: as the engine's. Lifetime: the engine must outlive it.
class dead_letters {
 public:
  // Returns the dead letters of `e` at `letters_path`, or kInvalidArgument for a bad path or one
  // overlapping the outbox. Describes the path in the engine's journal (engine::describe).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<dead_letters>> create(
      engine& e, std::string_view letters_path = "system.dead_letters");
  dead_letters(const dead_letters&) = delete;
  dead_letters& operator=(const dead_letters&) = delete;

  // The number of dead letters in the newest snapshot. O(1).
  std::size_t count() const;
  // Up to `limit` dead letters in id (commit) order from the newest snapshot, or kDataLoss naming
  // an entry that is not a dead letter.
  [[nodiscard]] absl::StatusOr<std::vector<dead_letter>> list(
      std::size_t limit = std::numeric_limits<std::size_t>::max()) const;

  // Moves dead letter `id` back to the outbox, under its old id (so consumers that saw it still
  // recognise it), with attempts, last error and next attempt time reset and its failure history
  // kept. Returns the version that did it; kNotFound naming the id and version if there is no
  // such dead letter; kAlreadyExists if the outbox already holds that id; kResourceExhausted if
  // the outbox is at options.max_pending. Nothing changes on error.
  [[nodiscard]] absl::StatusOr<std::uint64_t> requeue(std::string_view id);
  // Moves every dead letter except malformed ones back in one transaction; returns how many (0 if
  // there were none). Errors as requeue(); nothing changes on error.
  [[nodiscard]] absl::StatusOr<std::size_t> requeue_all();
  // Moves the dead letters `ids` back as requeue() does, all in one transaction; returns its
  // version. Errors as requeue() (kInvalidArgument for no ids); nothing changes on error.
  [[nodiscard]] absl::StatusOr<std::uint64_t> requeue_many(const std::vector<std::string>& ids);
  // Deletes dead letter `id` for good; returns the version that did it, or kNotFound.
  [[nodiscard]] absl::StatusOr<std::uint64_t> discard(std::string_view id);
  // Deletes the dead letters `ids` in one transaction; kNotFound naming the first one missing
  // (nothing is deleted then), kInvalidArgument for no ids.
  [[nodiscard]] absl::StatusOr<std::uint64_t> discard_many(const std::vector<std::string>& ids);

 private:
  dead_letters(engine& e, path letters_path);  // validated by create()
  // {how many, the version that moved them}.
  absl::StatusOr<std::pair<std::size_t, std::uint64_t>> requeue_ids(
      const std::vector<std::string>& ids, bool all);

  engine& engine_;
  const path path_;
};

}  // namespace pop
