// Uses the installed pop headers and libraries: registers, executes, checks the outbox.
#include <iostream>

#include "engine/engine.hpp"

int main() {
  pop::engine engine;
  const absl::Status registered = engine.register_process(
      {.name = "hello", .outputs = {"domain.greeting"}, .emits = {"greeted"}},
      [](const pop::context&, const pop::json& args) {
        pop::result r;
        r.set("domain.greeting", args.at("name"));
        r.emit("greeted", args);
        return r;
      });
  const auto done = engine.execute("hello", {{"name", "world"}});
  if (!registered.ok() || !done.ok() || engine.snapshot().pending_count() != 1) {
    std::cerr << "consumer: pop did not work as installed\n";
    return 1;
  }
  std::cout << "consumer: find_package(pop) works; greeting at version " << done->version << "\n";
  return 0;
}
