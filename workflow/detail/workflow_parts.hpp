// Defines the internals the workflow engine's files share: process names, definition helpers, and
// pop::detail::instance_txn, the one way an instance's state changes.
#pragma once

#include <cstdio>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"
#include "pop/engine/context.hpp"
#include "pop/engine/detail/packed.hpp"
#include "pop/engine/result.hpp"
#include "pop/workflow/detail/model.hpp"
#include "pop/workflow/detail/record.hpp"
#include "pop/workflow/workflow.hpp"

namespace pop::detail {

inline constexpr std::string_view start_process = "workflow.start";
// The longest sleep, timeout or retry interval a definition or start() may ask for (a year), so
// wake times never overflow.
inline constexpr std::int64_t max_duration_ms = 365LL * 24 * 3600 * 1000;
inline constexpr std::string_view resume_process = "workflow.resume";

std::string step_process(std::string_view process);
// The process running the control steps of one version of a workflow.
std::string control_process(std::string_view workflow, std::string_view version);
int kinds(const workflow_step& s);
const char* kind_name(const workflow_step& s);
// The part of a condition path before its first "{input}" segment: what the control process reads.
std::string static_prefix(const std::string& p);
// `paths` without those inside another one (contracts refuse nested declarations).
std::vector<std::string> outermost(const std::vector<std::string>& paths);
// `text` with "{name}" replaced by the string value of input `name`.
absl::StatusOr<std::string> substitute(const std::string& text, const json& inputs);
bool compare(const json& actual, condition_op op, const json& expected);
// FNV-1a of `text`: definition version hashes (recorded in instances, so it must not change) and
// the retry jitter.
inline std::uint64_t fnv1a(std::string_view text) {
  std::uint64_t h = 1469598103934665603ULL;
  for (const unsigned char c : text) h = (h ^ c) * 1099511628211ULL;
  return h;
}
// A child's inputs from `spec` (workflow_step::call_inputs) and its parent's `inputs`: "{name}"
// alone passes the input as it is, other strings are filled in, other values taken as they are;
// null `spec`: `inputs`. kInvalidArgument naming the child input whose parent input is missing.
absl::StatusOr<json> child_inputs(const json& spec, const json& inputs);

// The record of a new instance of `workflow` (version `definition_version`) at step `start`,
// running; a child names its `parent` and the parent's step.
instance_record new_record(std::string_view workflow, const std::string& definition_version,
                           const std::string& start, json inputs, std::int64_t now,
                           std::int64_t deadline, std::string_view parent,
                           std::string_view parent_step);

// One transaction on one instance, inside a process run: reads through `ctx`, collects writes in
// `out`. Every state change of an instance goes through here.
class instance_txn {
 public:
  instance_txn(const workflow_options& o, const context& ctx, result& out, std::string id,
               std::int64_t now)
      : o_(o), ctx_(ctx), out_(out), id_(std::move(id)), now_(now) {}

  std::string instance_path(std::string_view id) const {
    return absl::StrCat(o_.instances, ".", detail::to_absl(id));
  }
  std::string index_path(std::string_view kind, std::string_view id) const {
    return absl::StrCat(o_.index, ".", detail::to_absl(kind), ".", detail::to_absl(id));
  }

  // Loads the record; false if there is none.
  bool load() {
    const value_view v = ctx_.view(instance_path(id_));
    if (!v) return false;
    rec_ = instance_record::from_view(v);
    loaded_ = true;
    // The runnable index agrees with the stored status: a step that stays runnable need not
    // write it again.
    indexed_runnable_ = is_runnable(rec_.status) ? 1 : 0;
    return true;
  }
  // True if load() found the record (or create() made it).
  bool loaded() const { return loaded_; }
  instance_record& rec() { return rec_; }
  const instance_record& rec() const { return rec_; }
  const std::string& id() const { return id_; }
  instance_status status() const { return rec_.status; }
  // The status as the record stores it (for messages: an unknown one by its own name).
  std::string status_text() const { return std::string(rec_.status_name()); }
  std::string cursor() const { return rec_.cursor; }
  std::string workflow() const { return rec_.workflow; }
  // The version of its workflow it runs on (empty for records from before versions).
  std::string version() const { return rec_.version; }

