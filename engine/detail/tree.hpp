// Defines the persistent state tree: value nodes and the pure functions that read and update it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "pop/contracts/json.hpp"
#include "pop/contracts/outbox_message.hpp"
#include "pop/engine/detail/message_record.hpp"
#include "pop/engine/detail/pmap.hpp"
#include "pop/engine/result.hpp"

namespace pop::detail {

class value_node;
using node_ptr = std::shared_ptr<const value_node>;

// What a typed message node views, kept beside it in its block (so the node itself stays as
// small as the other forms): the message's compact record, and what is built from it on demand.
struct message_state {
  message_state(const char* r, const outbox_message* m) : record(r), decoded(m) {}
  message_state(const message_state&) = delete;
  message_state& operator=(const message_state&) = delete;
  ~message_state() {
    delete json_form.load(std::memory_order_acquire);
    if (record != nullptr) delete decoded.load(std::memory_order_acquire);
  }
  // The record (message_record.hpp; not owned), or nullptr when the message was given decoded
  // (not owned either, then).
  const char* record;
  mutable std::atomic<const outbox_message*> decoded;  // owned if `record`
  mutable std::atomic<const json*> json_form{nullptr};
};

// One value of the state tree, in one of four forms. A member map (a large JSON object: a
// persistent B+-tree of child nodes, so a write copies O(log n) of it); a packed value (a small
// object, array or string in the bytes of packed.hpp, in the node's own allocation: a small record
// is one allocation of about its text's size, read in place); a blob (a scalar, or a value too
// large or too odd to pack, as nlohmann::json); or an outbox message a commit appended, kept
// typed: as the compact record of message_record.hpp in the node's own allocation, decoded into an
// outbox_message on the first message() (the relay's read) and built as JSON only if someone
// reads it as JSON (then once). An object grows
// out of packed form when a write makes it large. The form is invisible to readers:
// materialising any of them gives the same JSON. Shared between versions and threads, and never
// changed while anything but its changer can reach it (see assign's `owned`).
class value_node {
 public:
  struct blob_form {};
  struct map_form {};
  struct packed_form {};
  value_node(blob_form, json value) : form_(std::in_place_type<json>, std::move(value)) {}
  value_node(map_form, pmap<node_ptr> members)
      : form_(std::in_place_type<pmap<node_ptr>>, std::move(members)) {}
  // A typed message node viewing `m`, which the caller keeps alive as long as the node (see
  // make_message_node: one allocation holds both).
  explicit value_node(const message_state* m) : form_(std::in_place_type<typed>, m) {}
  // A packed node viewing the packed bytes at `bytes`, which the caller keeps alive as long as the
  // node (see make_node: one allocation holds both).
  value_node(packed_form, const char* bytes) : form_(std::in_place_type<packed>, bytes) {}
  // Typed and packed nodes view their block: a copy would outlive it.
  value_node(const value_node&) = delete;
  value_node& operator=(const value_node&) = delete;

  bool is_map() const { return form_.index() == 1; }
  // The member map. Only for is_map().
  const pmap<node_ptr>& members() const { return *std::get_if<pmap<node_ptr>>(&form_); }
  // The packed bytes of a packed node, else nullptr.
  const char* packed_bytes() const {
    const packed* p = std::get_if<packed>(&form_);
    return p ? p->bytes : nullptr;
  }
  // The value as JSON. Only for a blob or a typed message (not is_map(), not packed). A typed
  // message builds its JSON on the first call (thread-safe); the reference lives as long as the
  // node.
  const json& as_json() const;
  // Replaces the members of a map node that only its changer can reach (one an edit batch created
  // and no version has published yet, or one an owned write reaches; see assign), so later writes
  // change it instead of allocating new nodes. Only for is_map().
  void replace_members(pmap<node_ptr> members) {
    *std::get_if<pmap<node_ptr>>(&form_) = std::move(members);
  }
  // Whether this is a typed message node.
  bool is_message() const { return std::holds_alternative<typed>(form_); }
  // The message a commit stored, when kept typed (decoded from its record on the first call,
  // thread-safe; the pointer lives as long as the node); nullptr otherwise.
  const outbox_message* message() const;
  // The message of a typed message node (is_message()), decoded for this call only if it has not
  // been yet: for whole-state reads that should not leave a decoded copy in every node.
  outbox_message message_copy() const;
  // The same, written over `into` (its strings' allocations reused), never kept.
  void message_into(outbox_message& into) const;
  // The compact record of a typed message node (message_record.hpp), or nullptr if it is not one
  // or keeps its message decoded only (a payload with no record).
  const char* message_record() const {
    const typed* t = std::get_if<typed>(&form_);
    return t ? t->state->record : nullptr;
  }
  // The key, next attempt and creation times of a typed message node (is_message()), read
  // without decoding it; the key is a view into the node.
  message_schedule schedule() const;

