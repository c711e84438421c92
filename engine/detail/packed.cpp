#include "pop/engine/detail/packed.hpp"

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#include "pop/contracts/path.hpp"

namespace pop::detail::packed {
namespace {

void put_varint(std::uint64_t v, std::string& out) {
  if (v < 0x80) {
    out.push_back(static_cast<char>(v));
    return;
  }
  // (Longer ones, times and lengths, gathered and appended at once: one capacity check.)
  char bytes[10];
  std::size_t n = 0;
  while (v >= 0x80) {
    bytes[n++] = static_cast<char>((v & 0x7f) | 0x80);
    v >>= 7;
  }
  bytes[n++] = static_cast<char>(v);
  out.append(bytes, n);
}

std::uint64_t get_varint(const char*& at) {
  std::uint64_t v = 0;
  for (int shift = 0;; shift += 7) {
    const auto byte = static_cast<unsigned char>(*at++);
    v |= static_cast<std::uint64_t>(byte & 0x7f) << shift;
    if ((byte & 0x80) == 0) return v;
  }
}

void put_tag(tag t, std::string& out) {
  out.push_back(static_cast<char>(t));
}

void put_text(std::string_view text, std::string& out) {
  put_varint(text.size(), out);
  out.append(text);
}

// A tag and its size or value: the short form when it fits in the tag byte.
void put_head(tag t, tag short_t, std::uint64_t n, std::uint64_t short_max, std::string& out) {
  if (n <= short_max) {
    out.push_back(static_cast<char>(static_cast<unsigned char>(short_t) + n));
    return;
  }
  put_tag(t, out);
  put_varint(n, out);
}

constexpr std::uint64_t short_max = 31;
constexpr std::uint64_t short_string_max = 63;

// The kind of a value and its size (string length, element or member count) or integer value.
struct head {
  tag kind;  // one of the long tags
  std::uint64_t n = 0;
};

head get_head(const char*& at) {
  const auto t = static_cast<unsigned char>(*at++);
  const auto in = [&](tag short_t, unsigned char span) {
    const auto base = static_cast<unsigned char>(short_t);
    return t >= base && t < base + span;
  };
  const auto low = [&](tag short_t) {
    return static_cast<std::uint64_t>(t - static_cast<unsigned char>(short_t));
  };
  if (in(tag::short_string, 64)) return {tag::string, low(tag::short_string)};
  if (in(tag::short_object, 32)) return {tag::object, low(tag::short_object)};
  if (in(tag::short_array, 32)) return {tag::array, low(tag::short_array)};
  if (in(tag::short_unsigned_integer, 32)) {
    return {tag::unsigned_integer, low(tag::short_unsigned_integer)};
  }
  if (in(tag::short_integer, 32)) return {tag::integer, low(tag::short_integer) << 1};
  const auto kind = static_cast<tag>(t);
  switch (kind) {
    case tag::integer:
    case tag::unsigned_integer:
    case tag::string:
    case tag::array:
    case tag::object:
      return {kind, get_varint(at)};
    default:
      return {kind};
  }
}

// The position just past the value at `at`.
const char* skip(const char* at) {
  const head h = get_head(at);
  switch (h.kind) {
    case tag::floating:
      return at + sizeof(double);
    case tag::string:
      return at + h.n;
    case tag::array:
      for (std::uint64_t n = h.n; n > 0; --n) at = skip(at);
      return at;
    case tag::object:
      for (std::uint64_t n = h.n; n > 0; --n) {
        at += get_varint(at);  // the key
        at = skip(at);
      }
      return at;
    default:
      return at;
  }
}

std::string_view get_text(const char*& at) {
  const std::size_t n = get_varint(at);
  const std::string_view text(at, n);
  at += n;
  return text;
}

}  // namespace

std::optional<std::string_view> string_at(const char* at) {
  const head h = get_head(at);
  if (h.kind != tag::string) return std::nullopt;
  return std::string_view(at, h.n);
}

std::optional<std::int64_t> integer_at(const char* at) {
  const head h = get_head(at);
  if (h.kind == tag::integer) return static_cast<std::int64_t>((h.n >> 1) ^ (~(h.n & 1) + 1));
  if (h.kind == tag::unsigned_integer) return static_cast<std::int64_t>(h.n);
  return std::nullopt;
}

namespace {

json decode_at(const char*& at) {
  const head h = get_head(at);
  switch (h.kind) {
    case tag::null_value:
      return nullptr;
    case tag::false_value:
      return false;
    case tag::true_value:
      return true;
    case tag::integer:
      return static_cast<std::int64_t>((h.n >> 1) ^ (~(h.n & 1) + 1));
    case tag::unsigned_integer:
      return h.n;
    case tag::floating: {
      double d = 0;
      std::memcpy(&d, at, sizeof d);
      at += sizeof d;
      return d;
    }
    case tag::string: {
      std::string text(at, h.n);
      at += h.n;
      return text;
    }
    case tag::array: {
      json out = json::array();
      auto& elements = out.get_ref<json::array_t&>();
      elements.reserve(h.n);
      for (std::uint64_t i = 0; i < h.n; ++i) elements.push_back(decode_at(at));
      return out;
    }
    case tag::object: {
      json out = json::object();
      auto& members = out.get_ref<json::object_t&>();
      for (std::uint64_t n = h.n; n > 0; --n) {
        const std::string_view key = get_text(at);
        members.emplace_hint(members.end(), std::string(key), decode_at(at));
      }
      return out;
    }
    default:
      return nullptr;  // unreachable for bytes encode wrote
  }
}

// One member of a packed object found by key: where its key starts, where its value starts and
// ends; for a missing key, all three are where it would be inserted (keys stay in order).
struct slot {
  const char* key = nullptr;
  const char* value = nullptr;
  const char* end = nullptr;
  bool found = false;
};

// Where the object at `at` (which must be one) holds `key`, and its member count and where its
// members start.
slot find_slot(const char* at, std::string_view key, std::uint64_t& count, const char*& members) {
  const head h = get_head(at);
  count = h.n;
  members = at;
  for (std::uint64_t n = h.n; n > 0; --n) {
    const char* key_at = at;
    const std::string_view k = get_text(at);
    if (k == key) return {key_at, at, skip(at), true};
    if (k > key) return {key_at, key_at, key_at, false};
    at = skip(at);
  }
  return {at, at, at, false};
}

void put_object_head(std::uint64_t count, std::string& out) {
  put_head(tag::object, tag::short_object, count, short_max, out);
}

}  // namespace

namespace {

const char* write_json_at(const char* at, std::string& out,
                          absl::FunctionRef<void(double)> write_double,
                          absl::FunctionRef<void(std::string_view)> write_string) {
  const head h = get_head(at);
  switch (h.kind) {
    case tag::null_value:
      out += "null";
      return at;
    case tag::false_value:
      out += "false";
      return at;
    case tag::true_value:
      out += "true";
      return at;
    case tag::integer:
      append_integer(out, static_cast<std::int64_t>((h.n >> 1) ^ (~(h.n & 1) + 1)));
      return at;
    case tag::unsigned_integer:
      append_integer(out, h.n);
      return at;
    case tag::floating: {
      double d = 0;
      std::memcpy(&d, at, sizeof d);
      write_double(d);
      return at + sizeof d;
    }
    case tag::string:
      write_string(std::string_view(at, h.n));
      return at + h.n;
    case tag::array:
      out += '[';
      for (std::uint64_t i = 0; i < h.n; ++i) {
        if (i > 0) out += ',';
        at = write_json_at(at, out, write_double, write_string);
      }
      out += ']';
      return at;
    case tag::object:
      out += '{';
      for (std::uint64_t i = 0; i < h.n; ++i) {
        if (i > 0) out += ',';
        write_string(get_text(at));
        out += ':';
        at = write_json_at(at, out, write_double, write_string);
      }
      out += '}';
      return at;
    default:
      return at;  // unreachable for bytes encode wrote
  }
}

}  // namespace

void write_json(const char* at, std::string& out, absl::FunctionRef<void(double)> write_double,
                absl::FunctionRef<void(std::string_view)> write_string) {
  write_json_at(at, out, write_double, write_string);
}

std::size_t length(const char* at) {
  return static_cast<std::size_t>(skip(at) - at);
}

bool fits(const char* at, std::size_t max_members, std::size_t& budget) {
  const head h = get_head(at);
  if (h.kind == tag::object && h.n > max_members) return false;
  if (h.kind != tag::object && h.kind != tag::array) return true;
  for (std::uint64_t n = h.n; n > 0; --n) {
    if (budget == 0) return false;
    --budget;
    if (h.kind == tag::object) at += get_varint(at);  // the key
    if (!fits(at, max_members, budget)) return false;
    at = skip(at);
  }
  return true;
}

namespace {

// Where a write or erase at `rest` below a packed object lands: the innermost object on the way
// that exists, the segment looked up in it, the segments left after that one, and its slot.
struct target {
  const char* object = nullptr;
  std::string_view segment;
  std::string_view rest;
  std::uint64_t count = 0;
  const char* members = nullptr;
  slot found;
};

// The target of `rest` (valid, non-empty) below the packed value at `at`: the walk stops at the
// last segment or at the first one missing; nullopt if a value on the way is not an object.
std::optional<target> descend(const char* at, std::string_view rest) {
  while (true) {
    if (!is_object(at)) return std::nullopt;
    target t;
    t.object = at;
    t.segment = take_segment(rest);
    t.rest = rest;
    t.found = find_slot(at, t.segment, t.count, t.members);
    if (!t.found.found || rest.empty()) return t;
    at = t.found.value;
  }
}

}  // namespace

bool assign(const char* at, std::string_view rest, std::string_view value, std::string& out) {
  const char* const begin = at;
  const char* const end = skip(at);
  const std::optional<target> t = descend(at, rest);
  if (!t) return false;
  out.clear();
  if (t->found.found) {  // replace the member's value
    out.append(begin, t->found.value);
    out.append(value);
    out.append(t->found.end, end);
    return true;
  }
  // Insert the member, with objects for the remaining segments around the value.
  out.append(begin, t->object);
  put_object_head(t->count + 1, out);
  out.append(t->members, t->found.key);
  put_text(t->segment, out);
  for (std::string_view left = t->rest; !left.empty();) {
    put_object_head(1, out);
    put_text(take_segment(left), out);
  }
  out.append(value);
  out.append(t->found.key, end);
  return true;
}

bool erase(const char* at, std::string_view rest, std::string& out) {
  const char* const begin = at;
  const char* const end = skip(at);
  const std::optional<target> t = descend(at, rest);
  if (!t || !t->found.found) return false;
  out.clear();
  out.append(begin, t->object);
  put_object_head(t->count - 1, out);
  out.append(t->members, t->found.key);
  out.append(t->found.end, end);
  return true;
}

namespace {

bool encode_into(const json& value, std::string& out, std::size_t limit) {
  if (out.size() > limit) return false;
  switch (value.type()) {
    case json::value_t::null:
      put_tag(tag::null_value, out);
      return true;
    case json::value_t::boolean:
      put_tag(value.get_ref<const json::boolean_t&>() ? tag::true_value : tag::false_value, out);
      return true;
    case json::value_t::number_integer: {
      const auto v = value.get_ref<const json::number_integer_t&>();
      if (v >= 0 && static_cast<std::uint64_t>(v) <= short_max) {
        out.push_back(static_cast<char>(static_cast<unsigned char>(tag::short_integer) + v));
        return true;
      }
      put_tag(tag::integer, out);
      put_varint((static_cast<std::uint64_t>(v) << 1) ^ static_cast<std::uint64_t>(v >> 63), out);
      return true;
    }
    case json::value_t::number_unsigned:
      put_head(tag::unsigned_integer, tag::short_unsigned_integer,
               value.get_ref<const json::number_unsigned_t&>(), short_max, out);
      return true;
    case json::value_t::number_float: {
      const double d = value.get_ref<const json::number_float_t&>();
      put_tag(tag::floating, out);
      char bytes[sizeof d];
      std::memcpy(bytes, &d, sizeof d);
      out.append(bytes, sizeof d);
      return true;
    }
    case json::value_t::string: {
      const auto& text = value.get_ref<const json::string_t&>();
      if (out.size() + text.size() > limit) return false;
      put_head(tag::string, tag::short_string, text.size(), short_string_max, out);
      out.append(text);
      return true;
    }
    case json::value_t::array:
      put_head(tag::array, tag::short_array, value.size(), short_max, out);
      for (const json& element : value) {
        if (!encode_into(element, out, limit)) return false;
      }
      return true;
    case json::value_t::object:
      put_head(tag::object, tag::short_object, value.size(), short_max, out);
      for (const auto& [key, member] : value.get_ref<const json::object_t&>()) {
        if (out.size() + key.size() > limit) return false;
        put_text(key, out);
        if (!encode_into(member, out, limit)) return false;
      }
      return true;
    case json::value_t::binary:
    case json::value_t::discarded:
      return false;
  }
  return false;
}

// encode_into with encode_checked's checks; `budget` null when elements are not counted.
bool encode_checked_into(const json& value, std::string& out, std::size_t limit,
                         std::size_t max_members, std::size_t* budget, std::size_t depth) {
  if (out.size() > limit) return false;
  const auto counted = [&] {
    if (budget == nullptr) return true;
    if (*budget == 0) return false;
    --*budget;
    return true;
  };
  switch (value.type()) {
    case json::value_t::string: {
      const auto& text = value.get_ref<const json::string_t&>();
      if (out.size() + text.size() > limit || !check_utf8(text, {}).ok()) return false;
      put_head(tag::string, tag::short_string, text.size(), short_string_max, out);
      out.append(text);
      return true;
    }
    case json::value_t::number_float:
      if (!std::isfinite(value.get_ref<const json::number_float_t&>())) return false;
      return encode_into(value, out, limit);
    case json::value_t::array:
      if (depth > max_value_depth) return false;
      put_head(tag::array, tag::short_array, value.size(), short_max, out);
      for (const json& element : value) {
        if (!counted() ||
            !encode_checked_into(element, out, limit, max_members, budget, depth + 1)) {
          return false;
        }
      }
      return true;
    case json::value_t::object: {
      if (depth > max_value_depth || (budget != nullptr && value.size() > max_members)) {
        return false;
      }
      put_head(tag::object, tag::short_object, value.size(), short_max, out);
      for (const auto& [key, member] : value.get_ref<const json::object_t&>()) {
        if (out.size() + key.size() > limit || !counted() || !check_utf8(key, {}).ok()) {
          return false;
        }
        put_text(key, out);
        if (!encode_checked_into(member, out, limit, max_members, budget, depth + 1)) {
          return false;
        }
      }
      return true;
    }
    default:  // literals and integers, and what has no JSON form (refused there)
      return encode_into(value, out, limit);
  }
}

}  // namespace

bool encode_checked(const json& value, std::string& out, std::size_t limit, bool count_elements,
                    std::size_t max_members, std::size_t budget) {
  return encode_checked_into(value, out, limit, max_members, count_elements ? &budget : nullptr,
                             1) &&
         out.size() <= limit;
}

namespace {

// The checks of valid() on the value at `at` (before `end`); advances `at` past it.
struct validator {
  const char* end;
  bool count_elements;
  std::size_t max_members;
  std::size_t budget;
  bool contents = true;  // also check strings (UTF-8) and numbers (finite), not only the form

