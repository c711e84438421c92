#include "pop/nats/detail/nats_codec.hpp"

#include <cstdlib>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "pop/contracts/path.hpp"
#include "pop/contracts/status.hpp"
#include "pop/nats/detail/nats_status.hpp"

namespace pop::detail {

std::string header(natsMsg* msg, const char* name) {
  const char* v = nullptr;
  if (natsMsgHeader_Get(msg, name, &v) != NATS_OK || v == nullptr) return {};
  return v;
}

bool valid_utf8(std::string_view s) {
  return check_utf8(s, "").ok();
}

std::string printable(std::string_view s) {
  if (valid_utf8(s)) return std::string(s);
  return absl::CHexEscape(to_absl(s));
}

absl::StatusOr<outbox_message> decode_ingress_message(natsMsg* msg, const std::string& stream,
                                                      std::uint64_t seq) {
  outbox_message m;
  const std::string source = header(msg, header_source);
  const std::string id = header(msg, header_id);
  const std::string dedup = header(msg, header_msg_id);
  if (!source.empty() && !id.empty()) {
    m.id = absl::StrCat(source, "-", id);
  } else if (!dedup.empty()) {
    m.id = dedup;
  } else {
    m.id = absl::StrCat(stream, "-", seq);
  }
  for (const char* h : {header_topic, header_key}) {
    if (!valid_utf8(header(msg, h))) {
      return absl::InvalidArgumentError(absl::StrCat("header ", h, " is not UTF-8"));
    }
  }
  if (absl::Status st = validate_segment(m.id); !st.ok()) {
    return annotate(st, absl::StrCat("message id '", m.id, "' cannot be an inbox mark"));
  }
  m.topic = header(msg, header_topic);
  if (m.topic.empty()) m.topic = natsMsg_GetSubject(msg);
  m.key = header(msg, header_key);
  if (const std::string v = header(msg, header_version); !v.empty()) {
    if (!absl::SimpleAtoi(v, &m.version)) {
      return absl::InvalidArgumentError(
          absl::StrCat("header Pop-Version '", v, "' is not a number"));
    }
  }
  if (const std::string v = header(msg, header_created); !v.empty()) {
    if (!absl::SimpleAtoi(v, &m.created_at_us)) {
      return absl::InvalidArgumentError(
          absl::StrCat("header Pop-Created-At-Us '", v, "' is not a number"));
    }
  }
  const char** keys = nullptr;
  int count = 0;
  if (natsMsgHeader_Keys(msg, &keys, &count) == NATS_OK) {
    for (int i = 0; i < count; ++i) {
      const std::string_view k = keys[i];
      if (absl::StartsWithIgnoreCase(to_absl(k), "nats-") ||
          absl::StartsWithIgnoreCase(to_absl(k), "pop-")) {
        continue;
      }
      std::string value = header(msg, keys[i]);
      if (!valid_utf8(k) || !valid_utf8(value)) {
        free(static_cast<void*>(keys));
        return absl::InvalidArgumentError(absl::StrCat("header '", printable(k), "' is not UTF-8"));
      }
      m.headers.emplace(std::string(k), std::move(value));
    }
    free(static_cast<void*>(keys));
  }
  const char* data = natsMsg_GetData(msg);
  const int len = natsMsg_GetDataLength(msg);
  if (len == 0) {
    m.payload = nullptr;
  } else {
    m.payload = json::parse(data, data + len, nullptr, false);
    if (m.payload.is_discarded()) {
      return absl::InvalidArgumentError("the payload is not JSON text");
    }
  }
  return m;
}

}  // namespace pop::detail
