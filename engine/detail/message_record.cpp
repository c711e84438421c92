#include "pop/engine/detail/message_record.hpp"

#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace pop::detail {
namespace {

// The fields of a message to record, viewed. The record's names, in the order packed objects
// keep them: a key, b next_attempt_at_us, c created_at_us (what the relay's scan reads first,
// record_schedule), d attempts, e last_error, f failures, h headers, i id, p payload, t topic,
// v version. The id is kept as its index (an integer)
// when it is make_message_id(version, index), as every id a commit gives is; else as a string.
struct fields {
  std::string_view id{};  // if !index
  std::optional<std::uint32_t> index;
  std::string_view topic;
  std::string_view key;
  const json& payload;
  const std::map<std::string, std::string>& headers;
  std::int64_t created_at_us;
  std::uint64_t version;
  std::uint32_t attempts = 0;
  std::string_view last_error{};
  std::int64_t next_attempt_at_us = 0;
  const std::vector<delivery_failure>* failures = nullptr;
};

bool encode(const fields& f, std::string& out) {
  out.clear();
  packed::append_object_head(11, out);
  packed::append_key("a", out);
  packed::append_string(f.key, out);
  packed::append_key("b", out);
  packed::append_int(f.next_attempt_at_us, out);
  packed::append_key("c", out);
  packed::append_int(f.created_at_us, out);
  packed::append_key("d", out);
  packed::append_int(f.attempts, out);
  packed::append_key("e", out);
  packed::append_string(f.last_error, out);
  packed::append_key("f", out);
  if (f.failures != nullptr && !f.failures->empty()) {
    if (!packed::encode(json(*f.failures), out)) return false;
  } else {
    static const json none = json::array();
    packed::encode(none, out);
  }
  packed::append_key("h", out);
  packed::append_object_head(f.headers.size(), out);
  for (const auto& [name, value] : f.headers) {  // (a std::map: in increasing order)
    packed::append_key(name, out);
    packed::append_string(value, out);
  }
  packed::append_key("i", out);
  if (f.index) {
    packed::append_int(*f.index, out);
  } else {
    packed::append_string(f.id, out);
  }
  packed::append_key("p", out);
  if (!packed::encode(f.payload, out)) return false;
  packed::append_key("t", out);
  packed::append_string(f.topic, out);
  packed::append_key("v", out);
  if (f.version <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    packed::append_int(static_cast<std::int64_t>(f.version), out);
  } else {
    packed::encode(json(f.version), out);  // (kept exactly, as an unsigned integer)
  }
  return true;
}

std::string_view text_at(const char* at) {
  return packed::string_at(at).value_or("");
}

// The index of `m`'s id if the id is make_message_id(m.version, index).
std::optional<std::uint32_t> index_of(const outbox_message& m) {
  const auto parsed = parse_message_id(m.id);
  if (!parsed.ok() || parsed->first != m.version ||
      make_message_id(parsed->first, parsed->second) != m.id) {
    return std::nullopt;
  }
  return parsed->second;
}

}  // namespace

bool encode_message_record(const outbox_message& m, std::string& out) {
  return encode({.id = m.id,
                 .index = index_of(m),
                 .topic = m.topic,
                 .key = m.key,
                 .payload = m.payload,
                 .headers = m.headers,
                 .created_at_us = m.created_at_us,
                 .version = m.version,
                 .attempts = m.attempts,
                 .last_error = m.last_error,
                 .next_attempt_at_us = m.next_attempt_at_us,
                 .failures = &m.failures},
                out);
}

