#include "pop/relay/sink.hpp"

#include <utility>

namespace pop {
namespace {
constexpr char permanent_payload_url[] = "type.pop.dev/permanent_failure";
constexpr char unavailable_payload_url[] = "type.pop.dev/destination_unavailable";
}  // namespace

absl::Status permanent_failure(absl::Status status) {
  if (!status.ok()) status.SetPayload(permanent_payload_url, absl::Cord("1"));
  return status;
}

bool is_permanent_failure(const absl::Status& status) {
  return !status.ok() && status.GetPayload(permanent_payload_url).has_value();
}

absl::Status destination_unavailable(absl::Status status) {
  if (!status.ok()) status.SetPayload(unavailable_payload_url, absl::Cord("1"));
  return status;
}

bool is_destination_unavailable(const absl::Status& status) {
  return !status.ok() && status.GetPayload(unavailable_payload_url).has_value();
}

}  // namespace pop
