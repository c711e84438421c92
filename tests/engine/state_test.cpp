// Tests of the persistent state tree (engine/detail/tree.hpp) and value views.
#include <rapidcheck/catch.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include "absl/strings/match.h"
#include "pop/engine/detail/packed.hpp"
#include "pop/engine/detail/process_runner.hpp"
#include "pop/engine/detail/tree.hpp"
#include "pop/engine/engine.hpp"
#include "pop/engine/snapshot.hpp"
#include "pop/engine/value_view.hpp"
#include "tests/support/json_gen.hpp"
#include "tests/support/must.hpp"
#include "tests/support/temp_dir.hpp"

using pop::json;
namespace d = pop::detail;
using pop::test::any_json;
using pop::test::same;

namespace {

// The reference model: plain JSON with the same write semantics.
bool model_assign(json& doc, const std::vector<std::string>& segs, const json& value) {
  json* cur = &doc;
  for (std::size_t i = 0; i + 1 < segs.size(); ++i) {
    if (!cur->is_object()) return false;
    if (!cur->contains(segs[i])) (*cur)[segs[i]] = json::object();
    cur = &(*cur)[segs[i]];
  }
  if (!cur->is_object()) return false;
  (*cur)[segs.back()] = value;
  return true;
}

void model_erase(json& doc, const std::vector<std::string>& segs) {
  json* cur = &doc;
  for (std::size_t i = 0; i + 1 < segs.size(); ++i) {
    if (!cur->is_object() || !cur->contains(segs[i])) return;
    cur = &(*cur)[segs[i]];
  }
  if (cur->is_object()) cur->erase(segs.back());
}

const json* model_find(const json& doc, const std::vector<std::string>& segs) {
  const json* cur = &doc;
  for (const auto& s : segs) {
    if (!cur->is_object()) return nullptr;
    const auto it = cur->find(s);
    if (it == cur->end()) return nullptr;
    cur = &*it;
  }
  return cur;
}

std::string join(const std::vector<std::string>& segs) {
  std::string s;
  for (const auto& x : segs) s += (s.empty() ? "" : ".") + x;
  return s;
}

json big_object(int n, int salt) {
  json j = json::object();
  for (int i = 0; i < n; ++i) j["k" + std::to_string(i)] = i * salt;
  return j;
}

// Reads `view` every way a view can be read and checks each against `want`.
void check_view(const pop::value_view& view, const json& want) {
  RC_ASSERT(view.exists());
  RC_ASSERT(same(view.to_json(), want));
  RC_ASSERT(same(view.get<json>(), want));
  RC_ASSERT(view.is_object() == want.is_object());
  RC_ASSERT(view.size() == (want.is_structured() ? want.size() : 0));
  if (!want.is_object()) {
    RC_ASSERT(!view.member("a").exists());
    return;
  }
  std::vector<std::string> keys;
  for (const auto& [k, v] : want.items()) keys.push_back(k);
  RC_ASSERT(view.keys() == keys);
  // Iterating from a key starts at the first key >= it, whether that key is there or not.
  const auto check_from = [&](const std::string& from) {
    std::vector<std::string> seen;
    view.for_each_member(
        [&](std::string_view key, const pop::value_view&) {
          seen.emplace_back(key);
          return true;
        },
        from);
    std::vector<std::string> expected;
    for (const std::string& k : keys) {
      if (k >= from) expected.push_back(k);
    }
    RC_ASSERT(seen == expected);
  };
  for (const auto& [k, v] : want.items()) {
    check_view(view.member(k), v);
    const std::string absent = k + std::string(1, '\0') + "absent";
    check_from(k);
    check_from(absent);
    RC_ASSERT(view.member(absent).exists() == want.contains(absent));
  }
}
}  // namespace

