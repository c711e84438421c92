// Tests for pop::detail::pmap: unit tests and RapidCheck properties against std::map.
#include "pop/engine/detail/pmap.hpp"

#include <rapidcheck/catch.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace {

using value = std::shared_ptr<const int>;
using map = pop::detail::pmap<value>;
using model = std::map<std::string, int>;

static_assert(std::forward_iterator<map::iterator>);

value make_value(int v) {
  return std::make_shared<const int>(v);
}

// Returns whether `m` holds exactly the entries of `expected`, in order.
bool equal_in_order(const map& m, const model& expected) {
  if (m.size() != expected.size() || m.empty() != expected.empty()) return false;
  auto it = m.begin();
  for (const auto& [k, v] : expected) {
    if (it == m.end() || it.key() != k || *it.value() != v) return false;
    ++it;
  }
  return it == m.end();
}

// Returns whether m.lower_bound(key) lands on the same entry as expected.lower_bound(key).
bool lower_bound_agrees(const map& m, const model& expected, const std::string& key) {
  auto got = m.lower_bound(key);
  auto want = expected.lower_bound(key);
  if (want == expected.end()) return got == m.end();
  return got != m.end() && got->key == want->first && *got->value == want->second;
}

// Returns whether find(key) agrees with the model.
bool find_agrees(const map& m, const model& expected, const std::string& key) {
  const value* got = m.find(key);
  auto want = expected.find(key);
  if (want == expected.end()) return got == nullptr;
  return got != nullptr && **got == want->second;
}

std::string numbered_key(int i) {
  std::string digits = std::to_string(i);
  return "k" + std::string(6 - digits.size(), '0') + digits;
}

std::vector<std::pair<std::string, value>> numbered_entries(int n) {
  std::vector<std::pair<std::string, value>> entries;
  for (int i = 0; i < n; ++i) entries.emplace_back(numbered_key(i), make_value(i));
  return entries;
}

// One step of a random history: set or erase `key`, optionally keeping the result as the
// "old" version whose persistence is checked afterwards.
struct op {
  bool erase = false;
  std::string key;
  int value = 0;
  bool keep = false;
};

// Prints an op in RapidCheck counterexamples.
void showValue(const op& o, std::ostream& os) {
  os << (o.erase ? "erase " : "set ") << '"' << o.key << '"';
  if (!o.erase) os << '=' << o.value;
  if (o.keep) os << " keep";
}

// Applies `ops` to an empty map and to a std::map, checking after every step that the new
// version, and an older version kept from earlier in the sequence, agree with their models.
void check_history(const std::vector<op>& ops, const std::string& probe_alphabet) {
  map current;
  model expected;
  map old_version;
  model old_expected;
  std::mt19937 probe_rng(static_cast<unsigned>(ops.size()));
  std::uniform_int_distribution<std::size_t> probe_length(0, 5);
  for (const op& o : ops) {
    if (o.erase) {
      map next = current.erase(o.key);
      bool present = expected.erase(o.key) == 1;
      RC_ASSERT(next.same_root(current) == !present);
      current = next;
    } else {
      current = current.set(o.key, make_value(o.value));
      expected[o.key] = o.value;
    }
    RC_ASSERT(current.check_invariants());
    RC_ASSERT(current.size() == expected.size());
    RC_ASSERT(find_agrees(current, expected, o.key));
    RC_ASSERT(equal_in_order(current, expected));
    std::string probe;
    for (std::size_t n = probe_length(probe_rng); n > 0; --n) {
      probe += probe_alphabet[probe_rng() % probe_alphabet.size()];
    }
    RC_ASSERT(lower_bound_agrees(current, expected, probe));
    RC_ASSERT(lower_bound_agrees(current, expected, o.key));
    RC_ASSERT(equal_in_order(old_version, old_expected));
    if (o.keep) {
      old_version = current;
      old_expected = expected;
    }
  }
}

