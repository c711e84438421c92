// Defines pop::jsonl_sink, a sink writing each message as one JSON line to a stream or file.
#pragma once

#include <cstdint>
#include <fstream>
#include <memory>
#include <ostream>
#include <string>

#include "absl/status/statusor.h"
#include "pop/relay/sink.hpp"

namespace pop {

// A sink that writes each message as one line of JSON (id, topic, key, version, created_at_us,
// headers, payload) and flushes it, for demos and audits: jsonl_sink{std::cout}, or a file.
// A write error is a failed attempt (kUnavailable). Synchronous: runs on the relay's fast path.
class jsonl_sink final : public sink {
 public:
  // Writes to `out`, which must outlive the sink.
  explicit jsonl_sink(std::ostream& out) : out_(&out) {}
  // A sink appending to file `file_path` (created if missing), or kUnavailable naming it.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<jsonl_sink>> open(
      const std::string& file_path);

  boost::asio::awaitable<absl::Status> publish(const outbox_message& m) override;
  std::optional<absl::Status> publish_now(const outbox_message& m) override;

  // Lines written so far.
  std::uint64_t written() const { return written_; }

 private:
  jsonl_sink() = default;
  std::unique_ptr<std::ofstream> file_;
  std::ostream* out_ = nullptr;
  std::string where_ = "the output stream";
  std::uint64_t written_ = 0;
};

}  // namespace pop