  // The number in the ids of the children step `step` starts now: its visit in the first run,
  // and never one it used before (not after a restart or a continue-as-new, which reset visits),
  // so a child id never names an older child's record.
  std::int64_t call_number(const std::string& step) {
    std::map<std::string, std::int64_t>& calls = rec_.calls ? *rec_.calls : rec_.calls.emplace();
    const auto visit = rec_.visits.find(step);
    const auto last = calls.find(step);
    const std::int64_t n = std::max<std::int64_t>((last == calls.end() ? 0 : last->second) + 1,
                                                  visit == rec_.visits.end() ? 1 : visit->second);
    calls[step] = n;
    return n;
  }
  // True if an instance `id` exists (a child id must not name one).
  bool exists(const std::string& id) const { return ctx_.view(instance_path(id)).exists(); }

  // Makes the record of a new instance of `def_name` (its version `version`), running at `start`.
  void create(const std::string& def_name, const std::string& version, const std::string& start,
              json inputs, std::int64_t deadline) {
    rec_ = new_record(def_name, version, start, std::move(inputs), now_, deadline, "", "");
    loaded_ = true;
    set_status(instance_status::running);
    refresh_timer();
  }

  // Appends a history entry under its own key (<history>.<id>.<sequence>), so a step costs the
  // same however long the history is.
  void history(const std::string& step, const std::string& outcome) {
    // A record from before entries had keys keeps its list; numbering continues after it.
    const std::int64_t next = rec_.history_next.value_or(
        rec_.legacy_history.is_array() ? static_cast<std::int64_t>(rec_.legacy_history.size()) : 0);
    char seq[24];
    std::snprintf(seq, sizeof seq, "%012lld", static_cast<long long>(next));
    // {"at_us", "outcome", "step"}, written straight in packed form.
    packed::writer entry;
    entry.begin_object();
    entry.key("at_us");
    entry.integer(now_);
    entry.key("outcome");
    entry.string(outcome);
    entry.key("step");
    entry.string(step);
    entry.end();
    out_.set(absl::StrCat(o_.history, ".", id_, ".", seq), packed::as_json(entry.bytes()));
    rec_.history_next = next + 1;
  }

  // Moves the cursor to `step`, running.
  void go(const std::string& step) {
    rec_.retry.reset();  // a new step starts with its own attempts
    rec_.cursor = step;
    set_status(instance_status::running);
  }

  void set_status(instance_status status) {
    rec_.set_status(status);
    status_changed();
  }
  // Restores a status saved by name (when unparking), as it was, even one this program does not
  // know.
  void restore_status(const std::string& name) {
    rec_.set_status_name(name);
    status_changed();
  }

  // Removes the wait and timer index entries of a waiting instance.
  void clear_wait() {
    if (rec_.wait_key) {
      out_.erase(absl::StrCat(o_.index, ".waits.", *rec_.wait_key, ".", id_));
      rec_.wait_key.reset();
    }
    rec_.wait_deadline_us.reset();
    rec_.sleep_until_us.reset();
    rec_.retry_at_us.reset();
    refresh_timer();
  }

  void refresh_timer() {
    std::int64_t due = 0;
    for (const std::optional<std::int64_t>* f :
         {&rec_.wait_deadline_us, &rec_.deadline_us, &rec_.sleep_until_us, &rec_.retry_at_us}) {
      const std::int64_t d = f->value_or(0);
      if (d > 0 && (due == 0 || d < due)) due = d;
    }
    const bool ended = is_final(status()) || status() == instance_status::stuck;
    if (due > 0 && !ended) {
      out_.set(index_path("timers", id_), due);
    } else {
      out_.erase(index_path("timers", id_));
    }
  }

