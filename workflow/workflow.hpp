// Defines pop::workflows: long-running flows of processes whose instances live in the state.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/engine/engine.hpp"
#include "pop/relay/metrics.hpp"

namespace pop {

namespace detail {
class instance_txn;
class machine;
struct defined_workflow;
struct resolution;
struct operator_call;
enum class park_kind : char;
}  // namespace detail

// A condition a branch step tests: a built-in comparison of the value at `path` with `value`, or
// a registered predicate. A path segment "{name}" is replaced by the instance input `name`.
struct workflow_condition {
  std::string path{};       // e.g. "domain.orders.{order}.status"
  std::string op{};         // "eq", "ne", "lt", "gt" (numbers or strings), "exists"
  json value{};             // what eq/ne/lt/gt compare with
  std::string predicate{};  // instead of path/op: a predicate registered with register_predicate
  std::string next{};       // the step taken when the condition holds
};

// How a process step is retried when it fails (its process returns an error, throws or breaks
// its contract). Each retry waits: initial_ms, times multiplier per attempt, at most
// max_interval_ms, spread by +-jitter (a fraction, the same for the same instance, step and
// attempt, so a step's outcome is a function of the state). Meanwhile the instance is "waiting"
// (workflow_instance::retry_at_us says until when; a durable timer, as for sleep).
struct workflow_retry {
  int attempts = 1;  // runs in all, the first included; 1: no retry
  std::int64_t initial_ms = 100;
  double multiplier = 2.0;
  std::int64_t max_interval_ms = 60'000;
  double jitter = 0.1;
  // Status codes that fail at once, by name ("INVALID_ARGUMENT", "FAILED_PRECONDITION", ...).
  std::vector<std::string> non_retryable{};
  // When the attempts are used up (or the code is non-retryable): "fail" (the step's on_error,
  // else the failure path), "compensate" (the failure path even if on_error is set), or "pause"
  // (parked stuck for an operator, whose resume() gives it a fresh set of attempts).
  std::string on_exhausted = "fail";

  bool operator==(const workflow_retry&) const = default;
};

// A branch of a parallel step: workflow `call` run as a child, with its own inputs.
struct workflow_branch {
  std::string call{};
  json inputs{};  // as workflow_step::call_inputs (null: the parent's inputs)
  bool operator==(const workflow_branch&) const = default;
};

// A map step: a child of workflow `call` for each element of the list in input `over`, at most
// `max_concurrency` running at once (0: all at once).
struct workflow_map {
  std::string over{};       // the input holding the list (at most 10,000 elements)
  std::string call{};       // the workflow each element runs
  std::string as = "item";  // the child input that gets the element
  json inputs{};            // its other inputs, as workflow_step::call_inputs (null: none)
  int max_concurrency = 0;
  bool operator==(const workflow_map&) const = default;
};

// One step of a workflow. Exactly one kind is set: process, branch, wait, call, sleep, fail,
// end, continue_as_new, parallel or map.
struct workflow_step {
  std::string name{};
  std::string process{};                      // run this process (see workflows::register_process)
  std::vector<workflow_condition> branch{};   // take the first condition that holds, else `next`
  std::map<std::string, std::string> wait{};  // park until a message with one of these topics
                                              // (topic -> next step) is applied through the inbox
  std::string call{};                         // run this workflow as a child, then go on; the
                                              // child's id is "<parent id>-<step>-<n>"
  json call_inputs{};  // call: the child's inputs (JSON "inputs"): an object whose string values
                       // "{name}" take the parent's input `name` as it is, other strings have
                       // their "{name}" placeholders replaced, other values are taken as they
                       // are; null: the parent's inputs
  std::string fail{};  // take the failure path with this reason
  std::int64_t sleep_ms = 0;     // sleep this long, then go to `next`: a durable timer (the wake
                                 // time is in the instance record, so it survives restarts)
  bool end = false;              // complete the instance
  bool continue_as_new = false;  // end this run and start the next from the start step with the
                                 // same inputs: its history, loop counts, received messages and
                                 // compensations are cleared, so a long-lived instance (a loop
                                 // over pages, a subscription) keeps a bounded history; it
                                 // stays on its definition version (migrate() moves it)
  std::string next{};            // after a process or call succeeded; a branch's "otherwise"
  std::string on_error{};        // after a process or call failed; empty: the failure path
  std::string key{};             // wait: the input whose value the message key must equal
  std::int64_t timeout_ms = 0;   // wait: how long to wait (0: forever)
  std::string on_timeout{};      // wait: where to go after the timeout; empty: the failure path
  std::string compensate{};      // process that undoes this (process) step on the failure path
  int max_visits = 0;            // how often the step may run in one instance; required (> 1) for
                                 // a step on a loop, else 1 (retries are not visits)
  workflow_retry retry{};        // process step: how its failures are retried
  // Fan-out: run these branches, or one child per list element, as children at once (child ids
  // "<parent id>-<step>-<n>-<index>"; n counts the step's calls over the instance's life: its
  // visit in the first run, never an n used before a restart or continue-as-new), then join: "all"
  // goes to `next` when every child completed, and on the first that did not, cancels the others
  // and takes on_error (else the failure path); "any" goes to `next` with the first child that
  // completed and cancels the others, and takes on_error (else the failure path) if none did.
  // Children run independently (their own transactions), so branches whose processes write disjoint
  // paths never conflict. The children's outcomes are in the parent's received messages under the
  // step's name
  // ({child id: status}), which later steps get as "_received".
  std::vector<workflow_branch> parallel{};
  workflow_map map{};
  std::string join = "all";
};

// A named graph of steps. Load from JSON with from_json or write it in C++; workflows::define
// checks it.
struct workflow_definition {
  std::string name{};
  // A name for this version (JSON "version"; letters, digits, '_' or '-'; at most 64),
  // recorded in every instance started on it. Empty: a hash of the definition.
  std::string version{};
  std::string start{};
  std::vector<workflow_step> steps{};

