// Defines pop::detail::machine: what this program defines (workflow versions, predicates) and the
// transitions of instances. A transition is a pure function of a snapshot (read through a
// context) and a typed event: it returns the instance's new record, the other writes and the
// messages as one result, which the engine commits, and tests can run it with pop::dry_run on a
// fixture, without an engine.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/engine/context.hpp"
#include "pop/engine/result.hpp"
#include "pop/workflow/detail/model.hpp"
#include "pop/workflow/workflow.hpp"

namespace pop::detail {

class instance_txn;

struct predicate_entry {
  std::vector<std::string> inputs;
  predicate_fn fn;
};

// What an instance runs on, or why it cannot run here (then parked with `kind`).
struct resolution {
  std::shared_ptr<const defined_workflow> def;
  std::string reason;
  park_kind kind = park_kind::unknown;
};

class machine {
 public:
  explicit machine(workflow_options o) : options_(std::move(o)) {}
  const workflow_options& options() const { return options_; }

  // ---- what this program defines (thread-safe) ----
  // Adds a version of its workflow (the newest).
  void add(std::shared_ptr<const defined_workflow> d);
  // Adds predicate `name`; false if one has that name.
  bool add_predicate(const std::string& name, predicate_entry p);
  std::shared_ptr<const predicate_entry> predicate(std::string_view name) const;
  // The newest version of workflow `name`, or null.
  std::shared_ptr<const defined_workflow> find(std::string_view name) const;
  // Version `version` of workflow `name` (the newest if `version` is empty: records from before
  // versions), or null.
  std::shared_ptr<const defined_workflow> find(std::string_view name,
                                               std::string_view version) const;
  // The versions of workflow `name`, oldest first.
  std::vector<std::string> versions(std::string_view name) const;
  // Every version of every workflow.
  std::vector<std::shared_ptr<const defined_workflow>> all() const;
  // What an instance of `workflow` on `version` runs on, or why it cannot run here.
  resolution resolve(std::string_view workflow, std::string_view version) const;

  // ---- transitions: each a function of the snapshot `ctx` and its arguments ----
  // The control process of version `d`: runs a control step, takes a step's failure, a timer or
  // a cancellation.
  absl::StatusOr<result> control(const defined_workflow& d, const context& ctx,
                                 const control_call& c) const;
  // The step process of `fn`: runs a process step (or a compensation) of instance c.id, its
  // effects and the instance's move in one result.
  absl::StatusOr<result> step(const process_fn& fn, const context& ctx, const step_call& c) const;
  // The resume handler of the inbox (workflows::resume): message `m` for the instances waiting on
  // its key and topic, else kept in the mailbox of its key; signal-with-start first starts its
  // instance.
  absl::StatusOr<result> receive(const context& ctx, const outbox_message& m) const;
  // True if a wait step of a defined workflow takes messages on `topic`.
  bool waited_topic(std::string_view topic) const;

 private:
  // If `t`'s instance ended and has a parent waiting on it, moves the parent on (same commit).
  void settle(instance_txn& t) const;
  // Runs control step `step` (of kind `kind`) of `t`'s instance, of definition `d`.
  void run_control_step(instance_txn& t, const defined_workflow& d, const workflow_step& step,
                        const step_kind& kind) const;
  // Step `step` of `t`'s instance failed with `code` and `error`: retried as its policy says, or
  // its on_error, failure path or a pause for an operator.
  void fail_step(instance_txn& t, const workflow_step& step, const process_kind& kind,
                 absl::StatusCode code, const std::string& error) const;
  // A compensation of `step` failed: retried as the step's retry policy says (waiting, then
  // compensating again), else the instance fails naming it.
  void fail_compensation(instance_txn& t, const workflow_step& step, const process_kind& kind,
                         absl::StatusCode code, const std::string& error) const;
  // Starts the children of fan-out step `step` of `t`'s instance.
  void start_fan_out(instance_txn& t, const workflow_step& step, const fan_out_kind& fan,
                     const json& inputs) const;
  // Starts the fan-out's next child with `child_inputs`; false (and the failure path) if its
  // workflow is not defined.
  bool start_fan_child(instance_txn& t, const workflow_step& step, const fan_out_kind& fan,
                       json child_inputs) const;
  // Child `child` of `parent`'s fan-out at `step` ended: records it, starts the next element of a
  // map, or joins.
  void settle_fan_out(instance_txn& parent, instance_txn& child, const workflow_step& step,
                      const fan_out_kind& fan) const;

  const workflow_options options_;
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<const predicate_entry>, std::less<>> predicates_;
  // Every version of each workflow, oldest first.
  std::map<std::string, std::vector<std::shared_ptr<const defined_workflow>>, std::less<>>
      definitions_;
};

}  // namespace pop::detail
