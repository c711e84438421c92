#include "pop/workflow/workflow.hpp"

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pop/contracts/status.hpp"
#include "pop/workflow/detail/machine.hpp"
#include "pop/workflow/detail/workflow_parts.hpp"

namespace pop {

// ---- definitions -----------------------------------------------------------------------------

absl::StatusOr<workflow_definition> workflow_definition::from_json(const json& j) {
  workflow_definition d;
  const auto bad = [&](std::string_view where, std::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(
        "workflow '", d.name, "': ", detail::to_absl(where), ": ", detail::to_absl(what)));
  };
  if (!j.is_object()) return absl::InvalidArgumentError("a workflow definition must be an object");
  // Where a value of the wrong type is, for the error: the step and field being read.
  std::string step_name;
  std::string field_name;
  const auto val = [&](const json& o, const char* field, auto fallback) {
    field_name = field;
    return o.value(field, fallback);
  };
  try {
    field_name = "name";
    d.name = j.at("name").get<std::string>();
    d.version = val(j, "version", std::string());
    field_name = "start";
    d.start = j.at("start").get<std::string>();
    field_name = "steps";
    const json& steps = j.at("steps");
    if (!steps.is_object()) return bad("steps", "must be an object of step name -> step");
    static const std::set<std::string> known = {
        "process",    "branch",     "otherwise",  "wait",
        "call",       "fail",       "end",        "next",
        "on_error",   "key",        "timeout_ms", "on_timeout",
        "compensate", "max_visits", "sleep_ms",   "continue_as_new",
        "retry",      "inputs",     "parallel",   "map",
        "join"};
    for (const auto& [name, s] : steps.items()) {
      step_name = name;
      if (!s.is_object()) return bad(absl::StrCat("step '", name, "'"), "must be an object");
      for (const auto& [field, v] : s.items()) {
        if (!known.contains(field)) {
          return bad(absl::StrCat("step '", name, "'"),
                     absl::StrCat("unknown field '", field, "'"));
        }
      }
      workflow_step step;
      step.name = name;
      step.process = val(s, "process", "");
      step.call = val(s, "call", "");
      step.fail = val(s, "fail", "");
      step.end = val(s, "end", false);
      step.continue_as_new = val(s, "continue_as_new", false);
      step.call_inputs = val(s, "inputs", json());
      step.join = val(s, "join", std::string("all"));
      if (const auto p = s.find("parallel"); p != s.end()) {
        if (!p->is_array())
          return bad(absl::StrCat("step '", name, "'"), "parallel must be a list");
        for (const json& b : *p) {
          if (!b.is_object()) {
            return bad(absl::StrCat("step '", name, "'"), "a parallel branch must be an object");
          }
          for (const auto& [field, v] : b.items()) {
            if (field != "call" && field != "inputs") {
              return bad(absl::StrCat("step '", name, "' parallel branch"),
                         absl::StrCat("unknown field '", field, "'"));
            }
          }
          step.parallel.push_back({val(b, "call", ""), val(b, "inputs", json())});
        }
      }
      if (const auto m = s.find("map"); m != s.end()) {
        if (!m->is_object()) return bad(absl::StrCat("step '", name, "'"), "map must be an object");
        static const std::set<std::string> map_fields = {"over", "call", "as", "inputs",
                                                         "max_concurrency"};
        for (const auto& [field, v] : m->items()) {
          if (!map_fields.contains(field)) {
            return bad(absl::StrCat("step '", name, "' map"),
                       absl::StrCat("unknown field '", field, "'"));
          }
        }
        step.map.over = val(*m, "over", "");
        step.map.call = val(*m, "call", "");
        step.map.as = val(*m, "as", step.map.as);
        step.map.inputs = val(*m, "inputs", json());
        step.map.max_concurrency = val(*m, "max_concurrency", 0);
        if (step.map.call.empty())
          return bad(absl::StrCat("step '", name, "' map"), "needs 'call'");
      }
      if (const auto r = s.find("retry"); r != s.end()) {
        const std::string where = absl::StrCat("step '", name, "' retry");
        if (!r->is_object()) return bad(where, "must be an object");
        static const std::set<std::string> retry_fields = {
            "attempts", "initial_ms",    "multiplier",  "max_interval_ms",
            "jitter",   "non_retryable", "on_exhausted"};
        for (const auto& [field, v] : r->items()) {
          if (!retry_fields.contains(field)) {
            return bad(where, absl::StrCat("unknown field '", field, "'"));
          }
        }
        workflow_retry& p = step.retry;
        p.attempts = val(*r, "attempts", p.attempts);
        p.initial_ms = val(*r, "initial_ms", p.initial_ms);
        p.multiplier = val(*r, "multiplier", p.multiplier);
        p.max_interval_ms = val(*r, "max_interval_ms", p.max_interval_ms);
        p.jitter = val(*r, "jitter", p.jitter);
        p.non_retryable = val(*r, "non_retryable", p.non_retryable);
        p.on_exhausted = val(*r, "on_exhausted", p.on_exhausted);
      }
      step.next = val(s, "next", val(s, "otherwise", ""));
      step.on_error = val(s, "on_error", "");
      step.key = val(s, "key", "");
      step.timeout_ms = val(s, "timeout_ms", std::int64_t{0});
      step.on_timeout = val(s, "on_timeout", "");
      step.compensate = val(s, "compensate", "");
      step.max_visits = val(s, "max_visits", 0);
      step.sleep_ms = val(s, "sleep_ms", std::int64_t{0});
      if (const auto w = s.find("wait"); w != s.end()) {
        field_name = "wait";
        step.wait = w->get<std::map<std::string, std::string>>();
      }
      if (const auto b = s.find("branch"); b != s.end()) {
        if (!b->is_array()) return bad(absl::StrCat("step '", name, "'"), "branch must be a list");
        for (const json& c : *b) {
          if (!c.is_object()) {
            return bad(absl::StrCat("step '", name, "'"), "a branch entry must be an object");
          }
          workflow_condition cond;
          cond.path = val(c, "path", "");
          cond.op = val(c, "op", "");
          cond.value = val(c, "value", json());
          cond.predicate = val(c, "predicate", "");
          cond.next = val(c, "next", "");
          step.branch.push_back(std::move(cond));
        }
      }
      d.steps.push_back(std::move(step));
    }
  } catch (const json::exception& e) {
    return bad(step_name.empty() ? absl::StrCat("field '", field_name, "'")
                                 : absl::StrCat("step '", step_name, "' field '", field_name, "'"),
               e.what());
  }
  return d;
}

