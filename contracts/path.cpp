#include "pop/contracts/path.hpp"

#include <algorithm>
#include <array>
#include <string>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"

namespace pop {
namespace {

// The characters a segment may hold, by byte: letters, digits, '_' and '-'.
constexpr std::array<bool, 256> segment_chars = [] {
  std::array<bool, 256> table{};
  for (int c = 0; c < 256; ++c) {
    table[static_cast<std::size_t>(c)] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                                         (c >= '0' && c <= '9') || c == '_' || c == '-';
  }
  return table;
}();

bool is_segment_char(char c) {
  return segment_chars[static_cast<unsigned char>(c)];
}

// Maps '.' below every other character so plain character order becomes segment-wise order.
unsigned char rank(char c) {
  return c == '.' ? 0 : static_cast<unsigned char>(c);
}

}  // namespace

absl::Status validate_segment(std::string_view segment) {
  if (segment.empty()) return absl::InvalidArgumentError("path segment is empty");
  if (segment.size() > max_segment_length) {
    return absl::InvalidArgumentError(
        absl::StrCat("path segment '", detail::to_absl(segment.substr(0, 32)),
                     "...' is longer than ", max_segment_length, " characters"));
  }
  for (std::size_t i = 0; i < segment.size(); ++i) {
    if (!is_segment_char(segment[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("path segment '", detail::to_absl(segment), "' has character '",
                       absl::string_view(&segment[i], 1), "' at offset ", i,
                       "; segments may hold only letters, digits, '_' and '-'"));
    }
  }
  return absl::OkStatus();
}

namespace {

// Whether `text` is a valid path, in one pass over its characters (the usual case: a fault is
// then described by check_path_text).
bool valid_path_text(std::string_view text) {
  const std::size_t n = text.size();
  if (n == 0 || n > max_path_length) return false;
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  std::size_t depth = 1;
  std::size_t start = 0;  // where the current segment starts
  // A dot at `i`: the segment before it must be 1 to max_segment_length characters.
  const auto dot = [&](std::size_t i) {
    if (i == start || i - start > max_segment_length) return false;
    ++depth;
    start = i + 1;
    return true;
  };
  std::size_t i = 0;
#if defined(__SSE2__)
  // Sixteen bytes at a time: which are segment characters and which are dots, as bit masks.
  // (Signed byte comparisons: bytes from 0x80 up are negative and match no range.)
  const auto in_range = [](__m128i v, char lo, char hi) {
    return _mm_and_si128(_mm_cmpgt_epi8(v, _mm_set1_epi8(static_cast<char>(lo - 1))),
                         _mm_cmplt_epi8(v, _mm_set1_epi8(static_cast<char>(hi + 1))));
  };
  for (; i + 16 <= n; i += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i letter = in_range(_mm_or_si128(v, _mm_set1_epi8(0x20)), 'a', 'z');
    const __m128i digit = in_range(v, '0', '9');
    const __m128i other =
        _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('_')), _mm_cmpeq_epi8(v, _mm_set1_epi8('-')));
    const __m128i dots = _mm_cmpeq_epi8(v, _mm_set1_epi8('.'));
    const auto segment =
        static_cast<unsigned>(_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(letter, digit), other)));
    auto dot_bits = static_cast<unsigned>(_mm_movemask_epi8(dots));
    if ((segment | dot_bits) != 0xffffu) return false;
    for (; dot_bits != 0; dot_bits &= dot_bits - 1) {
      if (!dot(i + static_cast<std::size_t>(__builtin_ctz(dot_bits)))) return false;
    }
  }
#endif
  // Each byte: 1 a segment character, 2 a dot, 0 neither.
  static constexpr std::array<unsigned char, 256> kind = [] {
    std::array<unsigned char, 256> table{};
    for (std::size_t c = 0; c < 256; ++c) table[c] = segment_chars[c] ? 1 : 0;
    table['.'] = 2;
    return table;
  }();
  for (; i < n; ++i) {
    const unsigned char k = kind[s[i]];
    if (k == 1) continue;
    if (k == 0 || !dot(i)) return false;
  }
  return n != start && n - start <= max_segment_length && depth <= max_path_depth;
}

