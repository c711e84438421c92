#include "pop/workflow/workflow.hpp"

#include <algorithm>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pop/contracts/status.hpp"
#include "pop/workflow/detail/machine.hpp"
#include "pop/workflow/detail/workflow_parts.hpp"

namespace pop {

using detail::instance_status;

absl::StatusOr<std::uint64_t> workflows::start(std::string_view workflow, std::string_view id,
                                               json inputs, std::int64_t timeout_ms) {
  const std::shared_ptr<const defined> def = find_definition(workflow);
  if (!def) {
    return absl::NotFoundError(
        absl::StrCat("no workflow named '", detail::to_absl(workflow), "' is defined"));
  }
  // An id is one path segment: "L.1" would nest the instance inside instance "L".
  if (absl::Status s = validate_segment(id); !s.ok()) {
    return annotate(
        s, absl::StrCat("workflow instance id of workflow '", detail::to_absl(workflow), "'"));
  }
  if (absl::Status s =
          path::parse(absl::StrCat(options_.instances, ".", detail::to_absl(id))).status();
      !s.ok()) {
    return annotate(s, absl::StrCat("workflow instance id '", detail::to_absl(id), "'"));
  }
  if (inputs.is_null()) inputs = json::object();  // {} in C++ is null: no inputs
  if (!inputs.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("workflow instance '", detail::to_absl(id),
                                                   "': inputs must be an object, not ",
                                                   detail::to_absl(type_with_article(inputs))));
  }
  POP_RETURN_IF_ERROR(check_storable(
      inputs, absl::StrCat("workflow instance '", detail::to_absl(id), "': its inputs")));
  if (timeout_ms < 0 || timeout_ms > detail::max_duration_ms) {
    return absl::InvalidArgumentError(absl::StrCat("workflow instance '", detail::to_absl(id),
                                                   "': timeout_ms ", timeout_ms, " is not 0 to ",
                                                   detail::max_duration_ms, " (a year)"));
  }
  const std::int64_t now = engine_.clock().now_us();
  // The version and its start step go with the call: the start process is shared by every
  // workflows object of the engine and knows none of their definitions.
  const json args = detail::to_args(detail::start_call{
      std::string(id), now, std::string(workflow), def->version, def->def.start, std::move(inputs),
      timeout_ms > 0 ? now + timeout_ms * 1000 : 0, options_.idempotent_start});
  POP_ASSIGN_OR_RETURN(commit c, engine_.execute(start_process, args));
  return c.version;
}

workflow_instance workflow_instance::from_record(std::string_view id, json rec,
                                                 const json& history) {
  workflow_instance w;
  w.id = std::string(id);
  if (!rec.is_object()) {
    w.raw = std::move(rec);
    return w;
  }
  // The one decoder of the record (detail::instance_record), then the public view of it.
  const detail::instance_record r = detail::instance_record::from_json(rec);
  w.workflow = r.workflow;
  w.definition_version = r.version;
  w.status = std::string(r.status_name());
  w.cursor = r.cursor;
  w.inputs = r.inputs;
  w.received = r.received;
  // Entries of a record from before they had their own keys, then the keyed ones in order.
  w.history = r.legacy_history.is_array() ? r.legacy_history : json::array();
  if (history.is_object()) {
    for (const auto& [seq, entry] : history.items()) w.history.push_back(entry);
  }
  w.error = r.error;
  if (r.stuck) w.stuck_reason = r.stuck->reason;
  w.parent = r.parent.value_or("");
  w.child = r.child.value_or("");
  w.wait_key = r.wait_key.value_or("");
  w.wait_deadline_us = r.wait_deadline_us.value_or(0);
  w.deadline_us = r.deadline_us.value_or(0);
  w.sleep_until_us = r.sleep_until_us.value_or(0);
  w.started_at_us = r.started_at_us;
  w.ended_at_us = r.ended_at_us.value_or(0);
  w.run = r.run.value_or(0);
  w.retry_at_us = r.retry_at_us.value_or(0);
  if (r.retry) w.attempt = static_cast<int>(r.retry->attempt);
  w.updated_at_us = w.started_at_us;
  for (const json& h : w.history) {
    if (!h.is_object()) continue;
    const auto at = h.find("at_us");
    workflow_instance::event e{
        h.value("step", ""), h.value("outcome", ""),
        at != h.end() && at->is_number_integer() ? at->get<std::int64_t>() : std::int64_t{0}};
    w.updated_at_us = std::max(w.updated_at_us, e.at_us);
    w.events.push_back(std::move(e));
  }
  w.raw = std::move(rec);
  return w;
}

