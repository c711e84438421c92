// The order pipeline: pop's flagship example. Orders run as workflow instances (place, request
// payment, wait for the payment service, confirm or cancel with compensation); a simulated payment
// service consumes payment.requested from the relay and answers through the inbox, with declines,
// latency, duplicates and reordering. Journaled by default: kill it and start it again on the same
// journal and it finishes the same orders. Checks its invariants at the end; exits 1 if one fails.
// With --broker, the payment service is another process (payments_service, its own engine and
// journal) and the two talk only through NATS JetStream: payment.requested goes out through a
// nats_sink, the answers come back through a nats_ingress into the inbox.
#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "order_processes.hpp"
#include "pop/nats/nats_ingress.hpp"
#include "pop/nats/nats_sink.hpp"
#include "pop/relay/dead_letters.hpp"
#include "pop/relay/inbox.hpp"
#include "pop/relay/jsonl_sink.hpp"
#include "pop/relay/relay.hpp"
#include "pop/relay/topic_router.hpp"
#include "pop/workflow/workflow.hpp"
#include "pop/workflow/workflow_runner.hpp"

namespace asio = boost::asio;
using pop::json;

namespace {

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
  std::string workflow_file = POP_ORDER_WORKFLOW_FILE;
  bool progress = true;
  std::string broker{};             // NATS URL: payments run in payments_service, across JetStream
  int payment_timeout_ms = 60'000;  // with a broker: how long an order waits for its payment
};

std::int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string order_id(int i) {
  return "o-" + std::to_string(i);
}

// The stock the run starts with: a few SKUs, deliberately short so some orders are rejected.
json initial_inventory(const settings& s) {
  json inv = json::object();
  for (int i = 0; i < 5; ++i) inv["sku-" + std::to_string(i)] = s.orders / 4 + 3;
  return inv;
}

// The order `i` of a run: deterministic from the seed, so a restart places the same orders.
json order_inputs(const settings& s, int i) {
  std::mt19937_64 rng(s.seed * 1'000'003 + static_cast<std::uint64_t>(i));
  return {{"order", order_id(i)},
          {"sku", "sku-" + std::to_string(rng() % 5)},
          {"qty", 1 + static_cast<int>(rng() % 3)},
          {"amount", 10 + static_cast<int>(rng() % 90)}};
}

// The simulated payment service: answers each payment.requested once (per order, by a
// deterministic decision), after a random latency, sometimes twice, through the inbox.
class payment_service {
 public:
  payment_service(const settings& s, pop::inbox& in, asio::any_io_executor ex)
      : settings_(s), inbox_(in), executor_(std::move(ex)), rng_(s.seed) {}

  // Accepts the request at once and answers later, so the relay is never held up.
  absl::Status on_request(const pop::outbox_message& m) {
    const std::string order = m.payload.at("order");
    std::mt19937_64 decide(settings_.seed ^ std::hash<std::string>{}(order));
    const bool declined =
        std::uniform_real_distribution<double>(0, 1)(decide) < settings_.decline_rate;
    pop::outbox_message reply;
    reply.id = "pay-" + order;  // one answer per order: redeliveries and duplicates share it
    reply.topic = declined ? "payment.declined" : "payment.confirmed";
    reply.key = order;
    reply.payload = {{"order", order}, {"amount", m.payload.value("amount", 0)}};
    reply.created_at_us = now_us();
    const bool twice =
        std::uniform_real_distribution<double>(0, 1)(rng_) < settings_.duplicate_rate;
    for (int copy = 0; copy < (twice ? 2 : 1); ++copy) {
      const auto delay = std::chrono::milliseconds(
          rng_() % static_cast<std::uint64_t>(settings_.max_latency_ms + 1));
      auto timer = std::make_shared<asio::steady_timer>(executor_, delay);
      // Answers arrive after a random latency: out of order with other orders' answers.
      timer->async_wait([this, timer, reply](const boost::system::error_code& ec) {
        if (ec) return;
        const absl::StatusOr<pop::inbox_result> r = inbox_.apply("workflow.resume", reply);
        if (!r.ok()) {
          failures_.fetch_add(1);
        } else if (!r->applied) {
          duplicates_.fetch_add(1);
        }
      });
    }
    requests_.fetch_add(1);
    return absl::OkStatus();
  }

