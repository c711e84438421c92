// The child of the kill -9 tests: commits continuously on a journal while a relay publishes, and
// records what it was told, with plain write(2) calls that survive the kill:
//   journal_crash_child <journal> <acks file> <delivered file>
// acks: "<version> <message id>" after each acknowledged commit; delivered: "<n> <id>" before
// the sink acknowledges a message. Runs until killed.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <string>
#include <thread>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "pop/relay/relay.hpp"
#include "pop/relay/topic_router.hpp"

namespace {

void append(int fd, const std::string& line) {
  if (::write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size())) std::_Exit(3);
}

// Spawns the relay; a relay that stops on its own sets `stopped` (the child then fails).
void start_relay(boost::asio::io_context& io, pop::relay& relay, std::atomic<bool>& stopped) {
  boost::asio::co_spawn(io, relay.run(), [&stopped](std::exception_ptr, absl::Status s) {
    std::fprintf(stderr, "journal_crash_child: relay stopped: %s\n", s.ToString().c_str());
    stopped.store(true);
  });
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: journal_crash_child <journal> <acks> <delivered>\n");
    return 2;
  }
  pop::options o;
  o.journal = argv[1];
  o.journal_tuning.snapshot_every = 500;
  auto opened = pop::engine::open(o);
  if (!opened.ok()) {
    std::fprintf(stderr, "journal_crash_child: %s\n", opened.status().ToString().c_str());
    return 1;
  }
  pop::engine& e = **opened;
  const int acks = ::open(argv[2], O_WRONLY | O_CREAT | O_APPEND, 0644);
  const int delivered = ::open(argv[3], O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (acks < 0 || delivered < 0) return 1;
  const absl::Status registered =
      e.register_process({.name = "place",
                          .inputs = {"domain.count"},
                          .outputs = {"domain.count", "domain.items", "domain.bulk"},
                          .emits = {"item.placed"}},
                         [](const pop::context& ctx, const pop::json&) {
                           const int n = ctx.get_or<int>("domain.count", 0) + 1;
                           pop::result r;
                           r.set("domain.count", n);
                           r.set("domain.items.i" + std::to_string(n), n);
                           // Bulk, so the write-ahead log fills and SQLite checkpoints often: kills
                           // then also land in the middle of checkpoints, when the main file alone
                           // is torn.
                           r.set("domain.bulk.b" + std::to_string(n % 64),
                                 std::string(6000, static_cast<char>('a' + n % 26)));
                           r.emit("item.placed", {{"n", n}}, "k" + std::to_string(n % 5));
                           return r;
                         });
  pop::topic_router router;
  const absl::Status routed = router.on("item.placed", [&](const pop::outbox_message& m) {
    append(delivered, std::to_string(m.payload.at("n").get<int>()) + " " + m.id + "\n");
    return absl::OkStatus();
  });
  if (!registered.ok() || !routed.ok()) return 1;
  auto relay_owner = pop::relay::create(e, router).value();
  pop::relay& relay = *relay_owner;
  boost::asio::io_context io;
  std::atomic<bool> relay_stopped{false};
  start_relay(io, relay, relay_stopped);
  std::thread relay_thread([&] { io.run(); });
  while (!relay_stopped.load()) {
    const absl::StatusOr<pop::commit> c = e.execute("place");
    if (!c.ok()) {
      std::fprintf(stderr, "journal_crash_child: %s\n", c.status().ToString().c_str());
      std::_Exit(5);
    }
    append(acks, std::to_string(c->version) + " " + c->message_ids.at(0) + "\n");
  }
  std::_Exit(4);
}
