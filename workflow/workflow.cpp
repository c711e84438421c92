#include "pop/workflow/workflow.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pop/contracts/process_error.hpp"
#include "pop/contracts/status.hpp"
#include "pop/workflow/detail/workflow_parts.hpp"

namespace pop {

using detail::instance_status;

// ---- registry --------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<workflows>> workflows::create(engine& e, workflow_options opts) {
  for (const std::string* p : {&opts.instances, &opts.index, &opts.history}) {
    if (absl::StatusOr<path> parsed = path::parse(*p); !parsed.ok()) {
      return annotate(parsed.status(), "workflow_options");
    }
  }
  // Described first: a failed call registers nothing.
  POP_RETURN_IF_ERROR(e.describe("workflows", opts.instances,
                                 {{"instances", opts.instances},
                                  {"index", opts.index},
                                  {"history", opts.history},
                                  {"at_us", e.clock().now_us()}}));
  std::unique_ptr<workflows> w(new workflows(e, opts));
  const std::vector<std::string> registered = e.processes();
  if (!std::binary_search(registered.begin(), registered.end(), workflow_operate_process)) {
    const std::vector<std::string> owned = w->owned_paths();
    POP_RETURN_IF_ERROR(e.register_process(
        {.name = std::string(workflow_operate_process), .inputs = owned, .outputs = owned},
        [o = opts](const context& ctx, const json& args) {
          return detail::operate(o, ctx, args);
        }));
    POP_RETURN_IF_ERROR(e.register_process(
        {.name = std::string(detail::migrate_process), .inputs = owned, .outputs = owned},
        [o = opts](const context& ctx, const json& args) {
          return detail::migrate(o, ctx, args);
        }));
  }
  return w;
}

workflows::workflows(engine& e, workflow_options opts) : engine_(e), options_(std::move(opts)) {}

absl::Status workflows::register_process(process_spec spec, process_fn fn) {
  if (!fn) {
    return absl::InvalidArgumentError(
        absl::StrCat("workflow process '", spec.name, "' was registered with an empty function"));
  }
  POP_ASSIGN_OR_RETURN(process_contract contract, process_contract::from_spec(spec));
  const path instances = path::parse(options_.instances).value();
  const path index = path::parse(options_.index).value();
  const path history = path::parse(options_.history).value();
  process_spec wrapped = spec;
  wrapped.name = step_process(spec.name);
  for (std::vector<std::string>* declared : {&wrapped.inputs, &wrapped.outputs}) {
    for (const path* own : {&instances, &index, &history}) {
      bool covered = false;
      for (const std::string& t : *declared) {
        const path p = path::parse(t).value();
        if (own->contains(p) && !(p == *own)) {
          return absl::InvalidArgumentError(
              absl::StrCat("workflow process '", spec.name, "' declares '", t, "', inside '",
                           own->str(), "', which the workflow engine owns"));
        }
        covered = covered || p.contains(*own);
      }
      if (!covered) declared->push_back(own->str());
    }
  }
  POP_RETURN_IF_ERROR(engine_.register_process(spec, fn));
  auto entry = std::make_shared<const registered_process>(registered_process{contract, fn});
  const workflow_options& o = options_;
  workflows* self = this;
  process_fn step_fn = [entry, &o, self](const context& ctx,
                                         const json& args) -> absl::StatusOr<result> {
    result out;
    detail::instance_txn t(o, ctx, out, args.at("id").get<std::string>(),
                           args.at("now").get<std::int64_t>());
    if (!t.load()) return out;
    const std::string step_name = args.at("step").get<std::string>();
    const std::shared_ptr<const defined> d = self->find_definition(t.workflow(), t.version());
    if (!d) return out;
    const workflow_step* step = d->step(step_name);
    if (!step) return out;
    if (args.value("mode", "") == "compensate") {
      json& done = t.rec()["done"];
      if (t.status() != instance_status::compensating || done.empty() || done.back() != step_name)
        return out;
      absl::StatusOr<result> r = entry->fn(ctx, t.args());
      if (!r.ok()) {
        // The compensation's own writes are dropped; it is retried as the step's policy says.
        self->fail_compensation(t, *step, r.status().code(), r.status().ToString());
      } else {
        out = *std::move(r);
        t.rec().erase("retry");
        t.history(step_name, "compensated");
        done.erase(done.size() - 1);
        if (done.empty()) t.finish(instance_status::compensated);
      }
      self->settle(t);
      t.save_last();
      return out;
    }
    if (t.status() != instance_status::running || t.cursor() != step_name) return out;
    if (!t.retrying(step_name) && !t.visit(*step)) {
      self->settle(t);
      t.save_last();
      return out;
    }
    absl::StatusOr<result> r = entry->fn(ctx, t.args());
    if (!r.ok()) {
      // The process's own writes are dropped; the instance moves on in this same commit.
      self->fail_step(t, *step, r.status().code(), r.status().ToString());
      self->settle(t);
      t.save_last();
      return out;
    }
    out = *std::move(r);
    t.history(step_name, "ok");
    if (!step->compensate.empty()) t.rec()["done"].push_back(step_name);
    t.go(step->next);
    // A wait right after a step that emits its request is entered in the same commit: the
    // reply cannot arrive (through the relay, which publishes only committed messages) before
    // the instance waits for it.
    if (const workflow_step* n = d->step(step->next); n != nullptr && !n->wait.empty()) {
      self->run_control_step(t, *d, *n);
    }
    self->settle(t);  // (that wait may have ended it: a parent moves on in this commit)
    t.save_last();
    return out;
  };
  POP_RETURN_IF_ERROR(engine_.register_process(std::move(wrapped), std::move(step_fn)));
  std::lock_guard lock(mu_);
  processes_[spec.name] = std::move(entry);
  return absl::OkStatus();
}

