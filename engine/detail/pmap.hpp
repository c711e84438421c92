// pop::detail::pmap: a persistent ordered map from string keys to values, as a B+-tree.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "pop/engine/detail/block_cache.hpp"
#include "pop/engine/detail/compact_key.hpp"
#include "pop/engine/detail/inline_vec.hpp"

namespace pop::detail {

// Whether `p` is the only pointer to its object: no one else holds it, nor can anyone copy it
// unless the caller lets them (a count of 1 does not grow by itself). Then the caller may change
// the object: an acquire fence after reading the count orders the last other holder's reads,
// made before it let go (its decrement is a release), before the caller's changes. Under
// ThreadSanitizer, which does not model fences, a copy of the pointer does it instead (its
// acquire-release increment; two atomic read-modify-writes, so only there).
template <class T>
bool sole_owner(const std::shared_ptr<T>& p) {
  if (p.use_count() != 1) return false;
#if defined(__SANITIZE_THREAD__)
  const std::shared_ptr<T> touch = p;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
  const std::shared_ptr<T> touch = p;
#else
  std::atomic_thread_fence(std::memory_order_acquire);
#endif
#else
  std::atomic_thread_fence(std::memory_order_acquire);
#endif
  return true;
}

// An immutable ordered map from string keys (plain byte order, stored as compact_key) to values of
// type V. "Modifying" calls return a new map that shares every untouched node with the old one.
//
// Structure: a B+-tree. Leaves hold the entries; an inner node holds, for each child, the
// child's minimum key and the child pointer. Every node stores the number of entries in its
// subtree. Invariants:
//   - an empty map has a null root;
//   - every node has at most max_width (16) entries or children, and every node except the
//     root has at least min_width (4); an inner root has at least 2 children;
//   - keys are strictly increasing within and across leaves, and all leaves are at one depth;
//   - an inner node's keys[i] is the minimum key of the subtree children[i].
// check_invariants() verifies all of these.
//
// Threading and lifetime: a node is never changed while anything but its changer can reach it
// (a write copies the path from the root to the changed leaf, O(log n) nodes, except for nodes
// its batch made or that only an `owned` caller reaches: see set), so any number of threads may
// read the same or different versions concurrently. A pmap is a single shared_ptr: cheap to copy. V
// must be copyable; copying a V happens when a leaf holding it is copied.
template <class V>
class pmap {
 public:
  // One entry of the map, as stored in a leaf and as seen through an iterator.
  struct entry {
    compact_key key;
    V value;
  };
  class iterator;

  static constexpr std::size_t max_width = 16;
  static constexpr std::size_t min_width = 4;

  pmap() = default;

  // Returns a map holding `entries`, which must be sorted by key with unique keys (checked by
  // assert only). Nodes are filled evenly bottom-up, so no node except the root is under
  // min_width. O(n).
  static pmap from_sorted(std::vector<std::pair<std::string, V>> entries) {
    assert(std::adjacent_find(entries.begin(), entries.end(), [](const auto& a, const auto& b) {
             return a.first >= b.first;
           }) == entries.end());
    if (entries.empty()) return pmap();
    std::vector<node_ptr> level;
    std::size_t next = 0;
    for (std::size_t size : even_groups(entries.size())) {
      auto leaf = new_node(true);
      leaf->count = size;
      for (std::size_t i = 0; i < size; ++i, ++next) {
        leaf->entries.push_back(
            entry{std::move(entries[next].first), std::move(entries[next].second)});
      }
      level.push_back(std::move(leaf));
    }
    while (level.size() > 1) {
      std::vector<node_ptr> parents;
      next = 0;
      for (std::size_t size : even_groups(level.size())) {
        auto inner = new_node(false);
        inner->count = 0;
        for (std::size_t i = 0; i < size; ++i, ++next) {
          inner->count += level[next]->count;
          inner->in.keys.push_back(min_key(*level[next]));
          inner->in.children.push_back(std::move(level[next]));
        }
        parents.push_back(std::move(inner));
      }
      level = std::move(parents);
    }
    return pmap(std::move(level.front()));
  }

  // Returns the number of entries. O(1).
  std::size_t size() const { return root_ ? root_->count : 0; }
  // Returns whether the map has no entries. O(1).
  bool empty() const { return root_ == nullptr; }

