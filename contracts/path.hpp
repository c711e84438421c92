// Defines pop::path (a validated dotted path into the state) and pop::path_set (overlap queries).
#pragma once

#include <cstddef>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace pop {

// Limits on paths; a longer or deeper path is rejected with kInvalidArgument.
inline constexpr std::size_t max_path_length = 1024;
inline constexpr std::size_t max_path_depth = 32;
inline constexpr std::size_t max_segment_length = 128;

// Returns OK if `segment` is a valid path segment: 1 to max_segment_length characters, each a
// letter, digit, '_' or '-'. Otherwise kInvalidArgument saying which character is wrong.
absl::Status validate_segment(std::string_view segment);

// A validated dotted path into the state, such as "domain.orders.o-17.status".
//
// Invariant: the text is one or more valid segments joined by '.', at most max_path_length
// characters and max_path_depth segments. Paths order segment-wise ("a" < "a.b" < "a-b"), so a
// path sorts directly before all of its descendants. A value type: cheap to copy, immutable.
class path {
 public:
  // Returns the parsed path, or kInvalidArgument naming the text and what is wrong with it (empty
  // path, empty segment, bad character, too long, too deep).
  [[nodiscard]] static absl::StatusOr<path> parse(std::string_view text);
  // The same, keeping `text`'s buffer for the path (no copy). `text` is left as it was on error.
  [[nodiscard]] static absl::StatusOr<path> parse(std::string&& text);
  [[nodiscard]] static absl::StatusOr<path> parse(const std::string& text) {
    return parse(std::string_view(text));
  }
  [[nodiscard]] static absl::StatusOr<path> parse(const char* text) {
    return parse(std::string_view(text));
  }
  // `text` as a path, keeping its buffer and not checked again, if it is `valid`'s text (so it is
  // valid too); nothing (and `text` as it was) otherwise.
  [[nodiscard]] static std::optional<path> same_as(std::string&& text, const path& valid) {
    if (text != valid.text_) return std::nullopt;
    return path(std::move(text));
  }

  // The text form, e.g. "domain.orders".
  const std::string& str() const { return text_; }
  // The number of segments (>= 1).
  std::size_t depth() const;
  // The segments, in order; views into this path's text.
  std::vector<std::string_view> segments() const;
  // Returns this path extended by `segment`, or kInvalidArgument if the segment is invalid or the
  // result would exceed the limits.
  [[nodiscard]] absl::StatusOr<path> child(std::string_view segment) const;

  // True if this path equals `other` or is an ancestor of it ("a.b" contains "a.b" and "a.b.c",
  // not "a.bc").
  bool contains(const path& other) const;
  // True if one of the two paths contains the other: writing one can change what the other reads.
  bool overlaps(const path& other) const;

  friend bool operator==(const path& a, const path& b) { return a.text_ == b.text_; }
  friend bool operator<(const path& a, const path& b);

 private:
  explicit path(std::string text) : text_(std::move(text)) {}
  std::string text_;
};

// Returns `text` parsed as a path that neither contains nor lies inside `outbox` (where a
// component keeps its own records: an inbox, dead letters), or kInvalidArgument naming `what`
// and saying why.
[[nodiscard]] absl::StatusOr<path> parse_path_outside(std::string_view text, const path& outbox,
                                                      std::string_view what);

namespace detail {
// Segment-wise three-way comparison of two valid path texts.
int compare_paths(std::string_view a, std::string_view b);
// True if path text `a` equals or is an ancestor of path text `b`.
bool path_contains(std::string_view a, std::string_view b);
// Splits the first segment off `rest` and returns it; `rest` becomes the remainder (empty at end).
std::string_view take_segment(std::string_view& rest);
}  // namespace detail

// A set of paths with prefix-aware queries.
//
// Invariant: members are sorted segment-wise and unique, so the descendants of any path form one
// contiguous run. Queries cost O(depth * log n). A value type.
class path_set {
 public:
  path_set() = default;
  path_set(std::initializer_list<path> paths);

  // Adds `p` (no effect if already present).
  void insert(const path& p);
  void insert(path&& p);
  // Adds every member of `other`.
  void insert_all(const path_set& other);

  // The member whose text is `text`, or nullptr.
  const path* find(std::string_view text) const;
  // True if some member contains `p` (equals it or is its ancestor): `p` is covered by the set.
  bool covers(const path& p) const;
  // The same for a path's text (a valid path, as path::str() gives).
  bool covers(std::string_view path_text) const;
  // True if some member overlaps `p` (is its ancestor, equal, or its descendant).
  bool overlaps(const path& p) const;
  // The same for a path's text (a valid path, as path::str() gives).
  bool overlaps(std::string_view path_text) const;
  // True if any member of `other` overlaps a member of this set.
  bool overlaps(const path_set& other) const;

  bool empty() const { return paths_.empty(); }
  std::size_t size() const { return paths_.size(); }
  auto begin() const { return paths_.begin(); }
  auto end() const { return paths_.end(); }
  // The members joined as "[a, b.c]" for error messages.
  std::string to_string() const;

  friend bool operator==(const path_set& a, const path_set& b) { return a.paths_ == b.paths_; }

 private:
  std::vector<path> paths_;
};

}  // namespace pop
