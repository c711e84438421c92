#include "pop/workflow/detail/model.hpp"

#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "pop/contracts/path.hpp"
#include "pop/contracts/status.hpp"

namespace pop::detail {

namespace {

exhausted_action parse_exhausted(const std::string& s) {
  return s == "pause"        ? exhausted_action::pause
         : s == "compensate" ? exhausted_action::compensate
                             : exhausted_action::fail;
}

condition_op parse_op(const workflow_condition& c) {
  if (!c.predicate.empty()) return condition_op::predicate;
  if (c.op == "ne") return condition_op::ne;
  if (c.op == "lt") return condition_op::lt;
  if (c.op == "gt") return condition_op::gt;
  if (c.op == "exists") return condition_op::exists;
  return condition_op::eq;
}

// Field `name` of `args` as a T (std::string, std::int64_t or int), or kInvalidArgument naming
// it; `fallback` when absent, if given.
template <class T>
absl::StatusOr<T> field(const json& args, std::string_view name,
                        std::optional<T> fallback = std::nullopt) {
  const auto it = args.find(name);
  if (it == args.end()) {
    if (fallback) return *std::move(fallback);
    return absl::InvalidArgumentError(
        absl::StrCat("workflow process arguments lack '", to_absl(name), "'"));
  }
  if constexpr (std::is_same_v<T, std::string>) {
    if (it->is_string()) return it->template get_ref<const std::string&>();
  } else {
    if (it->is_number_integer()) return it->template get<T>();
  }
  return absl::InvalidArgumentError(absl::StrCat("workflow process argument '", to_absl(name),
                                                 "' is ", it->dump(), ", of the wrong type"));
}

// OK if `id` can name an instance: one path segment ("a.b" would nest it in instance "a").
absl::Status instance_id(const std::string& id) {
  if (absl::Status s = validate_segment(id); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("workflow process argument 'id': ", s.message()));
  }
  return absl::OkStatus();
}

// An object with "id" and "now", the start of every call's arguments (built member by member:
// an initializer list copies each value once more).
json call_args(const std::string& id, std::int64_t now) {
  json args(json::value_t::object);
  args["id"] = id;
  args["now"] = now;
  return args;
}

}  // namespace

step_kind kind_of(const workflow_step& s) {
  if (!s.process.empty()) {
    return process_kind{s.process, s.compensate, parse_exhausted(s.retry.on_exhausted)};
  }
  if (!s.branch.empty()) {
    branch_kind b;
    b.otherwise = s.next;
    for (const workflow_condition& c : s.branch) {
      b.conditions.push_back({parse_op(c), c.path, c.value, c.predicate, c.next});
    }
    return b;
  }
  if (!s.wait.empty()) return wait_kind{s.wait, s.key, s.timeout_ms, s.on_timeout};
  if (!s.call.empty()) return call_kind{s.call, s.call_inputs};
  if (!s.fail.empty()) return fail_kind{s.fail};
  if (s.sleep_ms > 0) return sleep_kind{s.sleep_ms};
  if (s.continue_as_new) return continue_as_new_kind{};
  const join_mode join = s.join == "any" ? join_mode::any : join_mode::all;
  if (!s.parallel.empty()) return fan_out_kind{s.parallel, std::nullopt, join};
  if (!s.map.call.empty()) return fan_out_kind{{}, s.map, join};
  return end_kind{};
}

std::string_view kind_name(const step_kind& k) {
  return std::visit(
      overloaded{
          [](const process_kind&) { return std::string_view("process"); },
          [](const branch_kind&) { return std::string_view("branch"); },
          [](const wait_kind&) { return std::string_view("wait"); },
          [](const call_kind&) { return std::string_view("call"); },
          [](const sleep_kind&) { return std::string_view("sleep"); },
          [](const fail_kind&) { return std::string_view("fail"); },
          [](const end_kind&) { return std::string_view("end"); },
          [](const continue_as_new_kind&) { return std::string_view("continue_as_new"); },
          [](const fan_out_kind& f) { return std::string_view(f.map ? "map" : "parallel"); },
      },
      k);
}

