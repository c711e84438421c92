#include "pop/engine/detail/process_runner.hpp"

#include <cstdio>

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pop/contracts/process_error.hpp"
#include "pop/contracts/status.hpp"
#include "pop/engine/detail/packed.hpp"

namespace pop::detail {

std::vector<std::string> path_texts(const path_set& paths) {
  std::vector<std::string> out;
  out.reserve(paths.size());
  for (const path& p : paths) out.push_back(p.str());
  return out;
}

absl::StatusOr<path> parse_outbox_path(std::string_view text, std::string_view what) {
  absl::StatusOr<path> outbox = path::parse(text);
  if (!outbox.ok()) return annotate(outbox.status(), what);
  if (absl::StatusOr<path> p =
          outbox->child(make_message_id(UINT64_MAX, max_messages_per_commit - 1));
      !p.ok()) {
    return annotate(p.status(), absl::StrCat(to_absl(what), " leaves no room for message ids"));
  }
  return outbox;
}

std::string process_at(const process_contract& c, std::uint64_t version) {
  return absl::StrCat("process '", c.name(), "' (version ", version, ")");
}

snapshot process_runner::make_snapshot(std::shared_ptr<const version_state> state) {
  return snapshot(std::move(state));
}

// Runs `proc` once on `snap`; `reads` receives what it read even when it fails.
absl::StatusOr<prepared> process_runner::run(const registered& proc, const snapshot& snap,
                                             const json& args) {
  const process_contract& c = proc.contract;
  std::optional<std::chrono::steady_clock::time_point> deadline;
  if (c.timeout().count() > 0) deadline = std::chrono::steady_clock::now() + c.timeout();
  context ctx(c, snap, deadline);

  // (Default-constructed: kUnknown with no message, and no allocation; every path assigns it.)
  absl::StatusOr<result> r;
  try {
    r = proc.fn(ctx, args);
  } catch (const process_error& e) {
    r = e.status();
  } catch (const std::exception& e) {
    r = absl::UnknownError(absl::StrCat("threw an exception: ", e.what()));
  } catch (...) {
    r = absl::UnknownError("threw an exception that is not a std::exception");
  }
  // A breach found by the context stands even if the process caught the exception.
  if (!ctx.failure_.ok()) return ctx.failure_;
  if (deadline && std::chrono::steady_clock::now() > *deadline) {
    return absl::DeadlineExceededError(absl::StrCat(
        process_at(c, snap.version()), " ran past its timeout of ", c.timeout().count(), " us"));
  }
  if (!r.ok()) return annotate(r.status(), process_at(c, snap.version()));

  prepared out;
  out.reads = std::move(ctx.reads_);
  POP_RETURN_IF_ERROR(prepare_writes(c, snap, *r, out));
  if (out.messages.empty()) {
    out.messages = std::move(r->messages());
  } else {
    for (message_draft& m : r->messages()) out.messages.push_back(std::move(m));
  }
  for (const message_draft& m : out.messages) {
    POP_RETURN_IF_ERROR(check_topic(c, snap.version(), m.topic));
    // The error text is built only for a message that fails.
    if (!check_message(m, {}).ok()) return check_message(m, process_at(c, snap.version()));
  }
  if (out.messages.size() > max_messages_per_commit) {
    return absl::InvalidArgumentError(absl::StrCat(process_at(c, snap.version()), " emitted ",
                                                   out.messages.size(), " messages; the limit is ",
                                                   max_messages_per_commit, " per commit"));
  }
  return out;
}

const path_set& prepared::access(const path& outbox) const {
  if (!access_) {
    access_.emplace();
    for (const path& p : reads) {
      if (!(wrote_queue && p == outbox)) access_->insert(p);
    }
    for (const prepared_write& w : writes) access_->insert(w.target);
  }
  return *access_;
}

absl::Status process_runner::check_topic(const process_contract& c, std::uint64_t version,
                                         const std::string& topic) {
  if (c.may_emit(topic)) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(
      "contract violation: ", process_at(c, version), " emitted topic '", topic,
      "', which is not among its declared topics [", absl::StrJoin(c.emits(), ", "), "]"));
}

