#include "pop/engine/detail/commit_log.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>

#include "absl/strings/str_cat.h"
#include "pop/contracts/status.hpp"
#include "pop/engine/detail/journal_format.hpp"

namespace pop::detail {
namespace {

constexpr std::size_t header_bytes = 64;  // the file's header; the ring follows
constexpr std::size_t head_bytes = 64;    // a record's head
constexpr char magic[8] = {'p', 'o', 'p', '-', 'l', 'o', 'g', '1'};
constexpr std::uint32_t kind_record = 1;
constexpr std::uint32_t kind_padding = 2;

// The file header's fields (offsets): magic 0, capacity 8, epoch 16, tail 24.
constexpr std::size_t at_capacity = 8;
constexpr std::size_t at_epoch = 16;
constexpr std::size_t at_tail = 24;

// A record's head, as stored (offsets in the comments); `check` covers the 56 bytes before it.
struct record_head {
  std::uint64_t abs = 0;           // 0
  std::uint32_t epoch = 0;         // 8
  std::uint32_t kind = 0;          // 12
  std::uint32_t size = 0;          // 16: head and fields, 8-aligned
  std::uint32_t process_len = 0;   // 20
  std::uint32_t writes_len = 0;    // 24
  std::uint32_t messages_len = 0;  // 28
  std::uint64_t version = 0;       // 32
  std::int64_t at_us = 0;          // 40
  std::int64_t checksum = 0;       // 48
  std::int64_t check = 0;          // 56
};
static_assert(sizeof(record_head) == head_bytes);

template <typename T>
T load_at(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

std::int64_t head_check(const record_head& h) {
  return bytes_checksum(std::string_view(reinterpret_cast<const char*>(&h), 56));
}

absl::Status io_error(const std::string& path, const char* what) {
  return absl::UnavailableError(
      absl::StrCat("commit log '", path, "': ", what, ": ", std::strerror(errno)));
}

// The head at absolute offset `abs` of a ring, if it is a valid head written there in `epoch`.
std::optional<record_head> head_at(const char* ring, std::size_t capacity, std::uint32_t epoch,
                                   std::uint64_t abs) {
  const std::size_t pos = abs % capacity;
  if (capacity - pos < head_bytes) return std::nullopt;
  const auto h = load_at<record_head>(ring + pos);
  if (h.abs != abs || h.epoch != epoch || h.check != head_check(h) || h.size < head_bytes ||
      h.size > capacity - pos || h.size % 8 != 0) {
    return std::nullopt;
  }
  return h;
}

// The valid records of a ring from `tail` on (see commit_log) into `out.entries`, and where a
// record that does not check is followed by one that does (`out.damaged_at`).
void scan(const char* ring, std::size_t capacity, std::uint64_t tail, commit_log::contents& out) {
  std::uint64_t abs = tail;
  while (abs - tail < capacity) {
    const std::size_t room = capacity - abs % capacity;
    if (room < head_bytes) {  // the implicit padding of a ring's last bytes
      abs += room;
      continue;
    }
    const std::optional<record_head> h = head_at(ring, capacity, out.epoch, abs);
    if (!h || abs - tail + h->size > capacity) break;
    if (h->kind == kind_record) {
      const std::uint64_t fields =
          std::uint64_t{h->process_len} + h->writes_len + std::uint64_t{h->messages_len};
      if (head_bytes + fields > h->size) break;
      const char* p = ring + abs % capacity + head_bytes;
      commit_log::entry e;
      e.version = h->version;
      e.at_us = h->at_us;
      e.process.assign(p, h->process_len);
      e.writes.assign(p + h->process_len, h->writes_len);
      e.messages.assign(p + h->process_len + h->writes_len, h->messages_len);
      e.checksum = h->checksum;
      if (!record_checksum_matches(e.checksum, static_cast<std::int64_t>(e.version), e.at_us,
                                   e.process, e.writes, e.messages)) {
        break;
      }
      out.entries.push_back(std::move(e));
    } else if (h->kind != kind_padding) {
      break;
    }
    abs += h->size;
  }
  // Records are appended one at a time and a record's head is stored after its fields, so a
  // crash leaves nothing valid after the record it tore (beyond it lie bytes of an earlier lap,
  // whose heads name other offsets, or zeros). A valid head further on means damage instead.
  for (std::uint64_t at = abs + 8; at - tail < capacity; at += 8) {
    if (head_at(ring, capacity, out.epoch, at)) {
      out.damaged_at = abs;
      return;
    }
  }
}

}  // namespace

absl::StatusOr<commit_log::contents> commit_log::read(const std::string& path) {
  contents out;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return out;
    return io_error(path, "cannot open it");
  }
  struct closer {
    int fd;
    ~closer() { ::close(fd); }
  } closing{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) return io_error(path, "cannot read its size");
  char header[header_bytes];
  if (static_cast<std::size_t>(st.st_size) < header_bytes ||
      ::pread(fd, header, header_bytes, 0) != static_cast<ssize_t>(header_bytes) ||
      std::memcmp(header, magic, sizeof magic) != 0) {
    return out;
  }
  // (No larger log is made: a larger capacity is a damaged header, read as no log.)
  const auto capacity = load_at<std::uint64_t>(header + at_capacity);
  if (capacity < head_bytes || capacity % 8 != 0 || capacity > (std::uint64_t{1} << 30) ||
      static_cast<std::uint64_t>(st.st_size) - header_bytes < capacity) {
    return out;
  }
  std::string ring(capacity, '\0');
  const auto read_ring = [&]() -> absl::Status {
    if (::pread(fd, header, header_bytes, 0) != static_cast<ssize_t>(header_bytes)) {
      return io_error(path, "cannot read it");
    }
    for (std::size_t done = 0; done < capacity;) {
      const ssize_t n =
          ::pread(fd, ring.data() + done, capacity - done, static_cast<off_t>(header_bytes + done));
      if (n <= 0) return io_error(path, "cannot read it");
      done += static_cast<std::size_t>(n);
    }
    out = contents{};
    out.epoch = load_at<std::uint32_t>(header + at_epoch);
    scan(ring.data(), capacity, load_at<std::uint64_t>(header + at_tail), out);
    return absl::OkStatus();
  };
  POP_RETURN_IF_ERROR(read_ring());
  if (out.damaged_at) {
    // An engine appending while this reads can make a record look torn with valid ones after it
    // (read before and after it was written): damage only if a second reading agrees.
    const std::uint64_t first = *out.damaged_at;
    POP_RETURN_IF_ERROR(read_ring());
    if (out.damaged_at != first) out.damaged_at.reset();
  }
  return out;
}

absl::StatusOr<std::unique_ptr<commit_log>> commit_log::create(const std::string& path,
                                                               std::size_t capacity,
                                                               std::uint32_t epoch) {
  capacity = std::max<std::size_t>((capacity + 4095) & ~std::size_t{4095}, 64 << 10);
  const std::size_t bytes = header_bytes + capacity;
  // Made whole under another name and renamed over the old log: a crash leaves the old log (its
  // records in SQLite already) or the new one, empty, never a torn header, and nothing of the old
  // file's bytes is in the new one.
  const std::string fresh = path + ".new";
  const int fd = ::open(fresh.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return io_error(fresh, "cannot create it");
  const auto fail = [&](const char* what) {
    absl::Status s = io_error(fresh, what);
    ::close(fd);
    ::unlink(fresh.c_str());
    return s;
  };
  // Blocks reserved now: a store into a mapped page the disk has no room for would kill the
  // process (SIGBUS) instead of failing.
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) return fail("cannot size it");
  if (const int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)); rc != 0) {
    errno = rc;
    return fail("cannot reserve its space");
  }
  void* map = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (map == MAP_FAILED) return fail("cannot map it");
  char* header = static_cast<char*>(map);
  const std::uint64_t cap = capacity;
  std::memcpy(header, magic, sizeof magic);
  std::memcpy(header + at_capacity, &cap, sizeof cap);
  std::memcpy(header + at_epoch, &epoch, sizeof epoch);  // (the tail is 0: the file was empty)
  if (::rename(fresh.c_str(), path.c_str()) != 0) {
    absl::Status s = io_error(path, "cannot put the new log in place");
    ::munmap(map, bytes);
    ::close(fd);
    ::unlink(fresh.c_str());
    return s;
  }
  return std::unique_ptr<commit_log>(
      new commit_log(fd, static_cast<char*>(map), bytes, capacity, epoch));
}

