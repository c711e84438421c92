// Defines the small process the engine benchmarks share: read 2 paths, write 2, emit 1 message.
#pragma once

#include <cstdint>
#include <string>

#include "pop/engine/engine.hpp"

namespace pop::bench {

// Moves one unit from account args[0] to account args[1] (both full paths) and emits
// "transfer.done" with the arguments, keyed by the receiving account.
inline pop::result transfer(const pop::context& ctx, const pop::json& args) {
  const std::string& from = args[0].get_ref<const std::string&>();
  const std::string& to = args[1].get_ref<const std::string&>();
  const std::int64_t a = ctx.get<std::int64_t>(from);
  const std::int64_t b = ctx.get<std::int64_t>(to);
  pop::result r;
  r.set(from, a - 1);
  r.set(to, b + 1);
  r.emit("transfer.done", args, to);
  return r;
}

}  // namespace pop::bench
