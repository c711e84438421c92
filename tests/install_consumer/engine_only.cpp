// Uses only the installed engine: opens one, registers and executes a process, reads the state.
#include <pop/engine/engine.hpp>

#include <iostream>

int main() {
  absl::StatusOr<std::unique_ptr<pop::engine>> opened =
      pop::engine::open({.initial_state = {{"domain", {{"count", 0}}}}});
  if (!opened.ok()) {
    std::cerr << "engine_consumer: " << opened.status() << "\n";
    return 1;
  }
  pop::engine& engine = **opened;
  const absl::Status registered = engine.register_process(
      {.name = "bump", .inputs = {"domain.count"}, .outputs = {"domain.count"}},
      [](const pop::context& ctx, const pop::json&) {
        pop::result r;
        r.set("domain.count", ctx.get<int>("domain.count") + 1);
        return r;
      });
  const auto done = engine.execute("bump");
  if (!registered.ok() || !done.ok() || engine.snapshot().read("domain.count").value() != 1) {
    std::cerr << "engine_consumer: pop's engine did not work as installed\n";
    return 1;
  }
  std::cout << "engine_consumer: find_package(pop COMPONENTS engine) works\n";
  return 0;
}
