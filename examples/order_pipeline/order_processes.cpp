#include "order_processes.hpp"

#include <string>
#include <utility>

namespace order_pipeline {
namespace {

using pop::json;

std::string order_path(const json& args) {
  return "domain.orders." + args.at("order").get<std::string>();
}

absl::StatusOr<pop::result> place_order(const pop::context& ctx, const json& args) {
  const std::string order = args.at("order");
  const std::string sku = args.at("sku");
  const int qty = args.at("qty");
  if (qty <= 0) return absl::InvalidArgumentError("qty must be positive");
  const std::string stock_path = "domain.inventory." + sku;
  const int stock = ctx.get_or<int>(stock_path, 0);
  if (stock < qty) {
    return absl::FailedPreconditionError("out of stock: " + sku + " has " + std::to_string(stock) +
                                         ", the order wants " + std::to_string(qty));
  }
  pop::result r;
  r.set(stock_path, stock - qty);
  r.set(order_path(args),
        {{"sku", sku}, {"qty", qty}, {"amount", args.value("amount", 0)}, {"status", "placed"}});
  r.emit("order.placed", {{"order", order}, {"sku", sku}, {"qty", qty}}, order);
  return r;
}

// The order's record with its status set to `status`, and a result that writes it back.
std::pair<json, pop::result> with_status(const pop::context& ctx, const json& args,
                                         const char* status) {
  json record = ctx.get(order_path(args));
  record["status"] = status;
  pop::result r;
  r.set(order_path(args), record);
  return {std::move(record), std::move(r)};
}

absl::StatusOr<pop::result> reject_order(const pop::context&, const json& args) {
  const std::string order = args.at("order");
  pop::result r;
  r.set(order_path(args),
        {{"sku", args.at("sku")}, {"qty", args.at("qty")}, {"status", "rejected"}});
  r.emit("order.rejected", {{"order", order}, {"reason", "out of stock"}}, order);
  return r;
}

absl::StatusOr<pop::result> request_payment(const pop::context& ctx, const json& args) {
  const std::string order = args.at("order");
  auto [record, r] = with_status(ctx, args, "awaiting_payment");
  r.emit("payment.requested", {{"order", order}, {"amount", record.value("amount", 0)}}, order);
  return r;
}

absl::StatusOr<pop::result> confirm_order(const pop::context& ctx, const json& args) {
  const std::string order = args.at("order");
  auto [record, r] = with_status(ctx, args, "confirmed");
  r.emit("email.confirmation", {{"order", order}}, order);
  r.emit("inventory.updated", {{"order", order}, {"sku", record.at("sku")}}, order);
  return r;
}

absl::StatusOr<pop::result> release_stock(const pop::context& ctx, const json& args) {
  const std::string order = args.at("order");
  auto [record, r] = with_status(ctx, args, "cancelled");
  const std::string sku = record.at("sku");
  const std::string stock_path = "domain.inventory." + sku;
  r.set(stock_path, ctx.get_or<int>(stock_path, 0) + record.at("qty").get<int>());
  r.emit("email.cancelled", {{"order", order}}, order);
  r.emit("inventory.updated", {{"order", order}, {"sku", sku}}, order);
  return r;
}

}  // namespace

std::vector<order_process> processes() {
  const std::vector<std::string> stock_and_orders = {"domain.inventory", "domain.orders"};
  return {
      {{.name = "place_order",
        .inputs = stock_and_orders,
        .outputs = stock_and_orders,
        .emits = {"order.placed"}},
       place_order},
      {{.name = "reject_order", .outputs = {"domain.orders"}, .emits = {"order.rejected"}},
       reject_order},
      {{.name = "request_payment",
        .inputs = {"domain.orders"},
        .outputs = {"domain.orders"},
        .emits = {"payment.requested"}},
       request_payment},
      {{.name = "confirm_order",
        .inputs = {"domain.orders"},
        .outputs = {"domain.orders"},
        .emits = {"email.confirmation", "inventory.updated"}},
       confirm_order},
      {{.name = "release_stock",
        .inputs = stock_and_orders,
        .outputs = stock_and_orders,
        .emits = {"email.cancelled", "inventory.updated"}},
       release_stock},
  };
}

}  // namespace order_pipeline
