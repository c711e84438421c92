// Defines how the `pop` command changes a journal: through an engine, as journaled commits.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "pop/engine/engine.hpp"

namespace pop::detail {

// True if a running engine holds journal `path` (its advisory lock is taken).
bool journal_held(const std::string& path);

// An engine on journal `path` (whose outbox is at `outbox_path`), for a repair made of ordinary
// journaled commits. kFailedPrecondition naming the journal if a running engine holds it; the
// engine's open() errors otherwise.
[[nodiscard]] absl::StatusOr<std::unique_ptr<engine>> open_for_repair(
    const std::string& path, const std::string& outbox_path);

}  // namespace pop::detail
