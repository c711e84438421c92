#include "pop/workflow/workflow_runner.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/experimental/concurrent_channel.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"
#include "pop/relay/detail/engine_watch.hpp"

namespace pop {

namespace asio = boost::asio;

namespace {

bool transient(const absl::Status& s) {
  return s.code() == absl::StatusCode::kAborted ||
         s.code() == absl::StatusCode::kResourceExhausted ||
         s.code() == absl::StatusCode::kNotFound;  // an instance gone between list and advance
}

// What the commit listener and the loop share; kept alive by both.
class wake_state {
 public:
  explicit wake_state(asio::strand<asio::any_io_executor> s)
      : strand_(std::move(s)), timer(strand_) {}
  const asio::strand<asio::any_io_executor>& strand() const { return strand_; }
  std::atomic<bool>& notified() { return notified_; }
  void wake(std::chrono::steady_clock::time_point /*posted*/) {
    pending = true;
    timer.cancel();
  }

 private:
  asio::strand<asio::any_io_executor> strand_;
  std::atomic<bool> notified_{false};

 public:
  asio::steady_timer timer;  // strand only
  bool pending = false;      // strand only
};

// One round's instances and their outcomes; workers take the next index until none is left.
struct round_state {
  std::vector<std::string> ids;
  std::vector<absl::StatusOr<bool>> results;
  std::atomic<std::size_t> next{0};

