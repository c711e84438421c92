// Tests of contracts/: paths, path sets, process specs and outbox messages.
#include <rapidcheck/catch.h>
#include <catch2/catch.hpp>

#include <atomic>
#include <thread>

#include "pop/contracts/clock.hpp"
#include "pop/contracts/outbox_message.hpp"
#include "pop/contracts/path.hpp"
#include "pop/contracts/process_spec.hpp"

namespace {
pop::path P(std::string_view s) {
  return pop::path::parse(s).value();
}
}  // namespace

TEST_CASE("valid paths parse and report their segments", "[contracts]") {
  const pop::path p = P("domain.orders.o-17.status");
  CHECK(p.str() == "domain.orders.o-17.status");
  CHECK(p.depth() == 4);
  CHECK(p.segments() == std::vector<std::string_view>{"domain", "orders", "o-17", "status"});
  CHECK(p.child("x").value().str() == "domain.orders.o-17.status.x");
  CHECK(P("a_B-9").depth() == 1);
}

TEST_CASE("bad paths are rejected with a message that says what is wrong", "[contracts]") {
  const struct {
    std::string text;
    const char* says;
  } cases[] = {
      {"", "at least one segment"},
      {"a..b", "segment 2 is empty"},
      {".a", "segment 1 is empty"},
      {"a.", "segment 2 is empty"},
      {"a.b c", "' '"},
      {"a.b/c", "'/'"},
      {std::string(1100, 'a'), "limit is 1024"},
      {std::string(130, 'a'), "longer than 128"},
      {[] {
         std::string s = "a";
         for (int i = 0; i < 40; ++i) s += ".a";
         return s;
       }(),
       "limit is 32"},
  };
  for (const auto& c : cases) {
    const auto r = pop::path::parse(c.text);
    REQUIRE_FALSE(r.ok());
    INFO(r.status().message());
    CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(r.status().message()).find(c.says) != std::string::npos);
  }
  // A child is one segment: "b.c" would silently be two levels deeper.
  CHECK(P("a").child("b.c").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(P("a").child("b.c").status().message()).find("'b.c'") != std::string::npos);
  CHECK(P("a").child("b").value().str() == "a.b");
  std::string deep = "s";
  for (std::size_t i = 1; i < pop::max_path_depth; ++i) deep += ".s";
  CHECK(P(deep).child("t").status().code() == absl::StatusCode::kInvalidArgument);
  std::string wide(100, 'w');
  while (wide.size() + 101 <= pop::max_path_length - 2) wide += "." + std::string(100, 'w');
  wide += "." + std::string(pop::max_path_length - 3 - wide.size(), 'w');  // 2 short of the limit
  REQUIRE(wide.size() == pop::max_path_length - 2);
  CHECK(P(wide).child("x").ok());
  CHECK(P(wide).child("xy").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(P("a").child("").status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("a path is valid exactly when its segments are, by the rules written out",
          "[contracts]") {
  // The reference: the rules as stated (path.hpp), segment by segment.
  const auto valid = [](const std::string& text) {
    if (text.empty() || text.size() > pop::max_path_length) return false;
    std::size_t depth = 0;
    std::size_t start = 0;
    while (true) {
      const std::size_t dot = text.find('.', start);
      const std::string segment = text.substr(start, dot - start);
      ++depth;
      if (!pop::validate_segment(segment).ok()) return false;
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
    return depth <= pop::max_path_depth;
  };
  rc::prop("parse accepts exactly the valid paths", [&] {
    const auto piece =
        rc::gen::oneOf(rc::gen::element<std::string>(
                           "a", "Z", "0", "_", "-", ".", "..", " ", "\xc3\xa9", "/",
                           std::string(1, '\0'), std::string(127, 'x'), std::string(128, 'y'),
                           // (each just outside a range of segment characters, as compared
                           // sixteen bytes at a time, and the bytes with the high bit set)
                           "@", "[", "`", "{", ":", "\x7f", "\x80", "\xc1", "\xfa", "\xff",
                           "abcdefghijklmnop", "ABCDEFGHIJ.0123-_"),
                       rc::gen::arbitrary<std::string>());
    const std::string text = *rc::gen::map(rc::gen::container<std::vector<std::string>>(piece),
                                           [](std::vector<std::string> parts) {
                                             std::string out;
                                             for (const std::string& p : parts) out += p;
                                             return out;
                                           });
    RC_ASSERT(pop::path::parse(text).ok() == valid(text));
  });
  // Limits exactly at and past their edges.
  CHECK(pop::path::parse(std::string(128, 'a')).ok());
  CHECK_FALSE(pop::path::parse(std::string(129, 'a')).ok());
  std::string deep = "a";
  for (int i = 1; i < 32; ++i) deep += ".a";
  CHECK(pop::path::parse(deep).ok());
  CHECK_FALSE(pop::path::parse(deep + ".a").ok());
}

TEST_CASE("paths overlap when one is a segment-wise prefix of the other", "[contracts]") {
  CHECK(P("a.b").overlaps(P("a.b.c")));
  CHECK(P("a.b.c").overlaps(P("a.b")));
  CHECK(P("a.b").overlaps(P("a.b")));
  CHECK_FALSE(P("a.b").overlaps(P("a.bc")));
  CHECK_FALSE(P("a.b").overlaps(P("a.c")));
  CHECK(P("a.b").contains(P("a.b.c")));
  CHECK_FALSE(P("a.b.c").contains(P("a.b")));
  // Segment-wise order: a path sorts directly before its descendants.
  CHECK(P("a") < P("a.b"));
  CHECK(P("a.b") < P("a-b"));
  CHECK(P("a.z") < P("ab"));
}

TEST_CASE("path sets answer covers and overlaps like a scan of their members", "[contracts]") {
  const std::vector<std::string> alphabet = {"a", "b", "a-b", "ab", "c"};
  rc::prop("covers and overlaps match the pairwise definitions", [&] {
    const auto gen_path = rc::gen::apply(
        [&](std::vector<int> idx) {
          std::string s;
          for (int i : idx) s += (s.empty() ? "" : ".") + alphabet[static_cast<std::size_t>(i)];
          return P(s);
        },
        rc::gen::resize(4, rc::gen::nonEmpty(rc::gen::container<std::vector<int>>(
                               rc::gen::inRange(0, static_cast<int>(alphabet.size()))))));
    const auto members = *rc::gen::container<std::vector<pop::path>>(gen_path);
    const pop::path probe = *gen_path;
    pop::path_set set;
    for (const auto& m : members) set.insert(m);
    bool covers = false;
    bool overlaps = false;
    for (const auto& m : members) {
      covers = covers || m.contains(probe);
      overlaps = overlaps || m.overlaps(probe);
    }
    RC_ASSERT(set.covers(probe) == covers);
    RC_ASSERT(set.overlaps(probe) == overlaps);
    RC_ASSERT(set.overlaps(pop::path_set{probe}) == overlaps);
  });
}

TEST_CASE("process specs are validated into contracts", "[contracts]") {
  const auto c = pop::process_contract::from_spec({.name = "place_order",
                                                   .inputs = {"domain.inventory"},
                                                   .outputs = {"domain.orders"},
                                                   .emits = {"b", "a"}});
  REQUIRE(c.ok());
  CHECK(c->may_read(P("domain.inventory.A1")));
  CHECK_FALSE(c->may_read(P("domain")));
  CHECK(c->may_write(P("domain.orders.o1.status")));
  CHECK_FALSE(c->may_write(P("domain.ordersX")));
  CHECK(c->may_emit("a"));
  CHECK_FALSE(c->may_emit("c"));
  const auto nested =
      pop::process_contract::from_spec({.name = "n", .inputs = {"a.b", "a"}, .outputs = {"x"}});
  CHECK(nested.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(nested.status().message()).find("'n'") != std::string::npos);
}

TEST_CASE("message ids sort in commit order and round-trip", "[contracts]") {
  CHECK(pop::make_message_id(17, 0) == "00000000000000000017-000000");
  CHECK(pop::make_message_id(0, 0) == "00000000000000000000-000000");
  CHECK(pop::make_message_id(UINT64_MAX, 999999) == "18446744073709551615-999999");
  CHECK(pop::make_message_id(5, 1000000) == "00000000000000000005-1000000");
  rc::prop("an id holds its version and index, and ids sort as (version, index) do", [] {
    const auto v = *rc::gen::arbitrary<std::uint64_t>();
    const auto i = *rc::gen::inRange<std::uint32_t>(0, 1000000);
    const auto w = *rc::gen::arbitrary<std::uint64_t>();
    const auto j = *rc::gen::inRange<std::uint32_t>(0, 1000000);
    const std::string a = pop::make_message_id(v, i);
    const auto parsed = pop::parse_message_id(a);
    RC_ASSERT(parsed.ok());
    RC_ASSERT(parsed->first == v);
    RC_ASSERT(parsed->second == i);
    RC_ASSERT((a < pop::make_message_id(w, j)) == (std::pair(v, i) < std::pair(w, j)));
  });
  CHECK(pop::make_message_id(9, 999999) < pop::make_message_id(10, 0));
  CHECK(pop::make_message_id(10, 2) < pop::make_message_id(10, 10));
  const auto parsed = pop::parse_message_id(pop::make_message_id(123456789, 42));
  REQUIRE(parsed.ok());
  CHECK(parsed->first == 123456789);
  CHECK(parsed->second == 42);
  CHECK_FALSE(pop::parse_message_id("17-0").ok());
  CHECK_FALSE(
      pop::path::parse("domain.outbox_queue." + pop::make_message_id(1, 1)).status().code() !=
      absl::StatusCode::kOk);
}

TEST_CASE("outbox messages round-trip through their stored JSON form", "[contracts]") {
  pop::outbox_message m{.id = pop::make_message_id(3, 1),
                        .topic = "order.placed",
                        .key = "o-1",
                        .payload = {{"x", 1}},
                        .headers = {{"h", "v"}},
                        .created_at_us = 12,
                        .version = 3,
                        .attempts = 2,
                        .last_error = "timeout",
                        .next_attempt_at_us = 99};
  const auto back = pop::outbox_message::from_json(m.to_json());
  REQUIRE(back.ok());
  CHECK(*back == m);
  pop::json broken = m.to_json();
  broken["attempts"] = "two";
  const auto bad = pop::outbox_message::from_json(broken);
  CHECK(bad.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad.status().message()).find("attempts") != std::string::npos);
}

TEST_CASE("stored numbers that do not fit their field are refused, not converted",
          "[contracts][fuzz-regression]") {
  // Found by the stored-message fuzz target: a huge floating-point version was cast to an integer
  // (undefined behaviour; UBSan stopped it).
  pop::outbox_message m{.id = pop::make_message_id(3, 1), .topic = "t", .version = 3};
  m.failures.push_back({1, 5, "down"});
  const std::vector<std::pair<std::string, pop::json>> cases = {
      {"version", 1e67},
      {"version", -1},
      {"created_at_us", 3.00044e+37},
      {"created_at_us", 1.5},
      {"attempts", 4294967296LL},
      {"next_attempt_at_us", 18446744073709551615ULL},
  };
  for (const auto& [field, value] : cases) {
    pop::json stored = m.to_json();
    stored[field] = value;
    INFO(field << " = " << value.dump());
    const auto read = pop::outbox_message::from_json(stored);
    CHECK(read.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(read.status().message()), Catch::Contains(field));
  }
  pop::json failure = m.to_json();
  failure["failures"][0]["at_us"] = 1e300;
  CHECK(pop::outbox_message::from_json(failure).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(pop::outbox_message::from_json(m.to_json()).value() == m);
}

TEST_CASE("a manual clock's watcher is not called once its handle is released, nor while released",
          "[contracts]") {
  pop::manual_clock clock;
  std::atomic<int> calls{0};
  std::atomic<bool> entered{false};
  std::atomic<bool> proceed{false};
  std::atomic<bool> finished{false};
  std::shared_ptr<void> handle = clock.on_moved([&] {
    calls.fetch_add(1);
    entered.store(true);
    entered.notify_all();
    proceed.wait(false);  // held inside the call until the test lets it go
    finished.store(true);
  });
  REQUIRE(handle != nullptr);
  std::thread mover([&] { clock.advance(1); });
  entered.wait(false);
  // Releasing the handle now must wait for the call in progress to finish.
  bool finished_when_released = false;
  std::thread releaser([&] {
    handle.reset();
    finished_when_released = finished.load();
  });
  proceed.store(true);
  proceed.notify_all();
  mover.join();
  releaser.join();
  CHECK(finished_when_released);
  clock.advance(1);
  CHECK(calls == 1);

  // Releasing destroys the function and what it holds; a watcher may move the clock itself.
  auto held = std::make_shared<int>(0);
  int nested = 0;
  std::shared_ptr<void> again = clock.on_moved([&clock, &nested, held] {
    if (++nested == 1) clock.advance(1);
  });
  CHECK(held.use_count() == 2);
  clock.advance(1);
  CHECK(nested == 2);
  again.reset();
  CHECK(held.use_count() == 1);
}
