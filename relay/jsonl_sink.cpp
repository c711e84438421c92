#include "pop/relay/jsonl_sink.hpp"

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace pop {

absl::StatusOr<std::unique_ptr<jsonl_sink>> jsonl_sink::open(const std::string& file_path) {
  auto file = std::make_unique<std::ofstream>(file_path, std::ios::app);
  if (!*file) {
    return absl::UnavailableError(absl::StrCat("jsonl_sink: cannot open '", file_path,
                                               "' for appending: ", std::strerror(errno)));
  }
  std::unique_ptr<jsonl_sink> s(new jsonl_sink());
  s->out_ = file.get();
  s->file_ = std::move(file);
  s->where_ = absl::StrCat("'", file_path, "'");
  return s;
}

std::optional<absl::Status> jsonl_sink::publish_now(const outbox_message& m) {
  const json line = {{"id", m.id},
                     {"topic", m.topic},
                     {"key", m.key},
                     {"version", m.version},
                     {"created_at_us", m.created_at_us},
                     {"headers", m.headers},
                     {"payload", m.payload}};
  *out_ << line.dump() << '\n';
  out_->flush();
  if (!*out_) {
    out_->clear();
    return absl::UnavailableError(
        absl::StrCat("jsonl_sink: writing message ", m.id, " to ", where_, " failed"));
  }
  ++written_;
  return absl::OkStatus();
}

boost::asio::awaitable<absl::Status> jsonl_sink::publish(const outbox_message& m) {
  co_return *publish_now(m);
}

}  // namespace pop
