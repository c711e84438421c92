// Defines the event sink of the pipeline (what email, inventory and order-event consumers would
// get, written as JSON lines) and the reading of an events file back.
#pragma once

#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <ostream>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "pop/contracts/json.hpp"
#include "pop/contracts/outbox_message.hpp"

namespace order_pipeline {

using pop::json;

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

// Cuts the events file back to its last whole line. A run killed while it wrote a line can leave
// it half written (a write is copied page by page and given up once the kill is pending); the next
// run would append its first line to it, and the two would read as one bad line, losing an event.
// The torn event was never acknowledged to the relay: it is delivered again.
inline void drop_torn_line(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return;
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::size_t end = text.rfind('\n');
  const std::size_t whole = end == std::string::npos ? 0 : end + 1;
  std::error_code ignored;  // (if it cannot be cut, the reader skips the bad line as before)
  if (whole != text.size()) std::filesystem::resize_file(file, whole, ignored);
}

// Reads email.confirmation ids per order from an events file written by this and earlier runs.
inline std::map<std::string, std::set<std::string>> confirmations_in(const std::string& file) {
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

}  // namespace order_pipeline
