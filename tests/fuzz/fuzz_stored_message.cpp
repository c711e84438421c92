// Fuzz target: the stored outbox message format and the list-entry (Theus) form, read from JSON,
// and the storability check every committed value passes.
#include <cstddef>
#include <cstdint>

#include "pop/contracts/outbox_message.hpp"
#include "pop/engine/detail/outbox_form.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const pop::json j = pop::json::parse(data, data + size, nullptr, false);
  if (j.is_discarded()) return 0;
  const absl::StatusOr<pop::outbox_message> m = pop::outbox_message::from_json(j);
  if (m.ok()) {
    // A message that reads back writes the same message.
    if (pop::outbox_message::from_json(m->to_json()).value() != *m) __builtin_trap();
  }
  static_cast<void>(pop::detail::draft_from_entry(j, "fuzz"));
  static_cast<void>(
      pop::detail::initial_outbox({{"q", j}}, pop::path::parse("q").value(), 0, std::nullopt));
  if (pop::check_storable(j, "fuzz").ok()) static_cast<void>(j.dump());  // must not throw
  static_cast<void>(
      pop::parse_message_id(std::string_view(reinterpret_cast<const char*>(data), size)));
  return 0;
}