  // The definition in `j` ({"name", "start", "steps": {name: {...}}}), or kInvalidArgument
  // naming the step and field that is wrong.
  [[nodiscard]] static absl::StatusOr<workflow_definition> from_json(const json& j);
  json to_json() const;
};

// A named condition written in C++: reads only its declared inputs (like a process) and gets the
// instance inputs.
using predicate_fn = std::function<bool(const context& ctx, const json& inputs)>;

// One workflow instance as the state holds it at `system.workflows.<id>`: its workflow and the
// version (hash) of the definition it started with, status, cursor, inputs, received messages,
// visits per step, completed compensable steps, history and error.
struct workflow_instance {
  std::string id{};
  std::string workflow{};
  std::string definition_version{};  // hash of the definition it was started with
  std::string status{};  // running, waiting, compensating, completed, failed, compensated,
                         // cancelled (cancel() ended it, after its compensations), or
                         // stuck (parked until an operator acts: see workflows::resume)
  std::string cursor{};  // the current step
  json inputs{};
  json received{};  // topic -> payload of the messages its wait steps received
  json history{};   // [{"step", "outcome", "at_us"}, ...], oldest first
  std::string error{};
  std::string stuck_reason{};         // why it is stuck (status "stuck")
  std::string parent{};               // the instance that called it as a child, if any
  std::string child{};                // the child it waits for (status "waiting" at a call step)
  std::string wait_key{};             // the message key its wait step waits for, if waiting
  std::int64_t wait_deadline_us = 0;  // when its wait times out (0: never or not waiting)
  std::int64_t deadline_us = 0;       // when the instance times out (0: never)
  std::int64_t sleep_until_us = 0;    // when a sleep step wakes it (status "waiting")
  std::int64_t started_at_us = 0;
  std::int64_t updated_at_us = 0;  // the time of its newest history entry (else started_at_us)
  std::int64_t ended_at_us = 0;    // when it ended (0 if it has not): retention counts from here
  std::int64_t run = 0;            // how often it continued as new (0 for the first run)
  std::int64_t retry_at_us = 0;    // when a failed step runs again (status "waiting"), else 0
  int attempt = 0;                 // the attempt its current step is on when retrying, else 0
  struct event {
    std::string step{};
    std::string outcome{};
    std::int64_t at_us = 0;
  };
  std::vector<event> events{};  // `history` decoded, oldest first
  json raw{};                   // the whole record