  bool varint(const char*& at, std::uint64_t& v) const {
    v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (at == end) return false;
      const auto byte = static_cast<unsigned char>(*at++);
      if (shift == 63 && byte > 1) return false;  // past 64 bits
      v |= static_cast<std::uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return true;
    }
    return false;
  }
  bool text(const char*& at, std::uint64_t n, std::string_view& out) const {
    if (n > static_cast<std::uint64_t>(end - at)) return false;
    out = std::string_view(at, n);
    at += n;
    return !contents || check_utf8(out, {}).ok();
  }
  bool counted() {
    if (!count_elements) return true;
    if (budget == 0) return false;
    --budget;
    return true;
  }
  bool value(const char*& at, std::size_t depth) {
    if (at == end) return false;
    const auto t = static_cast<unsigned char>(*at);
    const auto in = [&](tag short_t, unsigned span) {
      const auto base = static_cast<unsigned char>(short_t);
      return t >= base && t < base + span;
    };
    head h{};
    if (in(tag::short_string, 64) || in(tag::short_object, 32) || in(tag::short_array, 32) ||
        in(tag::short_unsigned_integer, 32) || in(tag::short_integer, 32)) {
      h = get_head(at);  // one byte, within bounds
    } else {
      ++at;
      h.kind = static_cast<tag>(t);
      switch (h.kind) {
        case tag::null_value:
        case tag::false_value:
        case tag::true_value:
          return true;
        case tag::integer:
        case tag::unsigned_integer:
        case tag::string:
        case tag::array:
        case tag::object:
          if (!varint(at, h.n)) return false;
          break;
        case tag::floating: {
          if (end - at < static_cast<std::ptrdiff_t>(sizeof(double))) return false;
          double d = 0;
          std::memcpy(&d, at, sizeof d);
          at += sizeof d;
          return !contents || std::isfinite(d);
        }
        default:
          return false;
      }
    }
    std::string_view unused;
    switch (h.kind) {
      case tag::string:
        return text(at, h.n, unused);
      case tag::array:
        if (depth > max_value_depth) return false;
        for (std::uint64_t n = h.n; n > 0; --n) {
          if (!counted() || !value(at, depth + 1)) return false;
        }
        return true;
      case tag::object: {
        if (depth > max_value_depth || (count_elements && h.n > max_members)) return false;
        std::string_view last;
        for (std::uint64_t n = h.n; n > 0; --n) {
          std::uint64_t length = 0;
          std::string_view key;
          if (!counted() || !varint(at, length) || !text(at, length, key)) return false;
          if (n != h.n && !(last < key)) return false;
          last = key;
          if (!value(at, depth + 1)) return false;
        }
        return true;
      }
      default:  // integers
        return true;
    }
  }
};

}  // namespace