TEST_CASE("a packed value decodes to exactly the value packed, and reads in place the same",
          "[state]") {
  rc::prop("encode/decode keeps every kind, and views of a packed node read as the JSON", [] {
    const json value = *any_json(2);
    std::string bytes;
    RC_ASSERT(d::packed::encode(value, bytes));
    RC_ASSERT(same(d::packed::decode(bytes.data()), value));
    RC_ASSERT(d::packed::size(bytes.data()) == (value.is_structured() ? value.size() : 0));
    RC_ASSERT(d::packed::length(bytes.data()) == bytes.size());
    // With a limit: packed exactly when the whole form fits, never growing far past the limit.
    for (const std::size_t limit : {bytes.size(), bytes.size() - 1,
                                    *rc::gen::inRange<std::size_t>(0, 2 * bytes.size() + 2)}) {
      std::string limited;
      RC_ASSERT(d::packed::encode(value, limited, limit) == (bytes.size() <= limit));
      if (bytes.size() <= limit) RC_ASSERT(limited == bytes);
      RC_ASSERT(limited.size() <= limit + 16);
    }
    // In a state: small strings, arrays and objects are stored packed; every read agrees.
    // (Keys here may be any text, so the tree is built directly, not through engine::open.)
    const d::node_ptr root = d::make_root(json{{"v", value}});
    const pop::snapshot s = d::process_runner::make_snapshot(
        std::make_shared<const d::version_state>(d::version_state{1, root, nullptr}));
    check_view(s.root().member("v"), value);
    const d::location at = d::lookup(*root, "v");
    RC_ASSERT(same(d::materialise(at), value));
    // An object beyond the whole-storage limits (16 members, 64 elements) becomes a member map
    // whatever its size; other strings, arrays and objects of up to 512 packed bytes are packed.
    std::size_t budget = d::blob_max_elements;
    const bool whole =
        !value.is_object() || d::packed::fits(bytes.data(), d::blob_max_members, budget);
    const bool packed = at.node->packed_bytes() != nullptr;
    RC_ASSERT(packed ==
              ((value.is_string() || value.is_structured()) && bytes.size() <= 512 && whole));
    // The checked form (what a process's write takes) packs exactly those that are storable too,
    // into the same bytes.
    const d::node_ptr checked = d::make_checked_small_node(value);
    RC_ASSERT((checked != nullptr) == (packed && pop::check_storable(value, "v").ok()));
    if (checked) {
      RC_ASSERT(std::string_view(checked->packed_bytes(), bytes.size()) == bytes);
    }
  });
}

TEST_CASE("views read strings and integers in place, and members visited stay readable",
          "[state]") {
  const std::string long_text(2000, 'x');  // stored as JSON, not packed
  json wide = json::object();              // a member map (more than 16 members)
  for (int i = 0; i < 20; ++i) wide["k" + std::to_string(i)] = i - 3;
  const json record = {{"name", "ada"}, {"n", -5}, {"u", 7u}, {"big", 1ull << 63}, {"f", 1.5}};
  const json blob = {{"a", long_text}, {"b", 2}};  // an object stored whole as JSON
  const d::node_ptr root =
      d::make_root(json{{"r", record}, {"long", long_text}, {"wide", wide}, {"blob", blob}});
  const pop::snapshot s = d::process_runner::make_snapshot(
      std::make_shared<const d::version_state>(d::version_state{1, root, nullptr}));
  const pop::value_view r = s.root().member("r");
  REQUIRE(d::lookup(*root, "r").node->packed_bytes() != nullptr);
  CHECK(r.member("name").as_string() == std::optional<std::string_view>("ada"));
  CHECK(r.member("n").as_integer() == -5);
  CHECK(r.member("u").as_integer() == 7);
  CHECK(r.member("big").as_integer() == s.root().at("r.big").get<std::int64_t>());
  CHECK_FALSE(r.member("f").as_integer());
  CHECK_FALSE(r.member("n").as_string());
  CHECK_FALSE(r.as_string());
  CHECK_FALSE(r.member("missing").as_integer());
  CHECK(s.root().member("long").as_string() == std::optional<std::string_view>(long_text));
  CHECK(s.root().at("wide.k4").as_integer() == 1);
  CHECK_FALSE(s.root().member("wide").as_integer());
  // Members visited share one view while visited; a copy taken then keeps its own member.
  CHECK(s.root().at("blob.b").as_integer() == 2);
  for (const pop::value_view& parent : {r, s.root().member("wide"), s.root().member("blob")}) {
    std::vector<std::pair<std::string, pop::value_view>> kept;
    parent.for_each_member([&](std::string_view key, const pop::value_view& m) {
      kept.emplace_back(std::string(key), m);
      return true;
    });
    REQUIRE(kept.size() == parent.size());
    for (const auto& [key, m] : kept) {
      INFO(key);
      CHECK(m.to_json() == parent.member(key).to_json());
    }
  }
}

