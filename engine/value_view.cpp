#include "pop/engine/value_view.hpp"

#include "pop/engine/detail/packed.hpp"
#include "pop/engine/detail/tree.hpp"

#include "pop/contracts/path.hpp"

namespace pop {

detail::location value_view::location() const {
  return {node_.get(), inner_, packed_};
}

const json* value_view::direct() const {
  if (!node_) return nullptr;
  return detail::stored_json(location());
}

const outbox_message* value_view::message() const {
  return node_ && !inner_ && !packed_ ? node_->message() : nullptr;
}

bool value_view::message_into(outbox_message& into) const {
  if (!node_ || inner_ || packed_ || !node_->is_message()) return false;
  node_->message_into(into);
  return true;
}

std::optional<value_view::message_schedule> value_view::schedule() const {
  if (!node_ || inner_ || packed_ || !node_->is_message()) return std::nullopt;
  return node_->schedule();
}

std::optional<outbox_message> value_view::typed_message() const {
  if (!node_ || inner_ || packed_ || !node_->is_message()) return std::nullopt;
  return node_->message_copy();
}

bool value_view::is_object() const {
  return node_ && location().is_object();
}

std::size_t value_view::size() const {
  if (!node_) return 0;
  return detail::size_of(location());
}

std::optional<std::string_view> value_view::as_string() const {
  if (!node_) return std::nullopt;
  if (const char* p = location().packed_value()) return detail::packed::string_at(p);
  if (const json* j = direct()) {
    if (const auto* s = j->get_ptr<const std::string*>()) return std::string_view(*s);
  }
  return std::nullopt;
}

std::optional<std::int64_t> value_view::as_integer() const {
  if (!node_) return std::nullopt;
  if (const char* p = location().packed_value()) return detail::packed::integer_at(p);
  if (const json* j = direct(); j != nullptr && j->is_number_integer()) {
    return j->get<std::int64_t>();
  }
  return std::nullopt;
}

value_view value_view::member(std::string_view key) const {
  if (!node_) return {};
  if (const char* p = location().packed_value()) {
    const char* found = detail::packed::member(p, key);
    if (!found) return {};
    return value_view(node_, nullptr, found);
  }
  if (const json* j = direct()) {
    if (!j->is_object()) return {};
    const auto& object = j->get_ref<const json::object_t&>();
    const auto it = object.find(key);
    if (it == object.end()) return {};
    return value_view(node_, &it->second);
  }
  const detail::node_ptr* child = node_->members().find(key);
  if (!child) return {};
  return value_view(*child, nullptr);
}

value_view value_view::at(std::string_view relative) const {
  if (!node_ || relative.empty()) return *this;
  // Descends as member() does, but takes a reference only to the node the result is in (one per
  // level would be an atomic increment and decrement each).
  const detail::node_ptr* holder = &node_;
  const json* inner = inner_;
  const char* packed = packed_;
  while (!relative.empty()) {
    const std::string_view key = detail::take_segment(relative);
    const detail::location here{holder->get(), inner, packed};
    if (const char* p = here.packed_value()) {
      packed = detail::packed::member(p, key);
      if (!packed) return {};
      inner = nullptr;
      continue;
    }
    if (const json* j = detail::stored_json(here)) {
      if (!j->is_object()) return {};
      const auto& object = j->get_ref<const json::object_t&>();
      const auto it = object.find(key);
      if (it == object.end()) return {};
      inner = &it->second;
      packed = nullptr;
      continue;
    }
    holder = (*holder)->members().find(key);
    if (!holder) return {};
    inner = nullptr;
    packed = nullptr;
  }
  return value_view(*holder, inner, packed);
}

void value_view::for_each_member(
    absl::FunctionRef<bool(std::string_view key, const value_view& member)> visit,
    std::string_view from) const {
  if (!node_) return;
  // Members inside this node's value share one view, moved from member to member (a view per
  // member would take a reference to the node each: a visible part of reading a record).
  if (const char* p = location().packed_value()) {
    value_view m(node_, nullptr, nullptr);
    detail::packed::for_each_member(p, from, [&](std::string_view key, const char* value) {
      m.packed_ = value;
      return visit(key, m);
    });
    return;
  }
  if (const json* j = direct()) {
    if (!j->is_object()) return;
    const auto& object = j->get_ref<const json::object_t&>();
    value_view m(node_, nullptr);
    for (auto it = object.lower_bound(from); it != object.end(); ++it) {
      m.inner_ = &it->second;
      if (!visit(it->first, m)) return;
    }
    return;
  }
  const auto end = node_->members().end();
  for (auto it = node_->members().lower_bound(from); it != end; ++it) {
    if (!visit(it.key(), value_view(it.value(), nullptr))) return;
  }
}

std::vector<std::string> value_view::keys() const {
  std::vector<std::string> out;
  out.reserve(size());
  for_each_member([&](std::string_view key, const value_view&) {
    out.emplace_back(key);
    return true;
  });
  return out;
}

json value_view::to_json() const {
  if (!node_) return nullptr;
  return detail::materialise(location());
}

}  // namespace pop
