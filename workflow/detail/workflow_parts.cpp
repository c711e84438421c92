#include "pop/workflow/detail/workflow_parts.hpp"

#include <algorithm>

#include "absl/strings/str_join.h"

namespace pop::detail {

std::string step_process(std::string_view process) {
  return absl::StrCat("workflow.step:", detail::to_absl(process));
}
std::string control_process(std::string_view workflow, std::string_view version) {
  return absl::StrCat("workflow.control:", detail::to_absl(workflow), ":",
                      detail::to_absl(version));
}

int kinds(const workflow_step& s) {
  return !s.process.empty() + !s.branch.empty() + !s.wait.empty() + !s.call.empty() +
         !s.fail.empty() + s.end + (s.sleep_ms > 0) + s.continue_as_new + !s.parallel.empty() +
         !s.map.call.empty();
}

const char* kind_name(const workflow_step& s) {
  if (!s.process.empty()) return "process";
  if (!s.branch.empty()) return "branch";
  if (!s.wait.empty()) return "wait";
  if (!s.call.empty()) return "call";
  if (!s.fail.empty()) return "fail";
  if (s.sleep_ms > 0) return "sleep";
  if (s.continue_as_new) return "continue_as_new";
  if (!s.parallel.empty()) return "parallel";
  if (!s.map.call.empty()) return "map";
  return "end";
}

// The part of a condition path before its first "{input}" segment: what the control process reads.
std::string static_prefix(const std::string& p) {
  const std::size_t brace = p.find('{');
  if (brace == std::string::npos) return p;
  std::string prefix = p.substr(0, brace);
  while (!prefix.empty() && prefix.back() == '.') prefix.pop_back();
  return prefix;
}

// `paths` without those inside another one (contracts refuse nested declarations).
std::vector<std::string> outermost(const std::vector<std::string>& paths) {
  std::vector<path> parsed;
  for (const std::string& t : paths) {
    if (absl::StatusOr<path> p = path::parse(t); p.ok()) parsed.push_back(*std::move(p));
  }
  std::vector<std::string> out;
  for (std::size_t i = 0; i < parsed.size(); ++i) {
    bool inside = false;
    for (std::size_t j = 0; j < parsed.size() && !inside; ++j) {
      if (i == j) continue;
      inside = parsed[j].contains(parsed[i]) && (!(parsed[i] == parsed[j]) || j < i);
    }
    if (!inside) out.push_back(parsed[i].str());
  }
  return out;
}

// `text` with "{name}" replaced by the string value of input `name`.
absl::StatusOr<std::string> substitute(const std::string& text, const json& inputs) {
  std::string out;
  std::size_t at = 0;
  while (at < text.size()) {
    const std::size_t open = text.find('{', at);
    if (open == std::string::npos) {
      out += text.substr(at);
      break;
    }
    const std::size_t close = text.find('}', open);
    if (close == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("unclosed '{' in '", text, "'"));
    }
    out += text.substr(at, open - at);
    const std::string name = text.substr(open + 1, close - open - 1);
    const auto it = inputs.find(name);
    if (it == inputs.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", text, "' refers to input '", name, "', which the instance lacks"));
    }
    out += it->is_string() ? it->get<std::string>() : it->dump();
    at = close + 1;
  }
  return out;
}

absl::StatusOr<json> child_inputs(const json& spec, const json& inputs) {
  if (!spec.is_object()) return inputs;
  json out = json::object();
  for (const auto& [name, v] : spec.items()) {
    const std::string text = v.is_string() ? v.get<std::string>() : std::string();
    if (text.size() > 2 && text.front() == '{' && text.back() == '}' &&
        text.find('{', 1) == std::string::npos) {
      // "{name}" alone: the parent's input as it is (a number stays a number).
      const auto it = inputs.find(text.substr(1, text.size() - 2));
      if (it == inputs.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("child input '", name, "' takes '", text, "', which the instance lacks"));
      }
      out[name] = *it;
    } else if (v.is_string()) {
      absl::StatusOr<std::string> filled = substitute(text, inputs);
      if (!filled.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("child input '", name, "': ", filled.status().message()));
      }
      out[name] = *std::move(filled);
    } else {
      out[name] = v;
    }
  }
  return out;
}

bool compare(const json& actual, condition_op op, const json& expected) {
  if (op == condition_op::eq) return actual == expected;
  if (op == condition_op::ne) return actual != expected;
  const bool numbers = actual.is_number() && expected.is_number();
  const bool strings = actual.is_string() && expected.is_string();
  if (!numbers && !strings) return false;
  if (op == condition_op::lt) {
    return numbers ? actual.get<double>() < expected.get<double>() : actual < expected;
  }
  if (op == condition_op::gt) {
    return numbers ? actual.get<double>() > expected.get<double>() : actual > expected;
  }
  return false;
}