  std::uint64_t duplicates() const { return duplicates_.load(); }
  std::uint64_t requests() const { return requests_.load(); }
  std::uint64_t failures() const { return failures_.load(); }

 private:
  const settings& settings_;
  pop::inbox& inbox_;
  asio::any_io_executor executor_;
  std::mt19937_64 rng_;
  std::atomic<std::uint64_t> duplicates_{0};
  std::atomic<std::uint64_t> requests_{0};
  std::atomic<std::uint64_t> failures_{0};
};

// Counts what the other sinks would deliver (emails, inventory updates, order events) and writes
// them as JSON lines.
class event_sink {
 public:
  explicit event_sink(std::ostream* out) : out_(out) {}
  absl::Status deliver(const pop::outbox_message& m) {
    std::lock_guard lock(mu_);
    if (out_) {
      *out_ << json{{"id", m.id}, {"topic", m.topic}, {"key", m.key}, {"payload", m.payload}}.dump()
            << '\n';
      out_->flush();
    }
    if (m.topic == "email.confirmation") confirmation_ids_[m.key].insert(m.id);
    ++delivered_;
    return absl::OkStatus();
  }
  std::map<std::string, std::set<std::string>> confirmation_ids() const {
    std::lock_guard lock(mu_);
    return confirmation_ids_;
  }

 private:
  mutable std::mutex mu_;
  std::ostream* out_;
  std::map<std::string, std::set<std::string>> confirmation_ids_;
  std::uint64_t delivered_ = 0;
};

// Reads email.confirmation ids per order from an events file written by this and earlier runs.
std::map<std::string, std::set<std::string>> confirmations_in(const std::string& file) {
  std::map<std::string, std::set<std::string>> out;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    const json j = json::parse(line, nullptr, false);
    if (j.is_object() && j.value("topic", "") == "email.confirmation") {
      out[j.value("key", "")].insert(j.value("id", ""));
    }
  }
  return out;
}

struct tally {
  int confirmed = 0, cancelled = 0, rejected = 0, other = 0;
  int final_instances = 0;
  std::vector<double> latencies_ms;
};

tally count(const pop::engine& e, pop::workflows& wf, const settings& s) {
  tally t;
  const pop::snapshot snap = e.snapshot();
  for (int i = 1; i <= s.orders; ++i) {
    const pop::value_view order =
        snap.view(pop::path::parse("domain.orders." + order_id(i)).value());
    const std::string status =
        order && order.member("status") ? order.member("status").get<std::string>() : "";
    if (status == "confirmed")
      ++t.confirmed;
    else if (status == "cancelled")
      ++t.cancelled;
    else if (status == "rejected")
      ++t.rejected;
    else
      ++t.other;
    const absl::StatusOr<pop::workflow_instance> w = wf.inspect(order_id(i));
    if (w.ok() &&
        (w->status == "completed" || w->status == "compensated" || w->status == "failed")) {
      ++t.final_instances;
      const std::int64_t started = w->raw.value("started_at_us", std::int64_t{0});
      const std::int64_t ended =
          w->history.empty() ? started : w->history.back().value("at_us", started);
      t.latencies_ms.push_back(static_cast<double>(ended - started) / 1000.0);
    }
  }
  return t;
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(q * static_cast<double>(v.size())))];
}

}  // namespace