 private:
  struct typed {
    explicit typed(const message_state* s) : state(s) {}
    const message_state* state;  // not owned
  };
  struct packed {
    explicit packed(const char* b) : bytes(b) {}
    const char* bytes;  // not owned
  };
  std::variant<json, pmap<node_ptr>, typed, packed> form_;
};

// The largest object kept as a blob, by member count and by total nested element count.
inline constexpr std::size_t blob_max_members = 16;
inline constexpr std::size_t blob_max_elements = 64;

// Returns a node holding `value`: small values as a blob, large objects as member maps. O(size).
node_ptr make_node(json value);
// make_node(value) for a value that is storable (as check_storable() says) and packs whole,
// checked and packed in one walk; nullptr for any other value (check it and make_node it).
node_ptr make_checked_small_node(const json& value);
// The node of the value packed in `bytes`, as make_node would make it from that value: a packed
// node holding the bytes as they are when they are within packed_max bytes and the whole-storage
// limits; nullptr if they are not a valid packed value (packed::valid).
node_ptr make_packed_node(std::string_view bytes);
// Returns a node holding message `m`, typed.
node_ptr make_message_node(const outbox_message& m);
// Returns a node holding message `draft` as commit `version` stores it as its `index`-th message,
// created at `created_at_us`, typed. Nothing is moved out of `draft`.
node_ptr make_message_node(std::uint32_t index, const message_draft& draft,
                           std::int64_t created_at_us, std::uint64_t version);
// Returns a root node holding the members of `object`: always a member map, so top-level writes
// never copy the whole state. Nothing is moved out of `object`: the caller frees it in one piece
// once the tree is built (freeing its parts one by one while building would scatter the tree over
// the holes they leave and keep those pages resident).
node_ptr make_root(const json& object);

// A read position: a node, and inside a blob or packed node a value within it.
struct location {
  const value_node* node = nullptr;  // null: absent
  const json* inner = nullptr;       // non-null: the value inside node->blob
  const char* packed = nullptr;      // non-null: a value inside node's packed bytes
  bool exists() const { return node != nullptr; }
  bool is_object() const;
  // The packed bytes of the value here if it is stored packed (inside a packed node or all of
  // it), else nullptr.
  const char* packed_value() const {
    if (packed) return packed;
    return inner ? nullptr : node->packed_bytes();
  }
};

// Returns the location of `path_text` (a valid dotted path) below `root`, or an absent location.
// O(depth * log n); materialises nothing.
location lookup(const value_node& root, std::string_view path_text);
// Returns the location of member `key` of object location `at`, or an absent location.
location member(const location& at, std::string_view key);
// The JSON value at `at` (which must exist) if it is stored as JSON (a blob or inside one, or a
// typed message), else nullptr (a member map or a packed value: materialise it). O(1), no copy.
inline const json* stored_json(const location& at) {
  if (at.inner) return at.inner;
  return at.node->is_map() || at.packed_value() ? nullptr : &at.node->as_json();
}
// The number of members of an object, elements of an array, 0 for other values, at `at` (which
// must exist). O(1).
std::size_t size_of(const location& at);
// Materialises the value at `at` (which must exist) as JSON. O(size of that value).
json materialise(const location& at);

// Returns a new root with `value` at `path_text`, creating missing parent objects, or
// kFailedPrecondition if an existing parent on the way is not an object. O(depth * log n).
// `edit` (from new_edit(), or 0) batches several writes: see pmap::set. With a non-zero token,
// only the final root of the batch may be published, and `root` must not be shared with a
// published version except through nodes the batch did not create.
// `owned`: the caller's `root` is the only pointer to that node anyone can copy (no version, view
// or snapshot holds it): every node reached from it that nothing else holds is changed in place
// (see pmap::set), so a write copies only what is shared. Then a failure part way (an error, or
// an exception) leaves `root` partly changed: the caller checks first that none can occur.
absl::StatusOr<node_ptr> assign(const node_ptr& root, std::string_view path_text, node_ptr value,
                                std::uint64_t edit = 0, bool owned = false);
// Returns a new root without `path_text`; the same root if it was absent. O(depth * log n).
// `owned`: as for assign.
node_ptr erase(const node_ptr& root, std::string_view path_text, std::uint64_t edit = 0,
               bool owned = false);
// Returns a root in which every object on `path_text` (an existing one; a missing tail is left
// missing) is a member map rather than a blob, so writes below it copy O(log n) instead of the
// whole object: the outbox is kept this way, however few messages it holds. Values are unchanged.
node_ptr with_maps_along(const node_ptr& root, std::string_view path_text, std::uint64_t edit = 0);
// Returns a root whose object at `outbox_path` (if any) is a member map holding every valid
// stored message as a typed node (make_message_node); an entry that is not one stays as it is.
// Values read back unchanged: an entry is typed only if its JSON form is exactly the codec's.
node_ptr with_typed_messages(const node_ptr& root, std::string_view outbox_path);
// Removes from the member map at `map_path` each of `keys` (any order; a repeated key once) that
// it holds and for which `remove(key, its node)` is true, appending the keys removed to
// `removed` in key order (views of `keys`). Returns the new root (`root` itself if none was
// removed or there is no such map), or nullptr if the value at `map_path` is not a member map
// (nothing is removed then). One pass over the map: O(depth + keys + nodes holding them), plus
// sorting the keys if they are not sorted.
node_ptr erase_members(const node_ptr& root, std::string_view map_path,
                       std::span<const std::string_view> keys,
                       const std::function<bool(std::string_view, const node_ptr&)>& remove,
                       std::vector<std::string_view>& removed, std::uint64_t edit);
// Returns an empty object in member-map form.
node_ptr make_empty_map();
// A fresh batch token for assign / erase.
std::uint64_t new_edit();

}  // namespace pop::detail
