// Defines the packed form of a JSON value: one contiguous run of bytes that small values of the
// state tree are kept in, read in place without building nlohmann::json nodes.
#pragma once

#include <charconv>
#include <cstddef>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/functional/function_ref.h"
#include "pop/contracts/json.hpp"

namespace pop::detail {

// Appends `value` in decimal, as JSON text writes an integer.
template <class Int>
void append_integer(std::string& out, Int value) {
  char digits[24];
  const auto end = std::to_chars(digits, digits + sizeof(digits), value).ptr;
  out.append(digits, end);
}

}  // namespace pop::detail

namespace pop::detail::packed {

// Layout: a tag byte, then
//   null, false, true:  nothing
//   integer:            the int64 zigzag-encoded as an LEB128 varint
//   unsigned_integer:   the uint64 as a varint
//   floating:           the 8 bytes of the double
//   string:             varint length, the bytes
//   array:              varint element count, the elements
//   object:             varint member count, then per member (in key order): varint key length,
//                       the key, the value
// Small sizes and numbers are kept in the tag byte itself (see the short_ tags: a tag at or
// above short_object carries a count, length or value of 0-31 in its low five bits, of 0-63 for
// short_string), so a record of a few short fields costs about its text's length.
// Each of nlohmann's number kinds is kept as it was, so decoding gives back an equal value that
// also dumps to the same text.
enum class tag : unsigned char {
  null_value,
  false_value,
  true_value,
  integer,
  unsigned_integer,
  floating,
  string,
  array,
  object,
  short_object = 0x20,            // + member count 0-31
  short_string = 0x40,            // + length 0-63
  short_array = 0x80,             // + element count 0-31
  short_unsigned_integer = 0xa0,  // + value 0-31
  short_integer = 0xc0,           // + value 0-31
};

// Appends the packed form of `value` to `out`. Returns false (with `out` partly written) if the
// value holds something JSON text cannot (a binary or discarded value), or if `out` would grow
// past `limit` bytes (checked before each string is copied, so `out` stays near that size).
bool encode(const json& value, std::string& out,
            std::size_t limit = std::numeric_limits<std::size_t>::max());

// encode() for a value about to be stored, checking in the same walk what check_storable() and
// the tree's whole-storage rule check: every string and key valid UTF-8, every number finite,
// and (if `count_elements`) no object with more than `max_members` members and at most `budget`
// nested elements and members in all. Returns false if any of that fails or the value does not
// pack within `limit` (the caller then checks and stores it the general way).
bool encode_checked(const json& value, std::string& out, std::size_t limit, bool count_elements,
                    std::size_t max_members, std::size_t budget);

// Whether `bytes` are exactly one packed string, array or object that a stored value may be:
// well formed (every length within the bytes, known tags, object keys in strictly increasing
// order, nothing after the value), storable as check_storable() says (valid UTF-8, finite
// numbers, nesting within max_value_depth) and, if `count_elements`, within the whole-storage
// limits (as encode_checked). Never reads outside `bytes`.
bool valid(std::string_view bytes, bool count_elements, std::size_t max_members,
           std::size_t budget);

// Whether `bytes` are exactly one packed value of any kind, well formed as valid() checks it
// (within the bytes, known tags, keys in order, nesting within max_value_depth) but whatever its
// strings and numbers hold: a value decode() may read.
bool well_formed(std::string_view bytes);

// Builds a packed value part by part, for encoders that know their value's shape (no JSON is
// built). Open an object or array, add its members (key() before each value) or elements, and
// end() it; keys must come in strictly increasing order. ok() is false if they did not, a
// value() had no JSON form or something is left open; it does not check that each key has
// exactly one value or that there is one value in all (valid() does, as the engine does).
// The bytes are a value only if ok().
class writer {
 public:
  writer() { out_.reserve(256); }
  void null();
  void boolean(bool b);
  void integer(std::int64_t v);
  void string(std::string_view text);
  void value(const json& j);  // any JSON value, packed as encode() packs it
  void begin_object();
  void begin_array();
  void key(std::string_view k);
  void end();
  bool ok() const { return ok_ && open_.empty(); }
  std::string& bytes() { return out_; }

