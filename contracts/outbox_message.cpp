#include "pop/contracts/outbox_message.hpp"

#include <charconv>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"

namespace pop {

std::string make_message_id(std::uint64_t version, std::uint32_t index) {
  std::string id;
  make_message_id(version, index, id);
  return id;
}

void make_message_id(std::uint64_t version, std::uint32_t index, std::string& out) {
  if (index < 1'000'000) {
    // The usual case, written digit by digit (snprintf was a few percent of a small commit).
    out.assign(27, '0');
    for (int i = 19; i >= 0 && version != 0; --i, version /= 10) {
      out[static_cast<std::size_t>(i)] = static_cast<char>('0' + version % 10);
    }
    out[20] = '-';
    for (int i = 26; i >= 21 && index != 0; --i, index /= 10) {
      out[static_cast<std::size_t>(i)] = static_cast<char>('0' + index % 10);
    }
    return;
  }
  char buf[32];
  const int n =
      std::snprintf(buf, sizeof buf, "%020llu-%06u", static_cast<unsigned long long>(version),
                    static_cast<unsigned>(index));
  out.assign(buf, static_cast<std::size_t>(n));
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
  // Built member by member with moves: an initializer list copies every value (measured as
  // half the cost of storing a message).
  json out(json::value_t::object);
  auto& o = out.get_ref<json::object_t&>();
  const auto put = [&o](const char* name, json value) {
    o.emplace_hint(o.end(), name, std::move(value));
  };
  // In key order, so every emplace_hint lands at the end.
  put("attempts", attempts);
  put(outbox_fields::created_at_us, created_at_us);
  put("failures", std::move(failures));
  put("headers", std::move(headers));
  put("id", std::move(id));
  put(outbox_fields::key, std::move(key));
  put("last_error", std::move(last_error));
  put(outbox_fields::next_attempt_at_us, next_attempt_at_us);
  put("payload", std::move(payload));
  put("topic", std::move(topic));
  put("version", version);
  return out;
}

void to_json(json& j, const delivery_failure& f) {
  j = json{{"attempt", f.attempt}, {"at_us", f.at_us}, {"error", f.error}};
}

namespace {

// Reads integer field `name` of `j` into `out`: a JSON integer within the range of Int.
// (nlohmann converts a floating-point number to an integer with a plain cast, which is undefined
// behaviour out of range: found by the stored-message fuzz target.)
template <class Int>
absl::Status read_integer(const json& j, const char* what, const char* name, Int& out) {
  const auto it = j.find(name);
  if (it == j.end()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has no field '", name, "'"));
  }
  const auto bad = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " field '", name, "' must be an integer from ",
                     std::numeric_limits<Int>::min(), " to ", std::numeric_limits<Int>::max()));
  };
  if (it->is_number_unsigned()) {
    const auto u = it->get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(std::numeric_limits<Int>::max())) return bad();
    out = static_cast<Int>(u);
    return absl::OkStatus();
  }
  if (!it->is_number_integer()) return bad();
  const auto s = it->get<std::int64_t>();
  if constexpr (std::is_unsigned_v<Int>) {
    if (s < 0 || static_cast<std::uint64_t>(s) > std::numeric_limits<Int>::max()) return bad();
  } else {
    if (s < std::numeric_limits<Int>::min() || s > std::numeric_limits<Int>::max()) return bad();
  }
  out = static_cast<Int>(s);
  return absl::OkStatus();
}

absl::StatusOr<delivery_failure> read_failure(const json& j) {
  constexpr const char* what = "outbox message failure";
  if (!j.is_object())
    return absl::InvalidArgumentError("an outbox message failure must be an object");
  delivery_failure f;
  POP_RETURN_IF_ERROR(read_integer(j, what, "attempt", f.attempt));
  POP_RETURN_IF_ERROR(read_integer(j, what, "at_us", f.at_us));
  const auto e = j.find("error");
  if (e == j.end() || !e->is_string()) {
    return absl::InvalidArgumentError("outbox message failure field 'error' must be a string");
  }
  f.error = e->get<std::string>();
  return f;
}

}  // namespace

void from_json(const json& j, delivery_failure& f) {
  absl::StatusOr<delivery_failure> parsed = read_failure(j);
  if (!parsed.ok()) throw std::invalid_argument(std::string(parsed.status().message()));
  f = *std::move(parsed);
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
  constexpr const char* what = "outbox message";
  POP_RETURN_IF_ERROR(read_integer(j, what, outbox_fields::created_at_us, m.created_at_us));
  POP_RETURN_IF_ERROR(read_integer(j, what, "version", m.version));
  POP_RETURN_IF_ERROR(read_integer(j, what, "attempts", m.attempts));
  POP_RETURN_IF_ERROR(field("last_error", m.last_error));
  POP_RETURN_IF_ERROR(
      read_integer(j, what, outbox_fields::next_attempt_at_us, m.next_attempt_at_us));
  if (const auto it = j.find("failures"); it != j.end()) {
    if (!it->is_array()) {
      return absl::InvalidArgumentError("outbox message field 'failures' must be a list");
    }
    for (const json& f : *it) {
      POP_ASSIGN_OR_RETURN(delivery_failure one, read_failure(f));
      m.failures.push_back(std::move(one));
    }
  }
  return m;
}

void from_json(const json& j, outbox_message& m) {
  absl::StatusOr<outbox_message> parsed = outbox_message::from_json(j);
  if (!parsed.ok()) throw std::invalid_argument(std::string(parsed.status().message()));
  m = *std::move(parsed);
}

}  // namespace pop