// OK if `text` is a valid path, else kInvalidArgument saying what is wrong.
absl::Status check_path_text(std::string_view text) {
  if (valid_path_text(text)) return absl::OkStatus();
  const auto quoted = [&] {
    return absl::StrCat("invalid path '", detail::to_absl(text.substr(0, 64)),
                        text.size() > 64 ? "...'" : "'");
  };
  if (text.empty())
    return absl::InvalidArgumentError("invalid path '': a path needs at least one segment");
  if (text.size() > max_path_length) {
    return absl::InvalidArgumentError(
        absl::StrCat(quoted(), ": ", text.size(), " characters, the limit is ", max_path_length));
  }
  std::size_t depth = 0;
  std::string_view rest = text;
  while (true) {
    const std::size_t dot = rest.find('.');
    const std::string_view segment = rest.substr(0, dot);
    ++depth;
    if (segment.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(quoted(), ": segment ", depth, " is empty"));
    }
    if (absl::Status s = validate_segment(segment); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(quoted(), ": ", s.message()));
    }
    if (dot == std::string_view::npos) break;
    rest.remove_prefix(dot + 1);
    if (rest.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(quoted(), ": segment ", depth + 1, " is empty"));
    }
  }
  if (depth > max_path_depth) {
    return absl::InvalidArgumentError(
        absl::StrCat(quoted(), ": ", depth, " segments, the limit is ", max_path_depth));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<path> path::parse(std::string_view text) {
  POP_RETURN_IF_ERROR(check_path_text(text));
  return path(std::string(text));
}

absl::StatusOr<path> path::parse(std::string&& text) {
  POP_RETURN_IF_ERROR(check_path_text(text));
  return path(std::move(text));
}

std::size_t path::depth() const {
  return static_cast<std::size_t>(std::count(text_.begin(), text_.end(), '.')) + 1;
}

std::vector<std::string_view> path::segments() const {
  std::vector<std::string_view> out;
  std::string_view rest = text_;
  while (!rest.empty()) out.push_back(detail::take_segment(rest));
  return out;
}

absl::StatusOr<path> path::child(std::string_view segment) const {
  // One segment: "a.b" would be two, and is refused rather than read as a deeper path.
  if (absl::Status s = validate_segment(segment); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid child of '", text_, "': ", s.message()));
  }
  const std::size_t length = text_.size() + 1 + segment.size();
  if (length > max_path_length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "invalid child '", detail::to_absl(segment.substr(0, 64)), "' of '", text_.substr(0, 64),
        "': ", length, " characters, the limit is ", max_path_length));
  }
  if (depth() + 1 > max_path_depth) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid child '", detail::to_absl(segment), "' of '", text_.substr(0, 64),
                     "': ", depth() + 1, " segments, the limit is ", max_path_depth));
  }
  std::string text;
  text.reserve(length);
  text += text_;
  text += '.';
  text += segment;
  return path(std::move(text));
}

bool path::contains(const path& other) const {
  return detail::path_contains(text_, other.text_);
}

bool path::overlaps(const path& other) const {
  return detail::path_contains(text_, other.text_) || detail::path_contains(other.text_, text_);
}

bool operator<(const path& a, const path& b) {
  return detail::compare_paths(a.text_, b.text_) < 0;
}

namespace detail {

int compare_paths(std::string_view a, std::string_view b) {
  const std::size_t n = std::min(a.size(), b.size());
  for (std::size_t i = 0; i < n; ++i) {
    const unsigned char x = rank(a[i]);
    const unsigned char y = rank(b[i]);
    if (x != y) return x < y ? -1 : 1;
  }
  if (a.size() == b.size()) return 0;
  return a.size() < b.size() ? -1 : 1;
}

bool path_contains(std::string_view a, std::string_view b) {
  if (b.size() < a.size() || b.substr(0, a.size()) != a) return false;
  return b.size() == a.size() || b[a.size()] == '.';
}

std::string_view take_segment(std::string_view& rest) {
  const std::size_t dot = rest.find('.');
  const std::string_view segment = rest.substr(0, dot);
  rest = dot == std::string_view::npos ? std::string_view() : rest.substr(dot + 1);
  return segment;
}

}  // namespace detail

path_set::path_set(std::initializer_list<path> paths) {
  for (const path& p : paths) insert(p);
}