absl::Status workflows::register_predicate(std::string name, std::vector<std::string> inputs,
                                           predicate_fn fn) {
  if (name.empty() || !fn) {
    return absl::InvalidArgumentError("a predicate needs a name and a function");
  }
  for (const std::string& p : inputs) {
    if (absl::StatusOr<path> parsed = path::parse(p); !parsed.ok()) {
      return annotate(parsed.status(), absl::StrCat("predicate '", name, "' input"));
    }
  }
  std::lock_guard lock(mu_);
  if (predicates_.contains(name)) {
    return absl::AlreadyExistsError(absl::StrCat("a predicate named '", name, "' exists"));
  }
  predicates_[name] = std::make_shared<const registered_predicate>(
      registered_predicate{std::move(inputs), std::move(fn)});
  return absl::OkStatus();
}

std::shared_ptr<const workflows::defined> workflows::find_definition(std::string_view name) const {
  std::lock_guard lock(mu_);
  const auto it = definitions_.find(name);
  return it == definitions_.end() || it->second.empty() ? nullptr : it->second.back();
}

std::shared_ptr<const workflows::defined> workflows::find_definition(
    std::string_view name, std::string_view version) const {
  std::lock_guard lock(mu_);
  const auto it = definitions_.find(name);
  if (it == definitions_.end() || it->second.empty()) return nullptr;
  if (version.empty()) return it->second.back();
  for (const std::shared_ptr<const defined>& d : it->second) {
    if (d->version == version) return d;
  }
  return nullptr;
}

workflows::resolved workflows::resolve(std::string_view workflow, std::string_view version) const {
  if (std::shared_ptr<const defined> d = find_definition(workflow, version)) {
    return {std::move(d), "", ""};
  }
  const std::vector<std::string> defined_versions = versions(workflow);
  if (defined_versions.empty()) {
    return {nullptr,
            absl::StrCat("its workflow '", detail::to_absl(workflow), "' (definition version ",
                         detail::to_absl(version), ") is not defined in this program"),
            "undefined"};
  }
  return {nullptr,
          absl::StrCat("its definition version '", detail::to_absl(version), "' of workflow '",
                       detail::to_absl(workflow), "' is not defined in this program (it defines ",
                       absl::StrJoin(defined_versions, ", "),
                       "): define that version beside the new one, or migrate the instance"),
          "missing_version"};
}

std::vector<std::string> workflows::versions(std::string_view name) const {
  std::vector<std::string> out;
  std::lock_guard lock(mu_);
  if (const auto it = definitions_.find(name); it != definitions_.end()) {
    for (const std::shared_ptr<const defined>& d : it->second) out.push_back(d->version);
  }
  return out;
}

