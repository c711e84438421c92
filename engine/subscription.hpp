// Defines pop::subscription, the handle that keeps a commit listener registered.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>

#include <mutex>
#include <shared_mutex>
#include "absl/base/thread_annotations.h"

namespace pop {

namespace detail {
// The listeners of one engine; shared with subscriptions so they may outlive the engine.
class commit_listeners {
 public:
  std::uint64_t add(std::function<void(std::uint64_t)> fn);
  // Removes listener `id`, waiting for calls in progress to return.
  void remove(std::uint64_t id);
  void notify(std::uint64_t version) const;
  // True if no listener is registered.
  bool empty() const;

 private:
  mutable std::shared_mutex mu_;
  std::uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<std::uint64_t, std::function<void(std::uint64_t)>> fns_ ABSL_GUARDED_BY(mu_);
};
}  // namespace detail

class subscription;
namespace detail {
// Registers `fn` with `listeners` (a set of listeners other than an engine's, e.g. one a library
// notifies itself) and returns the subscription that keeps it.
subscription subscribe(const std::shared_ptr<commit_listeners>& listeners,
                       std::function<void(std::uint64_t)> fn);
}  // namespace detail

// Keeps a commit listener registered until reset or destroyed. Movable, not copyable.
class subscription {
 public:
  subscription() = default;
  subscription(subscription&& other) noexcept;
  subscription& operator=(subscription&& other) noexcept;
  subscription(const subscription&) = delete;
  subscription& operator=(const subscription&) = delete;
  ~subscription() { reset(); }

  // Unregisters the listener; when it returns, no call of it is running or will start.
  void reset();
  bool active() const { return !listeners_.expired(); }

 private:
  friend class engine;
  friend subscription detail::subscribe(const std::shared_ptr<detail::commit_listeners>&,
                                        std::function<void(std::uint64_t)>);
  subscription(std::weak_ptr<detail::commit_listeners> listeners, std::uint64_t id)
      : listeners_(std::move(listeners)), id_(id) {}
  std::weak_ptr<detail::commit_listeners> listeners_;
  std::uint64_t id_ = 0;
};

}  // namespace pop