  // Returns a pointer to the value stored under `key`, or nullptr if there is none. The
  // pointer stays valid while any pmap sharing the node that holds it is alive. O(log n), no
  // allocation.
  const V* find(std::string_view key) const {
    // (Not the owned find below: reads are the hottest path, and this one checks no ownership.)
    const node* n = root_.get();
    if (n == nullptr) return nullptr;
    const bool far = large(*n);
    while (!n->leaf) {
      n = n->in.children[child_index(*n, key)].get();
      if (far) prefetch(n);
    }
    std::size_t i = entry_index(*n, key);
    if (i < n->entries.size() && equal_bytes(n->entries[i].key.view(), key)) {
      return &n->entries[i].value;
    }
    return nullptr;
  }

  // find(key), also saying whether every node on the way to it may be changed in place by a
  // set(..., edit, owned) (see set): then so may the value found, if nothing else holds it.
  const V* find(std::string_view key, std::uint64_t edit, bool owned, bool& path_owned) const {
    path_owned = false;
    if (!root_) return nullptr;
    bool mine_so_far = mine(root_, edit, owned);
    const node* n = root_.get();
    const bool far = large(*n);
    while (!n->leaf) {
      const node_ptr& child = n->in.children[child_index(*n, key)];
      if (far) prefetch(child.get());
      mine_so_far = mine(child, edit, mine_so_far);
      n = child.get();
    }
    std::size_t i = entry_index(*n, key);
    if (i < n->entries.size() && equal_bytes(n->entries[i].key.view(), key)) {
      path_owned = mine_so_far;
      return &n->entries[i].value;
    }
    return nullptr;
  }

  // While a retire_scope is active on this thread, a value that an owned change (set, erase)
  // removes from a node changed in place is moved into it instead of being destroyed there: the
  // caller frees it later (say, outside a lock; a removed value can be a large subtree).
  class retire_scope {
   public:
    explicit retire_scope(std::vector<V>& into) : outer_(retired_) { retired_ = &into; }
    retire_scope(const retire_scope&) = delete;
    retire_scope& operator=(const retire_scope&) = delete;
    ~retire_scope() { retired_ = outer_; }

   private:
    std::vector<V>* outer_;
  };

  // Returns a token for a batch of changes (see `edit` below); unique in the process.
  static std::uint64_t new_edit() {
    static std::atomic<std::uint64_t> next{1};
    return next.fetch_add(1, std::memory_order_relaxed);
  }

  // Returns a map equal to this one with `key` mapped to `value` (inserted, or replacing the
  // old value). *this is unchanged (unless batched or owned, below). O(log n) nodes copied.
  //
  // `edit` batches changes: nodes created by a call with a non-zero token are changed in place
  // by later calls with the same token instead of being copied again, so k changes cost one copy
  // of each touched node, not k. Only legal while no map but the batch's own results holds those
  // nodes: pass a fresh new_edit() per batch and publish only its final map.
  //
  // `owned`: nothing but the caller can reach this map (the map's holder is the caller's own, and
  // the caller is the only one who can reach that). Then every node that nothing else holds either
  // (use_count 1, on a path of such nodes from the root) is changed in place too, whichever batch
  // made it: a commit on a version no one else holds edits it in place instead of copying paths.
  pmap set(std::string_view key, V value, std::uint64_t edit = 0, bool owned = false) const {
    if (!root_) {
      auto leaf = new_node(true);
      leaf->count = 1;
      leaf->edit = edit;
      leaf->entries.push_back(entry{compact_key(key), std::move(value)});
      return pmap(std::move(leaf));
    }
    auto [left, right] = insert(root_, key, std::move(value), edit, owned, large(*root_));
    if (!right) return pmap(std::move(left));
    auto root = new_node(false);
    root->edit = edit;
    root->count = left->count + right->count;
    root->in.keys.push_back(min_key(*left));
    root->in.keys.push_back(min_key(*right));
    root->in.children.push_back(std::move(left));
    root->in.children.push_back(std::move(right));
    return pmap(std::move(root));
  }