commit_log::commit_log(int fd, char* map, std::size_t map_bytes, std::size_t capacity,
                       std::uint32_t epoch)
    : fd_(fd), map_(map), map_bytes_(map_bytes), capacity_(capacity), epoch_(epoch) {}

commit_log::~commit_log() {
  ::munmap(map_, map_bytes_);
  ::close(fd_);
}

bool commit_log::append(std::uint64_t version, std::int64_t at_us, std::string_view process,
                        std::string_view writes, std::string_view messages, std::int64_t checksum) {
  const std::size_t size = record_size(process.size() + writes.size() + messages.size());
  char* ring = map_ + header_bytes;
  std::size_t pos = head_ % capacity_;
  const std::size_t room = capacity_ - pos;
  const std::size_t skip = room < size ? room : 0;
  if (used() + skip + size > capacity_) return false;
  if (skip != 0) {
    if (room >= head_bytes) {
      record_head pad;
      pad.abs = head_;
      pad.epoch = epoch_;
      pad.kind = kind_padding;
      pad.size = static_cast<std::uint32_t>(room);
      pad.check = head_check(pad);
      std::memcpy(ring + pos, &pad, sizeof pad);
    }
    head_ += skip;
    pos = 0;
  }
  record_head h;
  h.abs = head_;
  h.epoch = epoch_;
  h.kind = kind_record;
  h.size = static_cast<std::uint32_t>(size);
  h.process_len = static_cast<std::uint32_t>(process.size());
  h.writes_len = static_cast<std::uint32_t>(writes.size());
  h.messages_len = static_cast<std::uint32_t>(messages.size());
  h.version = version;
  h.at_us = at_us;
  h.checksum = checksum;
  h.check = head_check(h);
  char* p = ring + pos + head_bytes;
  std::memcpy(p, process.data(), process.size());
  std::memcpy(p + process.size(), writes.data(), writes.size());
  std::memcpy(p + process.size() + writes.size(), messages.data(), messages.size());
  std::memcpy(ring + pos, &h, sizeof h);
  live_.emplace_back(head_, version);
  head_ += size;
  return true;
}

void commit_log::release_through(std::uint64_t version) {
  const std::size_t before = live_.size();
  while (!live_.empty() && live_.front().second <= version) live_.pop_front();
  if (live_.size() != before) set_tail(live_.empty() ? head_ : live_.front().first);
}

void commit_log::set_tail(std::uint64_t tail) {
  tail_ = tail;
  std::memcpy(map_ + at_tail, &tail, sizeof tail);  // one aligned store: never torn
}

}  // namespace pop::detail