// Checks `current` after op `o`: sound, and agreeing with `expected` on o.key; if o.keep, keeps it
// in `kept` and checks that every kept version still equals its model.
void check_step(const map& current, const model& expected, const op& o,
                std::vector<std::pair<map, model>>& kept) {
  RC_ASSERT(current.check_invariants());
  RC_ASSERT(find_agrees(current, expected, o.key));
  if (!o.keep) return;
  RC_ASSERT(equal_in_order(current, expected));
  kept.emplace_back(current, expected);
  for (const auto& [version, model_of] : kept) RC_ASSERT(equal_in_order(version, model_of));
}

// Applies `ops` in batches: ops[i].keep ends a batch, and every batch uses a fresh edit token
// (nodes it created are changed in place by its later ops). Checks every step against a
// std::map, and that every version published at the end of an earlier batch is unchanged.
void check_batched_history(const std::vector<op>& ops) {
  map current;
  model expected;
  std::vector<std::pair<map, model>> published{{current, expected}};
  std::uint64_t edit = map::new_edit();
  for (const op& o : ops) {
    if (o.erase) {
      current = current.erase(o.key, edit);
      expected.erase(o.key);
    } else {
      current = current.set(o.key, make_value(o.value), edit);
      expected[o.key] = o.value;
    }
    check_step(current, expected, o, published);
    if (o.keep) edit = map::new_edit();
  }
  RC_ASSERT(equal_in_order(current, expected));
  for (const auto& [version, model_of] : published) RC_ASSERT(equal_in_order(version, model_of));
}

// Applies `ops` as an owner would (set / erase with owned = true): the map's nodes that nothing
// else holds are changed in place. ops[i].keep keeps a copy of the map (which then shares its
// nodes, so later changes must copy them). Checks every step against a std::map, that every
// kept copy is unchanged, and that replacing a value in a map no copy shares keeps its root.
void check_owned_history(const std::vector<op>& ops) {
  map current;
  model expected;
  std::vector<std::pair<map, model>> kept;
  for (const op& o : ops) {
    if (o.erase) {
      current = current.erase(o.key, 0, true);
      expected.erase(o.key);
    } else {
      const bool replace = expected.count(o.key) == 1;
      const bool shared = !kept.empty() && kept.back().first.same_root(current);
      map next = current.set(o.key, make_value(o.value), 0, true);
      // (Only the newest copy can share the root: every change after it made a new one.)
      if (replace && !shared && !current.empty()) RC_ASSERT(next.same_root(current));
      if (shared) RC_ASSERT(!next.same_root(current));
      current = next;
      expected[o.key] = o.value;
    }
    check_step(current, expected, o, kept);
    if (kept.size() > 4) kept.erase(kept.begin());  // a dropped copy frees its nodes to change
  }
  RC_ASSERT(equal_in_order(current, expected));
  for (const auto& [version, model_of] : kept) RC_ASSERT(equal_in_order(version, model_of));
}

// Returns operations on `keys` that erase with probability erase_eighths / 8. Single
// operations are not shrunk: shrinking each of thousands of elements, each attempt replaying
// the whole history, takes many minutes. A failing history still shrinks by length.
rc::Gen<op> op_over(rc::Gen<std::string> keys, int erase_eighths) {
  return rc::gen::noShrink(rc::gen::build<op>(
      rc::gen::set(&op::erase, rc::gen::weightedElement<bool>(
                                   {{erase_eighths, true}, {8 - erase_eighths, false}})),
      rc::gen::set(&op::key, std::move(keys)), rc::gen::set(&op::value, rc::gen::inRange(0, 1000)),
      rc::gen::set(&op::keep, rc::gen::weightedElement<bool>({{1, true}, {30, false}}))));
}

