// Defines pop::context, a process's read-only, contract-checked view of one snapshot.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "pop/contracts/json.hpp"
#include "pop/contracts/path.hpp"
#include "pop/contracts/process_error.hpp"
#include "pop/contracts/process_spec.hpp"
#include "pop/engine/snapshot.hpp"
#include "pop/engine/value_view.hpp"

namespace pop {

namespace detail {
struct process_runner;
}

// What a running process sees: the snapshot it runs on, readable only under its declared inputs.
//
// Every read is checked and recorded (including reads of paths that do not exist), so the engine
// validates exactly what the process depended on. A read outside the inputs, a bad path or a
// passed deadline throws pop::process_error; the breach is also remembered, so a process that
// swallows the exception still commits nothing. One context serves one run on one thread.
class context {
 public:
  context(const context&) = delete;
  context& operator=(const context&) = delete;

  // The name of the running process.
  const std::string& process() const { return contract_->name(); }
  // The version of the snapshot the process runs on.
  std::uint64_t version() const { return snapshot_.version(); }

  // The value at `path` converted to T. Throws process_error: kPermissionDenied outside the
  // inputs, kInvalidArgument for a bad path, kNotFound if absent, kFailedPrecondition if the value
  // is not a T. Materialises only that value.
  template <class T = json>
  T get(std::string_view path) const {
    const value_view v = read(path);
    if (!v) fail(missing(path));
    return convert<T>(v, path);
  }
  // The value at `path` converted to T, or nullopt if absent; errors as get().
  template <class T = json>
  std::optional<T> find(std::string_view path) const {
    const value_view v = read(path);
    if (!v) return std::nullopt;
    return convert<T>(v, path);
  }
  // The value at `path` converted to T, or `fallback` if absent; errors as get().
  template <class T>
  T get_or(std::string_view path, T fallback) const {
    const value_view v = read(path);
    if (!v) return fallback;
    return convert<T>(v, path);
  }
  // True if a value exists at `path`; errors as get().
  bool contains(std::string_view path) const { return read(path).exists(); }
  // A view of the value at `path` (absent if missing) for iterating without copying; the whole
  // subtree counts as read. Errors as get().
  value_view view(std::string_view path) const { return read(path); }

  // The paths read so far.
  const path_set& reads() const { return reads_; }

 private:
  friend struct detail::process_runner;
  context(const process_contract& contract, snapshot snap,
          std::optional<std::chrono::steady_clock::time_point> deadline)
      : contract_(&contract), snapshot_(std::move(snap)), deadline_(deadline) {}

  value_view read(std::string_view path) const;
  absl::Status missing(std::string_view path) const;
  absl::Status conversion_error(std::string_view path, const char* what) const;
  [[noreturn]] void fail(absl::Status status) const;

  template <class T>
  T convert(const value_view& v, std::string_view path) const {
    try {
      return v.get<T>();
    } catch (const json::exception& e) {
      fail(conversion_error(path, e.what()));
    }
  }

  const process_contract* contract_;
  snapshot snapshot_;
  std::optional<std::chrono::steady_clock::time_point> deadline_;
  mutable path_set reads_;
  mutable absl::Status failure_;  // the first breach, kept even if the process catches it
};

}  // namespace pop
