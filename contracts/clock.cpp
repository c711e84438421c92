#include "pop/contracts/clock.hpp"

#include <chrono>

namespace pop {
namespace {

class system_wall_clock final : public clock {
 public:
  std::int64_t now_us() const override {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
};

}  // namespace

std::shared_ptr<void> clock::on_moved(std::function<void()>) const {
  return nullptr;
}

std::shared_ptr<void> manual_clock::on_moved(std::function<void()> moved) const {
  auto w = std::make_shared<watcher>();
  w->moved = std::move(moved);
  {
    std::lock_guard lock(mu_);
    std::erase_if(watchers_,
                  [](const std::shared_ptr<watcher>& old) { return !old->alive.load(); });
    watchers_.push_back(w);
  }
  // Releasing the handle waits for a call in progress, stops later ones and destroys the
  // function (and what it holds): a watcher may then destroy what its function uses (a relay, its
  // strand, the io_context behind it).
  return std::shared_ptr<void>(w.get(), [w](void*) {
    std::function<void()> gone;
    {
      std::lock_guard lock(w->mu);
      w->alive.store(false);
      gone = std::move(w->moved);
    }
  });
}

void manual_clock::set(std::int64_t t_us) {
  now_.store(t_us, std::memory_order_release);
  tell_watchers();
}

std::int64_t manual_clock::advance(std::int64_t delta_us) {
  const std::int64_t now = now_.fetch_add(delta_us, std::memory_order_acq_rel) + delta_us;
  tell_watchers();
  return now;
}

void manual_clock::tell_watchers() const {
  std::vector<std::shared_ptr<watcher>> current;
  {
    std::lock_guard lock(mu_);
    std::erase_if(watchers_, [](const std::shared_ptr<watcher>& w) { return !w->alive.load(); });
    current = watchers_;
  }
  for (const std::shared_ptr<watcher>& w : current) {
    std::lock_guard lock(w->mu);
    if (w->alive.load()) w->moved();
  }
}

const std::shared_ptr<const clock>& system_clock() {
  static const std::shared_ptr<const clock> instance = std::make_shared<system_wall_clock>();
  return instance;
}

}  // namespace pop