json workflows::history_of(const snapshot& snap, std::string_view id) const {
  absl::StatusOr<path> p = path::parse(absl::StrCat(options_.history, ".", detail::to_absl(id)));
  if (!p.ok()) return json();
  const value_view v = snap.view(*p);
  return v ? v.to_json() : json();
}

absl::StatusOr<workflow_instance> workflows::inspect(std::string_view id) const {
  return inspect(id, true);
}

absl::StatusOr<value_view> workflows::record_view(const snapshot& snap, std::string_view id) const {
  absl::StatusOr<path> p = path::parse(absl::StrCat(options_.instances, ".", detail::to_absl(id)));
  if (!p.ok()) return annotate(p.status(), "workflow instance id");
  value_view v = snap.view(*p);
  if (!v) {
    return absl::NotFoundError(absl::StrCat("no workflow instance '", detail::to_absl(id),
                                            "' in version ", snap.version()));
  }
  return v;
}

absl::StatusOr<workflow_instance> workflows::inspect(std::string_view id, bool with_history) const {
  const snapshot snap = engine_.snapshot();
  POP_ASSIGN_OR_RETURN(const value_view v, record_view(snap, id));
  return workflow_instance::from_record(id, v.to_json(),
                                        with_history ? history_of(snap, id) : json());
}

std::vector<workflow_instance> workflows::list(std::string_view status) const {
  workflow_query q;
  q.status = std::string(status);
  return list(q);
}

std::vector<workflow_instance> workflows::list(const workflow_query& q) const {
  std::vector<workflow_instance> out;
  if (q.limit == 0) return out;
  const snapshot snap = engine_.snapshot();
  snap.view(path::parse(options_.instances).value())
      .for_each_member([&](std::string_view id, const value_view& v) {
        if (!q.status.empty()) {
          // Checked before decoding: most records are skipped by status alone.
          const value_view s = v.member("status");
          if (!s || s.to_json() != q.status) return true;
        }
        workflow_instance w = workflow_instance::from_record(id, v.to_json(), history_of(snap, id));
        if ((!q.workflow.empty() && w.workflow != q.workflow) ||
            (!q.definition_version.empty() && w.definition_version != q.definition_version) ||
            (q.started_from_us > 0 && w.started_at_us < q.started_from_us) ||
            (q.started_before_us > 0 && w.started_at_us >= q.started_before_us) ||
            (q.updated_before_us > 0 && w.updated_at_us >= q.updated_before_us)) {
          return true;
        }
        out.push_back(std::move(w));
        return out.size() < q.limit;
      });
  return out;
}

workflow_metrics workflows::metrics() const {
  workflow_metrics m;
  const snapshot snap = engine_.snapshot();
  m.version = snap.version();
  snap.view(path::parse(options_.instances).value())
      .for_each_member([&](std::string_view, const value_view& v) {
        const value_view w = v.member("workflow");
        const value_view s = v.member("status");
        const json name = w ? w.to_json() : json();
        const json status = s ? s.to_json() : json();
        const std::string st = status.is_string() ? status.get<std::string>() : "";
        ++m.instances[{name.is_string() ? name.get<std::string>() : "", st}];
        if (detail::parse_status(st) == instance_status::stuck) ++m.stuck;
        return true;
      });
  m.steps = steps_.load(std::memory_order_relaxed);
  m.step_latency = step_latency_.snapshot();
  return m;
}

