// Defines how the `pop` command shows what it read: tables, times, and Graphviz graphs.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "pop/contracts/json.hpp"
#include "pop/workflow/workflow.hpp"

namespace pop::detail {

// A plain-text table: a header row, then rows, columns padded to their widest cell; cells longer
// than `max_cell` characters are cut with "...".
class text_table {
 public:
  explicit text_table(std::vector<std::string> header, std::size_t max_cell = 60)
      : header_(std::move(header)), max_cell_(max_cell) {}
  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  std::size_t size() const { return rows_.size(); }
  std::string str() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
  std::size_t max_cell_;
};

// `us` microseconds since the Unix epoch as "2026-12-03 11:30:02.123Z"; "-" for 0.
std::string format_time(std::int64_t us);
// A duration of `us` microseconds as "850ms", "12.3s", "4m05s", "3h02m", "2d04h".
std::string format_duration(std::int64_t us);
// `j` on one line, cut to `max` characters.
std::string short_json(const json& j, std::size_t max = 60);

// The processes described in a journal (kind "process": name -> {"inputs", "outputs", "emits"})
// as a Graphviz digraph: processes, the state paths they read and write, the topics they emit.
std::string process_graph(const std::map<std::string, json>& processes);
// Workflow `def` as a Graphviz digraph: its steps and every transition between them.
std::string workflow_graph(const workflow_definition& def);

}  // namespace pop::detail