  // Returns a map equal to this one without `key`. If `key` is absent, returns *this (same
  // root, see same_root). *this is unchanged (unless batched or owned, see set). O(log n) nodes
  // copied.
  // `owned`: as for set.
  pmap erase(std::string_view key, std::uint64_t edit = 0, bool owned = false) const {
    bool erased = false;
    return erase_if(
        key, [](const V&) { return true; }, erased, edit, owned);
  }

  // erase(key) if `key` is present and `pred(value)` holds, in one descent; `erased` says
  // whether it was.
  template <class Pred>
  pmap erase_if(std::string_view key, const Pred& pred, bool& erased, std::uint64_t edit = 0,
                bool owned = false) const {
    erased = false;
    if (!root_) return *this;
    auto [found, root] = remove(root_, key, edit, pred, owned);
    if (!found) return *this;
    erased = true;
    if (root->count == 0) return pmap();
    while (!root->leaf && root->in.children.size() == 1) root = root->in.children.front();
    return pmap(std::move(root));
  }

  // Erases in one pass every entry whose key is among `keys` (sorted ascending; a repeated key
  // counts once) and for which `pred(i, value)` holds, `i` being that key's index in `keys`.
  // Returns the new map (*this, same root, if nothing was erased) and adds the number erased to
  // `erased`. Visits each node holding one of the keys once, so erasing k keys that sit together
  // (an outbox's oldest messages) costs O(k + log^2 n) (a merge at a run's end may reach down to
  // the leaves) instead of k descents. Batched like set.
  template <class Keys, class Pred>
  pmap erase_sorted_if(const Keys& keys, Pred&& pred, std::size_t& erased,
                       std::uint64_t edit = 0) const {
    if (!root_ || keys.size() == 0) return *this;
    const std::size_t before = erased;
    auto [changed, root] = erase_run(root_, keys, 0, keys.size(), edit, pred, erased);
    if (!changed || erased == before) return *this;
    if (root->count == 0) return pmap();
    while (!root->leaf && root->in.children.size() == 1) root = root->in.children.front();
    return pmap(std::move(root));
  }

  // The edit token of the batch that created the root node (0 if none): a map whose root carries
  // a batch's token was made by that batch.
  std::uint64_t edit() const { return root_ ? root_->edit : 0; }

  // Returns whether both maps have the same root node, in which case they are equal; a write
  // that changed nothing (erase of an absent key) is detected this way. O(1).
  bool same_root(const pmap& other) const { return root_ == other.root_; }

  // Returns an iterator to the first entry, or end() when empty. O(log n), no allocation.
  iterator begin() const {
    iterator it;
    if (root_) it.descend_leftmost(root_.get());
    return it;
  }
  // Returns the past-the-end iterator. O(1).
  iterator end() const { return iterator(); }

  // Returns an iterator to the first entry whose key is >= `key`, or end() if there is none.
  // O(log n), no allocation.
  iterator lower_bound(std::string_view key) const {
    iterator it;
    const node* n = root_.get();
    if (n == nullptr) return it;
    while (!n->leaf) {
      std::size_t c = child_index(*n, key);
      it.push(n, c);
      n = n->in.children[c].get();
    }
    it.push(n, entry_index(*n, key));
    it.skip_exhausted();
    return it;
  }

  // Returns the number of nodes (leaves and inner nodes) of the tree. A debugging aid for tests
  // of its shape. O(n).
  std::size_t node_count() const { return root_ ? nodes_below(*root_) : 0; }

  // Returns whether every invariant listed on the class holds. A debugging aid for tests.
  // O(n).
  bool check_invariants() const {
    if (!root_) return true;
    if (!root_->leaf && root_->in.children.size() < 2) return false;
    if (root_->count == 0) return false;
    std::size_t leaf_depth = 0;
    const compact_key* previous = nullptr;
    return check_node(*root_, true, 0, leaf_depth, previous);
  }

 private:
  struct node;
  using node_ptr = std::shared_ptr<const node>;