TEST_CASE("packed bytes are checked as a stored value is, and never read outside themselves",
          "[state]") {
  rc::prop("valid() accepts what encode() packs and survives any damage to it", [] {
    const json value = *any_json(2);
    std::string bytes;
    RC_ASSERT(d::packed::encode(value, bytes));
    const bool container = value.is_string() || value.is_structured();
    RC_ASSERT(d::packed::valid(bytes, false, 0, 0) ==
              (container && pop::check_storable(value, "v").ok()));
    // Damaged copies (a byte changed, cut short, one added), each in its own allocation of
    // exactly its size, so a read past the end is caught under AddressSanitizer.
    std::string damaged = bytes;
    const auto at = *rc::gen::inRange<std::size_t>(0, damaged.size());
    damaged[at] = static_cast<char>(*rc::gen::inRange(0, 256));
    for (const std::string& b : {damaged, bytes.substr(0, at), bytes + "x"}) {
      const std::unique_ptr<char[]> exact(new char[b.size() + 1]);
      std::memcpy(exact.get(), b.data(), b.size());
      if (d::packed::valid(std::string_view(exact.get(), b.size()), false, 0, 0)) {
        static_cast<void>(d::packed::decode(exact.get()));  // a valid value decodes
      }
    }
  });
}

TEST_CASE("the packed writer builds what encode() packs, and refuses keys out of order",
          "[state]") {
  d::packed::writer w;
  w.begin_object();
  w.key("a");
  w.integer(-40);
  w.key("b");
  w.begin_array();
  w.string("x");
  w.boolean(true);
  w.null();
  w.value(json{{"k", 1.5}});
  w.end();
  w.key("c");
  w.begin_object();
  for (int i = 0; i < 40; ++i) {  // more than 31 members: the long header
    w.key("m" + std::string(i < 10 ? "0" : "") + std::to_string(i));
    w.integer(i);
  }
  w.end();
  w.end();
  REQUIRE(w.ok());
  json want = {{"a", -40}, {"b", json::array({"x", true, nullptr, {{"k", 1.5}}})}};
  for (int i = 0; i < 40; ++i) {
    want["c"]["m" + std::string(i < 10 ? "0" : "") + std::to_string(i)] = i;
  }
  std::string encoded;
  REQUIRE(d::packed::encode(want, encoded));
  CHECK(w.bytes() == encoded);

  d::packed::writer unordered;
  unordered.begin_object();
  unordered.key("b");
  unordered.integer(1);
  unordered.key("a");
  unordered.integer(2);
  unordered.end();
  CHECK_FALSE(unordered.ok());
  CHECK_FALSE(d::packed::valid(unordered.bytes(), false, 0, 0));  // the engine would refuse it
  d::packed::writer open;
  open.begin_array();
  CHECK_FALSE(open.ok());
}

TEST_CASE("a process may write a value as packed bytes: checked, then stored as they are",
          "[state]") {
  pop::engine e;
  std::string bytes;
  REQUIRE(e.register_process({.name = "put", .outputs = {"domain.r", "domain.outbox_queue"}},
                             [&](const pop::context&, const json& args) {
                               pop::result r;
                               r.set(args.at("at").get<std::string>(), d::packed::as_json(bytes));
                               return r;
                             })
              .ok());
  const auto packed = [](const json& v) {
    std::string b;
    REQUIRE(d::packed::encode(v, b));
    return b;
  };
  // A record, and one past the whole-storage limits (stored as a member map, as make_node would).
  json wide = json::object();
  for (int i = 0; i < 20; ++i) wide["k" + std::to_string(i)] = i;
  for (const json& v : {json{{"a", 1}, {"b", "x"}}, wide, json("text")}) {
    bytes = packed(v);
    REQUIRE(e.execute("put", {{"at", "domain.r"}}).ok());
    CHECK(e.snapshot().root().at("domain.r").to_json() == v);
  }
  const std::uint64_t version = e.version();
  const json before = e.snapshot().to_json();
  // Refused, naming the process and the path, with nothing committed: bytes that are not a value,
  // not storable, a scalar (never packed), and any write in the outbox (above it, no process may
  // write: its contract is refused at registration).
  const std::string good = packed(json{{"a", 1}});
  for (const auto& [b, at] : std::vector<std::pair<std::string, std::string>>{
           {good.substr(0, good.size() - 1), "domain.r"},
           {good + "x", "domain.r"},
           {std::string("\xff"), "domain.r"},
           {std::string(), "domain.r"},
           {packed(json{{"s", "ok"}}).replace(3, 1, "\xff"), "domain.r"},
           {packed(json(7)), "domain.r"},
           {good, "domain.outbox_queue"},
           {good, "domain.outbox_queue.00000000000000000001-000000"}}) {
    bytes = b;
    const absl::Status s = e.execute("put", {{"at", at}}).status();
    INFO(s);
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK(absl::StrContains(s.message(), "'put'"));
    CHECK(absl::StrContains(s.message(), at));
  }
  // Bytes that are well formed but not storable are refused as that value would be: naming where.
  bytes = packed(json{{"s", "ok"}}).replace(4, 1, "\xff");  // the "o"
  const absl::Status utf8 = e.execute("put", {{"at", "domain.r"}}).status();
  INFO(utf8);
  CHECK(absl::StrContains(utf8.message(), "not valid UTF-8"));
  CHECK(absl::StrContains(utf8.message(), "'/s'"));
  // A varint past 64 bits is malformed (an integer tag, then ten bytes of 0xff and a 0x7f).
  CHECK_FALSE(
      d::packed::valid(std::string("\x91\x03") + std::string(9, '\xff') + "\x7f", false, 0, 0));
  CHECK(e.version() == version);
  CHECK(e.snapshot().to_json() == before);
}

