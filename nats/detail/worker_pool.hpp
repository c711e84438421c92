// Defines pop::detail::worker_pool: a fixed set of helper threads that join the caller in running
// one job at a time (the NATS ingress applies a batch's keys on them).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pop::detail {

// Helper threads started once and reused for every job, instead of threads started per batch.
// Thread safety: run() may be called by one thread at a time. Lifetime: the destructor stops and
// joins the helpers (a running job finishes first).
class worker_pool {
 public:
  // Starts `helpers` threads (0: run() does the work on the caller alone).
  explicit worker_pool(std::size_t helpers);
  ~worker_pool();
  worker_pool(const worker_pool&) = delete;
  worker_pool& operator=(const worker_pool&) = delete;

  // Runs `work` on min(n, helpers) helper threads and on the calling thread at once, and returns
  // when every one of them has returned from it. `work` shares its work out itself.
  void run(std::size_t n, const std::function<void()>& work);

 private:
  void loop();

  std::mutex mu_;
  std::condition_variable start_cv_;
  std::condition_variable done_cv_;
  const std::function<void()>* work_ = nullptr;  // guarded by mu_
  std::uint64_t generation_ = 0;                 // guarded by mu_: one per run()
  std::size_t wanted_ = 0;                       // guarded by mu_: helpers this job wants
  std::size_t taken_ = 0;                        // guarded by mu_: helpers that took it
  std::size_t running_ = 0;                      // guarded by mu_: helpers still in it
  bool stop_ = false;                            // guarded by mu_
  std::vector<std::thread> threads_;
};

}  // namespace pop::detail