  // Room for one more than max_width: an insert into a full node splits it right after.
  static constexpr std::size_t node_capacity = max_width + 1;
  struct inner_part {
    inline_vec<compact_key, node_capacity> keys;  // the minimum key of each child
    inline_vec<node_ptr, node_capacity> children;
  };
  // Leaves hold `entries`; inner nodes `in`. Stored inline: a node is one allocation.
  struct node {
    explicit node(bool is_leaf) : leaf(is_leaf) {
      if (leaf) {
        std::construct_at(&entries);
      } else {
        std::construct_at(&in);
      }
    }
    node(const node& other) : leaf(other.leaf), edit(other.edit), count(other.count) {
      if (leaf) {
        std::construct_at(&entries, other.entries);
      } else {
        std::construct_at(&in, other.in);
      }
    }
    node& operator=(const node&) = delete;
    ~node() {
      if (leaf) {
        std::destroy_at(&entries);
      } else {
        std::destroy_at(&in);
      }
    }
    const bool leaf;
    std::uint64_t edit = 0;  // the batch that created it; 0: none (changed in place only if owned)
    std::size_t count = 0;
    union {
      inline_vec<entry, node_capacity> entries;
      inner_part in;
    };
  };

  // Returns the most levels a tree obeying the invariants can have: one with h levels holds at
  // least 2 * min_width^(h-1) entries, and the entry count fits a size_t.
  static constexpr std::size_t depth_bound() {
    std::size_t levels = 1;
    for (std::size_t smallest = 2; smallest <= SIZE_MAX / min_width; smallest *= min_width) {
      ++levels;
    }
    return levels;
  }

  // Iterator frames, one per level (21 levels for min_width 8).
  static constexpr std::size_t max_depth = depth_bound();

  explicit pmap(node_ptr root) : root_(std::move(root)) {}

  static std::size_t width(const node& n) {
    return n.leaf ? n.entries.size() : n.in.children.size();
  }

  static const compact_key& min_key(const node& n) {
    return n.leaf ? n.entries.front().key : n.in.keys.front();
  }

  // Whether the map under root `n` is too large for the processor's nearer caches (its nodes and
  // values past a few MB), so a descent through it should prefetch each node it enters.
  static bool large(const node& n) { return n.count >= (std::size_t{1} << 15); }
  // Starts loading all of node `n` at once: a binary search in it then waits about one memory
  // latency, not one per probe (a node is 14 cache lines; a search touches 4-5 of them, each
  // address known only from the comparison before).
  static void prefetch(const node* n) {
    const char* bytes = reinterpret_cast<const char*>(n);
    for (std::size_t at = 0; at < sizeof(node); at += 64) __builtin_prefetch(bytes + at);
  }

  // Index of the child of inner node `n` whose subtree would hold `key`.
  static std::size_t child_index(const node& n, std::string_view key) {
    auto it = std::upper_bound(
        n.in.keys.begin(), n.in.keys.end(), key,
        [](std::string_view k, const compact_key& s) { return compare_bytes(k, s.view()) < 0; });
    return it == n.in.keys.begin() ? 0 : static_cast<std::size_t>(it - n.in.keys.begin()) - 1;
  }

  // Index of the first entry of leaf `n` whose key is >= `key`.
  static std::size_t entry_index(const node& n, std::string_view key) {
    auto it = std::lower_bound(
        n.entries.begin(), n.entries.end(), key,
        [](const entry& e, std::string_view k) { return compare_bytes(e.key.view(), k) < 0; });
    return static_cast<std::size_t>(it - n.entries.begin());
  }

  // Sizes of ceil(n / max_width) groups that split n items as evenly as possible.
  static std::vector<std::size_t> even_groups(std::size_t n) {
    std::size_t groups = (n + max_width - 1) / max_width;
    std::vector<std::size_t> sizes(groups, n / groups);
    for (std::size_t i = 0; i < n % groups; ++i) ++sizes[i];
    return sizes;
  }

  static void recount(node& n) {
    if (n.leaf) {
      n.count = n.entries.size();
      return;
    }
    n.count = 0;
    for (const auto& child : n.in.children) n.count += child->count;
  }

  // A new node, from the per-thread block cache (nodes are made and freed by the thousand).
  template <class... Args>
  static std::shared_ptr<node> new_node(Args&&... args) {
    return std::allocate_shared<node>(cached_allocator<node>{}, std::forward<Args>(args)...);
  }

