// Fuzz target: workflow definitions read from JSON, as define_from_file reads them.
#include <cstddef>
#include <cstdint>

#include "pop/workflow/workflow.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const pop::json j = pop::json::parse(data, data + size, nullptr, false);
  if (j.is_discarded()) return 0;
  const absl::StatusOr<pop::workflow_definition> d = pop::workflow_definition::from_json(j);
  if (d.ok()) {
    // A definition that loads writes itself out in a form that loads again.
    if (!pop::workflow_definition::from_json(d->to_json()).ok()) __builtin_trap();
  }
  return 0;
}