  // The instance `id` from its stored record (the value at `<instances>.<id>`) and its history
  // entries (the object at `<history>.<id>`, null if none): the one decoder of the record, used
  // by inspect() and list() and by tools reading a journal.
  static workflow_instance from_record(std::string_view id, json record,
                                       const json& history = json());
};

// The process the workflow engine registers for operator actions (park, resume, restart, cancel).
inline constexpr std::string_view workflow_operate_process = "workflow.operate";

// Which instances workflows::list returns; empty fields and zero times match any.
struct workflow_query {
  std::string status{};
  std::string workflow{};            // the workflow's name
  std::string definition_version{};  // the definition an instance started with
  std::int64_t started_from_us = 0;  // started at or after this time
  std::int64_t started_before_us = 0;
  std::int64_t updated_before_us = 0;  // last history entry before this time (idle since)
  std::size_t limit = std::numeric_limits<std::size_t>::max();
};

// A move of instances from one version of a workflow to another (workflows::migrate). Each
// instance's cursor, completed compensable steps, loop counts and the step it waits on are
// renamed through `steps`; a step not listed keeps its name.
struct workflow_migration {
  std::string workflow{};
  std::string from_version{};  // the instances started on this version; empty: every version
                               // other than the target
  std::string to_version{};    // a version this program defines; empty: the newest
  std::map<std::string, std::string> steps{};  // step of the old version -> step of the new
  std::vector<std::string> ids{};              // only these instances; empty: all that match
};

// What workflows::metrics reports: instances per workflow and status in one snapshot, plus the
// engine's own step counters since it was created.
struct workflow_metrics {
  std::uint64_t version = 0;
  std::map<std::pair<std::string, std::string>, std::size_t> instances{};  // (workflow, status)
  std::size_t stuck = 0;
  std::uint64_t steps = 0;           // steps advance() took that changed an instance
  latency_histogram step_latency{};  // advance(): from reading the instance to its commit
};

// `m` in the Prometheus text exposition format, every name starting with `prefix`; serve it
// beside the relay's to_prometheus.
std::string to_prometheus(const workflow_metrics& m, std::string_view prefix = "pop_workflow");

// Where workflow records live, and the prefix of the processes it registers.
struct workflow_options {
  std::string instances = "system.workflows";   // <instances>.<id>
  std::string index = "system.workflow_index";  // runnable, waits, timers, stuck and mailbox
  // <history>.<id>.<sequence number>: one key per history entry, so a step writes its entry and
  // never rewrites the instance's whole history.
  std::string history = "system.workflow_history";
  // How long a message that arrived before any instance waited for it is kept in the mailbox
  // (<index>.mailbox.<key>.<message id>) for the next wait on its key and topic; expire() purges
  // older ones.
  std::chrono::milliseconds mailbox_ttl = std::chrono::hours(24);
  // start() of an id that exists with the same workflow and inputs returns without a change
  // (a retried request); false: kAlreadyExists as for other inputs.
  bool idempotent_start = true;
  // How long an ended instance (record and history) is kept after it ended; expire() purges
  // older ones (then inspect() and wait_for() say kNotFound, and start() of its id starts anew).
  // 0: kept forever.
  std::chrono::milliseconds retention = std::chrono::hours(24 * 7);
  // The most history entries one run of an instance may have: a step that would go past it takes
  // the failure path instead (a loop that never ends must not grow the state without bound).
  // Long-lived instances continue as new (workflow_step::continue_as_new) to start over.
  std::int64_t max_history = 100'000;
};

// The embedded workflow engine.
//
// A step runs as one transaction: a process step's writes and messages commit together with the
// instance's new cursor and history, so a step's effects happen once in the state and its
// messages are emitted once, however often the step is retried or the engine restarted. Every
// other step kind (branch, wait, call, fail, end, timeouts, cancellation, compensation
// bookkeeping) is a transaction too. Instances therefore resume from the state alone: after
// reopening a journal, running instances continue at their cursor and waiting ones keep waiting.
//
// The failure path: a failing process step (or fail step, exceeded loop bound, timeout without
// on_timeout, failed child, cancel) runs the compensations of the completed steps in reverse
// order, one transaction each, then ends "compensated" ("failed" if there was nothing to
// compensate).
//
// Registration (processes, predicates, definitions) must happen before instances run. Advancing
// is driven by workflow_runner (relay/) or by calling advance(). Thread safety: as the engine's.
class workflows {
 public:
  // Returns the workflows of `e`, or kInvalidArgument naming a bad path in `opts`. Registers the
  // operator process (workflow_operate_process) and describes itself and every definition in the
  // engine's journal (engine::describe), so tools find them without the program.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<workflows>> create(
      engine& e, workflow_options opts = {});
  workflows(const workflows&) = delete;
  workflows& operator=(const workflows&) = delete;
  ~workflows();

