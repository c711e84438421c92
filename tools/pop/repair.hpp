// Defines how the `pop` command changes a journal: through an engine, as journaled commits.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "pop/engine/engine.hpp"

namespace pop::detail {

// The payload on a status that means "a running engine holds the journal".
inline constexpr const char* held_payload = "pop.tools/held";

// True if a running engine holds journal `path` (its advisory lock is taken), read from
// /proc/locks without touching the lock; false if that cannot be told.
bool journal_held(const std::string& path);

// An engine on journal `path` (whose outbox is at `outbox_path`), for a repair made of ordinary
// journaled commits. kFailedPrecondition with held_payload if a running engine holds it; the
// engine's open() errors otherwise.
[[nodiscard]] absl::StatusOr<std::unique_ptr<engine>> open_for_repair(
    const std::string& path, const std::string& outbox_path);

}  // namespace pop::detail