instance_record new_record(std::string_view workflow, const std::string& definition_version,
                           const std::string& start, json inputs, std::int64_t now,
                           std::int64_t deadline, std::string_view parent,
                           std::string_view parent_step) {
  instance_record rec;
  rec.workflow = std::string(workflow);
  rec.definition_name = std::string(workflow);
  rec.version = definition_version;
  rec.set_status(instance_status::running);
  rec.cursor = start;
  rec.inputs = std::move(inputs);
  rec.started_at_us = now;
  if (deadline > 0) rec.deadline_us = deadline;
  if (!parent.empty()) {
    rec.parent = std::string(parent);
    rec.parent_step = std::string(parent_step);
  }
  return rec;
}

absl::Status cancel_instance(instance_txn& t, const std::string& reason) {
  const instance_status status = t.status();
  if (is_final(status)) {
    return absl::FailedPreconditionError(
        absl::StrCat("workflow instance '", t.id(), "' has already ended (", t.status_text(), ")"));
  }
  t.history(t.cursor(), "cancelled");
  t.rec().cancelled = instance_record::cancel_info{reason, t.now()};
  t.unpark();
  // The children it waits for are cancelled with it (each compensates on its own).
  cancel_children(t, absl::StrCat("its parent '", t.id(), "' was cancelled"));
  t.fail_path(reason);
  return absl::OkStatus();
}

void cancel_children(instance_txn& t, const std::string& reason) {
  std::vector<std::string> children;
  if (t.rec().child) children.push_back(*t.rec().child);
  if (t.rec().fan_out) {
    for (const auto& [id, st] : t.rec().fan_out->children) {
      if (st == instance_status::running) children.push_back(id);
    }
  }
  for (const std::string& id : children) cancel_child(t, id, reason);
  t.rec().child.reset();
  t.rec().parent_step_of_child.reset();
  t.rec().fan_out.reset();
}

void cancel_child(instance_txn& t, const std::string& id, const std::string& reason) {
  instance_txn child(t.opts(), t.ctx(), t.out(), id, t.now());
  if (!child.load() || is_final(child.status()) ||
      child.status() == instance_status::compensating || child.compensation_retry()) {
    return;
  }
  if (cancel_instance(child, reason).ok()) child.save();
}

namespace {

// Cancelled by an operator, `t`'s instance ended while its parent waits for it: the parent is
// parked for an operator (moving it on needs its definition, which operate() does not have).
void park_parent_of_cancelled(const workflow_options& o, const context& ctx, result& out,
                              instance_txn& t) {
  instance_txn parent(o, ctx, out, t.rec().parent.value_or(""), t.now());
  const bool loaded = parent.load();
  if (loaded && parent.rec().fan_out && parent.rec().fan_out->children.contains(t.id())) {
    // One of its fan-out's children: recorded, and the parent parked for an operator (joining
    // needs the parent's definition, which this action does not have).
    parent.rec().fan_out->children[t.id()] = t.status();
    const std::string what = absl::StrCat("its child '", t.id(), "' was cancelled by an operator (",
                                          t.status_text(), ")");
    if (parent.status() == instance_status::waiting) {
      parent.park(what + "; restart it from a step or cancel it", park_kind::by_operator, false);
    } else if (parent.stuck_waiting()) {
      parent.cannot_resume(what);
    }
    parent.save();
  } else if (loaded && parent.rec().child == t.id()) {
    const std::string what = absl::StrCat("its child '", t.id(), "' was cancelled by an operator (",
                                          t.status_text(), ")");
    if (parent.status() == instance_status::waiting) {
      parent.park(what + "; restart it from a step or cancel it", park_kind::by_operator, false);
      parent.save();
    } else if (parent.stuck_waiting(t.id())) {
      parent.cannot_resume(what);
      parent.save();
    }
  }
}

}  // namespace

