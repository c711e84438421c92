#include "pop/workflow/detail/machine.hpp"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pop/contracts/status.hpp"
#include "pop/workflow/detail/workflow_parts.hpp"

namespace pop::detail {

// ---- what this program defines ---------------------------------------------------------------

void machine::add(std::shared_ptr<const defined_workflow> d) {
  std::lock_guard lock(mu_);
  definitions_[d->def.name].push_back(std::move(d));
}

bool machine::add_predicate(const std::string& name, predicate_entry p) {
  std::lock_guard lock(mu_);
  return predicates_.emplace(name, std::make_shared<const predicate_entry>(std::move(p))).second;
}

std::shared_ptr<const predicate_entry> machine::predicate(std::string_view name) const {
  std::lock_guard lock(mu_);
  const auto it = predicates_.find(name);
  return it == predicates_.end() ? nullptr : it->second;
}

std::shared_ptr<const defined_workflow> machine::find(std::string_view name) const {
  return find(name, {});
}

std::shared_ptr<const defined_workflow> machine::find(std::string_view name,
                                                      std::string_view version) const {
  std::lock_guard lock(mu_);
  const auto it = definitions_.find(name);
  if (it == definitions_.end() || it->second.empty()) return nullptr;
  if (version.empty()) return it->second.back();
  for (const std::shared_ptr<const defined_workflow>& d : it->second) {
    if (d->version == version) return d;
  }
  return nullptr;
}

std::vector<std::string> machine::versions(std::string_view name) const {
  std::vector<std::string> out;
  std::lock_guard lock(mu_);
  if (const auto it = definitions_.find(name); it != definitions_.end()) {
    for (const std::shared_ptr<const defined_workflow>& d : it->second) out.push_back(d->version);
  }
  return out;
}

std::vector<std::shared_ptr<const defined_workflow>> machine::all() const {
  std::vector<std::shared_ptr<const defined_workflow>> out;
  std::lock_guard lock(mu_);
  for (const auto& [name, versions] : definitions_) {
    out.insert(out.end(), versions.begin(), versions.end());
  }
  return out;
}

resolution machine::resolve(std::string_view workflow, std::string_view version) const {
  if (std::shared_ptr<const defined_workflow> d = find(workflow, version)) {
    return {std::move(d), "", park_kind::unknown};
  }
  const std::vector<std::string> defined_versions = versions(workflow);
  if (defined_versions.empty()) {
    return {nullptr,
            absl::StrCat("its workflow '", to_absl(workflow), "' (definition version ",
                         to_absl(version), ") is not defined in this program"),
            park_kind::undefined};
  }
  return {nullptr,
          absl::StrCat("its definition version '", to_absl(version), "' of workflow '",
                       to_absl(workflow), "' is not defined in this program (it defines ",
                       absl::StrJoin(defined_versions, ", "),
                       "): define that version beside the new one, or migrate the instance"),
          park_kind::missing_version};
}

// ---- transitions -----------------------------------------------------------------------------

void machine::settle(instance_txn& t) const {
  if (!t.ended() || !t.rec().parent) return;
  instance_txn parent(t.opts(), t.ctx(), t.out(), *t.rec().parent, t.now());
  if (!parent.load()) return;
  if (std::optional<instance_record::fan_out_info>& fan = parent.rec().fan_out;
      fan && fan->children.contains(t.id())) {
    if (parent.status() == instance_status::stuck) {
      // Parked while its children ran: an operator restarts it (resuming could not join).
      fan->children[t.id()] = t.status();
      if (parent.stuck_waiting()) {
        parent.cannot_resume(
            absl::StrCat("its child '", t.id(), "' ended (", t.status_text(), ")"));
      }
      parent.save();
      return;
    }
    if (parent.status() != instance_status::waiting) return;
    const resolution r = resolve(parent.workflow(), parent.version());
    const std::string at_step = fan->step;
    const defined_workflow::compiled* at = r.def ? r.def->find(at_step) : nullptr;
    const workflow_step* step = at ? at->step : nullptr;
    const fan_out_kind* kind = at ? std::get_if<fan_out_kind>(&at->kind) : nullptr;
    if (!kind) {
      parent.park(absl::StrCat(r.def ? "its fan-out step is not in its workflow" : r.reason,
                               " when its child '", t.id(), "' ended (", t.status_text(),
                               "): restart it from a step, migrate or cancel it"),
                  r.def ? park_kind::missing_step : r.kind, false);
      parent.save();
      return;
    }
    settle_fan_out(parent, t, *step, *kind);
    settle(parent);
    parent.save();
    return;
  }
  if (parent.rec().child != t.id()) return;
  if (parent.stuck_waiting(t.id())) {
    // Parked while this child ran: resuming it would wait for an outcome that has come.
    parent.cannot_resume(absl::StrCat("its child '", t.id(), "' ended (", t.status_text(), ")"));
    parent.save();
    return;
  }
  if (parent.status() != instance_status::waiting) return;
  const resolution r = resolve(parent.workflow(), parent.version());
  const std::string at_step = parent.rec().parent_step_of_child.value_or("");
  const workflow_step* step = r.def ? r.def->step(at_step) : nullptr;
  const instance_status status = t.status();
  if (!step) {
    // The parent cannot take its child's outcome here: parked, not failed, for an operator.
    parent.park(absl::StrCat(r.def ? absl::StrCat("its step '", at_step, "' is not in its workflow")
                                   : r.reason,
                             " when its child '", t.id(), "' ended (", t.status_text(),
                             "): restart it from a step, migrate or cancel it"),
                r.def ? park_kind::missing_step : r.kind, false);
    parent.save();
    return;
  }
  parent.rec().child.reset();
  parent.rec().parent_step_of_child.reset();
  if (status == instance_status::completed) {
    parent.history(step->name, absl::StrCat("child ", t.id(), " completed"));
    parent.go(step->next);
  } else {
    parent.history(step->name, absl::StrCat("child ", t.id(), " ", t.status_text()));
    if (!step->on_error.empty()) {
      parent.go(step->on_error);
    } else {
      parent.fail_path(absl::StrCat("child '", t.id(), "' ", t.status_text(), ": ", t.rec().error));
    }
  }
  settle(parent);
  parent.save();
}

void machine::start_fan_out(instance_txn& t, const workflow_step& step, const fan_out_kind& fan,
                            const json& inputs) const {
  const workflow_map* map = fan.map ? &*fan.map : nullptr;
  std::size_t total = fan.branches.size();
  if (map) {
    const auto list = inputs.find(map->over);
    if (list == inputs.end() || !list->is_array() || list->size() > 10'000) {
      t.history(step.name, "bad map input");
      t.fail_path(absl::StrCat("step '", step.name, "' maps over input '", map->over,
                               "', which is ",
                               list == inputs.end() ? "missing"
                               : !list->is_array()  ? "not a list"
                                                    : "longer than 10,000 elements"));
      return;
    }
    total = list->size();
  }
  const std::size_t first = map && map->max_concurrency > 0
                                ? std::min(total, static_cast<std::size_t>(map->max_concurrency))
                                : total;
  // Every first child's inputs before any child exists: a bad one starts none.
  std::vector<json> batch;
  for (std::size_t i = 0; i < first; ++i) {
    absl::StatusOr<json> in =
        map ? (map->inputs.is_null() ? json::object() : child_inputs(map->inputs, inputs))
            : child_inputs(fan.branches[i].inputs, inputs);
    if (!in.ok()) {
      t.history(step.name, "bad child inputs");
      t.fail_path(absl::StrCat("step '", step.name, "': ", in.status().message()));
      return;
    }
    if (map) (*in)[map->as] = inputs.at(map->over).at(i);
    batch.push_back(*std::move(in));
  }
  const std::int64_t visit = t.call_number(step.name);
  t.rec().fan_out = instance_record::fan_out_info{map ? "map" : "parallel",
                                                  step.name,
                                                  absl::StrCat(t.id(), "-", step.name, "-", visit),
                                                  {},
                                                  0,
                                                  static_cast<std::int64_t>(total)};
  if (total == 0) {
    t.rec().fan_out.reset();
    t.rec().received[step.name] = json::object();
    t.history(step.name, "no children to run");
    t.go(step.next);
    return;
  }
  // Checked before any child is written, so a refused fan-out leaves none behind.
  const std::string base = t.rec().fan_out->base;
  for (std::size_t i = 0; i < first; ++i) {
    const std::string id = absl::StrCat(base, "-", i);
    const std::string& call = map ? map->call : fan.branches[i].call;
    if (t.exists(id) || !find(call)) {
      t.rec().fan_out.reset();
      t.history(step.name, "cannot start its children");
      t.fail_path(absl::StrCat(
          "step '", step.name, "': ",
          t.exists(id) ? absl::StrCat("its child id '", id, "' names an existing instance")
                       : absl::StrCat("it calls unknown workflow '", call, "'")));
      return;
    }
  }
  for (json& in : batch) {
    if (!start_fan_child(t, step, fan, std::move(in))) return;
  }
  t.history(step.name, absl::StrCat("started ", first, " of ", total, " children"));
  t.set_status(instance_status::waiting);
}

bool machine::start_fan_child(instance_txn& t, const workflow_step& step, const fan_out_kind& kind,
                              json child_inputs) const {
  instance_record::fan_out_info& fan = *t.rec().fan_out;
  const std::size_t i = static_cast<std::size_t>(fan.next);
  const std::string& call = kind.map ? kind.map->call : kind.branches.at(i).call;
  const std::shared_ptr<const defined_workflow> d = find(call);
  if (!d) {
    t.history(step.name, "unknown workflow");
    t.fail_path(absl::StrCat("step '", step.name, "' calls unknown workflow '", call, "'"));
    return false;
  }
  const std::string id = absl::StrCat(fan.base, "-", i);
  if (t.exists(id)) {
    t.history(step.name, "child id taken");
    cancel_children(t, absl::StrCat("its parent '", t.id(), "' failed to start a child"));
    t.fail_path(
        absl::StrCat("step '", step.name, "': its child id '", id, "' names an existing instance"));
    return false;
  }
  t.out().set(t.instance_path(id),
              new_record(call, d->version, d->def.start, std::move(child_inputs), t.now(), 0,
                         t.id(), step.name)
                  .to_json());
  t.out().set(t.index_path("runnable", id), true);
  fan.children[id] = instance_status::running;
  fan.next = static_cast<std::int64_t>(i) + 1;
  return true;
}

void machine::settle_fan_out(instance_txn& parent, instance_txn& child, const workflow_step& step,
                             const fan_out_kind& kind) const {
  instance_record::fan_out_info& fan = *parent.rec().fan_out;
  std::map<std::string, instance_status>& children = fan.children;
  const instance_status status = child.status();
  children[child.id()] = status;
  const bool any = kind.join == join_mode::any;
  const auto join = [&](bool ok, const std::string& why) {
    // The children still running are not needed any more.
    json outcomes(json::value_t::object);
    for (auto& [id, st] : children) {
      if (st == instance_status::running) {
        cancel_child(parent, id, absl::StrCat("its parent '", parent.id(), "' joined: ", why));
        st = instance_status::cancelled;
      }
      outcomes[id] = st;
    }
    parent.rec().received[step.name] = std::move(outcomes);
    parent.rec().fan_out.reset();
    parent.history(step.name, why);
    if (ok) {
      parent.go(step.next);
    } else if (!step.on_error.empty()) {
      parent.go(step.on_error);
    } else {
      parent.fail_path(absl::StrCat("step '", step.name, "': ", why));
    }
  };
  if (any && status == instance_status::completed) {
    join(true, absl::StrCat("child ", child.id(), " completed first"));
    return;
  }
  if (!any && status != instance_status::completed) {
    join(false,
         absl::StrCat("child '", child.id(), "' ", child.status_text(), ": ", child.rec().error));
    return;
  }
  parent.history(step.name, absl::StrCat("child ", child.id(), " ", child.status_text()));
  const std::int64_t total = fan.total;
  if (kind.map && fan.next < total) {
    // A map keeps max_concurrency children running: the next element takes this one's place.
    const workflow_map& map = *kind.map;
    const json& inputs = parent.rec().inputs;
    absl::StatusOr<json> in =
        map.inputs.is_null() ? json::object() : child_inputs(map.inputs, inputs);
    if (!in.ok()) {
      join(false, std::string(in.status().message()));
      return;
    }
    (*in)[map.as] = inputs.at(map.over).at(static_cast<std::size_t>(fan.next));
    if (!start_fan_child(parent, step, kind, *std::move(in))) return;
  }
  for (const auto& [id, st] : children) {
    if (st == instance_status::running) return;
  }
  if (fan.next < total) return;
  if (any) {
    join(false, "no child completed");
  } else {
    join(true, absl::StrCat("all ", total, " children completed"));
  }
}

namespace {

// The delay before attempt `attempt` + 1 under policy `p`: growing per attempt up to the cap; the
// jitter is a hash of `seed` and the attempt, so running the same state again decides the same.
std::int64_t retry_delay_us(const workflow_retry& p, const std::string& seed, int attempt) {
  double delay_ms = static_cast<double>(p.initial_ms);
  for (int i = 1; i < attempt && delay_ms < static_cast<double>(p.max_interval_ms); ++i) {
    delay_ms *= p.multiplier;
  }
  delay_ms = std::min(delay_ms, static_cast<double>(p.max_interval_ms));
  const std::uint64_t h = fnv1a(absl::StrCat(seed, "/", attempt));
  const double unit = static_cast<double>(h >> 11) / static_cast<double>(1ULL << 53);
  delay_ms *= 1.0 + p.jitter * (2.0 * unit - 1.0);
  return static_cast<std::int64_t>(delay_ms * 1000.0);
}

// The record of a retry of `step` (its compensation if `compensation`) as attempt `attempt`.
instance_record::retry_info retry_state(const std::string& step, std::int64_t attempt,
                                        bool compensation) {
  return {step, attempt, compensation};
}

// After `what` of `step` failed with `code` ("error" for the step's process, "compensation 'x'
// failed" for its compensation): if its retry policy allows another attempt, makes the instance
// wait for it (history: "<what> (attempt 1 of 3): ...; retrying in 100 ms") and returns nullopt;
// else returns how the attempts ended ("", " after 3 attempts", " (CODE is not retryable)").
std::optional<std::string> retry_or_exhausted(instance_txn& t, const workflow_step& step,
                                              absl::StatusCode code, const std::string& error,
                                              std::string_view what, bool compensation) {
  const workflow_retry& p = step.retry;
  const int attempt = t.retrying(step.name) && t.compensation_retry() == compensation
                          ? static_cast<int>(t.rec().retry->attempt)
                          : 1;
  const std::string code_name = absl::StatusCodeToString(code);
  const bool permanent =
      std::find(p.non_retryable.begin(), p.non_retryable.end(), code_name) != p.non_retryable.end();
  if (attempt < p.attempts && !permanent) {
    const std::int64_t delay_us = retry_delay_us(
        p, absl::StrCat(t.id(), "/", step.name, compensation ? "/compensation" : ""), attempt);
    t.history(step.name, absl::StrCat(to_absl(what), " (attempt ", attempt, " of ", p.attempts,
                                      "): ", error, "; retrying in ", delay_us / 1000, " ms"));
    t.rec().retry = retry_state(step.name, attempt + 1, compensation);
    t.rec().retry_at_us = t.now() + delay_us;
    t.set_status(instance_status::waiting);
    t.refresh_timer();
    return std::nullopt;
  }
  if (permanent && p.attempts > 1) return absl::StrCat(" (", code_name, " is not retryable)");
  return p.attempts > 1 ? absl::StrCat(" after ", attempt, " attempts") : std::string();
}

}  // namespace

void machine::fail_step(instance_txn& t, const workflow_step& step, const process_kind& kind,
                        absl::StatusCode code, const std::string& error) const {
  const std::optional<std::string> after = retry_or_exhausted(t, step, code, error, "error", false);
  if (!after) return;
  t.history(step.name, absl::StrCat("error", *after, ": ", error));
  const std::string reason = absl::StrCat("step '", step.name, "' failed", *after, ": ", error);
  if (kind.on_exhausted == exhausted_action::pause) {
    // Resumed by an operator, it runs the step again with a fresh set of attempts.
    t.rec().retry = retry_state(step.name, 1, false);
    t.park(absl::StrCat(reason, ": resume it to try again"), park_kind::retries_exhausted);
    return;
  }
  t.rec().retry.reset();
  if (!step.on_error.empty() && kind.on_exhausted != exhausted_action::compensate) {
    t.go(step.on_error);
  } else {
    t.fail_path(reason);
  }
}

void machine::fail_compensation(instance_txn& t, const workflow_step& step,
                                const process_kind& kind, absl::StatusCode code,
                                const std::string& error) const {
  const std::string what = absl::StrCat("compensation '", kind.compensate, "'");
  const std::optional<std::string> after =
      retry_or_exhausted(t, step, code, error, absl::StrCat(what, " failed"), true);
  if (!after) return;
  t.history(step.name, absl::StrCat("compensation failed", *after, ": ", error));
  if (kind.on_exhausted == exhausted_action::pause) {
    // Resumed by an operator, the compensation runs again with a fresh set of attempts.
    t.rec().retry = retry_state(step.name, 1, true);
    t.park(absl::StrCat(what, " of step '", step.name, "' failed", *after, ": ", error,
                        ": resume it to try again"),
           park_kind::retries_exhausted);
    return;
  }
  t.rec().error = absl::StrCat(t.rec().error, "; ", what, " failed", *after, ": ", error);
  t.finish(instance_status::failed);
}

void machine::run_control_step(instance_txn& t, const defined_workflow& d,
                               const workflow_step& step, const step_kind& kind) const {
  if (!t.visit(step)) return;
  const json inputs = t.rec().inputs;
  std::visit(
      overloaded{
          [&](const process_kind&) {
            // Runs in its own step process (machine::step), never here.
          },
          [&](const end_kind&) {
            t.history(step.name, "completed");
            t.finish(instance_status::completed);
          },
          [&](const fail_kind& k) {
            t.history(step.name, "failed");
            t.fail_path(k.reason);
          },
          [&](const continue_as_new_kind&) {
            // The next run starts from scratch but for its inputs and id: the old run's history
            // keys go in this commit, so the state an instance holds stays bounded however long
            // it lives.
            instance_record& rec = t.rec();
            const std::int64_t run = rec.run.value_or(0) + 1;
            t.out().erase(absl::StrCat(t.opts().history, ".", t.id()));
            rec.legacy_history = json();
            rec.history_next = 0;
            rec.run = run;
            rec.visits.clear();
            rec.done.clear();
            rec.received = json::object();
            rec.error.clear();
            // The next run takes the newest version of its workflow (as a new instance would):
            // how a long-lived instance moves to new code. Its version stays if the newest has no
            // such start.
            const std::shared_ptr<const defined_workflow> newest = find(t.workflow());
            const defined_workflow* next = &d;
            if (newest != nullptr && newest->version != d.version &&
                newest->step(newest->def.start) != nullptr) {
              next = newest.get();
              rec.definition_name = rec.workflow;
              rec.version = newest->version;
              t.history(step.name, absl::StrCat("continued as new: run ", run, " on version '",
                                                newest->version, "' (was '", d.version, "')"));
            } else {
              t.history(step.name, absl::StrCat("continued as new: run ", run));
            }
            t.go(next->def.start);
          },
          [&](const branch_kind& k) {
            for (const branch_kind::condition& c : k.conditions) {
              bool holds = false;
              if (c.op == condition_op::predicate) {
                const std::shared_ptr<const predicate_entry> pred = predicate(c.predicate);
                holds = pred && pred->fn(t.ctx(), inputs);
              } else {
                absl::StatusOr<std::string> at = substitute(c.path, inputs);
                if (!at.ok()) {
                  t.history(step.name, "bad condition");
                  t.fail_path(absl::StrCat("step '", step.name, "': ", at.status().message()));
                  return;
                }
                const std::optional<json> v = t.ctx().find<json>(*at);
                holds = c.op == condition_op::exists ? v.has_value()
                                                     : (v && compare(*v, c.op, c.value));
              }
              if (holds) {
                t.history(step.name, absl::StrCat("-> ", c.next));
                t.go(c.next);
                return;
              }
            }
            t.history(step.name, absl::StrCat("-> ", k.otherwise));
            t.go(k.otherwise);
          },
          [&](const wait_kind& k) {
            const auto key = inputs.find(k.key);
            const std::string key_text =
                key == inputs.end() ? ""
                                    : (key->is_string() ? key->get<std::string>() : key->dump());
            if (!path::parse(absl::StrCat("k.", key_text)).ok()) {
              t.history(step.name, "bad wait key");
              t.fail_path(absl::StrCat("step '", step.name, "' waits on input '", k.key,
                                       "', which is missing or not usable as a key"));
              return;
            }
            // A message that arrived before the instance waited for it is in the mailbox of its
            // key: the oldest on one of this step's topics is taken now, in this commit.
            const std::string mailbox = absl::StrCat(t.opts().index, ".mailbox.", key_text);
            std::optional<std::pair<std::string, json>> early;
            const value_view kept = t.ctx().view(mailbox);
            kept.for_each_member([&](std::string_view id, const value_view& v) {
              json entry = v.to_json();
              if (entry.is_object() && k.topics.contains(entry.value("topic", ""))) {
                early.emplace(std::string(id), std::move(entry));
                return false;
              }
              return true;
            });
            if (early) {
              const std::string topic = early->second.value("topic", "");
              // The key's last message takes the key with it.
              t.out().erase(kept.size() == 1 ? mailbox : absl::StrCat(mailbox, ".", early->first));
              t.rec().received[topic] = early->second.value("payload", json());
              t.history(step.name,
                        absl::StrCat("received ", topic, " (", early->first, ") from the mailbox"));
              t.go(k.topics.at(topic));
              return;
            }
            std::vector<std::string> topics;
            for (const auto& [topic, next] : k.topics) topics.push_back(topic);
            t.rec().wait_key = key_text;
            t.out().set(absl::StrCat(t.opts().index, ".waits.", key_text, ".", t.id()), topics);
            if (k.timeout_ms > 0) t.rec().wait_deadline_us = t.now() + k.timeout_ms * 1000;
            t.history(step.name, "waiting");
            t.set_status(instance_status::waiting);
            t.refresh_timer();
          },
          [&](const sleep_kind& k) {
            t.rec().sleep_until_us = t.now() + k.ms * 1000;
            t.history(step.name, absl::StrCat("sleeping ", k.ms, " ms"));
            t.set_status(instance_status::waiting);
            t.refresh_timer();
          },
          [&](const fan_out_kind& k) { start_fan_out(t, step, k, inputs); },
          [&](const call_kind& k) {
            const std::shared_ptr<const defined_workflow> child_def = find(k.workflow);
            const std::string child_id =
                absl::StrCat(t.id(), "-", step.name, "-", t.call_number(step.name));
            if (!child_def) {
              t.fail_path(
                  absl::StrCat("step '", step.name, "' calls unknown workflow '", k.workflow, "'"));
              return;
            }
            absl::StatusOr<json> filled = child_inputs(k.inputs, inputs);
            if (!filled.ok()) {
              t.history(step.name, "bad child inputs");
              t.fail_path(absl::StrCat("step '", step.name, "': ", filled.status().message()));
              return;
            }
            if (t.exists(child_id)) {
              t.history(step.name, "child id taken");
              t.fail_path(absl::StrCat("step '", step.name, "': its child id '", child_id,
                                       "' names an existing instance"));
              return;
            }
            json child = new_record(k.workflow, child_def->version, child_def->def.start,
                                    *std::move(filled), t.now(), 0, t.id(), step.name)
                             .to_json();
            t.out().set(t.instance_path(child_id), std::move(child));
            t.out().set(t.index_path("runnable", child_id), true);
            t.rec().child = child_id;
            t.rec().parent_step_of_child = step.name;
            t.history(step.name, absl::StrCat("called ", child_id));
            t.set_status(instance_status::waiting);
          },
      },
      kind);
}

absl::StatusOr<result> machine::step(const process_fn& fn, const context& ctx,
                                     const step_call& c) const {
  result out;
  instance_txn t(options_, ctx, out, c.id, c.now);
  if (!t.load()) return out;
  const std::shared_ptr<const defined_workflow> d = find(t.rec().workflow, t.rec().version);
  if (!d) return out;
  const defined_workflow::compiled* at = d->find(c.step);
  const workflow_step* step = at ? at->step : nullptr;
  const process_kind* kind = at ? std::get_if<process_kind>(&at->kind) : nullptr;
  if (!kind) return out;
  if (c.compensation) {
    std::vector<std::string>& done = t.rec().done;
    if (t.status() != instance_status::compensating || done.empty() || done.back() != c.step) {
      return out;
    }
    absl::StatusOr<result> r = fn(ctx, t.args());
    if (!r.ok()) {
      // The compensation's own writes are dropped; it is retried as the step's policy says.
      fail_compensation(t, *step, *kind, r.status().code(), r.status().ToString());
    } else {
      out = *std::move(r);
      t.rec().retry.reset();
      t.history(c.step, "compensated");
      done.pop_back();
      if (done.empty()) t.finish(instance_status::compensated);
    }
    settle(t);
    t.save_last();
    return out;
  }
  if (t.status() != instance_status::running || t.rec().cursor != c.step) return out;
  if (!t.retrying(c.step) && !t.visit(*step)) {
    settle(t);
    t.save_last();
    return out;
  }
  absl::StatusOr<result> r = fn(ctx, t.args());
  if (!r.ok()) {
    // The process's own writes are dropped; the instance moves on in this same commit.
    fail_step(t, *step, *kind, r.status().code(), r.status().ToString());
    settle(t);
    t.save_last();
    return out;
  }
  out = *std::move(r);
  t.history(c.step, "ok");
  if (!kind->compensate.empty()) t.rec().done.push_back(c.step);
  t.go(step->next);
  // A wait right after a step that emits its request is entered in the same commit: the reply
  // cannot arrive (through the relay, which publishes only committed messages) before the
  // instance waits for it.
  if (const defined_workflow::compiled* next = d->find(step->next);
      next != nullptr && std::holds_alternative<wait_kind>(next->kind)) {
    run_control_step(t, *d, *next->step, next->kind);
  }
  settle(t);  // (that wait may have ended it: a parent moves on in this commit)
  t.save_last();
  return out;
}

absl::StatusOr<result> machine::control(const defined_workflow& d, const context& ctx,
                                        const control_call& c) const {
  result out;
  instance_txn t(options_, ctx, out, c.id, c.now);
  if (!t.load()) return absl::NotFoundError(absl::StrCat("no workflow instance '", t.id(), "'"));
  const instance_status status = t.status();
  const std::string cursor = t.cursor();
  const defined_workflow::compiled* at = d.find(cursor);
  const workflow_step* step = at ? at->step : nullptr;
  const step_kind* kind = at ? &at->kind : nullptr;
  // Each event returns true if it changed the instance.
  absl::StatusOr<bool> changed = std::visit(
      overloaded{
          [&](const run_step_event&) -> absl::StatusOr<bool> {
            if (status != instance_status::running || !step ||
                std::holds_alternative<process_kind>(*kind)) {
              return false;
            }
            run_control_step(t, d, *step, *kind);
            return true;
          },
          [&](const step_failed_event& e) -> absl::StatusOr<bool> {
            if (e.compensation) {
              if (status != instance_status::compensating) return false;
              const defined_workflow::compiled* f = d.find(e.step);
              const process_kind* fk = f ? std::get_if<process_kind>(&f->kind) : nullptr;
              if (fk) {
                fail_compensation(t, *f->step, *fk, e.code, e.error);
              } else {
                t.rec().error = absl::StrCat(t.rec().error, "; the compensation of step '", e.step,
                                             "' failed: ", e.error);
                t.history(e.step, "compensation failed");
                t.finish(instance_status::failed);
              }
              return true;
            }
            const process_kind* pk = step ? std::get_if<process_kind>(kind) : nullptr;
            if (status != instance_status::running || !pk || step->name != e.step) return false;
            fail_step(t, *step, *pk, e.code, e.error);
            return true;
          },
          [&](const timer_event&) -> absl::StatusOr<bool> {
            const std::int64_t wait_due = t.rec().wait_deadline_us.value_or(0);
            const std::int64_t life_due = t.rec().deadline_us.value_or(0);
            if (is_final(status)) return false;
            // (Compensations, and their retries, run to the end: the instance's own deadline no
            // longer applies to them.)
            if (life_due > 0 && life_due <= t.now() && !t.compensation_retry()) {
              t.history(cursor, "instance timed out");
              cancel_children(t, absl::StrCat("its parent '", t.id(), "' ran past its timeout"));
              t.fail_path("the instance ran past its timeout");
            } else if (const std::int64_t wake = t.rec().sleep_until_us.value_or(0);
                       status == instance_status::waiting && wake > 0 && wake <= t.now() && step) {
              t.rec().sleep_until_us.reset();
              t.history(step->name, "woke");
              t.go(step->next);
              t.refresh_timer();
            } else if (const std::int64_t retry = t.rec().retry_at_us.value_or(0);
                       status == instance_status::waiting && retry > 0 && retry <= t.now() &&
                       (step || t.compensation_retry())) {
              t.rec().retry_at_us.reset();
              const instance_record::retry_info r =
                  t.rec().retry.value_or(instance_record::retry_info{"", 0, false});
              if (t.compensation_retry()) {
                // Back to compensating: the same compensation runs again.
                t.history(r.step, absl::StrCat("retrying compensation: attempt ", r.attempt));
                t.set_status(instance_status::compensating);
              } else {
                t.history(step->name, absl::StrCat("retrying: attempt ", r.attempt));
                t.set_status(instance_status::running);
              }
              t.refresh_timer();
            } else if (status == instance_status::waiting && wait_due > 0 && wait_due <= t.now() &&
                       step) {
              t.clear_wait();
              t.history(step->name, "timed out");
              if (!step->on_timeout.empty()) {
                t.go(step->on_timeout);
              } else {
                t.fail_path(absl::StrCat("step '", step->name, "' timed out after ",
                                         step->timeout_ms, " ms"));
              }
            } else {
              return false;
            }
            return true;
          },
          [&](const cancel_event& e) -> absl::StatusOr<bool> {
            // Compensations, and their retries, run to the end.
            if (status == instance_status::compensating || t.compensation_retry()) return false;
            POP_RETURN_IF_ERROR(cancel_instance(t, e.reason));
            return true;
          },
      },
      c.event);
  if (!changed.ok()) return changed.status();
  if (!*changed) return out;
  settle(t);
  t.save_last();
  return out;
}

absl::StatusOr<result> machine::receive(const context& ctx, const outbox_message& m) const {
  result out;
  if (const auto start = m.headers.find(std::string(workflows::start_workflow_header));
      start != m.headers.end()) {
    // Signal-with-start: the instance first, in this commit, if it does not exist.
    const auto id = m.headers.find(std::string(workflows::start_id_header));
    const auto inputs_text = m.headers.find(std::string(workflows::start_inputs_header));
    const std::string what =
        absl::StrCat("message ", m.id, ": signal-with-start of workflow '", start->second, "'");
    if (id == m.headers.end() || !validate_segment(id->second).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": header ",
                                                     to_absl(workflows::start_id_header),
                                                     " is missing or not an instance id"));
    }
    json inputs = inputs_text == m.headers.end() ? json::object()
                                                 : json::parse(inputs_text->second, nullptr, false);
    if (!inputs.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": header ", to_absl(workflows::start_inputs_header), " is not a JSON object"));
    }
    instance_txn t(options_, ctx, out, id->second, m.created_at_us);
    if (t.load() && is_final(t.status())) {
      // It has ended: the signal is for nobody (not kept for another instance on its key).
      return out;
    }
    if (!t.loaded()) {
      const std::shared_ptr<const defined_workflow> def = find(start->second);
      if (!def) {
        return absl::NotFoundError(absl::StrCat(what, ": no such workflow is defined"));
      }
      t.create(def->def.name, def->version, def->def.start, std::move(inputs), 0);
      t.history(def->def.start, absl::StrCat("started by signal ", m.topic, " (", m.id, ")"));
      t.save();
    }
  }
  if (!path::parse(absl::StrCat("k.", m.key)).ok()) return out;
  const std::string waits = absl::StrCat(options_.index, ".waits.", m.key);
  std::vector<std::string> ids;
  ctx.view(waits).for_each_member([&](std::string_view id, const value_view&) {
    ids.emplace_back(id);
    return true;
  });
  const std::int64_t now = m.created_at_us > 0 ? m.created_at_us : 0;
  bool taken = false;
  for (const std::string& id : ids) {
    instance_txn t(options_, ctx, out, id, now);
    if (!t.load() || (t.status() != instance_status::waiting && !t.stuck_waiting())) continue;
    const resolution r = resolve(t.workflow(), t.version());
    const std::shared_ptr<const defined_workflow>& d = r.def;
    const defined_workflow::compiled* at = d ? d->find(t.cursor()) : nullptr;
    const workflow_step* step = at ? at->step : nullptr;
    const wait_kind* wait = at ? std::get_if<wait_kind>(&at->kind) : nullptr;
    if (step && (wait == nullptr || !wait->topics.contains(m.topic))) continue;
    if (!step || t.status() == instance_status::stuck) {
      // It cannot take the message now (its definition or step is missing here, or it is
      // parked): rather than drop it, keep it in the instance and park it for an operator.
      const std::string what = absl::StrCat("message ", m.topic, " (", m.id, ") arrived");
      taken = true;
      t.rec().received[m.topic] = m.payload;
      if (t.status() == instance_status::waiting) {
        t.park(absl::StrCat(d ? "its step '" + t.cursor() + "' is not in its workflow" : r.reason,
                            " when ", what,
                            ": restart it from the step that handles it, or migrate it"),
               d ? park_kind::missing_step : r.kind, false);
      } else {
        t.cannot_resume(what);
      }
      t.save();
      continue;
    }
    const auto next = wait->topics.find(m.topic);
    taken = true;
    t.rec().received[m.topic] = m.payload;
    t.clear_wait();
    t.history(step->name, absl::StrCat("received ", m.topic, " (", m.id, ")"));
    t.go(next->second);
    t.save();
  }
  if (!taken && waited_topic(m.topic)) {
    // Nobody waits for it yet: kept for the next wait on its key and topic.
    out.set(absl::StrCat(options_.index, ".mailbox.", m.key, ".", m.id),
            json{{"topic", m.topic}, {"payload", m.payload}, {"at_us", now}});
  }
  return out;
}

bool machine::waited_topic(std::string_view topic) const {
  for (const std::shared_ptr<const defined_workflow>& d : all()) {
    for (const auto& [name, step] : d->steps) {
      const auto* wait = std::get_if<wait_kind>(&step.kind);
      if (wait != nullptr && wait->topics.contains(std::string(topic))) return true;
    }
  }
  return false;
}

}  // namespace pop::detail