TEST_CASE("the one-walk checked packing refuses what check_storable refuses", "[state]") {
  const std::string bad_utf8 = "\xff\xfe";
  const json deep = [] {
    json v = json::array();
    for (int i = 0; i < 600; ++i) v = json::array({v});
    return v;
  }();
  for (const json& v :
       {json{{"a", bad_utf8}}, json{{bad_utf8, 1}}, json::array({1, std::nan("")}),
        json{{"x", {{"y", std::numeric_limits<double>::infinity()}}}}, json(bad_utf8), deep}) {
    INFO(v.dump(-1, ' ', false, json::error_handler_t::replace).substr(0, 60));
    CHECK_FALSE(pop::check_storable(v, "v").ok());
    CHECK(d::make_checked_small_node(v) == nullptr);
  }
  // Within the limits and storable: packed; an object past 16 members: not (a member map).
  CHECK(d::make_checked_small_node(json{{"a", 1.5}, {"b", "text"}}) != nullptr);
  json wide = json::object();
  for (int i = 0; i < 17; ++i) wide["k" + std::to_string(i)] = i;
  CHECK(d::make_checked_small_node(wide) == nullptr);
  CHECK(d::make_checked_small_node(json(5)) == nullptr);  // scalars are not packed
}

TEST_CASE("a small record is packed in about the length of its text", "[state]") {
  const json account = {{"balance", 1000}, {"owner", "owner-123456"}};
  std::string bytes;
  REQUIRE(d::packed::encode(account, bytes));
  CHECK(bytes.size() < account.dump().size());
  const d::node_ptr node = d::make_node(account);
  REQUIRE(node->packed_bytes() != nullptr);
  CHECK(!node->is_map());
  // Writing into it gives a new packed record and leaves the old one as it was.
  const d::node_ptr root = d::make_root(json{{"a", account}});
  const d::node_ptr next = d::assign(root, "a.balance", d::make_node(7)).value();
  CHECK(d::lookup(*next, "a").node->packed_bytes() != nullptr);
  CHECK(d::materialise(d::lookup(*next, "a")) == json{{"balance", 7}, {"owner", "owner-123456"}});
  CHECK(d::materialise(d::lookup(*root, "a.balance")) == 1000);
  // A long value is refused before it is copied, not after.
  std::string refused;
  CHECK_FALSE(d::packed::encode(json{{"a", 1}, {"text", std::string(1 << 20, 't')}}, refused, 512));
  CHECK(refused.size() <= 512);
  // A value that does not pack (too long) stays JSON and reads the same.
  const json big = {{"text", std::string(2000, 't')}};
  const d::node_ptr blob = d::make_node(big);
  CHECK(blob->packed_bytes() == nullptr);
  CHECK(d::materialise({blob.get(), nullptr}) == big);
}

