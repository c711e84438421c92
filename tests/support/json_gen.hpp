// Defines RapidCheck generators of any JSON value, and exact comparison of JSON values, for the
// property tests of the codecs.
#pragma once

#include <rapidcheck.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "pop/contracts/json.hpp"

namespace pop::test {

// Whether `a` and `b` are the same JSON value down to the number kind of every number, the bits of
// every double and the bytes of every string (json's == treats 1 and 1u, 0.0 and -0.0 as equal).
inline bool same(const json& a, const json& b) {
  if (a.type() != b.type()) return false;
  switch (a.type()) {
    case json::value_t::number_float: {
      const double x = a.get<double>();
      const double y = b.get<double>();
      return std::memcmp(&x, &y, sizeof x) == 0;
    }
    case json::value_t::array:
      if (a.size() != b.size()) return false;
      for (std::size_t i = 0; i < a.size(); ++i) {
        if (!same(a[i], b[i])) return false;
      }
      return true;
    case json::value_t::object: {
      if (a.size() != b.size()) return false;
      auto j = b.begin();
      for (auto i = a.begin(); i != a.end(); ++i, ++j) {
        if (i.key() != j.key() || !same(i.value(), j.value())) return false;
      }
      return true;
    }
    default:
      return a == b;
  }
}

// Text with the bytes that trip codecs: empty, NUL, control characters, multi-byte and invalid
// UTF-8, and lengths on both sides of the packed form's short limits (63 bytes, 31 members).
inline rc::Gen<std::string> any_text() {
  return rc::gen::oneOf(rc::gen::element<std::string>("", "a", "zz", std::string(1, '\0'),
                                                      "\xff\xfe", "\xc3\xa9", std::string(63, 'x'),
                                                      std::string(64, 'y'), std::string(300, 'q')),
                        rc::gen::arbitrary<std::string>());
}

// Valid UTF-8 text with everything JSON text escapes: quotes, backslashes, slashes, control
// characters, NUL, DEL and multi-byte characters, empty or long.
inline rc::Gen<std::string> valid_text() {
  return rc::gen::map(rc::gen::container<std::vector<std::string>>(rc::gen::element<std::string>(
                          "a", "Z", "0", ".", " ", "\"", "\\", "/", "\n", "\t", "\b", "\f", "\r",
                          std::string(1, '\0'), "\x01", "\x1f", "\x7f", "\xc3\xa9", "\xe2\x98\x83",
                          "\xf0\x9f\x98\x80", std::string(40, 'k'))),
                      [](const std::vector<std::string>& parts) {
                        std::string out;
                        for (const std::string& p : parts) out += p;
                        return out;
                      });
}

// Any JSON value, nested up to `depth`, of every kind and number kind nlohmann keeps; its
// strings and keys from `text` (any_text: also invalid UTF-8).
inline rc::Gen<json> any_json(int depth, rc::Gen<std::string> text = any_text()) {
  std::vector<rc::Gen<json>> kinds = {
      rc::gen::just(json(nullptr)),
      rc::gen::map(rc::gen::arbitrary<bool>(), [](bool b) { return json(b); }),
      rc::gen::map(rc::gen::arbitrary<std::int64_t>(), [](std::int64_t v) { return json(v); }),
      rc::gen::map(rc::gen::arbitrary<std::uint64_t>(), [](std::uint64_t v) { return json(v); }),
      rc::gen::map(rc::gen::inRange<std::int64_t>(-40, 40), [](std::int64_t v) { return json(v); }),
      rc::gen::map(rc::gen::inRange<std::uint64_t>(0, 40), [](std::uint64_t v) { return json(v); }),
      rc::gen::map(rc::gen::element(0.0, -0.0, 1.5, -1e300, 5e-324, 0.1, 1e21),
                   [](double v) { return json(v); }),
      rc::gen::map(text, [](std::string t) { return json(std::move(t)); }),
  };
  if (depth > 0) {
    // Each container draws its own size (up to 40: past the short forms' 31).
    kinds.push_back(rc::gen::map(
        rc::gen::resize(40, rc::gen::container<std::vector<json>>(any_json(depth - 1, text))),
        [](std::vector<json> v) { return json(std::move(v)); }));
    kinds.push_back(rc::gen::map(
        rc::gen::resize(
            40, rc::gen::container<std::map<std::string, json>>(text, any_json(depth - 1, text))),
        [](std::map<std::string, json> m) {
          json out = json::object();
          for (auto& [k, v] : m) out[k] = std::move(v);
          return out;
        }));
  }
  return rc::gen::join(rc::gen::elementOf(kinds));
}

}  // namespace pop::test
