#include "pop/contracts/json.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"

namespace pop {
namespace {

// The offset of the first byte of `text` that is not part of valid UTF-8, or npos.
std::size_t first_bad_utf8(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  // ASCII, the usual text, eight bytes at a time.
  for (std::uint64_t word = 0; i + 8 <= n; i += 8) {
    std::memcpy(&word, s + i, 8);
    if ((word & 0x8080808080808080ULL) != 0) break;
  }
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    std::uint32_t cp = 0;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1Fu;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0Fu;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07u;
    } else {
      return i;  // a continuation byte, an overlong lead (C0, C1) or beyond U+10FFFF (F5..FF)
    }
    if (i + len > n) return i;
    for (std::size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0u) != 0x80u) return i;
      cp = (cp << 6) | (s[i + k] & 0x3Fu);
    }
    const bool overlong = (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
    if (overlong || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) return i;
    i += len;
  }
  return std::string_view::npos;
}

// Appends `token` to a JSON pointer, escaped as RFC 6901 says.
void push_token(std::string& pointer, std::string_view token) {
  pointer += '/';
  for (const char c : token) {
    if (c == '~') {
      pointer += "~0";
    } else if (c == '/') {
      pointer += "~1";
    } else {
      pointer += c;
    }
  }
}

// Walks a value depth-first; on the first fault records what is wrong and, while unwinding,
// the way down to it, so a good value costs no allocation.
struct checker {
  std::string problem;
  std::vector<std::string> way_up;  // tokens from the fault up to the value, innermost first

  bool fail(std::string text) {
    problem = std::move(text);
    return false;
  }

  bool check_string(std::string_view s, std::string_view kind) {
    const std::size_t bad = first_bad_utf8(s);
    if (bad == std::string_view::npos) return true;
    return fail(absl::StrCat(detail::to_absl(kind), " is not valid UTF-8 (byte ", bad,
                             "); JSON text cannot hold it: encode binary data, e.g. as base64"));
  }

  bool check(const json& v, std::size_t depth) {
    switch (v.type()) {
      case json::value_t::string:
        return check_string(v.get_ref<const std::string&>(), "a string");
      case json::value_t::number_float: {
        const double d = v.get<double>();
        if (std::isfinite(d)) return true;
        return fail(absl::StrCat("the number ", std::isnan(d) ? "NaN" : "infinity",
                                 " has no JSON form; store null or a string instead"));
      }
      case json::value_t::binary:
        return fail("binary data has no JSON form; encode it, e.g. as base64");
      case json::value_t::array:
      case json::value_t::object:
        break;
      default:
        return true;
    }
    if (depth > max_value_depth) {
      return fail(
          absl::StrCat("arrays and objects nest more than ", max_value_depth, " levels deep"));
    }
    if (v.is_array()) {
      std::size_t i = 0;
      for (const json& e : v) {
        if (!check(e, depth + 1)) {
          way_up.push_back(std::to_string(i));
          return false;
        }
        ++i;
      }
      return true;
    }
    for (const auto& [key, e] : v.items()) {
      if (!check_string(key, "an object key") || !check(e, depth + 1)) {
        way_up.push_back(key);
        return false;
      }
    }
    return true;
  }

  absl::Status status(std::string_view what) const {
    std::string pointer;
    for (auto it = way_up.rbegin(); it != way_up.rend(); ++it) push_token(pointer, *it);
    return absl::InvalidArgumentError(
        absl::StrCat(detail::to_absl(what), ": ", problem, " at '",
                     pointer.empty() ? std::string("(the value itself)") : pointer, "'"));
  }
};

}  // namespace

absl::Status check_storable(const json& value, std::string_view what) {
  checker c;
  if (c.check(value, 1)) return absl::OkStatus();
  return c.status(what);
}

absl::Status check_utf8(std::string_view text, std::string_view what) {
  const std::size_t bad = first_bad_utf8(text);
  if (bad == std::string_view::npos) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      detail::to_absl(what), " is not valid UTF-8 (first bad byte at offset ", bad, ")"));
}

std::string_view type_with_article(const json& value) {
  switch (value.type()) {
    case json::value_t::object:
      return "an object";
    case json::value_t::array:
      return "an array";
    case json::value_t::string:
      return "a string";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
    case json::value_t::number_float:
      return "a number";
    case json::value_t::binary:
      return "binary data";
    case json::value_t::null:
    case json::value_t::discarded:
      break;
  }
  return "null";
}

}  // namespace pop
