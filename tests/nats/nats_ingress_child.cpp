// The child of the ingress kill -9 test: consumes stream EVENTS into an engine on a journal
// through the inbox until `expected` distinct messages are applied, then exits 0:
//   nats_ingress_child <nats url> <journal> <expected> <pause ms between fetches>
// Its handler appends each event's seq to domain.got.<key> and counts applies per message id at
// domain.count.<id>, so the test can read from the journal what was applied how often.
#include <cstdio>
#include <string>
#include <thread>

#include "pop/nats/nats_connection.hpp"
#include "pop/nats/nats_ingress.hpp"
#include "pop/relay/inbox.hpp"

using pop::json;

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: nats_ingress_child <nats url> <journal> <expected> <pause ms>\n");
    return 2;
  }
  const std::size_t expected = std::stoul(argv[3]);
  // Paced, so the test's kills land while it works however fast the machine is.
  const std::chrono::milliseconds pause(std::stoi(argv[4]));
  pop::options o;
  o.journal = argv[2];
  auto e = pop::engine::open(o);
  if (!e.ok()) {
    std::fprintf(stderr, "nats_ingress_child: %s\n", e.status().ToString().c_str());
    return 3;
  }
  auto in_owner = pop::inbox::create(**e, {.path = "system.inbox.nats"}).value();
  pop::inbox& in = *in_owner;
  absl::Status st = in.register_handler(
      {.name = "apply_event",
       .inputs = {"domain.got", "domain.count"},
       .outputs = {"domain.got", "domain.count"}},
      [](const pop::context& ctx, const pop::outbox_message& m) -> absl::StatusOr<pop::result> {
        const std::string key = m.payload.at("key");
        json got = ctx.get_or<json>("domain.got." + key, json::array());
        got.push_back(m.payload.at("seq"));
        pop::result r;
        r.set("domain.got." + key, got);
        r.set("domain.count." + m.id, ctx.get_or<int>("domain.count." + m.id, 0) + 1);
        return r;
      });
  pop::nats_connection_options co;
  co.servers = {argv[1]};
  auto nc = pop::nats_connection::connect(co);
  if (!st.ok() || !nc.ok()) {
    std::fprintf(stderr, "nats_ingress_child: %s %s\n", st.ToString().c_str(),
                 nc.status().ToString().c_str());
    return 3;
  }
  auto ingress = pop::nats_ingress::create(**e, in, **nc,
                                           {.stream = "EVENTS",
                                            .durable = "crashy",
                                            .handler = "apply_event",
                                            .batch = 64,
                                            .fetch_wait = std::chrono::milliseconds(50),
                                            .ack_wait = std::chrono::milliseconds(500)});
  if (!ingress.ok()) {
    std::fprintf(stderr, "nats_ingress_child: %s\n", ingress.status().ToString().c_str());
    return 3;
  }
  for (;;) {
    if ((*e)->snapshot().view(pop::path::parse("domain.count").value()).size() >= expected) {
      return 0;
    }
    std::this_thread::sleep_for(pause);
    auto n = (*ingress)->poll(std::chrono::milliseconds(50));
    if (!n.ok() && n.status().code() != absl::StatusCode::kUnavailable) {
      std::fprintf(stderr, "nats_ingress_child: %s\n", n.status().ToString().c_str());
      return 4;
    }
  }
}