  // The steps one worker takes share journal transactions (engine::batch): they are durable,
  // and reported, when it returns; a step the journal then failed to keep reports that failure.
  void work(engine& e, workflows& wf) {
    std::vector<std::size_t> taken;
    const absl::Status durable = e.batch([&] {
      for (std::size_t i; (i = next.fetch_add(1)) < ids.size();) {
        results[i] = wf.advance(ids[i]);
        taken.push_back(i);
      }
      return absl::OkStatus();
    });
    if (durable.ok()) return;
    for (const std::size_t i : taken) {
      if (results[i].ok()) results[i] = durable;
    }
  }
};

using done_channel = asio::experimental::concurrent_channel<void(boost::system::error_code)>;

}  // namespace

workflow_runner::workflow_runner(engine& e, workflows& w, workflow_runner_options opts)
    : engine_(e), workflows_(w), options_(opts) {}

asio::awaitable<absl::Status> workflow_runner::run() {
  return loop(false);
}

asio::awaitable<absl::Status> workflow_runner::settle() {
  return loop(true);
}

asio::awaitable<absl::Status> workflow_runner::loop(bool until_settled) {
  const asio::any_io_executor executor = co_await asio::this_coro::executor;
  auto state = std::make_shared<wake_state>(asio::make_strand(executor));
  // The work runs as its own coroutine on the strand, so the executor may be multi-threaded.
  const absl::Status status = co_await asio::co_spawn(
      state->strand(), loop_on_strand(state, until_settled), asio::use_awaitable);
  co_return status;
}

asio::awaitable<absl::Status> workflow_runner::loop_on_strand(std::shared_ptr<void> opaque,
                                                              bool until_settled) {
  const std::shared_ptr<wake_state> state = std::static_pointer_cast<wake_state>(opaque);
  co_await asio::this_coro::throw_if_cancelled(false);
  // Deadlines are times on the engine's clock: a clock moved by hand wakes the runner at once.
  const detail::engine_watch watch = detail::watch_engine(engine_, state);
  const auto cancelled = []() -> asio::awaitable<bool> {
    const asio::cancellation_state cs = co_await asio::this_coro::cancellation_state;
    co_return cs.cancelled() != asio::cancellation_type::none;
  };
  // Instances this program cannot run (after a deploy that dropped their version or step) are
  // parked with the reason at once, not found only when a message or timer reaches them.
  // (A transient error leaves the rest to advance(), the timers and the inbox, which park too.)
  if (const absl::StatusOr<std::size_t> parked = workflows_.reconcile();
      !parked.ok() && !transient(parked.status())) {
    co_return annotate(parked.status(), "workflow runner, parking what cannot run");
  }
  for (;;) {
    if (co_await cancelled()) co_return absl::CancelledError("workflow runner stopped");
    state->notified().store(false);
    bool progressed = false;
    // One round: every runnable instance (up to the limit) one step, several at once.
    auto round = std::make_shared<round_state>();
    round->ids = workflows_.runnable(options_.max_steps_per_round);
    round->results.assign(round->ids.size(), false);
    const std::size_t workers =
        std::min(round->ids.size(), std::max<std::size_t>(options_.parallelism, 1));
    if (workers <= 1) {
      round->work(engine_, workflows_);
    } else {
      auto done = std::make_shared<done_channel>(state->strand(), workers);
      for (std::size_t w = 0; w < workers; ++w) {
        asio::post(state->strand().get_inner_executor(),
                   [round, done, &e = engine_, &wf = workflows_] {
                     round->work(e, wf);
                     done->try_send(boost::system::error_code());
                   });
      }
      // Not cancellable: the loop returns only after every worker of the round has finished.
      for (std::size_t w = 0; w < workers; ++w) {
        co_await done->async_receive(asio::bind_cancellation_slot(
            asio::cancellation_slot(), asio::as_tuple(asio::use_awaitable)));
      }
    }
    for (std::size_t i = 0; i < round->ids.size(); ++i) {
      const absl::StatusOr<bool>& moved = round->results[i];
      if (!moved.ok()) {
        if (transient(moved.status())) continue;
        co_return annotate(moved.status(),
                           absl::StrCat("workflow runner, instance '", round->ids[i], "'"));
      }
      if (*moved) {
        progressed = true;
        steps_.fetch_add(1, std::memory_order_relaxed);
      }
    }
    std::int64_t next_due = 0;
    const absl::StatusOr<std::size_t> expired =
        workflows_.expire(engine_.clock().now_us(), next_due);
    if (!expired.ok() && !transient(expired.status())) co_return expired.status();
    if (expired.ok() && *expired > 0) progressed = true;
    if (progressed) {
      co_await asio::post(state->strand(), asio::use_awaitable);
      continue;
    }
    if (until_settled && workflows_.runnable(1).empty() && next_due == 0)
      co_return absl::OkStatus();
    if (!state->pending && !(co_await cancelled())) {
      if (next_due > 0 && engine_.clock().moves_by_itself()) {
        state->timer.expires_after(std::chrono::microseconds(
            std::max<std::int64_t>(next_due - engine_.clock().now_us(), 0)));
      } else {
        state->timer.expires_at(asio::steady_timer::time_point::max());
      }
      co_await state->timer.async_wait(asio::as_tuple(asio::use_awaitable));
    }
    state->pending = false;
  }
}

asio::awaitable<absl::StatusOr<workflow_instance>> wait_for(const workflows& w, std::string id) {
  using outcome_channel = asio::experimental::concurrent_channel<void(
      boost::system::error_code, absl::StatusOr<workflow_instance>)>;
  // A thread-safe channel: the commit that ends the instance sends from its own thread.
  auto channel = std::make_shared<outcome_channel>(co_await asio::this_coro::executor, 1);
  subscription sub = w.wait_for(id, [channel](absl::StatusOr<workflow_instance> outcome) {
    channel->try_send(boost::system::error_code(), std::move(outcome));
  });
  auto [ec, outcome] = co_await channel->async_receive(asio::as_tuple(asio::use_awaitable));
  sub.reset();
  if (ec) {
    co_return absl::CancelledError(
        absl::StrCat("waiting for workflow instance '", id, "' was cancelled: ", ec.message()));
  }
  co_return std::move(outcome);
}

absl::Status register_workflow_resume(inbox& in, workflows& w) {
  return in.register_handler(w.resume_spec(), [&w](const context& ctx, const outbox_message& m) {
    return w.resume(ctx, m);
  });
}

}  // namespace pop
