// Defines pop::detail::wake_event: a one-shot event one thread waits on and another sets.
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#include <semaphore>
#endif

namespace pop::detail {

// One thread blocks in wait() until another calls set(); reset() (by the waiter, when nobody can
// set it) arms it again. On Linux a bare futex: unlike
// std::atomic::wait and std::binary_semaphore (libstdc++ spins with sched_yield before it
// sleeps), a waiter goes to sleep at once, which matters when many more threads wait for the
// journal than there are cores. The setter never touches the event after the waiter can see it
// set, so the waiter may destroy it as soon as wait() returns (a late wake of the stale address
// is harmless: futex waiters recheck their word).
class wake_event {
 public:
  void wait() noexcept {
#if defined(__linux__)
    while (word_.load(std::memory_order_acquire) == 0) {
      ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word_), FUTEX_WAIT_PRIVATE, 0U,
                nullptr, nullptr, 0);
    }
#else
    ready_.acquire();
#endif
  }
  void reset() noexcept {
#if defined(__linux__)
    word_.store(0, std::memory_order_relaxed);
#endif  // (a semaphore is taken again by wait())
  }
  void set() noexcept {
#if defined(__linux__)
    // The address is taken first: once the word is 1 the waiter may return and free the event.
    auto* const address = reinterpret_cast<std::uint32_t*>(&word_);
    word_.store(1, std::memory_order_release);
    ::syscall(SYS_futex, address, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
#else
    ready_.release();
#endif
  }

 private:
#if defined(__linux__)
  std::atomic<std::uint32_t> word_{0};
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
#else
  std::binary_semaphore ready_{0};
#endif
};

}  // namespace pop::detail
