// Defines how a JetStream message becomes an outbox message on ingress (the decoding side of the
// headers nats_sink writes), and the text helpers the ingress uses for what it cannot decode.
#pragma once

#include <nats/nats.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "pop/contracts/outbox_message.hpp"

namespace pop::detail {

// The value of header `name` of `msg`, or "" if it has none.
std::string header(natsMsg* msg, const char* name);
// True if `s` is well-formed UTF-8 (the journal stores JSON, which must be).
bool valid_utf8(std::string_view s);
// `s` as JSON-safe text: itself if UTF-8, else C-escaped.
std::string printable(std::string_view s);

// Returns the message `msg` (sequence `seq` of `stream`) carries as the handler sees it: id from
// Pop-Source and Pop-Id (else Nats-Msg-Id, else "<stream>-<seq>"), topic, key, version, creation
// time and other headers from the Pop-* headers, payload parsed from the data (null if empty).
// kInvalidArgument saying why it cannot be one (headers not UTF-8, an id that is not a path
// segment, numbers that are not numbers, data that is not JSON text). Never throws.
[[nodiscard]] absl::StatusOr<outbox_message> decode_ingress_message(natsMsg* msg,
                                                                    const std::string& stream,
                                                                    std::uint64_t seq);

}  // namespace pop::detail
