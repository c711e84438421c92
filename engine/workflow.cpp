#include "engine/workflow.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "contracts/process_error.hpp"
#include "contracts/status.hpp"

namespace pop {

namespace {

constexpr std::string_view start_process = "workflow.start";
constexpr std::string_view resume_process = "workflow.resume";

std::string step_process(std::string_view process) {
  return absl::StrCat("workflow.step:", detail::to_absl(process));
}
std::string control_process(std::string_view workflow) {
  return absl::StrCat("workflow.control:", detail::to_absl(workflow));
}

std::int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int kinds(const workflow_step& s) {
  return !s.process.empty() + !s.branch.empty() + !s.wait.empty() + !s.call.empty() +
         !s.fail.empty() + s.end;
}

const char* kind_name(const workflow_step& s) {
  if (!s.process.empty()) return "process";
  if (!s.branch.empty()) return "branch";
  if (!s.wait.empty()) return "wait";
  if (!s.call.empty()) return "call";
  if (!s.fail.empty()) return "fail";
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

bool compare(const json& actual, const std::string& op, const json& expected) {
  if (op == "eq") return actual == expected;
  if (op == "ne") return actual != expected;
  const bool numbers = actual.is_number() && expected.is_number();
  const bool strings = actual.is_string() && expected.is_string();
  if (!numbers && !strings) return false;
  if (op == "lt")
    return numbers ? actual.get<double>() < expected.get<double>() : actual < expected;
  if (op == "gt")
    return numbers ? actual.get<double>() > expected.get<double>() : actual > expected;
  return false;
}

}  // namespace

// ---- definitions -----------------------------------------------------------------------------

absl::StatusOr<workflow_definition> workflow_definition::from_json(const json& j) {
  workflow_definition d;
  const auto bad = [&](std::string_view where, std::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(
        "workflow '", d.name, "': ", detail::to_absl(where), ": ", detail::to_absl(what)));
  };
  if (!j.is_object()) return absl::InvalidArgumentError("a workflow definition must be an object");
  try {
    d.name = j.at("name").get<std::string>();
    d.start = j.at("start").get<std::string>();
    const json& steps = j.at("steps");
    if (!steps.is_object()) return bad("steps", "must be an object of step name -> step");
    static const std::set<std::string> known = {
        "process", "branch",   "otherwise", "wait",       "call",       "fail",       "end",
        "next",    "on_error", "key",       "timeout_ms", "on_timeout", "compensate", "max_visits"};
    for (const auto& [name, s] : steps.items()) {
      if (!s.is_object()) return bad(absl::StrCat("step '", name, "'"), "must be an object");
      for (const auto& [field, v] : s.items()) {
        if (!known.contains(field)) {
          return bad(absl::StrCat("step '", name, "'"),
                     absl::StrCat("unknown field '", field, "'"));
        }
      }
      workflow_step step;
      step.name = name;
      step.process = s.value("process", "");
      step.call = s.value("call", "");
      step.fail = s.value("fail", "");
      step.end = s.value("end", false);
      step.next = s.value("next", s.value("otherwise", ""));
      step.on_error = s.value("on_error", "");
      step.key = s.value("key", "");
      step.timeout_ms = s.value("timeout_ms", std::int64_t{0});
      step.on_timeout = s.value("on_timeout", "");
      step.compensate = s.value("compensate", "");
      step.max_visits = s.value("max_visits", 0);
      if (const auto w = s.find("wait"); w != s.end()) {
        step.wait = w->get<std::map<std::string, std::string>>();
      }
      if (const auto b = s.find("branch"); b != s.end()) {
        if (!b->is_array()) return bad(absl::StrCat("step '", name, "'"), "branch must be a list");
        for (const json& c : *b) {
          workflow_condition cond;
          cond.path = c.value("path", "");
          cond.op = c.value("op", "");
          cond.value = c.value("value", json());
          cond.predicate = c.value("predicate", "");
          cond.next = c.value("next", "");
          step.branch.push_back(std::move(cond));
        }
      }
      d.steps.push_back(std::move(step));
    }
  } catch (const json::exception& e) {
    return bad("definition", e.what());
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
    steps_json[s.name] = std::move(o);
  }
  return {{"name", name}, {"start", start}, {"steps", std::move(steps_json)}};
}

// ---- registry --------------------------------------------------------------------------------

struct workflows::registered_process {
  process_contract contract;
  process_fn fn;
};

struct workflows::registered_predicate {
  std::vector<std::string> inputs;
  predicate_fn fn;
};

struct workflows::defined {
  workflow_definition def;
  std::string version;  // a hash of the definition's JSON, recorded in every instance
  std::map<std::string, const workflow_step*, std::less<>> steps;
  const workflow_step* step(std::string_view name) const {
    const auto it = steps.find(name);
    return it == steps.end() ? nullptr : it->second;
  }
};

absl::StatusOr<std::unique_ptr<workflows>> workflows::create(engine& e, workflow_options opts) {
  for (const std::string* p : {&opts.instances, &opts.index}) {
    if (absl::StatusOr<path> parsed = path::parse(*p); !parsed.ok()) {
      return annotate(parsed.status(), "workflow_options");
    }
  }
  return std::unique_ptr<workflows>(new workflows(e, std::move(opts)));
}

workflows::workflows(engine& e, workflow_options opts) : engine_(e), options_(std::move(opts)) {}

// ---- the transactions ------------------------------------------------------------------------

namespace detail {

// One transaction on one instance, inside a process run: reads through `ctx`, collects writes in
// `out`. Every state change of an instance goes through here.
class instance_txn {
 public:
  using find_fn = std::function<std::shared_ptr<const void>(std::string_view)>;

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
    std::optional<json> r = ctx_.find<json>(instance_path(id_));
    if (!r) return false;
    rec_ = std::move(*r);
    return true;
  }
  json& rec() { return rec_; }
  const std::string& id() const { return id_; }
  std::string status() const { return rec_.value("status", ""); }
  std::string cursor() const { return rec_.value("cursor", ""); }