void path_set::insert(const path& p) {
  const auto it = std::lower_bound(paths_.begin(), paths_.end(), p);
  if (it != paths_.end() && *it == p) return;
  paths_.insert(it, p);
}

void path_set::insert(path&& p) {
  const auto it = std::lower_bound(paths_.begin(), paths_.end(), p);
  if (it != paths_.end() && *it == p) return;
  if (paths_.capacity() == 0) {  // one allocation for the usual few (a process's reads)
    paths_.reserve(4);
    paths_.push_back(std::move(p));
    return;
  }
  paths_.insert(it, std::move(p));
}

void path_set::insert_all(const path_set& other) {
  if (other.empty()) return;
  std::vector<path> merged;
  merged.reserve(paths_.size() + other.paths_.size());
  std::set_union(paths_.begin(), paths_.end(), other.paths_.begin(), other.paths_.end(),
                 std::back_inserter(merged));
  paths_ = std::move(merged);
}

const path* path_set::find(std::string_view text) const {
  // (Few members, as a process's reads usually are: compared one by one.)
  if (paths_.size() <= 8) {
    for (const path& m : paths_) {
      if (m.str() == text) return &m;
    }
    return nullptr;
  }
  const auto it = std::lower_bound(
      paths_.begin(), paths_.end(), text,
      [](const path& m, std::string_view t) { return detail::compare_paths(m.str(), t) < 0; });
  return it != paths_.end() && it->str() == text ? &*it : nullptr;
}

bool path_set::covers(const path& p) const {
  return covers(std::string_view(p.str()));
}

bool path_set::covers(std::string_view text) const {
  // A small set (a process's contract, typically) is cheaper to compare one by one.
  if (paths_.size() <= 8) {
    for (const path& m : paths_) {
      if (detail::path_contains(m.str(), text)) return true;
    }
    return false;
  }
  // An ancestor of p sorts at or before p; check each prefix of p by exact search.
  std::size_t end = 0;
  while (true) {
    end = text.find('.', end);
    const std::string_view prefix = text.substr(0, end);
    const auto it = std::lower_bound(
        paths_.begin(), paths_.end(), prefix,
        [](const path& m, std::string_view t) { return detail::compare_paths(m.str(), t) < 0; });
    if (it != paths_.end() && it->str() == prefix) return true;
    if (end == std::string_view::npos) return false;
    ++end;
  }
}

bool path_set::overlaps(const path& p) const {
  return overlaps(std::string_view(p.str()));
}

bool path_set::overlaps(std::string_view text) const {
  // A small set (a process's access, typically) is cheaper to compare one by one than to search.
  if (paths_.size() <= 8) {
    for (const path& m : paths_) {
      if (detail::path_contains(m.str(), text) || detail::path_contains(text, m.str())) return true;
    }
    return false;
  }
  if (covers(text)) return true;
  // Descendants of p form a contiguous run directly after where p would sort.
  const auto it = std::lower_bound(
      paths_.begin(), paths_.end(), text,
      [](const path& m, std::string_view t) { return detail::compare_paths(m.str(), t) < 0; });
  return it != paths_.end() && detail::path_contains(text, it->str());
}

bool path_set::overlaps(const path_set& other) const {
  const path_set& small = size() <= other.size() ? *this : other;
  const path_set& large = size() <= other.size() ? other : *this;
  for (const path& p : small) {
    if (large.overlaps(p)) return true;
  }
  return false;
}

std::string path_set::to_string() const {
  std::string out = "[";
  for (std::size_t i = 0; i < paths_.size(); ++i) {
    if (i > 0) out += ", ";
    out += paths_[i].str();
  }
  out += "]";
  return out;
}

absl::StatusOr<path> parse_path_outside(std::string_view text, const path& outbox,
                                        std::string_view what) {
  absl::StatusOr<path> p = path::parse(text);
  if (!p.ok()) return annotate(p.status(), what);
  if (p->overlaps(outbox)) {
    return absl::InvalidArgumentError(absl::StrCat(detail::to_absl(what), " '", p->str(),
                                                   "' overlaps the outbox at '", outbox.str(),
                                                   "'; choose a path outside it"));
  }
  return p;
}

}  // namespace pop
