#include "pop/nats/nats_sink.hpp"

#include <nats/nats.h>

#include <algorithm>
#include <optional>
#include <string_view>
#include <utility>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "pop/contracts/path.hpp"
#include "pop/contracts/status.hpp"
#include "pop/nats/detail/nats_status.hpp"

namespace asio = boost::asio;

namespace pop {

// One publish awaiting its acknowledgement. Touched only on `timer`'s executor (the relay's
// strand), except for what mu_ guards.
struct nats_sink::pending {
  pending(const asio::any_io_executor& ex, std::string what)
      : timer(ex, asio::steady_timer::time_point::max()), where(std::move(what)) {
    // The relay's strand, held as its concrete type: posting to it from a libnats thread then
    // copies only a std::shared_ptr, never a type-erased executor's own reference count.
    if (const auto* s = ex.target<asio::strand<asio::any_io_executor>>()) strand = *s;
  }
  asio::steady_timer timer;
  std::optional<asio::strand<asio::any_io_executor>> strand;
  const std::string where;  // names the message in errors
  absl::Status status{};
  bool done = false;
  // Guarded by mu_. While js_PublishMsgAsync runs, libnats may already deliver the message's
  // acknowledgement (or its timeout: the call can wait for the connection's lock for longer than
  // ack_timeout, say while libnats reconnects) and still read the message afterwards. on_ack then
  // leaves the message here, and publish() destroys it once the call has returned.
  bool in_call = true;
  natsMsg* deferred = nullptr;
};

namespace {

bool valid_header_name(std::string_view name) {
  if (name.empty()) return false;
  for (const char c : name) {
    if (c <= ' ' || c >= 127 || c == ':') return false;
  }
  return true;
}

bool valid_header_value(std::string_view value) {
  return value.find_first_of("\r\n") == std::string_view::npos;
}

bool valid_subject(std::string_view s) {
  if (s.empty() || s.front() == '.' || s.back() == '.' ||
      absl::StrContains(detail::to_absl(s), "..")) {
    return false;
  }
  for (const char c : s) {
    if (c <= ' ' || c >= 127 || c == '*' || c == '>') return false;
  }
  return true;
}

// True for the outcomes that say the broker cannot be reached or does not answer — not a fault
// of the message.
bool broker_down(natsStatus s) {
  switch (s) {
    case NATS_TIMEOUT:
    case NATS_NO_RESPONDERS:
    case NATS_CONNECTION_CLOSED:
    case NATS_CONNECTION_DISCONNECTED:
    case NATS_NOT_YET_CONNECTED:
    case NATS_STALE_CONNECTION:
    case NATS_IO_ERROR:
    case NATS_NO_SERVER:
    case NATS_INSUFFICIENT_BUFFER:
      return true;
    default:
      return false;
  }
}

struct msg_deleter {
  void operator()(natsMsg* m) const { natsMsg_Destroy(m); }
};

}  // namespace

nats_sink::nats_sink(nats_sink_options opts) : options_(std::move(opts)) {}

absl::StatusOr<std::unique_ptr<nats_sink>> nats_sink::create(nats_connection& c,
                                                             nats_sink_options opts) {
  if (absl::Status st = validate_segment(opts.source); !st.ok()) {
    return annotate(st, absl::StrCat("nats_sink_options.source '", opts.source,
                                     "' (the producing engine's name, required)"));
  }
  if (opts.source.size() > max_source_length) {
    // Consumers mark "<source>-<id>" (27 characters) as one path segment of at most 128.
    return absl::InvalidArgumentError(absl::StrCat("nats_sink_options.source '", opts.source,
                                                   "' is longer than ", max_source_length,
                                                   " characters"));
  }
  if (!opts.subject_for && !opts.subject_prefix.empty() &&
      (opts.subject_prefix.back() != '.' ||
       !valid_subject(opts.subject_prefix.substr(0, opts.subject_prefix.size() - 1)))) {
    return absl::InvalidArgumentError(
        absl::StrCat("nats_sink_options.subject_prefix '", opts.subject_prefix,
                     "' must be subject tokens ending in '.', such as \"orders.\""));
  }
  if (!opts.expect_stream.empty() && !detail::valid_nats_name(opts.expect_stream)) {
    return absl::InvalidArgumentError(absl::StrCat("nats_sink_options.expect_stream '",
                                                   opts.expect_stream, "' is not a stream name"));
  }
  if (opts.ack_timeout.count() <= 0 || opts.max_pending_acks <= 0) {
    return absl::InvalidArgumentError(
        "nats_sink_options: ack_timeout and max_pending_acks must be positive");
  }
  std::unique_ptr<nats_sink> s(new nats_sink(std::move(opts)));
  jsOptions jo;
  jsOptions_Init(&jo);
  jo.Wait = s->options_.ack_timeout.count();
  jo.PublishAsync.MaxPending = s->options_.max_pending_acks;
  jo.PublishAsync.AckHandler = &nats_sink::on_ack;
  jo.PublishAsync.AckHandlerClosure = s.get();
  // Never stall the relay's thread for long when libnats' bound is reached: fail and retry.
  jo.PublishAsync.StallWait = 1;
  POP_RETURN_IF_ERROR(detail::from_nats(natsConnection_JetStream(&s->js_, c.handle(), &jo),
                                        "nats_sink: creating the JetStream context"));
  return s;
}

nats_sink::~nats_sink() {
  {
    std::lock_guard lock(mu_);
    closed_ = true;
    pending_.clear();
  }
  if (js_ == nullptr) return;
  // libnats makes what tracks acknowledgements on the first publish it takes, and its pending
  // list cannot be asked for before that.
  if (!published_.load(std::memory_order_relaxed)) {
    jsCtx_Destroy(js_);
    return;
  }
  // No acknowledgement callback may run once this object is gone: wait a little for those still
  // outstanding, then take the rest back from libnats (it then drops their late acknowledgements).
  jsPubOptions po;
  jsPubOptions_Init(&po);
  po.MaxWait = std::min<std::int64_t>(options_.ack_timeout.count(), 1'000);
  static_cast<void>(js_PublishAsyncComplete(js_, &po));
  natsMsgList unacked{};
  if (js_PublishAsyncGetPendingList(&unacked, js_) == NATS_OK) natsMsgList_Destroy(&unacked);
  // Now only callbacks already running are counted as pending: wait for exactly those.
  po.MaxWait = 10'000;
  static_cast<void>(js_PublishAsyncComplete(js_, &po));
  jsCtx_Destroy(js_);
}

std::string nats_sink::msg_id(const outbox_message& m) const {
  return absl::StrCat(options_.source, ":", m.id);
}

std::string nats_sink::subject(const outbox_message& m) const {
  if (options_.subject_for) return options_.subject_for(m);
  return absl::StrCat(options_.subject_prefix, m.topic);
}

void nats_sink::on_ack(jsCtx*, natsMsg* msg, jsPubAck* pa, jsPubAckErr* pae, void* closure) {
  auto* self = static_cast<nats_sink*>(closure);
  // The message is not read here: its publish may still be encoding it (see pending::in_call).
  // What names it in an error comes from its entry.
  std::string failure;  // empty: acknowledged
  bool down = false;
  if (pa != nullptr) {
    self->acked_.fetch_add(1, std::memory_order_relaxed);
    if (pa->Duplicate) self->duplicates_.fetch_add(1, std::memory_order_relaxed);
  } else {
    self->failed_.fetch_add(1, std::memory_order_relaxed);
    const natsStatus err = pae != nullptr ? pae->Err : NATS_ERR;
    failure = absl::StrCat(" failed: ", natsStatus_GetText(err));
    if (pae != nullptr && pae->ErrText != nullptr) {
      absl::StrAppend(&failure, " (", pae->ErrText, ")");
    }
    if (pae != nullptr && pae->ErrCode != 0) {
      absl::StrAppend(&failure, " [JetStream error ", static_cast<int>(pae->ErrCode), "]");
    }
    // Every failure here is worth retrying. One the stream did not refuse (no ack in time, no
    // stream answering, the connection gone) says the broker is down: not counted as an attempt.
    down = (pae == nullptr || pae->ErrCode == 0) && broker_down(err);
  }
  bool keep = false;
  {
    // The post happens under mu_, and publish() takes mu_ once its wait ends (or its frame is
    // destroyed): so no copy of the relay's strand is still held here by the time publish()
    // returns, and the relay's io_context may then be destroyed (a strand must not outlive it).
    std::lock_guard lock(self->mu_);
    if (!self->closed_) {
      if (auto it = self->pending_.find(msg); it != self->pending_.end()) {
        std::shared_ptr<pending> p = std::move(it->second);
        self->pending_.erase(it);
        if (p->in_call) {
          p->deferred = msg;
          keep = true;
        }
        absl::Status status;
        if (!failure.empty()) {
          status = absl::UnavailableError(absl::StrCat(p->where, ":", failure));
          if (down) status = destination_unavailable(std::move(status));
        }
        pending& target = *p;
        auto complete = [p = std::move(p), status = std::move(status)]() mutable {
          p->status = std::move(status);
          p->done = true;
          // An expiry in the past completes the wait now, or at once if it starts later.
          p->timer.expires_at(asio::steady_timer::time_point::min());
        };
        if (target.strand) {
          asio::post(*target.strand, std::move(complete));
        } else {
          asio::post(target.timer.get_executor(), std::move(complete));
        }
      }
    }
  }
  if (!keep) natsMsg_Destroy(msg);
}

asio::awaitable<absl::Status> nats_sink::publish(const outbox_message& m) {
  const std::string subj = subject(m);
  if (!valid_subject(subj)) {
    co_return permanent_failure(absl::InvalidArgumentError(
        absl::StrCat("nats_sink: message ", m.id, " (topic '", m.topic, "') maps to subject '",
                     subj, "', which NATS cannot publish to")));
  }
  if (!valid_header_value(m.key)) {
    co_return permanent_failure(absl::InvalidArgumentError(
        absl::StrCat("nats_sink: message ", m.id,
                     " has a key with a line break, which a NATS header cannot carry")));
  }
  for (const auto& [name, value] : m.headers) {
    if (!valid_header_name(name) || !valid_header_value(value) ||
        absl::StartsWithIgnoreCase(name, "nats-") || absl::StartsWithIgnoreCase(name, "pop-")) {
      co_return permanent_failure(absl::InvalidArgumentError(absl::StrCat(
          "nats_sink: message ", m.id, " has header '", name,
          "', which NATS cannot carry (names are printable without ':' or spaces, values one "
          "line; Nats-* and Pop-* are reserved)")));
    }
  }
  const std::string data = m.payload.dump();
  natsMsg* raw = nullptr;
  const std::string where = absl::StrCat("nats_sink: message ", m.id, " to '", subj, "'");
  if (absl::Status st = detail::from_nats(
          natsMsg_Create(&raw, subj.c_str(), nullptr, data.data(), static_cast<int>(data.size())),
          where);
      !st.ok()) {
    co_return st;
  }
  std::unique_ptr<natsMsg, msg_deleter> msg(raw);
  const std::string dedup = msg_id(m);
  const std::string version = std::to_string(m.version);
  const std::string created = std::to_string(m.created_at_us);
  natsStatus s = natsMsgHeader_Set(raw, detail::header_msg_id, dedup.c_str());
  if (s == NATS_OK) s = natsMsgHeader_Set(raw, detail::header_id, m.id.c_str());
  if (s == NATS_OK) s = natsMsgHeader_Set(raw, detail::header_source, options_.source.c_str());
  if (s == NATS_OK) s = natsMsgHeader_Set(raw, detail::header_topic, m.topic.c_str());
  if (s == NATS_OK && !m.key.empty()) s = natsMsgHeader_Set(raw, detail::header_key, m.key.c_str());
  if (s == NATS_OK) s = natsMsgHeader_Set(raw, detail::header_version, version.c_str());
  if (s == NATS_OK) s = natsMsgHeader_Set(raw, detail::header_created, created.c_str());
  for (auto it = m.headers.begin(); s == NATS_OK && it != m.headers.end(); ++it) {
    s = natsMsgHeader_Set(raw, it->first.c_str(), it->second.c_str());
  }
  if (s != NATS_OK) co_return detail::from_nats(s, absl::StrCat(where, ": setting headers"));

  auto p = std::make_shared<pending>(co_await asio::this_coro::executor, where);
  {
    std::lock_guard lock(mu_);
    pending_.emplace(raw, p);
  }
  jsPubOptions po;
  jsPubOptions_Init(&po);
  po.MaxWait = options_.ack_timeout.count();
  if (!options_.expect_stream.empty()) po.ExpectStream = options_.expect_stream.c_str();
  natsMsg* handed = msg.release();
  s = js_PublishMsgAsync(js_, &handed, &po);
  natsMsg* acked_meanwhile = nullptr;
  {
    std::lock_guard lock(mu_);
    p->in_call = false;
    acked_meanwhile = std::exchange(p->deferred, nullptr);
    // libnats did not take the message (handed is still ours): no acknowledgement will come.
    if (s != NATS_OK) pending_.erase(raw);
  }
  // (Acknowledged during the call: libnats returned OK and has let go of it too.)
  natsMsg_Destroy(acked_meanwhile);
  if (s != NATS_OK) {
    natsMsg_Destroy(handed);
    failed_.fetch_add(1, std::memory_order_relaxed);
    absl::Status st = detail::from_nats(s, where);
    if (st.code() == absl::StatusCode::kInvalidArgument) co_return permanent_failure(st);
    if (broker_down(s)) co_return destination_unavailable(absl::UnavailableError(st.message()));
    co_return absl::UnavailableError(st.message());
  }
  published_.fetch_add(1, std::memory_order_relaxed);
  // On every way out (acknowledged, cancelled, or this frame destroyed with its io_context):
  // removes this publish's entry unless on_ack took it (the address may be reused by then), and
  // waits for an on_ack that took it to finish posting.
  struct settle {
    nats_sink& self;
    natsMsg* raw;
    const std::shared_ptr<pending>& p;
    ~settle() {
      std::lock_guard lock(self.mu_);
      if (auto it = self.pending_.find(raw); it != self.pending_.end() && it->second == p) {
        self.pending_.erase(it);
        self.abandoned_.fetch_add(1, std::memory_order_relaxed);
      }
    }
  };
  {
    const settle guard{*this, raw, p};
    if (!p->done) {
      // Completes when on_ack expires the timer, or with operation_aborted when the relay cancels
      // (which may also throw here, if the cancellation came first).
      auto [ec] = co_await p->timer.async_wait(asio::as_tuple(asio::use_awaitable));
      static_cast<void>(ec);
    }
  }
  if (p->done) co_return p->status;
  co_return absl::CancelledError(absl::StrCat(where, ": cancelled before its acknowledgement"));
}

nats_sink_stats nats_sink::stats() const {
  nats_sink_stats out;
  out.published = published_.load(std::memory_order_relaxed);
  out.acked = acked_.load(std::memory_order_relaxed);
  out.duplicates = duplicates_.load(std::memory_order_relaxed);
  out.failed = failed_.load(std::memory_order_relaxed);
  out.abandoned = abandoned_.load(std::memory_order_relaxed);
  std::lock_guard lock(mu_);
  out.in_flight = pending_.size();
  return out;
}

std::string to_prometheus(const nats_sink_stats& s, std::string_view prefix) {
  std::string out;
  const auto d = [](auto v) { return static_cast<double>(v); };
  detail::append_metric(out, prefix, "published_total", "counter", "Publishes handed to libnats.",
                        d(s.published));
  detail::append_metric(out, prefix, "acked_total", "counter",
                        "Publishes acknowledged by JetStream (incl. duplicates).", d(s.acked));
  detail::append_metric(out, prefix, "duplicates_total", "counter",
                        "Publishes the stream already had (by Nats-Msg-Id).", d(s.duplicates));
  detail::append_metric(out, prefix, "failed_total", "counter",
                        "Publishes refused, unanswered or not sent.", d(s.failed));
  detail::append_metric(out, prefix, "abandoned_total", "counter",
                        "Publishes cancelled by the relay before their acknowledgement.",
                        d(s.abandoned));
  detail::append_metric(out, prefix, "in_flight", "gauge", "Publishes awaiting acknowledgement.",
                        d(s.in_flight));
  return out;
}

}  // namespace pop
