// Unit tests of the order pipeline's processes (each runs with pop::dry_run against a fixture
// state; no engine runs and nothing is mocked) and of its events file.
#include <catch2/catch.hpp>

#include <filesystem>

#include "events.hpp"
#include "order_processes.hpp"
#include "pop/engine/dry_run.hpp"
#include "tests/support/temp_dir.hpp"

using pop::json;

namespace {

const order_pipeline::order_process& find(const std::string& name) {
  static const std::vector<order_pipeline::order_process> all = order_pipeline::processes();
  for (const auto& p : all) {
    if (p.spec.name == name) return p;
  }
  throw std::runtime_error("no process " + name);
}

absl::StatusOr<pop::dry_run_result> run(const std::string& name, const json& fixture,
                                        const json& args) {
  const auto& p = find(name);
  return pop::dry_run(p.spec, p.fn, fixture, args);
}

const json shop = {
    {"domain",
     {{"inventory", {{"A", 5}, {"B", 1}}},
      {"orders", {{"o-2", {{"sku", "A"}, {"qty", 2}, {"amount", 30}, {"status", "placed"}}}}}}}};

}  // namespace

TEST_CASE("place_order reserves stock, records the order and emits order.placed", "[example]") {
  const pop::dry_run_result r =
      run("place_order", shop, {{"order", "o-1"}, {"sku", "A"}, {"qty", 2}, {"amount", 40}})
          .value();
  CHECK(r.state.at("domain").at("inventory").at("A") == 3);
  CHECK(r.state.at("domain").at("inventory").at("B") == 1);
  CHECK(r.state.at("domain").at("orders").at("o-1").at("status") == "placed");
  REQUIRE(r.messages.size() == 1);
  CHECK(r.messages[0].topic == "order.placed");
  CHECK(r.messages[0].key == "o-1");
}

TEST_CASE("place_order refuses an out-of-stock order and writes nothing", "[example]") {
  const auto r = run("place_order", shop, {{"order", "o-1"}, {"sku", "B"}, {"qty", 2}});
  CHECK(r.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(r.status().message()).find("out of stock") != std::string::npos);
  CHECK(run("place_order", shop, {{"order", "o-1"}, {"sku", "A"}, {"qty", 0}}).status().code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE("reject_order records the rejection without touching stock", "[example]") {
  const pop::dry_run_result r =
      run("reject_order", shop, {{"order", "o-9"}, {"sku", "B"}, {"qty", 2}}).value();
  CHECK(r.state.at("domain").at("inventory") == shop.at("domain").at("inventory"));
  CHECK(r.state.at("domain").at("orders").at("o-9").at("status") == "rejected");
  REQUIRE(r.messages.size() == 1);
  CHECK(r.messages[0].topic == "order.rejected");
}

TEST_CASE("request_payment asks for the order's amount", "[example]") {
  const pop::dry_run_result r = run("request_payment", shop, {{"order", "o-2"}}).value();
  CHECK(r.state.at("domain").at("orders").at("o-2").at("status") == "awaiting_payment");
  REQUIRE(r.messages.size() == 1);
  CHECK(r.messages[0].topic == "payment.requested");
  CHECK(r.messages[0].payload == json{{"order", "o-2"}, {"amount", 30}});
  CHECK(r.messages[0].key == "o-2");
}

TEST_CASE("confirm_order confirms and emits the confirmation email and inventory update",
          "[example]") {
  const pop::dry_run_result r = run("confirm_order", shop, {{"order", "o-2"}}).value();
  CHECK(r.state.at("domain").at("orders").at("o-2").at("status") == "confirmed");
  REQUIRE(r.messages.size() == 2);
  CHECK(r.messages[0].topic == "email.confirmation");
  CHECK(r.messages[1].topic == "inventory.updated");
  CHECK(r.reads == std::vector<std::string>{"domain.orders.o-2"});
}

TEST_CASE("release_stock returns the stock and cancels the order", "[example]") {
  const pop::dry_run_result r = run("release_stock", shop, {{"order", "o-2"}}).value();
  CHECK(r.state.at("domain").at("inventory").at("A") == 7);
  CHECK(r.state.at("domain").at("orders").at("o-2").at("status") == "cancelled");
  REQUIRE(r.messages.size() == 2);
  CHECK(r.messages[0].topic == "email.cancelled");
  CHECK(run("release_stock", shop, {{"order", "o-404"}}).status().code() ==
        absl::StatusCode::kNotFound);
}

TEST_CASE("a line of the events file torn by a kill is cut before the next run appends",
          "[example]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("events.jsonl");
  const std::string whole =
      R"({"id":"00000000000000000007-000000","topic":"email.confirmation","key":"o-1"})"
      "\n";
  const std::string next =
      R"({"id":"00000000000000000012-000000","topic":"email.confirmation","key":"o-2"})"
      "\n";
  pop::test::write_bytes(file, whole + R"({"id":"00000000000000000009-0000)");
  order_pipeline::drop_torn_line(file);
  CHECK(pop::test::file_bytes(file) == whole);
  // The next run's first line is read as its own event, not as the tail of the torn one.
  pop::test::write_bytes(file, pop::test::file_bytes(file) + next);
  const auto confirmed = order_pipeline::confirmations_in(file);
  CHECK(confirmed.size() == 2);
  CHECK(confirmed.count("o-2") == 1);
  // Whole lines are kept; a file that is one torn line is emptied; no file stays none.
  order_pipeline::drop_torn_line(file);
  CHECK(pop::test::file_bytes(file) == whole + next);
  pop::test::write_bytes(file, R"({"id":)");
  order_pipeline::drop_torn_line(file);
  CHECK(std::filesystem::file_size(file) == 0);
  order_pipeline::drop_torn_line(dir.file("none.jsonl"));
  CHECK_FALSE(std::filesystem::exists(dir.file("none.jsonl")));
}
