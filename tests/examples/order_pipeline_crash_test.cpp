// Kills the order pipeline example with kill -9 at seeded random moments and starts it again on
// the same journal until it finishes; its own invariant checks (stock conserved, every order
// final, one confirmation email per confirmed order) must then pass.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <random>
#include <thread>

#include "tests/support/spawn.hpp"
#include "tests/support/temp_dir.hpp"

TEST_CASE("the order pipeline killed with kill -9 finishes the same orders on restart",
          "[example][crash]") {
  pop::test::temp_dir dir;
  // Enough orders that a run outlasts several kills (600 took 0.24 s once a lone committer wrote
  // its own journal records).
  const std::vector<std::string> args = {POP_ORDER_PIPELINE,
                                         "--orders",
                                         "2000",
                                         "--journal",
                                         dir.file("orders.db"),
                                         "--sink",
                                         dir.file("events.jsonl"),
                                         "--seed",
                                         "7",
                                         "--latency-ms",
                                         "5",
                                         "--quiet"};
  std::mt19937_64 rng(20261122);
  int kills = 0;
  for (int round = 0; round < 40; ++round) {
    const pid_t pid = pop::test::spawn(args, true);
    std::this_thread::sleep_for(std::chrono::milliseconds(30 + rng() % 200));
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      // It finished before the kill: its invariant checks decide.
      INFO("round " << round);
      REQUIRE(WIFEXITED(status));
      CHECK(WEXITSTATUS(status) == 0);
      break;
    }
    REQUIRE(kill(pid, SIGKILL) == 0);
    REQUIRE(waitpid(pid, &status, 0) == pid);
    ++kills;
  }
  CHECK(kills >= 3);
  // A last run on the same journal completes (or confirms) every order and checks everything.
  const pid_t pid = pop::test::spawn(args, true);
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
