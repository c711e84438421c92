// The order pipeline: pop's flagship example. Orders run as workflow instances (place, request
// payment, wait for the payment service, confirm or cancel with compensation); a simulated payment
// service consumes payment.requested from the relay and answers through the inbox, with declines,
// latency, duplicates and reordering. Journaled by default: kill it and start it again on the same
// journal and it finishes the same orders. Checks its invariants at the end; exits 1 if one fails.
// With --broker, the payment service is another process (payments_service, its own engine and
// journal) and the two talk only through NATS JetStream: payment.requested goes out through a
// nats_sink, the answers come back through a nats_ingress into the inbox.
//
// The parts: settings.hpp (the command line), orders.hpp (the orders of a run),
// simulated_payments.hpp, events.hpp (the other consumers), pipeline.hpp (wiring and the
// commit-driven run), report.cpp (summary and invariants), order_processes.hpp (the processes).
#include <iostream>

#include "pipeline.hpp"
#include "settings.hpp"

int main(int argc, char** argv) {
  int exit_code = 0;
  const std::optional<order_pipeline::settings> s =
      order_pipeline::parse_settings(argc, argv, exit_code);
  if (!s) return exit_code;
  absl::StatusOr<std::unique_ptr<order_pipeline::pipeline>> p = order_pipeline::pipeline::build(*s);
  if (!p.ok()) {
    std::cerr << "order_pipeline: " << p.status() << "\n";
    return 2;
  }
  const order_pipeline::run_result r = (*p)->run();
  return (*p)->report(r) ? 0 : 1;
}
