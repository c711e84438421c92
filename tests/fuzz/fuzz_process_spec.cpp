// Fuzz target: process specs read from JSON (name, inputs, outputs, emits) and their contracts.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "pop/contracts/json.hpp"
#include "pop/contracts/process_spec.hpp"

namespace {

std::vector<std::string> strings(const pop::json& j, const char* field) {
  std::vector<std::string> out;
  if (const auto it = j.find(field); it != j.end() && it->is_array()) {
    for (const pop::json& e : *it) {
      if (e.is_string()) out.push_back(e.get<std::string>());
    }
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const pop::json j = pop::json::parse(data, data + size, nullptr, false);
  if (!j.is_object()) return 0;
  pop::process_spec spec;
  if (const auto it = j.find("name"); it != j.end() && it->is_string()) spec.name = *it;
  spec.inputs = strings(j, "inputs");
  spec.outputs = strings(j, "outputs");
  spec.emits = strings(j, "emits");
  static_cast<void>(pop::process_contract::from_spec(spec));
  static_cast<void>(pop::check_storable(j, "fuzz"));
  return 0;
}