absl::Status process_runner::prepare_writes(const process_contract& c, const snapshot& snap,
                                            result& r, prepared& out) {
  const path& outbox = snap.outbox_path();
  // Error texts are built only for a write that fails.
  const auto who = [&] { return process_at(c, snap.version()); };
  out.writes.reserve(r.writes().size());
  for (write& w : r.writes()) {
    // (A path the process read was checked then: the usual read-modify-write is not checked
    // again.)
    const path* read = out.reads.find(w.path);
    std::optional<path> same = read ? path::same_as(std::move(w.path), *read) : std::nullopt;
    absl::StatusOr<path> p =
        same ? *std::move(same) : path::parse(std::move(w.path));  // (kept as it was on error)
    if (!p.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(who(), " wrote a bad path: ", p.status().message()));
    }
    if (!c.may_write(*p)) {
      return absl::PermissionDeniedError(absl::StrCat("contract violation: ", who(), " wrote '",
                                                      p->str(), "', outside its declared outputs ",
                                                      c.outputs().to_string()));
    }
    // A small value is checked and packed in one walk; any other is checked here. A value that
    // stands for packed bytes (packed::as_json) is checked as bytes and stored as they are.
    node_ptr small;
    if (const json::binary_t* bytes = w.value ? packed::bytes_of(*w.value) : nullptr) {
      if (p->overlaps(outbox)) {
        return absl::InvalidArgumentError(
            absl::StrCat(who(), " wrote '", p->str(), "' in or above the outbox '", outbox.str(),
                         "' as packed bytes, which only values outside the outbox may be"));
      }
      small = make_packed_node(
          std::string_view(reinterpret_cast<const char*>(bytes->data()), bytes->size()));
      if (!small) {
        // Say what is wrong as for any value, when the bytes can be read.
        const std::string_view b(reinterpret_cast<const char*>(bytes->data()), bytes->size());
        if (packed::well_formed(b)) {
          absl::Status s = check_storable(packed::decode(b.data()),
                                          absl::StrCat(who(), " wrote '", p->str(), "'"));
          if (!s.ok()) return s;
        }
        return absl::InvalidArgumentError(
            absl::StrCat(who(), " wrote '", p->str(),
                         "' as packed bytes that are not a valid packed value (malformed)"));
      }
    } else if (w.value && *p != outbox) {
      small = make_checked_small_node(*w.value);
    }
    if (w.value && !small && !check_storable(*w.value, {}).ok()) {
      return check_storable(*w.value, absl::StrCat(who(), " wrote '", p->str(), "'"));
    }
    if (*p == outbox) {
      POP_ASSIGN_OR_RETURN(detail::outbox_changes changes,
                           // A process saw every message of its snapshot (a dry run's fixture may
                           // hold ids newer than its version): all of them are in scope.
                           detail::diff_outbox(w.value, snap.view(outbox),
                                               std::numeric_limits<std::uint64_t>::max(), who()));
      POP_RETURN_IF_ERROR(add_changes(outbox, std::move(changes), out));
      continue;
    }
    if (!check_outbox_write(*p, outbox, w.value, {}).ok()) {
      return check_outbox_write(*p, outbox, w.value, who());
    }
    if (!small && w.value) small = make_node(*std::move(w.value));
    out.writes.push_back({*std::move(p), std::move(small)});
  }
  return absl::OkStatus();
}

// Adds the changes a whole-outbox write means to `out`.
absl::Status process_runner::add_changes(const path& outbox, outbox_changes changes,
                                         prepared& out) {
  for (auto& [id, stored] : changes.updates) {
    POP_ASSIGN_OR_RETURN(path p, outbox.child(id));
    out.writes.push_back({std::move(p), make_node(std::move(stored))});
  }
  for (const std::string& id : changes.removals) {
    POP_ASSIGN_OR_RETURN(path p, outbox.child(id));
    out.writes.push_back({std::move(p), nullptr});
  }
  for (message_draft& m : changes.appends) out.messages.push_back(std::move(m));
  out.wrote_queue = true;
  return absl::OkStatus();
}

// OK unless writing `value` at `p` would replace the outbox or break the shape of a message.
absl::Status process_runner::check_outbox_write(const path& p, const path& outbox,
                                                const std::optional<json>& value,
                                                const std::string& who) {
  POP_RETURN_IF_ERROR(check_not_outbox_parent(p, outbox, who));
  if (outbox.contains(p)) return check_message_write(p, outbox, value, who);
  return absl::OkStatus();
}