// Generates a history in three phases of up to `max_phase` operations each: mostly sets (the
// tree grows and splits), mixed, then mostly erases (nodes underflow, borrow and merge).
std::vector<op> grow_mix_shrink(const rc::Gen<std::string>& keys, int max_phase) {
  std::vector<op> ops;
  for (int erase_eighths : {1, 4, 7}) {
    const auto count = static_cast<std::size_t>(*rc::gen::inRange(0, max_phase + 1));
    const auto phase = *rc::gen::container<std::vector<op>>(count, op_over(keys, erase_eighths));
    ops.insert(ops.end(), phase.begin(), phase.end());
  }
  return ops;
}

}  // namespace

TEST_CASE("from_sorted builds a map whose iteration yields every entry in order", "[pmap]") {
  constexpr int low = static_cast<int>(map::min_width);
  constexpr int high = static_cast<int>(map::max_width);
  for (int n : {0, 1, low - 1, low, high - 1, high, high + 1, 2 * high, 2 * high + 1, high * high,
                high * high + 1, 1000, 100000}) {
    CAPTURE(n);
    map m = map::from_sorted(numbered_entries(n));
    REQUIRE(m.size() == static_cast<std::size_t>(n));
    REQUIRE(m.empty() == (n == 0));
    REQUIRE(m.check_invariants());
    int i = 0;
    for (const auto& e : m) {
      REQUIRE(e.key == numbered_key(i));
      REQUIRE(*e.value == i);
      ++i;
    }
    REQUIRE(i == n);
    if (n > 0) {
      REQUIRE(m.find(numbered_key(n - 1)) != nullptr);
      REQUIRE(**m.find(numbered_key(n / 2)) == n / 2);
    }
    REQUIRE(m.find("k") == nullptr);
    REQUIRE(m.find(numbered_key(n)) == nullptr);
  }
}

TEST_CASE("erasing an absent key returns a map with the same root", "[pmap]") {
  map empty;
  REQUIRE(empty.erase("x").same_root(empty));
  map m = map::from_sorted(numbered_entries(500));
  map same = m.erase("absent");
  REQUIRE(same.same_root(m));
  REQUIRE(same.size() == 500);
  map fewer = m.erase(numbered_key(3));
  REQUIRE_FALSE(fewer.same_root(m));
  REQUIRE(fewer.size() == 499);
  REQUIRE(m.find(numbered_key(3)) != nullptr);
  REQUIRE(fewer.find(numbered_key(3)) == nullptr);
}

TEST_CASE("set replaces an existing value without changing the size or the old version", "[pmap]") {
  map a = map().set("k", make_value(1));
  map b = a.set("k", make_value(2));
  REQUIRE(b.size() == 1);
  REQUIRE(**a.find("k") == 1);
  REQUIRE(**b.find("k") == 2);
}

TEST_CASE("lower_bound finds the first key not less than the probe", "[pmap]") {
  map m = map::from_sorted(numbered_entries(1000));
  REQUIRE(m.lower_bound("").key() == numbered_key(0));
  REQUIRE(m.lower_bound("k000500").key() == numbered_key(500));
  REQUIRE(m.lower_bound("k0005000").key() == numbered_key(501));
  REQUIRE(m.lower_bound("k000999~") == m.end());
  REQUIRE(m.lower_bound("z") == m.end());
  REQUIRE(map().lower_bound("a") == map().end());
  // Keys compare as bytes: "\xff" sorts after every ASCII key.
  map high = m.set("\xff", make_value(-1));
  REQUIRE(high.lower_bound("z").key() == "\xff");
}

TEST_CASE("lookups do not depend on string_view being null-terminated", "[pmap]") {
  map m = map().set("ab", make_value(1)).set("abc", make_value(2));
  std::string_view prefix = std::string_view("abcd").substr(0, 2);
  REQUIRE(**m.find(prefix) == 1);
  REQUIRE(m.lower_bound(prefix).key() == "ab");
}

