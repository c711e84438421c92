// Defines the conversions from libnats outcomes to absl::Status shared by the NATS adapters.
#pragma once

#include <nats/nats.h>

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace pop::detail {

// `what` failed with libnats status `s` (and JetStream error `js_err`, if any): kUnavailable for
// connection and timeout problems, kNotFound for missing streams and consumers, kInvalidArgument
// for bad arguments, kFailedPrecondition for other refusals. The message carries libnats' text.
absl::Status from_nats(natsStatus s, std::string_view what,
                       jsErrCode js_err = static_cast<jsErrCode>(0));

// True if `name` is a valid stream or consumer name: 1-255 letters, digits, '-' or '_'.
bool valid_nats_name(std::string_view name);

// The headers pop writes on every message it publishes, and reads back on ingress.
inline constexpr const char* header_msg_id = "Nats-Msg-Id";
inline constexpr const char* header_id = "Pop-Id";
inline constexpr const char* header_source = "Pop-Source";
inline constexpr const char* header_topic = "Pop-Topic";
inline constexpr const char* header_key = "Pop-Key";
inline constexpr const char* header_version = "Pop-Version";
inline constexpr const char* header_created = "Pop-Created-At-Us";

}  // namespace pop::detail
