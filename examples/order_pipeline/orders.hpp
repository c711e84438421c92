// Defines the orders of a run: their ids, inputs and the stock the run starts with, all
// deterministic from the settings, so a restart places the same orders.
#pragma once

#include <random>
#include <string>

#include "pop/contracts/json.hpp"
#include "settings.hpp"

namespace order_pipeline {

inline std::string order_id(int i) {
  return "o-" + std::to_string(i);
}

// The stock the run starts with: a few SKUs, deliberately short so some orders are rejected.
inline pop::json initial_inventory(const settings& s) {
  pop::json inv = pop::json::object();
  for (int i = 0; i < 5; ++i) inv["sku-" + std::to_string(i)] = s.orders / 4 + 3;
  return inv;
}

// The order `i` of a run.
inline pop::json order_inputs(const settings& s, int i) {
  std::mt19937_64 rng(s.seed * 1'000'003 + static_cast<std::uint64_t>(i));
  return {{"order", order_id(i)},
          {"sku", "sku-" + std::to_string(rng() % 5)},
          {"qty", 1 + static_cast<int>(rng() % 3)},
          {"amount", 10 + static_cast<int>(rng() % 90)}};
}

}  // namespace order_pipeline
