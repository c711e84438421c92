#include "pop/engine/audit_log.hpp"

#include <algorithm>

namespace pop {

std::string_view to_string(attempt_outcome outcome) {
  switch (outcome) {
    case attempt_outcome::committed:
      return "committed";
    case attempt_outcome::conflict_retried:
      return "conflict_retried";
    case attempt_outcome::aborted:
      return "aborted";
    case attempt_outcome::contract_violation:
      return "contract_violation";
    case attempt_outcome::failed:
      return "failed";
  }
  return "unknown";
}

void audit_log::append(audit_record record) {
  if (capacity_ == 0) return;
  std::unique_lock lock(mu_);
  record.sequence = next_sequence_++;
  if (records_.size() == capacity_) records_.pop_front();
  records_.push_back(std::move(record));
}

std::vector<audit_record> audit_log::query(const audit_query& q) const {
  std::vector<audit_record> out;
  std::unique_lock lock(mu_);
  for (auto it = records_.rbegin(); it != records_.rend() && out.size() < q.limit; ++it) {
    if (it->sequence <= q.after_sequence) break;
    if (!q.process.empty() && it->process != q.process) continue;
    if (q.outcome && it->outcome != *q.outcome) continue;
    out.push_back(*it);
  }
  std::reverse(out.begin(), out.end());
  return out;
}

}  // namespace pop