std::shared_ptr<const defined_workflow> compile(workflow_definition def, std::string version) {
  auto d = std::make_shared<defined_workflow>();
  d->def = std::move(def);
  d->version = std::move(version);
  for (const workflow_step& s : d->def.steps) {
    d->steps.emplace(s.name, defined_workflow::compiled{&s, kind_of(s)});
  }
  return d;
}

json to_args(const control_call& c) {
  json args = call_args(c.id, c.now);
  std::visit(overloaded{
                 [&](const run_step_event&) { args["action"] = "step"; },
                 [&](const step_failed_event& e) {
                   args["action"] = "step_failed";
                   args["step"] = e.step;
                   args["error"] = e.error;
                   args["code"] = static_cast<int>(e.code);
                   if (e.compensation) args["mode"] = "compensate";
                 },
                 [&](const timer_event&) { args["action"] = "timeout"; },
                 [&](const cancel_event& e) {
                   args["action"] = "cancel";
                   args["reason"] = e.reason;
                 },
             },
             c.event);
  return args;
}

absl::StatusOr<control_call> control_call_from(const json& args) {
  if (!args.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("workflow control arguments are ", args.dump(), ", not an object"));
  }
  control_call c;
  POP_ASSIGN_OR_RETURN(c.id, field<std::string>(args, "id"));
  POP_RETURN_IF_ERROR(instance_id(c.id));
  POP_ASSIGN_OR_RETURN(c.now, field<std::int64_t>(args, "now"));
  POP_ASSIGN_OR_RETURN(const std::string action, field<std::string>(args, "action"));
  if (action == "step") {
    c.event = run_step_event{};
  } else if (action == "step_failed") {
    step_failed_event e;
    POP_ASSIGN_OR_RETURN(e.step, field<std::string>(args, "step"));
    POP_ASSIGN_OR_RETURN(e.error, field<std::string>(args, "error"));
    POP_ASSIGN_OR_RETURN(const int code,
                         field<int>(args, "code", static_cast<int>(absl::StatusCode::kUnknown)));
    e.code = static_cast<absl::StatusCode>(code);
    POP_ASSIGN_OR_RETURN(const std::string mode, field<std::string>(args, "mode", ""));
    e.compensation = mode == "compensate";
    c.event = std::move(e);
  } else if (action == "timeout") {
    c.event = timer_event{};
  } else if (action == "cancel") {
    cancel_event e;
    POP_ASSIGN_OR_RETURN(e.reason, field<std::string>(args, "reason", e.reason));
    c.event = std::move(e);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown workflow action '", action, "'"));
  }
  return c;
}

json to_args(const step_call& c) {
  json args = call_args(c.id, c.now);
  args["step"] = c.step;
  if (c.compensation) args["mode"] = "compensate";
  return args;
}

absl::StatusOr<step_call> step_call_from(const json& args) {
  if (!args.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("workflow step arguments are ", args.dump(), ", not an object"));
  }
  step_call c;
  POP_ASSIGN_OR_RETURN(c.id, field<std::string>(args, "id"));
  POP_RETURN_IF_ERROR(instance_id(c.id));
  POP_ASSIGN_OR_RETURN(c.now, field<std::int64_t>(args, "now"));
  POP_ASSIGN_OR_RETURN(c.step, field<std::string>(args, "step"));
  POP_ASSIGN_OR_RETURN(const std::string mode, field<std::string>(args, "mode", ""));
  c.compensation = mode == "compensate";
  return c;
}

json to_args(start_call c) {
  json args = call_args(c.id, c.now);
  args["workflow"] = std::move(c.workflow);
  args["version"] = std::move(c.version);
  args["start"] = std::move(c.start);
  args["inputs"] = std::move(c.inputs);
  if (c.deadline_us > 0) args["deadline_us"] = c.deadline_us;
  args["idempotent"] = c.idempotent;
  return args;
}

