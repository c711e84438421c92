// Defines pop::detail::written_log: the paths each recent commit wrote, for the engine's conflict
// checks, kept in large blocks rather than one allocation per commit.
#pragma once

#include <cassert>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <string_view>
#include <vector>

namespace pop::detail {

// A window of consecutive commits, oldest first, each with the texts of the paths it wrote
// (add_written's form). Texts are copied into blocks of block_size bytes that are reused once
// every commit in them has left the window: the log costs a commit a copy of its text (and, once
// a block is full, the next block: the spare, else an allocation), and leaving the window frees
// nothing. (With one string per commit, the engine freed per commit a string
// allocated `conflict_window` commits earlier, long out of the cache: a tenth of an in-memory
// execute.) Not thread-safe: the engine holds its commit lock.
class written_log {
 public:
  static constexpr std::size_t block_size = 64 << 10;

  struct entry {
    std::uint64_t version = 0;
    std::string_view written;     // the paths it wrote, each followed by '\n'
    std::size_t messages_at = 0;  // written[messages_at, end): the messages it appended
    std::size_t ancestor = 0;     // written[0, ancestor): the path containing all the others
  };

  bool empty() const { return count_ == 0; }
  std::size_t size() const { return count_; }
  // The i-th oldest commit (0: the oldest), valid until it leaves the window.
  entry operator[](std::size_t i) const {
    assert(i < count_);
    const meta& m = ring_[(first_ + i) & (ring_.size() - 1)];
    return {m.version, {m.text, m.size}, m.messages_at, m.ancestor};
  }
  entry front() const { return (*this)[0]; }
  entry back() const { return (*this)[count_ - 1]; }

  // Appends a commit (the next version after back()'s, as the engine commits them).
  void push_back(std::uint64_t version, std::string_view written, std::size_t messages_at,
                 std::size_t ancestor) {
    assert(empty() || version == back().version + 1);
    if (count_ == ring_.size()) grow_ring();
    if (blocks_.empty() || used_ + written.size() > blocks_.back().capacity) {
      add_block(written.size());
    }
    char* const text = blocks_.back().bytes.get() + used_;
    if (!written.empty()) std::memcpy(text, written.data(), written.size());
    used_ += written.size();
    ring_[(first_ + count_) & (ring_.size() - 1)] = {
        version, text, written.size(), messages_at, ancestor, first_block_ + blocks_.size() - 1};
    ++count_;
  }

  // Drops the oldest commit; a block none of the remaining commits is in is kept for reuse.
  void pop_front() {
    assert(!empty());
    first_ = (first_ + 1) & (ring_.size() - 1);
    --count_;
    // (The newest block stays even when the window empties: the next commit writes on in it.)
    const std::uint64_t keep_from =
        count_ == 0 ? first_block_ + blocks_.size() - 1 : ring_[first_].block;
    while (first_block_ < keep_from) {
      if (blocks_.front().capacity == block_size && !spare_) {
        spare_ = std::move(blocks_.front().bytes);
      }
      blocks_.pop_front();
      ++first_block_;
    }
  }

 private:
  struct meta {
    std::uint64_t version;
    const char* text;
    std::size_t size;
    std::size_t messages_at;
    std::size_t ancestor;
    std::uint64_t block;  // the sequence number of the block `text` is in
  };
  struct block {
    std::unique_ptr<char[]> bytes;
    std::size_t capacity;
  };

  void grow_ring() {
    std::vector<meta> bigger(ring_.empty() ? 64 : ring_.size() * 2);
    for (std::size_t i = 0; i < count_; ++i) bigger[i] = ring_[(first_ + i) & (ring_.size() - 1)];
    ring_ = std::move(bigger);
    first_ = 0;
  }
  void add_block(std::size_t at_least) {
    block b;
    b.capacity = at_least > block_size ? at_least : block_size;
    if (b.capacity == block_size && spare_) {
      b.bytes = std::move(spare_);
    } else {
      b.bytes = std::make_unique_for_overwrite<char[]>(b.capacity);
    }
    blocks_.push_back(std::move(b));
    used_ = 0;
  }

  std::vector<meta> ring_;  // a power of two in size; entries [first_, first_ + count_), wrapped
  std::size_t first_ = 0;
  std::size_t count_ = 0;
  std::deque<block> blocks_;  // blocks_[i] has sequence number first_block_ + i
  std::uint64_t first_block_ = 0;
  std::size_t used_ = 0;  // bytes used in blocks_.back()
  std::unique_ptr<char[]> spare_;
};

}  // namespace pop::detail
