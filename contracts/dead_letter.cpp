#include "pop/contracts/dead_letter.hpp"

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"

namespace pop {

absl::StatusOr<dead_letter> dead_letter::from_json(std::string_view id, const json& j) {
  dead_letter d;
  if (!j.is_object() || !j.contains("message")) {
    return absl::InvalidArgumentError("a dead letter must be an object with a 'message' field");
  }
  if (const auto m = j.find("malformed"); m != j.end() && m->is_boolean() && m->get<bool>()) {
    d.malformed = true;
    d.raw = j.at("message");
    d.message.id = std::string(id);
  } else {
    POP_ASSIGN_OR_RETURN(d.message, outbox_message::from_json(j.at("message")));
  }
  if (const auto it = j.find("dead_at_us"); it != j.end()) {
    if (!it->is_number_integer()) {
      return absl::InvalidArgumentError("dead letter field 'dead_at_us' is not an integer");
    }
    d.dead_at_us = it->get<std::int64_t>();
  }
  if (const auto it = j.find("reason"); it != j.end()) {
    if (!it->is_string()) {
      return absl::InvalidArgumentError("dead letter field 'reason' is not a string");
    }
    d.reason = it->get<std::string>();
  }
  return d;
}

json dead_letter::to_json() const {
  if (malformed) {
    return json{
        {"message", raw}, {"malformed", true}, {"dead_at_us", dead_at_us}, {"reason", reason}};
  }
  return json{{"message", message.to_json()}, {"dead_at_us", dead_at_us}, {"reason", reason}};
}

}  // namespace pop