  // Takes the failure path: compensations if any, else failed.
  void fail_path(const std::string& reason) {
    rec_.error = reason;
    clear_wait();
    if (!rec_.done.empty()) {
      // Compensations run to the end: the instance's own deadline no longer applies.
      rec_.deadline_us.reset();
      refresh_timer();
      set_status(instance_status::compensating);
    } else {
      finish(instance_status::failed);
    }
  }

  // Parks the instance as stuck with `reason`; `kind` says why. An index entry lets define() find
  // the instances that a returning definition unparks.
  void park(const std::string& reason, park_kind kind, bool resumable = true) {
    rec_.stuck = instance_record::stuck_info{status_text(), reason, kind, "", now_, resumable};
    history(rec_.cursor, absl::StrCat("stuck: ", reason));
    set_status(instance_status::stuck);
    refresh_timer();
    json entry(json::value_t::object);
    entry["workflow"] = rec_.workflow;
    entry["version"] = rec_.version;
    entry["kind"] = park_kind_name(kind);
    out_.set(index_path("stuck", id_), std::move(entry));
  }
  // Forgets that the instance was stuck (the caller sets its new status).
  void unpark() {
    rec_.stuck.reset();
    out_.erase(index_path("stuck", id_));
  }
  // A stuck instance that was waiting: true if its wait is for child `child` (or any if empty).
  bool stuck_waiting(std::string_view child = {}) const {
    if (status() != instance_status::stuck || !rec_.stuck ||
        parse_status(rec_.stuck->status) != instance_status::waiting) {
      return false;
    }
    return child.empty() || (rec_.child && *rec_.child == child);
  }
  // What happened to a stuck instance that it can no longer resume from: an operator must restart
  // it from a step or cancel it.
  void cannot_resume(const std::string& what) {
    instance_record::stuck_info& st = rec_.stuck ? *rec_.stuck : rec_.stuck.emplace();
    st.resumable = false;
    st.reason = absl::StrCat(st.reason, "; then ", what, ": restart it from a step or cancel it");
    history(rec_.cursor, absl::StrCat("while stuck: ", what));
  }

  // Ends the instance with `status` (completed, failed, compensated); a cancelled instance that
  // ends on its failure path ends "cancelled".
  void finish(instance_status status) {
    set_status(status != instance_status::completed && rec_.cancelled ? instance_status::cancelled
                                                                      : status);
    rec_.wait_deadline_us.reset();
    rec_.deadline_us.reset();
    rec_.retry.reset();
    refresh_timer();
    // Indexed by the time it ended, for purging after the retention period.
    rec_.ended_at_us = now_;
    out_.set(index_path("ended", id_), now_);
    ended_ = true;
  }
  bool ended() const { return ended_; }

  // True if the instance is retrying `step` (a retry is not a visit).
  bool retrying(const std::string& step) const { return rec_.retry && rec_.retry->step == step; }
  // True if the retry it waits for (or runs) is of a compensation.
  bool compensation_retry() const { return rec_.retry && rec_.retry->compensation; }

  // Counts a visit to `step`; false (and the failure path) if that exceeds its bound.
  bool visit(const workflow_step& step) {
    // The bound counts from the run's (or an operator restart's) start; the steps that end a run
    // or start the next are always allowed.
    if (const std::int64_t entries = rec_.history_next.value_or(0) - rec_.history_base.value_or(0);
        o_.max_history > 0 && entries >= o_.max_history && !step.end && !step.continue_as_new) {
      fail_path(absl::StrCat("its history reached ", entries,
                             " entries (workflow_options::max_history): a long-lived instance "
                             "continues as new (a continue_as_new step) to start over"));
      return false;
    }
    const std::int64_t n = ++rec_.visits[step.name];
    const int bound = step.max_visits > 0 ? step.max_visits : 1;
    if (n > bound) {
      history(step.name, "loop bound exceeded");
      fail_path(
          absl::StrCat("step '", step.name, "' would run ", n, " times; its bound is ", bound));
      return false;
    }
    return true;
  }