absl::StatusOr<start_call> start_call_from(const json& args) {
  if (!args.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("workflow start arguments are ", args.dump(), ", not an object"));
  }
  start_call c;
  POP_ASSIGN_OR_RETURN(c.id, field<std::string>(args, "id"));
  POP_RETURN_IF_ERROR(instance_id(c.id));
  POP_ASSIGN_OR_RETURN(c.now, field<std::int64_t>(args, "now"));
  POP_ASSIGN_OR_RETURN(c.workflow, field<std::string>(args, "workflow"));
  POP_ASSIGN_OR_RETURN(c.version, field<std::string>(args, "version"));
  POP_ASSIGN_OR_RETURN(c.start, field<std::string>(args, "start"));
  POP_ASSIGN_OR_RETURN(c.deadline_us, field<std::int64_t>(args, "deadline_us", 0));
  const auto inputs = args.find("inputs");
  if (inputs == args.end() || !inputs->is_object()) {
    return absl::InvalidArgumentError("workflow start arguments lack 'inputs' (an object)");
  }
  c.inputs = *inputs;
  const auto idempotent = args.find("idempotent");
  if (idempotent != args.end() && !idempotent->is_boolean()) {
    return absl::InvalidArgumentError(absl::StrCat("workflow process argument 'idempotent' is ",
                                                   idempotent->dump(), ", of the wrong type"));
  }
  c.idempotent = idempotent == args.end() || idempotent->get<bool>();
  return c;
}

namespace {

constexpr std::pair<kind_id, std::string_view> kind_id_names[] = {
    {kind_id::process, "process"}, {kind_id::branch, "branch"},
    {kind_id::wait, "wait"},       {kind_id::call, "call"},
    {kind_id::sleep, "sleep"},     {kind_id::fail, "fail"},
    {kind_id::end, "end"},         {kind_id::continue_as_new, "continue_as_new"},
    {kind_id::fan_out, "fan_out"},
};

}  // namespace

std::string_view kind_id_name(kind_id k) {
  return name_in(kind_id_names, k);
}

json to_args(const migrate_call& c) {
  json target = json::object();
  for (const auto& [name, t] : c.target) {
    target[name] = {{"kind", kind_id_name(t.kind)},
                    {"compensate", t.compensate},
                    {"topics", t.topics},
                    {"key", t.key},
                    {"timeout_ms", t.timeout_ms}};
  }
  return {{"workflow", c.workflow},      {"to", c.to},   {"from", c.from}, {"steps", c.steps},
          {"target", std::move(target)}, {"ids", c.ids}, {"now", c.now}};
}

absl::StatusOr<migrate_call> migrate_call_from(const json& args) {
  const auto bad = [](std::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("workflow migration arguments: ", to_absl(what), " is missing or malformed"));
  };
  if (!args.is_object()) return bad("the whole");
  migrate_call c;
  POP_ASSIGN_OR_RETURN(c.workflow, field<std::string>(args, "workflow"));
  POP_ASSIGN_OR_RETURN(c.to, field<std::string>(args, "to"));
  POP_ASSIGN_OR_RETURN(c.from, field<std::string>(args, "from", std::string()));
  POP_ASSIGN_OR_RETURN(c.now, field<std::int64_t>(args, "now"));
  const auto steps = args.find("steps");
  const auto target = args.find("target");
  const auto ids = args.find("ids");
  if (steps == args.end() || !steps->is_object()) return bad("'steps'");
  if (target == args.end() || !target->is_object()) return bad("'target'");
  if (ids == args.end() || !ids->is_array()) return bad("'ids'");
  for (const auto& [from, to] : steps->items()) {
    if (!to.is_string()) return bad(absl::StrCat("'steps.", from, "'"));
    c.steps.emplace(from, to.get<std::string>());
  }
  for (const auto& [name, t] : target->items()) {
    const std::string where = absl::StrCat("'target.", name, "'");
    if (!t.is_object()) return bad(where);
    migrate_call::target_step step;
    const std::optional<kind_id> kind = find_in(kind_id_names, t.value("kind", ""));
    const auto topics = t.find("topics");
    const auto timeout = t.find("timeout_ms");
    if (!kind || !t.value("compensate", json()).is_boolean() || topics == t.end() ||
        !topics->is_array() || !t.value("key", json()).is_string() || timeout == t.end() ||
        !timeout->is_number_integer()) {
      return bad(where);
    }
    step.kind = *kind;
    step.compensate = t.at("compensate").get<bool>();
    for (const json& topic : *topics) {
      if (!topic.is_string()) return bad(where);
      step.topics.push_back(topic.get<std::string>());
    }
    step.key = t.at("key").get<std::string>();
    step.timeout_ms = timeout->get<std::int64_t>();
    c.target.emplace(name, std::move(step));
  }
  for (const json& id : *ids) {
    if (!id.is_string()) return bad("'ids'");
    c.ids.push_back(id.get<std::string>());
    POP_RETURN_IF_ERROR(instance_id(c.ids.back()));
  }
  return c;
}

