// The quickstart: register processes, execute them, read snapshots and the outbox.
// Exits non-zero if anything it shows is not what pop guarantees, so CTest keeps it honest.
#include <cstdlib>
#include <iostream>

#include "pop/engine/dry_run.hpp"
#include "pop/engine/engine.hpp"

namespace {

int failures = 0;
void expect(bool ok, const char* what) {
  std::cout << (ok ? "  ok   " : "  FAIL ") << what << "\n";
  if (!ok) ++failures;
}

// place_order: reserve stock and record the order; the email is a message, not a side effect.
absl::StatusOr<pop::result> place_order(const pop::context& ctx, const pop::json& args) {
  const std::string sku = args.at("sku");
  const int qty = args.at("qty");
  const std::string order = args.at("order");
  const int stock = ctx.get_or<int>("domain.inventory." + sku, 0);
  if (qty <= 0) return absl::InvalidArgumentError("qty must be positive");
  if (stock < qty) return absl::FailedPreconditionError("out of stock for " + sku);
  pop::result r;
  r.set("domain.inventory." + sku, stock - qty);
  r.set("domain.orders." + order, {{"sku", sku}, {"qty", qty}, {"status", "placed"}});
  r.emit("order.placed", {{"order", order}, {"sku", sku}, {"qty", qty}}, order);
  r.emit("email.send", {{"to", args.value("email", "customer@example.com")}, {"order", order}},
         order);
  return r;
}

}  // namespace

int main() {
  absl::StatusOr<std::unique_ptr<pop::engine>> opened = pop::engine::open(
      pop::options{.initial_state = {{"domain", {{"inventory", {{"A1", 5}, {"B2", 1}}}}}}});
  if (!opened.ok()) {
    std::cerr << opened.status() << "\n";
    return 1;
  }
  pop::engine& engine = **opened;
  const pop::process_spec spec{.name = "place_order",
                               .inputs = {"domain.inventory"},
                               .outputs = {"domain.inventory", "domain.orders"},
                               .emits = {"order.placed", "email.send"}};
  if (const absl::Status s = engine.register_process(spec, place_order); !s.ok()) {
    std::cerr << s << "\n";
    return 1;
  }

  std::cout << "pop quickstart\n\n1. execute place_order twice; the second is out of stock\n";
  const pop::snapshot before = engine.snapshot();
  const auto first = engine.execute("place_order", {{"order", "o-1"}, {"sku", "A1"}, {"qty", 2}});
  expect(first.ok() && first->version == 1, "o-1 committed at version 1");
  const auto second = engine.execute("place_order", {{"order", "o-2"}, {"sku", "B2"}, {"qty", 3}});
  expect(second.status().code() == absl::StatusCode::kFailedPrecondition,
         "o-2 refused, nothing committed");
  std::cout << "       " << second.status() << "\n";

  std::cout << "\n2. snapshots are immutable versions\n";
  const pop::snapshot now = engine.snapshot();
  expect(before.version() == 0 && before.read("domain.inventory.A1").value() == 5,
         "the snapshot taken before still shows A1 = 5 at version 0");
  expect(now.read("domain.inventory.A1").value() == 3, "the newest snapshot shows A1 = 3");

  std::cout << "\n3. the outbox is part of the state, committed with the writes\n";
  const auto pending = now.pending_messages().value();
  for (const pop::outbox_message& m : pending) {
    std::cout << "       " << m.id << "  " << m.topic << "  key=" << m.key << "  "
              << m.payload.dump() << "\n";
  }
  expect(pending.size() == 2 && pending[0].topic == "order.placed",
         "two messages pending, in commit order");

  std::cout << "\n4. contracts are enforced\n";
  const auto denied =
      pop::dry_run({.name = "peek", .inputs = {"domain.orders"}, .outputs = {"domain.inventory"}},
                   place_order, now.to_json(), {{"order", "o-3"}, {"sku", "A1"}, {"qty", 1}});
  expect(denied.status().code() == absl::StatusCode::kPermissionDenied,
         "reading undeclared inputs is refused");
  std::cout << "       " << denied.status() << "\n";

  std::cout << "\n5. a relay clears delivered messages by id with compare_and_swap\n";
  std::vector<pop::write> clear;
  for (const pop::outbox_message& m : pending) {
    std::cout << "       deliver " << m.topic << " -> " << m.payload.dump() << "\n";
    clear.push_back({engine.outbox_path().str() + "." + m.id, std::nullopt});
  }
  const auto cleared = engine.compare_and_swap(now.version(), clear, pop::cas_mode::keys);
  expect(cleared.ok() && cleared->committed && engine.snapshot().pending_count() == 0,
         "the outbox is empty after the clear");

  std::cout << "\nfinal state at version " << engine.version() << ":\n"
            << engine.snapshot().to_json().dump(2) << "\n\n"
            << (failures == 0 ? "all checks passed\n" : "SOME CHECKS FAILED\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
