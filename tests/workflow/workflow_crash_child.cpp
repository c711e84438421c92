// The workflow service the crash test kills with kill -9: on journal argv[1] it starts argv[2]
// instances of "job" (a process step, two parallel branches, each a child running a process step,
// a durable sleep, a step that fails once per program run and is retried with backoff, a wait for
// a signal, a last process step), sends each instance's signal
// twice through the inbox (for even instances before the instance waits: an early signal kept in
// the mailbox), and runs the workflow runner until every instance has ended. Every run does all
// of it again: starts are idempotent and the inbox absorbs the repeated signals. Each step
// process counts its runs in domain.effects.<instance>.<process>: after any number of kills every
// count must be 1. Exits 0 when all instances have ended.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <iostream>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "pop/relay/inbox.hpp"
#include "pop/workflow/workflow.hpp"
#include "pop/workflow/workflow_runner.hpp"

using pop::json;

namespace {

int fail(const absl::Status& s, const char* what) {
  std::cerr << "workflow_crash_child: " << what << ": " << s << "\n";
  return 2;
}

// A step process that counts its committed runs for its instance.
pop::process_fn counter(std::string name) {
  return [name](const pop::context& ctx, const json& args) -> absl::StatusOr<pop::result> {
    const std::string at = "domain.effects." + args.at("_instance").get<std::string>() + "." + name;
    pop::result r;
    r.set(at, ctx.get_or<int>(at, 0) + 1);
    return r;
  };
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: workflow_crash_child JOURNAL INSTANCES\n";
    return 2;
  }
  const int instances = std::stoi(argv[2]);
  absl::StatusOr<std::unique_ptr<pop::engine>> opened = pop::engine::open({.journal = argv[1]});
  if (!opened.ok()) return fail(opened.status(), "open");
  pop::engine& e = **opened;
  auto wf = pop::workflows::create(e);
  if (!wf.ok()) return fail(wf.status(), "workflows");
  auto in = pop::inbox::create(e);
  if (!in.ok()) return fail(in.status(), "inbox");
  if (absl::Status s = pop::register_workflow_resume(**in, **wf); !s.ok()) return fail(s, "resume");
  const pop::process_spec effects{
      .name = "charge", .inputs = {"domain.effects"}, .outputs = {"domain.effects"}};
  for (const char* name : {"charge", "ship", "pack"}) {
    pop::process_spec spec = effects;
    spec.name = name;
    if (absl::Status s = (*wf)->register_process(spec, counter(name)); !s.ok()) {
      return fail(s, "register");
    }
  }
  // "flaky" fails the first time it runs for an instance in this program run.
  std::mutex failed_mu;
  std::set<std::string> failed_once;
  pop::process_spec flaky = effects;
  flaky.name = "flaky";
  const pop::process_fn count_flaky = counter("flaky");
  if (absl::Status s = (*wf)->register_process(
          flaky,
          [&](const pop::context& ctx, const json& args) -> absl::StatusOr<pop::result> {
            {
              std::lock_guard lock(failed_mu);
              if (failed_once.insert(args.at("_instance").get<std::string>()).second) {
                return absl::UnavailableError("flaky: first call fails");
              }
            }
            return count_flaky(ctx, args);
          });
      !s.ok()) {
    return fail(s, "register flaky");
  }
  absl::StatusOr<pop::workflow_definition> branch = pop::workflow_definition::from_json(
      {{"name", "branch"},
       {"start", "p"},
       {"steps", {{"p", {{"process", "pack"}, {"next", "done"}}}, {"done", {{"end", true}}}}}});
  if (!branch.ok()) return fail(branch.status(), "branch definition");
  if (absl::Status s = (*wf)->define(*branch); !s.ok()) return fail(s, "define branch");
  absl::StatusOr<pop::workflow_definition> def = pop::workflow_definition::from_json(
      {{"name", "job"},
       {"start", "a"},
       {"steps",
        {{"a", {{"process", "charge"}, {"next", "both"}}},
         {"both",
          {{"parallel",
            {{{"call", "branch"}, {"inputs", {{"side", "left"}}}},
             {{"call", "branch"}, {"inputs", {{"side", "right"}}}}}},
           {"next", "s"}}},
         {"s", {{"sleep_ms", 3}, {"next", "r"}}},
         {"r",
          {{"process", "flaky"},
           {"next", "w"},
           {"retry",
            {{"attempts", 5}, {"initial_ms", 2}, {"max_interval_ms", 20}, {"jitter", 0.2}}}}},
         {"w", {{"wait", {{"go", "c"}}}, {"key", "key"}, {"timeout_ms", 600'000}}},
         {"c", {{"process", "ship"}, {"next", "done"}}},
         {"done", {{"end", true}}}}}});
  if (!def.ok()) return fail(def.status(), "definition");
  if (absl::Status s = (*wf)->define(*def); !s.ok()) return fail(s, "define");

  const auto id_of = [](int k) { return "j" + std::to_string(k); };
  const auto signal = [&](int k) -> absl::Status {
    pop::outbox_message m;
    m.id = "sig-" + std::to_string(k);
    m.topic = "go";
    m.key = "k" + std::to_string(k);
    m.payload = {{"k", k}};
    m.created_at_us = e.clock().now_us();
    for (int twice = 0; twice < 2; ++twice) {  // the second is a duplicate, absorbed
      absl::StatusOr<pop::inbox_result> r = (*in)->apply((*wf)->resume_spec().name, m);
      if (!r.ok()) return r.status();
    }
    return absl::OkStatus();
  };
  for (int k = 0; k < instances; ++k) {
    absl::StatusOr<std::uint64_t> started =
        (*wf)->start("job", id_of(k), {{"key", "k" + std::to_string(k)}});
    if (!started.ok()) return fail(started.status(), "start");
    if (k % 2 == 0) {
      if (absl::Status s = signal(k); !s.ok()) return fail(s, "early signal");
    }
  }
  // Odd instances get theirs once they wait (or have already ended in an earlier run): looked at
  // after each commit (the 100 ms bound only covers a commit that changed none of them).
  std::atomic<bool> stop{false};
  std::atomic<int> signal_errors{0};
  std::mutex commit_mu;
  std::condition_variable committed;
  std::uint64_t commits = 0;
  pop::subscription on_commit = e.on_commit([&](std::uint64_t) {
    std::lock_guard lock(commit_mu);
    ++commits;
    committed.notify_all();
  });
  std::thread late([&] {
    std::uint64_t seen = 0;
    std::set<int> left;
    for (int k = 1; k < instances; k += 2) left.insert(k);
    while (!left.empty() && !stop.load()) {
      for (auto it = left.begin(); it != left.end();) {
        absl::StatusOr<pop::workflow_instance> w = (*wf)->inspect(id_of(*it));
        if (w.ok() && (w->status == "waiting" || pop::workflows::ended(w->status)) &&
            w->retry_at_us == 0 && w->sleep_until_us == 0) {
          if (!signal(*it).ok()) ++signal_errors;
          it = left.erase(it);
        } else {
          ++it;
        }
      }
      std::unique_lock lock(commit_mu);
      committed.wait_for(lock, std::chrono::milliseconds(100), [&] { return commits != seen; });
      seen = commits;
    }
  });
  pop::workflow_runner runner(e, **wf);
  boost::asio::io_context io;
  absl::Status settled = absl::UnknownError("not run");
  boost::asio::co_spawn(io, runner.settle(),
                        [&](std::exception_ptr, absl::Status s) { settled = s; });
  io.run();
  stop = true;
  late.join();
  on_commit.reset();
  if (!settled.ok()) return fail(settled, "runner");
  if (signal_errors.load() > 0) return fail(absl::InternalError("see above"), "late signal");
  for (int k = 0; k < instances; ++k) {
    absl::StatusOr<pop::workflow_instance> w = (*wf)->inspect(id_of(k));
    if (!w.ok() || w->status != "completed") {
      return fail(w.ok() ? absl::InternalError(w->status + ": " + w->error) : w.status(),
                  id_of(k).c_str());
    }
  }
  return 0;
}