absl::StatusOr<result> operate(const workflow_options& o, const context& ctx, const json& args) {
  POP_ASSIGN_OR_RETURN(const operator_call call, operator_call_from(args));
  result out;
  instance_txn t(o, ctx, out, call.id, call.now);
  if (!t.load()) return absl::NotFoundError(absl::StrCat("no workflow instance '", t.id(), "'"));
  const instance_status status = t.status();
  const std::string status_text = t.status_text();
  const auto refuse = [&](const char* wanted) {
    return absl::FailedPreconditionError(
        absl::StrCat("workflow instance '", t.id(), "' is ",
                     status_text.empty() ? "without status" : status_text, "; ",
                     to_absl(action_name(call.action)), " needs it ", wanted));
  };
  // Each action returns true if it changed the instance.
  const absl::StatusOr<bool> changed = std::visit(
      overloaded{
          [&](const park_action& a) -> absl::StatusOr<bool> {
            // Only from the status the caller saw: a concurrent step or operator action wins.
            if (status_text != a.expect || status == instance_status::stuck || is_final(status)) {
              return false;
            }
            t.park(a.reason, a.kind);
            return true;
          },
          [&](const resume_action& a) -> absl::StatusOr<bool> {
            if (status != instance_status::stuck) return refuse("stuck");
            const instance_record::stuck_info stuck =
                t.rec().stuck.value_or(instance_record::stuck_info{.status = "running"});
            if (!stuck.resumable) {
              return absl::FailedPreconditionError(absl::StrCat(
                  "workflow instance '", t.id(), "' cannot be resumed: ", stuck.reason));
            }
            if (a.kind && stuck.kind != *a.kind) {
              return false;  // define() resumes only what a missing definition parked
            }
            const std::string before = stuck.status.empty() ? "running" : stuck.status;
            t.unpark();
            t.history(t.cursor(), a.by);
            t.restore_status(before);
            t.refresh_timer();
            return true;
          },
          [&](const restart_action& a) -> absl::StatusOr<bool> {
            if (status != instance_status::stuck && status != instance_status::failed &&
                status != instance_status::compensated && status != instance_status::cancelled) {
              return refuse("stuck, failed, compensated or cancelled");
            }
            t.clear_wait();
            t.unpark();
            // Children still running belong to where it was: cancelled, not re-created under
            // their ids.
            cancel_children(t,
                            absl::StrCat("its parent '", t.id(), "' was restarted by an operator"));
            instance_record& rec = t.rec();
            rec.history_base = rec.history_next.value_or(0);
            rec.child.reset();
            rec.parent_step_of_child.reset();
            rec.cancelled.reset();
            rec.retry.reset();
            rec.fan_out.reset();
            rec.error.clear();
            rec.visits.clear();
            // Steps from `step` on run again and are recorded again for compensation: forget
            // them from their first occurrence, so a later failure compensates each once.
            rec.done.erase(std::find(rec.done.begin(), rec.done.end(), a.step), rec.done.end());
            std::string moved;
            if (!a.version.empty() && a.version != t.version()) {
              moved = absl::StrCat(", from version '", t.version(), "' to '", a.version, "'");
              rec.definition_name = rec.workflow;
              rec.version = a.version;
            }
            t.history(a.step, absl::StrCat("restarted here by an operator (was ",
                                           to_absl(status_name(status)), moved, ")"));
            t.go(a.step);
            t.refresh_timer();
            return true;
          },
          [&](const cancel_action& a) -> absl::StatusOr<bool> {
            if (status == instance_status::compensating || t.compensation_retry()) {
              return absl::FailedPreconditionError(
                  absl::StrCat("workflow instance '", t.id(),
                               "' is already compensating (on its failure path)"));
            }
            POP_RETURN_IF_ERROR(cancel_instance(t, a.reason));
            // Its parent waits for it, and moving the parent on needs the parent's definition,
            // which this action does not have: the parent is parked for an operator to decide.
            if (t.ended() && t.rec().parent) park_parent_of_cancelled(o, ctx, out, t);
            return true;
          },
      },
      call.action);
  if (!changed.ok()) return changed.status();
  if (*changed) t.save();
  return out;
}

