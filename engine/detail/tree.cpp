#include "pop/engine/detail/tree.hpp"

#include <algorithm>
#include <array>
#include <cassert>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "pop/contracts/path.hpp"
#include "pop/contracts/status.hpp"
#include "pop/engine/detail/message_record.hpp"
#include "pop/engine/detail/packed.hpp"

namespace pop::detail {
namespace {

bool fits_blob(const json& j, std::size_t& budget) {
  if (j.is_object() && j.size() > blob_max_members) return false;
  if (!j.is_structured()) return true;
  for (const json& element : j) {
    if (budget == 0) return false;
    --budget;
    if (!fits_blob(element, budget)) return false;
  }
  return true;
}

// Every node of a large state is one of these: a typed message keeps its state beside the node
// (message_state), so that one form does not make all the others larger.
static_assert(sizeof(void*) != 8 || sizeof(value_node) <= 24);

// A packed node and its bytes in one allocation of about their size.
template <std::size_t N>
struct packed_block {
  explicit packed_block(std::string_view packed) : node(value_node::packed_form{}, bytes) {
    std::memcpy(bytes, packed.data(), packed.size());
  }
  const value_node node;
  char bytes[N];
};

// A typed message node, its state and its record in one allocation of about their size.
template <std::size_t N>
struct record_block {
  explicit record_block(std::string_view record) : state(bytes, nullptr), node(&state) {
    std::memcpy(bytes, record.data(), record.size());
  }
  const message_state state;
  const value_node node;
  char bytes[N];
};

// The byte capacities of the packed blocks: steps of 8 up to 128, then of 32 up to 512.
constexpr std::size_t packed_classes = 16 + 12;
constexpr std::size_t packed_capacity(std::size_t i) {
  return i < 16 ? 8 * (i + 1) : 128 + 32 * (i - 15);
}
constexpr std::size_t packed_max = packed_capacity(packed_classes - 1);

template <template <std::size_t> class Block, std::size_t N>
node_ptr make_block(std::string_view bytes) {
  auto block = std::make_shared<const Block<N>>(bytes);
  const value_node* node = &block->node;
  return node_ptr(std::move(block), node);  // (owns the block)
}

template <template <std::size_t> class Block, std::size_t... I>
constexpr auto block_makers(std::index_sequence<I...>) {
  return std::array<node_ptr (*)(std::string_view), sizeof...(I)>{
      &make_block<Block, packed_capacity(I)>...};
}

// The node of a `Block` (packed_block or record_block) holding `packed` (at most packed_max
// bytes), of the smallest capacity that holds them.
template <template <std::size_t> class Block>
node_ptr make_sized(std::string_view packed) {
  static constexpr auto makers = block_makers<Block>(std::make_index_sequence<packed_classes>{});
  const std::size_t n = packed.size();
  const std::size_t i = n <= 128 ? (n + 7) / 8 - 1 : 15 + (n - 128 + 31) / 32;
  return makers[i](packed);
}

// A packed node holding `packed` (at most packed_max bytes).
node_ptr make_packed(std::string_view packed) {
  return make_sized<packed_block>(packed);
}

// For a string, array or object of up to packed_max bytes packed, a packed node; else nullptr.
node_ptr try_pack(const json& value) {
  if (!value.is_string() && !value.is_structured()) return nullptr;
  thread_local std::string bytes;
  bytes.clear();
  if (!packed::encode(value, bytes, packed_max)) return nullptr;
  return make_packed(bytes);
}

// A packed node if `value` packs, else a blob node.
template <class J>
node_ptr make_blob(J&& value) {
  if (node_ptr p = try_pack(value)) return p;
  return std::make_shared<const value_node>(value_node::blob_form{}, std::forward<J>(value));
}

node_ptr make_map(pmap<node_ptr> members) {
  // Not a const object: an edit batch may still change a map node it made (with_members).
  return std::make_shared<value_node>(value_node::map_form{}, std::move(members));
}

// The node of `value`: small values whole (packed when they pack), large objects as member
// maps. From an rvalue, member values are moved into their nodes; from a const value nothing is
// moved, so the nodes of a large state are allocated while it lives and it is freed in one piece
// afterwards (see make_root: freeing its parts one by one while building would scatter the tree
// over the holes they leave, and keep those pages resident).
template <class J>
node_ptr build_node(J&& value) {
  std::size_t budget = blob_max_elements;
  if (!value.is_object() || fits_blob(value, budget)) return make_blob(std::forward<J>(value));
  auto& object =
      *value.template get_ptr<std::conditional_t<std::is_const_v<std::remove_reference_t<J>>,
                                                 const json::object_t*, json::object_t*>>();
  std::vector<std::pair<std::string, node_ptr>> entries;
  entries.reserve(object.size());
  for (auto& [key, member] : object) {
    if constexpr (std::is_const_v<std::remove_reference_t<J>>) {
      entries.emplace_back(key, build_node(member));
    } else {
      entries.emplace_back(key, build_node(std::move(member)));
    }
  }
  return make_map(pmap<node_ptr>::from_sorted(std::move(entries)));
}

// The prefix of `full` that ends with `segment` (a view into `full`), for error messages.
std::string_view prefix_through(std::string_view full, std::string_view segment) {
  return full.substr(0, static_cast<std::size_t>(segment.data() + segment.size() - full.data()));
}

absl::Status not_an_object(std::string_view full, std::string_view prefix, const json& holder) {
  return absl::FailedPreconditionError(
      absl::StrCat("cannot write '", to_absl(full), "': '", to_absl(prefix), "' holds ",
                   to_absl(type_with_article(holder)), ", not an object"));
}

// Writes `value` at `rest` inside the JSON object `doc`, creating missing objects.
absl::Status json_assign(json& doc, std::string_view rest, json value, std::string_view full) {
  json* cur = &doc;
  while (true) {
    const std::string_view segment = take_segment(rest);
    auto& object = cur->get_ref<json::object_t&>();
    if (rest.empty()) {
      object.insert_or_assign(std::string(segment), std::move(value));
      return absl::OkStatus();
    }
    auto it = object.find(segment);
    if (it == object.end()) {
      it = object.emplace(std::string(segment), json::object()).first;
    } else if (!it->second.is_object()) {
      return not_an_object(full, prefix_through(full, segment), it->second);
    }
    cur = &it->second;
  }
}

// Removes `rest` inside JSON object `doc`; returns whether something was removed.
bool json_erase(json& doc, std::string_view rest) {
  json* cur = &doc;
  while (true) {
    const std::string_view segment = take_segment(rest);
    if (!cur->is_object()) return false;
    auto& object = cur->get_ref<json::object_t&>();
    const auto it = object.find(segment);
    if (it == object.end()) return false;
    if (rest.empty()) {
      object.erase(it);
      return true;
    }
    cur = &it->second;
  }
}

// The map node `node` (a member map) with `members` instead: `node` itself, changed in place, if
// `owned` (only the caller can reach it: see mine), else a new node.
node_ptr with_members(const node_ptr& node, bool owned, pmap<node_ptr> members) {
  if (!owned) return make_map(std::move(members));
  const_cast<value_node&>(*node).replace_members(std::move(members));
  return node;
}

// Whether the map node `node` was created by edit batch `edit` (and so may be changed in place).
bool owned_by(const value_node& node, std::uint64_t edit) {
  return edit != 0 && node.members().edit() == edit;
}

// Whether the map node `node` may be changed in place: the batch created it, or it is reached only
// through nodes the caller alone can reach (`owned`) and nothing else holds it (see pmap::set).
bool mine(const node_ptr& node, std::uint64_t edit, bool owned) {
  return owned_by(*node, edit) || (owned && sole_owner(node));
}

// The packed node `bytes` (a packed object) with `value` written at `rest` below it, spliced in
// place without decoding; nullptr if that cannot be done so (a value on the way is not an object,
// or the result is too large to stay whole): the caller then takes the JSON way.
node_ptr assign_packed(const char* bytes, std::string_view rest, const value_node& value) {
  thread_local std::string value_bytes;
  thread_local std::string spliced;
  std::string_view packed_value;
  if (const char* p = value.packed_bytes()) {
    packed_value = {p, packed::length(p)};
  } else {
    value_bytes.clear();
    const location at{&value, nullptr};
    bool encoded = false;
    if (const json* stored = stored_json(at)) {
      encoded = packed::encode(*stored, value_bytes, packed_max);
    } else {
      encoded = packed::encode(materialise(at), value_bytes, packed_max);
    }
    if (!encoded) return nullptr;
    packed_value = value_bytes;
  }
  if (!packed::assign(bytes, rest, packed_value, spliced)) return nullptr;
  std::size_t budget = blob_max_elements;
  if (spliced.size() > packed_max || !packed::fits(spliced.data(), blob_max_members, budget)) {
    return nullptr;
  }
  return make_packed(spliced);
}

absl::StatusOr<node_ptr> assign_at(const node_ptr& node, std::string_view rest, node_ptr value,
                                   std::string_view full, std::uint64_t edit, bool owned) {
  if (rest.empty()) return value;
  if (node && node->is_map()) {
    const std::string_view segment = take_segment(rest);
    const bool in_place = mine(node, edit, owned);
    if (rest.empty()) {  // a member of this map: set in one descent, without finding it first
      return with_members(node, in_place,
                          node->members().set(segment, std::move(value), edit, in_place));
    }
    bool child_owned = false;
    const node_ptr* child = node->members().find(segment, edit, in_place, child_owned);
    static const node_ptr none;
    // (By reference: a copy of the child's pointer would count as another holder.)
    POP_ASSIGN_OR_RETURN(node_ptr updated, assign_at(child ? *child : none, rest, std::move(value),
                                                     full, edit, child_owned));
    if (child && updated == *child) return node;  // changed in place below
    return with_members(node, in_place,
                        node->members().set(segment, std::move(updated), edit, in_place));
  }
  if (node) {
    if (const char* bytes = node->packed_bytes()) {
      if (node_ptr spliced = assign_packed(bytes, rest, *value)) return spliced;
    }
  }
  // A blob or a missing object: write at the JSON level and let make_node choose the form again,
  // so an object that grows too large becomes a member map.
  // (materialise: a typed message gives its JSON without keeping a copy in the published node)
  json doc = node ? materialise({node.get(), nullptr}) : json::object();
  if (!doc.is_object()) {
    return not_an_object(
        full, full.substr(0, static_cast<std::size_t>(rest.data() - full.data()) - 1), doc);
  }
  POP_RETURN_IF_ERROR(json_assign(doc, rest, materialise({value.get(), nullptr}), full));
  return make_node(std::move(doc));
}

node_ptr erase_at(const node_ptr& node, std::string_view rest, std::uint64_t edit, bool owned) {
  if (node->is_map()) {
    const std::string_view segment = take_segment(rest);
    const bool in_place = mine(node, edit, owned);
    if (rest.empty()) {
      if (!node->members().find(segment)) return node;
      return with_members(node, in_place, node->members().erase(segment, edit, in_place));
    }
    bool child_owned = false;
    const node_ptr* child = node->members().find(segment, edit, in_place, child_owned);
    if (!child) return node;
    node_ptr updated = erase_at(*child, rest, edit, child_owned);
    if (updated == *child) return node;  // unchanged, or changed in place below
    return with_members(node, in_place,
                        node->members().set(segment, std::move(updated), edit, in_place));
  }
  if (const char* bytes = node->packed_bytes()) {
    thread_local std::string spliced;
    if (!packed::erase(bytes, rest, spliced)) return node;
    return make_packed(spliced);
  }
  if (!location{node.get(), nullptr}.is_object()) return node;
  json doc = materialise({node.get(), nullptr});
  if (!json_erase(doc, rest)) return node;
  return make_blob(std::move(doc));
}

}  // namespace

const json& value_node::as_json() const {
  if (const json* blob = std::get_if<json>(&form_)) return *blob;
  assert(std::holds_alternative<typed>(form_));
  const message_state& t = *std::get_if<typed>(&form_)->state;
  if (const json* built = t.json_form.load(std::memory_order_acquire)) return *built;
  auto fresh = std::make_unique<const json>(message_copy().to_json());
  const json* expected = nullptr;
  if (t.json_form.compare_exchange_strong(expected, fresh.get(), std::memory_order_acq_rel)) {
    return *fresh.release();
  }
  return *expected;  // another reader built it first
}

const outbox_message* value_node::message() const {
  const typed* form = std::get_if<typed>(&form_);
  if (form == nullptr) return nullptr;
  const message_state& t = *form->state;
  if (const outbox_message* m = t.decoded.load(std::memory_order_acquire)) return m;
  auto fresh = std::make_unique<const outbox_message>(decode_message_record(t.record));
  const outbox_message* expected = nullptr;
  if (t.decoded.compare_exchange_strong(expected, fresh.get(), std::memory_order_acq_rel)) {
    return fresh.release();
  }
  return expected;  // another reader decoded it first
}

message_schedule value_node::schedule() const {
  const message_state& t = *std::get_if<typed>(&form_)->state;
  if (const outbox_message* m = t.decoded.load(std::memory_order_acquire)) {
    return {m->key, m->next_attempt_at_us, m->created_at_us};
  }
  return record_schedule(t.record);
}

void value_node::message_into(outbox_message& into) const {
  const message_state& t = *std::get_if<typed>(&form_)->state;
  if (const outbox_message* m = t.decoded.load(std::memory_order_acquire)) {
    into = *m;
    return;
  }
  decode_message_record(t.record, into);
}

outbox_message value_node::message_copy() const {
  const message_state& t = *std::get_if<typed>(&form_)->state;
  if (const outbox_message* m = t.decoded.load(std::memory_order_acquire)) return *m;
  return decode_message_record(t.record);
}

namespace {
// A typed message node and its message in one allocation: for a message whose payload has no
// record (see encode_message_record).
struct message_block {
  explicit message_block(outbox_message m)
      : message(std::move(m)), state(nullptr, &message), node(&state) {}
  const outbox_message message;
  const message_state state;
  const value_node node;
};

// A typed message node and a record too long for a record_block.
struct long_record_block {
  explicit long_record_block(std::string r)
      : record(std::move(r)), state(record.data(), nullptr), node(&state) {}
  const std::string record;
  const message_state state;
  const value_node node;
};

// The node of message record `record`.
node_ptr make_record_node(const std::string& record) {
  if (record.size() <= packed_max) return make_sized<record_block>(record);
  auto block = std::make_shared<const long_record_block>(record);
  const value_node* node = &block->node;
  return node_ptr(std::move(block), node);  // (owns the block)
}

thread_local std::string record_bytes;

// The node of the record in `record_bytes`, whose buffer is kept for the next one unless a
// large message made it large.
node_ptr take_record_node() {
  node_ptr node = make_record_node(record_bytes);
  constexpr std::size_t kept_capacity = 64 * 1024;
  if (record_bytes.capacity() > kept_capacity) std::string().swap(record_bytes);
  return node;
}
}  // namespace

node_ptr make_message_node(const outbox_message& m) {
  if (encode_message_record(m, record_bytes)) return take_record_node();
  auto block = std::make_shared<const message_block>(m);
  const value_node* node = &block->node;
  return node_ptr(std::move(block), node);  // (owns the block)
}

node_ptr make_message_node(std::uint32_t index, const message_draft& draft,
                           std::int64_t created_at_us, std::uint64_t version) {
  if (encode_message_record(index, draft, created_at_us, version, record_bytes)) {
    return take_record_node();
  }
  outbox_message m{.id = make_message_id(version, index),
                   .topic = draft.topic,
                   .key = draft.key,
                   .payload = draft.payload,
                   .headers = draft.headers,
                   .created_at_us = created_at_us,
                   .version = version};
  return make_message_node(m);
}

node_ptr make_node(json value) {
  return build_node(std::move(value));
}

node_ptr make_packed_node(std::string_view bytes) {
  if (bytes.empty()) return nullptr;
  if (bytes.size() <= packed_max &&
      packed::valid(bytes, packed::is_object(bytes.data()), blob_max_members, blob_max_elements)) {
    return make_packed(bytes);
  }
  // Past the limits of a packed node (or not a value at all): as make_node would store it.
  if (!packed::valid(bytes, false, 0, 0)) return nullptr;
  return make_node(packed::decode(bytes.data()));
}

node_ptr make_checked_small_node(const json& value) {
  if (!value.is_string() && !value.is_structured()) return nullptr;
  thread_local std::string bytes;
  bytes.clear();
  if (!packed::encode_checked(value, bytes, packed_max, value.is_object(), blob_max_members,
                              blob_max_elements)) {
    return nullptr;
  }
  return make_packed(bytes);
}

// `n` itself if it is a member map, else its object (which must be one) as a member map.
node_ptr as_member_map(const node_ptr& n) {
  if (n->is_map()) return n;
  std::vector<std::pair<std::string, node_ptr>> entries;
  json object = materialise({n.get(), nullptr});
  for (auto& [key, member] : object.get_ref<json::object_t&>()) {
    entries.emplace_back(key, make_node(std::move(member)));
  }
  return make_map(pmap<node_ptr>::from_sorted(std::move(entries)));
}

node_ptr make_root(const json& object) {
  std::vector<std::pair<std::string, node_ptr>> entries;
  entries.reserve(object.size());
  for (const auto& [key, member] : object.get_ref<const json::object_t&>()) {
    entries.emplace_back(key, build_node(member));
  }
  return make_map(pmap<node_ptr>::from_sorted(std::move(entries)));
}

bool location::is_object() const {
  if (inner) return inner->is_object();
  if (const char* p = packed_value()) return packed::is_object(p);
  return node->is_map() || node->is_message() || node->as_json().is_object();
}

std::size_t size_of(const location& at) {
  if (const char* p = at.packed_value()) return packed::size(p);
  if (const json* j = stored_json(at)) return j->is_structured() ? j->size() : 0;
  return at.node->members().size();
}

location member(const location& at, std::string_view key) {
  if (!at.exists()) return {};
  if (const char* p = at.packed_value()) {
    const char* found = packed::member(p, key);
    if (!found) return {};
    return {at.node, nullptr, found};
  }
  const json* holder = at.inner ? at.inner : (at.node->is_map() ? nullptr : &at.node->as_json());
  if (holder) {
    if (!holder->is_object()) return {};
    const auto& object = holder->get_ref<const json::object_t&>();
    const auto it = object.find(key);
    if (it == object.end()) return {};
    return {at.node, &it->second};
  }
  const node_ptr* child = at.node->members().find(key);
  if (!child) return {};
  return {child->get(), nullptr};
}

location lookup(const value_node& root, std::string_view path_text) {
  location at{&root, nullptr};
  while (!path_text.empty() && at.exists()) at = member(at, take_segment(path_text));
  return at;
}

json materialise(const location& at) {
  if (at.inner) return *at.inner;
  if (const char* p = at.packed_value()) return packed::decode(p);
  // A typed message is converted without keeping its JSON form (a whole-state copy, such as a
  // journal snapshot, would otherwise double the memory of every pending message).
  if (at.node->is_message()) return at.node->message_copy().to_json();
  if (!at.node->is_map()) return at.node->as_json();
  json out = json::object();
  auto& object = out.get_ref<json::object_t&>();
  for (auto it = at.node->members().begin(); it != at.node->members().end(); ++it) {
    object.emplace_hint(object.end(), it.key(), materialise({it.value().get(), nullptr}));
  }
  return out;
}

absl::StatusOr<node_ptr> assign(const node_ptr& root, std::string_view path_text, node_ptr value,
                                std::uint64_t edit, bool owned) {
  return assign_at(root, path_text, std::move(value), path_text, edit, owned);
}

node_ptr erase(const node_ptr& root, std::string_view path_text, std::uint64_t edit, bool owned) {
  return erase_at(root, path_text, edit, owned);
}

node_ptr with_maps_along(const node_ptr& root, std::string_view path_text, std::uint64_t edit) {
  // Not an object: writes below it fail anyway.
  if (!location{root.get(), nullptr}.is_object()) return root;
  const node_ptr node = as_member_map(root);
  if (path_text.empty()) return node;
  const std::string_view segment = take_segment(path_text);
  const node_ptr* child = node->members().find(segment);
  if (!child) return node;
  node_ptr updated = with_maps_along(*child, path_text, edit);
  if (updated == *child) return node;
  return make_map(node->members().set(segment, std::move(updated), edit));
}

node_ptr with_typed_messages(const node_ptr& root, std::string_view outbox_path) {
  const location queue = lookup(*root, outbox_path);
  if (!queue.exists() || !queue.is_object()) return root;
  std::vector<std::pair<std::string, node_ptr>> entries;
  const auto add = [&](std::string_view id, json stored) {
    absl::StatusOr<outbox_message> m = outbox_message::from_json(stored);
    if (m.ok() && m->id == id && m->to_json() == stored) {
      entries.emplace_back(std::string(id), make_message_node(*m));
    } else {
      entries.emplace_back(std::string(id), make_node(std::move(stored)));
    }
  };
  if (queue.inner || !queue.node->is_map()) {
    json j = materialise(queue);
    for (auto& [id, member] : j.get_ref<json::object_t&>()) add(id, std::move(member));
  } else {
    for (auto it = queue.node->members().begin(); it != queue.node->members().end(); ++it) {
      if (it.value()->is_message()) {
        entries.emplace_back(std::string(it.key()), it.value());  // typed already
      } else {
        add(it.key(), materialise({it.value().get(), nullptr}));
      }
    }
  }
  // Parents first become maps, so the new queue is linked in, not folded back into a blob.
  return assign(with_maps_along(root, outbox_path), outbox_path,
                make_map(pmap<node_ptr>::from_sorted(std::move(entries))))
      .value_or(root);
}

node_ptr erase_members(const node_ptr& root, std::string_view map_path,
                       std::span<const std::string_view> keys,
                       const std::function<bool(std::string_view, const node_ptr&)>& remove,
                       std::vector<std::string_view>& removed, std::uint64_t edit) {
  const location at = lookup(*root, map_path);
  if (!at.exists()) return root;
  if (at.inner != nullptr || at.packed != nullptr || !at.node->is_map()) return nullptr;
  // One pass over the map in key order (a relay's ids are sorted already).
  std::vector<std::string_view> sorted;
  std::span<const std::string_view> ordered = keys;
  if (!std::is_sorted(keys.begin(), keys.end())) {
    sorted.assign(keys.begin(), keys.end());
    std::sort(sorted.begin(), sorted.end());
    ordered = sorted;
  }
  std::size_t erased = 0;
  pmap<node_ptr> members = at.node->members().erase_sorted_if(
      ordered,
      [&](std::size_t i, const node_ptr& entry) {
        if (!remove(ordered[i], entry)) return false;
        removed.push_back(ordered[i]);
        return true;
      },
      erased, edit);
  if (erased == 0) return root;
  // Every object on the way exists, so this cannot fail.
  return assign(root, map_path, make_map(std::move(members)), edit).value();
}

node_ptr make_empty_map() {
  return make_map(pmap<node_ptr>());
}

std::uint64_t new_edit() {
  return pmap<node_ptr>::new_edit();
}

}  // namespace pop::detail