std::string to_prometheus(const workflow_metrics& m, std::string_view prefix) {
  std::string out;
  const std::string full = absl::StrCat(detail::to_absl(prefix), "_instances");
  absl::StrAppend(&out, "# HELP ", full, " Workflow instances per workflow and status.\n# TYPE ",
                  full, " gauge\n");
  for (const auto& [k, n] : m.instances) {
    const std::string labels =
        absl::StrCat("workflow=\"", detail::prometheus_label(k.first), "\",status=\"",
                     detail::prometheus_label(k.second), "\"");
    absl::StrAppend(&out, full, "{", labels, "} ", n, "\n");
  }
  detail::append_metric(out, prefix, "stuck", "gauge", "Instances parked for an operator.",
                        static_cast<double>(m.stuck));
  detail::append_metric(out, prefix, "steps_total", "counter", "Steps that changed an instance.",
                        static_cast<double>(m.steps));
  detail::append_histogram(out, prefix, "step_latency_seconds",
                           "A step, from reading the instance to its commit.", m.step_latency);
  return out;
}

subscription workflows::wait_for(
    std::string_view id, std::function<void(absl::StatusOr<workflow_instance>)> done) const {
  const path ended_index = path::parse(absl::StrCat(options_.index, ".ended")).value();
  std::call_once(watching_, [&] {
    watch_ = engine_.on_commit([this, ended_index](std::uint64_t version) {
      if (ended_waiters_->empty()) return;
      const value_view ended = engine_.snapshot().view(ended_index);
      {
        std::lock_guard lock(watch_mu_);
        if (ended.shares(last_ended_)) return;  // no instance ended (or was purged)
        last_ended_ = ended;
      }
      ended_waiters_->notify(version);
    });
  });
  struct waiter {
    std::mutex mu;
    bool fired = false;
    std::function<void(absl::StatusOr<workflow_instance>)> done;
    std::string id;
  };
  auto w = std::make_shared<waiter>();
  w->done = std::move(done);
  w->id = std::string(id);
  // (An id that is not a path segment fails the first look with inspect()'s error.)
  const absl::StatusOr<path> record =
      path::parse(absl::StrCat(options_.instances, ".", detail::to_absl(id)));
  const auto check = [this, w, ended_index, record](bool first) {
    {
      std::lock_guard lock(w->mu);
      if (w->fired) return;
    }
    // After the first look, an instance has ended only if the ended index has its id, or its
    // record is gone (purged after it ended: then kNotFound).
    if (!first) {
      const snapshot snap = engine_.snapshot();
      if (!record.ok() || (!snap.view(ended_index).member(w->id) && snap.view(*record))) return;
    }
    absl::StatusOr<workflow_instance> now = inspect(w->id, false);
    if (now.ok() && !ended(now->status)) return;
    std::function<void(absl::StatusOr<workflow_instance>)> fn;
    {
      std::lock_guard lock(w->mu);
      if (w->fired) return;  // another commit's call got there first
      w->fired = true;
      fn = std::move(w->done);
    }
    fn(std::move(now));
  };
  // Subscribed before the first look: a commit in between cannot be missed.
  subscription sub = detail::subscribe(ended_waiters_, [check](std::uint64_t) { check(false); });
  check(true);
  return sub;
}

absl::StatusOr<commit> workflows::operate(detail::operator_call call) {
  call.now = engine_.clock().now_us();
  absl::StatusOr<commit> c = engine_.execute(workflow_operate_process, detail::to_args(call));
  if (!c.ok()) {
    return annotate(c.status(), absl::StrCat("workflow instance '", call.id, "', ",
                                             detail::to_absl(detail::action_name(call.action))));
  }
  return c;
}

absl::StatusOr<bool> workflows::park(const workflow_instance& w, std::string reason,
                                     detail::park_kind kind) {
  POP_ASSIGN_OR_RETURN(const commit c,
                       operate({w.id, 0, detail::park_action{w.status, std::move(reason), kind}}));
  return c.changed;
}

