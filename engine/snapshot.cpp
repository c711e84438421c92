#include "pop/engine/snapshot.hpp"

#include "pop/engine/detail/tree.hpp"

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"

namespace pop {
namespace {

std::shared_ptr<const detail::version_state> empty_state() {
  static const auto state = [] {
    auto s = std::make_shared<detail::version_state>();
    s->root = detail::make_root(json::object());
    s->outbox_path = std::make_shared<const path>(path::parse("domain.outbox_queue").value());
    return std::shared_ptr<const detail::version_state>(std::move(s));
  }();
  return state;
}

}  // namespace

snapshot::snapshot() : state_(empty_state()) {}

absl::StatusOr<json> snapshot::read(std::string_view path_text) const {
  POP_ASSIGN_OR_RETURN(const path p, path::parse(path_text));
  const value_view v = view(p);
  if (!v) {
    return absl::NotFoundError(absl::StrCat("nothing at '", p.str(), "' in version ", version()));
  }
  return v.to_json();
}

absl::StatusOr<std::vector<outbox_message>> snapshot::pending_messages(
    std::size_t limit, std::string_view from_id) const {
  std::vector<outbox_message> out;
  absl::Status error;
  view(outbox_path())
      .for_each_member(
          [&](std::string_view id, const value_view& stored) {
            if (out.size() >= limit) return false;
            absl::StatusOr<outbox_message> m = outbox_message::from_json(stored.to_json());
            if (!m.ok()) {
              error = absl::DataLossError(absl::StrCat(
                  "outbox entry '", outbox_path().str(), ".", detail::to_absl(id), "' in version ",
                  version(), " is not a message: ", m.status().message()));
              return false;
            }
            out.push_back(*std::move(m));
            return true;
          },
          from_id);
  if (!error.ok()) return error;
  return out;
}

}  // namespace pop