  // Whether `n` may be changed in place by batch `edit`: the batch created it, or it is reached
  // only through nodes the caller alone can reach (`owned`) and nothing else holds it (only a
  // holder of a node on the way could copy the pointer meanwhile).
  static bool mine(const node_ptr& n, std::uint64_t edit, bool owned) {
    if (edit != 0 && n->edit == edit) return true;
    return owned && sole_owner(n);
  }

  // `n` itself if it may be changed in place (`in_place`, see mine), else a copy owned by batch
  // `edit` (one allocation: the entries are inline, with room for the insert that usually
  // follows).
  static std::shared_ptr<node> editable(const node_ptr& n, std::uint64_t edit, bool in_place) {
    if (in_place) return std::const_pointer_cast<node>(n);
    auto copy = new_node(*n);
    copy->edit = edit;
    return copy;
  }
  static std::shared_ptr<node> editable(const node_ptr& n, std::uint64_t edit) {
    return editable(n, edit, mine(n, edit, false));
  }

  // Hands a value removed in place to the active retire_scope, if any.
  static void retire(V&& value) {
    if (retired_ != nullptr) retired_->push_back(std::move(value));
  }
  static inline thread_local std::vector<V>* retired_ = nullptr;

  // Splits an overfull node in two; the first part stays in `n`. Into halves, unless the entry
  // that overfilled it went to its end (`at_end`): then the second part takes only min_width, so
  // keys added in increasing order (message ids, say) leave nodes 13/16 full instead of half.
  static std::pair<node_ptr, node_ptr> split(std::shared_ptr<node> n, bool at_end) {
    auto right = new_node(n->leaf);
    right->edit = n->edit;
    const std::size_t half = at_end ? width(*n) - min_width : width(*n) / 2;
    if (n->leaf) {
      right->entries.assign(std::make_move_iterator(n->entries.begin() + half),
                            std::make_move_iterator(n->entries.end()));
      n->entries.resize(half);
    } else {
      right->in.keys.assign(std::make_move_iterator(n->in.keys.begin() + half),
                            std::make_move_iterator(n->in.keys.end()));
      right->in.children.assign(std::make_move_iterator(n->in.children.begin() + half),
                                std::make_move_iterator(n->in.children.end()));
      n->in.keys.resize(half);
      n->in.children.resize(half);
    }
    recount(*n);
    recount(*right);
    return {std::move(n), std::move(right)};
  }

  // Returns the subtree `n` with `key` set to `value`: one node, or two (second non-null) when
  // it had to split.
  // (`copy` may be `n` itself when batched: read what is needed from `n` before changing it.)
  static std::pair<node_ptr, node_ptr> insert(const node_ptr& np, std::string_view key, V&& value,
                                              std::uint64_t edit, bool owned, bool far) {
    const node& n = *np;
    const bool in_place = mine(np, edit, owned);
    if (n.leaf) {
      // (Keys appended in order, as message ids are, go past the last entry: one comparison.)
      const std::size_t i =
          !n.entries.empty() && compare_bytes(n.entries[n.entries.size() - 1].key.view(), key) < 0
              ? n.entries.size()
              : entry_index(n, key);
      const bool replace = i < n.entries.size() && equal_bytes(n.entries[i].key.view(), key);
      auto copy = editable(np, edit, in_place);
      if (replace) {
        if (in_place) retire(std::move(copy->entries[i].value));
        copy->entries[i].value = std::move(value);
        return {std::move(copy), nullptr};
      }
      copy->entries.insert(copy->entries.begin() + static_cast<std::ptrdiff_t>(i),
                           entry{compact_key(key), std::move(value)});
      copy->count = copy->entries.size();
      if (width(*copy) > max_width) return split(std::move(copy), i + 1 == copy->entries.size());
      return {std::move(copy), nullptr};
    }
    {
      const std::size_t c = compare_bytes(key, n.in.keys[n.in.keys.size() - 1].view()) >= 0
                                ? n.in.keys.size() - 1  // (appended in order: one comparison)
                                : child_index(n, key);
      if (far) prefetch(n.in.children[c].get());
      const std::size_t old_count = n.in.children[c]->count;
      auto [left, right] = insert(n.in.children[c], key, std::move(value), edit, in_place, far);
      auto copy = editable(np, edit, in_place);
      copy->count = copy->count - old_count + left->count;
      // (Only a key below the child's minimum changes it: the usual insert copies no key here.)
      if (compare_bytes(key, copy->in.keys[c].view()) < 0) copy->in.keys[c] = min_key(*left);
      copy->in.children[c] = std::move(left);
      if (right) {
        copy->count += right->count;
        auto at = static_cast<std::ptrdiff_t>(c) + 1;
        copy->in.keys.insert(copy->in.keys.begin() + at, min_key(*right));
        copy->in.children.insert(copy->in.children.begin() + at, std::move(right));
      }
      if (width(*copy) > max_width) {
        return split(std::move(copy), c + 2 == copy->in.children.size());
      }
      return {std::move(copy), nullptr};
    }
  }

