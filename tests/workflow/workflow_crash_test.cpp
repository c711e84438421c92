// A workflow service killed with kill -9 at seeded moments while its instances run parallel
// branches, sleep, retry a failing step, and wait with early and duplicate signals, restarted until
// it finishes: every step's effects happen exactly once and every instance completes.
#include <catch2/catch.hpp>

#include "tests/support/must.hpp"

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "pop/workflow/workflow.hpp"
#include "tests/support/spawn.hpp"
#include "tests/support/temp_dir.hpp"
#include "tests/support/wait.hpp"

namespace {

// Each round adds this many instances, so every run of the child has work for the kill to cut.
constexpr int kPerRound = 30;
constexpr int kRounds = 12;

pid_t spawn_child(const std::string& journal, int instances) {
  return pop::test::spawn({POP_WORKFLOW_CRASH_CHILD, journal, std::to_string(instances)});
}

// The instances and effects in the journal: every count at most 1 (exactly 1 once complete).
void check_effects(const std::string& journal, int instances, bool complete) {
  auto e = pop::test::must(pop::engine::open({.journal = journal}));
  auto wf = pop::test::must(pop::workflows::create(*e));
  const pop::snapshot snap = e->snapshot();
  const pop::json effects = snap.read("domain.effects").value_or(pop::json::object());
  for (const auto& [id, counts] : effects.items()) {
    for (const auto& [process, n] : counts.items()) {
      INFO(id << " " << process);
      CHECK(n == 1);
    }
  }
  if (!complete) return;
  for (int k = 0; k < instances; ++k) {
    const std::string id = "j" + std::to_string(k);
    INFO(id);
    const pop::workflow_instance w = pop::test::must(wf->inspect(id));
    CHECK(w.status == "completed");
    for (const char* process : {"charge", "flaky", "ship"}) {
      CHECK(effects.value(id, pop::json::object()).value(process, 0) == 1);
    }
    for (const char* branch : {"-both-1-0", "-both-1-1"}) {
      CHECK(effects.value(id + branch, pop::json::object()).value("pack", 0) == 1);
      CHECK(pop::test::must(wf->inspect(id + branch)).status == "completed");
    }
    CHECK(w.received.at("go") == pop::json{{"k", k}});
  }
  CHECK(wf->list("stuck").empty());
}

}  // namespace

TEST_CASE(
    "a workflow service killed with kill -9 at seeded moments finishes every instance with "
    "every step's effects exactly once",
    "[workflow][crash]") {
  const std::uint64_t seed = 20261203;
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  pop::test::temp_dir dir;
  const std::string journal = dir.file("flows.db");
  int kills = 0;
  for (int round = 1; round <= kRounds; ++round) {
    const pid_t child = spawn_child(journal, kPerRound * round);
    // A kill point: somewhere in the child's first 80 ms (opening, starting, signalling,
    // sleeping, retrying, waiting), or the child has already finished.
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 80'000));
    ::kill(child, SIGKILL);
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    INFO("round " << round);
    REQUIRE(((WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) ||
             (WIFEXITED(status) && WEXITSTATUS(status) == 0)));
    if (WIFSIGNALED(status)) ++kills;
    check_effects(journal, kPerRound * round, false);
  }
  CHECK(kills > kRounds / 2);
  // Then it runs to the end, within a bound.
  const pid_t child = spawn_child(journal, kPerRound * kRounds);
  int status = 0;
  const bool exited = pop::test::eventually(
      [&] { return ::waitpid(child, &status, WNOHANG) == child; }, std::chrono::seconds(60));
  if (!exited) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
  }
  REQUIRE(exited);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  check_effects(journal, kPerRound * kRounds, true);
}
