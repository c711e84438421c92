// Tests for pop::detail::written_log: a RapidCheck property against a deque of strings, and the
// reuse of its blocks.
#include "pop/engine/detail/written_log.hpp"

#include <rapidcheck/catch.h>
#include <catch2/catch.hpp>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <string_view>
#include <vector>

namespace {

using pop::detail::written_log;

struct logged {
  std::uint64_t version;
  std::string written;
  std::size_t messages_at;
  std::size_t ancestor;
};

// A text of `size` bytes that differs from every other version's.
std::string text_of(std::uint64_t version, std::size_t size) {
  std::string s(size, '\0');
  for (std::size_t i = 0; i < size; ++i) s[i] = static_cast<char>('a' + (version * 31 + i) % 26);
  return s;
}

void check_equal(const written_log& log, const std::deque<logged>& model) {
  RC_ASSERT(log.size() == model.size());
  RC_ASSERT(log.empty() == model.empty());
  for (std::size_t i = 0; i < model.size(); ++i) {
    const written_log::entry e = log[i];
    RC_ASSERT(e.version == model[i].version);
    RC_ASSERT(e.written == std::string_view(model[i].written));
    RC_ASSERT(e.messages_at == model[i].messages_at);
    RC_ASSERT(e.ancestor == model[i].ancestor);
  }
}

}  // namespace

TEST_CASE("the conflict log keeps every commit's texts as a window of strings would",
          "[engine][written_log]") {
  rc::prop("pushes and pops of texts of any size, some past a block", [] {
    // (Sizes: mostly small, as commits' paths are; some over half a block, some over a block.)
    const auto sizes =
        *rc::gen::container<std::vector<std::size_t>>(rc::gen::weightedOneOf<std::size_t>(
            {{30, rc::gen::inRange<std::size_t>(0, 300)},
             {2, rc::gen::inRange<std::size_t>(written_log::block_size / 2,
                                               written_log::block_size + 1)},
             {1, rc::gen::inRange<std::size_t>(written_log::block_size + 1,
                                               2 * written_log::block_size)}}));
    const auto window = *rc::gen::inRange<std::size_t>(1, 12);
    written_log log;
    std::deque<logged> model;
    std::uint64_t version = *rc::gen::inRange<std::uint64_t>(0, 1000);
    for (const std::size_t size : sizes) {
      // As the engine does: make room, then append.
      while (model.size() >= window) {
        log.pop_front();
        model.pop_front();
      }
      ++version;
      std::string text = text_of(version, size);
      const std::size_t messages_at = size / 2;
      const std::size_t ancestor = size / 3;
      log.push_back(version, text, messages_at, ancestor);
      model.push_back({version, std::move(text), messages_at, ancestor});
      check_equal(log, model);
    }
    while (!model.empty()) {
      log.pop_front();
      model.pop_front();
      check_equal(log, model);
    }
  });
}

TEST_CASE("the conflict log keeps a text in one block and reuses a block once left behind",
          "[engine][written_log]") {
  written_log log;
  // Commits of 1,000 bytes: 65 of them fill a block, the 66th starts the next.
  const std::size_t per_block = written_log::block_size / 1000;
  std::vector<const char*> starts;
  for (std::uint64_t v = 1; v <= 2 * per_block; ++v) {
    log.push_back(v, text_of(v, 1000), 0, 0);
    starts.push_back(log.back().written.data());
  }
  // The first block holds the first texts one after another.
  CHECK(starts[per_block - 1] == starts[0] + (per_block - 1) * 1000);
  // Every commit of the first block leaves; the next block started after that reuses its memory.
  for (std::size_t i = 0; i < per_block; ++i) log.pop_front();
  log.push_back(2 * per_block + 1, text_of(2 * per_block + 1, written_log::block_size - 10), 0, 0);
  CHECK(log.back().written.data() == starts[0]);
  CHECK(log.size() == per_block + 1);
  CHECK(log.front().version == per_block + 1);
  CHECK(std::string(log.front().written) == text_of(per_block + 1, 1000));
}
