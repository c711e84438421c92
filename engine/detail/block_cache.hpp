// Defines pop::detail::cached_allocator, an allocator that keeps freed blocks of one size in a
// per-thread cache for the next allocation of that size.
#pragma once

#include <cstddef>
#include <new>

namespace pop::detail {

#if defined(__SANITIZE_ADDRESS__)
#define POP_BLOCK_CACHE 0  // AddressSanitizer sees every allocation: no cache
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define POP_BLOCK_CACHE 0
#endif
#endif
#ifndef POP_BLOCK_CACHE
#define POP_BLOCK_CACHE 1
#endif

// Up to `limit` freed blocks of `Size` bytes, per thread. A commit copies about ten B+-tree nodes
// of one size and frees as many from the version it replaced: taking them from this list instead
// of malloc (whose own per-thread cache holds only seven of a size) was most of malloc's cost in
// a commit. A block freed on another thread joins that thread's list; blocks beyond the limit,
// and every block once the thread is exiting, go back to operator delete.
template <std::size_t Size>
class block_cache {
 public:
  static constexpr std::size_t limit = 512;

  static void* take() {
#if POP_BLOCK_CACHE
    if (head_ != nullptr) {
      void* block = head_;
      head_ = *static_cast<void**>(block);
      --count_;
      return block;
    }
#endif
    return ::operator new(Size);
  }

  static void give(void* block) {
#if POP_BLOCK_CACHE
    if (!exiting_ && count_ < limit) {
      static thread_local releaser on_exit;  // frees the list when the thread ends
      *static_cast<void**>(block) = head_;
      head_ = block;
      ++count_;
      return;
    }
#endif
    ::operator delete(block);
  }

 private:
  static_assert(Size >= sizeof(void*));

  struct releaser {
    releaser() = default;
    releaser(const releaser&) = delete;
    releaser& operator=(const releaser&) = delete;
    ~releaser() {
      exiting_ = true;
      while (head_ != nullptr) {
        void* next = *static_cast<void**>(head_);
        ::operator delete(head_);
        head_ = next;
      }
      count_ = 0;
    }
  };

  // Plain thread-locals (no destructor), so they stay usable while the thread's other
  // thread-locals are destroyed.
  static inline thread_local void* head_ = nullptr;
  static inline thread_local std::size_t count_ = 0;
  static inline thread_local bool exiting_ = false;
};

// A std::allocator-compatible allocator whose single-object allocations go through block_cache.
// For std::allocate_shared of objects made and freed in bulk (B+-tree nodes).
template <class T>
struct cached_allocator {
  using value_type = T;
  cached_allocator() = default;
  template <class U>
  cached_allocator(const cached_allocator<U>&) {}  // NOLINT: rebinding is implicit by design

  T* allocate(std::size_t n) {
    static_assert(alignof(T) <= __STDCPP_DEFAULT_NEW_ALIGNMENT__);
    if (n == 1) return static_cast<T*>(block_cache<block_size()>::take());
    return static_cast<T*>(::operator new(n * sizeof(T)));
  }
  void deallocate(T* p, std::size_t n) {
    if (n == 1) {
      block_cache<block_size()>::give(p);
      return;
    }
    ::operator delete(p);
  }

  template <class U>
  friend bool operator==(const cached_allocator&, const cached_allocator<U>&) {
    return true;
  }

 private:
  // Sizes rounded up to 16 bytes share a cache.
  static constexpr std::size_t block_size() { return (sizeof(T) + 15) / 16 * 16; }
};

}  // namespace pop::detail