json workflow_definition::to_json() const {
  json steps_json = json::object();
  for (const workflow_step& s : steps) {
    json o = json::object();
    if (!s.process.empty()) o["process"] = s.process;
    if (!s.call.empty()) o["call"] = s.call;
    if (!s.fail.empty()) o["fail"] = s.fail;
    if (s.end) o["end"] = true;
    if (s.continue_as_new) o["continue_as_new"] = true;
    if (!s.call_inputs.is_null()) o["inputs"] = s.call_inputs;
    if (!s.parallel.empty()) {
      json branches = json::array();
      for (const workflow_branch& b : s.parallel) {
        json bj = {{"call", b.call}};
        if (!b.inputs.is_null()) bj["inputs"] = b.inputs;
        branches.push_back(std::move(bj));
      }
      o["parallel"] = std::move(branches);
    }
    if (!s.map.call.empty()) {
      json mj = {{"over", s.map.over}, {"call", s.map.call}, {"as", s.map.as}};
      if (!s.map.inputs.is_null()) mj["inputs"] = s.map.inputs;
      if (s.map.max_concurrency != 0) mj["max_concurrency"] = s.map.max_concurrency;
      o["map"] = std::move(mj);
    }
    if (s.join != "all") o["join"] = s.join;
    if (!s.wait.empty()) o["wait"] = s.wait;
    if (!s.branch.empty()) {
      json b = json::array();
      for (const workflow_condition& c : s.branch) {
        json cj = {{"next", c.next}};
        if (!c.predicate.empty()) {
          cj["predicate"] = c.predicate;
        } else {
          cj["path"] = c.path;
          cj["op"] = c.op;
          if (c.op != "exists") cj["value"] = c.value;
        }
        b.push_back(std::move(cj));
      }
      o["branch"] = std::move(b);
    }
    if (!s.next.empty()) o[s.branch.empty() ? "next" : "otherwise"] = s.next;
    if (!s.on_error.empty()) o["on_error"] = s.on_error;
    if (!s.key.empty()) o["key"] = s.key;
    if (s.timeout_ms != 0) o["timeout_ms"] = s.timeout_ms;
    if (!s.on_timeout.empty()) o["on_timeout"] = s.on_timeout;
    if (!s.compensate.empty()) o["compensate"] = s.compensate;
    if (s.max_visits != 0) o["max_visits"] = s.max_visits;
    if (s.sleep_ms != 0) o["sleep_ms"] = s.sleep_ms;
    if (s.retry != workflow_retry{}) {
      const workflow_retry& p = s.retry;
      o["retry"] = {{"attempts", p.attempts},
                    {"initial_ms", p.initial_ms},
                    {"multiplier", p.multiplier},
                    {"max_interval_ms", p.max_interval_ms},
                    {"jitter", p.jitter},
                    {"non_retryable", p.non_retryable},
                    {"on_exhausted", p.on_exhausted}};
    }
    steps_json[s.name] = std::move(o);
  }
  json out = {{"name", name}, {"start", start}, {"steps", std::move(steps_json)}};
  if (!version.empty()) out["version"] = version;
  return out;
}