  // Registers process `spec.name` on the engine (callable directly too) and as a workflow step.
  // Errors as engine::register_process, plus kInvalidArgument for declarations inside the
  // workflow paths.
  [[nodiscard]] absl::Status register_process(process_spec spec, process_fn fn);
  // The paths every workflow process reads and writes: instances, index and history.
  std::vector<std::string> owned_paths() const {
    return {options_.instances, options_.index, options_.history};
  }
  // Registers predicate `name` reading `inputs` (paths). kInvalidArgument, kAlreadyExists.
  [[nodiscard]] absl::Status register_predicate(std::string name, std::vector<std::string> inputs,
                                                predicate_fn fn);
  // Checks and registers `def` as a version of workflow `def.name` (def.version, or a hash of
  // it). Versions run side by side: new instances take the newest defined, running ones keep the
  // version they started on. kInvalidArgument naming the step and the problem: an unknown
  // process, predicate, workflow or step, a step with no or several kinds, an unreachable step,
  // a loop with no bound, a bad condition or version name; kAlreadyExists for a version already
  // defined. Instances of this version that were parked stuck because a program lacked it are
  // resumed (one commit each); the engine's error if that fails (the definition stays
  // registered).
  [[nodiscard]] absl::Status define(workflow_definition def);
  // The version define() records for `def`: def.version, or the hash of its JSON.
  static std::string version_of(const workflow_definition& def);
  // The versions of workflow `name` this program defines, oldest first (the last is what start()
  // takes); empty if none.
  std::vector<std::string> versions(std::string_view name) const;
  // define() of the JSON in file `file_path`; errors name the file.
  [[nodiscard]] absl::Status define_from_file(const std::string& file_path);

  // Starts instance `id` of `workflow` with `inputs` (an object; null, as `{}` is in C++, means
  // no inputs). Returns the commit's version; if the instance exists already with the same
  // workflow and inputs, changes nothing and returns the newest version
  // (options.idempotent_start). kNotFound (no such workflow), kAlreadyExists (id taken by another
  // workflow or other inputs, named in the message), kInvalidArgument (an id that is not one path
  // segment, such as "L.1", or inputs that are not an object or not storable JSON). `timeout_ms`
  // > 0 bounds the instance's life: past it the runner fails it.
  [[nodiscard]] absl::StatusOr<std::uint64_t> start(std::string_view workflow, std::string_view id,
                                                    json inputs = json::object(),
                                                    std::int64_t timeout_ms = 0);
  // The instance `id` in the newest snapshot, or kNotFound.
  [[nodiscard]] absl::StatusOr<workflow_instance> inspect(std::string_view id) const;
  // The instances with `status` (every one if empty), in id order.
  std::vector<workflow_instance> list(std::string_view status = {}) const;
  // The instances `q` selects, in id order, at most q.limit.
  std::vector<workflow_instance> list(const workflow_query& q) const;
  // Instances per workflow and status, stuck ones, steps taken and their latency.
  workflow_metrics metrics() const;
  // Calls `done` once with instance `id` when it has ended (completed, failed, compensated or
  // cancelled):
  // at once, on this thread, if it already has or does not exist (kNotFound), else from the
  // thread of the commit that ended it. Keep the returned subscription: resetting or destroying
  // it stops the wait (and waits for a call in progress); do not reset it, or call wait_for,
  // from inside `done`. A commit that ends no instance costs the waiters nothing; after one that
  // does (or purges one), each looks up its id in the index of ended instances. An instance
  // purged before its waiter saw it end is reported as kNotFound. This object must outlive the
  // subscription. See also pop::wait_for (workflow_runner.hpp), the awaitable form.
  [[nodiscard]] subscription wait_for(
      std::string_view id, std::function<void(absl::StatusOr<workflow_instance>)> done) const;
  // Whether `status` is one an instance ends with.
  static bool ended(std::string_view status) {
    return status == "completed" || status == "failed" || status == "compensated" ||
           status == "cancelled";
  }

  // Cancels a running, waiting or stuck instance: it takes the failure path with `reason` (a
  // child it waits for is cancelled too) and, its compensations done, ends "cancelled".
  // kNotFound; kFailedPrecondition if it has ended.
  [[nodiscard]] absl::Status cancel(std::string_view id, std::string reason = "cancelled");