absl::Status workflows::resume_parked(const std::string& name, const std::string& version) {
  std::vector<std::string> ids;
  std::vector<detail::park_kind> parked_kinds;
  engine_.snapshot()
      .view(path::parse(absl::StrCat(options_.index, ".stuck")).value())
      .for_each_member([&](std::string_view id, const value_view& v) {
        const json entry = v.to_json();
        // Parked for lack of this version (or of the workflow, on a record from before
        // versions, which takes the newest).
        const detail::park_kind kind =
            detail::parse_park_kind(entry.is_object() ? entry.value("kind", "") : "");
        const std::string parked_version = entry.is_object() ? entry.value("version", "") : "";
        if ((kind == detail::park_kind::undefined || kind == detail::park_kind::missing_version) &&
            entry.value("workflow", "") == name &&
            (parked_version.empty() || parked_version == version)) {
          ids.emplace_back(id);
          parked_kinds.push_back(kind);
        }
        return true;
      });
  for (std::size_t i = 0; i < ids.size(); ++i) {
    absl::StatusOr<commit> c =
        operate({ids[i], 0,
                 detail::resume_action{
                     parked_kinds[i], absl::StrCat("resumed: version '", version, "' of workflow '",
                                                   name, "' is defined again")}});
    // One that cannot be resumed (something happened while it was stuck) stays parked.
    if (!c.ok() && c.status().code() != absl::StatusCode::kFailedPrecondition) return c.status();
  }
  return absl::OkStatus();
}

absl::Status workflows::cancel(std::string_view id, std::string reason) {
  POP_ASSIGN_OR_RETURN(const workflow_instance w, inspect(id, false));
  if (const std::shared_ptr<const defined> d = find_definition(w.workflow, w.definition_version)) {
    // With the definition here, a parent waiting for it moves on in the same commit.
    const detail::control_call c{std::string(id), engine_.clock().now_us(),
                                 detail::cancel_event{std::move(reason)}};
    return engine_.execute(control_process(w.workflow, d->version), detail::to_args(c)).status();
  }
  return operate({std::string(id), 0, detail::cancel_action{std::move(reason)}}).status();
}

absl::StatusOr<std::uint64_t> workflows::resume(std::string_view id) {
  POP_ASSIGN_OR_RETURN(const commit c, operate({std::string(id), 0, detail::resume_action{}}));
  return c.version;
}

absl::StatusOr<std::uint64_t> workflows::restart_from(std::string_view id, std::string_view step,
                                                      std::string_view version) {
  POP_ASSIGN_OR_RETURN(const workflow_instance w, inspect(id, false));
  std::string on_version = version.empty() ? w.definition_version : std::string(version);
  std::shared_ptr<const defined> d = find_definition(w.workflow, on_version);
  if (!d && version.empty()) d = find_definition(w.workflow);
  if (!d && !version.empty() && find_definition(w.workflow)) {
    return absl::NotFoundError(absl::StrCat("workflow instance '", detail::to_absl(id),
                                            "': workflow '", w.workflow, "' has no version '",
                                            detail::to_absl(version), "' in this program"));
  }
  if (d) on_version = d->version;
  if (d && !d->step(step)) {
    return absl::NotFoundError(absl::StrCat("workflow instance '", detail::to_absl(id),
                                            "': workflow '", w.workflow, "' version '", d->version,
                                            "' has no step '", detail::to_absl(step), "'"));
  }
  if (step.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("workflow instance '", detail::to_absl(id), "': restart needs a step name"));
  }
  POP_ASSIGN_OR_RETURN(
      const commit c,
      operate({std::string(id), 0, detail::restart_action{std::string(step), on_version}}));
  return c.version;
}