std::string workflows::version_of(const workflow_definition& def) {
  if (!def.version.empty()) return def.version;
  const std::uint64_t h = detail::fnv1a(def.to_json().dump());
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

void workflows::settle(detail::instance_txn& t) const {
  if (!t.ended() || !t.rec().contains("parent")) return;
  const std::string parent_id = t.rec()["parent"];
  detail::instance_txn parent(t.opts(), t.ctx(), t.out(), parent_id, t.now());
  if (!parent.load()) return;
  if (const auto fan = parent.rec().find("fan_out");
      fan != parent.rec().end() && fan->is_object() &&
      fan->value("children", json::object()).contains(t.id())) {
    if (parent.status() == instance_status::stuck) {
      // Parked while its children ran: an operator restarts it (resuming could not join).
      (*fan)["children"][t.id()] = t.status_text();
      if (parent.stuck_waiting()) {
        parent.cannot_resume(
            absl::StrCat("its child '", t.id(), "' ended (", t.status_text(), ")"));
      }
      parent.save();
      return;
    }
    if (parent.status() != instance_status::waiting) return;
    const resolved r = resolve(parent.workflow(), parent.version());
    const workflow_step* step = r.def ? r.def->step(fan->value("step", "")) : nullptr;
    if (!step) {
      parent.park(absl::StrCat(r.def ? "its fan-out step is not in its workflow" : r.reason,
                               " when its child '", t.id(), "' ended (", t.status_text(),
                               "): restart it from a step, migrate or cancel it"),
                  r.def ? "missing_step" : r.kind, false);
      parent.save();
      return;
    }
    settle_fan_out(parent, t, *step);
    settle(parent);
    parent.save();
    return;
  }
  if (parent.rec().value("child", "") != t.id()) return;
  if (parent.stuck_waiting(t.id())) {
    // Parked while this child ran: resuming it would wait for an outcome that has come.
    parent.cannot_resume(absl::StrCat("its child '", t.id(), "' ended (", t.status_text(), ")"));
    parent.save();
    return;
  }
  if (parent.status() != instance_status::waiting) return;
  const resolved r = resolve(parent.workflow(), parent.version());
  const std::string at_step = parent.rec().value("parent_step_of_child", "");
  const workflow_step* step = r.def ? r.def->step(at_step) : nullptr;
  const instance_status status = t.status();
  if (!step) {
    // The parent cannot take its child's outcome here: parked, not failed, for an operator.
    parent.park(absl::StrCat(r.def ? absl::StrCat("its step '", at_step, "' is not in its workflow")
                                   : r.reason,
                             " when its child '", t.id(), "' ended (", t.status_text(),
                             "): restart it from a step, migrate or cancel it"),
                r.def ? "missing_step" : r.kind, false);
    parent.save();
    return;
  }
  parent.rec().erase("child");
  parent.rec().erase("parent_step_of_child");
  if (status == instance_status::completed) {
    parent.history(step->name, absl::StrCat("child ", t.id(), " completed"));
    parent.go(step->next);
  } else {
    parent.history(step->name, absl::StrCat("child ", t.id(), " ", t.status_text()));
    if (!step->on_error.empty()) {
      parent.go(step->on_error);
    } else {
      parent.fail_path(
          absl::StrCat("child '", t.id(), "' ", t.status_text(), ": ", t.rec().value("error", "")));
    }
  }
  settle(parent);
  parent.save();
}

void workflows::start_fan_out(detail::instance_txn& t, const workflow_step& step,
                              const json& inputs) const {
  const bool is_map = !step.map.call.empty();
  std::size_t total = step.parallel.size();
  if (is_map) {
    const auto list = inputs.find(step.map.over);
    if (list == inputs.end() || !list->is_array() || list->size() > 10'000) {
      t.history(step.name, "bad map input");
      t.fail_path(absl::StrCat("step '", step.name, "' maps over input '", step.map.over,
                               "', which is ",
                               list == inputs.end() ? "missing"
                               : !list->is_array()  ? "not a list"
                                                    : "longer than 10,000 elements"));
      return;
    }
    total = list->size();
  }
  const std::size_t first =
      is_map && step.map.max_concurrency > 0
          ? std::min(total, static_cast<std::size_t>(step.map.max_concurrency))
          : total;
  // Every first child's inputs before any child exists: a bad one starts none.
  std::vector<json> batch;
  for (std::size_t i = 0; i < first; ++i) {
    absl::StatusOr<json> in =
        is_map ? (step.map.inputs.is_null() ? json::object()
                                            : detail::child_inputs(step.map.inputs, inputs))
               : detail::child_inputs(step.parallel[i].inputs, inputs);
    if (!in.ok()) {
      t.history(step.name, "bad child inputs");
      t.fail_path(absl::StrCat("step '", step.name, "': ", in.status().message()));
      return;
    }
    if (is_map) (*in)[step.map.as] = inputs.at(step.map.over).at(i);
    batch.push_back(*std::move(in));
  }
  const std::int64_t visit = t.call_number(step.name);
  t.rec()["fan_out"] = {{"kind", is_map ? "map" : "parallel"},
                        {"step", step.name},
                        {"base", absl::StrCat(t.id(), "-", step.name, "-", visit)},
                        {"children", json::object()},
                        {"next", 0},
                        {"total", total}};
  if (total == 0) {
    t.rec().erase("fan_out");
    t.rec()["received"][step.name] = json::object();
    t.history(step.name, "no children to run");
    t.go(step.next);
    return;
  }
  // Checked before any child is written, so a refused fan-out leaves none behind.
  const std::string base = t.rec()["fan_out"].value("base", "");
  for (std::size_t i = 0; i < first; ++i) {
    const std::string id = absl::StrCat(base, "-", i);
    const std::string& call = is_map ? step.map.call : step.parallel[i].call;
    if (t.exists(id) || !find_definition(call)) {
      t.rec().erase("fan_out");
      t.history(step.name, "cannot start its children");
      t.fail_path(absl::StrCat(
          "step '", step.name, "': ",
          t.exists(id) ? absl::StrCat("its child id '", id, "' names an existing instance")
                       : absl::StrCat("it calls unknown workflow '", call, "'")));
      return;
    }
  }
  for (json& in : batch) {
    if (!start_fan_child(t, step, std::move(in))) return;
  }
  t.history(step.name, absl::StrCat("started ", first, " of ", total, " children"));
  t.set_status(instance_status::waiting);
}

bool workflows::start_fan_child(detail::instance_txn& t, const workflow_step& step,
                                json child_inputs) const {
  json& fan = t.rec()["fan_out"];
  const std::size_t i = fan.value("next", std::size_t{0});
  const std::string& call = step.map.call.empty() ? step.parallel.at(i).call : step.map.call;
  const std::shared_ptr<const defined> d = find_definition(call);
  if (!d) {
    t.history(step.name, "unknown workflow");
    t.fail_path(absl::StrCat("step '", step.name, "' calls unknown workflow '", call, "'"));
    return false;
  }
  const std::string id = absl::StrCat(fan.value("base", ""), "-", i);
  if (t.exists(id)) {
    t.history(step.name, "child id taken");
    detail::cancel_children(t, absl::StrCat("its parent '", t.id(), "' failed to start a child"));
    t.fail_path(
        absl::StrCat("step '", step.name, "': its child id '", id, "' names an existing instance"));
    return false;
  }
  t.out().set(t.instance_path(id),
              new_record(call, d->version, d->def.start, std::move(child_inputs), t.now(), 0,
                         t.id(), step.name));
  t.out().set(t.index_path("runnable", id), true);
  fan["children"][id] = instance_status::running;
  fan["next"] = i + 1;
  return true;
}

void workflows::settle_fan_out(detail::instance_txn& parent, detail::instance_txn& child,
                               const workflow_step& step) const {
  json& fan = parent.rec()["fan_out"];
  json& children = fan["children"];
  const instance_status status = child.status();
  children[child.id()] = status;
  const bool any = step.join == "any";
  const auto join = [&](bool ok, const std::string& why) {
    // The children still running are not needed any more.
    for (auto& [id, st] : children.items()) {
      if (st.get<instance_status>() != instance_status::running) continue;
      detail::cancel_child(parent, id,
                           absl::StrCat("its parent '", parent.id(), "' joined: ", why));
      st = instance_status::cancelled;
    }
    parent.rec()["received"][step.name] = children;
    parent.rec().erase("fan_out");
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
    join(false, absl::StrCat("child '", child.id(), "' ", child.status_text(), ": ",
                             child.rec().value("error", "")));
    return;
  }
  parent.history(step.name, absl::StrCat("child ", child.id(), " ", child.status_text()));
  const std::size_t total = fan.value("total", std::size_t{0});
  if (fan.value("kind", "") == "map" && fan.value("next", std::size_t{0}) < total) {
    // A map keeps max_concurrency children running: the next element takes this one's place.
    const json inputs = parent.rec().value("inputs", json::object());
    absl::StatusOr<json> in =
        step.map.inputs.is_null() ? json::object() : detail::child_inputs(step.map.inputs, inputs);
    if (!in.ok()) {
      join(false, std::string(in.status().message()));
      return;
    }
    (*in)[step.map.as] = inputs.at(step.map.over).at(fan.value("next", std::size_t{0}));
    if (!start_fan_child(parent, step, *std::move(in))) return;
  }
  for (const auto& [id, st] : children.items()) {
    if (st.get<instance_status>() == instance_status::running) return;
  }
  if (fan.value("next", std::size_t{0}) < total) return;
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
  const std::uint64_t h = detail::fnv1a(absl::StrCat(seed, "/", attempt));
  const double unit = static_cast<double>(h >> 11) / static_cast<double>(1ULL << 53);
  delay_ms *= 1.0 + p.jitter * (2.0 * unit - 1.0);
  return static_cast<std::int64_t>(delay_ms * 1000.0);
}

// The record of a retry of `step` (its compensation if `compensation`) as attempt `attempt`.
json retry_state(const std::string& step, int attempt, bool compensation) {
  json retry = {{"step", step}, {"attempt", attempt}};
  if (compensation) retry["compensation"] = true;
  return retry;
}

// After `what` of `step` failed with `code` ("error" for the step's process, "compensation 'x'
// failed" for its compensation): if its retry policy allows another attempt, makes the instance
// wait for it (history: "<what> (attempt 1 of 3): ...; retrying in 100 ms") and returns nullopt;
// else returns how the attempts ended ("", " after 3 attempts", " (CODE is not retryable)").
std::optional<std::string> retry_or_exhausted(detail::instance_txn& t, const workflow_step& step,
                                              absl::StatusCode code, const std::string& error,
                                              std::string_view what, bool compensation) {
  const workflow_retry& p = step.retry;
  const int attempt = t.retrying(step.name) && t.compensation_retry() == compensation
                          ? t.rec()["retry"].value("attempt", 1)
                          : 1;
  const std::string code_name = absl::StatusCodeToString(code);
  const bool permanent =
      std::find(p.non_retryable.begin(), p.non_retryable.end(), code_name) != p.non_retryable.end();
  if (attempt < p.attempts && !permanent) {
    const std::int64_t delay_us = retry_delay_us(
        p, absl::StrCat(t.id(), "/", step.name, compensation ? "/compensation" : ""), attempt);
    t.history(step.name,
              absl::StrCat(detail::to_absl(what), " (attempt ", attempt, " of ", p.attempts,
                           "): ", error, "; retrying in ", delay_us / 1000, " ms"));
    t.rec()["retry"] = retry_state(step.name, attempt + 1, compensation);
    t.rec()["retry_at_us"] = t.now() + delay_us;
    t.set_status(instance_status::waiting);
    t.refresh_timer();
    return std::nullopt;
  }
  if (permanent && p.attempts > 1) return absl::StrCat(" (", code_name, " is not retryable)");
  return p.attempts > 1 ? absl::StrCat(" after ", attempt, " attempts") : std::string();
}

}  // namespace

