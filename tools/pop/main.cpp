// The `pop` command: inspects and repairs a pop journal from outside the program that owns it.
// Read-only commands open the journal read-only (they work while the program runs); repair
// commands are journaled commits through an engine, refused while another engine holds the file.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pop/contracts/status.hpp"
#include "pop/relay/dead_letters.hpp"
#include "pop/relay/metrics.hpp"
#include "pop/tools/pop/journal_view.hpp"
#include "pop/tools/pop/render.hpp"
#include "pop/tools/pop/repair.hpp"
#include "pop/workflow/workflow.hpp"

namespace pop::detail {
namespace {

constexpr const char* exit_codes = R"(Exit codes:
  0  done
  1  an unexpected error
  2  bad arguments
  3  not found: no such journal, version (not retained), path, message, dead letter, instance
     or workflow
  4  the journal is damaged, or the file is not SQLite at all (the message names what and
     where; nothing was changed)
  5  refused: not a pop journal, a newer journal format, or an action that does not apply
     (resuming an instance that is not stuck, requeueing an id the outbox holds)
  6  refused: a running engine holds the journal (repair commands only; stop the program)
  7  the journal cannot be read or written (I/O)
Every command prints a table (or text) by default and JSON with --json.)";

int exit_code(const absl::Status& s) {
  if (s.GetPayload(held_payload)) return 6;
  switch (s.code()) {
    case absl::StatusCode::kOk:
      return 0;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return 2;
    case absl::StatusCode::kNotFound:
      return 3;
    case absl::StatusCode::kDataLoss:
      return 4;
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kResourceExhausted:
      return 5;
    case absl::StatusCode::kUnavailable:
      return 7;
    default:
      return 1;
  }
}

std::int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string str(const absl::string_view s) {
  return std::string(s.data(), s.size());
}

// What every command takes.
struct common_args {
  std::string journal;
  bool as_json = false;
};

void add_common(CLI::App& cmd, common_args& a) {
  cmd.add_option("journal", a.journal, "The journal file (SQLite)")->required();
  cmd.add_flag("--json", a.as_json, "Print JSON for scripts instead of a table");
}

// An engine for a repair; a held journal is marked for exit code 6.
absl::StatusOr<std::unique_ptr<engine>> repair_engine(const journal_view& v) {
  return open_for_repair(v.file(), v.outbox_path());
}

// ---- state and diff ----------------------------------------------------------------------------

struct state_args : common_args {
  std::string path;
  std::optional<std::uint64_t> at;
};

absl::StatusOr<std::string> cmd_state(const state_args& a) {
  POP_ASSIGN_OR_RETURN(const journal_view v, journal_view::open(a.journal, a.at));
  POP_ASSIGN_OR_RETURN(const json* value, v.at(a.path));
  if (a.as_json) {
    return json{{"journal", a.journal},
                {"version", v.version()},
                {"newest_version", v.info().last_version},
                {"path", a.path},
                {"value", *value}}
               .dump(2) +
           "\n";
  }
  return fmt::format("# {} at version {} (newest {}, retained from {}){}\n{}\n", a.journal,
                     v.version(), v.info().last_version, v.info().snapshot_version,
                     a.path.empty() ? "" : ", path " + a.path, value->dump(2));
}

struct diff_args : common_args {
  std::uint64_t from = 0;
  std::uint64_t to = 0;
  std::string path;
};

absl::StatusOr<std::string> cmd_diff(const diff_args& a) {
  if (a.from > a.to) {
    return absl::InvalidArgumentError(
        absl::StrCat("pop diff: the older version comes first (", a.from, " > ", a.to, ")"));
  }
  POP_ASSIGN_OR_RETURN(const journal_view before, journal_view::open(a.journal, a.from));
  POP_ASSIGN_OR_RETURN(const journal_view after, journal_view::open(a.journal, a.to));
  // A path missing on one side is a subtree added or removed, not an error.
  const json none;
  absl::StatusOr<const json*> b = before.at(a.path);
  absl::StatusOr<const json*> c = after.at(a.path);
  if (!b.ok() && b.status().code() != absl::StatusCode::kNotFound) return b.status();
  if (!c.ok() && c.status().code() != absl::StatusCode::kNotFound) return c.status();
  if (!b.ok() && !c.ok()) {
    return absl::NotFoundError(absl::StrCat("journal '", a.journal, "': nothing at '", a.path,
                                            "' in version ", a.from, " or ", a.to));
  }
  std::vector<state_change> changes;
  if (b.ok() && c.ok()) {
    diff_states(**b, **c, a.path, changes);
  } else if (b.ok()) {
    changes.push_back({a.path, **b, std::nullopt});
  } else if (c.ok()) {
    changes.push_back({a.path, std::nullopt, **c});
  }
  if (a.as_json) {
    json list = json::array();
    for (const state_change& ch : changes) {
      json one = {{"path", ch.path},
                  {"op", !ch.before  ? "added"
                         : !ch.after ? "removed"
                                     : "changed"}};
      if (ch.before) one["before"] = *ch.before;
      if (ch.after) one["after"] = *ch.after;
      list.push_back(std::move(one));
    }
    return json{{"journal", a.journal}, {"from", a.from}, {"to", a.to}, {"changes", list}}.dump(2) +
           "\n";
  }
  std::string out = fmt::format("# {} change{} from version {} to {}{}\n", changes.size(),
                                changes.size() == 1 ? "" : "s", a.from, a.to,
                                a.path.empty() ? "" : " under " + a.path);
  for (const state_change& ch : changes) {
    const std::string where = ch.path.empty() ? "(the state)" : ch.path;
    if (!ch.before) {
      out += fmt::format("+ {} = {}\n", where, ch.after->dump());
    } else if (!ch.after) {
      out += fmt::format("- {} (was {})\n", where, ch.before->dump());
    } else {
      out += fmt::format("~ {}: {} -> {}\n", where, ch.before->dump(), ch.after->dump());
    }
  }
  return out;
}

// ---- outbox and dead letters -------------------------------------------------------------------

struct outbox_args : common_args {
  std::string topic;
  std::string key;
  std::size_t limit = 1000;
};

absl::StatusOr<std::string> cmd_outbox(const outbox_args& a) {
  POP_ASSIGN_OR_RETURN(const journal_view v, journal_view::open(a.journal));
  POP_ASSIGN_OR_RETURN(const std::vector<outbox_message> all, v.messages());
  const std::int64_t now = now_us();
  std::vector<const outbox_message*> shown;
  std::size_t matching = 0;
  for (const outbox_message& m : all) {
    if ((!a.topic.empty() && m.topic != a.topic) || (!a.key.empty() && m.key != a.key)) continue;
    if (++matching <= a.limit) shown.push_back(&m);
  }
  if (a.as_json) {
    json list = json::array();
    for (const outbox_message* m : shown) {
      json one = m->to_json();
      one["age_us"] = now - m->created_at_us;
      list.push_back(std::move(one));
    }
    return json{{"journal", a.journal},  {"version", v.version()}, {"outbox_path", v.outbox_path()},
                {"pending", all.size()}, {"matching", matching},   {"messages", list}}
               .dump(2) +
           "\n";
  }
  text_table t({"ID", "KEY", "TOPIC", "AGE", "ATTEMPTS", "LAST ERROR", "NEXT ATTEMPT"});
  for (const outbox_message* m : shown) {
    t.add({m->id, m->key, m->topic, format_duration(now - m->created_at_us),
           std::to_string(m->attempts), m->last_error.empty() ? "-" : m->last_error,
           m->next_attempt_at_us <= now ? "now"
                                        : "in " + format_duration(m->next_attempt_at_us - now)});
  }
  return fmt::format("{}# {} pending at '{}' in version {}; {} matching, {} shown\n", t.str(),
                     all.size(), v.outbox_path(), v.version(), matching, shown.size());
}

struct dead_args : common_args {
  std::string topic;
};

absl::StatusOr<std::string> cmd_dead(const dead_args& a) {
  POP_ASSIGN_OR_RETURN(const journal_view v, journal_view::open(a.journal));
  POP_ASSIGN_OR_RETURN(const std::vector<dead_letter> letters, v.dead_letters());
  const std::int64_t now = now_us();
  if (a.as_json) {
    json list = json::array();
    for (const dead_letter& d : letters) {
      if (!a.topic.empty() && d.message.topic != a.topic) continue;
      json one = d.to_json();
      one["id"] = d.message.id;
      list.push_back(std::move(one));
    }
    return json{{"journal", a.journal},
                {"version", v.version()},
                {"dead_letter_path", v.dead_letter_path()},
                {"dead_letters", list}}
               .dump(2) +
           "\n";
  }
  text_table t({"ID", "TOPIC", "KEY", "ATTEMPTS", "DEAD SINCE", "REASON"});
  for (const dead_letter& d : letters) {
    if (!a.topic.empty() && d.message.topic != a.topic) continue;
    t.add({d.message.id, d.malformed ? "(malformed)" : d.message.topic, d.message.key,
           std::to_string(d.message.attempts), format_duration(now - d.dead_at_us) + " ago",
           d.reason});
  }
  return fmt::format("{}# {} dead letter{} at '{}' in version {}\n", t.str(), t.size(),
                     t.size() == 1 ? "" : "s", v.dead_letter_path(), v.version());
}

struct requeue_args : common_args {
  std::vector<std::string> ids;
  bool all = false;
  std::string topic;
};

absl::StatusOr<std::string> cmd_requeue(const requeue_args& a) {
  const int ways = (a.ids.empty() ? 0 : 1) + (a.all ? 1 : 0) + (a.topic.empty() ? 0 : 1);
  if (ways != 1) {
    return absl::InvalidArgumentError(
        "pop requeue: name the dead letters: ids, --all or --topic TOPIC (exactly one)");
  }
  POP_ASSIGN_OR_RETURN(const journal_view v, journal_view::open(a.journal));
  POP_ASSIGN_OR_RETURN(const std::vector<dead_letter> letters, v.dead_letters());
  std::vector<std::string> ids = a.ids;
  if (a.all || !a.topic.empty()) {
    for (const dead_letter& d : letters) {
      if (!d.malformed && (a.all || d.message.topic == a.topic)) ids.push_back(d.message.id);
    }
  }
  // Checked here first, so a refused call does not even open (and mark) the journal.
  POP_ASSIGN_OR_RETURN(const std::vector<outbox_message> pending, v.messages());
  for (const std::string& id : a.ids) {
    const auto d = std::find_if(letters.begin(), letters.end(),
                                [&](const dead_letter& l) { return l.message.id == id; });
    if (d == letters.end()) {
      return absl::NotFoundError(absl::StrCat("no dead letter '", id, "' at '",
                                              v.dead_letter_path(), "' in version ", v.version()));
    }
    if (d->malformed) {
      return absl::FailedPreconditionError(
          absl::StrCat("dead letter '", id, "' was not a valid outbox message (", d->reason,
                       "); it cannot be requeued, only discarded"));
    }
    if (std::any_of(pending.begin(), pending.end(),
                    [&](const outbox_message& m) { return m.id == id; })) {
      return absl::AlreadyExistsError(absl::StrCat("cannot requeue dead letter '", id,
                                                   "': the outbox already holds that id in "
                                                   "version ",
                                                   v.version()));
    }
  }
  std::uint64_t version = v.version();
  if (!ids.empty()) {
    POP_ASSIGN_OR_RETURN(std::unique_ptr<engine> e, repair_engine(v));
    POP_ASSIGN_OR_RETURN(std::unique_ptr<dead_letters> d,
                         dead_letters::create(*e, v.dead_letter_path()));
    POP_ASSIGN_OR_RETURN(version, d->requeue_many(ids));
  }
  if (a.as_json) {
    return json{{"journal", a.journal}, {"requeued", ids}, {"version", version}}.dump(2) + "\n";
  }
  if (ids.empty()) return std::string("# no dead letters to requeue\n");
  return fmt::format("requeued {} dead letter{} to '{}' in version {}: {}\n", ids.size(),
                     ids.size() == 1 ? "" : "s", v.outbox_path(), version,
                     absl::StrJoin(ids, ", "));
}

struct discard_args : common_args {
  std::vector<std::string> ids;
};

absl::StatusOr<std::string> cmd_discard(const discard_args& a) {
  POP_ASSIGN_OR_RETURN(const journal_view v, journal_view::open(a.journal));
  POP_ASSIGN_OR_RETURN(const std::vector<dead_letter> letters, v.dead_letters());
  for (const std::string& id : a.ids) {
    if (std::none_of(letters.begin(), letters.end(),
                     [&](const dead_letter& l) { return l.message.id == id; })) {
      return absl::NotFoundError(absl::StrCat("no dead letter '", id, "' at '",
                                              v.dead_letter_path(), "' in version ", v.version(),
                                              "; nothing was discarded"));
    }
  }
  POP_ASSIGN_OR_RETURN(std::unique_ptr<engine> e, repair_engine(v));
  POP_ASSIGN_OR_RETURN(std::unique_ptr<dead_letters> d,
                       dead_letters::create(*e, v.dead_letter_path()));
  POP_ASSIGN_OR_RETURN(const std::uint64_t version, d->discard_many(a.ids));
  if (a.as_json) {
    return json{{"journal", a.journal}, {"discarded", a.ids}, {"version", version}}.dump(2) + "\n";
  }
  return fmt::format("discarded {} dead letter{} in version {}: {}\n", a.ids.size(),
                     a.ids.size() == 1 ? "" : "s", version, absl::StrJoin(a.ids, ", "));
}

// ---- workflows ---------------------------------------------------------------------------------

json instance_json(const workflow_instance& w) {
  return {{"id", w.id},
          {"workflow", w.workflow},
          {"definition_version", w.definition_version},
          {"status", w.status},
          {"step", w.cursor},
          {"error", w.error},
          {"stuck_reason", w.stuck_reason},
          {"parent", w.parent},
          {"child", w.child},
          {"started_at_us", w.started_at_us},
          {"updated_at_us", w.updated_at_us}};
}

struct workflows_args : common_args {
  std::string status;
  std::string definition;
};

absl::StatusOr<std::string> cmd_workflows(const workflows_args& a) {
  POP_ASSIGN_OR_RETURN(const journal_view v, journal_view::open(a.journal));
  std::vector<workflow_instance> shown;
  for (workflow_instance& w : v.instances()) {
    if ((!a.status.empty() && w.status != a.status) ||
        (!a.definition.empty() && w.workflow != a.definition &&
         w.definition_version != a.definition)) {
      continue;
    }
    shown.push_back(std::move(w));
  }
  if (a.as_json) {
    json list = json::array();
    for (const workflow_instance& w : shown) list.push_back(instance_json(w));
    return json{{"journal", a.journal}, {"version", v.version()}, {"instances", list}}.dump(2) +
           "\n";
  }
  text_table t({"ID", "WORKFLOW", "STATUS", "STEP", "STARTED", "UPDATED", "REASON"});
  for (const workflow_instance& w : shown) {
    t.add({w.id, w.workflow, w.status, w.cursor, format_time(w.started_at_us),
           format_time(w.updated_at_us), w.status == "stuck" ? w.stuck_reason : w.error});
  }
  return fmt::format("{}# {} instance{} in version {}\n", t.str(), shown.size(),
                     shown.size() == 1 ? "" : "s", v.version());
}

struct workflow_args : common_args {
  std::string id;
  bool cancel = false;
  std::string reason = "cancelled by an operator";
  bool resume = false;
  std::string restart_from;
  std::string version;  // for --restart-from
};

absl::StatusOr<std::string> cmd_workflow_action(const workflow_args& a, const journal_view& v,
                                                const workflow_instance& w) {
  // The statuses each action applies to, checked here first so a refused call does not even
  // open (and mark) the journal; the operator process checks them again in its commit.
  const auto refuse = [&](const char* action, const char* wanted) {
    return absl::FailedPreconditionError(absl::StrCat(
        "workflow instance '", w.id, "' is ", w.status, "; ", action, " needs it ", wanted));
  };
  const bool ended = workflows::ended(w.status);
  if (a.cancel && (ended || w.status == "compensating")) {
    return refuse("cancel", "running, waiting or stuck");
  }
  if (a.resume && w.status != "stuck") return refuse("resume", "stuck");
  if (!a.restart_from.empty() && w.status != "stuck" && !(ended && w.status != "completed")) {
    return refuse("restart", "stuck, failed, compensated or cancelled");
  }
  std::string restart_version;
  if (!a.restart_from.empty()) {
    // The program is not running, so its definitions are known only from the journal. The step
    // is looked for in the version asked for; else in the instance's own version, then in the
    // newest (which moves the instance to it).
    const auto has_step = [&](const workflow_definition& d) {
      return std::any_of(d.steps.begin(), d.steps.end(),
                         [&](const workflow_step& s) { return s.name == a.restart_from; });
    };
    std::vector<absl::StatusOr<workflow_definition>> candidates;
    if (!a.version.empty()) {
      candidates.push_back(v.definition(w.workflow, a.version));
      if (!candidates.back().ok()) return candidates.back().status();
    } else {
      if (!w.definition_version.empty()) {
        candidates.push_back(v.definition(w.workflow, w.definition_version));
      }
      candidates.push_back(v.definition(w.workflow));
    }
    const workflow_definition* first = nullptr;
    std::vector<std::string> checked;
    for (const absl::StatusOr<workflow_definition>& d : candidates) {
      if (!d.ok()) continue;
      if (first == nullptr) first = &*d;
      if (has_step(*d)) {
        restart_version = d->version;
        break;
      }
      if (std::find(checked.begin(), checked.end(), d->version) == checked.end()) {
        checked.push_back(d->version);
      }
    }
    if (restart_version.empty() && first != nullptr) {
      std::vector<std::string> names;
      for (const workflow_step& s : first->steps) names.push_back(s.name);
      return absl::NotFoundError(
          absl::StrCat("workflow '", w.workflow, "' has no step '", a.restart_from, "' in version",
                       checked.size() > 1 ? "s '" : " '", absl::StrJoin(checked, "', '"),
                       "'; the steps of '", first->version, "': ", absl::StrJoin(names, ", ")));
    }
  }
  POP_ASSIGN_OR_RETURN(std::unique_ptr<engine> e, repair_engine(v));
  POP_ASSIGN_OR_RETURN(std::unique_ptr<workflows> flows, workflows::create(*e, v.workflow_paths()));
  std::string done;
  if (a.cancel) {
    POP_RETURN_IF_ERROR(flows->cancel(a.id, a.reason));
    done = "cancelled";
  } else if (a.resume) {
    POP_RETURN_IF_ERROR(flows->resume(a.id).status());
    done = "resumed";
  } else {
    POP_RETURN_IF_ERROR(flows->restart_from(a.id, a.restart_from, restart_version).status());
    done = "restarted from step " + a.restart_from;
  }
  POP_ASSIGN_OR_RETURN(const workflow_instance after, flows->inspect(a.id));
  if (a.as_json) {
    json j = instance_json(after);
    j["action"] = done;
    j["version"] = e->version();
    return j.dump(2) + "\n";
  }
  return fmt::format("workflow instance '{}' {} in version {}: now {} at step '{}'\n", a.id, done,
                     e->version(), after.status, after.cursor);
}

absl::StatusOr<std::string> cmd_workflow(const workflow_args& a) {
  if ((a.cancel ? 1 : 0) + (a.resume ? 1 : 0) + (a.restart_from.empty() ? 0 : 1) > 1) {
    return absl::InvalidArgumentError(
        "pop workflow: at most one of --cancel, --resume, --restart-from");
  }
  if (!a.version.empty() && a.restart_from.empty()) {
    return absl::InvalidArgumentError("pop workflow: --version goes with --restart-from");
  }
  POP_ASSIGN_OR_RETURN(const journal_view v, journal_view::open(a.journal));
  const std::vector<workflow_instance> all = v.instances();
  const auto it = std::find_if(all.begin(), all.end(),
                               [&](const workflow_instance& w) { return w.id == a.id; });
  if (it == all.end()) {
    return absl::NotFoundError(absl::StrCat("journal '", a.journal, "' has no workflow instance '",
                                            a.id, "' in version ", v.version(), " (at '",
                                            v.workflow_paths().instances, "')"));
  }
  const workflow_instance& w = *it;
  if (a.cancel || a.resume || !a.restart_from.empty()) return cmd_workflow_action(a, v, w);
  std::vector<std::string> children;
  for (const workflow_instance& c : all) {
    if (c.parent == w.id) children.push_back(c.id + " (" + c.status + ")");
  }
  // What it waits for, from its definition as the program described it.
  std::string waits;
  if (w.status == "waiting") {
    if (w.sleep_until_us > 0) {
      waits = "its timer (a sleep step)";
    } else if (!w.child.empty()) {
      waits = "child " + w.child;
    } else if (absl::StatusOr<workflow_definition> def = v.definition(w.workflow); def.ok()) {
      for (const workflow_step& s : def->steps) {
        if (s.name != w.cursor) continue;
        std::vector<std::string> topics;
        for (const auto& [topic, next] : s.wait) topics.push_back(topic);
        waits = "a message on " + absl::StrJoin(topics, " or ");
      }
    } else {
      waits = "a message";
    }
    if (!w.wait_key.empty()) waits += " with key " + w.wait_key;
    if (w.wait_deadline_us > 0) waits += ", until " + format_time(w.wait_deadline_us);
    if (w.sleep_until_us > 0) waits += ", waking at " + format_time(w.sleep_until_us);
  }
  if (a.as_json) {
    json j = instance_json(w);
    j["inputs"] = w.inputs;
    j["received"] = w.received;
    j["waits_for"] = waits;
    j["children"] = children;
    j["history"] = json::array();
    for (const workflow_instance::event& e : w.events) {
      j["history"].push_back({{"step", e.step}, {"outcome", e.outcome}, {"at_us", e.at_us}});
    }
    j["record"] = w.raw;
    return j.dump(2) + "\n";
  }
  std::string out = fmt::format(
      "instance   {}\nworkflow   {} (definition version {})\nstatus     {}\nstep       {}\n"
      "started    {}\nupdated    {}\n",
      w.id, w.workflow, w.definition_version, w.status, w.cursor, format_time(w.started_at_us),
      format_time(w.updated_at_us));
  if (!w.stuck_reason.empty()) out += fmt::format("stuck      {}\n", w.stuck_reason);
  if (!w.error.empty()) out += fmt::format("error      {}\n", w.error);
  if (!waits.empty()) out += fmt::format("waits for  {}\n", waits);
  if (w.deadline_us > 0) out += fmt::format("deadline   {}\n", format_time(w.deadline_us));
  if (!w.parent.empty()) out += fmt::format("parent     {}\n", w.parent);
  if (!children.empty()) out += fmt::format("children   {}\n", absl::StrJoin(children, ", "));
  out += fmt::format("inputs     {}\n\nhistory\n", w.inputs.dump());
  text_table t({"AT", "STEP", "OUTCOME"}, 100);
  for (const workflow_instance::event& e : w.events)
    t.add({format_time(e.at_us), e.step, e.outcome});
  return out + t.str();
}

// ---- audit, verify, metrics, graph -------------------------------------------------------------

struct audit_args : common_args {
  std::string process;
  std::uint64_t since = 0;
  std::size_t limit = 1000;
};

absl::StatusOr<std::string> cmd_audit(const audit_args& a) {
  POP_ASSIGN_OR_RETURN(
      std::vector<journal_record_info> records,
      read_journal(a.journal, a.since, a.process.empty() ? a.limit : 1'000'000'000));
  std::vector<const journal_record_info*> shown;
  for (const journal_record_info& r : records) {
    // A workflow step runs its process under a wrapper name ending in ":<process>".
    const bool named =
        r.process == a.process || (r.process.size() > a.process.size() &&
                                   r.process.compare(r.process.size() - a.process.size() - 1,
                                                     std::string::npos, ":" + a.process) == 0);
    if (!a.process.empty() && !named) continue;
    if (shown.size() < a.limit) shown.push_back(&r);
  }
  if (a.as_json) {
    json list = json::array();
    for (const journal_record_info* r : shown) {
      list.push_back({{"version", r->version},
                      {"at_us", r->at_us},
                      {"process", r->process},
                      {"writes", r->writes},
                      {"message_ids", r->message_ids}});
    }
    return json{{"journal", a.journal}, {"records", list}}.dump(2) + "\n";
  }
  text_table t({"VERSION", "AT", "PROCESS", "MESSAGES", "WRITES"}, 90);
  for (const journal_record_info* r : shown) {
    t.add({std::to_string(r->version), format_time(r->at_us), r->process,
           std::to_string(r->message_ids.size()), absl::StrJoin(r->writes, " ")});
  }
  return fmt::format(
      "{}# {} record{} shown (records older than the newest snapshot are folded "
      "into it)\n",
      t.str(), shown.size(), shown.size() == 1 ? "" : "s");
}

absl::StatusOr<std::string> cmd_verify(const common_args& a) {
  POP_ASSIGN_OR_RETURN(const journal_info info, verify_journal(a.journal));
  if (a.as_json) {
    return json{{"journal", a.journal},
                {"ok", true},
                {"format_version", info.format_version},
                {"last_version", info.last_version},
                {"snapshot_version", info.snapshot_version},
                {"records", info.records},
                {"closed_cleanly", info.clean},
                {"held_by_an_engine", journal_held(a.journal)},
                {"outbox_path", info.outbox_path}}
               .dump(2) +
           "\n";
  }
  return fmt::format(
      "journal '{}' is sound\n  format           {}\n  newest version   {}\n  snapshot at      {}\n"
      "  records after it {} (every checksum verified, no gap)\n  closed cleanly   {}\n"
      "  held by engine   {}\n  outbox path      {}\n",
      a.journal, info.format_version, info.last_version, info.snapshot_version, info.records,
      info.clean ? "yes" : "no (an engine has it open, or the last one crashed)",
      journal_held(a.journal) ? "yes" : "no", info.outbox_path);
}

absl::StatusOr<std::string> cmd_metrics(const common_args& a) {
  POP_ASSIGN_OR_RETURN(const journal_view v, journal_view::open(a.journal));
  POP_ASSIGN_OR_RETURN(const std::vector<outbox_message> messages, v.messages());
  POP_ASSIGN_OR_RETURN(const std::vector<dead_letter> letters, v.dead_letters());
  const std::int64_t now = now_us();
  const double oldest =
      messages.empty() ? 0.0 : static_cast<double>(now - messages.front().created_at_us) / 1e6;
  std::size_t retrying = 0;
  for (const outbox_message& m : messages) retrying += m.attempts > 0 ? 1 : 0;
  std::map<std::pair<std::string, std::string>, std::size_t> per_status;
  std::size_t stuck = 0;
  for (const workflow_instance& w : v.instances()) {
    ++per_status[{w.workflow, w.status}];
    stuck += w.status == "stuck" ? 1 : 0;
  }
  if (a.as_json) {
    json instances = json::array();
    for (const auto& [k, n] : per_status) {
      instances.push_back({{"workflow", k.first}, {"status", k.second}, {"count", n}});
    }
    return json{{"journal", a.journal},
                {"version", v.version()},
                {"outbox_pending", messages.size()},
                {"outbox_retrying", retrying},
                {"outbox_oldest_pending_age_seconds", oldest},
                {"dead_letters", letters.size()},
                {"workflow_instances", instances},
                {"workflow_stuck", stuck}}
               .dump(2) +
           "\n";
  }
  std::string out;
  const auto gauge = [&](const char* name, const char* help, double value) {
    out += fmt::format("# HELP pop_{} {}\n# TYPE pop_{} gauge\npop_{} {}\n", name, help, name, name,
                       value);
  };
  gauge("journal_version", "The newest version in the journal.", static_cast<double>(v.version()));
  gauge("outbox_pending", "Messages in the outbox.", static_cast<double>(messages.size()));
  gauge("outbox_retrying", "Pending messages with at least one failed attempt.",
        static_cast<double>(retrying));
  gauge("outbox_oldest_pending_age_seconds", "Age of the oldest pending message.", oldest);
  gauge("dead_letters", "Messages at the dead-letter path.", static_cast<double>(letters.size()));
  gauge("workflow_stuck", "Workflow instances parked for an operator.", static_cast<double>(stuck));
  out +=
      "# HELP pop_workflow_instances Workflow instances per workflow and status.\n"
      "# TYPE pop_workflow_instances gauge\n";
  for (const auto& [k, n] : per_status) {
    out += fmt::format("pop_workflow_instances{{workflow=\"{}\",status=\"{}\"}} {}\n",
                       prometheus_label(k.first), prometheus_label(k.second), n);
  }
  return out;
}

struct graph_args : common_args {
  std::string workflow;
  std::string output;
  bool all = false;
};

// Renders `dot_text` into `file` with Graphviz's dot, in the format its extension names.
absl::Status render_with_dot(const std::string& dot_text, const std::string& file) {
  const std::size_t dot_at = file.rfind('.');
  const std::string ext = dot_at == std::string::npos ? "" : file.substr(dot_at + 1);
  if (ext != "svg" && ext != "png" && ext != "pdf") {
    return absl::InvalidArgumentError(absl::StrCat("pop graph: cannot tell the format of '", file,
                                                   "': name it .dot, .svg, .png or .pdf"));
  }
  std::string quoted = "'";
  for (const char c : file) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  quoted += "'";
  if (std::system("command -v dot >/dev/null 2>&1") != 0) {
    return absl::FailedPreconditionError(
        "pop graph: Graphviz's dot is not installed (apt-get install graphviz); write DOT with "
        "--output FILE.dot or without --output");
  }
  // dot's own messages go to standard error, never into this command's output.
  const std::string command = absl::StrCat("dot -T", ext, " -o ", quoted, " 1>&2");
  std::signal(SIGPIPE, SIG_IGN);  // a dot that exits early must not kill this command
  FILE* pipe = ::popen(command.c_str(), "w");
  if (!pipe) return absl::UnavailableError("pop graph: cannot run Graphviz's dot");
  std::fwrite(dot_text.data(), 1, dot_text.size(), pipe);
  const int rc = ::pclose(pipe);
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("pop graph: Graphviz's dot failed (exit ",
                                               WEXITSTATUS(rc), ") writing '", file, "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> cmd_graph(const graph_args& a) {
  POP_ASSIGN_OR_RETURN(const journal_view v, journal_view::open(a.journal));
  std::string dot_text;
  if (!a.workflow.empty()) {
    POP_ASSIGN_OR_RETURN(const workflow_definition def, v.definition(a.workflow));
    dot_text = workflow_graph(def);
  } else {
    std::map<std::string, json> processes;
    if (const auto it = v.descriptions().find("process"); it != v.descriptions().end()) {
      for (const auto& [name, d] : it->second) {
        // The workflow engine's own processes (workflow.*) are plumbing; --all shows them.
        if (a.all || name.rfind("workflow.", 0) != 0) processes[name] = d;
      }
    }
    if (processes.empty()) {
      return absl::NotFoundError(absl::StrCat(
          "journal '", a.journal,
          "' records no processes (a program records each process it registers on a journaled "
          "engine)"));
    }
    dot_text = process_graph(processes);
  }
  if (a.output.empty()) {
    if (a.as_json) return json{{"journal", a.journal}, {"dot", dot_text}}.dump(2) + "\n";
    return dot_text;
  }
  if (a.output.size() > 4 && a.output.substr(a.output.size() - 4) == ".dot") {
    std::ofstream f(a.output);
    f << dot_text;
    if (!f.flush()) return absl::UnavailableError(absl::StrCat("cannot write '", a.output, "'"));
  } else {
    POP_RETURN_IF_ERROR(render_with_dot(dot_text, a.output));
  }
  if (a.as_json) return json{{"journal", a.journal}, {"written", a.output}}.dump(2) + "\n";
  return fmt::format("wrote {}\n", a.output);
}

}  // namespace
}  // namespace pop::detail

int main(int argc, char** argv) {
  using namespace pop::detail;
  CLI::App app{
      "pop: inspect and repair a pop journal from outside the program that owns it.\n"
      "Read-only commands never change the file and work while the program runs;\n"
      "repair commands (requeue, discard, workflow --cancel/--resume/--restart-from)\n"
      "are journaled commits, refused while a running engine holds the journal.",
      "pop"};
  app.footer(exit_codes);
  app.require_subcommand(1);
  std::function<absl::StatusOr<std::string>()> run;

  state_args state;
  CLI::App* c = app.add_subcommand("state", "The state, or the subtree at PATH, at a version");
  add_common(*c, state);
  c->add_option("path", state.path, "A dotted path (default: the whole state)");
  c->add_option("--at", state.at, "A retained version (default: the newest)");
  c->callback([&] { run = [&] { return cmd_state(state); }; });

  diff_args diff;
  c = app.add_subcommand("diff", "What changed between two retained versions");
  add_common(*c, diff);
  c->add_option("from", diff.from, "The older version")->required();
  c->add_option("to", diff.to, "The newer version")->required();
  c->add_option("path", diff.path, "Only under this dotted path");
  c->callback([&] { run = [&] { return cmd_diff(diff); }; });

  outbox_args outbox;
  c = app.add_subcommand("outbox", "Pending messages in commit order");
  add_common(*c, outbox);
  c->add_option("--topic", outbox.topic, "Only this topic");
  c->add_option("--key", outbox.key, "Only this key");
  c->add_option("--limit", outbox.limit, "Show at most this many (default 1000)");
  c->callback([&] { run = [&] { return cmd_outbox(outbox); }; });

  dead_args dead;
  c = app.add_subcommand("dead", "Dead letters: messages the relay gave up on");
  add_common(*c, dead);
  c->add_option("--topic", dead.topic, "Only this topic");
  c->callback([&] { run = [&] { return cmd_dead(dead); }; });

  requeue_args requeue;
  c = app.add_subcommand("requeue", "Move dead letters back to the outbox (one commit)");
  add_common(*c, requeue);
  c->add_option("ids", requeue.ids, "Dead letter ids");
  c->add_flag("--all", requeue.all, "Every dead letter (malformed ones excepted)");
  c->add_option("--topic", requeue.topic, "Every dead letter of this topic");
  c->callback([&] { run = [&] { return cmd_requeue(requeue); }; });

  discard_args discard;
  c = app.add_subcommand("discard", "Delete dead letters for good (one commit)");
  add_common(*c, discard);
  c->add_option("ids", discard.ids, "Dead letter ids")->required();
  c->callback([&] { run = [&] { return cmd_discard(discard); }; });

  workflows_args flows;
  c = app.add_subcommand("workflows", "Workflow instances");
  add_common(*c, flows);
  c->add_option("--status", flows.status,
                "Only this status (running, waiting, compensating, stuck, completed, failed, "
                "compensated, cancelled)");
  c->add_option("--definition", flows.definition,
                "Only this workflow (name or definition version)");
  c->callback([&] { run = [&] { return cmd_workflows(flows); }; });

  workflow_args flow;
  c = app.add_subcommand("workflow",
                         "One workflow instance: its history, children and what it waits for; "
                         "or an operator action on it");
  add_common(*c, flow);
  c->add_option("id", flow.id, "The instance id")->required();
  c->add_flag("--cancel", flow.cancel, "Cancel it: it takes its failure path (compensations)");
  c->add_option("--reason", flow.reason, "Why it is cancelled");
  c->add_flag("--resume", flow.resume, "Put a stuck instance back in the status it had");
  c->add_option("--restart-from", flow.restart_from,
                "Move a stuck, failed, compensated or cancelled instance to this step, running");
  c->add_option("--version", flow.version,
                "With --restart-from: the workflow version to restart on (default: the "
                "instance's own if it has the step, else the newest)");
  c->callback([&] { run = [&] { return cmd_workflow(flow); }; });

  audit_args audit;
  c = app.add_subcommand("audit", "The commit history: version, time, process, writes");
  add_common(*c, audit);
  c->add_option("--process", audit.process,
                "Only commits of this process (also when it ran as a workflow step)");
  c->add_option("--since", audit.since, "From this version on");
  c->add_option("--limit", audit.limit, "Show at most this many (default 1000)");
  c->callback([&] { run = [&] { return cmd_audit(audit); }; });

  common_args verify;
  c = app.add_subcommand("verify", "Check the journal's integrity and report what it holds");
  add_common(*c, verify);
  c->callback([&] { run = [&] { return cmd_verify(verify); }; });

  graph_args graph;
  c = app.add_subcommand("graph",
                         "Processes with the paths they read and write and the topics they emit, "
                         "or a workflow's steps, as Graphviz DOT (SVG/PNG/PDF with --output)");
  add_common(*c, graph);
  c->add_option("--workflow", graph.workflow, "Draw this workflow's definition instead");
  c->add_option("-o,--output", graph.output, "Write to FILE.dot, FILE.svg, FILE.png or FILE.pdf");
  c->add_flag("--all", graph.all, "Include the workflow engine's own processes");
  c->callback([&] { run = [&] { return cmd_graph(graph); }; });

  common_args metrics;
  c = app.add_subcommand("metrics",
                         "Outbox depth, oldest pending age, dead letters, workflow "
                         "instances per status, in the Prometheus text format");
  add_common(*c, metrics);
  c->callback([&] { run = [&] { return cmd_metrics(metrics); }; });

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  absl::StatusOr<std::string> out;
  try {
    out = run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pop: unexpected error: %s\n", e.what());
    return 1;
  }
  if (!out.ok()) {
    std::fprintf(stderr, "pop: %s\n", str(out.status().message()).c_str());
    return exit_code(out.status());
  }
  std::fwrite(out->data(), 1, out->size(), stdout);
  return std::fflush(stdout) == 0 ? 0 : 7;
}