absl::StatusOr<result> migrate(const workflow_options& o, const context& ctx, const json& args) {
  result out;
  POP_ASSIGN_OR_RETURN(const migrate_call call, migrate_call_from(args));
  const std::string& workflow = call.workflow;
  const std::string& to = call.to;
  const auto mapped = [&](const std::string& step) {
    const auto it = call.steps.find(step);
    return it == call.steps.end() ? step : it->second;
  };
  // The new version's step `step`, or null.
  const auto target = [&](const std::string& step) -> const migrate_call::target_step* {
    const auto it = call.target.find(step);
    return it == call.target.end() ? nullptr : &it->second;
  };
  for (const std::string& id : call.ids) {
    instance_txn t(o, ctx, out, id, call.now);
    if (!t.load()) return absl::NotFoundError(absl::StrCat("no workflow instance '", t.id(), "'"));
    const std::string from = t.version();
    const instance_status status = t.status();
    const std::string status_text = t.status_text();
    const auto refuse = [&](const std::string& why) {
      return absl::FailedPreconditionError(
          absl::StrCat("workflow instance '", t.id(), "' (version '", from, "', ", status_text,
                       ") cannot move to version '", to, "' of workflow '", workflow, "': ", why));
    };
    if (t.workflow() != workflow) {
      return refuse(absl::StrCat("it is an instance of workflow '", t.workflow(), "'"));
    }
    if (from == to) return refuse("it runs that version already");
    if (!call.from.empty() && from != call.from) {
      return refuse(absl::StrCat("it runs version '", from, "', not '", call.from, "'"));
    }
    if (is_final(status)) return refuse("it has ended");
    instance_record& rec = t.rec();
    const std::optional<instance_record::stuck_info> stuck =
        status == instance_status::stuck
            ? std::optional(rec.stuck.value_or(instance_record::stuck_info{.status = "running"}))
            : std::nullopt;
    const std::string effective_name =
        stuck ? (stuck->status.empty() ? "running" : stuck->status) : status_text;
    const instance_status effective = parse_status(effective_name);
    const std::string cursor = t.cursor();
    const std::string next_cursor = mapped(cursor);
    const std::string at =
        cursor == next_cursor ? absl::StrCat("step '", cursor, "'")
                              : absl::StrCat("step '", cursor, "' (mapped to '", next_cursor, "')");
    const migrate_call::target_step* next = target(next_cursor);
    if (effective == instance_status::running && !next) {
      return refuse(absl::StrCat("it is at ", at, ", which the new version lacks"));
    }
    if (t.compensation_retry()) {
      return refuse("it waits to retry a compensation on its way to its end");
    }
    if (effective == instance_status::waiting) {
      if (rec.fan_out) {
        // Its children were started from the old step's branches or list: joining them under
        // another step's could not be right.
        return refuse(absl::StrCat("it waits for the children of its fan-out ", at,
                                   ": migrate it once they have ended, or restart it"));
      }
      // What it waits in: a retry of a process step, a child, a sleep, or a message.
      const kind_id wanted = rec.retry_at_us      ? kind_id::process
                             : rec.child          ? kind_id::call
                             : rec.sleep_until_us ? kind_id::sleep
                                                  : kind_id::wait;
      if (!next || next->kind != wanted) {
        return refuse(
            absl::StrCat("it waits at ", at, " (a ", to_absl(kind_id_name(wanted)),
                         " step), and the new version has ",
                         next ? absl::StrCat("a ", to_absl(kind_id_name(next->kind)), " step there")
                              : std::string("no such step")));
      }
      if (rec.wait_key && wanted == kind_id::wait) {
        // The new step must wait on the key the instance waits on.
        const json& inputs = rec.inputs;
        const std::string& input = next->key;
        const auto value = inputs.find(input);
        const std::string text =
            value == inputs.end()
                ? ""
                : (value->is_string() ? value->get<std::string>() : value->dump());
        if (text != *rec.wait_key) {
          return refuse(absl::StrCat("it waits on key '", *rec.wait_key, "' and step '",
                                     next_cursor, "' of the new version waits on input '", input,
                                     "' ('", text, "')"));
        }
      }
    }
    std::vector<std::string> done;
    for (const std::string& d : rec.done) {
      const std::string step = mapped(d);
      const migrate_call::target_step* then = target(step);
      if (!then || !then->compensate) {
        return refuse(absl::StrCat("its completed step '", d, "' would be '", step,
                                   "', which has no compensation in the new version"));
      }
      done.push_back(step);
    }
    std::map<std::string, std::int64_t> visits;
    for (const auto& [step, n] : rec.visits) {
      if (target(mapped(step))) visits[mapped(step)] = n;
    }
    rec.definition_name = workflow;
    rec.version = to;
    rec.cursor = next_cursor;
    rec.done = std::move(done);
    rec.visits = std::move(visits);
    if (rec.parent_step_of_child) rec.parent_step_of_child = next_cursor;
    if (rec.retry) rec.retry->step = mapped(rec.retry->step);
    if (rec.wait_deadline_us && (!next || next->timeout_ms == 0)) {
      rec.wait_deadline_us.reset();  // the new step waits without a timeout
    }
    if (effective == instance_status::waiting && rec.wait_key) {
      // The wait index lists the topics it takes: the new step's.
      out.set(absl::StrCat(o.index, ".waits.", *rec.wait_key, ".", t.id()),
              next ? json(next->topics) : json::array());
    }
    t.history(next_cursor, absl::StrCat("migrated from version '", from, "' to '", to, "'",
                                        cursor == next_cursor ? "" : absl::StrCat(" (", at, ")")));
    if (stuck && stuck->resumable && for_lack_of_definition(stuck->kind)) {
      // Parked for lack of what the new version has: it goes on.
      t.unpark();
      t.restore_status(effective_name);
      t.refresh_timer();
    } else if (stuck) {
      out.set(t.index_path("stuck", t.id()),
              json{{"workflow", workflow}, {"version", to}, {"kind", stuck->kind_name()}});
    }
    t.refresh_timer();
    t.save();
  }
  return out;
}

}  // namespace pop::detail
