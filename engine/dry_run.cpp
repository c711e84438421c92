#include "pop/engine/dry_run.hpp"

#include <utility>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"
#include "pop/engine/detail/process_runner.hpp"

namespace pop {

using detail::process_runner;

namespace {

absl::StatusOr<dry_run_result> dry_run_contract(const detail::registered& proc, const json& fixture,
                                                const json& args, std::uint64_t version,
                                                std::shared_ptr<const path> outbox,
                                                std::int64_t now_us) {
  if (!fixture.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("dry run of process '", proc.contract.name(),
                                                   "': the fixture must be a JSON object, not ",
                                                   fixture.type_name()));
  }
  POP_RETURN_IF_ERROR(check_storable(
      fixture, absl::StrCat("dry run of process '", proc.contract.name(), "': the fixture")));
  // A fixture may seed the outbox as a list, as options.initial_state may.
  // (A fixture holding messages of later versions, say a dry run's state, is taken to be of the
  // newest of them: this run's messages never take their ids.)
  std::uint64_t newest = version;
  POP_ASSIGN_OR_RETURN(json seeded,
                       detail::initial_outbox(fixture, *outbox, now_us, std::nullopt, &newest));
  version = newest;
  auto state = std::make_shared<detail::version_state>();
  state->version = version;
  state->root = detail::make_root(seeded);
  seeded = json();  // the tree is built: not kept for the whole run
  state->outbox_path = outbox;
  const snapshot snap = process_runner::make_snapshot(state);
  POP_ASSIGN_OR_RETURN(detail::prepared prep, process_runner::run(proc, snap, args));
  POP_ASSIGN_OR_RETURN(detail::applied done,
                       process_runner::apply(*state, prep, now_us,
                                             absl::StrCat("process '", proc.contract.name(), "'")));
  dry_run_result out;
  out.reads = detail::path_texts(prep.reads);
  for (const auto& w : prep.writes) {
    std::optional<json> value;
    if (w.value) value = detail::materialise({w.value.get(), nullptr});
    out.writes.push_back({w.target.str(), std::move(value)});
  }
  auto after = std::make_shared<detail::version_state>();
  after->version = done.version;
  after->root = done.root;
  after->outbox_path = outbox;
  const snapshot next = process_runner::make_snapshot(after);
  for (const std::string& id : done.message_ids) {
    POP_ASSIGN_OR_RETURN(path p, outbox->child(id));
    POP_ASSIGN_OR_RETURN(outbox_message m, outbox_message::from_json(next.view(p).to_json()));
    out.messages.push_back(std::move(m));
  }
  out.state = next.to_json();
  return out;
}

}  // namespace

absl::StatusOr<dry_run_result> engine::dry_run(std::string_view name, const json& fixture,
                                               const json& args) const {
  const std::shared_ptr<const registered> proc = find(name);
  if (!proc) {
    return absl::NotFoundError(
        absl::StrCat("no process named '", detail::to_absl(name), "' is registered"));
  }
  return dry_run_contract(*proc, fixture, args, 0, outbox_, options_.clock->now_us());
}

absl::StatusOr<dry_run_result> dry_run(const process_spec& spec, const process_fn& fn,
                                       const json& fixture, const json& args,
                                       const dry_run_options& opts) {
  POP_ASSIGN_OR_RETURN(process_contract contract, process_contract::from_spec(spec));
  if (!fn) return absl::InvalidArgumentError("dry run: the process function is empty");
  POP_ASSIGN_OR_RETURN(path outbox,
                       detail::parse_outbox_path(opts.outbox_path, "dry run: outbox_path"));
  const detail::registered proc{std::move(contract), fn};
  return dry_run_contract(proc, fixture, args, opts.version,
                          std::make_shared<const path>(std::move(outbox)),
                          system_clock()->now_us());
}

}  // namespace pop