TEST_CASE("random histories over few keys agree with std::map at every step", "[pmap]") {
  rc::prop("set and erase with colliding keys", [] {
    const std::string alphabet = "abc";
    auto key = rc::gen::mapcat(rc::gen::inRange<std::size_t>(0, 5), [alphabet](std::size_t n) {
      return rc::gen::container<std::string>(n, rc::gen::elementOf(alphabet));
    });
    check_history(grow_mix_shrink(key, 1000), alphabet);
  });
}

TEST_CASE("random histories deep enough for three levels agree with std::map", "[pmap]") {
  // The root splits into a third level after about max_width^2 / 2 live entries.
  constexpr int keys = static_cast<int>(2 * map::max_width * map::max_width);
  rc::prop("grow, mix and shrink over 2 * max_width^2 keys", [] {
    auto key = rc::gen::map(rc::gen::inRange(0, keys), numbered_key);
    check_history(grow_mix_shrink(key, keys), "k0123456789");
  });
}

TEST_CASE("batched changes agree with std::map and never alter a published version", "[pmap]") {
  constexpr int keys = static_cast<int>(2 * map::max_width * map::max_width);
  rc::prop("batches of set and erase over 2 * max_width^2 keys", [] {
    auto key = rc::gen::map(rc::gen::inRange(0, keys), numbered_key);
    check_batched_history(grow_mix_shrink(key, keys));
  });
}

TEST_CASE("changes by the map's only owner agree with std::map and never alter a kept copy",
          "[pmap]") {
  constexpr int keys = static_cast<int>(2 * map::max_width * map::max_width);
  rc::prop("owned set and erase over 2 * max_width^2 keys", [] {
    auto key = rc::gen::map(rc::gen::inRange(0, keys), numbered_key);
    check_owned_history(grow_mix_shrink(key, keys));
  });
}

TEST_CASE("an owned change copies a node another map still holds, and only that path", "[pmap]") {
  map m = map::from_sorted(numbered_entries(1000));
  const map copy = m;  // shares every node
  map changed = m.set(numbered_key(5), make_value(-5), 0, true);
  CHECK_FALSE(changed.same_root(copy));
  CHECK(**copy.find(numbered_key(5)) == 5);
  CHECK(**changed.find(numbered_key(5)) == -5);
  m = map();  // now `changed` alone holds its root, and nodes off the copied path are shared
  map again = changed.set(numbered_key(5), make_value(-6), 0, true);
  CHECK(again.same_root(changed));  // its own path: changed in place
  CHECK(**again.find(numbered_key(5)) == -6);
  changed = map();  // (else two maps hold the root)
  map far = again.set(numbered_key(900), make_value(-900), 0, true);
  CHECK(far.same_root(again));  // root in place, the shared leaf below copied
  CHECK(**copy.find(numbered_key(900)) == 900);
  CHECK(**far.find(numbered_key(900)) == -900);
  CHECK(far.check_invariants());
  CHECK(copy.check_invariants());
}

TEST_CASE("values an owned change removes go to the retire scope, not away, while one is active",
          "[pmap]") {
  map m = map::from_sorted(numbered_entries(100));
  std::weak_ptr<const int> replaced(*m.find(numbered_key(3)));
  std::weak_ptr<const int> erased(*m.find(numbered_key(4)));
  std::vector<value> retired;
  {
    const map::retire_scope scope(retired);
    m = m.set(numbered_key(3), make_value(-3), 0, true);  // in place: the old value is retired
    m = m.erase(numbered_key(4), 0, true);
  }
  REQUIRE(retired.size() == 2);
  CHECK_FALSE(replaced.expired());  // kept alive by the scope's vector, not freed in the change
  CHECK_FALSE(erased.expired());
  CHECK(**m.find(numbered_key(3)) == -3);
  CHECK(m.find(numbered_key(4)) == nullptr);
  retired.clear();
  CHECK(replaced.expired());  // freed when the caller lets go
  CHECK(erased.expired());
  // Without a scope, or for a change that copies, nothing is retired.
  std::weak_ptr<const int> plain(*m.find(numbered_key(5)));
  m = m.set(numbered_key(5), make_value(-5), 0, true);
  CHECK(plain.expired());
  const map copy = m;
  {
    const map::retire_scope scope(retired);
    m = m.set(numbered_key(6), make_value(-6), 0, true);  // shared with `copy`: copied
  }
  CHECK(retired.empty());
  CHECK(**copy.find(numbered_key(6)) == 6);
}