absl::StatusOr<std::size_t> workflows::migrate(const workflow_migration& m) {
  const std::string where = absl::StrCat("migrating workflow '", m.workflow, "'");
  if (!find_definition(m.workflow)) {
    return absl::NotFoundError(
        absl::StrCat(where, ": no workflow named '", m.workflow, "' is defined in this program"));
  }
  const std::shared_ptr<const defined> to = find_definition(m.workflow, m.to_version);
  if (!to) {
    return absl::NotFoundError(absl::StrCat(where, ": its version '", m.to_version,
                                            "' is not defined in this program (it defines ",
                                            absl::StrJoin(versions(m.workflow), ", "), ")"));
  }
  const std::shared_ptr<const defined> from =
      m.from_version.empty() ? nullptr : find_definition(m.workflow, m.from_version);
  for (const auto& [old_step, new_step] : m.steps) {
    if (!to->step(new_step)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": step '", old_step, "' maps to '",
                                                     new_step, "', which version '", to->version,
                                                     "' does not have"));
    }
    if (from && !from->step(old_step)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": the mapping names step '", old_step,
                                                     "', which version '", from->version,
                                                     "' does not have"));
    }
  }
  detail::migrate_call call{.workflow = m.workflow,
                            .to = to->version,
                            .from = m.from_version,
                            .steps = {m.steps.begin(), m.steps.end()},
                            .now = engine_.clock().now_us()};
  if (!m.ids.empty()) {
    call.ids = m.ids;
  } else {
    const snapshot snap = engine_.snapshot();
    snap.view(path::parse(options_.instances).value())
        .for_each_member([&](std::string_view id, const value_view& v) {
          const json rec = v.to_json();
          if (!rec.is_object() || rec.value("workflow", "") != m.workflow ||
              detail::is_final(rec.value("status", instance_status::unknown))) {
            return true;
          }
          const auto d = rec.find("definition");
          const std::string version =
              d != rec.end() && d->is_object() ? d->value("version", "") : "";
          if (version != to->version && (m.from_version.empty() || version == m.from_version)) {
            call.ids.emplace_back(id);
          }
          return true;
        });
  }
  if (call.ids.empty()) return 0;
  for (const workflow_step& s : to->def.steps) {
    detail::migrate_call::target_step& t = call.target[s.name];
    t.kind = detail::id_of(*to->kind(s.name));
    t.compensate = !s.compensate.empty();
    for (const auto& [topic, next] : s.wait) t.topics.push_back(topic);
    t.key = s.key;
    t.timeout_ms = s.timeout_ms;
  }
  const std::size_t n = call.ids.size();
  absl::StatusOr<commit> c = engine_.execute(detail::migrate_process, detail::to_args(call));
  if (!c.ok()) return annotate(c.status(), where);
  return n;
}

absl::StatusOr<std::size_t> workflows::reconcile() {
  std::vector<std::pair<workflow_instance, resolved>> orphans;
  const snapshot snap = engine_.snapshot();
  snap.view(path::parse(options_.instances).value())
      .for_each_member([&](std::string_view id, const value_view& v) {
        const value_view s = v.member("status");
        const instance_status status =
            s ? s.to_json().get<instance_status>() : instance_status::unknown;
        if (!detail::is_runnable(status) && status != instance_status::waiting) return true;
        workflow_instance w = workflow_instance::from_record(id, v.to_json());
        resolved r = resolve(w.workflow, w.definition_version);
        if (r.def && status != instance_status::compensating && !r.def->step(w.cursor)) {
          r.reason = absl::StrCat("its step '", w.cursor, "' is not in workflow '", w.workflow,
                                  "' version '", r.def->version, "' as defined in this program");
          r.kind = detail::park_kind::missing_step;
          r.def = nullptr;
        }
        if (!r.def) orphans.emplace_back(std::move(w), std::move(r));
        return true;
      });
  std::size_t parked = 0;
  for (const auto& [w, r] : orphans) {
    POP_ASSIGN_OR_RETURN(const bool p, park(w, r.reason, r.kind));
    if (p) ++parked;
  }
  return parked;
}