// OK if a message can be stored and published: its key, headers and payload are storable JSON.
absl::Status process_runner::check_message(const message_draft& m, const std::string& who) {
  // The usual case, a valid message, builds no error text.
  bool valid = check_utf8(m.topic, {}).ok() && check_utf8(m.key, {}).ok();
  for (const auto& [name, value] : m.headers) {
    valid = valid && check_utf8(name, {}).ok() && check_utf8(value, {}).ok();
  }
  if (valid && check_storable(m.payload, {}).ok()) return absl::OkStatus();
  const std::string what = absl::StrCat(who, ", message of topic '", m.topic, "'");
  POP_RETURN_IF_ERROR(check_utf8(m.topic, absl::StrCat(who, ": a message topic")));
  POP_RETURN_IF_ERROR(check_utf8(m.key, absl::StrCat(what, ": its key")));
  for (const auto& [name, value] : m.headers) {
    POP_RETURN_IF_ERROR(check_utf8(name, absl::StrCat(what, ": a header name")));
    POP_RETURN_IF_ERROR(check_utf8(value, absl::StrCat(what, ": header '", name, "'")));
  }
  return check_storable(m.payload, absl::StrCat(what, ": its payload"));
}

absl::Status process_runner::check_not_outbox_parent(const path& p, const path& outbox,
                                                     const std::string& who) {
  if (p.contains(outbox) && !(p == outbox)) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, " wrote '", p.str(), "', which would replace the outbox at '",
                     outbox.str(), "'; write the paths below '", p.str(), "' instead"));
  }
  return absl::OkStatus();
}

namespace {

// OK unless `target`, a new entry in `outbox` (not in `root`), has an id of version `version`
// (the commit's own) or later: those ids are the engine's to give to emitted messages, which
// would replace the entry (and a reader that has seen the queue up to an id relies on later ones
// being emitted). An entry already there may be rewritten (a retry record, say, of one a build
// before this check let in).
absl::Status check_entry_version(const node_ptr& root, const path& target, const path& outbox,
                                 std::uint64_t version, const std::string& who) {
  if (target.str().size() <= outbox.str().size()) return absl::OkStatus();
  const std::string_view id = std::string_view(target.str()).substr(outbox.str().size() + 1);
  const auto parsed = parse_message_id(id);
  if (!parsed.ok() || parsed->first < version) return absl::OkStatus();
  if (lookup(*root, target.str()).exists()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      who, " wrote '", target.str(), "': message id '", to_absl(id), "' is of version ",
      parsed->first, ", and ids of version ", version,
      " (this commit's) and later are given to emitted messages; an entry written by hand needs "
      "an id of an earlier version (emit new messages instead)"));
}

// The body of apply and apply_in_place: `prep` applied on `root` (of version `base_version`),
// giving its messages ids of version base_version + 1; `owned`: changed in place where nothing
// else holds it (see assign).
absl::StatusOr<applied> apply_on(node_ptr root, bool owned, std::uint64_t base_version,
                                 const path& outbox, const prepared& prep, std::int64_t now_us,
                                 const std::string& who) {
  applied out;
  out.version = base_version + 1;
  // One batch: nodes copied by one write are changed in place by the next ones.
  const std::uint64_t edit = new_edit();
  // (a message's path: the outbox's, '.', a 27-character id, '\n')
  std::size_t written_size = prep.messages.size() * (outbox.str().size() + 29);
  for (const prepared_write& w : prep.writes) written_size += w.target.str().size() + 1;
  out.written.reserve(written_size);
  for (const prepared_write& w : prep.writes) {
    if (w.value) {
      if (w.target.overlaps(outbox)) {
        out.rewrote_outbox = true;
        POP_RETURN_IF_ERROR(check_entry_version(root, w.target, outbox, out.version, who));
      }
      absl::StatusOr<node_ptr> r = assign(root, w.target.str(), w.value, edit, owned);
      if (!r.ok()) return annotate(r.status(), absl::StrCat(who, " at version ", base_version));
      root = *std::move(r);
    } else {
      root = erase(root, w.target.str(), edit, owned);
    }
    add_written(out.written, w.target.str());
  }
  const std::int64_t created = now_us;
  out.created_at_us = created;
  if (!prep.messages.empty() && !owned) {
    // The outbox is always a member map, so an append copies O(log n) of it, never the queue.
    // (In place it is one already, under maps, as can_apply_in_place checked: nothing to do.)
    if (!lookup(*root, outbox.str()).exists()) {
      absl::StatusOr<node_ptr> r = assign(root, outbox.str(), make_empty_map(), edit, owned);
      if (!r.ok()) return annotate(r.status(), absl::StrCat(who, " at version ", base_version));
      root = *std::move(r);
    }
    root = with_maps_along(root, outbox.str(), edit);
  }
  out.messages_at = out.written.size();
  out.message_ids.reserve(prep.messages.size());
  for (std::size_t i = 0; i < prep.messages.size(); ++i) {
    const message_draft& m = prep.messages[i];
    std::string id = make_message_id(out.version, static_cast<std::uint32_t>(i));
    // A message's path: the outbox's, '.', its id; a valid path (options validation leaves room
    // below the outbox for any id). Written into the log first and viewed there.
    const std::size_t path_at = out.written.size();
    out.written.append(outbox.str()).append(".").append(id);
    const std::string_view target = std::string_view(out.written).substr(path_at);
    absl::StatusOr<node_ptr> r = assign(
        root, target, make_message_node(static_cast<std::uint32_t>(i), m, created, out.version),
        edit, owned);
    if (!r.ok()) return annotate(r.status(), absl::StrCat(who, " at version ", base_version));
    root = *std::move(r);
    out.written.push_back('\n');
    out.message_ids.push_back(std::move(id));
  }
  out.root = std::move(root);
  return out;
}

