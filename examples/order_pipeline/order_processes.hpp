// Defines the order pipeline's processes: pure functions of a snapshot, registered as workflow
// steps. Each is unit-tested with pop::dry_run against a fixture, with nothing mocked.
#pragma once

#include <vector>

#include "pop/engine/engine.hpp"

namespace order_pipeline {

struct order_process {
  pop::process_spec spec;
  pop::process_fn fn;
};

// place_order: reserves stock for {order, sku, qty, amount} and records the order "placed",
//   emitting order.placed; kFailedPrecondition "out of stock" (nothing written) if it lacks.
// reject_order: records the order "rejected" (emits order.rejected); touches no stock.
// request_payment: marks it "awaiting_payment" and emits payment.requested {order, amount}.
// confirm_order: marks it "confirmed", emits email.confirmation and inventory.updated.
// release_stock: the compensation of place_order: returns the stock, marks it "cancelled", emits
//   email.cancelled and inventory.updated.
// Every message is keyed by the order id, so an order's messages are published in order.
std::vector<order_process> processes();

}  // namespace order_pipeline
