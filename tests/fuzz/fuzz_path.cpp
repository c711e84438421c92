// Fuzz target: dotted paths and path segments as users and journals give them.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "pop/contracts/path.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const absl::StatusOr<pop::path> p = pop::path::parse(text);
  if (p.ok()) {
    // A parsed path round-trips and relates to itself as documented.
    if (pop::path::parse(p->str()).value() != *p) __builtin_trap();
    if (!p->contains(*p) || !p->overlaps(*p)) __builtin_trap();
    static_cast<void>(p->child(text));
  }
  static_cast<void>(pop::validate_segment(text));
  return 0;
}
