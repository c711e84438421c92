// Defines pop::clock, the one source of wall time in pop, and pop::manual_clock for tests.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

namespace pop {

// Where every part of pop reads the time: commit and message times, retry schedules, inbox and
// dead-letter times, workflow deadlines. Each component takes one through its options (default:
// system_clock()), so a test can drive time with a manual_clock instead of waiting.
//
// Thread safety: now_us() may be called from any thread at any time. Lifetime: shared.
class clock {
 public:
  virtual ~clock() = default;
  // The current time, microseconds since the Unix epoch.
  virtual std::int64_t now_us() const = 0;
  // Calls `moved` (from the thread that moved it) whenever the clock jumps by hand, until the
  // returned handle is released (which waits for a call in progress); components that wait for a
  // time re-check it then. A clock that follows real time never calls it and may return null.
  // Keep `moved` short, and do not release its own handle from inside it.
  [[nodiscard]] virtual std::shared_ptr<void> on_moved(std::function<void()> moved) const;
  // True if the clock moves with real time, so waiting real time until a due time makes sense;
  // false for a clock moved by hand, whose due times come only through on_moved().
  virtual bool moves_by_itself() const { return true; }
};

// The system's wall clock (std::chrono::system_clock). The same object on every call.
const std::shared_ptr<const clock>& system_clock();

// A clock that moves only when told: starts at `start_us`, then set() and advance() move it and
// tell every on_moved() watcher, so a relay or runner waiting for a time looks again at once.
// Thread safety: every member may be called from any thread at once.
class manual_clock final : public clock {
 public:
  explicit manual_clock(std::int64_t start_us = 1'700'000'000'000'000) : now_(start_us) {}
  std::int64_t now_us() const override { return now_.load(std::memory_order_acquire); }
  std::shared_ptr<void> on_moved(std::function<void()> moved) const override;
  bool moves_by_itself() const override { return false; }
  // Moves the clock to `t_us` (it may go backwards, as a wall clock can).
  void set(std::int64_t t_us);
  // Moves the clock forward by `delta_us` and returns the new time.
  std::int64_t advance(std::int64_t delta_us);

 private:
  void tell_watchers() const;

  struct watcher {
    // Held while `moved` runs and while the handle is released; recursive, so `moved` may move
    // the clock again.
    // (mu_ is never taken while holding it the other way round: `alive` is read without it.)
    std::recursive_mutex mu;
    std::atomic<bool> alive{true};
    std::function<void()> moved;
  };

  std::atomic<std::int64_t> now_;
  mutable std::mutex mu_;
  mutable std::vector<std::shared_ptr<watcher>> watchers_;  // guarded by mu_
};

}  // namespace pop