 private:
  struct open {
    std::size_t at;  // where its one-byte header is reserved
    std::uint64_t count = 0;
    bool object;
    std::size_t last_key = 0;  // the offset and length in out_ of its last key, if any
    std::size_t last_key_size = std::string::npos;
  };
  void element();  // counts a value in the innermost open array (objects count keys)
  std::string out_;
  absl::InlinedVector<open, 4> open_;
  bool ok_ = true;
};

// The pieces of packed form, appended to `out` as a writer writes them but without its checks:
// for encoders of a fixed shape (message_record.cpp), which must write an object's head with the
// number of members that follow, each a key (in strictly increasing order) and a value.
void append_object_head(std::size_t members, std::string& out);
void append_key(std::string_view key, std::string& out);
void append_string(std::string_view text, std::string& out);
void append_int(std::int64_t v, std::string& out);

// A JSON value that stands for the packed value `bytes` in a process's result: the engine stores
// those bytes as they are, once valid() (whole-storage limits included) says they may be (else
// the write is kInvalidArgument). This is how a part of this library that encodes its records
// straight into packed form (the workflow engine's instance records) writes them without
// building JSON. Only outside the outbox; nothing else in the state is binary JSON.
json as_json(std::string_view bytes);
// The bytes `j` stands for if as_json() made it, else nullptr.
const json::binary_t* bytes_of(const json& j);

// The JSON value whose packed form starts at `at`. O(size of that value).
json decode(const char* at);

// Whether the value at `at` is an object.
inline bool is_object(const char* at) {
  const auto t = static_cast<unsigned char>(*at);
  return t == static_cast<unsigned char>(tag::object) ||
         (t & 0xe0) == static_cast<unsigned char>(tag::short_object);
}

// The string at `at` (a view of its bytes), or nullopt if the value there is not a string.
std::optional<std::string_view> string_at(const char* at);
// The integer at `at` as an int64 (either integer kind, as json::get<std::int64_t>() converts
// it), or nullopt if the value there is not an integer.
std::optional<std::int64_t> integer_at(const char* at);

// The number of members of an object or elements of an array at `at`; 0 for other values.
std::size_t size(const char* at);

// The value of member `key` of the object at `at`, or nullptr if it is not an object or has no
// such member. O(members before it).
const char* member(const char* at, std::string_view key);

// Visits the members of the object at `at` (nothing if it is not one) in key order, starting at
// the first key >= `from`, until `visit` returns false.
void for_each_member(const char* at, std::string_view from,
                     absl::FunctionRef<bool(std::string_view key, const char* value)> visit);

// Appends the value at `at` to `out` as JSON text in json::dump()'s compact form: literals and
// integers directly, doubles through `write_double` and strings and keys through `write_string`
// (which must write them as dump() does, and may throw as it does for invalid UTF-8).
void write_json(const char* at, std::string& out, absl::FunctionRef<void(double)> write_double,
                absl::FunctionRef<void(std::string_view)> write_string);

// The number of bytes of the value at `at`.
std::size_t length(const char* at);

// Whether the value at `at` is within the limits of a whole-stored value: no object with more
// than `max_members` members, and at most `budget` nested elements and members in all (which
// it decreases by the number counted). The same rule as the tree's for a JSON value.
bool fits(const char* at, std::size_t max_members, std::size_t& budget);

// Writes into `out` the packed object at `at` with `value` (packed bytes) at the dotted path
// `rest` below it (valid, non-empty), creating missing objects on the way, as a JSON assign
// would. Returns false (and `out` unspecified) if `at` or a value on the way is not an object.
// O(bytes): the bytes around the change are copied, nothing is decoded.
bool assign(const char* at, std::string_view rest, std::string_view value, std::string& out);

// Writes into `out` the packed value at `at` without the member at the dotted path `rest`
// (valid, non-empty). Returns false if there is no such member (nothing to remove).
bool erase(const char* at, std::string_view rest, std::string& out);

}  // namespace pop::detail::packed
