// Defines must(): the value of a StatusOr a test needs, failing the test with its status if not OK.
#pragma once

#include <utility>

#include <catch2/catch.hpp>

#include "absl/status/statusor.h"

namespace pop::test {

// Returns what `made` holds; fails the current test, printing the status, if it holds an error.
template <class T>
T must(absl::StatusOr<T> made) {
  INFO(made.status().ToString());
  REQUIRE(made.ok());
  return *std::move(made);
}

}  // namespace pop::test
