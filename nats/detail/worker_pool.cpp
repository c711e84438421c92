#include "pop/nats/detail/worker_pool.hpp"

#include <algorithm>

namespace pop::detail {

worker_pool::worker_pool(std::size_t helpers) {
  threads_.reserve(helpers);
  for (std::size_t i = 0; i < helpers; ++i) threads_.emplace_back([this] { loop(); });
}

worker_pool::~worker_pool() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void worker_pool::run(std::size_t n, const std::function<void()>& work) {
  const std::size_t helpers = std::min(n, threads_.size());
  if (helpers > 0) {
    {
      std::lock_guard lock(mu_);
      work_ = &work;
      wanted_ = helpers;
      taken_ = 0;
      ++generation_;
    }
    start_cv_.notify_all();
  }
  work();
  if (helpers > 0) {
    std::unique_lock lock(mu_);
    done_cv_.wait(lock, [&] { return taken_ == wanted_ && running_ == 0; });
    work_ = nullptr;
  }
}

void worker_pool::loop() {
  std::uint64_t seen = 0;
  std::unique_lock lock(mu_);
  for (;;) {
    start_cv_.wait(lock, [&] { return stop_ || (generation_ != seen && taken_ < wanted_); });
    if (stop_) return;
    seen = generation_;
    ++taken_;
    ++running_;
    const std::function<void()>* work = work_;
    lock.unlock();
    (*work)();
    lock.lock();
    --running_;
    if (taken_ == wanted_ && running_ == 0) done_cv_.notify_all();
  }
}

}  // namespace pop::detail