int main(int argc, char** argv) {
  settings s;
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
  CLI11_PARSE(app, argc, argv);
  s.progress = !quiet;

  pop::options o;
  o.initial_state = {{"domain", {{"inventory", initial_inventory(s)}, {"orders", json::object()}}}};
  if (!s.in_memory) o.journal = s.journal;
  absl::StatusOr<std::unique_ptr<pop::engine>> opened = pop::engine::open(o);
  if (!opened.ok()) {
    std::cerr << "order_pipeline: " << opened.status() << "\n";
    return 2;
  }
  pop::engine& e = **opened;
  const json stock_at_start = e.snapshot().read("domain.inventory").value();

  auto wf_made = pop::workflows::create(e);

  if (!wf_made.ok()) {
    std::cerr << "order_pipeline: " << wf_made.status() << "\n";

    return 2;
  }

  pop::workflows& wf = **wf_made;
  for (const order_pipeline::order_process& p : order_pipeline::processes()) {
    if (absl::Status st = wf.register_process(p.spec, p.fn); !st.ok()) {
      std::cerr << "order_pipeline: " << st << "\n";
      return 2;
    }
  }
  absl::Status defined;
  if (s.broker.empty()) {
    defined = wf.define_from_file(s.workflow_file);
  } else {
    // Across processes the payment service may be restarting (its consumer first waits out the
    // redelivery of what it had fetched): give it longer before an order counts as declined.
    std::ifstream in(s.workflow_file);
    json def = json::parse(in, nullptr, false);
    if (def.is_object() && def.contains("steps") && def["steps"].contains("await_payment")) {
      def["steps"]["await_payment"]["timeout_ms"] = s.payment_timeout_ms;
    }
    absl::StatusOr<pop::workflow_definition> d = pop::workflow_definition::from_json(def);
    defined = d.ok() ? wf.define(*std::move(d)) : d.status();
  }
  if (!defined.ok()) {
    std::cerr << "order_pipeline: " << defined << "\n";
    return 2;
  }
  auto payments_inbox_made =
      pop::inbox::create(e, {.path = "system.inbox.payments", .retention = 1'000'000});
  if (!payments_inbox_made.ok()) {
    std::cerr << "order_pipeline: " << payments_inbox_made.status() << "\n";
    return 2;
  }
  pop::inbox& payments_inbox = **payments_inbox_made;
  if (absl::Status st = pop::register_workflow_resume(payments_inbox, wf); !st.ok()) {
    std::cerr << "order_pipeline: " << st << "\n";
    return 2;
  }

  std::ofstream events_file;
  std::ostream* events_out = nullptr;
  if (s.sink == "-") {
    events_out = &std::cout;
  } else if (s.sink != "none") {
    // A new journal starts a new run: its events file starts empty too.
    events_file.open(s.sink, e.version() == 0 ? std::ios::trunc : std::ios::app);
    if (!events_file) {
      std::cerr << "order_pipeline: cannot open the sink file '" << s.sink << "'\n";
      return 2;
    }
    events_out = &events_file;
  }
  event_sink events(events_out);
  asio::io_context io;
  payment_service payments(s, payments_inbox, io.get_executor());
  pop::topic_router router(pop::unknown_topic::dead_letter);
  for (const char* topic : {"order.*", "email.*", "inventory.*"}) {
    if (!router.on(topic, [&](const pop::outbox_message& m) { return events.deliver(m); }).ok())
      return 2;
  }
  // Across machines: payment requests leave through JetStream, the answers come back through it.
  std::unique_ptr<pop::nats_connection> nats;
  std::unique_ptr<pop::nats_sink> to_payments;
  std::unique_ptr<pop::nats_ingress> from_payments;
  if (!s.broker.empty()) {
    pop::nats_connection_options co;
    co.servers = {s.broker};
    co.name = "order_pipeline";
    auto c = pop::nats_connection::connect(co);
    if (!c.ok()) {
      std::cerr << "order_pipeline: " << c.status() << "\n";
      return 2;
    }
    nats = *std::move(c);
    for (const auto& [name, subjects] :
         {std::pair{"ORDERS", "orders.>"}, {"PAYMENTS", "payments.>"}}) {
      if (auto st = pop::ensure_stream(*nats, {.name = name, .subjects = {subjects}}); !st.ok()) {
        std::cerr << "order_pipeline: " << st.status() << "\n";
        return 2;
      }
    }
    auto sink = pop::nats_sink::create(*nats, {.source = "orders", .subject_prefix = "orders."});
    auto ingress = pop::nats_ingress::create(e, payments_inbox, *nats,
                                             {.stream = "PAYMENTS",
                                              .durable = "orders",
                                              .handler = wf.resume_spec().name,
                                              .ack_wait = std::chrono::milliseconds(2'000)});
    if (!sink.ok() || !ingress.ok()) {
      std::cerr << "order_pipeline: " << (sink.ok() ? ingress.status() : sink.status()) << "\n";
      return 2;
    }
    to_payments = *std::move(sink);
    from_payments = *std::move(ingress);
    if (!router
             .on("payment.requested",
                 [&](const pop::outbox_message& m) { return to_payments->publish(m); })
             .ok() ||
        !from_payments->start().ok()) {
      return 2;
    }
  } else if (!router
                  .on("payment.requested",
                      [&](const pop::outbox_message& m) { return payments.on_request(m); })
                  .ok()) {
    return 2;
  }

  auto relay_made = pop::relay::create(e, router, {.publish_timeout = std::chrono::seconds(5)});

  if (!relay_made.ok()) {
    std::cerr << "order_pipeline: " << relay_made.status() << "\n";

    return 2;
  }

  pop::relay& relay = **relay_made;
  pop::workflow_runner runner(e, wf);
  asio::cancellation_signal stop_relay;
  asio::cancellation_signal stop_runner;
  absl::Status relay_status;
  absl::Status runner_status;
  bool relay_ended = false;
  bool runner_ended = false;
  asio::co_spawn(
      io, relay.run(),
      asio::bind_cancellation_slot(stop_relay.slot(), [&](std::exception_ptr, absl::Status st) {
        relay_status = st;
        relay_ended = true;
      }));
  asio::co_spawn(
      io, runner.run(),
      asio::bind_cancellation_slot(stop_runner.slot(), [&](std::exception_ptr, absl::Status st) {
        runner_status = st;
        runner_ended = true;
      }));

  const auto started = std::chrono::steady_clock::now();
  int next_order = 1;
  std::atomic<bool> finished{false};
  // The driver: starts orders (skipping those a previous run started) keeping `concurrency` in
  // flight, draws the progress bar, and stops the relay and runner once every order is final.
  asio::steady_timer tick(io);
  std::function<void()> drive = [&] {
    // Reads only each instance's status: no record is materialised.
    int in_flight = 0;
    int final_instances = 0;
    e.snapshot()
        .view(pop::path::parse(wf.options().instances).value())
        .for_each_member([&](std::string_view, const pop::value_view& w) {
          const pop::value_view st = w.member("status");
          const std::string status = st ? st.get<std::string>() : "";
          if (status == "completed" || status == "compensated" || status == "failed") {
            ++final_instances;
          } else {
            ++in_flight;
          }
          return true;
        });
    while (next_order <= s.orders && in_flight < s.concurrency) {
      const std::string id = order_id(next_order);
      if (!wf.inspect(id).ok()) {
        const absl::StatusOr<std::uint64_t> v = wf.start("order", id, order_inputs(s, next_order));
        if (!v.ok() && v.status().code() != absl::StatusCode::kAlreadyExists) {
          std::cerr << "\norder_pipeline: starting " << id << ": " << v.status() << "\n";
        } else {
          ++in_flight;
        }
      }
      ++next_order;
    }
    if (s.progress) {
      const int width = 40;
      const int filled = width * final_instances / s.orders;
      std::fprintf(stderr, "\r[%s%s] %d/%d orders final",
                   std::string(static_cast<std::size_t>(filled), '#').c_str(),
                   std::string(static_cast<std::size_t>(width - filled), ' ').c_str(),
                   final_instances, s.orders);
    }
    if (relay_ended || runner_ended) {
      // One of them stopped by itself: an error. Stop the other and report it below.
      std::cerr << "\norder_pipeline: " << (relay_ended ? "the relay" : "the workflow runner")
                << " stopped: " << (relay_ended ? relay_status : runner_status) << "\n";
      stop_relay.emit(asio::cancellation_type::terminal);
      stop_runner.emit(asio::cancellation_type::terminal);
      return;
    }
    const bool relay_idle = e.snapshot().pending_count() == 0;
    if (final_instances == s.orders && next_order > s.orders && relay_idle) {
      finished = true;
      stop_relay.emit(asio::cancellation_type::terminal);
      stop_runner.emit(asio::cancellation_type::terminal);
      return;
    }
    tick.expires_after(std::chrono::milliseconds(20));
    tick.async_wait([&](const boost::system::error_code& ec) {
      if (!ec) drive();
    });
  };
  asio::post(io, drive);
  io.run();
  absl::Status ingress_status;
  if (from_payments) ingress_status = from_payments->stop();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (s.progress) std::fprintf(stderr, "\n");

  // The summary.
  const tally t = count(e, wf, s);
  const pop::relay_metrics m = relay.metrics();
  const std::size_t dead = pop::dead_letters::create(e).value()->count();
  fmt::print("\n{:<32}{:>12}\n", "order pipeline", s.in_memory ? "in memory" : s.journal);
  fmt::print("{:-<44}\n", "");
  fmt::print("{:<32}{:>12}\n", "orders", s.orders);
  fmt::print("{:<32}{:>12}\n", "  confirmed", t.confirmed);
  fmt::print("{:<32}{:>12}\n", "  cancelled (payment declined)", t.cancelled);
  fmt::print("{:<32}{:>12}\n", "  rejected (out of stock)", t.rejected);
  fmt::print("{:<32}{:>12}\n", "messages relayed (this run)", m.delivered);
  if (from_payments) {
    const pop::nats_ingress_stats is = from_payments->stats();
    fmt::print("{:<32}{:>12}\n", "payment requests via JetStream", to_payments->stats().acked);
    fmt::print("{:<32}{:>12}\n", "payment answers applied", is.applied);
    fmt::print("{:<32}{:>12}\n", "duplicates absorbed (inbox)", is.duplicates);
  } else {
    fmt::print("{:<32}{:>12}\n", "payment requests served", payments.requests());
    fmt::print("{:<32}{:>12}\n", "duplicates absorbed (inbox)", payments.duplicates());
  }
  fmt::print("{:<32}{:>12}\n", "dead letters", dead);
  fmt::print("{:<32}{:>12}\n", "workflow steps (this run)", runner.steps());
  fmt::print("{:<32}{:>12.0f}\n", "throughput, orders/s", s.orders / std::max(seconds, 1e-9));
  fmt::print("{:<32}{:>12.1f}\n", "order latency p50, ms", percentile(t.latencies_ms, 0.50));
  fmt::print("{:<32}{:>12.1f}\n", "order latency p99, ms", percentile(t.latencies_ms, 0.99));
  fmt::print("{:<32}{:>12}\n", "state version", e.version());

  // The invariants.
  bool ok = true;
  const auto check = [&](bool holds, const std::string& what) {
    fmt::print("{:<44}{}\n", what, holds ? "ok" : "FAILED");
    ok = ok && holds;
  };
  fmt::print("{:-<44}\n", "");
  const json stock = e.snapshot().read("domain.inventory").value();
  bool never_negative = true;
  long total_now = 0;
  for (const auto& [sku, qty] : stock.items()) {
    never_negative = never_negative && qty.get<long>() >= 0;
    total_now += qty.get<long>();
  }
  long total_start = 0;  // the stock of version 0: a restart on the journal counts from there too
  const json initial = initial_inventory(s);
  for (const auto& [sku, qty] : initial.items()) total_start += qty.get<long>();
  long confirmed_qty = 0;
  const json orders = e.snapshot().read("domain.orders").value();
  for (const auto& [id, order] : orders.items()) {
    if (order.value("status", "") == "confirmed") confirmed_qty += order.value("qty", 0L);
  }
  check(never_negative, "stock never negative");
  check(total_start == total_now + confirmed_qty, "stock conserved");
  check(t.final_instances == s.orders && t.other == 0, "every order in a final state");
  std::optional<std::map<std::string, std::set<std::string>>> confirmations;
  if (events_out == &events_file) {
    events_file.flush();
    confirmations = confirmations_in(s.sink);  // this run's and earlier runs' deliveries
  } else if (s.in_memory) {
    confirmations = events.confirmation_ids();
  }
  if (confirmations) {
    bool one_email = true;
    for (const auto& [id, order] : orders.items()) {
      const auto it = confirmations->find(id);
      const std::size_t emails = it == confirmations->end() ? 0 : it->second.size();
      one_email = one_email && emails == (order.value("status", "") == "confirmed" ? 1u : 0u);
    }
    check(one_email, "one confirmation email per confirmed order");
  } else {
    fmt::print("{:<44}{}\n", "one confirmation email per confirmed order", "not kept");
  }
  check(relay_status.code() == absl::StatusCode::kCancelled &&
            runner_status.code() == absl::StatusCode::kCancelled,
        "relay and runner stopped cleanly");
  check(finished.load(), "the run finished");
  if (from_payments) {
    check(ingress_status.ok() && from_payments->stats().dead_lettered == 0,
          "every payment answer applied");
  }
  return ok ? 0 : 1;
}
