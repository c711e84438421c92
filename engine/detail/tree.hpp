// Defines the persistent state tree: value nodes and the pure functions that read and update it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "pop/contracts/json.hpp"
#include "pop/engine/detail/pmap.hpp"

namespace pop::detail {

struct value_node;
using node_ptr = std::shared_ptr<const value_node>;

// One value of the state tree. Either a member map (a large JSON object: a persistent B+-tree of
// child nodes, so a write copies O(log n) of it), or a blob: any other JSON value, including small
// objects, stored whole. Blobs keep small records (an order, an outbox message) to one allocation;
// an object grows out of blob form when a write makes it large. The form is invisible to readers:
// materialising either gives the same JSON. Immutable once published; shared between versions.
struct value_node {
  bool is_map = false;
  json blob;               // when !is_map
  pmap<node_ptr> members;  // when is_map
};

// The largest object kept as a blob, by member count and by total nested element count.
inline constexpr std::size_t blob_max_members = 16;
inline constexpr std::size_t blob_max_elements = 64;

// Returns a node holding `value`: small values as a blob, large objects as member maps. O(size).
node_ptr make_node(json value);
// Returns a root node: always a member map, so top-level writes never copy the whole state.
node_ptr make_root(json object);

// A read position: a node, and inside a blob node a JSON value within it.
struct location {
  const value_node* node = nullptr;  // null: absent
  const json* inner = nullptr;       // non-null: the value inside node->blob
  bool exists() const { return node != nullptr; }
  bool is_object() const {
    return inner ? inner->is_object() : node->is_map || node->blob.is_object();
  }
};

// Returns the location of `path_text` (a valid dotted path) below `root`, or an absent location.
// O(depth * log n); materialises nothing.
location lookup(const value_node& root, std::string_view path_text);
// Returns the location of member `key` of object location `at`, or an absent location.
location member(const location& at, std::string_view key);
// The JSON value at `at` (which must exist) if it is stored as JSON (a blob or inside one), else
// nullptr (a member map: materialise it). O(1), no copy.
inline const json* stored_json(const location& at) {
  if (at.inner) return at.inner;
  return at.node->is_map ? nullptr : &at.node->blob;
}
// Materialises the value at `at` (which must exist) as JSON. O(size of that value).
json materialise(const location& at);

// Returns a new root with `value` at `path_text`, creating missing parent objects, or
// kFailedPrecondition if an existing parent on the way is not an object. O(depth * log n).
// `edit` (from new_edit(), or 0) batches several writes: see pmap::set. With a non-zero token,
// only the final root of the batch may be published, and `root` must not be shared with a
// published version except through nodes the batch did not create.
absl::StatusOr<node_ptr> assign(const node_ptr& root, std::string_view path_text, node_ptr value,
                                std::uint64_t edit = 0);
// Returns a new root without `path_text`; the same root if it was absent. O(depth * log n).
node_ptr erase(const node_ptr& root, std::string_view path_text, std::uint64_t edit = 0);
// A fresh batch token for assign / erase.
std::uint64_t new_edit();

}  // namespace pop::detail