  void history(const std::string& step, const std::string& outcome) {
    rec_["history"].push_back({{"step", step}, {"outcome", outcome}, {"at_us", now_}});
  }

  // Moves the cursor to `step`, running.
  void go(const std::string& step) {
    rec_["cursor"] = step;
    set_status("running");
  }

  void set_status(const std::string& status) {
    rec_["status"] = status;
    const bool runnable = status == "running" || status == "compensating";
    if (runnable) {
      out_.set(index_path("runnable", id_), true);
    } else {
      out_.erase(index_path("runnable", id_));
    }
  }

  // Removes the wait and timer index entries of a waiting instance.
  void clear_wait() {
    if (rec_.contains("wait_key")) {
      out_.erase(absl::StrCat(o_.index, ".waits.", rec_["wait_key"].get<std::string>(), ".", id_));
      rec_.erase("wait_key");
    }
    rec_.erase("wait_deadline_us");
    refresh_timer();
  }

  void refresh_timer() {
    std::int64_t due = 0;
    for (const char* f : {"wait_deadline_us", "deadline_us"}) {
      const std::int64_t d = rec_.value(f, std::int64_t{0});
      if (d > 0 && (due == 0 || d < due)) due = d;
    }
    const bool ended = status_is_final(status());
    if (due > 0 && !ended) {
      out_.set(index_path("timers", id_), due);
    } else {
      out_.erase(index_path("timers", id_));
    }
  }

  static bool status_is_final(const std::string& s) {
    return s == "completed" || s == "failed" || s == "compensated";
  }

  // Takes the failure path: compensations if any, else failed.
  void fail_path(const std::string& reason) {
    rec_["error"] = reason;
    clear_wait();
    if (!rec_["done"].empty()) {
      set_status("compensating");
    } else {
      finish("failed");
    }
  }

