// Defines pop::workflow_runner, the Asio coroutine that advances workflow instances.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include <boost/asio/awaitable.hpp>

#include "absl/status/status.h"
#include "pop/relay/inbox.hpp"
#include "pop/workflow/workflow.hpp"

namespace pop {

struct workflow_runner_options {
  std::size_t max_steps_per_round = 256;  // instances advanced one step each per round
  // How many of a round's instances are advanced at once, on the executor's threads (run the
  // io_context on several threads to use them); each instance is advanced by one of them only,
  // and a round ends when all are done, so an instance is never advanced twice at once.
  // 1: one after the other on the runner's strand.
  std::size_t parallelism = 4;
};

// Advances the running instances of a pop::workflows one step at a time, round-robin, so many
// instances progress side by side, different instances in parallel on the executor's threads
// (options.parallelism; step processes run outside the engine's lock, and instances that write
// different paths commit without conflict); fires wait and instance timeouts with real timers.
// Woken by commit notifications, like the relay; its loop runs on its own strand.
// Lifetime: the engine and the workflows must outlive it; one run at a time.
class workflow_runner {
 public:
  workflow_runner(engine& e, workflows& w, workflow_runner_options opts = {});

  // Advances instances until cancelled; returns kCancelled then, or an engine error that is not
  // a transient one (conflicts and backpressure are retried on the next round).
  boost::asio::awaitable<absl::Status> run();
  // Like run(), but returns OK once no instance is running or compensating and no timer is
  // pending (waiting instances without a timeout may remain).
  boost::asio::awaitable<absl::Status> settle();

  // Steps that changed an instance, since construction. Any thread.
  std::uint64_t steps() const { return steps_.load(std::memory_order_relaxed); }

 private:
  boost::asio::awaitable<absl::Status> loop(bool until_settled);
  boost::asio::awaitable<absl::Status> loop_on_strand(std::shared_ptr<void> state,
                                                      bool until_settled);

  engine& engine_;
  workflows& workflows_;
  const workflow_runner_options options_;
  std::atomic<std::uint64_t> steps_{0};
};

// Completes when instance `id` of `w` has ended (completed, failed, compensated or cancelled),
// with the
// instance; kNotFound if there is no such instance; kCancelled if the awaiting coroutine is
// cancelled first. Woken by the commit that ends it: no polling. `w` must outlive the wait.
boost::asio::awaitable<absl::StatusOr<workflow_instance>> wait_for(const workflows& w,
                                                                   std::string id);

// Registers the workflows' resume handler on `in`, so messages applied through the inbox resume
// the instances waiting for them (exactly once per message id).
[[nodiscard]] absl::Status register_workflow_resume(inbox& in, workflows& w);

}  // namespace pop
