#include "pop/engine/subscription.hpp"

#include <utility>

namespace pop {
namespace detail {

std::uint64_t commit_listeners::add(std::function<void(std::uint64_t)> fn) {
  std::unique_lock lock(mu_);
  const std::uint64_t id = next_id_++;
  fns_.emplace(id, std::move(fn));
  return id;
}

void commit_listeners::remove(std::uint64_t id) {
  std::unique_lock lock(mu_);
  fns_.erase(id);
}

void commit_listeners::notify(std::uint64_t version) const {
  std::shared_lock lock(mu_);
  for (const auto& [id, fn] : fns_) fn(version);
}

bool commit_listeners::empty() const {
  std::shared_lock lock(mu_);
  return fns_.empty();
}

subscription subscribe(const std::shared_ptr<commit_listeners>& listeners,
                       std::function<void(std::uint64_t)> fn) {
  return subscription(listeners, listeners->add(std::move(fn)));
}

}  // namespace detail

subscription::subscription(subscription&& other) noexcept
    : listeners_(std::move(other.listeners_)), id_(other.id_) {
  other.listeners_.reset();
}

subscription& subscription::operator=(subscription&& other) noexcept {
  if (this != &other) {
    reset();
    listeners_ = std::move(other.listeners_);
    id_ = other.id_;
    other.listeners_.reset();
  }
  return *this;
}

void subscription::reset() {
  if (auto l = listeners_.lock()) l->remove(id_);
  listeners_.reset();
}

}  // namespace pop
