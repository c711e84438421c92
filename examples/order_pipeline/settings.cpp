#include "settings.hpp"

#include <CLI/CLI.hpp>

namespace order_pipeline {

std::optional<settings> parse_settings(int argc, char** argv, int& exit_code) {
  settings s;
  s.workflow_file = POP_ORDER_WORKFLOW_FILE;
  CLI::App app{"pop order pipeline: orders as workflows, a relay, a simulated payment service"};
  app.add_option("-n,--orders", s.orders, "number of orders")->check(CLI::Range(1, 10'000'000));
  app.add_option("-c,--concurrency", s.concurrency, "orders in flight at once")
      ->check(CLI::Range(1, 1'000'000));
  app.add_option("--journal", s.journal, "journal file (the embedded default)");
  app.add_flag("--in-memory", s.in_memory, "no journal: everything in memory");
  app.add_option("--decline-rate", s.decline_rate, "share of payments declined")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--duplicate-rate", s.duplicate_rate, "share of payment answers sent twice")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--latency-ms", s.max_latency_ms, "most payment latency, ms")
      ->check(CLI::Range(0, 60'000));
  app.add_option("--seed", s.seed, "seed of orders, declines and latencies");
  app.add_option("--sink", s.sink, "events: a JSON-lines file, '-' for stdout, 'none'");
  app.add_option("--workflow", s.workflow_file, "the order workflow definition (JSON)");
  app.add_option("--broker", s.broker,
                 "NATS URL: talk to payments_service through JetStream instead of simulating it");
  app.add_option("--payment-timeout-ms", s.payment_timeout_ms,
                 "with --broker: how long an order waits for its payment")
      ->check(CLI::Range(1, 3'600'000));
  bool quiet = false;
  app.add_flag("-q,--quiet", quiet, "no progress bar");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    exit_code = app.exit(e);
    return std::nullopt;
  }
  s.progress = !quiet;
  return s;
}

}  // namespace order_pipeline