  // Concatenates siblings `a` and `b` (a before b, same level, together at most 2 * max_width
  // wide) into one node, or into two of about equal width when that would be wider than
  // max_width.
  static std::pair<node_ptr, node_ptr> concatenate(const node& a, const node& b,
                                                   std::uint64_t edit) {
    const std::size_t total = width(a) + width(b);
    const std::size_t first_width = total > max_width ? total / 2 : total;
    auto first = new_node(a.leaf);
    auto second = total > max_width ? new_node(a.leaf) : nullptr;
    first->edit = edit;
    if (second) second->edit = edit;
    for (std::size_t i = 0; i < total; ++i) {
      const node& from = i < width(a) ? a : b;
      const std::size_t at = i < width(a) ? i : i - width(a);
      node& to = i < first_width ? *first : *second;
      if (a.leaf) {
        to.entries.push_back(from.entries[at]);
      } else {
        to.in.keys.push_back(from.in.keys[at]);
        to.in.children.push_back(from.in.children[at]);
      }
    }
    recount(*first);
    if (second) recount(*second);
    return {std::move(first), std::move(second)};
  }

  // Returns whether `key` was in subtree `n` with a value `pred` accepts and, if so, the subtree
  // without it. The result
  // may be under min_width (the parent fixes that) or empty (only for a root leaf).
  template <class Pred>
  static std::pair<bool, node_ptr> remove(const node_ptr& np, std::string_view key,
                                          std::uint64_t edit, const Pred& pred, bool owned) {
    const node& n = *np;
    const bool in_place = mine(np, edit, owned);
    if (n.leaf) {
      std::size_t i = entry_index(n, key);
      if (i == n.entries.size() || n.entries[i].key != key || !pred(n.entries[i].value)) {
        return {false, nullptr};
      }
      auto copy = editable(np, edit, in_place);
      if (in_place) retire(std::move(copy->entries[i].value));
      copy->entries.erase(copy->entries.begin() + static_cast<std::ptrdiff_t>(i));
      copy->count = copy->entries.size();
      return {true, std::move(copy)};
    }
    std::size_t c = child_index(n, key);
    auto [found, child] = remove(n.in.children[c], key, edit, pred, in_place);
    if (!found) return {false, nullptr};
    auto copy = editable(np, edit, in_place);
    copy->count -= 1;
    if (width(*child) >= min_width || copy->in.children.size() == 1) {
      copy->in.keys[c] = min_key(*child);
      copy->in.children[c] = std::move(child);
      return {true, std::move(copy)};
    }
    // Fix the underfull child with its right sibling, or its left one if it is the last.
    std::size_t lo = c + 1 < copy->in.children.size() ? c : c - 1;
    const node_ptr sibling = copy->in.children[lo == c ? lo + 1 : lo];  // kept alive while joined
    const node& a = lo == c ? *child : *sibling;
    const node& b = lo == c ? *sibling : *child;
    auto [first, second] = concatenate(a, b, edit);
    auto at = copy->in.children.begin() + static_cast<std::ptrdiff_t>(lo);
    auto key_at = copy->in.keys.begin() + static_cast<std::ptrdiff_t>(lo);
    *key_at = min_key(*first);
    *at = std::move(first);
    if (second) {
      *(key_at + 1) = min_key(*second);
      *(at + 1) = std::move(second);
    } else {
      copy->in.keys.erase(key_at + 1);
      copy->in.children.erase(at + 1);
    }
    return {true, std::move(copy)};
  }

