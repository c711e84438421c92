// Fuzz target: JetStream messages as the ingress receives them. The input is split into a
// subject line, header lines ("Name: value") up to an empty line, and the data; decoding must
// return a message or a status, and a decoded message must be one the engine can store or refuse.
#include <nats/nats.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "pop/contracts/json.hpp"
#include "pop/nats/detail/nats_codec.hpp"

namespace {

std::string_view take_line(std::string_view& rest) {
  const std::size_t end = rest.find('\n');
  const std::string_view line = rest.substr(0, end);
  rest = end == std::string_view::npos ? std::string_view() : rest.substr(end + 1);
  return line;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  return nats_Open(-1) == NATS_OK ? 0 : 1;  // libnats must be initialised before messages exist
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  std::string subject(take_line(rest));
  if (subject.empty()) subject = "orders";
  natsMsg* msg = nullptr;
  std::string body;
  for (std::string_view line = take_line(rest); !line.empty(); line = take_line(rest)) {
    const std::size_t colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    const std::string name(line.substr(0, colon));
    const std::string value(line.substr(colon + 1));
    if (msg == nullptr && natsMsg_Create(&msg, subject.c_str(), nullptr, nullptr, 0) != NATS_OK) {
      return 0;
    }
    static_cast<void>(natsMsgHeader_Add(msg, name.c_str(), value.c_str()));
  }
  body = std::string(rest);
  natsMsg* full = nullptr;
  if (natsMsg_Create(&full, subject.c_str(), nullptr, body.data(), static_cast<int>(body.size())) !=
      NATS_OK) {
    natsMsg_Destroy(msg);
    return 0;
  }
  if (msg != nullptr) {
    const char** keys = nullptr;
    int count = 0;
    if (natsMsgHeader_Keys(msg, &keys, &count) == NATS_OK) {
      for (int i = 0; i < count; ++i) {
        const char* v = nullptr;
        if (natsMsgHeader_Get(msg, keys[i], &v) == NATS_OK && v != nullptr) {
          static_cast<void>(natsMsgHeader_Add(full, keys[i], v));
        }
      }
      free(static_cast<void*>(keys));
    }
    natsMsg_Destroy(msg);
  }
  const absl::StatusOr<pop::outbox_message> m =
      pop::detail::decode_ingress_message(full, "ORDERS", 7);
  if (m.ok() && pop::check_storable(m->payload, "fuzz").ok()) static_cast<void>(m->payload.dump());
  natsMsg_Destroy(full);
  return 0;
}