absl::StatusOr<bool> workflows::advance(std::string_view id) {
  // Only the fields that choose the step are read, not the whole record: the step's own
  // transaction reads it again anyway.
  const snapshot snap = engine_.snapshot();
  POP_ASSIGN_OR_RETURN(const value_view rec, record_view(snap, id));
  const auto text = [](const value_view& f) { return std::string(f.as_string().value_or("")); };
  workflow_instance w;
  w.id = std::string(id);
  // One pass over the record's members (a lookup each would scan it four times).
  value_view compensated;  // "done": the steps to compensate
  rec.for_each_member([&](std::string_view key, const value_view& m) {
    if (key == "status") {
      w.status = text(m);
    } else if (key == "workflow") {
      w.workflow = text(m);
    } else if (key == "definition") {
      w.definition_version = text(m.member("version"));
    } else if (key == "cursor") {
      w.cursor = text(m);
    } else if (key == "done") {
      compensated = m;
    }
    return true;
  });
  const instance_status status = detail::parse_status(w.status);
  if (!detail::is_runnable(status)) return false;
  const resolved r = resolve(w.workflow, w.definition_version);
  // One instance that cannot advance must not stop the others: it is parked for an operator.
  if (!r.def) return park(w, r.reason, r.kind);
  const std::shared_ptr<const defined>& d = r.def;
  const std::int64_t now = engine_.clock().now_us();
  std::string process;
  json args;
  std::string step_name;
  if (status == instance_status::running) {
    const detail::defined_workflow::compiled* at = d->find(w.cursor);
    if (!at) {
      return park(w,
                  absl::StrCat("its step '", w.cursor, "' is not in workflow '", w.workflow,
                               "' as defined in this program (definition version ", d->version,
                               "; the instance started with ", w.definition_version, ")"),
                  detail::park_kind::missing_step);
    }
    step_name = w.cursor;
    if (const auto* p = std::get_if<detail::process_kind>(&at->kind)) {
      process = step_process(p->process);
      args = detail::to_args(detail::step_call{w.id, now, step_name, false});
    } else {
      process = control_process(w.workflow, d->version);
      args = detail::to_args(detail::control_call{w.id, now, detail::run_step_event{}});
    }
  } else if (status == instance_status::compensating) {
    const json done = compensated ? compensated.to_json() : json::array();
    if (!done.is_array() || done.empty() || !done.back().is_string()) return false;
    step_name = done.back().get<std::string>();
    const auto* p = std::get_if<detail::process_kind>(d->kind(step_name));
    if (!p || p->compensate.empty()) {
      return park(w,
                  absl::StrCat("step '", step_name, "' of workflow '", w.workflow,
                               "' has no compensation in this program (definition version ",
                               d->version, ") but the instance must compensate it"),
                  detail::park_kind::missing_compensation);
    }
    process = step_process(p->compensate);
    args = detail::to_args(detail::step_call{w.id, now, step_name, true});
  } else {
    return false;
  }
  const auto started = std::chrono::steady_clock::now();
  absl::StatusOr<commit> c = engine_.execute(process, args);
  if (c.ok()) {
    step_latency_.record(std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now() - started));
    if (c->changed) steps_.fetch_add(1, std::memory_order_relaxed);
    return c->changed;
  }
  switch (c.status().code()) {
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDataLoss:
      return c.status();  // the instance is unchanged; try again later
    default:
      break;
  }
  // The step's process threw or broke its contract: that is the step failing.
  const detail::control_call failed{
      w.id, now,
      detail::step_failed_event{step_name, c.status().code(), c.status().ToString(),
                                status == instance_status::compensating}};
  POP_ASSIGN_OR_RETURN(
      commit f, engine_.execute(control_process(w.workflow, d->version), detail::to_args(failed)));
  return f.changed;
}

std::vector<std::string> workflows::runnable(std::size_t limit) const {
  std::vector<std::string> out;
  engine_.snapshot()
      .view(path::parse(absl::StrCat(options_.index, ".runnable")).value())
      .for_each_member([&](std::string_view id, const value_view&) {
        out.emplace_back(id);
        return out.size() < limit;
      });
  return out;
}

