// Defines pop::detail::instance_record, a workflow instance's record as the state stores it at
// <instances>.<id>, typed, with its one codec (JSON both ways, and straight from a stored value).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "pop/contracts/json.hpp"
#include "pop/engine/value_view.hpp"

namespace pop::detail {

// Enum <-> name tables (the names records and arguments store): the name of `value` in `table`
// ("unknown" if it has none), and the value named `name` (nullopt if none is).
template <class E, std::size_t N>
std::string_view name_in(const std::pair<E, std::string_view> (&table)[N], E value) {
  for (const auto& [v, name] : table) {
    if (v == value) return name;
  }
  return "unknown";
}
template <class E, std::size_t N>
std::optional<E> find_in(const std::pair<E, std::string_view> (&table)[N], std::string_view name) {
  for (const auto& [v, text] : table) {
    if (text == name) return v;
  }
  return std::nullopt;
}

// The status of an instance. The record stores it by name; a name this program does not know
// reads as `unknown`, which is neither runnable nor final. Its underlying type is char so that
// absl::StrCat refuses it at compile time (it would print the number): messages name a status
// through status_name().
enum class instance_status : char {
  running,
  waiting,
  compensating,
  completed,
  failed,
  compensated,
  cancelled,
  stuck,
  unknown,
};
// The name a record stores for `s` ("unknown" for unknown).
std::string_view status_name(instance_status s);
// The status named `name`, or unknown.
instance_status parse_status(std::string_view name);
// JSON conversions (nlohmann finds them by argument-dependent lookup): by name.
inline void to_json(json& j, instance_status s) {
  j = std::string(status_name(s));
}
inline void from_json(const json& j, instance_status& s) {
  s = j.is_string() ? parse_status(j.get_ref<const std::string&>()) : instance_status::unknown;
}
// Ended for good: completed, failed, compensated or cancelled.
inline bool is_final(instance_status s) {
  return s == instance_status::completed || s == instance_status::failed ||
         s == instance_status::compensated || s == instance_status::cancelled;
}
// Advanced by advance() and the runner: running or compensating.
inline bool is_runnable(instance_status s) {
  return s == instance_status::running || s == instance_status::compensating;
}

// Why an instance is parked stuck; stored by name ("undefined", "missing_version",
// "missing_step", "missing_compensation", "retries_exhausted", "operator"), a name this program
// does not know reading as `unknown`.
enum class park_kind : char {
  undefined,             // its workflow is not defined in this program
  missing_version,       // its version is not
  missing_step,          // the step it is at (or waits on) is not in its version here
  missing_compensation,  // a step it must compensate has no compensation here
  retries_exhausted,     // a step's retries ran out with on_exhausted "pause"
  by_operator,           // an operator (or something an operator must decide) parked it
  unknown,
};
std::string_view park_kind_name(park_kind k);
park_kind parse_park_kind(std::string_view name);
// Parked for lack of something a program may define (undefined, missing_version, missing_step,
// missing_compensation): a definition or a migration that brings it resumes the instance.
inline bool for_lack_of_definition(park_kind k) {
  return k == park_kind::undefined || k == park_kind::missing_version ||
         k == park_kind::missing_step || k == park_kind::missing_compensation;
}

// A workflow instance's record. Optional fields are absent from the stored JSON when empty;
// top-level members this program does not know are kept as they are (`extra`), so a record
// written by a newer program survives a step of an older one (members it does not know inside
// the known ones, such as a new field of "stuck", are not kept).
struct instance_record {
  // Parked for an operator (status stuck): what it was, and why.
  struct stuck_info {
    std::string status{};  // the status it had, by name (kept even if this program lacks it)
    std::string reason{};
    park_kind kind = park_kind::unknown;
    std::string kind_text{};  // the stored name when kind is unknown (kept as it was)
    std::int64_t at_us = 0;
    bool resumable = true;
    // The kind by name, as stored.
    std::string_view kind_name() const {
      return kind == park_kind::unknown && !kind_text.empty() ? std::string_view(kind_text)
                                                              : park_kind_name(kind);
    }
    bool operator==(const stuck_info&) const = default;
  };
  // A failed step (or compensation) waiting to run again, as attempt `attempt`.
  struct retry_info {
    std::string step{};
    std::int64_t attempt = 1;
    bool compensation = false;
    bool operator==(const retry_info&) const = default;
  };
  struct cancel_info {
    std::string reason{};
    std::int64_t at_us = 0;
    bool operator==(const cancel_info&) const = default;
  };
  // The children of a parallel or map step it waits for.
  struct fan_out_info {
    std::string kind{};  // "parallel" or "map"
    std::string step{};
    std::string base{};                                 // child ids are "<base>-<index>"
    std::map<std::string, instance_status> children{};  // started ones, with their status
    std::int64_t next = 0;                              // the index of the next to start
    std::int64_t total = 0;
    bool operator==(const fan_out_info&) const = default;
  };

  std::string workflow{};
  std::string definition_name{};  // JSON "definition": {"name", "version"}
  std::string version{};
  instance_status status = instance_status::unknown;
  std::string status_text{};  // the stored name when status is unknown (kept as it was)
  std::string cursor{};
  json inputs = json::object();
  json received = json::object();  // topic (or fan-out step) -> what it received
  std::map<std::string, std::int64_t> visits{};
  std::optional<std::map<std::string, std::int64_t>> calls{};  // step -> its last child number
  std::vector<std::string> done{};                             // completed compensable steps
  std::string error{};
  std::int64_t started_at_us = 0;
  std::optional<std::int64_t> deadline_us{};
  std::optional<std::int64_t> wait_deadline_us{};
  std::optional<std::int64_t> sleep_until_us{};
  std::optional<std::int64_t> retry_at_us{};
  std::optional<std::int64_t> ended_at_us{};
  std::optional<std::int64_t> history_next{};  // the sequence number of its next history entry
  std::optional<std::int64_t> history_base{};  // history_next when an operator last restarted it
  std::optional<std::int64_t> run{};           // how often it continued as new
  std::optional<std::string> parent{};         // the instance that started it as a child
  std::optional<std::string> parent_step{};
  std::optional<std::string> child{};  // the child a call step waits for
  std::optional<std::string> parent_step_of_child{};
  std::optional<std::string> wait_key{};
  std::optional<stuck_info> stuck{};
  std::optional<retry_info> retry{};
  std::optional<cancel_info> cancelled{};
  std::optional<fan_out_info> fan_out{};
  json legacy_history{};        // "history": the entries of a record from before they had keys
  json extra = json::object();  // members this program does not know

  // The status by name, as stored.
  std::string_view status_name() const;
  void set_status(instance_status s) {
    status = s;
    status_text.clear();
  }
  // Sets the status by its name (an unknown one is kept by name).
  void set_status_name(std::string_view name);

  // The record in `j`; members of the wrong type read as absent (and are dropped on write).
  static instance_record from_json(const json& j);
  static instance_record from_json(json&& j);
  // The record stored at `v`.
  static instance_record from_view(const value_view& v);
  // The stored JSON; the rvalue form moves inputs, received messages and unknown members.
  json to_json() const&;
  json to_json() &&;
  // The stored form straight in packed bytes (engine/detail/packed.hpp), exactly what packing
  // to_json() would give, with no JSON built; nullopt for a record this cannot write so (one
  // with members a newer program added, or from before history entries had keys): write
  // to_json() then.
  std::optional<std::string> to_packed() const;

  bool operator==(const instance_record&) const = default;

 private:
  template <class Record>
  static json encode(Record&& r);
};

}  // namespace pop::detail
