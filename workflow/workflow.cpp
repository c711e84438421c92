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
#include "pop/workflow/detail/machine.hpp"
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

workflows::workflows(engine& e, workflow_options opts)
    : engine_(e), options_(opts), machine_(std::make_unique<detail::machine>(std::move(opts))) {}

workflows::~workflows() = default;

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
  const detail::machine* m = machine_.get();
  process_fn step_fn = [m, fn](const context& ctx, const json& args) -> absl::StatusOr<result> {
    POP_ASSIGN_OR_RETURN(const detail::step_call c, detail::step_call_from(args));
    return m->step(fn, ctx, c);
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
  if (!machine_->add_predicate(name, {std::move(inputs), std::move(fn)})) {
    return absl::AlreadyExistsError(absl::StrCat("a predicate named '", name, "' exists"));
  }
  return absl::OkStatus();
}

std::shared_ptr<const workflows::defined> workflows::find_definition(std::string_view name) const {
  return machine_->find(name);
}

std::shared_ptr<const workflows::defined> workflows::find_definition(
    std::string_view name, std::string_view version) const {
  return machine_->find(name, version);
}

workflows::resolved workflows::resolve(std::string_view workflow, std::string_view version) const {
  return machine_->resolve(workflow, version);
}

std::vector<std::string> workflows::versions(std::string_view name) const {
  return machine_->versions(name);
}

std::string workflows::version_of(const workflow_definition& def) {
  if (!def.version.empty()) return def.version;
  const std::uint64_t h = detail::fnv1a(def.to_json().dump());
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

absl::Status workflows::define(workflow_definition def) {
  POP_RETURN_IF_ERROR(check(def));
  std::string version_name = version_of(def);
  std::shared_ptr<const defined> d = detail::compile(std::move(def), std::move(version_name));
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
  machine_->add(std::move(d));
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
          POP_ASSIGN_OR_RETURN(detail::start_call c, detail::start_call_from(args));
          result out;
          detail::instance_txn t(o, ctx, out, c.id, c.now);
          if (t.load()) {
            // Starting the same instance again (a retried request) is not an error.
            const bool same = t.rec().workflow == c.workflow && t.rec().inputs == c.inputs;
            if (same && c.idempotent) return out;
            return absl::AlreadyExistsError(absl::StrCat(
                "workflow instance '", t.id(), "' already exists",
                same ? ""
                     : absl::StrCat(" (workflow '", t.rec().workflow,
                                    "' with other inputs: ", t.rec().inputs.dump(), ")")));
          }
          t.create(c.workflow, c.version, c.start, std::move(c.inputs), c.deadline_us);
          t.save_last();
          return out;
        }));
  }
  std::vector<std::string> inputs = owned;
  for (const auto& [name, step] : d->steps) {
    const auto* branch = std::get_if<detail::branch_kind>(&step.kind);
    if (branch == nullptr) continue;
    for (const detail::branch_kind::condition& c : branch->conditions) {
      if (c.op == detail::condition_op::predicate) {
        if (const auto p = machine_->predicate(c.predicate)) {
          inputs.insert(inputs.end(), p->inputs.begin(), p->inputs.end());
        }
      } else {
        const std::string prefix = static_prefix(c.path);
        if (!prefix.empty()) inputs.push_back(prefix);
      }
    }
  }
  std::shared_ptr<const defined> def = d;
  return engine_.register_process(
      {.name = control_process(d->def.name, d->version),
       .inputs = outermost(inputs),
       .outputs = owned},
      [m = machine_.get(), def](const context& ctx, const json& args) -> absl::StatusOr<result> {
        POP_ASSIGN_OR_RETURN(const detail::control_call c, detail::control_call_from(args));
        return m->control(*def, ctx, c);
      });
}

}  // namespace pop