  // Ends the instance with `status` (completed, failed, compensated).
  void finish(const std::string& status) {
    set_status(status);
    rec_.erase("wait_deadline_us");
    rec_.erase("deadline_us");
    refresh_timer();
    ended_ = true;
  }
  bool ended() const { return ended_; }

  // Counts a visit to `step`; false (and the failure path) if that exceeds its bound.
  bool visit(const workflow_step& step) {
    json& visits = rec_["visits"];
    const int n = visits.value(step.name, 0) + 1;
    visits[step.name] = n;
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
    json a = rec_.value("inputs", json::object());
    a["_instance"] = id_;
    if (rec_.contains("received") && !rec_["received"].empty()) a["_received"] = rec_["received"];
    return a;
  }

  void save() { out_.set(instance_path(id_), rec_); }

  const context& ctx() const { return ctx_; }
  result& out() { return out_; }
  std::int64_t now() const { return now_; }
  const workflow_options& opts() const { return o_; }

 private:
  const workflow_options& o_;
  const context& ctx_;
  result& out_;
  std::string id_;
  std::int64_t now_;
  json rec_;
  bool ended_ = false;
};

}  // namespace detail

namespace {

json new_record(std::string_view workflow, const std::string& definition_version,
                const std::string& start, json inputs, std::int64_t now, std::int64_t deadline,
                std::string_view parent, std::string_view parent_step) {
  json rec = {{"workflow", workflow},
              {"definition", {{"name", workflow}, {"version", definition_version}}},
              {"status", "running"},
              {"cursor", start},
              {"inputs", std::move(inputs)},
              {"received", json::object()},
              {"visits", json::object()},
              {"done", json::array()},
              {"history", json::array()},
              {"error", ""},
              {"started_at_us", now}};
  if (deadline > 0) rec["deadline_us"] = deadline;
  if (!parent.empty()) {
    rec["parent"] = parent;
    rec["parent_step"] = parent_step;
  }
  return rec;
}

}  // namespace

