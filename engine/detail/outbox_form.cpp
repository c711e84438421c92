#include "pop/engine/detail/outbox_form.hpp"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pop/contracts/outbox_message.hpp"
#include "pop/contracts/status.hpp"

namespace pop::detail {
namespace {

constexpr std::string_view reserved_fields[] = {"id", "topic", "key", "headers", "payload"};

bool is_reserved(std::string_view field) {
  for (const std::string_view r : reserved_fields) {
    if (field == r) return true;
  }
  return false;
}

bool has_id(const json& entry) {
  const auto id = entry.find("id");
  return id != entry.end() && !(id->is_string() && id->get_ref<const std::string&>().empty());
}

// OK if `value` is the stored form of a message whose id is `id`.
absl::Status check_stored(const json& value, std::string_view id, std::string_view who) {
  absl::StatusOr<outbox_message> m = outbox_message::from_json(value);
  if (!m.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        to_absl(who), " wrote pending message '", to_absl(id),
        "' in a form the relay cannot read (", m.status().message(),
        "); write the message as read from the outbox, or append a new one without an id"));
  }
  if (m->id != id) {
    return absl::InvalidArgumentError(absl::StrCat(to_absl(who), " wrote a message with id '",
                                                   m->id, "' at outbox entry '", to_absl(id),
                                                   "'; a message's id is its entry's name"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<message_draft> draft_from_entry(const json& entry, std::string_view who) {
  const auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat(to_absl(who), " wrote a new outbox entry ", to_absl(why)));
  };
  if (!entry.is_object()) {
    return bad(absl::StrCat("that is ", to_absl(type_with_article(entry)),
                            ", not a message object such as {\"topic\": \"t\", ...}"));
  }
  message_draft m;
  const auto topic = entry.find("topic");
  if (topic == entry.end() || !topic->is_string() || topic->get_ref<const std::string&>().empty()) {
    return bad("without a non-empty string 'topic'");
  }
  m.topic = topic->get<std::string>();
  if (const auto key = entry.find("key"); key != entry.end()) {
    if (!key->is_string()) return bad("whose 'key' is not a string");
    m.key = key->get<std::string>();
  }
  if (const auto headers = entry.find("headers"); headers != entry.end()) {
    if (!headers->is_object()) return bad("whose 'headers' is not an object of strings");
    for (const auto& [name, value] : headers->items()) {
      if (!value.is_string()) return bad(absl::StrCat("whose header '", name, "' is not a string"));
      m.headers.emplace(name, value.get<std::string>());
    }
  }
  std::vector<std::string> others;
  for (const auto& [field, value] : entry.items()) {
    if (!is_reserved(field)) others.push_back(field);
  }
  if (const auto payload = entry.find("payload"); payload != entry.end()) {
    if (!others.empty()) {
      return bad(absl::StrCat("with both 'payload' and other fields (", absl::StrJoin(others, ", "),
                              "); put them inside 'payload', or leave 'payload' out so the other "
                              "fields become the payload"));
    }
    m.payload = *payload;
  } else {
    m.payload = json::object();
    for (const std::string& field : others) m.payload[field] = entry[field];
  }
  return m;
}

absl::StatusOr<outbox_changes> diff_outbox(const std::optional<json>& queue,
                                           const value_view& pending, std::uint64_t based_on,
                                           std::string_view who) {
  if (!queue) {
    return absl::InvalidArgumentError(absl::StrCat(
        to_absl(who), " deleted the outbox; write [] to remove the pending messages it saw"));
  }
  if (!queue->is_array() && !queue->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(to_absl(who), " wrote the outbox as ", to_absl(type_with_article(*queue)),
                     "; write a list of messages (new ones without an id), or [] to clear it"));
  }
  outbox_changes out;
  absl::flat_hash_set<std::string> kept;
  for (const json& e : *queue) {
    if (!e.is_object() || !has_id(e)) {
      POP_ASSIGN_OR_RETURN(message_draft m, draft_from_entry(e, who));
      out.appends.push_back(std::move(m));
      continue;
    }
    const json& id = e["id"];
    if (!id.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(to_absl(who), " wrote an outbox entry whose id is ",
                       to_absl(type_with_article(id)), ", not a string"));
    }
    const std::string& key = id.get_ref<const std::string&>();
    const value_view stored = pending.member(key);
    if (!stored) {
      return absl::InvalidArgumentError(
          absl::StrCat(to_absl(who), " wrote outbox entry '", key,
                       "', which is not pending; new messages are written without an id"));
    }
    if (!kept.insert(key).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(to_absl(who), " wrote outbox entry '", key, "' twice"));
    }
    if (stored.to_json() != e) {
      POP_RETURN_IF_ERROR(check_stored(e, key, who));
      out.updates.emplace_back(key, e);
    }
  }
  pending.for_each_member([&](std::string_view id, const value_view&) {
    if (kept.contains(to_absl(id))) return true;
    // A message committed after the version the write was based on was not seen: keep it.
    const absl::StatusOr<std::pair<std::uint64_t, std::uint32_t>> parsed = parse_message_id(id);
    if (parsed.ok() && parsed->first > based_on) return true;
    out.removals.emplace_back(id);
    return true;
  });
  return out;
}