void workflows::fail_step(detail::instance_txn& t, const workflow_step& step, absl::StatusCode code,
                          const std::string& error) const {
  const std::optional<std::string> after = retry_or_exhausted(t, step, code, error, "error", false);
  if (!after) return;
  const workflow_retry& p = step.retry;
  t.history(step.name, absl::StrCat("error", *after, ": ", error));
  const std::string reason = absl::StrCat("step '", step.name, "' failed", *after, ": ", error);
  if (p.on_exhausted == "pause") {
    // Resumed by an operator, it runs the step again with a fresh set of attempts.
    t.rec()["retry"] = retry_state(step.name, 1, false);
    t.park(absl::StrCat(reason, ": resume it to try again"), "retries_exhausted");
    return;
  }
  t.rec().erase("retry");
  if (!step.on_error.empty() && p.on_exhausted != "compensate") {
    t.go(step.on_error);
  } else {
    t.fail_path(reason);
  }
}

void workflows::fail_compensation(detail::instance_txn& t, const workflow_step& step,
                                  absl::StatusCode code, const std::string& error) const {
  const std::string what = absl::StrCat("compensation '", step.compensate, "'");
  const std::optional<std::string> after =
      retry_or_exhausted(t, step, code, error, absl::StrCat(what, " failed"), true);
  if (!after) return;
  t.history(step.name, absl::StrCat("compensation failed", *after, ": ", error));
  if (step.retry.on_exhausted == "pause") {
    // Resumed by an operator, the compensation runs again with a fresh set of attempts.
    t.rec()["retry"] = retry_state(step.name, 1, true);
    t.park(absl::StrCat(what, " of step '", step.name, "' failed", *after, ": ", error,
                        ": resume it to try again"),
           "retries_exhausted");
    return;
  }
  t.rec()["error"] =
      absl::StrCat(t.rec().value("error", ""), "; ", what, " failed", *after, ": ", error);
  t.finish(instance_status::failed);
}