absl::Status workflows::purge_mailbox(std::int64_t now) {
  const std::int64_t ttl_us =
      std::chrono::duration_cast<std::chrono::microseconds>(options_.mailbox_ttl).count();
  std::int64_t last = last_purge_us_.load();
  if (now - last < ttl_us / 10 || !last_purge_us_.compare_exchange_strong(last, now)) {
    return absl::OkStatus();
  }
  for (;;) {
    const snapshot snap = engine_.snapshot();
    std::vector<write> writes;
    const std::string mailbox = absl::StrCat(options_.index, ".mailbox");
    snap.view(path::parse(mailbox).value())
        .for_each_member([&](std::string_view key, const value_view& messages) {
          const std::string at_key = absl::StrCat(mailbox, ".", detail::to_absl(key));
          std::vector<write> expired;
          std::size_t kept = 0;
          messages.for_each_member([&](std::string_view id, const value_view& entry) {
            const value_view at = entry.member("at_us");
            const json t = at ? at.to_json() : json();
            if (!t.is_number_integer() || t.get<std::int64_t>() + ttl_us <= now) {
              expired.push_back({absl::StrCat(at_key, ".", detail::to_absl(id)), std::nullopt});
            } else {
              ++kept;
            }
            return true;
          });
          // A key left with no messages goes too.
          if (kept == 0) {
            writes.push_back({at_key, std::nullopt});
          } else {
            writes.insert(writes.end(), expired.begin(), expired.end());
          }
          return true;
        });
    if (writes.empty()) return absl::OkStatus();
    POP_ASSIGN_OR_RETURN(
        cas_result r, engine_.compare_and_swap(snap.version(), std::move(writes), cas_mode::keys));
    if (r.committed) return absl::OkStatus();
  }
}

absl::Status workflows::index_legacy_ended(std::int64_t now) {
  const path ended_index = path::parse(absl::StrCat(options_.index, ".ended")).value();
  // One scan; the writes go in commits of at most 512 instances, each against the scanned
  // version: an instance changed since (restarted, say) conflicts through its record, and the
  // next purge scans again.
  const snapshot snap = engine_.snapshot();
  const value_view indexed = snap.view(ended_index);
  std::vector<write> writes;
  snap.view(path::parse(options_.instances).value())
      .for_each_member([&](std::string_view id, const value_view& rec) {
        const json status = rec.member("status").to_json();
        if (!status.is_string() ||
            !detail::is_final(detail::parse_status(status.get_ref<const std::string&>())) ||
            indexed.member(id)) {
          return true;
        }
        const json ended = rec.member("ended_at_us").to_json();
        const std::int64_t at = ended.is_number_integer() ? ended.get<std::int64_t>() : now;
        // The record gets its end time too: a restart then removes the index entry (set_status).
        writes.push_back(
            {absl::StrCat(options_.instances, ".", detail::to_absl(id), ".ended_at_us"), json(at)});
        writes.push_back({absl::StrCat(ended_index.str(), ".", detail::to_absl(id)), json(at)});
        return true;
      });
  for (std::size_t from = 0; from < writes.size(); from += 1024) {
    std::vector<write> batch(
        std::make_move_iterator(writes.begin() + static_cast<std::ptrdiff_t>(from)),
        std::make_move_iterator(writes.begin() +
                                static_cast<std::ptrdiff_t>(std::min(writes.size(), from + 1024))));
    POP_ASSIGN_OR_RETURN(
        cas_result r, engine_.compare_and_swap(snap.version(), std::move(batch), cas_mode::keys));
    if (!r.committed) return absl::OkStatus();  // (not done: the next purge tries again)
  }
  legacy_ended_indexed_ = true;
  return absl::OkStatus();
}