  // The arguments a step process gets: the inputs, plus "_instance" and "_received".
  json args() const {
    json a = rec_.inputs;
    a["_instance"] = id_;
    if (!rec_.received.empty()) a["_received"] = rec_.received;
    return a;
  }

  // Writes the record: straight in packed form (no JSON built) when it can be written so.
  void save() { out_.set(instance_path(id_), stored(rec_)); }
  // save() as the transaction's last use of the record (which it may move from).
  void save_last() {
    out_.set(instance_path(id_), stored(std::move(rec_)));
    rec_ = instance_record();
  }

  // `r` as a write's value: its packed bytes, or its JSON when it cannot be packed directly.
  template <class Record>
  static json stored(Record&& r) {
    if (std::optional<std::string> bytes = r.to_packed()) return packed::as_json(*bytes);
    return std::forward<Record>(r).to_json();
  }

  const context& ctx() const { return ctx_; }
  result& out() { return out_; }
  std::int64_t now() const { return now_; }
  const workflow_options& opts() const { return o_; }

 private:
  // Keeps the ended and runnable index entries in step with the status just set.
  void status_changed() {
    if (!is_final(rec_.status) && rec_.ended_at_us) {
      // Restarted after it ended: no longer due for purging.
      rec_.ended_at_us.reset();
      out_.erase(index_path("ended", id_));
    }
    const bool runnable = is_runnable(rec_.status);
    if (indexed_runnable_ == (runnable ? 1 : 0)) return;
    if (runnable) {
      out_.set(index_path("runnable", id_), true);
    } else {
      out_.erase(index_path("runnable", id_));
    }
    indexed_runnable_ = runnable ? 1 : 0;
  }

  const workflow_options& o_;
  const context& ctx_;
  result& out_;
  std::string id_;
  std::int64_t now_;
  instance_record rec_;
  bool loaded_ = false;
  bool ended_ = false;
  int indexed_runnable_ = -1;  // whether <index>.runnable.<id> is set (1) or not (0); -1: unknown
};

// Cancels `t`'s instance (loaded): a child it waits for is cancelled with it, then it takes the
// failure path with `reason`. kFailedPrecondition if it has ended.
absl::Status cancel_instance(instance_txn& t, const std::string& reason);

// Cancels child `id` of `t`'s instance with `reason` (and its own children), unless it has ended
// or is compensating already.
void cancel_child(instance_txn& t, const std::string& id, const std::string& reason);
// Cancels every child `t`'s instance waits for (a call's, a fan-out's running ones) and forgets
// them: it is leaving the step that started them.
void cancel_children(instance_txn& t, const std::string& reason);

// The operator process (workflow_operate_process): args {"id", "action", "now", ...}; actions
// "park" ("expect": the status seen, "reason"), "resume", "restart" ("step") and "cancel"
// ("reason"). Works on the record alone, without the definition.
absl::StatusOr<result> operate(const workflow_options& o, const context& ctx, const json& args);

// The migration process (migrate_process): args {"workflow", "to", "steps": {old: new}, "ids",
// "target": {step: {"kind", "compensate", "topics"}}, "now"}: moves each listed instance to version
// "to", all or none; kFailedPrecondition naming the first that cannot move. Needs no definition:
// the caller passes what it checks against.
absl::StatusOr<result> migrate(const workflow_options& o, const context& ctx, const json& args);
inline constexpr std::string_view migrate_process = "workflow.migrate";

}  // namespace pop::detail

namespace pop {

// The workflow sources use the helpers unqualified.
using detail::compare;
using detail::control_process;
using detail::kind_name;
using detail::kinds;
using detail::new_record;
using detail::outermost;
using detail::resume_process;
using detail::start_process;
using detail::static_prefix;
using detail::step_process;
using detail::substitute;

struct workflows::registered_process {
  process_contract contract;
  process_fn fn;
};

}  // namespace pop
