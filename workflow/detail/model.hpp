// Defines the typed model of the workflow engine's logic: the kinds of steps (a std::variant
// compiled once from a checked workflow_step), a defined version of a workflow, and the events
// the engine's processes take, with the one codec of their arguments. The logic dispatches on
// these types; names appear only in the codecs.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "pop/contracts/json.hpp"
#include "pop/workflow/detail/record.hpp"
#include "pop/workflow/workflow.hpp"

namespace pop::detail {

// Visits a std::variant with one lambda per alternative: std::visit(overloaded{...}, v).
template <class... F>
struct overloaded : F... {
  using F::operator()...;
};
template <class... F>
overloaded(F...) -> overloaded<F...>;

// How a fan-out joins its children (workflow_step::join).
enum class join_mode : char { all, any };
// What a process step does when its retries are used up (workflow_retry::on_exhausted).
enum class exhausted_action : char { fail, compensate, pause };
// How a branch condition decides (workflow_condition::op, or a predicate).
enum class condition_op : char { eq, ne, lt, gt, exists, predicate };

// The kinds of steps, each with what only it has; name, next, on_error, max_visits and retry are
// in the workflow_step beside it.
struct process_kind {
  std::string process;
  std::string compensate;  // empty: nothing to undo
  exhausted_action on_exhausted = exhausted_action::fail;
};
struct branch_kind {
  struct condition {
    condition_op op = condition_op::eq;
    std::string path;       // with "{input}" placeholders (not for a predicate)
    json value;             // what eq/ne/lt/gt compare with
    std::string predicate;  // for condition_op::predicate
    std::string next;
  };
  std::vector<condition> conditions;
  std::string otherwise;
};
struct wait_kind {
  std::map<std::string, std::string> topics;  // topic -> next step
  std::string key;                            // the input the message key must equal
  std::int64_t timeout_ms = 0;                // 0: forever
  std::string on_timeout;                     // empty: the failure path
};
struct call_kind {
  std::string workflow;
  json inputs;  // workflow_step::call_inputs
};
struct sleep_kind {
  std::int64_t ms = 0;
};
struct fail_kind {
  std::string reason;
};
struct end_kind {};
struct continue_as_new_kind {};
struct fan_out_kind {
  std::vector<workflow_branch> branches;  // parallel: one child each
  std::optional<workflow_map> map;        // map: one child per element (then no branches)
  join_mode join = join_mode::all;
};
using step_kind = std::variant<process_kind, branch_kind, wait_kind, call_kind, sleep_kind,
                               fail_kind, end_kind, continue_as_new_kind, fan_out_kind>;

// The kind of `s`, which define() checked has exactly one.
step_kind kind_of(const workflow_step& s);
// Its name as definitions and messages say it ("process", "wait", "map", ...).
std::string_view kind_name(const step_kind& k);

// One version of a workflow as this program defines it, compiled.
struct defined_workflow {
  struct compiled {
    const workflow_step* step;
    step_kind kind;
  };
  workflow_definition def;
  std::string version;  // recorded in every instance started on it
  std::map<std::string, compiled, std::less<>> steps;