absl::Status workflows::purge_ended(std::int64_t now) {
  const std::int64_t ttl_us =
      std::chrono::duration_cast<std::chrono::microseconds>(options_.retention).count();
  if (ttl_us <= 0) return absl::OkStatus();
  const std::int64_t every = std::min<std::int64_t>(ttl_us / 10, 60'000'000);
  std::int64_t last = last_retention_purge_us_.load();
  if (now - last < every || !last_retention_purge_us_.compare_exchange_strong(last, now)) {
    return absl::OkStatus();
  }
  if (!legacy_ended_indexed_.load()) POP_RETURN_IF_ERROR(index_legacy_ended(now));
  // In commits of at most 512 instances, so one purge never makes a huge commit.
  for (;;) {
    const snapshot snap = engine_.snapshot();
    std::vector<write> writes;
    std::size_t purged = 0;
    snap.view(path::parse(absl::StrCat(options_.index, ".ended")).value())
        .for_each_member([&](std::string_view id, const value_view& v) {
          const json at = v.to_json();
          if (at.is_number_integer() && at.get<std::int64_t>() + ttl_us > now) return true;
          const std::string key(id);
          for (const std::string& root : {options_.instances, options_.history}) {
            writes.push_back({absl::StrCat(root, ".", key), std::nullopt});
          }
          writes.push_back({absl::StrCat(options_.index, ".ended.", key), std::nullopt});
          return ++purged < 512;
        });
    if (writes.empty()) return absl::OkStatus();
    POP_ASSIGN_OR_RETURN(
        cas_result r, engine_.compare_and_swap(snap.version(), std::move(writes), cas_mode::keys));
    if (r.committed && purged < 512) return absl::OkStatus();
  }
}

absl::StatusOr<std::size_t> workflows::expire(std::int64_t now, std::int64_t& next_due_us) {
  POP_RETURN_IF_ERROR(purge_mailbox(now));
  POP_RETURN_IF_ERROR(purge_ended(now));
  next_due_us = 0;
  std::vector<std::string> due;
  const snapshot snap = engine_.snapshot();
  snap.view(path::parse(absl::StrCat(options_.index, ".timers")).value())
      .for_each_member([&](std::string_view id, const value_view& v) {
        const json at = v.to_json();
        const std::int64_t when = at.is_number() ? at.get<std::int64_t>() : 0;
        if (when <= now) {
          due.emplace_back(id);
        } else if (next_due_us == 0 || when < next_due_us) {
          next_due_us = when;
        }
        return true;
      });
  std::size_t moved = 0;
  for (const std::string& id : due) {
    absl::StatusOr<workflow_instance> w = inspect(id, false);
    if (!w.ok()) continue;
    const resolved r = resolve(w->workflow, w->definition_version);
    if (!r.def) {
      POP_ASSIGN_OR_RETURN(const bool parked, park(*w, r.reason, r.kind));
      if (parked) ++moved;
      continue;
    }
    POP_ASSIGN_OR_RETURN(
        commit c, engine_.execute(control_process(w->workflow, r.def->version),
                                  detail::to_args(detail::control_call{std::string(id), now,
                                                                       detail::timer_event{}})));
    if (c.changed) ++moved;
  }
  return moved;
}

process_spec workflows::resume_spec() const {
  return {.name = std::string(resume_process), .inputs = owned_paths(), .outputs = owned_paths()};
}

absl::StatusOr<outbox_message> workflows::with_start(outbox_message signal,
                                                     std::string_view workflow, std::string_view id,
                                                     json inputs) {
  const std::string what =
      absl::StrCat("signal-with-start of workflow '", detail::to_absl(workflow), "' instance '",
                   detail::to_absl(id), "'");
  if (absl::Status s = validate_segment(id); !s.ok()) return annotate(s, what);
  if (workflow.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": no workflow"));
  if (inputs.is_null()) inputs = json::object();
  if (!inputs.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": inputs must be an object, not ",
                                                   detail::to_absl(type_with_article(inputs))));
  }
  POP_RETURN_IF_ERROR(check_storable(inputs, absl::StrCat(what, ": its inputs")));
  if (!path::parse(absl::StrCat("k.", signal.key)).ok() ||
      signal.key.find('.') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": the signal's key '", signal.key,
                     "' must be one path segment (the wait key it is delivered on)"));
  }
  signal.headers[std::string(start_workflow_header)] = std::string(workflow);
  signal.headers[std::string(start_id_header)] = std::string(id);
  signal.headers[std::string(start_inputs_header)] = inputs.dump();
  return signal;
}

absl::StatusOr<result> workflows::resume(const context& ctx, const outbox_message& m) const {
  return machine_->receive(ctx, m);
}

bool workflows::waited_topic(std::string_view topic) const {
  return machine_->waited_topic(topic);
}

}  // namespace pop
