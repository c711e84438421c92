// Wakes a loop that runs on an Asio strand whenever the engine it serves changes.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>

#include <boost/asio/post.hpp>

#include "pop/engine/engine.hpp"

namespace pop::detail {

// What keeps a watch alive: release both to stop the wake-ups.
struct engine_watch {
  subscription commits;
  std::shared_ptr<void> clock_moves;
};

// Calls target->wake(posted) on target->strand() after engine commits and whenever the engine's
// clock is moved by hand (pop::manual_clock), so times on that clock are looked at again at once.
// Commits are coalesced: target->notified() (an std::atomic<bool>&) is set by the first commit
// and a burst posts one wake-up until the loop clears the flag. `target` is held weakly: a
// wake-up after it is gone does nothing. Target's strand(), notified() and wake() are its own;
// `posted` is when the wake-up was posted (std::chrono::steady_clock), so the target can tell how
// long waking it took.
template <class Target>
engine_watch watch_engine(engine& e, const std::shared_ptr<Target>& target) {
  const std::weak_ptr<Target> weak = target;
  engine_watch watch;
  watch.commits = e.on_commit([weak](std::uint64_t) {
    const std::shared_ptr<Target> t = weak.lock();
    if (!t || t->notified().exchange(true)) return;
    boost::asio::post(t->strand(),
                      [t, posted = std::chrono::steady_clock::now()] { t->wake(posted); });
  });
  watch.clock_moves = e.clock().on_moved([weak] {
    if (const std::shared_ptr<Target> t = weak.lock()) {
      boost::asio::post(t->strand(),
                        [t, posted = std::chrono::steady_clock::now()] { t->wake(posted); });
    }
  });
  return watch;
}

}  // namespace pop::detail
