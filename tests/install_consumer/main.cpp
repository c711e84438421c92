// Uses the installed pop headers and libraries: registers, executes, relays the outbox.
#include <iostream>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include <pop/engine/engine.hpp>
#include <pop/relay/relay.hpp>
#include <pop/relay/topic_router.hpp>

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
  int delivered = 0;
  pop::topic_router router;
  const absl::Status routed = router.on("greeted", [&](const pop::outbox_message&) {
    ++delivered;
    return absl::OkStatus();
  });
  absl::StatusOr<std::unique_ptr<pop::relay>> relay = pop::relay::create(engine, router);
  if (!relay.ok()) {
    std::cerr << "consumer: " << relay.status() << "\n";
    return 1;
  }
  boost::asio::io_context io;
  absl::Status drained = absl::UnknownError("not run");
  boost::asio::co_spawn(io, (*relay)->drain(),
                        [&](std::exception_ptr, absl::Status s) { drained = s; });
  io.run();
  if (!registered.ok() || !done.ok() || !routed.ok() || !drained.ok() || delivered != 1 ||
      engine.snapshot().pending_count() != 0) {
    std::cerr << "consumer: pop did not work as installed\n";
    return 1;
  }
  std::cout << "consumer: find_package(pop) works; greeting at version " << done->version
            << " relayed\n";
  return 0;
}