  // Step `name` compiled, or null.
  const compiled* find(std::string_view name) const {
    const auto it = steps.find(name);
    return it == steps.end() ? nullptr : &it->second;
  }
  const workflow_step* step(std::string_view name) const {
    const auto it = steps.find(name);
    return it == steps.end() ? nullptr : it->second.step;
  }
  // The kind of step `name`, or null if there is no such step.
  const step_kind* kind(std::string_view name) const {
    const auto it = steps.find(name);
    return it == steps.end() ? nullptr : &it->second.kind;
  }
};
// `def` (checked) compiled as version `version`.
std::shared_ptr<const defined_workflow> compile(workflow_definition def, std::string version);

// ---- the events of an instance's control process ---------------------------------------------

// Run the step at the cursor (a control step: branch, wait, call, sleep, fan-out, ...).
struct run_step_event {};
// Step `step`'s process (or, compensation, its compensation) failed outside its own transaction
// (it threw or broke its contract): the step fails with `code` and `error`.
struct step_failed_event {
  std::string step;
  absl::StatusCode code = absl::StatusCode::kUnknown;
  std::string error;
  bool compensation = false;
};
// A time the instance waits for may be up (its timeout, wait timeout, sleep or retry).
struct timer_event {};
// Cancel the instance with `reason`.
struct cancel_event {
  std::string reason = "cancelled";
};
using control_event = std::variant<run_step_event, step_failed_event, timer_event, cancel_event>;

// The arguments of a control process run: instance `id`, event `event` at time `now`.
struct control_call {
  std::string id;
  std::int64_t now = 0;
  control_event event;
};
// The one codec of control_call as process arguments.
json to_args(const control_call& c);
absl::StatusOr<control_call> control_call_from(const json& args);

// The arguments of a step process run: the process of step `step` of instance `id` (or, if
// `compensation`, its compensation) at time `now`.
struct step_call {
  std::string id;
  std::int64_t now = 0;
  std::string step;
  bool compensation = false;
};
json to_args(const step_call& c);
absl::StatusOr<step_call> step_call_from(const json& args);

// The arguments of the start process: start instance `id` of version `version` of `workflow` at
// its step `start` with `inputs` (a deadline_us of 0: none); an existing instance with the same
// workflow and inputs is left as it is if `idempotent`.
struct start_call {
  std::string id;
  std::int64_t now = 0;
  std::string workflow;
  std::string version;
  std::string start;
  json inputs = json::object();
  std::int64_t deadline_us = 0;
  bool idempotent = true;
};
json to_args(start_call c);
absl::StatusOr<start_call> start_call_from(const json& args);

// ---- operator actions (workflow_operate_process) ---------------------------------------------

// Park a running or waiting instance, if it still has status `expect`, as stuck with `reason`.
struct park_action {
  std::string expect;
  std::string reason;
  park_kind kind = park_kind::by_operator;
};
// Put a stuck instance back in the status it had; only one parked with `kind` if that is set.
struct resume_action {
  std::optional<park_kind> kind;
  std::string by = "resumed by an operator";  // its history entry
};
// Move a stuck or ended instance to `step`, running, on version `version` (empty: its own).
struct restart_action {
  std::string step;
  std::string version;
};
// Cancel the instance (without its definition).
struct cancel_action {
  std::string reason = "cancelled";
};
using operator_action = std::variant<park_action, resume_action, restart_action, cancel_action>;
struct operator_call {
  std::string id;
  std::int64_t now = 0;
  operator_action action;
};
json to_args(const operator_call& c);
absl::StatusOr<operator_call> operator_call_from(const json& args);
// The name of `a` as the arguments and messages say it ("park", "resume", ...).
std::string_view action_name(const operator_action& a);

// The kind of a step without its data: the alternatives of step_kind, in their order.
enum class kind_id : char {
  process,
  branch,
  wait,
  call,
  sleep,
  fail,
  end,
  continue_as_new,
  fan_out,
};
// The name of `k` in messages and in the migration's arguments ("process", "wait", ...).
std::string_view kind_id_name(kind_id k);
inline kind_id id_of(const step_kind& k) {
  static_assert(std::variant_size_v<step_kind> == 9, "kind_id lists step_kind's alternatives");
  return static_cast<kind_id>(k.index());
}

// A migration (the migrate process): the instances `ids` of `workflow` move to version `to`
// (only those on version `from`, if set), their steps renamed as `steps` maps them, checked
// against what the new version's steps are (`target`, by name).
struct migrate_call {
  struct target_step {
    kind_id kind = kind_id::end;
    bool compensate = false;            // a process step with a compensation
    std::vector<std::string> topics{};  // a wait step's topics
    std::string key{};                  // a wait step's key input
    std::int64_t timeout_ms = 0;        // a wait step's timeout
  };
  std::string workflow{};
  std::string to{};
  std::string from{};
  std::map<std::string, std::string> steps{};
  std::map<std::string, target_step> target{};
  std::vector<std::string> ids{};
  std::int64_t now = 0;
};
json to_args(const migrate_call& c);
absl::StatusOr<migrate_call> migrate_call_from(const json& args);

}  // namespace pop::detail