absl::Status workflows::register_process(process_spec spec, process_fn fn) {
  if (!fn) {
    return absl::InvalidArgumentError(
        absl::StrCat("workflow process '", spec.name, "' was registered with an empty function"));
  }
  POP_ASSIGN_OR_RETURN(process_contract contract, process_contract::from_spec(spec));
  const path instances = path::parse(options_.instances).value();
  const path index = path::parse(options_.index).value();
  process_spec wrapped = spec;
  wrapped.name = step_process(spec.name);
  for (std::vector<std::string>* declared : {&wrapped.inputs, &wrapped.outputs}) {
    for (const path* own : {&instances, &index}) {
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
    const std::shared_ptr<const defined> d = self->find_definition(t.rec().value("workflow", ""));
    if (!d) return out;
    const workflow_step* step = d->step(step_name);
    if (!step) return out;
    if (args.value("mode", "") == "compensate") {
      json& done = t.rec()["done"];
      if (t.status() != "compensating" || done.empty() || done.back() != step_name) return out;
      absl::StatusOr<result> r = entry->fn(ctx, t.args());
      if (!r.ok()) {
        t.history(step_name, absl::StrCat("compensation failed: ", r.status().ToString()));
        t.rec()["error"] = absl::StrCat(t.rec().value("error", ""), "; compensation '",
                                        step->compensate, "' failed: ", r.status().ToString());
        t.finish("failed");
      } else {
        out = *std::move(r);
        t.history(step_name, "compensated");
        done.erase(done.size() - 1);
        if (done.empty()) t.finish("compensated");
      }
      self->settle(t);
      t.save();
      return out;
    }
    if (t.status() != "running" || t.cursor() != step_name) return out;
    if (!t.visit(*step)) {
      self->settle(t);
      t.save();
      return out;
    }
    absl::StatusOr<result> r = entry->fn(ctx, t.args());
    if (!r.ok()) {
      // The process's own writes are dropped; the instance moves on in this same commit.
      t.history(step_name, absl::StrCat("error: ", r.status().ToString()));
      if (!step->on_error.empty()) {
        t.go(step->on_error);
      } else {
        t.fail_path(absl::StrCat("step '", step_name, "' failed: ", r.status().ToString()));
      }
      self->settle(t);
      t.save();
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
    t.save();
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
  return it == definitions_.end() ? nullptr : it->second;
}

void workflows::settle(detail::instance_txn& t) const {
  if (!t.ended() || !t.rec().contains("parent")) return;
  const std::string parent_id = t.rec()["parent"];
  detail::instance_txn parent(t.opts(), t.ctx(), t.out(), parent_id, t.now());
  if (!parent.load() || parent.status() != "waiting" || parent.rec().value("child", "") != t.id()) {
    return;
  }
  const std::shared_ptr<const defined> d = find_definition(parent.rec().value("workflow", ""));
  const workflow_step* step = d ? d->step(parent.rec().value("parent_step_of_child", "")) : nullptr;
  parent.rec().erase("child");
  parent.rec().erase("parent_step_of_child");
  const std::string status = t.status();
  if (!step) {
    parent.fail_path("its definition changed while a child ran");
  } else if (status == "completed") {
    parent.history(step->name, absl::StrCat("child ", t.id(), " completed"));
    parent.go(step->next);
  } else {
    parent.history(step->name, absl::StrCat("child ", t.id(), " ", status));
    if (!step->on_error.empty()) {
      parent.go(step->on_error);
    } else {
      parent.fail_path(
          absl::StrCat("child '", t.id(), "' ", status, ": ", t.rec().value("error", "")));
    }
  }
  settle(parent);
  parent.save();
}

void workflows::run_control_step(detail::instance_txn& t, const defined& d,
                                 const workflow_step& step) const {
  if (!t.visit(step)) return;
  const json inputs = t.rec().value("inputs", json::object());
  if (step.end) {
    t.history(step.name, "completed");
    t.finish("completed");
    return;
  }
  if (!step.fail.empty()) {
    t.history(step.name, "failed");
    t.fail_path(step.fail);
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
    std::vector<std::string> topics;
    for (const auto& [topic, next] : step.wait) topics.push_back(topic);
    t.rec()["wait_key"] = key_text;
    t.out().set(absl::StrCat(t.opts().index, ".waits.", key_text, ".", t.id()), topics);
    if (step.timeout_ms > 0) t.rec()["wait_deadline_us"] = t.now() + step.timeout_ms * 1000;
    t.history(step.name, "waiting");
    t.set_status("waiting");
    t.refresh_timer();
    return;
  }
  if (!step.call.empty()) {
    const std::shared_ptr<const defined> child_def = find_definition(step.call);
    const std::string child_id =
        absl::StrCat(t.id(), "-", step.name, "-", t.rec()["visits"].value(step.name, 1));
    if (!child_def) {
      t.fail_path(absl::StrCat("step '", step.name, "' calls unknown workflow '", step.call, "'"));
      return;
    }
    json child = new_record(step.call, child_def->version, child_def->def.start, inputs, t.now(), 0,
                            t.id(), step.name);
    t.out().set(t.instance_path(child_id), std::move(child));
    t.out().set(t.index_path("runnable", child_id), true);
    t.rec()["child"] = child_id;
    t.rec()["parent_step_of_child"] = step.name;
    t.history(step.name, absl::StrCat("called ", child_id));
    t.set_status("waiting");
    return;
  }
  static_cast<void>(d);
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
                              " must have exactly one of process, branch, wait, call, fail, "
                              "end; it has ",
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
    if (!s.branch.empty()) {
      for (const workflow_condition& c : s.branch) {
        if (!c.predicate.empty()) {
          if (!predicates_.contains(c.predicate)) {
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
      if (s.timeout_ms < 0) return bad(absl::StrCat(where, ": timeout_ms must not be negative"));
      if (!s.on_timeout.empty() && s.timeout_ms == 0) {
        return bad(absl::StrCat(where, ": on_timeout needs timeout_ms"));
      }
      POP_RETURN_IF_ERROR(target("on_timeout", s.on_timeout, false));
    }
    if (!s.call.empty()) {
      if (s.call == def.name) return bad(absl::StrCat(where, " calls its own workflow"));
      if (!definitions_.contains(s.call)) {
        return bad(absl::StrCat(where, " calls unknown workflow '", s.call, "' (define it first)"));
      }
      POP_RETURN_IF_ERROR(target("next", s.next, true));
      POP_RETURN_IF_ERROR(target("on_error", s.on_error, false));
    }
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

absl::Status workflows::define(workflow_definition def) {
  POP_RETURN_IF_ERROR(check(def));
  auto d = std::make_shared<defined>();
  d->def = std::move(def);
  std::uint64_t h = 1469598103934665603ULL;
  for (const unsigned char c : d->def.to_json().dump()) h = (h ^ c) * 1099511628211ULL;
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  d->version = hex;
  for (const workflow_step& s : d->def.steps) d->steps.emplace(s.name, &s);
  {
    std::lock_guard lock(mu_);
    if (definitions_.contains(d->def.name)) {
      return absl::AlreadyExistsError(
          absl::StrCat("a workflow named '", d->def.name, "' is already defined"));
    }
  }
  POP_RETURN_IF_ERROR(register_control(d));
  std::lock_guard lock(mu_);
  definitions_[d->def.name] = std::move(d);
  return absl::OkStatus();
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
  const std::vector<std::string> owned = {options_.instances, options_.index};
  // The generic processes, once: start, and (for inboxes) resume.
  const std::vector<std::string> registered = engine_.processes();
  if (!std::binary_search(registered.begin(), registered.end(), start_process)) {
    const workflow_options& o = options_;
    workflows* self = this;
    POP_RETURN_IF_ERROR(engine_.register_process(
        {.name = std::string(start_process), .inputs = owned, .outputs = owned},
        [&o, self](const context& ctx, const json& args) -> absl::StatusOr<result> {
          result out;
          detail::instance_txn t(o, ctx, out, args.at("id").get<std::string>(),
                                 args.at("now").get<std::int64_t>());
          if (t.load()) {
            return absl::AlreadyExistsError(
                absl::StrCat("workflow instance '", t.id(), "' already exists"));
          }
          const std::shared_ptr<const defined> def =
              self->find_definition(args.at("workflow").get<std::string>());
          if (!def) return absl::NotFoundError("no such workflow");
          const std::int64_t deadline = args.value("deadline_us", std::int64_t{0});
          t.rec() = new_record(def->def.name, def->version, def->def.start, args.at("inputs"),
                               t.now(), deadline, "", "");
          t.set_status("running");
          t.refresh_timer();
          t.save();
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
      {.name = control_process(d->def.name), .inputs = outermost(inputs), .outputs = owned},
      [self, def](const context& ctx, const json& args) -> absl::StatusOr<result> {
        result out;
        detail::instance_txn t(self->options_, ctx, out, args.at("id").get<std::string>(),
                               args.at("now").get<std::int64_t>());
        if (!t.load()) {
          return absl::NotFoundError(absl::StrCat("no workflow instance '", t.id(), "'"));
        }
        const std::string action = args.at("action").get<std::string>();
        const std::string status = t.status();
        const workflow_step* step = def->step(t.cursor());
        if (action == "step") {
          if (status != "running" || !step || !step->process.empty()) return out;
          self->run_control_step(t, *def, *step);
        } else if (action == "step_failed") {
          const std::string error = args.at("error").get<std::string>();
          if (args.value("mode", "") == "compensate") {
            if (status != "compensating") return out;
            t.rec()["error"] =
                absl::StrCat(t.rec().value("error", ""), "; a compensation failed: ", error);
            t.history(args.at("step").get<std::string>(), "compensation failed");
            t.finish("failed");
          } else {
            if (status != "running" || !step || step->name != args.at("step")) return out;
            t.history(step->name, absl::StrCat("error: ", error));
            if (!step->on_error.empty()) {
              t.go(step->on_error);
            } else {
              t.fail_path(absl::StrCat("step '", step->name, "' failed: ", error));
            }
          }
        } else if (action == "timeout") {
          const std::int64_t wait_due = t.rec().value("wait_deadline_us", std::int64_t{0});
          const std::int64_t life_due = t.rec().value("deadline_us", std::int64_t{0});
          if (detail::instance_txn::status_is_final(status)) return out;
          if (life_due > 0 && life_due <= t.now()) {
            t.history(t.cursor(), "instance timed out");
            t.fail_path("the instance ran past its timeout");
          } else if (status == "waiting" && wait_due > 0 && wait_due <= t.now() && step) {
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
          if (detail::instance_txn::status_is_final(status)) {
            return absl::FailedPreconditionError(
                absl::StrCat("workflow instance '", t.id(), "' has already ended (", status, ")"));
          }
          if (status == "compensating") return out;
          t.history(t.cursor(), "cancelled");
          // A child it is waiting for is cancelled with it (it compensates on its own).
          if (t.rec().contains("child")) {
            detail::instance_txn child(t.opts(), t.ctx(), t.out(), t.rec()["child"], t.now());
            if (child.load() && !detail::instance_txn::status_is_final(child.status()) &&
                child.status() != "compensating") {
              child.history(child.cursor(), "parent cancelled");
              child.fail_path(absl::StrCat("its parent '", t.id(), "' was cancelled"));
              child.save();
            }
          }
          t.fail_path(args.value("reason", "cancelled"));
        } else {
          return absl::InvalidArgumentError(absl::StrCat("unknown workflow action '", action, "'"));
        }
        self->settle(t);
        t.save();
        return out;
      });
}

absl::StatusOr<std::uint64_t> workflows::start(std::string_view workflow, std::string_view id,
                                               json inputs, std::int64_t timeout_ms) {
  if (!find_definition(workflow)) {
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
  const std::int64_t now = now_us();
  json args = {{"workflow", workflow}, {"id", id}, {"inputs", std::move(inputs)}, {"now", now}};
  if (timeout_ms > 0) args["deadline_us"] = now + timeout_ms * 1000;
  POP_ASSIGN_OR_RETURN(commit c, engine_.execute(start_process, args));
  return c.version;
}

namespace {

workflow_instance to_instance(std::string_view id, json rec) {
  workflow_instance w;
  w.id = std::string(id);
  w.workflow = rec.value("workflow", "");
  if (const auto d = rec.find("definition"); d != rec.end() && d->is_object()) {
    w.definition_version = d->value("version", "");
  }
  w.status = rec.value("status", "");
  w.cursor = rec.value("cursor", "");
  w.inputs = rec.value("inputs", json::object());
  w.received = rec.value("received", json::object());
  w.history = rec.value("history", json::array());
  w.error = rec.value("error", "");
  w.raw = std::move(rec);
  return w;
}

}  // namespace

absl::StatusOr<workflow_instance> workflows::inspect(std::string_view id) const {
  const snapshot snap = engine_.snapshot();
  absl::StatusOr<path> p = path::parse(absl::StrCat(options_.instances, ".", detail::to_absl(id)));
  if (!p.ok()) return annotate(p.status(), "workflow instance id");
  const value_view v = snap.view(*p);
  if (!v) {
    return absl::NotFoundError(absl::StrCat("no workflow instance '", detail::to_absl(id),
                                            "' in version ", snap.version()));
  }
  return to_instance(id, v.to_json());
}

std::vector<workflow_instance> workflows::list(std::string_view status) const {
  std::vector<workflow_instance> out;
  const snapshot snap = engine_.snapshot();
  snap.view(path::parse(options_.instances).value())
      .for_each_member([&](std::string_view id, const value_view& v) {
        if (!status.empty()) {
          const value_view s = v.member("status");
          if (!s || s.to_json() != status) return true;
        }
        out.push_back(to_instance(id, v.to_json()));
        return true;
      });
  return out;
}

absl::Status workflows::cancel(std::string_view id, std::string reason) {
  POP_ASSIGN_OR_RETURN(const workflow_instance w, inspect(id));
  return engine_
      .execute(control_process(w.workflow),
               {{"id", id}, {"action", "cancel"}, {"reason", std::move(reason)}, {"now", now_us()}})
      .status();
}

absl::StatusOr<bool> workflows::advance(std::string_view id) {
  POP_ASSIGN_OR_RETURN(const workflow_instance w, inspect(id));
  const std::shared_ptr<const defined> d = find_definition(w.workflow);
  if (!d) {
    return absl::FailedPreconditionError(absl::StrCat("workflow instance '", detail::to_absl(id),
                                                      "' runs undefined workflow '", w.workflow,
                                                      "'"));
  }
  const std::int64_t now = now_us();
  std::string process;
  json args = {{"id", id}, {"now", now}};
  std::string step_name;
  if (w.status == "running") {
    const workflow_step* step = d->step(w.cursor);
    if (!step) return false;
    step_name = step->name;
    if (!step->process.empty()) {
      process = step_process(step->process);
      args["step"] = step->name;
    } else {
      process = control_process(w.workflow);
      args["action"] = "step";
    }
  } else if (w.status == "compensating") {
    const json done = w.raw.value("done", json::array());
    if (done.empty()) return false;
    step_name = done.back().get<std::string>();
    const workflow_step* step = d->step(step_name);
    if (!step || step->compensate.empty()) return false;
    process = step_process(step->compensate);
    args["step"] = step_name;
    args["mode"] = "compensate";
  } else {
    return false;
  }
  absl::StatusOr<commit> c = engine_.execute(process, args);
  if (c.ok()) return c->changed;
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
  json failed = {{"id", id},
                 {"now", now},
                 {"action", "step_failed"},
                 {"step", step_name},
                 {"error", c.status().ToString()}};
  if (w.status == "compensating") failed["mode"] = "compensate";
  POP_ASSIGN_OR_RETURN(commit f, engine_.execute(control_process(w.workflow), failed));
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

absl::StatusOr<std::size_t> workflows::expire(std::int64_t now, std::int64_t& next_due_us) {
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
    absl::StatusOr<workflow_instance> w = inspect(id);
    if (!w.ok()) continue;
    POP_ASSIGN_OR_RETURN(commit c,
                         engine_.execute(control_process(w->workflow),
                                         {{"id", id}, {"action", "timeout"}, {"now", now}}));
    if (c.changed) ++moved;
  }
  return moved;
}

process_spec workflows::resume_spec() const {
  return {.name = std::string(resume_process),
          .inputs = {options_.instances, options_.index},
          .outputs = {options_.instances, options_.index}};
}

absl::StatusOr<result> workflows::resume(const context& ctx, const outbox_message& m) const {
  result out;
  if (!path::parse(absl::StrCat("k.", m.key)).ok()) return out;
  const std::string waits = absl::StrCat(options_.index, ".waits.", m.key);
  std::vector<std::string> ids;
  ctx.view(waits).for_each_member([&](std::string_view id, const value_view&) {
    ids.emplace_back(id);
    return true;
  });
  const std::int64_t now = m.created_at_us > 0 ? m.created_at_us : 0;
  for (const std::string& id : ids) {
    detail::instance_txn t(options_, ctx, out, id, now);
    if (!t.load() || t.status() != "waiting") continue;
    const std::shared_ptr<const defined> d = find_definition(t.rec().value("workflow", ""));
    const workflow_step* step = d ? d->step(t.cursor()) : nullptr;
    if (!step) continue;
    const auto next = step->wait.find(m.topic);
    if (next == step->wait.end()) continue;
    t.rec()["received"][m.topic] = m.payload;
    t.clear_wait();
    t.history(step->name, absl::StrCat("received ", m.topic, " (", m.id, ")"));
    t.go(next->second);
    t.save();
  }
  return out;
}

}  // namespace pop
