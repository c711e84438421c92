// Defines pop::dry_run, which runs one process against a fixture state without an engine.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/contracts/json.hpp"
#include "pop/contracts/outbox_message.hpp"
#include "pop/contracts/process_spec.hpp"
#include "pop/engine/engine.hpp"
#include "pop/engine/result.hpp"

namespace pop {

// What one process run would commit, as plain values for assertions.
struct dry_run_result {
  std::vector<write> writes{};             // state writes, in order (outbox diffs included)
  std::vector<outbox_message> messages{};  // messages with the ids they would get
  std::vector<std::string> reads{};        // paths the process read
  json state{};                            // the whole state after the commit
};

// Settings of a dry run.
struct dry_run_options {
  // The fixture's version (raised to the newest version of a message id in its outbox); messages
  // get version+1.
  std::uint64_t version = 0;
  std::string outbox_path = "domain.outbox_queue";
};

// Runs `fn` under `spec` once on `fixture` (a JSON object) with `args`, with the same contract
// enforcement and validation as engine::execute, and returns what it would commit. Nothing needs
// mocking: a process is a function of its snapshot. Errors are those of engine::execute (except
// kNotFound and kAborted), plus kInvalidArgument for a bad spec, fixture or outbox path.
[[nodiscard]] absl::StatusOr<dry_run_result> dry_run(const process_spec& spec, const process_fn& fn,
                                                     const json& fixture, const json& args,
                                                     const dry_run_options& opts = {});

}  // namespace pop