void workflows::run_control_step(detail::instance_txn& t, const defined& d,
                                 const workflow_step& step) const {
  if (!t.visit(step)) return;
  const json inputs = t.rec().value("inputs", json::object());
  if (step.end) {
    t.history(step.name, "completed");
    t.finish(instance_status::completed);
    return;
  }
  if (!step.fail.empty()) {
    t.history(step.name, "failed");
    t.fail_path(step.fail);
    return;
  }
  if (step.continue_as_new) {
    // The next run starts from scratch but for its inputs and id: the old run's history keys go
    // in this commit, so the state an instance holds stays bounded however long it lives.
    const std::int64_t run = t.rec().value("run", std::int64_t{0}) + 1;
    t.out().erase(absl::StrCat(t.opts().history, ".", t.id()));
    json& rec = t.rec();
    rec.erase("history");
    rec["history_next"] = 0;
    rec["run"] = run;
    rec["visits"] = json::object();
    rec["done"] = json::array();
    rec["received"] = json::object();
    rec["error"] = "";
    // The next run takes the newest version of its workflow (as a new instance would): how a
    // long-lived instance moves to new code. Its version stays if the newest has no such start.
    const std::shared_ptr<const defined> newest = find_definition(t.workflow());
    const defined* next = &d;
    if (newest != nullptr && newest->version != d.version &&
        newest->step(newest->def.start) != nullptr) {
      next = newest.get();
      rec["definition"] = {{"name", t.workflow()}, {"version", newest->version}};
      t.history(step.name, absl::StrCat("continued as new: run ", run, " on version '",
                                        newest->version, "' (was '", d.version, "')"));
    } else {
      t.history(step.name, absl::StrCat("continued as new: run ", run));
    }
    t.go(next->def.start);
    return;
  }
  if (!step.branch.empty()) {
    for (const workflow_condition& c : step.branch) {
      bool holds = false;
      if (!c.predicate.empty()) {
        std::shared_ptr<const registered_predicate> pred;
        {
          std::lock_guard lock(mu_);
          const auto it = predicates_.find(c.predicate);
          if (it != predicates_.end()) pred = it->second;
        }
        holds = pred && pred->fn(t.ctx(), inputs);
      } else {
        absl::StatusOr<std::string> at = substitute(c.path, inputs);
        if (!at.ok()) {
          t.history(step.name, "bad condition");
          t.fail_path(absl::StrCat("step '", step.name, "': ", at.status().message()));
          return;
        }
        const std::optional<json> v = t.ctx().find<json>(*at);
        holds = c.op == "exists" ? v.has_value() : (v && compare(*v, c.op, c.value));
      }
      if (holds) {
        t.history(step.name, absl::StrCat("-> ", c.next));
        t.go(c.next);
        return;
      }
    }
    t.history(step.name, absl::StrCat("-> ", step.next));
    t.go(step.next);
    return;
  }
  if (!step.wait.empty()) {
    const auto key = inputs.find(step.key);
    const std::string key_text =
        key == inputs.end() ? "" : (key->is_string() ? key->get<std::string>() : key->dump());
    if (!path::parse(absl::StrCat("k.", key_text)).ok()) {
      t.history(step.name, "bad wait key");
      t.fail_path(absl::StrCat("step '", step.name, "' waits on input '", step.key,
                               "', which is missing or not usable as a key"));
      return;
    }
    // A message that arrived before the instance waited for it is in the mailbox of its key:
    // the oldest on one of this step's topics is taken now, in this commit.
    const std::string mailbox = absl::StrCat(t.opts().index, ".mailbox.", key_text);
    std::optional<std::pair<std::string, json>> early;
    const value_view kept = t.ctx().view(mailbox);
    kept.for_each_member([&](std::string_view id, const value_view& v) {
      const json entry = v.to_json();
      if (entry.is_object() && step.wait.contains(entry.value("topic", ""))) {
        early.emplace(std::string(id), entry);
        return false;
      }
      return true;
    });
    if (early) {
      const std::string topic = early->second.value("topic", "");
      // The key's last message takes the key with it.
      t.out().erase(kept.size() == 1 ? mailbox : absl::StrCat(mailbox, ".", early->first));
      t.rec()["received"][topic] = early->second.value("payload", json());
      t.history(step.name,
                absl::StrCat("received ", topic, " (", early->first, ") from the mailbox"));
      t.go(step.wait.at(topic));
      return;
    }
    std::vector<std::string> topics;
    for (const auto& [topic, next] : step.wait) topics.push_back(topic);
    t.rec()["wait_key"] = key_text;
    t.out().set(absl::StrCat(t.opts().index, ".waits.", key_text, ".", t.id()), topics);
    if (step.timeout_ms > 0) t.rec()["wait_deadline_us"] = t.now() + step.timeout_ms * 1000;
    t.history(step.name, "waiting");
    t.set_status(instance_status::waiting);
    t.refresh_timer();
    return;
  }
  if (step.sleep_ms > 0) {
    const std::int64_t wake = t.now() + step.sleep_ms * 1000;
    t.rec()["sleep_until_us"] = wake;
    t.history(step.name, absl::StrCat("sleeping ", step.sleep_ms, " ms"));
    t.set_status(instance_status::waiting);
    t.refresh_timer();
    return;
  }
  if (!step.parallel.empty() || !step.map.call.empty()) {
    start_fan_out(t, step, inputs);
    return;
  }
  if (!step.call.empty()) {
    const std::shared_ptr<const defined> child_def = find_definition(step.call);
    const std::string child_id =
        absl::StrCat(t.id(), "-", step.name, "-", t.call_number(step.name));
    if (!child_def) {
      t.fail_path(absl::StrCat("step '", step.name, "' calls unknown workflow '", step.call, "'"));
      return;
    }
    absl::StatusOr<json> filled = detail::child_inputs(step.call_inputs, inputs);
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
    json child = new_record(step.call, child_def->version, child_def->def.start, *std::move(filled),
                            t.now(), 0, t.id(), step.name);
    t.out().set(t.instance_path(child_id), std::move(child));
    t.out().set(t.index_path("runnable", child_id), true);
    t.rec()["child"] = child_id;
    t.rec()["parent_step_of_child"] = step.name;
    t.history(step.name, absl::StrCat("called ", child_id));
    t.set_status(instance_status::waiting);
    return;
  }
}