bool valid(std::string_view bytes, bool count_elements, std::size_t max_members,
           std::size_t budget) {
  if (bytes.empty()) return false;
  const auto top = static_cast<unsigned char>(bytes.front());
  const bool container = top == static_cast<unsigned char>(tag::string) ||
                         top == static_cast<unsigned char>(tag::array) ||
                         top == static_cast<unsigned char>(tag::object) ||
                         top >= static_cast<unsigned char>(tag::short_object);
  const bool scalar_short = top >= static_cast<unsigned char>(tag::short_unsigned_integer);
  if (!container || scalar_short) return false;
  validator v{bytes.data() + bytes.size(), count_elements, max_members, budget};
  const char* at = bytes.data();
  return v.value(at, 1) && at == v.end;
}

namespace {
constexpr std::uint64_t packed_subtype = 0x706f70;  // "pop"
}  // namespace

json as_json(std::string_view bytes) {
  return json::binary(std::vector<std::uint8_t>(bytes.begin(), bytes.end()), packed_subtype);
}

const json::binary_t* bytes_of(const json& j) {
  if (!j.is_binary()) return nullptr;
  const json::binary_t& b = j.get_binary();
  return b.has_subtype() && b.subtype() == packed_subtype ? &b : nullptr;
}

bool well_formed(std::string_view bytes) {
  if (bytes.empty()) return false;
  validator v{bytes.data() + bytes.size(), false, 0, 0, false};
  const char* at = bytes.data();
  return v.value(at, 1) && at == v.end;
}