  // Operator actions. An instance that cannot advance (its workflow is not defined in this
  // program, or its cursor names a step the definition does not have) is parked with status
  // "stuck" and the reason, instead of stopping the runner or waiting silently; it stays stuck
  // until an operator acts (from C++ or the `pop workflow` command):
  // resume() puts a stuck instance back in the status it had (once the program defines what it
  // needs); restart_from() moves a stuck, failed, compensated or cancelled instance to `step`,
  // running, with its error, loop counts and wait cleared, on definition version `version`: if
  // empty, the version it ran on when this program defines it, else the newest this program
  // defines (an instance parked because a deploy dropped its version restarts on a step of the
  // new one), else the one it has. Both are one commit and return its version; kNotFound (no
  // instance; or, when this program defines the workflow, no such version or step),
  // kFailedPrecondition (the instance is not in a status the action applies to). None of them
  // needs the workflow to be defined in this program: they work on the record alone.
  [[nodiscard]] absl::StatusOr<std::uint64_t> resume(std::string_view id);
  [[nodiscard]] absl::StatusOr<std::uint64_t> restart_from(std::string_view id,
                                                           std::string_view step,
                                                           std::string_view version = {});

  // Moves the instances `m` selects (not ended ones) to version m.to_version in one commit, all
  // or none, and returns how many moved. Each is checked against the new version before anything
  // changes: its cursor (and the step it waits on, with the same kind: a wait on the same key, a
  // call, a sleep) and its completed compensable steps must exist there (with a compensation).
  // An instance parked stuck for lack of its version, workflow or step is resumed by the move.
  // kNotFound (no such workflow or version), kInvalidArgument (a mapping naming a step neither
  // version has), kFailedPrecondition naming the first instance and step that cannot move.
  [[nodiscard]] absl::StatusOr<std::size_t> migrate(const workflow_migration& m);

  // Parks every instance that is running, waiting or compensating on a workflow, version or step
  // this program does not define, with the reason (advance() and the timers park such instances
  // when they reach them; this finds waiting ones at once, e.g. after a deploy). Returns how
  // many it parked. workflow_runner calls it when it starts.
  [[nodiscard]] absl::StatusOr<std::size_t> reconcile();

  // Advances instance `id` by one step if it is running or compensating. Returns true if it
  // changed. A step whose process fails with an exception or a contract breach sends the
  // instance down its failure path (that is a change too). Errors: the engine's (kAborted after
  // conflicts, kResourceExhausted, journal errors): the instance is unchanged.
  [[nodiscard]] absl::StatusOr<bool> advance(std::string_view id);
  // Up to `limit` instances that advance() would move now, in id order.
  std::vector<std::string> runnable(std::size_t limit = 1024) const;
  // Moves waits and instances whose time is up down their timeout or failure paths; returns how
  // many, and sets `next_due_us` to the earliest remaining deadline (0 if none). Also purges
  // mailbox messages older than options.mailbox_ttl (at most once per tenth of it) and ended
  // instances older than options.retention (at most once a minute, or a tenth of a shorter
  // retention).
  [[nodiscard]] absl::StatusOr<std::size_t> expire(std::int64_t now_us, std::int64_t& next_due_us);

  // For the inbox: the handler spec and function that resume instances waiting for a message
  // (relay's register_workflow_resume wires them). A message that no instance waits for yet, on a
  // topic some defined wait step takes, is kept in the mailbox of its key: the next wait step on
  // that key and topic takes it at once (so a reply that overtakes its request's commit, or an
  // early signal, is not lost). The inbox absorbs a resend of the same message id; a message on
  // a topic no wait step takes changes nothing. Messages are kept for options.mailbox_ttl.
  // A message carrying the headers of with_start() first starts its instance if that does not
  // exist (kNotFound if its workflow is not defined, kInvalidArgument for bad headers: the inbox
  // then applies nothing).
  process_spec resume_spec() const;
  absl::StatusOr<result> resume(const context& ctx, const outbox_message& m) const;