absl::Status workflows::define(workflow_definition def) {
  POP_RETURN_IF_ERROR(check(def));
  auto d = std::make_shared<defined>();
  d->version = version_of(def);
  d->def = std::move(def);
  for (const workflow_step& s : d->def.steps) d->steps.emplace(s.name, &s);
  for (const std::string& v : versions(d->def.name)) {
    if (v == d->version) {
      return absl::AlreadyExistsError(
          absl::StrCat("version '", v, "' of workflow '", d->def.name, "' is already defined"));
    }
  }
  POP_RETURN_IF_ERROR(register_control(d));
  // The newest under its name, and every version under "<name>@<version>", for tools that
  // repair instances of older versions while the program is stopped.
  const json description = {{"version", d->version}, {"definition", d->def.to_json()}};
  POP_RETURN_IF_ERROR(engine_.describe("workflow", d->def.name, description));
  POP_RETURN_IF_ERROR(engine_.describe("workflow_version",
                                       absl::StrCat(d->def.name, "@", d->version), description));
  const std::string name = d->def.name;
  const std::string version = d->version;
  {
    std::lock_guard lock(mu_);
    definitions_[name].push_back(std::move(d));
  }
  return resume_parked(name, version);
}

absl::Status workflows::define_from_file(const std::string& file_path) {
  std::ifstream in(file_path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read workflow file '", file_path, "'"));
  std::stringstream text;
  text << in.rdbuf();
  const json j = json::parse(text.str(), nullptr, false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat("workflow file '", file_path, "' is not JSON"));
  }
  absl::StatusOr<workflow_definition> def = workflow_definition::from_json(j);
  if (!def.ok()) return annotate(def.status(), absl::StrCat("workflow file '", file_path, "'"));
  return annotate(define(*std::move(def)), absl::StrCat("workflow file '", file_path, "'"));
}

