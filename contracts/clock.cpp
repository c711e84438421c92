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
  auto handle = std::make_shared<std::function<void()>>(std::move(moved));
  std::lock_guard lock(mu_);
  watchers_.push_back(handle);
  return handle;
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
  std::vector<std::shared_ptr<std::function<void()>>> alive;
  {
    std::lock_guard lock(mu_);
    std::erase_if(watchers_, [&](const std::weak_ptr<std::function<void()>>& w) {
      std::shared_ptr<std::function<void()>> f = w.lock();
      if (!f) return true;
      alive.push_back(std::move(f));
      return false;
    });
  }
  for (const auto& f : alive) (*f)();
}

const std::shared_ptr<const clock>& system_clock() {
  static const std::shared_ptr<const clock> instance = std::make_shared<system_wall_clock>();
  return instance;
}

}  // namespace pop
