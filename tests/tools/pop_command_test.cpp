// Tests of the `pop` command, run as a separate program against journals these tests write with a
// real engine, relay and workflow engine: every command's table and JSON, the read-only commands
// leaving the file untouched (also while an engine holds it), repairs as journaled commits that a
// relay and the workflow runner then act on, and clear errors with distinct exit codes.
#include <sqlite3.h>
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "pop/relay/dead_letters.hpp"
#include "pop/relay/relay.hpp"
#include "pop/workflow/workflow.hpp"
#include "tests/support/asio_run.hpp"
#include "tests/support/must.hpp"
#include "tests/support/scripted_sink.hpp"
#include "tests/support/temp_dir.hpp"

using pop::json;
using pop::test::must;

namespace {

struct ran {
  int code = -1;
  std::string out;
  std::string err;
};

std::string shell_quoted(const std::string& s) {
  std::string q = "'";
  for (const char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// Runs the pop command with `args`; its exit code, standard output and standard error.
ran pop_command(const std::vector<std::string>& args) {
  static pop::test::temp_dir scratch;
  std::string command = shell_quoted(POP_COMMAND);
  for (const std::string& a : args) command += " " + shell_quoted(a);
  const std::string out = scratch.file("out");
  const std::string err = scratch.file("err");
  const int rc = std::system((command + " >" + out + " 2>" + err).c_str());
  ran r{WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, pop::test::file_bytes(out),
        pop::test::file_bytes(err)};
  UNSCOPED_INFO("pop " << command << "\nexit " << r.code << "\nstdout:\n"
                       << r.out << "\nstderr:\n"
                       << r.err);
  return r;
}

json pop_json(std::vector<std::string> args) {
  args.push_back("--json");
  const ran r = pop_command(args);
  REQUIRE(r.code == 0);
  json j = json::parse(r.out, nullptr, false);
  REQUIRE(!j.is_discarded());
  return j;
}

// The "flow" workflow: a process step that places an order, then the end. "flow2" is the same;
// its second version renames the step.
json flow_definition(const std::string& name, const std::string& step) {
  return {{"name", name},
          {"start", step},
          {"steps", {{step, {{"process", "place"}, {"next", "done"}}}, {"done", {{"end", true}}}}}};
}

void register_place(pop::engine& e) {
  REQUIRE(e.register_process({.name = "order",
                              .inputs = {"domain.stock"},
                              .outputs = {"domain.orders", "domain.stock"},
                              .emits = {"order.placed"}},
                             [](const pop::context& ctx, const json& args) {
                               pop::result r;
                               const std::string id = args.at("id");
                               r.set("domain.orders." + id, {{"qty", args.at("qty")}});
                               r.set("domain.stock", ctx.get_or<int>("domain.stock", 100) -
                                                         args.at("qty").get<int>());
                               r.emit("order.placed", {{"id", id}}, id);
                               return r;
                             })
              .ok());
}

// The workflows of a program that defines `definitions`.
std::unique_ptr<pop::workflows> flows_on(pop::engine& e, const std::vector<json>& definitions) {
  auto wf = must(pop::workflows::create(e));
  REQUIRE(
      wf->register_process({.name = "place", .outputs = {"domain.placed"}}, [](const pop::context&,
                                                                               const json& args) {
          pop::result r;
          r.set("domain.placed." + args.at("_instance").get<std::string>(), true);
          return r;
        }).ok());
  for (const json& j : definitions) {
    absl::StatusOr<pop::workflow_definition> d = pop::workflow_definition::from_json(j);
    REQUIRE(d.ok());
    REQUIRE(wf->define(*d).ok());
  }
  return wf;
}

// Writes the journal the tests inspect: three orders (o-1, o-2 delivered; "bad" dead-lettered by a
// relay whose sink rejects it), one order placed after the relay ran (pending), and two workflow
// instances parked stuck by the next deploy: w-1, whose workflow it lacks, and w-2, whose step
// "place" its new version of flow2 renamed to "placing".
struct written {
  std::uint64_t before_late = 0;  // the version before order "late"
  std::uint64_t last = 0;
  std::string bad_id;
  std::string late_id;
};

written write_journal(const std::string& file) {
  written w;
  {
    auto e = must(pop::engine::open({.journal = file}));
    register_place(*e);
    auto wf = flows_on(*e, {flow_definition("flow", "place"), flow_definition("flow2", "place")});
    for (const char* id : {"o-1", "o-2", "bad"}) {
      const pop::commit c = must(e->execute("order", {{"id", id}, {"qty", 2}}));
      if (std::string(id) == "bad") w.bad_id = c.message_ids.at(0);
    }
    pop::test::scripted_sink sink;
    sink.script = [](const pop::outbox_message& m) {
      return m.key == "bad" ? pop::test::act::permanent : pop::test::act::ok;
    };
    auto relay = must(pop::relay::create(*e, sink, pop::test::quick_relay(1)));
    boost::asio::io_context io;
    REQUIRE(pop::test::run_on(io, relay->drain()).ok());
    REQUIRE(sink.acked.size() == 2);
    REQUIRE(wf->start("flow", "w-1", {{"note", "first"}}).ok());
    REQUIRE(wf->start("flow2", "w-2").ok());
    w.before_late = e->version();
    w.late_id = must(e->execute("order", {{"id", "late"}, {"qty", 5}})).message_ids.at(0);
  }
  {
    // The next deploy lacks one workflow and renamed a step of the other: both instances are
    // parked, not left waiting silently.
    auto e = must(pop::engine::open({.journal = file}));
    auto wf = flows_on(*e, {flow_definition("flow2", "placing")});
    REQUIRE(must(wf->advance("w-1")));
    REQUIRE(wf->inspect("w-1").value().status == "stuck");
    REQUIRE(must(wf->advance("w-2")));
    REQUIRE(wf->inspect("w-2").value().status == "stuck");
    w.last = e->version();
  }
  return w;
}

void sql(const std::string& file, const char* statement) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(file.c_str(), &db) == SQLITE_OK);
  char* error = nullptr;
  const int rc = sqlite3_exec(db, statement, nullptr, nullptr, &error);
  INFO((error ? error : ""));
  sqlite3_free(error);
  sqlite3_close(db);
  REQUIRE(rc == SQLITE_OK);
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE(
    "the read-only commands show state, outbox, dead letters, workflows and history, and "
    "leave the file as it was",
    "[pop_command]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("shop.db");
  const written w = write_journal(file);
  const std::string bytes = pop::test::file_bytes(file);

  // state, a subtree, an older version
  ran r = pop_command({"state", file, "domain.orders"});
  REQUIRE(r.code == 0);
  CHECK(contains(r.out, "\"late\""));
  CHECK(contains(r.out, "at version " + std::to_string(w.last)));
  json j = pop_json({"state", file, "domain.stock", "--at", std::to_string(w.before_late)});
  CHECK(j["version"] == w.before_late);
  CHECK(j["value"] == 94);
  CHECK(pop_json({"state", file, "domain.stock"})["value"] == 89);

  // diff between the two versions around order "late"
  j = pop_json(
      {"diff", file, std::to_string(w.before_late), std::to_string(w.before_late + 1), "domain"});
  bool stock_changed = false;
  bool order_added = false;
  for (const json& c : j["changes"]) {
    if (c["path"] == "domain.stock") {
      stock_changed = c["op"] == "changed" && c["before"] == 94 && c["after"] == 89;
    }
    if (c["path"] == "domain.orders.late") order_added = c["op"] == "added";
  }
  CHECK(stock_changed);
  CHECK(order_added);
  r = pop_command({"diff", file, std::to_string(w.before_late), std::to_string(w.before_late + 1),
                   "domain.stock"});
  CHECK(r.code == 0);
  CHECK(contains(r.out, "~ domain.stock: 94 -> 89"));

  // outbox: only the message committed after the relay ran
  j = pop_json({"outbox", file});
  REQUIRE(j["messages"].size() == 1);
  CHECK(j["messages"][0]["id"] == w.late_id);
  CHECK(j["messages"][0]["key"] == "late");
  CHECK(j["messages"][0]["topic"] == "order.placed");
  CHECK(j["messages"][0]["attempts"] == 0);
  r = pop_command({"outbox", file, "--key", "late"});
  CHECK(r.code == 0);
  CHECK(contains(r.out, w.late_id));
  CHECK(contains(r.out, "order.placed"));
  CHECK(pop_json({"outbox", file, "--topic", "other"})["messages"].empty());

  // dead letters: the rejected message with its reason
  j = pop_json({"dead", file});
  REQUIRE(j["dead_letters"].size() == 1);
  CHECK(j["dead_letters"][0]["id"] == w.bad_id);
  CHECK(contains(j["dead_letters"][0]["reason"].dump(), "rejected"));
  r = pop_command({"dead", file});
  CHECK(contains(r.out, w.bad_id));
  CHECK(contains(r.out, "# 1 dead letter at 'system.dead_letters'"));

  // workflows: the stuck instance, its reason and history
  j = pop_json({"workflows", file, "--status", "stuck"});
  REQUIRE(j["instances"].size() == 2);
  CHECK(j["instances"][0]["id"] == "w-1");
  CHECK(contains(j["instances"][0]["stuck_reason"], "'flow'"));
  CHECK(j["instances"][1]["id"] == "w-2");
  // Renaming a step made a new version of flow2; w-2 runs on the old one, which the deploy lacks.
  CHECK(contains(j["instances"][1]["stuck_reason"], "its definition version '"));
  CHECK(contains(j["instances"][1]["stuck_reason"], "of workflow 'flow2' is not defined"));
  CHECK(pop_json({"workflows", file, "--status", "completed"})["instances"].empty());
  CHECK(pop_json({"workflows", file, "--definition", "flow"})["instances"].size() == 1);
  r = pop_command({"workflow", file, "w-1"});
  CHECK(r.code == 0);
  CHECK(contains(r.out, "status     stuck"));
  CHECK(contains(r.out, "not defined in this program"));
  CHECK(contains(r.out, "\"note\":\"first\""));
  j = pop_json({"workflow", file, "w-1"});
  CHECK(j["step"] == "place");
  CHECK(j["history"].back()["outcome"].get<std::string>().rfind("stuck: ", 0) == 0);

  // audit: every commit of process "order", oldest first
  j = pop_json({"audit", file, "--process", "order"});
  REQUIRE(j["records"].size() == 4);
  CHECK(j["records"][3]["version"] == w.before_late + 1);
  CHECK(j["records"][3]["message_ids"] == json::array({w.late_id}));
  CHECK(pop_json({"audit", file, "--since", std::to_string(w.last)})["records"].size() == 1);

  // verify
  j = pop_json({"verify", file});
  CHECK(j["ok"] == true);
  CHECK(j["last_version"] == w.last);
  CHECK(j["closed_cleanly"] == true);
  CHECK(j["held_by_an_engine"] == false);

  // metrics in the Prometheus text format
  r = pop_command({"metrics", file});
  CHECK(r.code == 0);
  CHECK(contains(r.out, "\npop_outbox_pending 1\n"));
  CHECK(contains(r.out, "\npop_dead_letters 1\n"));
  CHECK(contains(r.out, "\npop_workflow_stuck 2\n"));
  CHECK(contains(r.out, "pop_workflow_instances{workflow=\"flow\",status=\"stuck\"} 1\n"));
  CHECK(contains(r.out, "# TYPE pop_outbox_oldest_pending_age_seconds gauge\n"));
  CHECK(pop_json({"metrics", file})["workflow_stuck"] == 2);

  // Nothing above wrote to the journal, checkpointed it or left a log behind.
  CHECK(pop::test::file_bytes(file) == bytes);
  CHECK(!std::filesystem::exists(file + "-wal"));
  CHECK(!std::filesystem::exists(file + "-shm"));
}

TEST_CASE("pop graph draws the processes and a workflow from what the programs recorded",
          "[pop_command]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("shop.db");
  write_journal(file);
  ran r = pop_command({"graph", file});
  REQUIRE(r.code == 0);
  CHECK(r.out.rfind("digraph processes {", 0) == 0);
  CHECK(contains(r.out, "\"path:domain.stock\" -> \"process:order\""));
  CHECK(contains(r.out, "\"process:order\" -> \"path:domain.orders\""));
  CHECK(contains(r.out, "\"process:order\" -> \"topic:order.placed\""));
  CHECK(!contains(r.out, "workflow.start"));  // the engine's plumbing only with --all
  CHECK(contains(pop_command({"graph", file, "--all"}).out, "workflow.start"));
  r = pop_command({"graph", file, "--workflow", "flow"});
  REQUIRE(r.code == 0);
  CHECK(contains(r.out, "\"(start)\" -> \"place\""));
  CHECK(contains(r.out, "\"place\" -> \"done\""));
  r = pop_command({"graph", file, "--workflow", "nope"});
  CHECK(r.code == 3);
  CHECK(contains(r.err, "no workflow named 'nope'"));
  if (std::system("command -v dot >/dev/null 2>&1") == 0) {
    const std::string svg = dir.file("flow.svg");
    r = pop_command({"graph", file, "--workflow", "flow", "-o", svg});
    REQUIRE(r.code == 0);
    CHECK(contains(pop::test::file_bytes(svg), "<svg"));
  }
  r = pop_command({"graph", file, "-o", dir.file("graph.txt")});
  CHECK(r.code == 2);
  // --json wraps the DOT text; the recorded definition is the newest one described (flow2 v2)
  const json g = pop_json({"graph", file, "--workflow", "flow2"});
  CHECK(contains(g["dot"], "\"(start)\" -> \"placing\""));
}

TEST_CASE("a requeued dead letter is delivered by a relay, and a resumed stuck workflow finishes",
          "[pop_command]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("shop.db");
  const written w = write_journal(file);

  // Requeue names the letters by id, --topic or --all; each is one commit.
  json j = pop_json({"requeue", file, "--topic", "other.topic"});
  CHECK(j["requeued"].empty());
  CHECK(j["version"] == w.last);
  const std::string all_file = dir.file("copy.db");
  std::filesystem::copy_file(file, all_file);
  std::filesystem::copy_file(file + "-head", all_file + "-head");
  CHECK(pop_json({"requeue", all_file, "--topic", "order.placed"})["requeued"] ==
        json::array({w.bad_id}));
  CHECK(pop_json({"requeue", dir.file("copy.db"), "--all"})["requeued"].empty());
  j = pop_json({"requeue", file, w.bad_id});
  CHECK(j["requeued"] == json::array({w.bad_id}));
  CHECK(j["version"] == w.last + 1);
  CHECK(pop_json({"dead", file})["dead_letters"].empty());
  CHECK(pop_json({"outbox", file})["messages"].size() == 2);
  CHECK(pop_json({"audit", file, "--since", std::to_string(w.last + 1)})["records"].size() == 1);

  ran r = pop_command({"workflow", file, "w-1", "--resume"});
  REQUIRE(r.code == 0);
  CHECK(contains(r.out, "workflow instance 'w-1' resumed in version"));
  CHECK(pop_json({"workflow", file, "w-1"})["status"] == "running");
  r = pop_command({"workflow", file, "w-1", "--resume"});  // no longer stuck
  CHECK(r.code == 5);
  CHECK(contains(r.err, "is running; resume needs it stuck"));

  // w-2's step was renamed: resuming would only park it again; an operator moves it to the new
  // step of the new version (checked against the definition the program recorded).
  r = pop_command({"workflow", file, "w-2", "--restart-from", "placing"});
  REQUIRE(r.code == 0);
  CHECK(contains(r.out, "workflow instance 'w-2' restarted from step placing in version"));
  j = pop_json({"workflow", file, "w-2"});
  CHECK(j["status"] == "running");
  CHECK(j["step"] == "placing");

  // The program runs again: its relay delivers the requeued message under its old id, and it
  // finishes the resumed and the restarted instance.
  auto e = must(pop::engine::open({.journal = file}));
  register_place(*e);
  auto wf = flows_on(*e, {flow_definition("flow", "place"), flow_definition("flow2", "placing")});
  pop::test::scripted_sink sink;
  auto relay = must(pop::relay::create(*e, sink, pop::test::quick_relay(1)));
  boost::asio::io_context io;
  REQUIRE(pop::test::run_on(io, relay->drain()).ok());
  CHECK(std::find(sink.acked.begin(), sink.acked.end(), w.bad_id) != sink.acked.end());
  for (const char* id : {"w-1", "w-2"}) {
    REQUIRE(must(wf->advance(id)));
    REQUIRE(must(wf->advance(id)));
    CHECK(wf->inspect(id).value().status == "completed");
    CHECK(e->snapshot().read(std::string("domain.placed.") + id).value_or(json()) == true);
  }
}

TEST_CASE("repairs are refused while an engine holds the journal, and reads still work",
          "[pop_command]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("shop.db");
  const written w = write_journal(file);
  auto e = must(pop::engine::open({.journal = file}));
  register_place(*e);
  const pop::commit c = must(e->execute("order", {{"id", "while-open"}, {"qty", 1}}));

  // Reads see the running engine's acknowledged commits.
  json j = pop_json({"state", file, "domain.orders.while-open"});
  CHECK(j["version"] == c.version);
  CHECK(j["value"]["qty"] == 1);
  CHECK(pop_json({"verify", file})["held_by_an_engine"] == true);
  CHECK(pop_json({"outbox", file})["messages"].size() == 2);

  for (const std::vector<std::string>& repair :
       {std::vector<std::string>{"requeue", file, "--all"},
        std::vector<std::string>{"discard", file, w.bad_id},
        std::vector<std::string>{"workflow", file, "w-1", "--cancel"}}) {
    const ran r = pop_command(repair);
    CHECK(r.code == 6);
    CHECK(contains(r.err, "held by a running engine"));
  }
  // Nothing changed.
  CHECK(e->version() == c.version);
  CHECK(must(pop::dead_letters::create(*e))->count() == 1);
  e.reset();
  CHECK(pop_json({"workflow", file, "w-1"})["status"] == "stuck");

  // Stopped, the same repairs go through as journaled commits.
  CHECK(pop_json({"discard", file, w.bad_id})["version"] == c.version + 1);
  CHECK(pop_json({"dead", file})["dead_letters"].empty());
  j = pop_json({"workflow", file, "w-1", "--cancel", "--reason", "gave up"});
  CHECK(j["status"] == "cancelled");
  CHECK(j["error"] == "gave up");
  CHECK(j["action"] == "cancelled");
}

TEST_CASE("pop gives clear errors and distinct exit codes, and changes nothing on error",
          "[pop_command]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("shop.db");
  const written w = write_journal(file);

  ran r = pop_command({"state", dir.file("missing.db")});
  CHECK(r.code == 3);
  CHECK(contains(r.err, "does not exist"));
  r = pop_command({"state", file, "domain.nothing"});
  CHECK(r.code == 3);
  CHECK(contains(r.err, "nothing at 'domain.nothing' in version " + std::to_string(w.last)));
  r = pop_command({"state", file, "domain..x"});
  CHECK(r.code == 2);
  r = pop_command({"state", file, "--at", "999999"});
  CHECK(r.code == 3);
  CHECK(contains(r.err, "does not retain version 999999"));
  r = pop_command({"workflow", file, "nobody"});
  CHECK(r.code == 3);
  CHECK(contains(r.err, "no workflow instance 'nobody'"));
  // Refused repairs leave the file byte for byte as it was (they do not even open an engine).
  const std::string before = pop::test::file_bytes(file);
  r = pop_command({"discard", file, w.bad_id, "no-such-id"});
  CHECK(r.code == 3);
  CHECK(contains(r.err, "no dead letter 'no-such-id'"));
  r = pop_command({"requeue", file, "no-such-id"});
  CHECK(r.code == 3);
  r = pop_command({"workflow", file, "w-1", "--restart-from", "nowhere"});
  CHECK(r.code == 3);
  CHECK(contains(r.err, "has no step 'nowhere' in version"));
  CHECK(contains(r.err, ": done, place"));
  CHECK(pop::test::file_bytes(file) == before);
  CHECK(pop_command({"workflow", file, "w-1", "--cancel"}).code == 0);
  const std::string cancelled = pop::test::file_bytes(file);
  r = pop_command({"workflow", file, "w-1", "--cancel"});
  CHECK(r.code == 5);
  CHECK(contains(r.err, "is cancelled; cancel needs it running, waiting or stuck"));
  CHECK(pop::test::file_bytes(file) == cancelled);
  CHECK(before != cancelled);  // (the file does change when a repair goes through)
  CHECK(pop_json({"dead", file})["dead_letters"].size() == 1);  // not even the first was removed
  CHECK(pop_json({"verify", file})["last_version"] == w.last + 1);
  r = pop_command({"diff", file, "5", "3"});
  CHECK(r.code == 2);
  r = pop_command({"diff", file, "3", "5", "domain.nothing"});
  CHECK(r.code == 3);
  r = pop_command({"requeue", file});
  CHECK(r.code == 2);
  r = pop_command({"nonsense"});
  CHECK(r.code == 2);
  r = pop_command({"--help"});
  CHECK(r.code == 0);
  CHECK(contains(r.out, "Exit codes:"));

  const std::string not_sqlite = dir.file("notes.txt");
  pop::test::write_bytes(not_sqlite, std::string(4096, 'x'));
  // Not SQLite at all: as the engine says, damaged or not a journal, never touched (exit 4).
  r = pop_command({"verify", not_sqlite});
  CHECK(r.code == 4);
  CHECK(contains(r.err, "file is not a database"));
  CHECK(pop::test::file_bytes(not_sqlite) == std::string(4096, 'x'));

  const std::string foreign = dir.file("foreign.db");
  sql(foreign, "CREATE TABLE accounts(id INTEGER PRIMARY KEY)");
  r = pop_command({"outbox", foreign});
  CHECK(r.code == 5);
  CHECK(contains(r.err, "not a pop journal"));

  const std::string newer = dir.file("newer.db");
  std::filesystem::copy_file(file, newer);
  std::filesystem::copy_file(file + "-head", newer + "-head");
  sql(newer, "UPDATE pop_meta SET value = '3' WHERE key = 'format_version'");
  r = pop_command({"state", newer});
  CHECK(r.code == 5);
  CHECK(contains(r.err, "journal format 3"));

  const std::string damaged = dir.file("damaged.db");
  std::filesystem::copy_file(file, damaged);
  std::filesystem::copy_file(file + "-head", damaged + "-head");
  sql(damaged, "UPDATE pop_commits SET checksum = checksum + 1 WHERE version = 2");
  const std::string damaged_bytes = pop::test::file_bytes(damaged);
  r = pop_command({"verify", damaged});
  CHECK(r.code == 4);
  CHECK(contains(r.err, "the record of version 2 fails its checksum"));
  r = pop_command({"workflow", damaged, "w-2", "--resume"});
  CHECK(r.code == 4);
  CHECK(pop::test::file_bytes(damaged) == damaged_bytes);
}

TEST_CASE("pop state and diff reach every retained version and name the range for others",
          "[pop_command]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("counter.db");
  {
    pop::options o;
    o.journal = file;
    o.journal_tuning.snapshot_every = 5;
    // Every commit waits for SQLite (no commit log): groups of one, so the snapshots fall at 5
    // and 10 and versions 10 to 12 are retained.
    o.journal_tuning.log_bytes = 0;
    auto e = must(pop::engine::open(o));
    REQUIRE(e->register_process({.name = "count", .inputs = {"n"}, .outputs = {"n"}},
                                [](const pop::context& ctx, const json&) {
                                  pop::result r;
                                  r.set("n", ctx.get_or<int>("n", 0) + 1);
                                  return r;
                                })
                .ok());
    for (int i = 0; i < 12; ++i) REQUIRE(e->execute("count").ok());
  }
  const json info = pop_json({"verify", file});
  const std::uint64_t snapshot = info["snapshot_version"];
  REQUIRE(snapshot > 0);
  REQUIRE(info["last_version"] == 12);
  for (std::uint64_t v = snapshot; v <= 12; ++v) {
    const json j = pop_json({"state", file, "n", "--at", std::to_string(v)});
    CHECK(j["value"] == v);
    CHECK(j["newest_version"] == 12);
  }
  const ran r = pop_command({"state", file, "--at", std::to_string(snapshot - 1)});
  CHECK(r.code == 3);
  CHECK(contains(r.err, "holds versions " + std::to_string(snapshot) +
                            " to 12 (older ones were folded into its snapshot)"));
  const json d = pop_json({"diff", file, std::to_string(snapshot), "12"});
  REQUIRE(d["changes"].size() == 1);
  CHECK(d["changes"][0]["before"] == snapshot);
  CHECK(d["changes"][0]["after"] == 12);
}

TEST_CASE("pop workflow --restart-from finds the step in the instance's own version first",
          "[pop_command]") {
  pop::test::temp_dir dir;
  const std::string file = dir.file("shop.db");
  write_journal(file);
  // w-2 runs the first version of flow2 (step "place"); the newest version calls it "placing".
  const std::string own = pop_json({"workflow", file, "w-2"})["definition_version"];
  // A version asked for by name; one that the journal does not record is refused.
  ran r = pop_command({"workflow", file, "w-2", "--restart-from", "place", "--version", "nope"});
  CHECK(r.code == 3);
  CHECK(contains(r.err, "records no version 'nope' of workflow 'flow2'"));
  json j = pop_json({"workflow", file, "w-2", "--restart-from", "place"});
  CHECK(j["status"] == "running");
  CHECK(j["step"] == "place");
  CHECK(j["definition_version"] == own);
  r = pop_command({"workflow", file, "w-1", "--version", own});
  CHECK(r.code == 2);
  CHECK(contains(r.err, "--version goes with --restart-from"));
}
