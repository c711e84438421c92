#include "pop/relay/inbox.hpp"

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"

namespace pop {
namespace {

// Adds `inbox` to `declared` unless a declared path already contains it.
absl::Status add_inbox(std::vector<std::string>& declared, const path& inbox,
                       const std::string& process, const char* what) {
  for (const std::string& text : declared) {
    absl::StatusOr<path> p = path::parse(text);
    if (!p.ok()) return absl::OkStatus();  // register_process names it
    if (p->contains(inbox)) return absl::OkStatus();
    if (inbox.contains(*p)) {
      return absl::InvalidArgumentError(absl::StrCat("inbox handler '", process, "' declares ",
                                                     what, " '", text, "' inside the inbox at '",
                                                     inbox.str(), "', which the inbox owns"));
    }
  }
  declared.push_back(inbox.str());
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<inbox>> inbox::create(engine& e, inbox_options opts) {
  POP_ASSIGN_OR_RETURN(path p,
                       parse_path_outside(opts.path, e.outbox_path(), "inbox_options.path"));
  return std::unique_ptr<inbox>(new inbox(e, std::move(opts), std::move(p)));
}

inbox::inbox(engine& e, inbox_options opts, path p)
    : engine_(e), options_(std::move(opts)), path_(std::move(p)) {}

absl::Status inbox::register_handler(process_spec spec, message_handler fn) {
  if (!fn) {
    return absl::InvalidArgumentError(
        absl::StrCat("inbox handler '", spec.name, "' was registered with an empty function"));
  }
  POP_RETURN_IF_ERROR(add_inbox(spec.inputs, path_, spec.name, "input"));
  POP_RETURN_IF_ERROR(add_inbox(spec.outputs, path_, spec.name, "output"));
  const std::string name = spec.name;
  // The engine owns the process and the clock, so the pointer lives as long as the process.
  process_fn wrapped = [fn = std::move(fn), marks = path_.str(), name, clock = &engine_.clock()](
                           const context& ctx, const json& args) -> absl::StatusOr<result> {
    absl::StatusOr<outbox_message> m = outbox_message::from_json(args);
    if (!m.ok()) {
      return annotate(m.status(), absl::StrCat("inbox handler '", name, "' got a bad message"));
    }
    const std::string mark = absl::StrCat(marks, ".", m->id);
    if (ctx.contains(mark)) return result{};
    POP_ASSIGN_OR_RETURN(result r, fn(ctx, *m));
    r.set(mark,
          json{{"applied_at_us", clock->now_us()}, {"topic", m->topic}, {"version", m->version}});
    return r;
  };
  POP_RETURN_IF_ERROR(engine_.register_process(std::move(spec), std::move(wrapped)));
  std::lock_guard lock(mu_);
  handlers_.insert(name);
  return absl::OkStatus();
}

absl::StatusOr<inbox_result> inbox::apply(std::string_view name, const outbox_message& m) {
  {
    std::lock_guard lock(mu_);
    if (!handlers_.contains(name)) {
      return absl::NotFoundError(absl::StrCat("no inbox handler named '", detail::to_absl(name),
                                              "' is registered on the inbox at '", path_.str(),
                                              "'"));
    }
  }
  if (absl::StatusOr<path> mark = path_.child(m.id); !mark.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("inbox '", path_.str(), "': message id '", m.id,
                     "' cannot be recorded: ", mark.status().message()));
  }
  POP_ASSIGN_OR_RETURN(commit c, engine_.execute(name, m.to_json()));
  inbox_result out{c.changed, std::move(c)};
  if (out.applied && options_.retention > 0 &&
      size() > options_.retention + options_.retention / 8) {
    // Pruning is housekeeping: the message is applied whether or not it succeeds now.
    static_cast<void>(prune());
  }
  return out;
}

bool inbox::contains(std::string_view id) const {
  return engine_.snapshot().view(path_).member(id).exists();
}

std::size_t inbox::size() const {
  return engine_.snapshot().view(path_).size();
}

absl::StatusOr<std::size_t> inbox::prune() {
  if (options_.retention == 0) return 0;
  for (;;) {
    const snapshot snap = engine_.snapshot();
    const value_view marks = snap.view(path_);
    if (marks.size() <= options_.retention) return 0;
    const std::size_t excess = marks.size() - options_.retention;
    // The marks applied longest ago go first (ties by id), whatever their ids' order.
    std::vector<std::pair<std::int64_t, std::string>> by_age;
    by_age.reserve(marks.size());
    marks.for_each_member([&](std::string_view id, const value_view& mark) {
      std::int64_t at = 0;
      if (const value_view a = mark.member("applied_at_us"); a && a.to_json().is_number_integer()) {
        at = a.to_json().get<std::int64_t>();
      }
      by_age.emplace_back(at, std::string(id));
      return true;
    });
    std::nth_element(by_age.begin(), by_age.begin() + static_cast<std::ptrdiff_t>(excess - 1),
                     by_age.end());
    std::vector<write> writes;
    writes.reserve(excess);
    for (std::size_t i = 0; i < excess; ++i) {
      writes.push_back({absl::StrCat(path_.str(), ".", by_age[i].second), std::nullopt});
    }
    POP_ASSIGN_OR_RETURN(
        cas_result r, engine_.compare_and_swap(snap.version(), std::move(writes), cas_mode::keys));
    if (r.committed) return excess;
  }
}

}  // namespace pop