  // erase_sorted_if on subtree `np` for keys[lo, hi): whether it changed and the subtree after.
  // The result may be under min_width or empty; the parent merges or drops it.
  template <class Keys, class Pred>
  static std::pair<bool, node_ptr> erase_run(const node_ptr& np, const Keys& keys, std::size_t lo,
                                             std::size_t hi, std::uint64_t edit, Pred& pred,
                                             std::size_t& erased) {
    const node& n = *np;
    if (n.leaf) {
      static_assert(node_capacity <= 32);
      std::uint32_t drop = 0;
      std::size_t i = entry_index(n, std::string_view(keys[lo]));
      std::size_t k = lo;
      while (i < n.entries.size() && k < hi) {
        const std::string_view key(keys[k]);
        const int order = compare_bytes(n.entries[i].key.view(), key);
        if (order < 0) {
          ++i;
        } else if (order > 0) {
          ++k;
        } else {
          if (pred(k, n.entries[i].value)) {
            drop |= std::uint32_t{1} << i;
            ++erased;
          }
          ++i;
          ++k;
        }
      }
      if (drop == 0) return {false, np};
      auto copy = editable(np, edit);
      std::size_t kept = 0;
      for (std::size_t r = 0; r < copy->entries.size(); ++r) {
        if ((drop >> r) & 1U) continue;
        if (kept != r) copy->entries[kept] = std::move(copy->entries[r]);
        ++kept;
      }
      copy->entries.resize(kept);
      copy->count = kept;
      return {true, std::move(copy)};
    }
    std::shared_ptr<node> copy;
    std::size_t k = lo;
    const std::size_t children = n.in.children.size();
    for (std::size_t c = child_index(n, std::string_view(keys[lo])); c < children && k < hi; ++c) {
      std::size_t upper = hi;
      if (c + 1 < children && std::string_view(keys[hi - 1]) >= n.in.keys[c + 1].view()) {
        // The first key at or past the next child's minimum, by binary search.
        const std::string_view next = n.in.keys[c + 1].view();
        std::size_t a = k;
        while (a < upper) {
          const std::size_t mid = a + (upper - a) / 2;
          if (std::string_view(keys[mid]) < next) {
            a = mid + 1;
          } else {
            upper = mid;
          }
        }
      }
      if (upper > k) {
        auto [changed, child] = erase_run(n.in.children[c], keys, k, upper, edit, pred, erased);
        if (changed) {
          if (!copy) copy = editable(np, edit);
          copy->in.children[c] = std::move(child);
        }
      }
      k = upper;
    }
    if (!copy) return {false, np};
    fix_children(*copy, edit);
    return {true, std::move(copy)};
  }

