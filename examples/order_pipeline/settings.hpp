// Defines the order pipeline's settings and its command line.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace order_pipeline {

struct settings {
  int orders = 200;
  int concurrency = 100;
  std::string journal = "order_pipeline.db";
  bool in_memory = false;
  double decline_rate = 0.2;
  double duplicate_rate = 0.1;
  int max_latency_ms = 20;
  std::uint64_t seed = 42;
  std::string sink = "order_pipeline.events.jsonl";  // a file, "-" for stdout, "none"
  std::string workflow_file{};
  bool progress = true;
  std::string broker{};             // NATS URL: payments run in payments_service, across JetStream
  int payment_timeout_ms = 60'000;  // with a broker: how long an order waits for its payment
};

// The settings on the command line, or the exit code to leave with (help, or a bad option, which
// CLI11 has reported).
std::optional<settings> parse_settings(int argc, char** argv, int& exit_code);

}  // namespace order_pipeline