bool encode_message_record(std::uint32_t index, const message_draft& draft,
                           std::int64_t created_at_us, std::uint64_t version, std::string& out) {
  // encode() for a message never tried: the same bytes, with the members that do not vary
  // between such messages (names; no attempt, error or failure yet) appended as runs encoded
  // once, by encode itself, instead of member by member (the hot part of a commit that emits).
  struct runs {
    std::string head;        // up to a's value
    std::string to_c;        // a's value .. c's value
    std::string to_h;        // c's value .. h's value
    std::string i, p, t, v;  // the names before the last four values
  };
  static const runs r = [] {
    runs made;
    std::string piece;
    const auto cut = [&](auto&& build) {
      piece.clear();
      build(piece);
      return piece;
    };
    made.head = cut([](std::string& o) {
      packed::append_object_head(11, o);
      packed::append_key("a", o);
    });
    made.to_c = cut([](std::string& o) {
      packed::append_key("b", o);
      packed::append_int(0, o);
      packed::append_key("c", o);
    });
    made.to_h = cut([](std::string& o) {
      packed::append_key("d", o);
      packed::append_int(0, o);
      packed::append_key("e", o);
      packed::append_string("", o);
      packed::append_key("f", o);
      packed::encode(json::array(), o);
      packed::append_key("h", o);
    });
    made.i = cut([](std::string& o) { packed::append_key("i", o); });
    made.p = cut([](std::string& o) { packed::append_key("p", o); });
    made.t = cut([](std::string& o) { packed::append_key("t", o); });
    made.v = cut([](std::string& o) { packed::append_key("v", o); });
    return made;
  }();
  if (version > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    return encode({.index = index,
                   .topic = draft.topic,
                   .key = draft.key,
                   .payload = draft.payload,
                   .headers = draft.headers,
                   .created_at_us = created_at_us,
                   .version = version},
                  out);
  }
  out.clear();
  out.append(r.head);
  packed::append_string(draft.key, out);
  out.append(r.to_c);
  packed::append_int(created_at_us, out);
  out.append(r.to_h);
  packed::append_object_head(draft.headers.size(), out);
  for (const auto& [name, value] : draft.headers) {
    packed::append_key(name, out);
    packed::append_string(value, out);
  }
  out.append(r.i);
  packed::append_int(index, out);
  out.append(r.p);
  if (!packed::encode(draft.payload, out)) return false;
  out.append(r.t);
  packed::append_string(draft.topic, out);
  out.append(r.v);
  packed::append_int(static_cast<std::int64_t>(version), out);
  return true;
}

message_schedule record_schedule(const char* record) {
  message_schedule s;
  // (its first three members)
  packed::for_each_member(record, "", [&](std::string_view name, const char* at) {
    switch (name.front()) {
      case 'a':
        s.key = text_at(at);
        return true;
      case 'b':
        s.next_attempt_at_us = packed::integer_at(at).value_or(0);
        return true;
      case 'c':
        s.created_at_us = packed::integer_at(at).value_or(0);
        return false;
      default:
        return false;
    }
  });
  return s;
}

record_fields fields_of(const char* record) {
  record_fields f;
  packed::for_each_member(record, "", [&](std::string_view name, const char* at) {
    switch (name.front()) {
      case 'a':
        f.key = at;
        break;
      case 'b':
        f.next_attempt_at_us = at;
        break;
      case 'c':
        f.created_at_us = at;
        break;
      case 'd':
        f.attempts = at;
        break;
      case 'e':
        f.last_error = at;
        break;
      case 'f':
        f.failures = at;
        break;
      case 'h':
        f.headers = at;
        break;
      case 'i':
        f.id = at;
        break;
      case 'p':
        f.payload = at;
        break;
      case 't':
        f.topic = at;
        break;
      case 'v':
        f.version = at;
        break;
      default:
        break;
    }
    return true;
  });
  return f;
}

outbox_message decode_message_record(const char* record) {
  outbox_message m;
  decode_message_record(record, m);
  return m;
}

void decode_message_record(const char* record, outbox_message& m) {
  const record_fields f = fields_of(record);
  m.version = packed::decode(f.version).get<std::uint64_t>();
  if (const std::optional<std::int64_t> index = packed::integer_at(f.id)) {
    make_message_id(m.version, static_cast<std::uint32_t>(*index), m.id);
  } else {
    m.id.assign(text_at(f.id));
  }
  m.topic.assign(text_at(f.topic));
  m.key.assign(text_at(f.key));
  m.payload = packed::decode(f.payload);
  m.headers.clear();
  packed::for_each_member(f.headers, "", [&](std::string_view header, const char* value) {
    m.headers.emplace_hint(m.headers.end(), header, text_at(value));
    return true;
  });
  m.created_at_us = packed::integer_at(f.created_at_us).value_or(0);
  m.attempts = static_cast<std::uint32_t>(packed::integer_at(f.attempts).value_or(0));
  m.last_error.assign(text_at(f.last_error));
  m.next_attempt_at_us = packed::integer_at(f.next_attempt_at_us).value_or(0);
  m.failures.clear();
  if (packed::size(f.failures) != 0) {
    m.failures = packed::decode(f.failures).get<std::vector<delivery_failure>>();
  }
}

}  // namespace pop::detail