void writer::element() {
  if (!open_.empty() && !open_.back().object) ++open_.back().count;
}

void writer::null() {
  element();
  put_tag(tag::null_value, out_);
}

void writer::boolean(bool b) {
  element();
  put_tag(b ? tag::true_value : tag::false_value, out_);
}

void append_object_head(std::size_t members, std::string& out) {
  put_object_head(members, out);
}

void append_key(std::string_view key, std::string& out) {
  put_text(key, out);
}

void append_string(std::string_view text, std::string& out) {
  put_head(tag::string, tag::short_string, text.size(), short_string_max, out);
  out.append(text);
}

void append_int(std::int64_t v, std::string& out) {
  if (v >= 0 && static_cast<std::uint64_t>(v) <= short_max) {
    out.push_back(static_cast<char>(static_cast<unsigned char>(tag::short_integer) + v));
    return;
  }
  put_tag(tag::integer, out);
  put_varint((static_cast<std::uint64_t>(v) << 1) ^ static_cast<std::uint64_t>(v >> 63), out);
}

void writer::integer(std::int64_t v) {
  element();
  append_int(v, out_);
}

void writer::string(std::string_view text) {
  element();
  append_string(text, out_);
}

void writer::value(const json& j) {
  element();
  if (!encode_into(j, out_, std::numeric_limits<std::size_t>::max())) ok_ = false;
}

