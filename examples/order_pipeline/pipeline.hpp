// Defines order_pipeline::pipeline: one run of the order pipeline — the engine, workflows, relay,
// runner and payment service wired together — driven until every order is final, then reported.
#pragma once

#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <ostream>

#include <boost/asio/io_context.hpp>

#include "absl/status/statusor.h"
#include "events.hpp"
#include "pop/nats/nats_ingress.hpp"
#include "pop/nats/nats_sink.hpp"
#include "pop/relay/inbox.hpp"
#include "pop/relay/relay.hpp"
#include "pop/relay/topic_router.hpp"
#include "pop/workflow/workflow.hpp"
#include "pop/workflow/workflow_runner.hpp"
#include "settings.hpp"
#include "simulated_payments.hpp"

namespace order_pipeline {

// How a run ended.
struct run_result {
  bool finished = false;  // every order final and the outbox empty
  absl::Status relay_status;
  absl::Status runner_status;
  absl::Status ingress_status;  // with a broker
  double seconds = 0;
};

// Not copyable; everything it wires lives as long as it does.
class pipeline {
 public:
  // Opens the engine (journal or memory), defines the workflow, wires the relay, runner, inbox
  // and payment service (simulated, or payments_service across NATS with s.broker). Errors name
  // what could not be set up.
  static absl::StatusOr<std::unique_ptr<pipeline>> build(const settings& s);

  // Starts the orders (keeping s.concurrency in flight, skipping those a previous run on the
  // journal started) and runs until every order is final and the outbox is empty, or until the
  // relay or the runner stops by itself. Nothing polls: workflows::wait_for reports each order's
  // end, which starts the next.
  run_result run();

  // Prints the summary and checks the invariants; false if one fails.
  bool report(const run_result& r);

 private:
  explicit pipeline(const settings& s) : s_(s) {}
  absl::Status wire_payments();
  // Starts orders while fewer than s.concurrency are in flight, each watched with
  // workflows::wait_for (an order a previous run on the journal started is watched, not started
  // again). False (and `error_` set) if one cannot be started.
  bool start_orders();
  // Order `id` ended: the next one starts.
  void order_ended(const std::string& id);
  // True once every order is final and the outbox is empty.
  bool done() const;

  settings s_;
  std::unique_ptr<pop::engine> engine_;
  std::unique_ptr<pop::workflows> workflows_;
  std::unique_ptr<pop::inbox> inbox_;
  std::ofstream events_file_;
  std::ostream* events_out_ = nullptr;
  std::unique_ptr<event_sink> events_;
  boost::asio::io_context io_;
  std::unique_ptr<payment_service> payments_;
  pop::topic_router router_{pop::unknown_topic::dead_letter};
  std::unique_ptr<pop::nats_connection> nats_;
  std::unique_ptr<pop::nats_sink> to_payments_;
  std::unique_ptr<pop::nats_ingress> from_payments_;
  std::unique_ptr<pop::relay> relay_;
  std::unique_ptr<pop::workflow_runner> runner_;
  int next_order_ = 1;
  int in_flight_ = 0;
  int final_ = 0;
  std::map<std::string, pop::subscription> waits_;  // the orders in flight
  absl::Status error_;
  std::function<void()> look_;  // run()'s look at the run: starts orders, ends the run when done
};

}  // namespace order_pipeline