TEST_CASE("the state tree behaves like a plain JSON document under any writes and deletes",
          "[state]") {
  rc::prop("random assign/erase sequences match the JSON model, and old roots never change", [] {
    const auto gen_segs = rc::gen::resize(
        4, rc::gen::nonEmpty(rc::gen::container<std::vector<std::string>>(
               rc::gen::elementOf(std::vector<std::string>{"a", "b", "c", "k1", "k2", "zz"}))));
    const auto steps = *rc::gen::inRange(1, 120);
    d::node_ptr root = d::make_root(json::object());
    json model = json::object();
    std::vector<std::pair<d::node_ptr, json>> history;
    for (int i = 0; i < steps; ++i) {
      const auto segs = *gen_segs;
      const int kind = *rc::gen::inRange(0, 7);
      if (kind == 0) {
        model_erase(model, segs);
        root = d::erase(root, join(segs));
      } else {
        json value;
        switch (kind) {
          case 1:
            value = *rc::gen::inRange(-5, 5);
            break;
          case 2:
            value = json{{"x", i}, {"y", {{"z", "s"}}}};
            break;
          case 3:
            value = big_object(*rc::gen::inRange(10, 40), i);
            break;
          case 4:
            value = json::array({1, 2, i});
            break;
          case 5:
            value = *any_json(1);
            break;
          default:
            value = json::object();
            break;
        }
        json next = model;
        const bool ok = model_assign(next, segs, value);
        const auto r = d::assign(root, join(segs), d::make_node(value));
        RC_ASSERT(r.ok() == ok);
        if (ok) {
          root = *r;
          model = std::move(next);
        } else {
          RC_ASSERT(r.status().code() == absl::StatusCode::kFailedPrecondition);
        }
      }
      RC_ASSERT(same(d::materialise({root.get(), nullptr}), model));
      const auto probe = *gen_segs;
      const json* want = model_find(model, probe);
      const d::location got = d::lookup(*root, join(probe));
      RC_ASSERT(got.exists() == (want != nullptr));
      if (want) RC_ASSERT(same(d::materialise(got), *want));
      if (i % 10 == 0) history.emplace_back(root, model);
    }
    for (const auto& [old_root, old_model] : history) {
      RC_ASSERT(d::materialise({old_root.get(), nullptr}) == old_model);
    }
  });
}

TEST_CASE("large objects become member maps and small records stay whole", "[state]") {
  const d::node_ptr small = d::make_node(json{{"a", 1}, {"b", {{"c", 2}}}});
  CHECK_FALSE(small->is_map());
  const d::node_ptr large = d::make_node(big_object(1000, 1));
  CHECK(large->is_map());
  CHECK(large->members().size() == 1000);
  // Growing a small object by writes turns it into a member map.
  d::node_ptr root = d::make_root(json::object());
  for (int i = 0; i < 100; ++i) {
    root = d::assign(root, "domain.accounts.a" + std::to_string(i), d::make_node(i)).value();
  }
  const d::location accounts = d::lookup(*root, "domain.accounts");
  REQUIRE(accounts.exists());
  CHECK(accounts.node->is_map());
  CHECK(d::materialise(d::lookup(*root, "domain.accounts.a42")) == 42);
}

TEST_CASE("a write shares every untouched subtree with the previous version", "[state]") {
  d::node_ptr root =
      d::make_root(json{{"domain", {{"big", big_object(5000, 3)}, {"other", big_object(50, 1)}}}});
  const d::node_ptr before_other = *(*root->members().find("domain"))->members().find("other");
  const d::node_ptr next = d::assign(root, "domain.big.k7", d::make_node(-1)).value();
  const d::value_node& domain = **next->members().find("domain");
  CHECK(domain.members().find("other")->get() == before_other.get());
  CHECK(d::materialise(d::lookup(*root, "domain.big.k7")) == 21);
  CHECK(d::materialise(d::lookup(*next, "domain.big.k7")) == -1);
  // Erasing a missing path returns the same root: no copy at all.
  CHECK(d::erase(next, "domain.big.nope") == next);
  CHECK(d::erase(next, "domain.big.k7.deeper") == next);
}

TEST_CASE("views of a value a commit left alone share it; views of a changed one do not",
          "[state]") {
  json big = json::object();
  for (int i = 0; i < 100; ++i) big["k" + std::to_string(i)] = {{"n", i}};
  auto e = pop::test::must(pop::engine::open(
      {.initial_state = {{"data", {{"big", big}, {"small", {{"a", 1}}}, {"other", big}}}}}));
  REQUIRE(e->register_process({.name = "set", .inputs = {"data"}, .outputs = {"data"}},
                              [](const pop::context&, const json& args) {
                                pop::result r;
                                r.set(args.at("at").get<std::string>(), args.at("v"));
                                return r;
                              })
              .ok());
  const pop::snapshot before = e->snapshot();
  REQUIRE(e->execute("set", {{"at", "data.big.k3.n"}, {"v", -1}}).ok());
  const pop::snapshot after = e->snapshot();
  const auto view = [](const pop::snapshot& s, const char* at) {
    return s.view(pop::path::parse(at).value());
  };
  CHECK(view(after, "data.other").shares(view(before, "data.other")));
  CHECK(view(after, "data.big.k4").shares(view(before, "data.big.k4")));
  CHECK(!view(after, "data.big").shares(view(before, "data.big")));
  CHECK(!view(after, "data.big.k3").shares(view(before, "data.big.k3")));
  CHECK(view(after, "data.nope").shares(view(before, "data.nope")));  // absent both times
  CHECK(!view(after, "data.small").shares(view(after, "data.other")));
}

