// pop::detail::compact_key: an immutable string for map keys, copied without allocating.
#pragma once

#include <atomic>
#include <bit>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <string_view>

namespace pop::detail {

// Byte-order comparison of `a` and `b` (<0, 0, >0), inline and eight bytes at a time: map keys are
// short (or share long prefixes, as message ids do), where a call to memcmp costs more than the
// comparison itself. A rest of under eight bytes is compared in one step, by loads that overlap
// (the last eight bytes; or the first and last four, or two), not byte by byte.
inline int compare_bytes(std::string_view a, std::string_view b) {
  static_assert(std::endian::native == std::endian::little ||
                std::endian::native == std::endian::big);
  // (Loads in big-endian order: their numeric order is the bytes' order.)
  const auto load64 = [](const char* s) {
    std::uint64_t x;
    std::memcpy(&x, s, 8);
    if constexpr (std::endian::native == std::endian::little) x = __builtin_bswap64(x);
    return x;
  };
  const auto load32 = [](const char* s) -> std::uint64_t {
    std::uint32_t x;
    std::memcpy(&x, s, 4);
    if constexpr (std::endian::native == std::endian::little) x = __builtin_bswap32(x);
    return x;
  };
  const auto load16 = [](const char* s) -> std::uint64_t {
    std::uint16_t x;
    std::memcpy(&x, s, 2);
    if constexpr (std::endian::native == std::endian::little) x = __builtin_bswap16(x);
    return x;
  };
  const std::size_t n = a.size() < b.size() ? a.size() : b.size();
  const char* const p = a.data();
  const char* const q = b.data();
  std::uint64_t x = 0;
  std::uint64_t y = 0;
  if (n >= 8) {
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      x = load64(p + i);
      y = load64(q + i);
      if (x != y) return x < y ? -1 : 1;
    }
    // The rest: the last eight bytes (those before them are equal).
    if (i < n) {
      x = load64(p + n - 8);
      y = load64(q + n - 8);
    }
  } else if (n >= 4) {  // the first four and the last four, overlapping
    x = load32(p) << 32 | load32(p + n - 4);
    y = load32(q) << 32 | load32(q + n - 4);
  } else if (n >= 2) {
    x = load16(p) << 16 | load16(p + n - 2);
    y = load16(q) << 16 | load16(q + n - 2);
  } else if (n == 1) {
    x = static_cast<unsigned char>(*p);
    y = static_cast<unsigned char>(*q);
  }
  if (x != y) return x < y ? -1 : 1;
  return a.size() < b.size() ? -1 : (a.size() > b.size() ? 1 : 0);
}
// Whether `a` and `b` hold the same bytes, as compare_bytes compares them.
inline bool equal_bytes(std::string_view a, std::string_view b) {
  return a.size() == b.size() && compare_bytes(a, b) == 0;
}

// An immutable byte string of 32 bytes. Up to 31 bytes are stored inline (an outbox message id
// is 27); a longer one lives in a shared, reference-counted block, so copying any key never
// allocates. Copies may be made and destroyed on different threads. Compares as its bytes.
class compact_key {
 public:
  static constexpr std::size_t inline_capacity = 31;

  compact_key() { set_inline_size(0); }
  compact_key(std::string_view text) {  // NOLINT(google-explicit-constructor): keys are text
    if (text.size() <= inline_capacity) {
      std::memcpy(bytes_, text.data(), text.size());
      set_inline_size(text.size());
      return;
    }
    void* raw = ::operator new(sizeof(shared) + text.size());
    auto* block = new (raw) shared{{1}, text.size()};
    std::memcpy(static_cast<char*>(raw) + sizeof(shared), text.data(), text.size());
    std::memcpy(bytes_, &block, sizeof(block));
    bytes_[inline_capacity] = heap_tag;
  }
  compact_key(const std::string& text) : compact_key(std::string_view(text)) {}
  compact_key(const char* text) : compact_key(std::string_view(text)) {}

  compact_key(const compact_key& other) noexcept {
    std::memcpy(bytes_, other.bytes_, sizeof(bytes_));
    if (const shared* block = heap()) block->refs.fetch_add(1, std::memory_order_relaxed);
  }
  compact_key(compact_key&& other) noexcept {
    std::memcpy(bytes_, other.bytes_, sizeof(bytes_));
    other.set_inline_size(0);
  }
  compact_key& operator=(const compact_key& other) noexcept {
    if (this != &other) {
      compact_key copy(other);
      swap(copy);
    }
    return *this;
  }
  compact_key& operator=(compact_key&& other) noexcept {
    if (this != &other) {
      release();
      std::memcpy(bytes_, other.bytes_, sizeof(bytes_));
      other.set_inline_size(0);
    }
    return *this;
  }
  ~compact_key() { release(); }

  std::string_view view() const {
    if (const shared* block = heap()) {
      return {reinterpret_cast<const char*>(block + 1), block->size};
    }
    return {bytes_, static_cast<std::size_t>(inline_capacity - bytes_[inline_capacity])};
  }
  operator std::string_view() const { return view(); }  // NOLINT(google-explicit-constructor)
  std::string str() const { return std::string(view()); }
  std::size_t size() const { return view().size(); }
  bool empty() const { return view().empty(); }

  friend bool operator==(const compact_key& a, const compact_key& b) {
    return a.view() == b.view();
  }
  friend bool operator==(const compact_key& a, std::string_view b) { return a.view() == b; }
  friend bool operator==(const compact_key& a, const std::string& b) { return a.view() == b; }
  friend bool operator==(const compact_key& a, const char* b) { return a.view() == b; }
  friend std::strong_ordering operator<=>(const compact_key& a, const compact_key& b) {
    return a.view() <=> b.view();
  }
  friend std::strong_ordering operator<=>(const compact_key& a, std::string_view b) {
    return a.view() <=> b;
  }

 private:
  struct shared {
    mutable std::atomic<std::uint32_t> refs;
    std::size_t size;
  };
  // The last byte: for an inline key, inline_capacity minus its size (so a full 31-byte key
  // ends in 0, which doubles as a terminator); heap_tag for a shared block.
  static constexpr char heap_tag = static_cast<char>(0x7f);

  void set_inline_size(std::size_t n) {
    bytes_[inline_capacity] = static_cast<char>(inline_capacity - n);
  }
  const shared* heap() const {
    if (bytes_[inline_capacity] != heap_tag) return nullptr;
    const shared* block = nullptr;
    std::memcpy(&block, bytes_, sizeof(block));
    return block;
  }
  void release() {
    if (const shared* block = heap()) {
      if (block->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        block->~shared();
        ::operator delete(const_cast<shared*>(block));
      }
    }
  }
  void swap(compact_key& other) noexcept {
    char tmp[sizeof(bytes_)];
    std::memcpy(tmp, bytes_, sizeof(bytes_));
    std::memcpy(bytes_, other.bytes_, sizeof(bytes_));
    std::memcpy(other.bytes_, tmp, sizeof(bytes_));
  }

  char bytes_[inline_capacity + 1];
};

}  // namespace pop::detail
