// The payment service of the distributed order pipeline: its own engine on its own journal,
// talking to the orders service only through NATS JetStream. A nats_ingress applies each
// payment.requested once through the inbox (process `charge`: records the payment and emits
// payment.confirmed or payment.declined keyed by the order, in the same commit); a relay publishes
// the answers through a nats_sink. Runs until SIGTERM or SIGINT, then checks its invariants
// (each order charged once, outbox drained, nothing dead-lettered) and exits 1 if one fails.
#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <functional>
#include <iostream>
#include <random>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include "pop/nats/nats_ingress.hpp"
#include "pop/nats/nats_sink.hpp"
#include "pop/relay/dead_letters.hpp"
#include "pop/relay/inbox.hpp"
#include "pop/relay/relay.hpp"

namespace asio = boost::asio;
using pop::json;

int main(int argc, char** argv) {
  std::string broker = "nats://127.0.0.1:4222";
  std::string journal = "payments.db";
  double decline_rate = 0.2;
  std::uint64_t seed = 42;
  CLI::App app{"pop payments service: charges orders it hears of through NATS JetStream"};
  app.add_option("--broker", broker, "NATS URL");
  app.add_option("--journal", journal, "this service's journal");
  app.add_option("--decline-rate", decline_rate, "share of payments declined")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--seed", seed, "seed of the decisions (as the orders service's)");
  CLI11_PARSE(app, argc, argv);

  auto opened = pop::engine::open({.journal = journal});
  if (!opened.ok()) {
    std::cerr << "payments_service: " << opened.status() << "\n";
    return 2;
  }
  pop::engine& e = **opened;
  auto requests_made =
      pop::inbox::create(e, {.path = "system.inbox.orders", .retention = 1'000'000});
  if (!requests_made.ok()) {
    std::cerr << "payments_service: " << requests_made.status() << "\n";
    return 2;
  }
  pop::inbox& requests = **requests_made;
  // charge: a pure function of the request and the snapshot. The decision is deterministic per
  // order, so a restarted service decides the same.
  absl::Status registered = requests.register_handler(
      {.name = "charge",
       .inputs = {"domain.payments"},
       .outputs = {"domain.payments"},
       .emits = {"payment.confirmed", "payment.declined"}},
      [&](const pop::context& ctx, const pop::outbox_message& m) -> absl::StatusOr<pop::result> {
        const std::string order = m.payload.at("order");
        pop::result r;
        if (ctx.contains("domain.payments." + order)) return r;  // charged once per order
        std::mt19937_64 decide(seed ^ std::hash<std::string>{}(order));
        const bool declined = std::uniform_real_distribution<double>(0, 1)(decide) < decline_rate;
        const std::string outcome = declined ? "declined" : "confirmed";
        r.set("domain.payments." + order, json{{"amount", m.payload.value("amount", 0)},
                                               {"outcome", outcome},
                                               {"request", m.id}});
        r.emit("payment." + outcome, {{"order", order}, {"amount", m.payload.value("amount", 0)}},
               order);
        return r;
      });
  if (!registered.ok()) {
    std::cerr << "payments_service: " << registered << "\n";
    return 2;
  }

  pop::nats_connection_options co;
  co.servers = {broker};
  co.name = "payments_service";
  auto nats = pop::nats_connection::connect(co);
  if (!nats.ok()) {
    std::cerr << "payments_service: " << nats.status() << "\n";
    return 2;
  }
  for (const auto& [name, subjects] :
       {std::pair{"ORDERS", "orders.>"}, {"PAYMENTS", "payments.>"}}) {
    if (auto st = pop::ensure_stream(**nats, {.name = name, .subjects = {subjects}}); !st.ok()) {
      std::cerr << "payments_service: " << st.status() << "\n";
      return 2;
    }
  }
  auto sink = pop::nats_sink::create(**nats, {.source = "payments", .subject_prefix = "payments."});
  auto ingress = pop::nats_ingress::create(e, requests, **nats,
                                           {.stream = "ORDERS",
                                            .durable = "payments",
                                            .filter_subject = "orders.payment.requested",
                                            .handler = "charge",
                                            // a restart waits this long for redeliveries
                                            .ack_wait = std::chrono::milliseconds(2'000)});
  if (!sink.ok() || !ingress.ok()) {
    std::cerr << "payments_service: " << (sink.ok() ? ingress.status() : sink.status()) << "\n";
    return 2;
  }

  asio::io_context io;
  auto relay_made = pop::relay::create(e, **sink);
  if (!relay_made.ok()) {
    std::cerr << "payments_service: " << relay_made.status() << "\n";
    return 2;
  }
  pop::relay& relay = **relay_made;
  asio::cancellation_signal stop_relay;
  absl::Status relay_status;
  asio::co_spawn(
      io, relay.run(),
      asio::bind_cancellation_slot(stop_relay.slot(), [&](std::exception_ptr, absl::Status st) {
        relay_status = st;
        io.stop();
      }));
  if (absl::Status st = (*ingress)->start(); !st.ok()) {
    std::cerr << "payments_service: " << st << "\n";
    return 2;
  }
  // On SIGTERM: stop taking requests, publish every answer already committed, then stop.
  asio::signal_set signals(io, SIGTERM, SIGINT);
  absl::Status ingress_status;
  absl::Status drained;
  signals.async_wait([&](const boost::system::error_code& ec, int) {
    if (ec) return;
    ingress_status = (*ingress)->stop();
    stop_relay.emit(asio::cancellation_type::terminal);
  });
  std::fprintf(stderr, "payments_service: ready\n");
  io.run();
  // The relay is stopped; drain what the last requests committed.
  signals.cancel();
  io.restart();
  asio::co_spawn(io, relay.drain(), [&](std::exception_ptr, absl::Status st) { drained = st; });
  io.run();

  const pop::nats_ingress_stats is = (*ingress)->stats();
  const json payments = e.snapshot().read("domain.payments").value_or(json::object());
  std::size_t confirmed = 0;
  for (const auto& [order, p] : payments.items())
    confirmed += p.at("outcome") == "confirmed" ? 1 : 0;
  fmt::print("\n{:<32}{:>12}\n", "payments service", journal);
  fmt::print("{:-<44}\n", "");
  fmt::print("{:<32}{:>12}\n", "requests applied", is.applied);
  fmt::print("{:<32}{:>12}\n", "duplicates absorbed (inbox)", is.duplicates);
  fmt::print("{:<32}{:>12}\n", "orders charged", payments.size());
  fmt::print("{:<32}{:>12}\n", "  confirmed", confirmed);
  fmt::print("{:<32}{:>12}\n", "answers published", (*sink)->stats().acked);
  fmt::print("{:<32}{:>12}\n", "state version", e.version());
  bool ok = true;
  const auto check = [&](bool holds, const std::string& what) {
    fmt::print("{:<44}{}\n", what, holds ? "ok" : "FAILED");
    ok = ok && holds;
  };
  fmt::print("{:-<44}\n", "");
  check(ingress_status.ok() && is.dead_lettered == 0, "every request applied");
  check(drained.ok() && e.snapshot().pending_count() == 0, "every answer published");
  check(pop::dead_letters::create(e).value()->count() == 0, "no dead letters");
  check(relay_status.code() == absl::StatusCode::kCancelled, "relay stopped cleanly");
  return ok ? 0 : 1;
}
