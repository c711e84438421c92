#include "pop/contracts/outbox_message.hpp"

#include <charconv>
#include <cstdio>
#include <stdexcept>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"

namespace pop {

std::string make_message_id(std::uint64_t version, std::uint32_t index) {
  char buf[32];
  const int n =
      std::snprintf(buf, sizeof buf, "%020llu-%06u", static_cast<unsigned long long>(version),
                    static_cast<unsigned>(index));
  return std::string(buf, static_cast<std::size_t>(n));
}

absl::StatusOr<std::pair<std::uint64_t, std::uint32_t>> parse_message_id(std::string_view id) {
  const auto bad = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat("'", detail::to_absl(id), "' is not a message id (20 digits, '-', 6 digits)"));
  };
  if (id.size() != 27 || id[20] != '-') return bad();
  std::uint64_t version = 0;
  std::uint32_t index = 0;
  const char* b = id.data();
  if (auto r = std::from_chars(b, b + 20, version); r.ec != std::errc() || r.ptr != b + 20)
    return bad();
  if (auto r = std::from_chars(b + 21, b + 27, index); r.ec != std::errc() || r.ptr != b + 27)
    return bad();
  return std::pair{version, index};
}

json outbox_message::to_json() const& {
  return outbox_message(*this).to_json();
}

json outbox_message::to_json() && {
  return json{{"id", std::move(id)},
              {"topic", std::move(topic)},
              {outbox_fields::key, std::move(key)},
              {"payload", std::move(payload)},
              {"headers", std::move(headers)},
              {"created_at_us", created_at_us},
              {"version", version},
              {"attempts", attempts},
              {"last_error", std::move(last_error)},
              {outbox_fields::next_attempt_at_us, next_attempt_at_us},
              {"failures", std::move(failures)}};
}

void to_json(json& j, const delivery_failure& f) {
  j = json{{"attempt", f.attempt}, {"at_us", f.at_us}, {"error", f.error}};
}

void from_json(const json& j, delivery_failure& f) {
  j.at("attempt").get_to(f.attempt);
  j.at("at_us").get_to(f.at_us);
  j.at("error").get_to(f.error);
}

absl::StatusOr<outbox_message> outbox_message::from_json(const json& j) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("an outbox message must be a JSON object, not ", j.type_name()));
  }
  outbox_message m;
  const auto field = [&](const char* name, auto& out) -> absl::Status {
    const auto it = j.find(name);
    if (it == j.end()) {
      return absl::InvalidArgumentError(absl::StrCat("outbox message has no field '", name, "'"));
    }
    try {
      it->get_to(out);
    } catch (const json::exception& e) {
      return absl::InvalidArgumentError(
          absl::StrCat("outbox message field '", name, "' has the wrong type: ", e.what()));
    }
    return absl::OkStatus();
  };
  POP_RETURN_IF_ERROR(field("id", m.id));
  POP_RETURN_IF_ERROR(field("topic", m.topic));
  POP_RETURN_IF_ERROR(field(outbox_fields::key, m.key));
  if (const auto it = j.find("payload"); it != j.end()) m.payload = *it;
  POP_RETURN_IF_ERROR(field("headers", m.headers));
  POP_RETURN_IF_ERROR(field("created_at_us", m.created_at_us));
  POP_RETURN_IF_ERROR(field("version", m.version));
  POP_RETURN_IF_ERROR(field("attempts", m.attempts));
  POP_RETURN_IF_ERROR(field("last_error", m.last_error));
  POP_RETURN_IF_ERROR(field(outbox_fields::next_attempt_at_us, m.next_attempt_at_us));
  if (j.contains("failures")) POP_RETURN_IF_ERROR(field("failures", m.failures));
  return m;
}

void from_json(const json& j, outbox_message& m) {
  absl::StatusOr<outbox_message> parsed = outbox_message::from_json(j);
  if (!parsed.ok()) throw std::invalid_argument(std::string(parsed.status().message()));
  m = *std::move(parsed);
}

}  // namespace pop
