#include "pop/workflow/detail/record.hpp"

#include "pop/engine/detail/packed.hpp"

#include <type_traits>
#include <utility>

namespace pop::detail {

namespace {

constexpr std::pair<instance_status, std::string_view> status_names[] = {
    {instance_status::running, "running"},
    {instance_status::waiting, "waiting"},
    {instance_status::compensating, "compensating"},
    {instance_status::completed, "completed"},
    {instance_status::failed, "failed"},
    {instance_status::compensated, "compensated"},
    {instance_status::cancelled, "cancelled"},
    {instance_status::stuck, "stuck"},
};

std::optional<std::string> text(json& j) {
  if (auto* s = j.get_ptr<std::string*>()) return std::move(*s);
  return std::nullopt;
}
std::optional<std::int64_t> integer(const json& j) {
  if (j.is_number_integer()) return j.get<std::int64_t>();
  return std::nullopt;
}
std::string text_of(const json& j, const char* key) {
  const auto it = j.find(key);
  const auto* s = it == j.end() ? nullptr : it->get_ptr<const std::string*>();
  return s ? *s : std::string();
}
std::int64_t integer_of(const json& j, const char* key, std::int64_t fallback = 0) {
  const auto it = j.find(key);
  return it == j.end() ? fallback : integer(*it).value_or(fallback);
}
bool flag_of(const json& j, const char* key, bool fallback) {
  const auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : fallback;
}
std::map<std::string, std::int64_t> counts(const json& j) {
  std::map<std::string, std::int64_t> out;
  if (!j.is_object()) return out;
  for (const auto& [k, v] : j.items()) {
    if (const std::optional<std::int64_t> n = integer(v)) out.emplace(k, *n);
  }
  return out;
}
json counts_json(const std::map<std::string, std::int64_t>& m) {
  json out(json::value_t::object);
  json::object_t& o = out.get_ref<json::object_t&>();
  for (const auto& [k, v] : m) o.emplace_hint(o.end(), k, v);
  return out;
}

// Reads the rarer members of a record (compensations done, park, retry, cancel and fan-out
// records) and unknown ones (kept in `extra`) from their JSON.
void read_json_member(instance_record& r, std::string_view key, json value) {
  using rec = instance_record;
  if (key == "done") {
    if (value.is_array()) {
      for (json& d : value) {
        if (auto* s = d.get_ptr<std::string*>()) r.done.push_back(std::move(*s));
      }
    }
  } else if (key == "stuck") {
    if (value.is_object()) {
      const std::string kind = text_of(value, "kind");
      const park_kind parsed = parse_park_kind(kind);
      r.stuck = rec::stuck_info{text_of(value, "status"),
                                text_of(value, "reason"),
                                parsed,
                                parsed == park_kind::unknown ? kind : std::string(),
                                integer_of(value, "at_us"),
                                flag_of(value, "resumable", true)};
    }
  } else if (key == "retry") {
    if (value.is_object()) {
      r.retry = rec::retry_info{text_of(value, "step"), integer_of(value, "attempt", 1),
                                flag_of(value, "compensation", false)};
    }
  } else if (key == "cancelled") {
    if (value.is_object()) {
      r.cancelled = rec::cancel_info{text_of(value, "reason"), integer_of(value, "at_us")};
    }
  } else if (key == "fan_out") {
    if (value.is_object()) {
      rec::fan_out_info f{text_of(value, "kind"),    text_of(value, "step"),
                          text_of(value, "base"),    {},
                          integer_of(value, "next"), integer_of(value, "total")};
      if (const auto c = value.find("children"); c != value.end() && c->is_object()) {
        for (const auto& [id, st] : c->items()) f.children.emplace(id, st.get<instance_status>());
      }
      r.fan_out = std::move(f);
    }
  } else {
    r.extra[std::string(key)] = std::move(value);
  }
}

// Member access for read_member, over a JSON member (moved from) and over a stored one (a view:
// scalars and counts read in place, nothing decoded that is not kept).
std::optional<std::int64_t> integer(const value_view& v) {
  return v.as_integer();
}
std::optional<std::string> text(const value_view& v) {
  const std::optional<std::string_view> s = v.as_string();
  return s ? std::optional<std::string>(*s) : std::nullopt;
}
bool is_object(const json& j) {
  return j.is_object();
}
bool is_object(const value_view& v) {
  return v.is_object();
}
json take(json& j) {
  return std::move(j);
}
json take(const value_view& v) {
  return v.to_json();
}
std::string text_of(const value_view& v, const char* key) {
  return text(v.member(key)).value_or("");
}
std::map<std::string, std::int64_t> counts(const value_view& v) {
  std::map<std::string, std::int64_t> out;
  v.for_each_member([&](std::string_view k, const value_view& m) {
    if (const std::optional<std::int64_t> n = m.as_integer()) out.emplace_hint(out.end(), k, *n);
    return true;
  });
  return out;
}

// Reads member `key` of a stored record (a json& or a value_view) into `r`.
template <class Member>
void read_member(instance_record& r, std::string_view key, Member& value) {
  const auto set_text = [&](std::optional<std::string>& f) { f = text(value); };
  const auto set_int = [&](std::optional<std::int64_t>& f) { f = integer(value); };
  if (key == "workflow") {
    r.workflow = text(value).value_or("");
  } else if (key == "definition") {
    if (is_object(value)) {
      r.definition_name = text_of(value, "name");
      r.version = text_of(value, "version");
    }
  } else if (key == "status") {
    r.set_status_name(text(value).value_or(""));
  } else if (key == "cursor") {
    r.cursor = text(value).value_or("");
  } else if (key == "inputs") {
    if (is_object(value)) r.inputs = take(value);
  } else if (key == "received") {
    if (is_object(value)) r.received = take(value);
  } else if (key == "visits") {
    r.visits = counts(value);
  } else if (key == "calls") {
    if (is_object(value)) r.calls = counts(value);
  } else if (key == "error") {
    r.error = text(value).value_or("");
  } else if (key == "started_at_us") {
    r.started_at_us = integer(value).value_or(0);
  } else if (key == "deadline_us") {
    set_int(r.deadline_us);
  } else if (key == "wait_deadline_us") {
    set_int(r.wait_deadline_us);
  } else if (key == "sleep_until_us") {
    set_int(r.sleep_until_us);
  } else if (key == "retry_at_us") {
    set_int(r.retry_at_us);
  } else if (key == "ended_at_us") {
    set_int(r.ended_at_us);
  } else if (key == "history_next") {
    set_int(r.history_next);
  } else if (key == "history_base") {
    set_int(r.history_base);
  } else if (key == "run") {
    set_int(r.run);
  } else if (key == "parent") {
    set_text(r.parent);
  } else if (key == "parent_step") {
    set_text(r.parent_step);
  } else if (key == "child") {
    set_text(r.child);
  } else if (key == "parent_step_of_child") {
    set_text(r.parent_step_of_child);
  } else if (key == "wait_key") {
    set_text(r.wait_key);
  } else if (key == "history") {
    r.legacy_history = take(value);
  } else {
    // The rarer members, and unknown ones, as JSON.
    read_json_member(r, key, take(value));
  }
}

constexpr std::pair<park_kind, std::string_view> park_kind_names[] = {
    {park_kind::undefined, "undefined"},
    {park_kind::missing_version, "missing_version"},
    {park_kind::missing_step, "missing_step"},
    {park_kind::missing_compensation, "missing_compensation"},
    {park_kind::retries_exhausted, "retries_exhausted"},
    {park_kind::by_operator, "operator"},
};

}  // namespace

std::string_view park_kind_name(park_kind k) {
  return name_in(park_kind_names, k);
}

park_kind parse_park_kind(std::string_view name) {
  return find_in(park_kind_names, name).value_or(park_kind::unknown);
}

std::string_view status_name(instance_status s) {
  return name_in(status_names, s);
}

instance_status parse_status(std::string_view name) {
  return find_in(status_names, name).value_or(instance_status::unknown);
}

std::string_view instance_record::status_name() const {
  return status == instance_status::unknown && !status_text.empty() ? std::string_view(status_text)
                                                                    : detail::status_name(status);
}

void instance_record::set_status_name(std::string_view name) {
  status = parse_status(name);
  status_text = status == instance_status::unknown ? std::string(name) : std::string();
}

instance_record instance_record::from_json(const json& j) {
  return from_json(json(j));
}

instance_record instance_record::from_json(json&& j) {
  instance_record r;
  if (!j.is_object()) return r;
  for (auto& [key, value] : j.get_ref<json::object_t&>()) read_member(r, key, value);
  return r;
}

instance_record instance_record::from_view(const value_view& v) {
  instance_record r;
  v.for_each_member([&](std::string_view key, const value_view& member) {
    read_member(r, key, member);
    return true;
  });
  return r;
}

json instance_record::to_json() const& {
  return encode(*this);
}

json instance_record::to_json() && {
  return encode(std::move(*this));
}

template <class Record>
json instance_record::encode(Record&& r) {
  // Members are added in key order at the end of the object's map (std::map::emplace_hint):
  // a record is written on every step.
  json j = r.extra.is_object() ? std::forward<Record>(r).extra : json(json::value_t::object);
  json::object_t& o = j.get_ref<json::object_t&>();
  const auto put = [](json::object_t& obj, const char* key, json value) {
    obj.emplace_hint(obj.end(), key, std::move(value));
  };
  const auto put_text = [&](const char* key, auto&& v) {
    if (v) put(o, key, std::forward<decltype(v)>(v).value());
  };
  const auto put_int = [&](const char* key, const std::optional<std::int64_t>& v) {
    if (v) put(o, key, *v);
  };
  if (r.calls) put(o, "calls", counts_json(*r.calls));
  if (r.cancelled) {
    json c(json::value_t::object);
    json::object_t& co = c.get_ref<json::object_t&>();
    put(co, "at_us", r.cancelled->at_us);
    put(co, "reason", std::forward<Record>(r).cancelled->reason);
    put(o, "cancelled", std::move(c));
  }
  put_text("child", std::forward<Record>(r).child);
  put(o, "cursor", std::forward<Record>(r).cursor);
  put_int("deadline_us", r.deadline_us);
  {
    json def(json::value_t::object);
    json::object_t& d = def.get_ref<json::object_t&>();
    put(d, "name", std::forward<Record>(r).definition_name);
    put(d, "version", std::forward<Record>(r).version);
    put(o, "definition", std::move(def));
  }
  {
    json done(json::value_t::array);
    json::array_t& a = done.get_ref<json::array_t&>();
    a.reserve(r.done.size());
    for (auto& s : r.done) {
      if constexpr (std::is_lvalue_reference_v<Record>) {
        a.emplace_back(s);
      } else {
        a.emplace_back(std::move(s));
      }
    }
    put(o, "done", std::move(done));
  }
  put_int("ended_at_us", r.ended_at_us);
  put(o, "error", std::forward<Record>(r).error);
  if (r.fan_out) {
    json f(json::value_t::object);
    json::object_t& fo = f.get_ref<json::object_t&>();
    put(fo, "base", r.fan_out->base);
    json children(json::value_t::object);
    json::object_t& ch = children.get_ref<json::object_t&>();
    for (const auto& [id, st] : r.fan_out->children) put(ch, id.c_str(), st);
    put(fo, "children", std::move(children));
    put(fo, "kind", r.fan_out->kind);
    put(fo, "next", r.fan_out->next);
    put(fo, "step", r.fan_out->step);
    put(fo, "total", r.fan_out->total);
    put(o, "fan_out", std::move(f));
  }
  if (!r.legacy_history.is_null()) put(o, "history", std::forward<Record>(r).legacy_history);
  put_int("history_base", r.history_base);
  put_int("history_next", r.history_next);
  put(o, "inputs", std::forward<Record>(r).inputs);
  put_text("parent", std::forward<Record>(r).parent);
  put_text("parent_step", std::forward<Record>(r).parent_step);
  put_text("parent_step_of_child", std::forward<Record>(r).parent_step_of_child);
  put(o, "received", std::forward<Record>(r).received);
  if (r.retry) {
    json rt(json::value_t::object);
    json::object_t& ro = rt.get_ref<json::object_t&>();
    put(ro, "attempt", r.retry->attempt);
    if (r.retry->compensation) put(ro, "compensation", true);
    put(ro, "step", r.retry->step);
    put(o, "retry", std::move(rt));
  }
  put_int("retry_at_us", r.retry_at_us);
  put_int("run", r.run);
  put_int("sleep_until_us", r.sleep_until_us);
  put_int("started_at_us", r.started_at_us);
  put(o, "status", r.status_name());
  if (r.stuck) {
    json st(json::value_t::object);
    json::object_t& so = st.get_ref<json::object_t&>();
    put(so, "at_us", r.stuck->at_us);
    put(so, "kind", r.stuck->kind_name());
    put(so, "reason", r.stuck->reason);
    put(so, "resumable", r.stuck->resumable);
    put(so, "status", r.stuck->status);
    put(o, "stuck", std::move(st));
  }
  put(o, "visits", counts_json(r.visits));
  put_int("wait_deadline_us", r.wait_deadline_us);
  put_text("wait_key", std::forward<Record>(r).wait_key);
  put(o, "workflow", std::forward<Record>(r).workflow);
  return j;
}

std::optional<std::string> instance_record::to_packed() const {
  if (!extra.empty() || !legacy_history.is_null()) return std::nullopt;
  packed::writer w;
  const auto text = [&](std::string_view key, std::string_view v) {
    w.key(key);
    w.string(v);
  };
  const auto integer = [&](std::string_view key, std::int64_t v) {
    w.key(key);
    w.integer(v);
  };
  const auto opt_text = [&](const char* key, const std::optional<std::string>& v) {
    if (v) text(key, *v);
  };
  const auto opt_int = [&](const char* key, const std::optional<std::int64_t>& v) {
    if (v) integer(key, *v);
  };
  const auto counts = [&](const char* key, const std::map<std::string, std::int64_t>& m) {
    w.key(key);
    w.begin_object();
    for (const auto& [k, v] : m) integer(k, v);
    w.end();
  };
  // In key order, as encode() writes them.
  w.begin_object();
  if (calls) counts("calls", *calls);
  if (cancelled) {
    w.key("cancelled");
    w.begin_object();
    integer("at_us", cancelled->at_us);
    text("reason", cancelled->reason);
    w.end();
  }
  opt_text("child", child);
  text("cursor", cursor);
  opt_int("deadline_us", deadline_us);
  w.key("definition");
  w.begin_object();
  text("name", definition_name);
  text("version", version);
  w.end();
  w.key("done");
  w.begin_array();
  for (const std::string& d : done) w.string(d);
  w.end();
  opt_int("ended_at_us", ended_at_us);
  text("error", error);
  if (fan_out) {
    w.key("fan_out");
    w.begin_object();
    text("base", fan_out->base);
    w.key("children");
    w.begin_object();
    for (const auto& [id, st] : fan_out->children) text(id, detail::status_name(st));
    w.end();
    text("kind", fan_out->kind);
    integer("next", fan_out->next);
    text("step", fan_out->step);
    integer("total", fan_out->total);
    w.end();
  }
  opt_int("history_base", history_base);
  opt_int("history_next", history_next);
  w.key("inputs");
  w.value(inputs);
  opt_text("parent", parent);
  opt_text("parent_step", parent_step);
  opt_text("parent_step_of_child", parent_step_of_child);
  w.key("received");
  w.value(received);
  if (retry) {
    w.key("retry");
    w.begin_object();
    integer("attempt", retry->attempt);
    if (retry->compensation) {
      w.key("compensation");
      w.boolean(true);
    }
    text("step", retry->step);
    w.end();
  }
  opt_int("retry_at_us", retry_at_us);
  opt_int("run", run);
  opt_int("sleep_until_us", sleep_until_us);
  integer("started_at_us", started_at_us);
  text("status", status_name());
  if (stuck) {
    w.key("stuck");
    w.begin_object();
    integer("at_us", stuck->at_us);
    text("kind", stuck->kind_name());
    text("reason", stuck->reason);
    w.key("resumable");
    w.boolean(stuck->resumable);
    text("status", stuck->status);
    w.end();
  }
  counts("visits", visits);
  opt_int("wait_deadline_us", wait_deadline_us);
  opt_text("wait_key", wait_key);
  text("workflow", workflow);
  w.end();
  if (!w.ok()) return std::nullopt;
  return std::move(w.bytes());
}

}  // namespace pop::detail
