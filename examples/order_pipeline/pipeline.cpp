#include "pipeline.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>

#include "order_processes.hpp"
#include "orders.hpp"
#include "pop/contracts/status.hpp"

namespace order_pipeline {

namespace asio = boost::asio;

absl::StatusOr<std::unique_ptr<pipeline>> pipeline::build(const settings& s) {
  std::unique_ptr<pipeline> p(new pipeline(s));
  pop::options o;
  o.initial_state = {{"domain", {{"inventory", initial_inventory(s)}, {"orders", json::object()}}}};
  if (!s.in_memory) o.journal = s.journal;
  POP_ASSIGN_OR_RETURN(p->engine_, pop::engine::open(std::move(o)));
  POP_ASSIGN_OR_RETURN(p->workflows_, pop::workflows::create(*p->engine_));
  for (const order_process& proc : processes()) {
    POP_RETURN_IF_ERROR(p->workflows_->register_process(proc.spec, proc.fn));
  }
  // Across processes the payment service may be restarting (its consumer first waits out the
  // redelivery of what it had fetched): give it longer before an order counts as declined.
  std::ifstream in(s.workflow_file);
  json def = json::parse(in, nullptr, false);
  if (!def.is_object()) {
    return absl::InvalidArgumentError("workflow file '" + s.workflow_file + "' is not JSON");
  }
  if (!s.broker.empty() && def.contains("steps") && def["steps"].contains("await_payment")) {
    def["steps"]["await_payment"]["timeout_ms"] = s.payment_timeout_ms;
  }
  POP_ASSIGN_OR_RETURN(pop::workflow_definition d, pop::workflow_definition::from_json(def));
  POP_RETURN_IF_ERROR(p->workflows_->define(std::move(d)));
  POP_ASSIGN_OR_RETURN(p->inbox_, pop::inbox::create(*p->engine_, {.path = "system.inbox.payments",
                                                                   .retention = 1'000'000}));
  POP_RETURN_IF_ERROR(pop::register_workflow_resume(*p->inbox_, *p->workflows_));
  if (s.sink == "-") {
    p->events_out_ = &std::cout;
  } else if (s.sink != "none") {
    // A new journal starts a new run: its events file starts empty too.
    if (p->engine_->version() != 0) drop_torn_line(s.sink);
    p->events_file_.open(s.sink, p->engine_->version() == 0 ? std::ios::trunc : std::ios::app);
    if (!p->events_file_) {
      return absl::UnavailableError("cannot open the sink file '" + s.sink + "'");
    }
    p->events_out_ = &p->events_file_;
  }
  p->events_ = std::make_unique<event_sink>(p->events_out_);
  for (const char* topic : {"order.*", "email.*", "inventory.*"}) {
    POP_RETURN_IF_ERROR(p->router_.on(
        topic, [e = p->events_.get()](const pop::outbox_message& m) { return e->deliver(m); }));
  }
  POP_RETURN_IF_ERROR(p->wire_payments());
  POP_ASSIGN_OR_RETURN(p->relay_, pop::relay::create(*p->engine_, p->router_,
                                                     {.publish_timeout = std::chrono::seconds(5)}));
  p->runner_ = std::make_unique<pop::workflow_runner>(*p->engine_, *p->workflows_);
  return p;
}

absl::Status pipeline::wire_payments() {
  if (s_.broker.empty()) {
    payments_ = std::make_unique<payment_service>(s_, *inbox_, io_.get_executor());
    return router_.on("payment.requested",
                      [this](const pop::outbox_message& m) { return payments_->on_request(m); });
  }
  // Across machines: payment requests leave through JetStream, the answers come back through it.
  pop::nats_connection_options co;
  co.servers = {s_.broker};
  co.name = "order_pipeline";
  POP_ASSIGN_OR_RETURN(nats_, pop::nats_connection::connect(co));
  for (const auto& [name, subjects] :
       {std::pair{"ORDERS", "orders.>"}, {"PAYMENTS", "payments.>"}}) {
    POP_RETURN_IF_ERROR(
        pop::ensure_stream(*nats_, {.name = name, .subjects = {subjects}}).status());
  }
  POP_ASSIGN_OR_RETURN(to_payments_, pop::nats_sink::create(*nats_, {.source = "orders",
                                                                     .subject_prefix = "orders."}));
  POP_ASSIGN_OR_RETURN(from_payments_,
                       pop::nats_ingress::create(*engine_, *inbox_, *nats_,
                                                 {.stream = "PAYMENTS",
                                                  .durable = "orders",
                                                  .handler = workflows_->resume_spec().name,
                                                  .ack_wait = std::chrono::milliseconds(2'000)}));
  POP_RETURN_IF_ERROR(router_.on("payment.requested", [this](const pop::outbox_message& m) {
    return to_payments_->publish(m);
  }));
  return from_payments_->start();
}

bool pipeline::start_orders() {
  while (next_order_ <= s_.orders && in_flight_ < s_.concurrency) {
    const std::string id = order_id(next_order_++);
    if (!workflows_->inspect(id).ok()) {
      const absl::StatusOr<std::uint64_t> v =
          workflows_->start("order", id, order_inputs(s_, next_order_ - 1));
      if (!v.ok() && v.status().code() != absl::StatusCode::kAlreadyExists) {
        error_ = pop::annotate(v.status(), "starting " + id);
        return false;
      }
    }
    ++in_flight_;
    // Called once it has ended (at once if it had): handled on the io_context's thread.
    waits_[id] = workflows_->wait_for(id, [this, id](absl::StatusOr<pop::workflow_instance>) {
      asio::post(io_, [this, id] {
        order_ended(id);
        if (look_) look_();
      });
    });
  }
  return true;
}

void pipeline::order_ended(const std::string& id) {
  waits_.erase(id);
  --in_flight_;
  ++final_;
  if (s_.progress) {
    const int width = 40;
    const int filled = width * final_ / s_.orders;
    std::fprintf(stderr, "\r[%s%s] %d/%d orders final",
                 std::string(static_cast<std::size_t>(filled), '#').c_str(),
                 std::string(static_cast<std::size_t>(width - filled), ' ').c_str(), final_,
                 s_.orders);
  }
}

bool pipeline::done() const {
  return final_ == s_.orders && next_order_ > s_.orders && engine_->snapshot().pending_count() == 0;
}

run_result pipeline::run() {
  run_result r;
  asio::cancellation_signal stop_relay;
  asio::cancellation_signal stop_runner;
  bool relay_ended = false;
  bool runner_ended = false;
  bool stopping = false;
  const auto stop_all = [&] {
    stopping = true;
    stop_relay.emit(asio::cancellation_type::terminal);
    stop_runner.emit(asio::cancellation_type::terminal);
  };
  // A look after an order ended, and once per burst of commits (the outbox empties after the
  // last order ended): a commit posts a look unless one is pending. A look reads no instance.
  std::atomic<bool> look_posted{false};
  std::function<void()> look = [&] {
    look_posted = false;
    if (stopping) return;
    if (relay_ended || runner_ended) {
      // One of them stopped by itself: an error. Stop the other and report it.
      std::cerr << "\norder_pipeline: " << (relay_ended ? "the relay" : "the workflow runner")
                << " stopped: " << (relay_ended ? r.relay_status : r.runner_status) << "\n";
      stop_all();
      return;
    }
    if (!start_orders()) {
      std::cerr << "\norder_pipeline: " << error_ << "\n";
      stop_all();
      return;
    }
    if (done()) {
      r.finished = true;
      stop_all();
    }
  };
  const auto post_look = [&] {
    if (!look_posted.exchange(true)) asio::post(io_, look);
  };
  look_ = look;
  const pop::subscription woken = engine_->on_commit([&](std::uint64_t) { post_look(); });
  asio::co_spawn(
      io_, relay_->run(),
      asio::bind_cancellation_slot(stop_relay.slot(), [&](std::exception_ptr, absl::Status st) {
        r.relay_status = st;
        relay_ended = true;
        post_look();
      }));
  asio::co_spawn(
      io_, runner_->run(),
      asio::bind_cancellation_slot(stop_runner.slot(), [&](std::exception_ptr, absl::Status st) {
        r.runner_status = st;
        runner_ended = true;
        post_look();
      }));
  const auto started = std::chrono::steady_clock::now();
  post_look();
  io_.run();
  look_ = nullptr;  // it refers to this call's locals
  if (from_payments_) r.ingress_status = from_payments_->stop();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (s_.progress) std::fprintf(stderr, "\n");
  return r;
}

}  // namespace order_pipeline