  // Signal-with-start: `signal` with headers that make the resume handler start instance `id`
  // of `workflow` with `inputs` if it does not exist, then deliver the signal, in one commit:
  // to the instance if it waits on the signal's topic and key, else to the mailbox of its key,
  // where the instance's next wait on that topic and key takes it. Apply it through the inbox
  // (inbox::apply(resume_spec().name, m)) or send it through a broker to an ingress: a resend
  // is absorbed once. An existing instance is signalled whatever its inputs. kInvalidArgument
  // naming the id or inputs that cannot be used.
  [[nodiscard]] static absl::StatusOr<outbox_message> with_start(outbox_message signal,
                                                                 std::string_view workflow,
                                                                 std::string_view id,
                                                                 json inputs = json::object());
  // The headers with_start() sets.
  static constexpr std::string_view start_workflow_header = "pop-start-workflow";
  static constexpr std::string_view start_id_header = "pop-start-id";
  static constexpr std::string_view start_inputs_header = "pop-start-inputs";

  const workflow_options& options() const { return options_; }

 private:
  workflows(engine& e, workflow_options opts);  // validated by create()
  struct registered_process;
  using defined = detail::defined_workflow;
  using resolved = detail::resolution;
  absl::Status check(const workflow_definition& def) const;
  absl::Status register_control(const std::shared_ptr<const defined>& d);
  // The newest version of workflow `name`, or null.
  std::shared_ptr<const defined> find_definition(std::string_view name) const;
  // Version `version` of workflow `name` (the newest if `version` is empty: records from before
  // versions), or null.
  std::shared_ptr<const defined> find_definition(std::string_view name,
                                                 std::string_view version) const;
  // What instance `w` runs on, or why it cannot run here (parked with `kind`).
  resolved resolve(std::string_view workflow, std::string_view version) const;
  // Runs operator action `call` (its time: now) through the operate process.
  absl::StatusOr<commit> operate(detail::operator_call call);
  // Parks instance `w` (seen with status w.status) as stuck with `reason`, of `kind`.
  absl::StatusOr<bool> park(const workflow_instance& w, std::string reason, detail::park_kind kind);
  // The stored record of instance `id` in `snap`: kInvalidArgument for an id that is not a path
  // segment, kNotFound naming the snapshot's version if there is none.
  absl::StatusOr<value_view> record_view(const snapshot& snap, std::string_view id) const;
  // inspect(), reading the history only if asked: the engine's own steps do not need it.
  absl::StatusOr<workflow_instance> inspect(std::string_view id, bool with_history) const;
  // The history entries of instance `id` in `snap` (an object, null if none).
  json history_of(const snapshot& snap, std::string_view id) const;
  // True if a wait step of a defined workflow takes messages on `topic`.
  bool waited_topic(std::string_view topic) const;
  // Deletes mailbox messages older than options.mailbox_ttl (at most once per tenth of it).
  absl::Status purge_mailbox(std::int64_t now_us);
  // Indexes the ended instances that have no entry in the "ended" index (recorded before it
  // existed), at their ended_at_us or else `now` (written into the record too), so retention
  // purges them too. Until it has done so once, on each purge.
  absl::Status index_legacy_ended(std::int64_t now);
  // Deletes ended instances (record, history, index entries) older than options.retention.
  absl::Status purge_ended(std::int64_t now_us);
  // Resumes the instances of version `version` of workflow `name` that were parked because it was
  // not defined.
  absl::Status resume_parked(const std::string& name, const std::string& version);
  engine& engine_;
  const workflow_options options_;
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<const registered_process>, std::less<>> processes_;
  // What this program defines, and the transitions of instances.
  std::unique_ptr<detail::machine> machine_;
  std::atomic<std::int64_t> last_purge_us_{0};
  std::atomic<std::int64_t> last_retention_purge_us_{0};
  std::atomic<bool> legacy_ended_indexed_{false};  // index_legacy_ended finished
  std::atomic<std::uint64_t> steps_{0};
  detail::atomic_histogram step_latency_;
  // wait_for's waiters: told after a commit that changed the index of ended instances, each then
  // looks for its own id there (a commit that ends nothing costs them nothing).
  std::shared_ptr<detail::commit_listeners> ended_waiters_ =
      std::make_shared<detail::commit_listeners>();
  mutable std::mutex watch_mu_;
  mutable value_view last_ended_;  // the ended index as the last look saw it (watch_mu_)
  mutable std::once_flag watching_;
  // The engine subscription that tells the waiters, made by the first wait_for; declared last so
  // it is gone before anything it uses.
  mutable subscription watch_;
};

}  // namespace pop