TEST_CASE("a view reads one deep value and iterates members without materialising", "[state]") {
  const pop::snapshot empty;
  CHECK(empty.version() == 0);
  CHECK(empty.outbox_path().str() == "domain.outbox_queue");
  CHECK(empty.read("domain.x").status().code() == absl::StatusCode::kNotFound);
  CHECK(empty.read("bad..path").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(empty.pending_count() == 0);
}

TEST_CASE("appended messages are kept typed in an outbox that is always a member map", "[state]") {
  pop::engine e;
  REQUIRE(e.register_process({.name = "emit", .emits = {"t"}}, [](const pop::context&,
                                                                  const json& args) {
             pop::result r;
             r.emit("t", args, "key-1");
             return r;
           }).ok());
  const std::string id = e.execute("emit", {{"n", 1}}).value().message_ids.at(0);
  const pop::snapshot s = e.snapshot();
  const pop::value_view queue = s.view(e.outbox_path());
  REQUIRE(queue.size() == 1);
  const pop::value_view stored = queue.member(id);
  const pop::outbox_message* typed = stored.message();
  REQUIRE(typed != nullptr);
  CHECK(typed->id == id);
  CHECK(typed->key == "key-1");
  CHECK(typed->payload == json{{"n", 1}});
  CHECK(typed->version == s.version());
  // Read as JSON it is the stored-message codec's form, member by member too.
  CHECK(stored.to_json() == typed->to_json());
  CHECK(stored.member("key").get<std::string>() == "key-1");
  CHECK(stored.get<pop::outbox_message>().id == id);
  CHECK(s.pending_messages().value().at(0).payload == json{{"n", 1}});
  // A value inside a message is not a message.
  CHECK(stored.member("payload").message() == nullptr);
}

TEST_CASE("a message kept as a compact record reads back exactly as it was, field by field",
          "[state]") {
  rc::prop("record, decode, JSON", [] {
    pop::outbox_message m;
    m.version = *rc::gen::oneOf(rc::gen::arbitrary<std::uint64_t>(),
                                rc::gen::inRange<std::uint64_t>(0, 100));
    const auto index = *rc::gen::inRange<std::uint32_t>(0, 1'000'000);
    // The id a commit gives (kept as its index), one of another version, or any text.
    switch (*rc::gen::inRange(0, 3)) {
      case 0:
        m.id = pop::make_message_id(m.version, index);
        break;
      case 1:
        m.id = pop::make_message_id(m.version + 1, index);
        break;
      default:
        m.id = *pop::test::any_text();
    }
    m.topic = *pop::test::any_text();
    m.key = *pop::test::any_text();
    m.payload = *any_json(2);
    m.headers = *rc::gen::container<std::map<std::string, std::string>>(pop::test::any_text(),
                                                                        pop::test::any_text());
    m.created_at_us = *rc::gen::arbitrary<std::int64_t>();
    m.attempts = *rc::gen::arbitrary<std::uint32_t>();
    m.last_error = *pop::test::any_text();
    m.next_attempt_at_us = *rc::gen::arbitrary<std::int64_t>();
    m.failures = *rc::gen::container<std::vector<pop::delivery_failure>>(
        rc::gen::build<pop::delivery_failure>(
            rc::gen::set(&pop::delivery_failure::attempt),
            rc::gen::set(&pop::delivery_failure::at_us),
            rc::gen::set(&pop::delivery_failure::error, pop::test::valid_text())));
    const d::node_ptr node = d::make_message_node(m);
    RC_ASSERT(node->is_message());
    // What the relay's scan reads, from the record itself.
    const d::message_schedule due = node->schedule();
    RC_ASSERT(due.key == m.key);
    RC_ASSERT(due.next_attempt_at_us == m.next_attempt_at_us);
    RC_ASSERT(due.created_at_us == m.created_at_us);
    // As JSON first (decoded for that read only), then typed (decoded once, kept).
    RC_ASSERT(same(d::materialise({node.get(), nullptr}), m.to_json()));
    const pop::outbox_message* typed = node->message();
    RC_ASSERT(typed != nullptr);
    RC_ASSERT(node->message() == typed);
    RC_ASSERT(*typed == m);
    RC_ASSERT(same(typed->payload, m.payload));  // number kinds kept too
    RC_ASSERT(same(node->as_json(), m.to_json()));
    RC_ASSERT(node->schedule().key == m.key);  // (from the decoded message now)
  });
}

TEST_CASE("a commit's messages are kept as records that read back as emitted", "[state]") {
  // A payload too large for the smaller blocks, and one with no JSON text form (binary), which
  // is kept as a decoded message instead.
  pop::engine e;
  REQUIRE(e.register_process({.name = "emit", .emits = {"t"}}, [](const pop::context&,
                                                                  const json& args) {
             pop::result r;
             r.emit("t", args, "k", {{"h", "v"}});
             return r;
           }).ok());
  for (const json& payload :
       {json{{"n", 1}}, json{{"long", std::string(2000, 'x')}}, json(std::string(600, 'y'))}) {
    INFO(payload.dump().size());
    const std::string id = e.execute("emit", payload).value().message_ids.at(0);
    const pop::snapshot s = e.snapshot();
    const pop::value_view stored = s.view(e.outbox_path()).member(id);
    CHECK(stored.to_json().at("payload") == payload);
    REQUIRE(stored.message() != nullptr);
    CHECK(stored.message()->payload == payload);
    CHECK(stored.message()->id == id);
    CHECK(stored.message()->headers == std::map<std::string, std::string>{{"h", "v"}});
    CHECK(stored.message()->version == s.version());
    CHECK(stored.to_json() == stored.message()->to_json());
    REQUIRE(stored.schedule().has_value());
    CHECK(stored.schedule()->key == "k");
    CHECK(stored.schedule()->created_at_us == stored.message()->created_at_us);
    CHECK_FALSE(stored.member("payload").schedule().has_value());
  }
  pop::outbox_message binary;
  binary.id = pop::make_message_id(3, 0);
  binary.version = 3;
  binary.payload = json::binary({1, 2, 3});
  const d::node_ptr node = d::make_message_node(binary);
  REQUIRE(node->message() != nullptr);
  CHECK(*node->message() == binary);
  CHECK(node->schedule().key.empty());
}

TEST_CASE("messages pending at open are kept typed and read back exactly as given", "[state]") {
  pop::outbox_message m;
  m.version = 0;
  m.id = pop::make_message_id(0, 0);
  m.topic = "t";
  m.key = "k";
  m.payload = {{"n", 1}};
  const json typed_form = m.to_json();
  json without_failures = typed_form;  // valid, but not exactly the codec's form
  without_failures["id"] = pop::make_message_id(0, 1);
  without_failures.erase("failures");
  const json queue = {{typed_form["id"].get<std::string>(), typed_form},
                      {without_failures["id"].get<std::string>(), without_failures}};
  pop::test::temp_dir dir;
  for (const bool journaled : {false, true}) {
    pop::options o{.initial_state = {{"domain", {{"outbox_queue", queue}}}}};
    if (journaled) o.journal = dir.file("typed.db");
    for (int open = 0; open < (journaled ? 2 : 1); ++open) {  // journaled: created, then replayed
      INFO("journaled " << journaled << ", open " << open);
      auto e = pop::engine::open(o).value();
      const pop::snapshot s = e->snapshot();
      const pop::value_view first = s.view(e->outbox_path()).member(m.id);
      REQUIRE(first.message() != nullptr);
      CHECK(first.message()->payload == json{{"n", 1}});
      const pop::value_view second =
          s.view(e->outbox_path()).member(without_failures["id"].get<std::string>());
      CHECK(second.message() == nullptr);
      CHECK(s.read(e->outbox_path().str()).value() == queue);
    }
  }
}

TEST_CASE("a commit's common ancestor rules out exactly the changes that overlap none of its paths",
          "[state]") {
  // Known cases first.
  const auto ancestor = [](std::initializer_list<std::string_view> paths) {
    std::string written;
    for (const std::string_view p : paths) pop::detail::add_written(written, p);
    return std::string(written.substr(0, pop::detail::common_ancestor(written)));
  };
  CHECK(ancestor({"a.b.c", "a.b.d"}) == "a.b");
  CHECK(ancestor({"a.b", "a.bc"}) == "a");
  CHECK(ancestor({"a.b.c", "a.b"}) == "a.b");
  CHECK(ancestor({"a.b.c", "a.b.c.d", "a.b.c"}) == "a.b.c");
  CHECK(ancestor({"ab", "ac"}).empty());
  CHECK(ancestor({"x"}) == "x");
  CHECK(ancestor({"domain.outbox_queue.1", "domain.outbox_queue.2", "domain.orders.o1"}) ==
        "domain");

  rc::prop("skipping by the ancestor never skips an overlap", [] {
    // Paths over a tiny alphabet, so prefixes like "a.b" / "a.bb" and shared segments are common.
    const auto gen_path = rc::gen::map(rc::gen::container<std::vector<std::string>>(
                                           *rc::gen::inRange<std::size_t>(1, 4),
                                           rc::gen::element<std::string>("a", "b", "ab", "bb")),
                                       [](const std::vector<std::string>& segments) {
                                         std::string text;
                                         for (const std::string& s : segments)
                                           text += (text.empty() ? "" : ".") + s;
                                         return text;
                                       });
    const auto written_paths = *rc::gen::container<std::vector<std::string>>(
        *rc::gen::inRange<std::size_t>(1, 6), gen_path);
    const auto access_paths = *rc::gen::container<std::vector<std::string>>(
        *rc::gen::inRange<std::size_t>(1, 12), gen_path);
    std::string written;
    for (const std::string& p : written_paths) pop::detail::add_written(written, p);
    pop::path_set access;
    for (const std::string& p : access_paths) access.insert(pop::path::parse(p).value());
    const std::size_t n = pop::detail::common_ancestor(written);
    bool overlap = false;
    for (const std::string& p : written_paths)
      overlap = overlap || access.overlaps(std::string_view(p));
    if (n > 0) {
      const std::string_view top = std::string_view(written).substr(0, n);
      for (const std::string& p : written_paths) {
        RC_ASSERT(pop::path::parse(std::string(top)).value().contains(pop::path::parse(p).value()));
      }
      if (!access.overlaps(top)) RC_ASSERT(!overlap);
    }
  });
}

TEST_CASE("a view reached with at() equals one reached member by member, in every stored form",
          "[state]") {
  // Objects of every size (member maps, packed records, JSON blobs), arrays and scalars below.
  rc::prop("at(path) against member() chains and the JSON", [] {
    const json doc = *any_json(4, rc::gen::element<std::string>("a", "b", "c", "k1", "k2"));
    const d::node_ptr root = d::make_root(json{{"d", doc}});
    const pop::snapshot s = d::process_runner::make_snapshot(
        std::make_shared<const d::version_state>(d::version_state{1, root, nullptr}));
    // Every path of up to four segments over the generator's keys (and one that is never there).
    const std::vector<std::string> keys = {"a", "b", "c", "k1", "k2", "zz"};
    std::vector<std::vector<std::string>> paths = {{"d"}};
    for (std::size_t i = 0; i < paths.size(); ++i) {
      if (paths[i].size() == 4) continue;
      for (const std::string& k : keys) {
        paths.push_back(paths[i]);
        paths.back().push_back(k);
      }
    }
    for (const std::vector<std::string>& segs : paths) {
      std::string text;
      pop::value_view chained = s.root();
      const json* expected = nullptr;
      json whole = json{{"d", doc}};
      expected = &whole;
      for (const std::string& seg : segs) {
        text += (text.empty() ? "" : ".") + seg;
        chained = chained.member(seg);
        expected = expected != nullptr && expected->is_object() && expected->contains(seg)
                       ? &(*expected)[seg]
                       : nullptr;
      }
      const pop::value_view direct = s.root().at(text);
      RC_ASSERT(direct.exists() == chained.exists());
      RC_ASSERT(direct.exists() == (expected != nullptr));
      if (expected != nullptr) {
        RC_ASSERT(direct.to_json() == *expected);
        RC_ASSERT(direct.shares(chained));
      }
    }
  });
}

TEST_CASE("at() reads into a stored outbox message as member() does", "[state]") {
  pop::engine e;
  REQUIRE(
      e.register_process({.name = "emit", .emits = {"t"}}, [](const pop::context&, const json& a) {
         pop::result r;
         r.emit("t", a, "k1");
         return r;
       }).ok());
  const std::string id = e.execute("emit", {{"n", 1}, {"s", "x"}}).value().message_ids.at(0);
  const pop::snapshot s = e.snapshot();
  const pop::value_view stored = s.view(s.outbox_path()).member(id);
  REQUIRE(stored.message() != nullptr);  // kept typed
  const std::string at = s.outbox_path().str() + "." + id;
  for (const std::string rest : {"key", "topic", "payload", "payload.n", "payload.s", "nothing"}) {
    CAPTURE(rest);
    const pop::value_view direct = s.root().at(at + "." + rest);
    pop::value_view chained = stored;
    for (std::string_view left = rest; chained.exists() && !left.empty();) {
      const std::size_t dot = std::min(left.find('.'), left.size());
      chained = chained.member(left.substr(0, dot));
      left.remove_prefix(std::min(dot + 1, left.size()));
    }
    REQUIRE(direct.exists() == chained.exists());
    if (direct.exists()) CHECK(direct.to_json() == chained.to_json());
  }
  CHECK(s.root().at(at + ".payload.n").get<int>() == 1);
  CHECK(s.root().at(at + ".key").get<std::string>() == "k1");
}