  // After a bulk erase below inner node `n` (which batch `edit` owns): drops its empty children
  // and merges each underfull child with a sibling. Joining two inner nodes brings their children
  // together, and one of them may be an underfull only child that had no sibling to merge with:
  // the joined nodes are fixed the same way, down to the leaves. Then sets `n`'s keys and count.
  static void fix_children(node& n, std::uint64_t edit) {
    auto& kids = n.in.children;
    auto& mins = n.in.keys;
    for (std::size_t i = 0; i < kids.size();) {
      if (width(*kids[i]) == 0) {
        kids.erase(kids.begin() + static_cast<std::ptrdiff_t>(i));
        mins.erase(mins.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
    for (std::size_t i = 0; i < kids.size() && kids.size() > 1;) {
      if (width(*kids[i]) >= min_width) {
        ++i;
        continue;
      }
      const std::size_t a = i + 1 < kids.size() ? i : i - 1;
      const node_ptr left = kids[a];
      const node_ptr right = kids[a + 1];  // (both kept alive while joined)
      auto [first, second] = concatenate(*left, *right, edit);
      // (concatenate's nodes are new and the batch's own: fixing them in place is safe)
      if (!first->leaf) fix_children(const_cast<node&>(*first), edit);
      if (second && !second->leaf) fix_children(const_cast<node&>(*second), edit);
      kids[a] = std::move(first);
      if (second) {
        kids[a + 1] = std::move(second);
      } else {
        kids.erase(kids.begin() + static_cast<std::ptrdiff_t>(a + 1));
        mins.erase(mins.begin() + static_cast<std::ptrdiff_t>(a + 1));
      }
      i = a;  // (a joined node may be narrower after its own fix: look at it again)
    }
    for (std::size_t i = 0; i < kids.size(); ++i) mins[i] = min_key(*kids[i]);
    recount(n);
  }

  // The number of nodes of subtree `n`, itself included.
  static std::size_t nodes_below(const node& n) {
    std::size_t count = 1;
    if (!n.leaf) {
      for (const node_ptr& child : n.in.children) count += nodes_below(*child);
    }
    return count;
  }

  // Checks subtree `n` at `depth`; `previous` is the last key seen in order.
  static bool check_node(const node& n, bool is_root, std::size_t depth, std::size_t& leaf_depth,
                         const compact_key*& previous) {
    if (width(n) > max_width || (!is_root && width(n) < min_width)) return false;
    if (n.leaf) {
      if (n.count != n.entries.size()) return false;
      if (leaf_depth == 0) leaf_depth = depth + 1;
      if (leaf_depth != depth + 1) return false;
      for (const auto& e : n.entries) {
        if (previous != nullptr && !(*previous < e.key)) return false;
        previous = &e.key;
      }
      return true;
    }
    if (n.in.keys.size() != n.in.children.size()) return false;
    std::size_t count = 0;
    for (std::size_t i = 0; i < n.in.children.size(); ++i) {
      const node& child = *n.in.children[i];
      if (width(child) == 0 || n.in.keys[i] != min_key(child)) return false;
      if (!check_node(child, false, depth + 1, leaf_depth, previous)) return false;
      count += child.count;
    }
    return count == n.count;
  }

  node_ptr root_;
};

// A forward iterator over a pmap's entries in key order. It holds the path from the root to
// the current entry as (node, index) frames; it stays valid while any pmap sharing that root
// is alive. Incrementing is O(1) amortized, O(log n) worst case; nothing allocates.
template <class V>
class pmap<V>::iterator {
 public:
  using iterator_category = std::forward_iterator_tag;
  using value_type = entry;
  using difference_type = std::ptrdiff_t;
  using pointer = const entry*;
  using reference = const entry&;

  iterator() = default;

  // The current entry's key and value. Undefined at end().
  std::string_view key() const { return current().key.view(); }
  const V& value() const { return current().value; }
  reference operator*() const { return current(); }
  pointer operator->() const { return &current(); }

  iterator& operator++() {
    ++path_[depth_ - 1].index;
    skip_exhausted();
    return *this;
  }
  iterator operator++(int) {
    iterator old = *this;
    ++*this;
    return old;
  }

  // Iterators are equal when both are end() or both point at the same entry of the same leaf.
  friend bool operator==(const iterator& a, const iterator& b) {
    if (a.depth_ == 0 || b.depth_ == 0) return a.depth_ == b.depth_;
    const frame& x = a.path_[a.depth_ - 1];
    const frame& y = b.path_[b.depth_ - 1];
    return x.n == y.n && x.index == y.index;
  }

 private:
  friend class pmap;

  struct frame {
    const node* n = nullptr;
    std::size_t index = 0;
  };

  const entry& current() const {
    const frame& f = path_[depth_ - 1];
    return f.n->entries[f.index];
  }

  void push(const node* n, std::size_t index) {
    assert(depth_ < max_depth);
    path_[depth_++] = frame{n, index};
  }

  void descend_leftmost(const node* n) {
    while (!n->leaf) {
      push(n, 0);
      n = n->in.children.front().get();
    }
    push(n, 0);
  }

  // Moves from a leaf position one past its last entry to the next entry, or to end().
  void skip_exhausted() {
    if (path_[depth_ - 1].index < path_[depth_ - 1].n->entries.size()) return;
    --depth_;
    while (depth_ > 0) {
      frame& f = path_[depth_ - 1];
      if (++f.index < f.n->in.children.size()) {
        descend_leftmost(f.n->in.children[f.index].get());
        return;
      }
      --depth_;
    }
  }

  std::array<frame, max_depth> path_{};
  std::size_t depth_ = 0;
};

}  // namespace pop::detail
