#include "pop/tools/pop/render.hpp"

#include <fmt/chrono.h>
#include <fmt/format.h>

#include <algorithm>
#include <ctime>
#include <set>

namespace pop::detail {

std::string text_table::str() const {
  const auto cut = [&](const std::string& s) {
    return s.size() <= max_cell_ ? s : s.substr(0, max_cell_ - 3) + "...";
  };
  std::vector<std::size_t> width(header_.size(), 0);
  for (std::size_t i = 0; i < header_.size(); ++i) width[i] = header_[i].size();
  for (const auto& row : rows_) {
    for (std::size_t i = 0; i < row.size() && i < width.size(); ++i) {
      width[i] = std::max(width[i], cut(row[i]).size());
    }
  }
  std::string out;
  const auto line = [&](const std::vector<std::string>& cells) {
    std::string l;
    for (std::size_t i = 0; i < width.size(); ++i) {
      const std::string cell = i < cells.size() ? cut(cells[i]) : "";
      l += i + 1 < width.size() ? fmt::format("{:<{}}  ", cell, width[i]) : cell;
    }
    while (!l.empty() && l.back() == ' ') l.pop_back();
    out += l;
    out += '\n';
  };
  line(header_);
  for (const auto& row : rows_) line(row);
  return out;
}

std::string format_time(std::int64_t us) {
  if (us <= 0) return "-";
  const std::time_t secs = static_cast<std::time_t>(us / 1'000'000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  return fmt::format("{:%Y-%m-%d %H:%M:%S}.{:03d}Z", tm, static_cast<int>(us / 1000 % 1000));
}

std::string format_duration(std::int64_t us) {
  const char* sign = us < 0 ? "-" : "";
  us = us < 0 ? -us : us;
  if (us < 1'000) return fmt::format("{}{}us", sign, us);
  if (us < 1'000'000) return fmt::format("{}{}ms", sign, us / 1'000);
  if (us < 60'000'000) return fmt::format("{}{:.1f}s", sign, static_cast<double>(us) / 1e6);
  const std::int64_t s = us / 1'000'000;
  if (s < 3600) return fmt::format("{}{}m{:02d}s", sign, s / 60, s % 60);
  if (s < 86400) return fmt::format("{}{}h{:02d}m", sign, s / 3600, s % 3600 / 60);
  return fmt::format("{}{}d{:02d}h", sign, s / 86400, s % 86400 / 3600);
}

std::string short_json(const json& j, std::size_t max) {
  std::string s = j.is_string() ? j.get<std::string>() : j.dump();
  if (s.size() > max) s = s.substr(0, max - 3) + "...";
  return s;
}

namespace {

// `s` as a quoted DOT identifier or label.
std::string dot_id(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out + '"';
}

std::vector<std::string> strings(const json& d, const char* field) {
  std::vector<std::string> out;
  if (const auto it = d.find(field); it != d.end() && it->is_array()) {
    for (const json& s : *it) {
      if (s.is_string()) out.push_back(s.get<std::string>());
    }
  }
  return out;
}

}  // namespace

std::string process_graph(const std::map<std::string, json>& processes) {
  std::string out =
      "digraph processes {\n"
      "  rankdir=LR;\n"
      "  node [fontname=\"Helvetica\", fontsize=11];\n"
      "  edge [fontname=\"Helvetica\", fontsize=9];\n";
  std::set<std::string> paths;
  std::set<std::string> topics;
  std::string edges;
  for (const auto& [name, d] : processes) {
    out += fmt::format(
        "  {} [label={}, shape=box, style=\"rounded,filled\", fillcolor=\"#dbe9ff\"];\n",
        dot_id("process:" + name), dot_id(name));
    for (const std::string& p : strings(d, "inputs")) {
      paths.insert(p);
      edges += fmt::format("  {} -> {} [color=\"#666666\", label=\"reads\"];\n",
                           dot_id("path:" + p), dot_id("process:" + name));
    }
    for (const std::string& p : strings(d, "outputs")) {
      paths.insert(p);
      edges += fmt::format("  {} -> {} [color=\"#1f5fbf\", penwidth=1.5, label=\"writes\"];\n",
                           dot_id("process:" + name), dot_id("path:" + p));
    }
    for (const std::string& t : strings(d, "emits")) {
      topics.insert(t);
      edges += fmt::format("  {} -> {} [style=dashed, color=\"#b36b00\", label=\"emits\"];\n",
                           dot_id("process:" + name), dot_id("topic:" + t));
    }
  }
  for (const std::string& p : paths) {
    out += fmt::format("  {} [label={}, shape=folder, style=filled, fillcolor=\"#eeeeee\"];\n",
                       dot_id("path:" + p), dot_id(p));
  }
  for (const std::string& t : topics) {
    out += fmt::format("  {} [label={}, shape=cds, style=filled, fillcolor=\"#ffe9c4\"];\n",
                       dot_id("topic:" + t), dot_id(t));
  }
  return out + edges + "}\n";
}

std::string workflow_graph(const workflow_definition& def) {
  std::string out = fmt::format(
      "digraph {} {{\n"
      "  rankdir=TB;\n"
      "  label={}; labelloc=t;\n"
      "  node [fontname=\"Helvetica\", fontsize=11];\n"
      "  edge [fontname=\"Helvetica\", fontsize=9];\n"
      "  \"(start)\" [shape=circle, label=\"\", width=0.2, style=filled, fillcolor=black];\n"
      "  \"(start)\" -> {};\n",
      dot_id("workflow " + def.name), dot_id("workflow " + def.name), dot_id(def.start));
  const auto edge = [&](const std::string& from, const std::string& to, const std::string& label,
                        const char* style) {
    if (to.empty()) return;
    out +=
        fmt::format("  {} -> {} [label={}{}];\n", dot_id(from), dot_id(to), dot_id(label), style);
  };
  bool failure_path = false;
  for (const workflow_step& s : def.steps) {
    std::string label = s.name;
    const char* shape = "box";
    const char* fill = "#dbe9ff";
    if (!s.process.empty()) {
      label += "\nprocess " + s.process;
      if (!s.compensate.empty()) label += "\ncompensate: " + s.compensate;
    } else if (!s.branch.empty()) {
      shape = "diamond";
      fill = "#fff6c4";
    } else if (!s.wait.empty()) {
      shape = "hexagon";
      fill = "#e6f5d0";
      label += "\nwait";
      if (!s.key.empty()) label += " (key: " + s.key + ")";
    } else if (s.sleep_ms > 0) {
      shape = "box";
      fill = "#eeeeee";
      label += fmt::format("\nsleep {} ms", s.sleep_ms);
    } else if (!s.call.empty()) {
      shape = "box3d";
      label += "\ncall " + s.call;
    } else if (!s.fail.empty()) {
      shape = "octagon";
      fill = "#f8d0d0";
      label += "\nfail: " + s.fail;
      failure_path = true;
      edge(s.name, "(failure path)", "", ", style=dashed, color=\"#c0392b\"");
    } else if (s.end) {
      shape = "doublecircle";
      fill = "#d0f0d0";
    }
    if (s.max_visits > 1) label += fmt::format("\n(at most {} visits)", s.max_visits);
    out += fmt::format("  {} [label={}, shape={}, style=filled, fillcolor=\"{}\"];\n",
                       dot_id(s.name), dot_id(label), shape, fill);
    for (const workflow_condition& c : s.branch) {
      edge(s.name, c.next,
           c.predicate.empty() ? fmt::format("{} {} {}", c.path, c.op, short_json(c.value, 30))
                               : c.predicate,
           "");
    }
    for (const auto& [topic, next] : s.wait) edge(s.name, next, topic, "");
    if (s.wait.empty()) {
      edge(s.name, s.next, s.branch.empty() ? "" : "otherwise", "");
    }
    if (s.timeout_ms > 0) {
      const std::string to = s.on_timeout.empty() ? "(failure path)" : s.on_timeout;
      failure_path = failure_path || s.on_timeout.empty();
      edge(s.name, to, fmt::format("timeout {} ms", s.timeout_ms), ", style=dotted");
    }
    if (!s.on_error.empty()) {
      edge(s.name, s.on_error, "error", ", style=dashed, color=\"#c0392b\"");
    } else if (!s.process.empty() || !s.call.empty()) {
      failure_path = true;
      edge(s.name, "(failure path)", "error", ", style=dashed, color=\"#c0392b\"");
    }
  }
  if (failure_path) {
    out +=
        "  \"(failure path)\" [shape=note, style=filled, fillcolor=\"#f8d0d0\", "
        "label=\"failure path\\ncompensations in reverse order\"];\n";
  }
  return out + "}\n";
}

}  // namespace pop::detail