// Whether every parent of `p` below `root` is an object, or missing (then made).
bool parents_are_objects(const value_node& root, std::string_view p) {
  location at{&root, nullptr};
  for (std::size_t dot = p.find('.'); dot != std::string_view::npos; dot = p.find('.')) {
    at = member(at, p.substr(0, dot));
    if (!at.exists()) return true;
    if (!at.is_object()) return false;
    p.remove_prefix(dot + 1);
  }
  return true;
}

}  // namespace

absl::StatusOr<applied> process_runner::apply(const version_state& base, const prepared& prep,
                                              std::int64_t now_us, const std::string& who) {
  return apply_on(base.root, false, base.version, *base.outbox_path, prep, now_us, who);
}

bool process_runner::can_apply_in_place(const value_node& root, const prepared& prep,
                                        const path& outbox) {
  // A write fails only where an object on its way is not one; one write can make that so for
  // another below it, so writes that overlap each other (or the outbox, where the messages go)
  // are left to the copying apply. Few writes: the pairs are compared.
  // A large change is built the copying way, outside the head's lock: readers wait for an in-place
  // one.
  constexpr std::size_t most_writes = 16;
  constexpr std::size_t most_messages = 64;
  if (prep.writes.size() > most_writes || prep.messages.size() > most_messages || !root.is_map()) {
    return false;
  }
  std::string_view checked_parent;  // the parent path last found to be objects all the way
  bool checked = false;
  for (std::size_t i = 0; i < prep.writes.size(); ++i) {
    const path& p = prep.writes[i].target;
    if (p.overlaps(outbox)) return false;
    for (std::size_t j = 0; j < i; ++j) {
      if (p.overlaps(prep.writes[j].target)) return false;
    }
    if (!prep.writes[i].value) continue;
    // (Writes side by side, as into one map, share the answer.)
    const std::size_t dot = p.str().rfind('.');
    const std::string_view parent =
        std::string_view(p.str()).substr(0, dot == std::string::npos ? 0 : dot);
    if (checked && parent == checked_parent) continue;
    if (!parents_are_objects(root, p.str())) return false;
    checked_parent = parent;
    checked = true;
  }
  if (prep.messages.empty()) return true;
  // The outbox and its parents: objects kept as member maps (as they are once a message was
  // written), so with_maps_along changes nothing.
  location at{&root, nullptr};
  std::string_view rest = outbox.str();
  while (!rest.empty()) {
    const std::size_t dot = rest.find('.');
    at = member(at, rest.substr(0, dot));
    if (!at.exists()) return false;
    if (at.inner != nullptr || at.packed != nullptr || !at.node->is_map()) return false;
    rest = dot == std::string_view::npos ? std::string_view() : rest.substr(dot + 1);
  }
  return true;
}

applied process_runner::apply_in_place(node_ptr root, std::uint64_t base_version,
                                       const path& outbox, const prepared& prep,
                                       std::int64_t now_us, const std::string& who) noexcept {
  // can_apply_in_place ruled out every error: one here is a bug, and `root` may be half changed.
  absl::StatusOr<applied> out =
      apply_on(std::move(root), true, base_version, outbox, prep, now_us, who);
  if (!out.ok()) {
    std::fprintf(stderr, "pop: an in-place commit failed after its checks passed: %s\n",
                 out.status().ToString().c_str());
    std::abort();
  }
  return *std::move(out);
}

}  // namespace pop::detail
