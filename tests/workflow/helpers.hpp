// Helpers the workflow tests share: the step processes they run, definition parsing, running
// instances to a standstill, reading state and making inbox messages.
#pragma once

#include <catch2/catch.hpp>

#include <stdexcept>
#include <string>

#include "pop/workflow/workflow.hpp"

namespace pop::test::workflow_helpers {

using pop::json;
// Registers "append": appends args.tag (or the step's input "tag") to domain.log, and "fail_now"
// which returns an error, "explode" which throws, and "undo" which appends "undo:<tag>".
inline void register_steps(pop::workflows& wf) {
  const auto append = [](std::string prefix) {
    return [prefix](const pop::context& ctx, const json& args) -> absl::StatusOr<pop::result> {
      json log = ctx.get_or<json>("domain.log", json::array());
      log.push_back(prefix + args.value("tag", std::string("?")));
      pop::result r;
      r.set("domain.log", log);
      r.set("domain.count", ctx.get_or<int>("domain.count", 0) + 1);
      return r;
    };
  };
  const pop::process_spec spec{.name = "append",
                               .inputs = {"domain.log", "domain.count"},
                               .outputs = {"domain.log", "domain.count"},
                               .emits = {"step.done"}};
  REQUIRE(wf.register_process(spec, append("")).ok());
  pop::process_spec undo = spec;
  undo.name = "undo";
  REQUIRE(wf.register_process(undo, append("undo:")).ok());
  REQUIRE(wf.register_process({.name = "fail_now", .outputs = {"domain.never"}},
                              [](const pop::context&, const json&) -> absl::StatusOr<pop::result> {
                                return absl::FailedPreconditionError("refused on purpose");
                              })
              .ok());
  REQUIRE(wf.register_process({.name = "explode", .outputs = {"domain.never"}},
                              [](const pop::context&, const json&) -> absl::StatusOr<pop::result> {
                                throw std::runtime_error("boom");
                              })
              .ok());
}

inline pop::workflow_definition parse(const json& j) {
  absl::StatusOr<pop::workflow_definition> d = pop::workflow_definition::from_json(j);
  INFO(d.status());
  REQUIRE(d.ok());
  return *d;
}

// Advances every runnable instance until nothing moves; returns the steps taken.
inline int run_all(pop::workflows& wf) {
  int steps = 0;
  for (bool moved = true; moved;) {
    moved = false;
    for (const std::string& id : wf.runnable()) {
      const absl::StatusOr<bool> r = wf.advance(id);
      INFO(r.status());
      REQUIRE(r.ok());
      if (*r) {
        moved = true;
        ++steps;
      }
    }
  }
  return steps;
}

inline json state(const pop::engine& e, const std::string& p) {
  return e.snapshot().read(p).value_or(json());
}

inline pop::outbox_message message(std::string id, std::string topic, std::string key,
                                   json payload = {}) {
  pop::outbox_message m;
  m.id = std::move(id);
  m.topic = std::move(topic);
  m.key = std::move(key);
  m.payload = std::move(payload);
  return m;
}

}  // namespace pop::test::workflow_helpers