void writer::begin_object() {
  element();
  open_.push_back({out_.size(), 0, true});
  out_.push_back('\0');
}

void writer::begin_array() {
  element();
  open_.push_back({out_.size(), 0, false});
  out_.push_back('\0');
}

void writer::key(std::string_view k) {
  if (open_.empty() || !open_.back().object) {
    ok_ = false;
    return;
  }
  open& o = open_.back();
  if (o.last_key_size != std::string::npos &&
      !(std::string_view(out_).substr(o.last_key, o.last_key_size) < k)) {
    ok_ = false;
  }
  ++o.count;
  put_varint(k.size(), out_);
  o.last_key = out_.size();
  o.last_key_size = k.size();
  out_.append(k);
}

void writer::end() {
  if (open_.empty()) {
    ok_ = false;
    return;
  }
  const open o = open_.back();
  open_.pop_back();
  std::string header;
  put_head(o.object ? tag::object : tag::array, o.object ? tag::short_object : tag::short_array,
           o.count, short_max, header);
  if (header.size() == 1) {
    out_[o.at] = header[0];
  } else {
    out_.replace(o.at, 1, header);  // (more than 31 members or elements: rare)
  }
}

bool encode(const json& value, std::string& out, std::size_t limit) {
  return encode_into(value, out, limit) && out.size() <= limit;
}

json decode(const char* at) {
  return decode_at(at);
}

std::size_t size(const char* at) {
  const head h = get_head(at);
  return h.kind == tag::array || h.kind == tag::object ? h.n : 0;
}

const char* member(const char* at, std::string_view key) {
  const char* found = nullptr;
  for_each_member(at, key, [&](std::string_view k, const char* value) {
    if (k == key) found = value;
    return false;  // members are in key order: the first one >= key decides
  });
  return found;
}

void for_each_member(const char* at, std::string_view from,
                     absl::FunctionRef<bool(std::string_view key, const char* value)> visit) {
  const head h = get_head(at);
  if (h.kind != tag::object) return;
  for (std::uint64_t n = h.n; n > 0; --n) {
    const std::string_view key = get_text(at);
    if (key >= from && !visit(key, at)) return;
    at = skip(at);
  }
}

}  // namespace pop::detail::packed
