// Defines pop::detail::inline_vec, a vector of at most N elements stored inside the object itself.
#pragma once

#include <cassert>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <new>
#include <utility>

namespace pop::detail {

// A sequence of at most N elements of T, stored inline: a B+-tree node holding its entries this
// way is one allocation, not two or three. The subset of std::vector's interface the tree uses;
// exceeding N is a bug (checked by assert). Iterators are plain pointers, invalidated by any
// insert or erase at or before them.
template <class T, std::size_t N>
class inline_vec {
 public:
  using value_type = T;
  using iterator = T*;
  using const_iterator = const T*;

  inline_vec() = default;
  inline_vec(const inline_vec& other) { assign(other.begin(), other.end()); }
  inline_vec& operator=(const inline_vec& other) {
    if (this != &other) assign(other.begin(), other.end());
    return *this;
  }
  inline_vec(inline_vec&&) = delete;
  inline_vec& operator=(inline_vec&&) = delete;
  ~inline_vec() { clear(); }

  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  static constexpr std::size_t capacity() { return N; }

  T* begin() { return data(); }
  T* end() { return data() + size_; }
  const T* begin() const { return data(); }
  const T* end() const { return data() + size_; }
  T& operator[](std::size_t i) { return data()[i]; }
  const T& operator[](std::size_t i) const { return data()[i]; }
  T& front() { return data()[0]; }
  const T& front() const { return data()[0]; }

  void clear() {
    std::destroy(begin(), end());
    size_ = 0;
  }

  void push_back(T value) {
    assert(size_ < N);
    std::construct_at(data() + size_, std::move(value));
    ++size_;
  }

  // Replaces the contents with copies (or, through move iterators, moves) of [first, last).
  template <class It>
  void assign(It first, It last) {
    clear();
    for (; first != last; ++first) push_back(*first);
  }
  void assign(std::initializer_list<T> values) { assign(values.begin(), values.end()); }

  // Inserts `value` before `pos`.
  T* insert(T* pos, T value) {
    assert(size_ < N);
    const std::size_t at = static_cast<std::size_t>(pos - begin());
    if (at == size_) {
      push_back(std::move(value));
      return begin() + at;
    }
    // Shift [at, size) one place right, then assign the freed slot.
    std::construct_at(end(), std::move(*(end() - 1)));
    std::move_backward(begin() + at, end() - 1, end());
    ++size_;
    data()[at] = std::move(value);
    return begin() + at;
  }

  // Erases the element at `pos`.
  T* erase(T* pos) {
    std::move(pos + 1, end(), pos);
    std::destroy_at(end() - 1);
    --size_;
    return pos;
  }

  // Shrinks to the first `n` elements (n <= size()).
  void resize(std::size_t n) {
    assert(n <= size_);
    std::destroy(begin() + n, end());
    size_ = n;
  }

 private:
  T* data() { return reinterpret_cast<T*>(storage_); }
  const T* data() const { return reinterpret_cast<const T*>(storage_); }

  alignas(T) unsigned char storage_[N * sizeof(T)];
  std::size_t size_ = 0;
};

}  // namespace pop::detail