TEST_CASE("keys added in increasing order fill nodes to 13 of 16, one at a time or owned",
          "[pmap]") {
  // A node that overflows at its end keeps 13 entries and gives min_width (4) to the new one:
  // 20,000 ascending keys take about 20000/13 leaves, not the 20000/8.5 of even splits.
  for (const bool owned : {false, true}) {
    CAPTURE(owned);
    map m;
    constexpr int n = 20000;
    for (int i = 0; i < n; ++i) {
      char key[16];
      std::snprintf(key, sizeof key, "%08d", i);
      m = m.set(key, make_value(i), 0, owned);
    }
    REQUIRE(m.size() == n);
    REQUIRE(m.check_invariants());
    const std::size_t leaves = n / 13 + 1;
    CHECK(m.node_count() <= leaves + leaves / 12 + 2);  // and the inner nodes, 13 wide as well
    CHECK(m.node_count() >= n / 16);
  }
}

TEST_CASE("20000 sequential inserts then random erases down to empty agree with std::map",
          "[pmap]") {
  for (std::uint32_t seed : {1u, 2u, 3u}) {
    std::cout << "pmap sequential-then-erase seed " << seed << '\n';
    CAPTURE(seed);
    std::mt19937 rng(seed);
    constexpr int n = 20000;
    map m;
    model expected;
    map kept;
    model kept_expected;
    auto full_check = [&] {
      REQUIRE(m.check_invariants());
      REQUIRE(equal_in_order(m, expected));
      REQUIRE(equal_in_order(kept, kept_expected));
    };
    for (int i = 0; i < n; ++i) {
      m = m.set(numbered_key(i), make_value(i));
      expected[numbered_key(i)] = i;
      REQUIRE(m.size() == expected.size());
      REQUIRE(find_agrees(m, expected, numbered_key(i)));
      if (i % 997 == 0) full_check();
      if (i == n / 2) {
        kept = m;
        kept_expected = expected;
      }
    }
    full_check();
    std::vector<int> order(n);
    for (int i = 0; i < n; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    for (int step = 0; step < n; ++step) {
      const std::string key = numbered_key(order[step]);
      map next = m.erase(key);
      REQUIRE_FALSE(next.same_root(m));
      m = next;
      expected.erase(key);
      REQUIRE(m.size() == expected.size());
      REQUIRE(m.find(key) == nullptr);
      const std::string probe = numbered_key(static_cast<int>(rng() % (n + 1)));
      REQUIRE(lower_bound_agrees(m, expected, probe));
      REQUIRE(lower_bound_agrees(m, expected, key));
      if (step % 997 == 0 || m.size() < 100) full_check();
      if (step == n / 3) {
        kept = m;
        kept_expected = expected;
      }
    }
    REQUIRE(m.empty());
    REQUIRE(m.begin() == m.end());
    full_check();
  }
}

TEST_CASE("compact_key keeps any text, inline or shared, and orders like std::string", "[pmap]") {
  using pop::detail::compact_key;
  std::vector<std::string> texts;
  for (std::size_t n = 0; n <= 70; ++n) texts.push_back(std::string(n, 'a') + "z");
  texts.push_back(std::string("nul\0inside", 10));
  texts.push_back(std::string(31, 'q'));  // exactly the inline capacity
  texts.push_back(std::string(32, 'q'));  // one past it: shared
  for (const std::string& t : texts) {
    const compact_key k(t);
    CHECK(k.view() == t);
    compact_key copy = k;  // shares a long key's block
    compact_key moved = std::move(copy);
    CHECK(moved == t);
    compact_key assigned;
    assigned = moved;
    const compact_key& alias = assigned;
    assigned = alias;  // self-assignment keeps it
    CHECK(assigned.str() == t);
    for (const std::string& u : texts) {
      CHECK((compact_key(t) < compact_key(u)) == (t < u));
      CHECK((compact_key(t) == compact_key(u)) == (t == u));
      const int order = pop::detail::compare_bytes(t, u);
      CHECK((order < 0) == (t < u));
      CHECK((order == 0) == (t == u));
    }
  }
}

TEST_CASE("compare_bytes orders any bytes as std::string does", "[pmap]") {
  rc::prop("random strings, with shared prefixes and bytes past 0x7f", [] {
    const auto prefix = *rc::gen::container<std::string>(rc::gen::character<char>());
    const auto a = prefix + *rc::gen::container<std::string>(rc::gen::character<char>());
    const auto b = prefix + *rc::gen::container<std::string>(rc::gen::character<char>());
    const int order = pop::detail::compare_bytes(a, b);
    RC_ASSERT((order < 0) == (a < b));
    RC_ASSERT((order == 0) == (a == b));
    RC_ASSERT((order > 0) == (a > b));
    RC_ASSERT(pop::detail::equal_bytes(a, b) == (a == b));
  });
  // Every length up to 20 with one byte changed at every position, or cut after it, or one byte
  // longer: the overlapping loads of a rest under eight bytes (and of the last eight) see each
  // position.
  std::mt19937 rng(7);
  for (std::size_t n = 0; n <= 20; ++n) {
    std::string a(n, '\0');
    for (char& c : a) c = static_cast<char>(rng());
    for (std::size_t j = 0; j < n; ++j) {
      for (const int delta : {-1, 1, 0x80}) {
        std::string b = a;
        b[j] = static_cast<char>(static_cast<unsigned char>(b[j]) + delta);
        for (const std::string& c : {b, b.substr(0, j + 1), b + "x"}) {
          // (Copies in buffers of exactly their size: a load past the end shows under ASan.)
          const auto exact = [](const std::string& t) {
            auto bytes = std::make_unique<char[]>(t.size());
            std::copy(t.begin(), t.end(), bytes.get());
            return bytes;
          };
          const auto x = exact(a);
          const auto y = exact(c);
          const int order = pop::detail::compare_bytes({x.get(), a.size()}, {y.get(), c.size()});
          CHECK((order < 0) == (a < c));
          CHECK((order == 0) == (a == c));
          CHECK((order > 0) == (a > c));
        }
      }
    }
    CHECK(pop::detail::compare_bytes(a, a + '\0') < 0);
    CHECK(pop::detail::compare_bytes(a, a) == 0);
  }
}

TEST_CASE("erase_sorted_if removes exactly the listed keys its predicate accepts", "[pmap]") {
  // Up to three levels; keys listed sorted, with absent and repeated ones, erased in one pass
  // (alone or inside a batch), checked against std::map and against the version before.
  constexpr int keys = static_cast<int>(3 * map::max_width * map::max_width);
  rc::prop("one pass over a sorted key list agrees with erasing them one by one", [] {
    // (Sizes drawn here, not by RapidCheck's size, so trees reach three levels.)
    std::mt19937 rng(*rc::gen::arbitrary<std::uint32_t>());
    const int density = *rc::gen::inRange(1, 9);  // eighths of the keys present
    std::set<int> present;
    for (int i = 0; i < keys; ++i) {
      if (static_cast<int>(rng() % 8) < density) present.insert(i);
    }
    // A run of neighbours (a relay clearing the oldest messages) or keys from anywhere.
    std::vector<int> listed;
    const int count = static_cast<int>(rng() % static_cast<unsigned>(keys));
    if (*rc::gen::arbitrary<bool>()) {
      const int from = static_cast<int>(rng() % static_cast<unsigned>(keys));
      for (int i = 0; i < count; ++i) listed.push_back(from + i < keys ? from + i : keys);
    } else {
      for (int i = 0; i < count; ++i) listed.push_back(static_cast<int>(rng() % (keys + 2)) - 1);
    }
    const int keep_modulus = *rc::gen::inRange(1, 4);  // pred: value % keep_modulus != 0
    const bool batched = *rc::gen::arbitrary<bool>();
    std::vector<std::pair<std::string, value>> entries;
    model expected;
    for (int i : present) {
      entries.emplace_back(numbered_key(i), make_value(i));
      expected[numbered_key(i)] = i;
    }
    const map before = map::from_sorted(entries);
    const model before_expected = expected;
    std::vector<std::string> list;
    for (int i : listed) list.push_back(i < 0 ? "a" : numbered_key(i));
    std::sort(list.begin(), list.end());
    std::size_t want = 0;
    for (const std::string& k : list) {
      const auto it = expected.find(k);
      if (it != expected.end() && it->second % keep_modulus != 0) {
        expected.erase(it);
        ++want;
      }
    }
    std::size_t erased = 0;
    std::vector<std::string> seen;
    const std::uint64_t edit = batched ? map::new_edit() : 0;
    // A batch first changes the map in place, so the pass meets nodes it owns.
    map start = batched ? before.set("a0", make_value(0), edit).erase("a0", edit) : before;
    const map after = start.erase_sorted_if(
        list,
        [&](std::size_t i, const value& v) {
          seen.push_back(list[i]);
          return *v % keep_modulus != 0;
        },
        erased, edit);
    RC_ASSERT(erased == want);
    RC_ASSERT(after.check_invariants());
    RC_ASSERT(equal_in_order(after, expected));
    RC_ASSERT(equal_in_order(before, before_expected));
    RC_ASSERT(std::is_sorted(seen.begin(), seen.end()));
    if (want == 0) RC_ASSERT(after.same_root(start));
  });
}

TEST_CASE("erase_sorted_if of a run of neighbours keeps every invariant, whatever its ends",
          "[pmap]") {
  // A relay clears its oldest messages as one run. A run ending just before the end of an inner
  // node's range leaves that node an only child with a few entries, which must be merged with the
  // neighbours' children (three and four levels; later single erases must still work).
  for (const int n : {512, 5000}) {
    const map full = map::from_sorted(numbered_entries(n));
    model all;
    for (int i = 0; i < n; ++i) all[numbered_key(i)] = i;
    for (const int from : {0, 1, 3, 100}) {
      for (int to = from + 1; to <= n; to += (n < 1000 ? 1 : 5)) {
        CAPTURE(n, from, to);
        std::vector<std::string> run;
        for (int i = from; i < to; ++i) run.push_back(numbered_key(i));
        std::size_t erased = 0;
        map m = full.erase_sorted_if(
            run, [](std::size_t, const value&) { return true; }, erased);
        REQUIRE(erased == run.size());
        REQUIRE(m.check_invariants());
        REQUIRE(m.size() == static_cast<std::size_t>(n) - run.size());
        // (Contents compared in full for the smaller tree; the property test covers contents.)
        model expected;
        if (n < 1000) {
          expected = all;
          for (const std::string& k : run) expected.erase(k);
          REQUIRE(equal_in_order(m, expected));
        }
        // Then single erases next to the run, which walk through the merged nodes.
        for (int i = std::max(0, from - 2); i < std::min(n, to + 3); ++i) {
          if (i >= from && i < to) continue;
          m = m.erase(numbered_key(i));
          expected.erase(numbered_key(i));
          REQUIRE(m.check_invariants());
          REQUIRE(m.find(numbered_key(i)) == nullptr);
        }
        if (n < 1000) REQUIRE(equal_in_order(m, expected));
      }
    }
  }
}