absl::Status workflows::register_control(const std::shared_ptr<const defined>& d) {
  const std::vector<std::string> owned = owned_paths();
  // The generic processes, once: start, and (for inboxes) resume.
  const std::vector<std::string> registered = engine_.processes();
  if (!std::binary_search(registered.begin(), registered.end(), start_process)) {
    // Registered once per engine and used by every workflows object on it (the engine cannot
    // unregister): it captures the paths by value and takes the rest from its arguments, never
    // this object, which may be gone.
    POP_RETURN_IF_ERROR(engine_.register_process(
        {.name = std::string(start_process), .inputs = owned, .outputs = owned},
        [o = options_](const context& ctx, const json& args) -> absl::StatusOr<result> {
          result out;
          detail::instance_txn t(o, ctx, out, args.at("id").get<std::string>(),
                                 args.at("now").get<std::int64_t>());
          if (t.load()) {
            // Starting the same instance again (a retried request) is not an error.
            const bool same = t.rec().value("workflow", "") == args.at("workflow") &&
                              t.rec().value("inputs", json::object()) == args.at("inputs");
            if (same && args.value("idempotent", true)) return out;
            return absl::AlreadyExistsError(absl::StrCat(
                "workflow instance '", t.id(), "' already exists",
                same ? ""
                     : absl::StrCat(" (workflow '", t.rec().value("workflow", ""),
                                    "' with other inputs: ",
                                    t.rec().value("inputs", json::object()).dump(), ")")));
          }
          const std::int64_t deadline = args.value("deadline_us", std::int64_t{0});
          t.create(args.at("workflow").get<std::string>(), args.at("version").get<std::string>(),
                   args.at("start").get<std::string>(), args.at("inputs"), deadline);
          t.save_last();
          return out;
        }));
  }
  std::vector<std::string> inputs = owned;
  for (const workflow_step& s : d->def.steps) {
    for (const workflow_condition& c : s.branch) {
      if (!c.predicate.empty()) {
        std::lock_guard lock(mu_);
        const auto it = predicates_.find(c.predicate);
        if (it != predicates_.end()) {
          inputs.insert(inputs.end(), it->second->inputs.begin(), it->second->inputs.end());
        }
      } else {
        const std::string prefix = static_prefix(c.path);
        if (!prefix.empty()) inputs.push_back(prefix);
      }
    }
  }
  const workflows* self = this;
  std::shared_ptr<const defined> def = d;
  return engine_.register_process(
      {.name = control_process(d->def.name, d->version),
       .inputs = outermost(inputs),
       .outputs = owned},
      [self, def](const context& ctx, const json& args) -> absl::StatusOr<result> {
        result out;
        detail::instance_txn t(self->options_, ctx, out, args.at("id").get<std::string>(),
                               args.at("now").get<std::int64_t>());
        if (!t.load()) {
          return absl::NotFoundError(absl::StrCat("no workflow instance '", t.id(), "'"));
        }
        const std::string action = args.at("action").get<std::string>();
        const instance_status status = t.status();
        const workflow_step* step = def->step(t.cursor());
        if (action == "step") {
          if (status != instance_status::running || !step || !step->process.empty()) return out;
          self->run_control_step(t, *def, *step);
        } else if (action == "step_failed") {
          const std::string error = args.at("error").get<std::string>();
          if (args.value("mode", "") == "compensate") {
            if (status != instance_status::compensating) return out;
            const std::string failed_step = args.at("step").get<std::string>();
            if (const workflow_step* f = def->step(failed_step)) {
              self->fail_compensation(
                  t, *f, static_cast<absl::StatusCode>(args.value("code", 2 /* unknown */)), error);
            } else {
              t.rec()["error"] =
                  absl::StrCat(t.rec().value("error", ""), "; the compensation of step '",
                               failed_step, "' failed: ", error);
              t.history(failed_step, "compensation failed");
              t.finish(instance_status::failed);
            }
          } else {
            if (status != instance_status::running || !step || step->name != args.at("step"))
              return out;
            self->fail_step(t, *step,
                            static_cast<absl::StatusCode>(args.value("code", 2 /* unknown */)),
                            error);
          }
        } else if (action == "timeout") {
          const std::int64_t wait_due = t.rec().value("wait_deadline_us", std::int64_t{0});
          const std::int64_t life_due = t.rec().value("deadline_us", std::int64_t{0});
          if (detail::is_final(status)) return out;
          // (Compensations, and their retries, run to the end: the instance's own deadline no
          // longer applies to them.)
          if (life_due > 0 && life_due <= t.now() && !t.compensation_retry()) {
            t.history(t.cursor(), "instance timed out");
            detail::cancel_children(t,
                                    absl::StrCat("its parent '", t.id(), "' ran past its timeout"));
            t.fail_path("the instance ran past its timeout");
          } else if (const std::int64_t wake = t.rec().value("sleep_until_us", std::int64_t{0});
                     status == instance_status::waiting && wake > 0 && wake <= t.now() && step) {
            t.rec().erase("sleep_until_us");
            t.history(step->name, "woke");
            t.go(step->next);
            t.refresh_timer();
          } else if (const std::int64_t retry = t.rec().value("retry_at_us", std::int64_t{0});
                     status == instance_status::waiting && retry > 0 && retry <= t.now() &&
                     (step || t.compensation_retry())) {
            t.rec().erase("retry_at_us");
            const json& r = t.rec()["retry"];
            if (t.compensation_retry()) {
              // Back to compensating: the same compensation runs again.
              t.history(r.value("step", ""),
                        absl::StrCat("retrying compensation: attempt ", r.value("attempt", 0)));
              t.set_status(instance_status::compensating);
            } else {
              t.history(step->name, absl::StrCat("retrying: attempt ", r.value("attempt", 0)));
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
              t.fail_path(absl::StrCat("step '", step->name, "' timed out after ", step->timeout_ms,
                                       " ms"));
            }
          } else {
            return out;
          }
        } else if (action == "cancel") {
          // Compensations, and their retries, run to the end.
          if (status == instance_status::compensating || t.compensation_retry()) return out;
          POP_RETURN_IF_ERROR(detail::cancel_instance(t, args.value("reason", "cancelled")));
        } else {
          return absl::InvalidArgumentError(absl::StrCat("unknown workflow action '", action, "'"));
        }
        self->settle(t);
        t.save_last();
        return out;
      });
}

}  // namespace pop