absl::Status workflows::check(const workflow_definition& def) const {
  const auto bad = [&](std::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("workflow '", def.name, "': ", detail::to_absl(what)));
  };
  if (absl::Status s = process_contract::from_spec({.name = def.name, .emits = {"x"}}).status();
      !s.ok()) {
    return annotate(s, "workflow name");
  }
  if (!def.version.empty()) {
    if (def.version.size() > 64 || !validate_segment(def.version).ok()) {
      return bad(absl::StrCat("version '", def.version,
                              "' must be at most 64 letters, digits, '_' or '-'"));
    }
  }
  std::map<std::string, const workflow_step*, std::less<>> steps;
  for (const workflow_step& s : def.steps) {
    if (!path::parse(absl::StrCat("s.", s.name)).ok()) {
      return bad(absl::StrCat("step name '", s.name, "' must be letters, digits, '_' or '-'"));
    }
    if (!steps.emplace(s.name, &s).second)
      return bad(absl::StrCat("step '", s.name, "' is defined twice"));
  }
  if (!steps.contains(def.start))
    return bad(absl::StrCat("the start step '", def.start, "' is missing"));
  std::lock_guard lock(mu_);
  std::map<std::string, std::vector<std::string>> edges;
  for (const workflow_step& s : def.steps) {
    const std::string where = absl::StrCat("step '", s.name, "'");
    if (kinds(s) != 1) {
      return bad(absl::StrCat(where,
                              " must have exactly one of process, branch, wait, call, sleep_ms, "
                              "fail, end, continue_as_new, parallel, map; it has ",
                              kinds(s)));
    }
    std::vector<std::string>& out = edges[s.name];
    const auto target = [&](const std::string& field, const std::string& name,
                            bool required) -> absl::Status {
      if (name.empty()) {
        return required ? bad(absl::StrCat(where, " (", kind_name(s), ") needs '", field, "'"))
                        : absl::OkStatus();
      }
      if (!steps.contains(name)) {
        return bad(absl::StrCat(where, ": ", field, " names a missing step '", name, "'"));
      }
      out.push_back(name);
      return absl::OkStatus();
    };
    if (!s.process.empty()) {
      if (!processes_.contains(s.process)) {
        return bad(absl::StrCat(where, " runs unknown process '", s.process,
                                "' (register it with workflows::register_process)"));
      }
      if (!s.compensate.empty() && !processes_.contains(s.compensate)) {
        return bad(absl::StrCat(where, " compensates with unknown process '", s.compensate, "'"));
      }
      POP_RETURN_IF_ERROR(target("next", s.next, true));
      POP_RETURN_IF_ERROR(target("on_error", s.on_error, false));
    } else if (!s.compensate.empty()) {
      return bad(absl::StrCat(where, ": only process steps can have a compensation"));
    }
    if (s.retry != workflow_retry{}) {
      const workflow_retry& p = s.retry;
      const std::string at = absl::StrCat(where, ": retry");
      if (s.process.empty()) return bad(absl::StrCat(at, ": only process steps retry"));
      if (p.attempts < 1 || p.attempts > 1000) {
        return bad(absl::StrCat(at, ": attempts must be 1 to 1000, not ", p.attempts));
      }
      if (p.initial_ms < 0 || p.max_interval_ms < p.initial_ms ||
          p.max_interval_ms > detail::max_duration_ms) {
        return bad(absl::StrCat(at, ": needs 0 <= initial_ms (", p.initial_ms,
                                ") <= max_interval_ms (", p.max_interval_ms, ") <= a year (",
                                detail::max_duration_ms, ")"));
      }
      if (!(p.multiplier >= 1.0 && p.multiplier <= 100.0)) {
        return bad(absl::StrCat(at, ": multiplier must be 1 to 100, not ", p.multiplier));
      }
      if (!(p.jitter >= 0.0 && p.jitter <= 1.0)) {
        return bad(absl::StrCat(at, ": jitter must be 0 to 1, not ", p.jitter));
      }
      for (const std::string& code : p.non_retryable) {
        bool known = false;
        for (int c = 1; c <= 16 && !known; ++c) {
          known = absl::StatusCodeToString(static_cast<absl::StatusCode>(c)) == code;
        }
        if (!known) {
          return bad(absl::StrCat(at, ": non_retryable names '", code,
                                  "', not a status code name such as INVALID_ARGUMENT"));
        }
      }
      if (p.on_exhausted != "fail" && p.on_exhausted != "compensate" && p.on_exhausted != "pause") {
        return bad(absl::StrCat(at, ": on_exhausted is '", p.on_exhausted,
                                "'; use fail, compensate or pause"));
      }
    }
    if (!s.branch.empty()) {
      for (const workflow_condition& c : s.branch) {
        if (!c.predicate.empty()) {
          if (!machine_->predicate(c.predicate)) {
            return bad(absl::StrCat(where, " uses unknown predicate '", c.predicate, "'"));
          }
        } else {
          static const std::set<std::string> ops = {"eq", "ne", "lt", "gt", "exists"};
          if (!ops.contains(c.op)) {
            return bad(absl::StrCat(where, ": condition on '", c.path, "' has op '", c.op,
                                    "'; use eq, ne, lt, gt or exists"));
          }
          std::string probe = c.path;
          for (std::size_t at; (at = probe.find('{')) != std::string::npos;) {
            const std::size_t close = probe.find('}', at);
            if (close == std::string::npos)
              return bad(absl::StrCat(where, ": unclosed '{' in '", c.path, "'"));
            probe.replace(at, close - at + 1, "x");
          }
          if (absl::Status st = path::parse(probe).status(); !st.ok()) {
            return bad(absl::StrCat(where, ": condition path: ", st.message()));
          }
          if (static_prefix(c.path).empty()) {
            return bad(
                absl::StrCat(where, ": condition path '", c.path,
                             "' must start with a fixed segment (it is declared as an input)"));
          }
        }
        POP_RETURN_IF_ERROR(target("a condition's next", c.next, true));
      }
      POP_RETURN_IF_ERROR(target("otherwise", s.next, true));
    }
    if (!s.wait.empty()) {
      if (s.key.empty()) return bad(absl::StrCat(where, " (wait) needs 'key', an input name"));
      for (const auto& [topic, next] : s.wait) {
        if (absl::Status st = validate_topic(topic); !st.ok())
          return bad(absl::StrCat(where, ": ", st.message()));
        POP_RETURN_IF_ERROR(target(absl::StrCat("wait '", topic, "'"), next, true));
      }
      if (s.timeout_ms < 0 || s.timeout_ms > detail::max_duration_ms) {
        return bad(absl::StrCat(where, ": timeout_ms must be 0 to ", detail::max_duration_ms,
                                " (a year)"));
      }
      if (!s.on_timeout.empty() && s.timeout_ms == 0) {
        return bad(absl::StrCat(where, ": on_timeout needs timeout_ms"));
      }
      POP_RETURN_IF_ERROR(target("on_timeout", s.on_timeout, false));
    }
    if (!s.call.empty()) {
      if (s.call == def.name) return bad(absl::StrCat(where, " calls its own workflow"));
      if (!machine_->find(s.call)) {
        return bad(absl::StrCat(where, " calls unknown workflow '", s.call, "' (define it first)"));
      }
      POP_RETURN_IF_ERROR(target("next", s.next, true));
      POP_RETURN_IF_ERROR(target("on_error", s.on_error, false));
    }
    // Child inputs: an object whose placeholders close.
    const auto child_inputs = [&](const json& inputs, const std::string& at) -> absl::Status {
      if (inputs.is_null()) return absl::OkStatus();
      if (!inputs.is_object()) {
        return bad(absl::StrCat(at, ": inputs must be an object of child input -> value"));
      }
      for (const auto& [name, v] : inputs.items()) {
        if (!v.is_string()) continue;
        const std::string& text = v.get_ref<const std::string&>();
        for (std::size_t open = text.find('{'); open != std::string::npos;
             open = text.find('{', open + 1)) {
          if (text.find('}', open) == std::string::npos) {
            return bad(absl::StrCat(at, ": input '", name, "': unclosed '{' in '", text, "'"));
          }
        }
      }
      return absl::OkStatus();
    };
    if (!s.call_inputs.is_null()) {
      if (s.call.empty()) return bad(absl::StrCat(where, ": only call steps have inputs"));
      POP_RETURN_IF_ERROR(child_inputs(s.call_inputs, where));
    }
    const auto callable = [&](const std::string& name, const std::string& at) -> absl::Status {
      if (name == def.name) return bad(absl::StrCat(at, " calls its own workflow"));
      if (!machine_->find(name)) {
        return bad(absl::StrCat(at, " calls unknown workflow '", name, "' (define it first)"));
      }
      return absl::OkStatus();
    };
    if (!s.parallel.empty() || !s.map.call.empty()) {
      for (std::size_t i = 0; i < s.parallel.size(); ++i) {
        const std::string at = absl::StrCat(where, " branch ", i);
        POP_RETURN_IF_ERROR(callable(s.parallel[i].call, at));
        POP_RETURN_IF_ERROR(child_inputs(s.parallel[i].inputs, at));
      }
      if (!s.map.call.empty()) {
        const std::string at = absl::StrCat(where, " (map)");
        POP_RETURN_IF_ERROR(callable(s.map.call, at));
        POP_RETURN_IF_ERROR(child_inputs(s.map.inputs, at));
        if (s.map.over.empty()) return bad(absl::StrCat(at, " needs 'over', a list input"));
        if (!validate_segment(s.map.as).ok()) {
          return bad(absl::StrCat(at, ": 'as' must be letters, digits, '_' or '-'"));
        }
        if (s.map.max_concurrency < 0) {
          return bad(absl::StrCat(at, ": max_concurrency must not be negative"));
        }
      }
      if (s.join != "all" && s.join != "any") {
        return bad(absl::StrCat(where, ": join is '", s.join, "'; use all or any"));
      }
      POP_RETURN_IF_ERROR(target("next", s.next, true));
      POP_RETURN_IF_ERROR(target("on_error", s.on_error, false));
    } else if (s.join != "all") {
      return bad(absl::StrCat(where, ": only parallel and map steps join"));
    }
    if (s.sleep_ms < 0 || s.sleep_ms > detail::max_duration_ms) {
      return bad(
          absl::StrCat(where, ": sleep_ms must be 0 to ", detail::max_duration_ms, " (a year)"));
    }
    if (s.sleep_ms > 0) POP_RETURN_IF_ERROR(target("next", s.next, true));
    if (s.max_visits < 0) return bad(absl::StrCat(where, ": max_visits must not be negative"));
  }
  // Every step reachable from the start.
  std::set<std::string> seen{def.start};
  std::vector<std::string> todo{def.start};
  while (!todo.empty()) {
    const std::string at = todo.back();
    todo.pop_back();
    for (const std::string& n : edges[at]) {
      if (seen.insert(n).second) todo.push_back(n);
    }
  }
  for (const workflow_step& s : def.steps) {
    if (!seen.contains(s.name))
      return bad(absl::StrCat("step '", s.name, "' is unreachable from '", def.start, "'"));
  }
  // Every loop has a bound: a step that can reach itself needs max_visits.
  for (const workflow_step& s : def.steps) {
    if (s.max_visits > 1) continue;
    std::map<std::string, std::string> came_from;
    std::vector<std::string> stack(edges[s.name].begin(), edges[s.name].end());
    for (const std::string& n : stack) came_from.emplace(n, s.name);
    while (!stack.empty()) {
      const std::string at = stack.back();
      stack.pop_back();
      if (at == s.name) {
        std::vector<std::string> loop{s.name};
        for (std::string back = came_from[s.name]; back != s.name && loop.size() < 64;
             back = came_from[back]) {
          loop.push_back(back);
        }
        std::reverse(loop.begin() + 1, loop.end());
        loop.push_back(s.name);
        return bad(absl::StrCat("step '", s.name, "' is on a loop (", absl::StrJoin(loop, " -> "),
                                ") with no bound: give it max_visits > 1"));
      }
      for (const std::string& n : edges[at]) {
        if (came_from.emplace(n, at).second) stack.push_back(n);
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace pop
