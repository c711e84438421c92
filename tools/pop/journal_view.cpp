#include "pop/tools/pop/journal_view.hpp"

#include "absl/strings/str_cat.h"
#include "pop/contracts/path.hpp"
#include "pop/contracts/status.hpp"

namespace pop::detail {

absl::StatusOr<journal_view> journal_view::open(const std::string& path,
                                                std::optional<std::uint64_t> at) {
  journal_view v;
  v.file_ = path;
  POP_ASSIGN_OR_RETURN(v.state_, read_journal_state(path, at));
  POP_ASSIGN_OR_RETURN(v.descriptions_, read_journal_descriptions(path));
  return v;
}

absl::StatusOr<const json*> journal_view::at(std::string_view dotted) const {
  const json* cur = &state_.state;
  if (dotted.empty()) return cur;
  POP_ASSIGN_OR_RETURN(const path p, path::parse(dotted));
  for (const std::string_view seg : p.segments()) {
    const auto it = cur->is_object() ? cur->find(seg) : cur->end();
    if (!cur->is_object() || it == cur->end()) {
      return absl::NotFoundError(absl::StrCat("journal '", file_, "': nothing at '", p.str(),
                                              "' in version ", state_.version));
    }
    cur = &*it;
  }
  return cur;
}

namespace {

// The newest description of `kind` (by its "at_us"), or null if there is none.
const std::pair<const std::string, json>* newest(
    const std::map<std::string, std::map<std::string, json>, std::less<>>& descriptions,
    std::string_view kind) {
  const auto it = descriptions.find(kind);
  if (it == descriptions.end()) return nullptr;
  const std::pair<const std::string, json>* best = nullptr;
  const auto at = [](const json& d) {
    return d.is_object() && d.contains("at_us") && d["at_us"].is_number_integer()
               ? d["at_us"].get<std::int64_t>()
               : std::int64_t{0};
  };
  for (const auto& entry : it->second) {
    if (!best || at(entry.second) >= at(best->second)) best = &entry;
  }
  return best;
}

}  // namespace

std::string journal_view::dead_letter_path() const {
  const auto* d = newest(descriptions_, "dead_letters");
  return d ? d->first : "system.dead_letters";
}

workflow_options journal_view::workflow_paths() const {
  workflow_options o;
  const auto* d = newest(descriptions_, "workflows");
  if (!d || !d->second.is_object()) return o;
  o.instances = d->second.value("instances", o.instances);
  o.index = d->second.value("index", o.index);
  o.history = d->second.value("history", o.history);
  return o;
}

namespace {

// The members of the object at `dotted`, or none if there is nothing there.
const json* object_at(const journal_view& v, const std::string& dotted) {
  absl::StatusOr<const json*> found = v.at(dotted);
  if (!found.ok() || !(*found)->is_object()) return nullptr;
  return *found;
}

}  // namespace

absl::StatusOr<std::vector<outbox_message>> journal_view::messages() const {
  std::vector<outbox_message> out;
  const json* queue = object_at(*this, outbox_path());
  if (!queue) return out;
  for (const auto& [id, stored] : queue->items()) {
    absl::StatusOr<outbox_message> m = outbox_message::from_json(stored);
    if (!m.ok()) {
      return absl::DataLossError(absl::StrCat("journal '", file_, "': outbox entry '",
                                              outbox_path(), ".", id, "' in version ",
                                              state_.version, ": ", m.status().message()));
    }
    out.push_back(*std::move(m));
  }
  return out;
}

absl::StatusOr<std::vector<dead_letter>> journal_view::dead_letters() const {
  std::vector<dead_letter> out;
  const json* letters = object_at(*this, dead_letter_path());
  if (!letters) return out;
  for (const auto& [id, stored] : letters->items()) {
    absl::StatusOr<dead_letter> d = dead_letter::from_json(id, stored);
    if (!d.ok()) {
      return absl::DataLossError(absl::StrCat("journal '", file_, "': dead letter '",
                                              dead_letter_path(), ".", id, "' in version ",
                                              state_.version, ": ", d.status().message()));
    }
    out.push_back(*std::move(d));
  }
  return out;
}

std::vector<workflow_instance> journal_view::instances() const {
  std::vector<workflow_instance> out;
  const workflow_options paths = workflow_paths();
  const json* records = object_at(*this, paths.instances);
  if (!records) return out;
  const json* histories = object_at(*this, paths.history);
  for (const auto& [id, record] : records->items()) {
    const auto h = histories ? histories->find(id) : json::const_iterator();
    out.push_back(workflow_instance::from_record(id, record,
                                                 histories && h != histories->end() ? *h : json()));
  }
  return out;
}

absl::StatusOr<workflow_definition> journal_view::definition(std::string_view name,
                                                             std::string_view version) const {
  const std::string kind_name = version.empty() ? "workflow" : "workflow_version";
  const std::string key =
      version.empty() ? std::string(name) : absl::StrCat(to_absl(name), "@", to_absl(version));
  const std::string what = version.empty() ? absl::StrCat("workflow named '", to_absl(name), "'")
                                           : absl::StrCat("version '", to_absl(version),
                                                          "' of workflow '", to_absl(name), "'");
  const auto kind = descriptions_.find(kind_name);
  const auto it =
      kind == descriptions_.end() ? decltype(kind->second.end()){} : kind->second.find(key);
  if (kind == descriptions_.end() || it == kind->second.end()) {
    return absl::NotFoundError(absl::StrCat("journal '", file_, "' records no ", what,
                                            " (a program records its definitions when it "
                                            "defines them with a journaled engine)"));
  }
  const json& d = it->second;
  if (!d.is_object() || !d.contains("definition")) {
    return absl::DataLossError(
        absl::StrCat("journal '", file_, "': the description of ", what, " has no definition"));
  }
  absl::StatusOr<workflow_definition> def = workflow_definition::from_json(d["definition"]);
  if (!def.ok()) return annotate(def.status(), absl::StrCat("journal '", file_, "', ", what));
  // The version the program recorded (a hash when the definition names none).
  if (const auto v = d.find("version"); v != d.end() && v->is_string()) def->version = *v;
  return def;
}

void diff_states(const json& a, const json& b, const std::string& prefix,
                 std::vector<state_change>& out) {
  const auto child = [&](const std::string& key) {
    return prefix.empty() ? key : absl::StrCat(prefix, ".", key);
  };
  if (a.is_object() && b.is_object()) {
    auto ia = a.begin();
    auto ib = b.begin();
    // nlohmann's objects iterate in key order: a merge walk.
    while (ia != a.end() || ib != b.end()) {
      if (ib == b.end() || (ia != a.end() && ia.key() < ib.key())) {
        out.push_back({child(ia.key()), *ia, std::nullopt});
        ++ia;
      } else if (ia == a.end() || ib.key() < ia.key()) {
        out.push_back({child(ib.key()), std::nullopt, *ib});
        ++ib;
      } else {
        diff_states(*ia, *ib, child(ia.key()), out);
        ++ia;
        ++ib;
      }
    }
    return;
  }
  if (a != b) out.push_back({prefix, a, b});
}

}  // namespace pop::detail