std::string_view action_name(const operator_action& a) {
  return std::visit(overloaded{
                        [](const park_action&) { return std::string_view("park"); },
                        [](const resume_action&) { return std::string_view("resume"); },
                        [](const restart_action&) { return std::string_view("restart"); },
                        [](const cancel_action&) { return std::string_view("cancel"); },
                    },
                    a);
}

json to_args(const operator_call& c) {
  json args = call_args(c.id, c.now);
  args["action"] = action_name(c.action);
  std::visit(overloaded{
                 [&](const park_action& a) {
                   args["expect"] = a.expect;
                   args["reason"] = a.reason;
                   args["kind"] = park_kind_name(a.kind);
                 },
                 [&](const resume_action& a) {
                   if (a.kind) args["kind"] = park_kind_name(*a.kind);
                   args["by"] = a.by;
                 },
                 [&](const restart_action& a) {
                   args["step"] = a.step;
                   args["version"] = a.version;
                 },
                 [&](const cancel_action& a) { args["reason"] = a.reason; },
             },
             c.action);
  return args;
}

absl::StatusOr<operator_call> operator_call_from(const json& args) {
  if (!args.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("workflow operator arguments are ", args.dump(), ", not an object"));
  }
  operator_call c;
  POP_ASSIGN_OR_RETURN(c.id, field<std::string>(args, "id"));
  POP_RETURN_IF_ERROR(instance_id(c.id));
  POP_ASSIGN_OR_RETURN(c.now, field<std::int64_t>(args, "now"));
  POP_ASSIGN_OR_RETURN(const std::string action, field<std::string>(args, "action"));
  if (action == "park") {
    park_action a;
    POP_ASSIGN_OR_RETURN(a.expect, field<std::string>(args, "expect"));
    POP_ASSIGN_OR_RETURN(a.reason, field<std::string>(args, "reason"));
    POP_ASSIGN_OR_RETURN(const std::string kind, field<std::string>(args, "kind", "operator"));
    a.kind = parse_park_kind(kind);
    c.action = std::move(a);
  } else if (action == "resume") {
    resume_action a;
    POP_ASSIGN_OR_RETURN(const std::string kind, field<std::string>(args, "kind", ""));
    if (!kind.empty()) a.kind = parse_park_kind(kind);
    POP_ASSIGN_OR_RETURN(a.by, field<std::string>(args, "by", a.by));
    c.action = std::move(a);
  } else if (action == "restart") {
    restart_action a;
    POP_ASSIGN_OR_RETURN(a.step, field<std::string>(args, "step"));
    POP_ASSIGN_OR_RETURN(a.version, field<std::string>(args, "version", ""));
    c.action = std::move(a);
  } else if (action == "cancel") {
    cancel_action a;
    POP_ASSIGN_OR_RETURN(a.reason, field<std::string>(args, "reason", a.reason));
    c.action = std::move(a);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown workflow action '", action, "'"));
  }
  return c;
}

}  // namespace pop::detail
