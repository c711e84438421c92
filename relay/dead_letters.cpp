#include "pop/relay/dead_letters.hpp"

#include <stdexcept>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"

namespace pop {
namespace {}  // namespace

absl::StatusOr<std::unique_ptr<dead_letters>> dead_letters::create(engine& e,
                                                                   std::string_view letters_path) {
  POP_ASSIGN_OR_RETURN(path p,
                       parse_path_outside(letters_path, e.outbox_path(), "dead_letters: path"));
  POP_RETURN_IF_ERROR(
      e.describe("dead_letters", p.str(), {{"path", p.str()}, {"at_us", e.clock().now_us()}}));
  return std::unique_ptr<dead_letters>(new dead_letters(e, std::move(p)));
}

dead_letters::dead_letters(engine& e, path letters_path)
    : engine_(e), path_(std::move(letters_path)) {}

std::size_t dead_letters::count() const {
  return engine_.snapshot().view(path_).size();
}

absl::StatusOr<std::vector<dead_letter>> dead_letters::list(std::size_t limit) const {
  const snapshot snap = engine_.snapshot();
  std::vector<dead_letter> out;
  absl::Status error;
  snap.view(path_).for_each_member([&](std::string_view id, const value_view& v) {
    if (out.size() >= limit) return false;
    absl::StatusOr<dead_letter> d = dead_letter::from_json(id, v.to_json());
    if (!d.ok()) {
      error = absl::DataLossError(absl::StrCat("dead letter '", path_.str(), ".",
                                               detail::to_absl(id), "' in version ", snap.version(),
                                               ": ", d.status().message()));
      return false;
    }
    out.push_back(*std::move(d));
    return true;
  });
  if (!error.ok()) return error;
  return out;
}

absl::StatusOr<std::uint64_t> dead_letters::requeue(std::string_view id) {
  POP_ASSIGN_OR_RETURN(const auto done, requeue_ids({std::string(id)}, false));
  return done.second;
}

absl::StatusOr<std::size_t> dead_letters::requeue_all() {
  POP_ASSIGN_OR_RETURN(const auto done, requeue_ids({}, true));
  return done.first;
}

absl::StatusOr<std::uint64_t> dead_letters::requeue_many(const std::vector<std::string>& ids) {
  if (ids.empty()) return absl::InvalidArgumentError("dead_letters::requeue_many: no ids");
  POP_ASSIGN_OR_RETURN(const auto done, requeue_ids(ids, false));
  return done.second;
}

absl::StatusOr<std::pair<std::size_t, std::uint64_t>> dead_letters::requeue_ids(
    const std::vector<std::string>& ids, bool all) {
  const std::string& outbox = engine_.outbox_path().str();
  for (;;) {
    const snapshot snap = engine_.snapshot();
    const value_view letters = snap.view(path_);
    const value_view queue = snap.view(snap.outbox_path());
    std::vector<std::string> chosen = ids;
    if (all) {
      chosen.clear();
      letters.for_each_member([&](std::string_view id, const value_view& v) {
        const value_view malformed = v.member("malformed");
        if (!(malformed && malformed.to_json() == true)) chosen.emplace_back(id);
        return true;
      });
    }
    if (chosen.empty()) return std::pair<std::size_t, std::uint64_t>{0, snap.version()};
    std::vector<write> writes;
    for (const std::string& id : chosen) {
      const value_view stored = letters.member(id);
      if (!stored) {
        return absl::NotFoundError(absl::StrCat("no dead letter '", id, "' at '", path_.str(),
                                                "' in version ", snap.version()));
      }
      if (queue.member(id)) {
        return absl::AlreadyExistsError(absl::StrCat("cannot requeue dead letter '", id,
                                                     "': the outbox already holds that id in "
                                                     "version ",
                                                     snap.version()));
      }
      absl::StatusOr<dead_letter> d = dead_letter::from_json(id, stored.to_json());
      if (d.ok() && d->malformed) {
        return absl::FailedPreconditionError(
            absl::StrCat("dead letter '", id, "' was not a valid outbox message (", d->reason,
                         "); it cannot be requeued, only discarded"));
      }
      if (!d.ok()) {
        return absl::DataLossError(absl::StrCat("dead letter '", path_.str(), ".", id,
                                                "' in version ", snap.version(), ": ",
                                                d.status().message()));
      }
      outbox_message m = std::move(d->message);
      m.attempts = 0;
      m.last_error.clear();
      m.next_attempt_at_us = 0;
      writes.push_back({absl::StrCat(path_.str(), ".", id), std::nullopt});
      writes.push_back({absl::StrCat(outbox, ".", id), m.to_json()});
    }
    POP_ASSIGN_OR_RETURN(
        cas_result r, engine_.compare_and_swap(snap.version(), std::move(writes), cas_mode::keys));
    if (r.committed) return std::pair{chosen.size(), r.version};
    // Someone else wrote these dead letters or ids meanwhile: look again on the newer state.
  }
}

absl::StatusOr<std::uint64_t> dead_letters::discard(std::string_view id) {
  return discard_many({std::string(id)});
}

absl::StatusOr<std::uint64_t> dead_letters::discard_many(const std::vector<std::string>& ids) {
  if (ids.empty()) return absl::InvalidArgumentError("dead_letters::discard_many: no ids");
  for (;;) {
    const snapshot snap = engine_.snapshot();
    const value_view letters = snap.view(path_);
    std::vector<write> writes;
    for (const std::string& id : ids) {
      if (!letters.member(id)) {
        return absl::NotFoundError(absl::StrCat("no dead letter '", id, "' at '", path_.str(),
                                                "' in version ", snap.version()));
      }
      writes.push_back({absl::StrCat(path_.str(), ".", id), std::nullopt});
    }
    POP_ASSIGN_OR_RETURN(
        cas_result r, engine_.compare_and_swap(snap.version(), std::move(writes), cas_mode::keys));
    if (r.committed) return r.version;
  }
}

}  // namespace pop