absl::Status check_message_write(const path& target, const path& outbox,
                                 const std::optional<json>& value, std::string_view who) {
  if (target.depth() != outbox.depth() + 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        to_absl(who), " wrote '", target.str(), "', inside a pending message of the outbox '",
        outbox.str(), "'; write the whole message at '", outbox.str(), ".<id>' instead"));
  }
  const std::string_view id = target.segments().back();
  if (!parse_message_id(id).ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        to_absl(who), " wrote '", target.str(), "': outbox entries are named by message ids, and '",
        to_absl(id),
        "' is not one; append new messages with emit (or a list entry without an id)"));
  }
  if (!value) return absl::OkStatus();
  return check_stored(*value, id, who);
}

absl::StatusOr<json> initial_outbox(json state, const path& outbox, std::int64_t now_us,
                                    std::optional<std::uint64_t> newest,
                                    std::uint64_t* newest_seen) {
  json* at = &state;
  for (const std::string_view segment : outbox.segments()) {
    if (!at->is_object()) break;
    const auto it = at->find(segment);
    if (it == at->end()) return state;
    at = &*it;
  }
  const std::string who = absl::StrCat("options.initial_state at '", outbox.str(), "'");
  if (at->is_array()) {
    json stored = json::object();
    std::uint32_t index = 0;
    for (const json& e : *at) {
      POP_ASSIGN_OR_RETURN(message_draft m, draft_from_entry(e, who));
      outbox_message msg;
      msg.id = make_message_id(0, index++);
      msg.topic = std::move(m.topic);
      msg.key = std::move(m.key);
      msg.payload = std::move(m.payload);
      msg.headers = std::move(m.headers);
      msg.created_at_us = now_us;
      stored[msg.id] = std::move(msg).to_json();
    }
    *at = std::move(stored);
    return state;
  }
  if (!at->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        who, " holds ", to_absl(type_with_article(*at)),
        ", not an outbox; leave it out or seed it as [] (an empty outbox) or a list of messages"));
  }
  for (const auto& [id, m] : at->items()) {
    const auto parsed = parse_message_id(id);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          who, " holds entry '", id, "', which is not a message id; seed new messages as a list"));
    }
    if (newest && parsed->first > *newest) {
      return absl::InvalidArgumentError(absl::StrCat(
          who, " holds entry '", id, "' of version ", parsed->first, ", after the state's version ",
          *newest,
          " (ids of later versions are given to emitted messages); seed new messages as "
          "a list"));
    }
    if (newest_seen) *newest_seen = std::max(*newest_seen, parsed->first);
    POP_RETURN_IF_ERROR(check_stored(m, id, who));
  }
  return state;
}

}  // namespace pop::detail
