#include "pop/nats/nats_ingress.hpp"

#include <nats/nats.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "pop/contracts/status.hpp"
#include "pop/nats/detail/nats_codec.hpp"
#include "pop/nats/detail/nats_status.hpp"
#include "pop/nats/detail/worker_pool.hpp"

namespace pop {

struct nats_ingress::counters {
  std::atomic<std::uint64_t> fetched{0}, applied{0}, duplicates{0}, dead_lettered{0}, retries{0},
      redelivered{0};
  detail::atomic_histogram end_to_end;
};

namespace {

using detail::decode_ingress_message;
using detail::header;
using detail::printable;
using detail::valid_utf8;

bool retryable(absl::StatusCode c) {
  return c == absl::StatusCode::kAborted || c == absl::StatusCode::kResourceExhausted ||
         c == absl::StatusCode::kUnavailable || c == absl::StatusCode::kDeadlineExceeded;
}

bool fatal(absl::StatusCode c) {
  return c == absl::StatusCode::kDataLoss || c == absl::StatusCode::kInternal;
}

// The stream sequence and delivery count in a JetStream delivery's reply subject:
// "$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>", or the
// newer form with "<domain>.<account hash>." before the stream and a token after.
struct delivery {
  std::uint64_t seq = 0;
  std::uint64_t delivered = 0;
};
std::optional<delivery> parse_ack_subject(std::string_view reply) {
  constexpr std::string_view prefix = "$JS.ACK.";
  if (reply.substr(0, prefix.size()) != prefix) return std::nullopt;
  const std::vector<absl::string_view> t =
      absl::StrSplit(detail::to_absl(reply.substr(prefix.size())), '.');
  std::size_t at = 0;  // index of <delivered>
  if (t.size() == 7) {
    at = 2;
  } else if (t.size() >= 9) {
    at = 4;
  } else {
    return std::nullopt;
  }
  delivery d;
  if (!absl::SimpleAtoi(t[at], &d.delivered) || !absl::SimpleAtoi(t[at + 1], &d.seq)) {
    return std::nullopt;
  }
  return d;
}

// Sends `kind` ("+ACK", "-NAK", "+WPI") for a delivery; the server ignores a lost one (it then
// redelivers, which the inbox absorbs).
void acknowledge(natsConnection* nc, natsMsg* msg, const char* kind) {
  const char* reply = natsMsg_GetReply(msg);
  if (reply == nullptr || *reply == '\0') return;
  static_cast<void>(natsConnection_PublishString(nc, reply, kind));
}

// A pull response that carries no message: its Status header ("100" idle heartbeat, "404" no
// messages, "408" request expired, "409" a limit or a leadership change, "503" no JetStream), or
// nullptr for a message of the stream (those always have a reply subject: where acks go).
const char* pull_status(natsMsg* msg) {
  const char* reply = natsMsg_GetReply(msg);
  if ((reply != nullptr && *reply != '\0') || natsMsg_GetDataLength(msg) > 0) return nullptr;
  const char* v = nullptr;
  if (natsMsgHeader_Get(msg, "Status", &v) != NATS_OK || v == nullptr) return nullptr;
  return v;
}

bool status_is(const char* status, std::string_view code) {
  return std::string_view(status).substr(0, 3) == code;
}

}  // namespace

nats_ingress::nats_ingress(engine& e, inbox& in, nats_ingress_options opts,
                           topic_table<std::string> routes, path dead_letters)
    : engine_(e),
      inbox_(in),
      options_(std::move(opts)),
      routes_(std::move(routes)),
      dead_letters_(std::move(dead_letters)),
      counters_(std::make_unique<counters>()) {}

absl::StatusOr<std::unique_ptr<nats_ingress>> nats_ingress::create(engine& e, inbox& in,
                                                                   nats_connection& c,
                                                                   nats_ingress_options o) {
  if (!detail::valid_nats_name(o.stream)) {
    return absl::InvalidArgumentError(absl::StrCat("nats_ingress_options.stream '", o.stream,
                                                   "' must be 1-255 letters, digits, '-' or '_'"));
  }
  if (!detail::valid_nats_name(o.durable) || !validate_segment(o.durable).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("nats_ingress_options.durable '", o.durable,
                                                   "' must be 1-128 letters, digits, '-' or '_'"));
  }
  if (o.handler.empty() && o.routes.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("nats_ingress for stream '", o.stream,
                     "': give a handler or routes (inbox handler names)"));
  }
  if (o.batch < 1 || o.apply_threads < 1 || o.max_ack_pending < 1 || o.ack_wait.count() < 1 ||
      o.fetch_wait.count() < 1 || o.retry_initial.count() < 1 || o.retry_max < o.retry_initial) {
    return absl::InvalidArgumentError(
        absl::StrCat("nats_ingress for stream '", o.stream,
                     "': batch, apply_threads, max_ack_pending, ack_wait, fetch_wait and "
                     "retry_initial must be positive and "
                     "retry_max at least retry_initial"));
  }
  topic_table<std::string> routes;
  for (const auto& [topic, handler] : o.routes) {
    if (topic.empty() || handler.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("nats_ingress for stream '", o.stream,
                                                     "': a route needs a topic and a handler"));
    }
    POP_RETURN_IF_ERROR(annotate(routes.insert(topic, handler),
                                 absl::StrCat("nats_ingress for stream '", o.stream, "', route")));
  }
  POP_ASSIGN_OR_RETURN(path dead, parse_path_outside(o.dead_letter_path, e.outbox_path(),
                                                     "nats_ingress_options.dead_letter_path"));
  std::unique_ptr<nats_ingress> in_ptr(
      new nats_ingress(e, in, std::move(o), std::move(routes), std::move(dead)));
  nats_ingress& self = *in_ptr;
  const nats_ingress_options& opt = self.options_;
  const std::string where =
      absl::StrCat("nats_ingress: consumer '", opt.durable, "' on stream '", opt.stream, "'");

  jsOptions jo;
  jsOptions_Init(&jo);
  jo.Wait = c.options().api_timeout.count();
  POP_RETURN_IF_ERROR(detail::from_nats(natsConnection_JetStream(&self.js_, c.handle(), &jo),
                                        absl::StrCat(where, ": JetStream context")));
  jsConsumerConfig cc;
  jsConsumerConfig_Init(&cc);
  cc.Durable = opt.durable.c_str();
  cc.AckPolicy = js_AckExplicit;
  cc.DeliverPolicy = js_DeliverAll;
  cc.AckWait = static_cast<std::int64_t>(opt.ack_wait.count()) * 1'000'000;
  cc.MaxAckPending = opt.max_ack_pending;
  cc.MaxDeliver = -1;
  if (!opt.filter_subject.empty()) cc.FilterSubject = opt.filter_subject.c_str();
  jsConsumerInfo* ci = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s = js_AddConsumer(&ci, self.js_, opt.stream.c_str(), &cc, nullptr, &jerr);
  if (s != NATS_OK && jerr == JSConsumerNameExistErr) {
    jerr = static_cast<jsErrCode>(0);
    s = js_UpdateConsumer(&ci, self.js_, opt.stream.c_str(), &cc, nullptr, &jerr);
  }
  if (s != NATS_OK) {
    absl::Status st = detail::from_nats(s, absl::StrCat(where, ": creating the consumer"), jerr);
    if (jerr == JSStreamNotFoundErr) return st;
    if (st.code() == absl::StatusCode::kNotFound)
      return absl::FailedPreconditionError(st.message());
    return st;
  }
  const bool unacked = ci->NumAckPending > 0;
  jsConsumerInfo_Destroy(ci);
  // Pulled by hand (see pull()): a plain subscription to an inbox of our own.
  natsInbox* inbox = nullptr;
  POP_RETURN_IF_ERROR(detail::from_nats(natsInbox_Create(&inbox), absl::StrCat(where, ": inbox")));
  self.reply_prefix_ = inbox;
  natsInbox_Destroy(inbox);
  self.nc_ = c.handle();
  self.next_subject_ = absl::StrCat("$JS.API.CONSUMER.MSG.NEXT.", opt.stream, ".", opt.durable);
  s = natsConnection_SubscribeSync(&self.sub_, self.nc_,
                                   absl::StrCat(self.reply_prefix_, ".*").c_str());
  POP_RETURN_IF_ERROR(detail::from_nats(s, absl::StrCat(where, ": subscribing")));
  // Never dropped by the client: the server's max_ack_pending bounds what is delivered.
  POP_RETURN_IF_ERROR(detail::from_nats(natsSubscription_SetPendingLimits(self.sub_, -1, -1),
                                        absl::StrCat(where, ": subscribing")));
  if (unacked && opt.redeliveries_first) {
    self.hold_until_ = std::chrono::steady_clock::now() + opt.ack_wait;
  }
  return in_ptr;
}

nats_ingress::~nats_ingress() {
  static_cast<void>(stop());
  if (sub_ != nullptr) {
    static_cast<void>(natsSubscription_Unsubscribe(sub_));
    natsSubscription_Destroy(sub_);
  }
  if (js_ != nullptr) jsCtx_Destroy(js_);
}

const std::string* nats_ingress::route(const std::string& topic) const {
  if (const std::string* handler = routes_.find(topic)) return handler;
  return options_.handler.empty() ? nullptr : &options_.handler;
}

absl::Status nats_ingress::dead_letter(natsMsg* msg, std::uint64_t seq, const absl::Status& why) {
  char seq_text[24];
  std::snprintf(seq_text, sizeof seq_text, "%020llu", static_cast<unsigned long long>(seq));
  const std::string at = absl::StrCat(dead_letters_.str(), ".", options_.durable, "-", seq_text);
  json headers = json::object();
  const char** keys = nullptr;
  int count = 0;
  if (natsMsgHeader_Keys(msg, &keys, &count) == NATS_OK) {
    for (int i = 0; i < count; ++i) headers[printable(keys[i])] = printable(header(msg, keys[i]));
    free(static_cast<void*>(keys));
  }
  const char* data = natsMsg_GetData(msg);
  const std::string bytes(data != nullptr ? data : "",
                          static_cast<std::size_t>(natsMsg_GetDataLength(msg)));
  json record = {{"stream", options_.stream},
                 {"consumer", options_.durable},
                 {"sequence", seq},
                 {"subject", printable(natsMsg_GetSubject(msg))},
                 {"headers", std::move(headers)},
                 {"error", printable(why.ToString())},
                 {"at_us", engine_.clock().now_us()}};
  // Binary data is kept whole, as base64 (the state is JSON, whose strings are UTF-8).
  if (valid_utf8(bytes)) {
    record["data"] = bytes;
  } else {
    record["data_base64"] = absl::Base64Escape(bytes);
  }
  for (;;) {
    const std::uint64_t v = engine_.version();
    POP_ASSIGN_OR_RETURN(cas_result r,
                         engine_.compare_and_swap(v, {write{at, record}}, cas_mode::keys));
    if (r.committed) break;
  }
  counters_->dead_lettered.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status nats_ingress::handle(natsMsg* msg) {
  std::uint64_t seq = 0;
  if (const char* reply = natsMsg_GetReply(msg)) {
    if (const std::optional<delivery> d = parse_ack_subject(reply)) {
      seq = d->seq;
      if (d->delivered > 1) counters_->redelivered.fetch_add(1, std::memory_order_relaxed);
    }
  }
  // Names the message in errors; built only when one happens.
  const auto where = [&] {
    return absl::StrCat("nats_ingress '", options_.durable, "': stream '", options_.stream,
                        "' sequence ", seq, " (subject '", natsMsg_GetSubject(msg), "')");
  };
  absl::StatusOr<outbox_message> m = decode_ingress_message(msg, options_.stream, seq);
  absl::Status outcome;
  const std::string* handler = nullptr;
  if (!m.ok()) {
    outcome = annotate(m.status(), where());
  } else if (handler = route(m->topic); handler == nullptr) {
    outcome = absl::NotFoundError(
        absl::StrCat(where(), ": no route for topic '", m->topic, "' and no default handler"));
  } else {
    auto backoff = options_.retry_initial;
    auto last_progress = std::chrono::steady_clock::now();
    for (;;) {
      absl::StatusOr<inbox_result> r = inbox_.apply(*handler, *m);
      if (r.ok()) {
        if (r->applied) {
          counters_->applied.fetch_add(1, std::memory_order_relaxed);
          if (m->created_at_us > 0) {
            counters_->end_to_end.record(
                std::chrono::microseconds(engine_.clock().now_us() - m->created_at_us));
          }
        } else {
          // Its mark may be committed by a concurrent apply but not yet durable: ack only once
          // the version that showed it is.
          while (engine_.durable_version() < r->done.version && !stopping_.load()) {
            std::this_thread::sleep_for(std::chrono::microseconds(50));
          }
          if (engine_.durable_version() < r->done.version) {
            return absl::CancelledError(
                absl::StrCat(where(), ": stopped before its mark was durable"));
          }
          counters_->duplicates.fetch_add(1, std::memory_order_relaxed);
        }
        break;
      }
      if (fatal(r.status().code())) return annotate(r.status(), where());
      if (!retryable(r.status().code())) {
        outcome = annotate(r.status(), absl::StrCat(where(), ": handler '", *handler, "'"));
        break;
      }
      if (stopping_.load()) {
        return absl::CancelledError(absl::StrCat(where(), ": stopped while retrying (",
                                                 r.status().message(), "); left unacknowledged"));
      }
      counters_->retries.fetch_add(1, std::memory_order_relaxed);
      std::this_thread::sleep_for(backoff);
      backoff = std::min(backoff * 2, options_.retry_max);
      if (std::chrono::steady_clock::now() - last_progress > options_.ack_wait / 3) {
        // Still working on it: the server must not redeliver it meanwhile.
        acknowledge(nc_, msg, "+WPI");
        last_progress = std::chrono::steady_clock::now();
      }
    }
  }
  if (!outcome.ok()) POP_RETURN_IF_ERROR(dead_letter(msg, seq, outcome));
  // The commit is durable (execute returned): acknowledge. A lost ack means a redelivery, which
  // the inbox absorbs.
  acknowledge(nc_, msg, "+ACK");
  return absl::OkStatus();
}

absl::StatusOr<std::vector<natsMsg*>> nats_ingress::pull(std::chrono::milliseconds wait) {
  using clock = std::chrono::steady_clock;
  const auto batch = static_cast<std::size_t>(options_.batch);
  const clock::time_point deadline = clock::now() + wait;
  std::vector<natsMsg*> got;
  try {
    got.reserve(batch);
    const auto fail = [&](natsStatus s) -> absl::StatusOr<std::vector<natsMsg*>> {
      if (!got.empty()) return std::move(got);
      return absl::UnavailableError(
          detail::from_nats(s, absl::StrCat("nats_ingress '", options_.durable,
                                            "': fetching from '", options_.stream, "'"))
              .message());
    };
    // Takes what is queued, without waiting. (A status here ends an earlier request.)
    const auto take_queued = [&]() -> natsStatus {
      while (got.size() < batch) {
        natsMsg* m = nullptr;
        const natsStatus s = natsSubscription_NextMsg(&m, sub_, 0);
        if (s == NATS_TIMEOUT) return NATS_OK;
        if (s != NATS_OK) return s;
        if (const char* status = pull_status(m)) {
          forget_if_ended(m, status);
          natsMsg_Destroy(m);
        } else {
          got.push_back(m);
        }
      }
      return NATS_OK;
    };
    // Receives until the batch is full, request `reply` ends (404: nothing more now; 408:
    // expired; 409: a limit or a leadership change, kUnavailable; 503: no JetStream, too) or
    // `until` passes; with `first_only`, until something came.
    const auto receive = [&](const std::string& reply, clock::time_point until,
                             bool first_only) -> natsStatus {
      while (got.size() < batch) {
        const std::int64_t wait_ms =
            std::chrono::duration_cast<std::chrono::milliseconds>(until - clock::now()).count();
        if (wait_ms <= 0) return NATS_OK;
        natsMsg* m = nullptr;
        const natsStatus s = natsSubscription_NextMsg(&m, sub_, wait_ms);
        if (s == NATS_TIMEOUT) return NATS_OK;
        if (s != NATS_OK) return s;
        const char* status = pull_status(m);
        if (status == nullptr) {
          got.push_back(m);  // a message of the stream (also one an earlier request brought)
          if (first_only) return take_queued();
          continue;
        }
        const char* subject = natsMsg_GetSubject(m);
        const bool ended = !status_is(status, "100");
        const bool mine = subject != nullptr && reply == subject;
        forget_if_ended(m, status);
        const natsStatus outcome = status_is(status, "503")   ? NATS_NO_RESPONDERS
                                   : status_is(status, "409") ? NATS_ERR
                                                              : NATS_OK;
        natsMsg_Destroy(m);
        if (mine && ended) return outcome;
      }
      return NATS_OK;
    };
    // Sends a pull request for the rest of the batch, ending by `until` at the latest; with
    // `at_once`, once what the stream has now is sent.
    const auto request = [&](bool at_once, clock::time_point until,
                             std::string& reply) -> natsStatus {
      const std::int64_t ns =
          std::chrono::duration_cast<std::chrono::nanoseconds>(until - clock::now()).count();
      if (ns < 1'000'000) return NATS_TIMEOUT;
      reply = absl::StrCat(reply_prefix_, ".", ++requests_);
      const std::string body =
          absl::StrCat("{\"batch\":", batch - got.size(), at_once ? ",\"no_wait\":true" : "",
                       ",\"expires\":", ns, "}");
      return natsConnection_PublishRequest(nc_, next_subject_.c_str(), reply.c_str(), body.data(),
                                           static_cast<int>(body.size()));
    };
    // What earlier requests brought; else what the open waiting request brings; else what the
    // stream has now; else the first delivery of a new waiting request, which stays open.
    if (const natsStatus s = take_queued(); s != NATS_OK) return fail(s);
    if (!got.empty()) return got;
    if (!open_reply_.empty() && clock::now() < open_until_) {
      const std::string reply = open_reply_;
      if (const natsStatus s = receive(reply, std::min(deadline, open_until_), true);
          s != NATS_OK) {
        return fail(s);
      }
      if (!got.empty() || clock::now() >= deadline) return got;
    }
    open_reply_.clear();
    std::string reply;
    // (No later than the wait: a request cut short at max_ack_pending does not end by itself.)
    if (natsStatus s = request(/*at_once=*/true, deadline, reply); s != NATS_OK) {
      return s == NATS_TIMEOUT ? std::move(got) : fail(s);
    }
    if (const natsStatus s = receive(reply, deadline, false); s != NATS_OK) return fail(s);
    if (!got.empty()) return got;
    // A little less than the wait, so the server ends it before this call gives up.
    const clock::time_point until =
        deadline - (wait >= std::chrono::milliseconds(20) ? std::chrono::milliseconds(10)
                                                          : std::chrono::milliseconds(0));
    if (natsStatus s = request(/*at_once=*/false, until, reply); s != NATS_OK) {
      return s == NATS_TIMEOUT ? std::move(got) : fail(s);
    }
    open_reply_ = reply;
    open_until_ = until;
    if (const natsStatus s = receive(reply, deadline, true); s != NATS_OK) return fail(s);
    return got;
  } catch (...) {
    for (natsMsg* m : got) natsMsg_Destroy(m);
    throw;
  }
}

void nats_ingress::forget_if_ended(natsMsg* m, const char* status) {
  const char* subject = natsMsg_GetSubject(m);
  if (!status_is(status, "100") && subject != nullptr && open_reply_ == subject) {
    open_reply_.clear();
  }
}

void nats_ingress::nak_pending() {
  const auto nak = [&](natsMsg* m) {
    if (pull_status(m) == nullptr) acknowledge(nc_, m, "-NAK");
    natsMsg_Destroy(m);
  };
  // What the open request may still bring, until it ends or expires.
  while (!open_reply_.empty() && std::chrono::steady_clock::now() < open_until_) {
    const std::int64_t wait_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                     open_until_ - std::chrono::steady_clock::now())
                                     .count() +
                                 1;
    natsMsg* m = nullptr;
    if (natsSubscription_NextMsg(&m, sub_, wait_ms) != NATS_OK) break;
    if (const char* status = pull_status(m)) forget_if_ended(m, status);
    nak(m);
  }
  open_reply_.clear();
  natsMsg* m = nullptr;
  while (natsSubscription_NextMsg(&m, sub_, 0) == NATS_OK) nak(m);
}

absl::StatusOr<std::size_t> nats_ingress::poll(std::chrono::milliseconds wait) {
  if (hold_until_ != std::chrono::steady_clock::time_point{}) {
    const auto now = std::chrono::steady_clock::now();
    if (now < hold_until_) {
      std::this_thread::sleep_for(
          std::min<std::chrono::steady_clock::duration>(hold_until_ - now, wait));
      if (std::chrono::steady_clock::now() < hold_until_) return 0;
    }
    hold_until_ = {};
  }
  absl::StatusOr<std::vector<natsMsg*>> pulled = pull(wait);
  if (!pulled.ok()) return pulled.status();
  // Destroyed on every way out.
  struct destroy_all {
    std::vector<natsMsg*>& msgs;
    ~destroy_all() {
      for (natsMsg* m : msgs) natsMsg_Destroy(m);
    }
  } owned{*pulled};
  if (pulled->empty()) return 0;
  counters_->fetched.fetch_add(pulled->size(), std::memory_order_relaxed);
  // Lanes: one per key, in stream order within it; messages without a key each alone.
  std::vector<std::vector<natsMsg*>> lanes;
  absl::flat_hash_map<std::string, std::size_t> lane_of;
  for (natsMsg* msg : *pulled) {
    const std::string key = header(msg, detail::header_key);
    if (key.empty()) {
      lanes.push_back({msg});
      continue;
    }
    const auto [it, fresh] = lane_of.try_emplace(key, lanes.size());
    if (fresh) lanes.emplace_back();
    lanes[it->second].push_back(msg);
  }
  std::atomic<bool> failed{false};
  std::vector<std::size_t> lane_settled(lanes.size(), 0);
  std::atomic<std::size_t> next_lane{0};
  std::atomic<std::size_t> settled{0};
  std::mutex failure_mu;
  absl::Status failure;
  const auto work = [&] {
    for (std::size_t l = next_lane.fetch_add(1); l < lanes.size(); l = next_lane.fetch_add(1)) {
      absl::Status lane_failure;
      lane_settled[l] = handle_lane(lanes[l], lane_failure, failed);
      settled.fetch_add(lane_settled[l]);
      if (!lane_failure.ok()) {
        std::lock_guard lock(failure_mu);
        // A fatal error outranks a stop: report the engine's error.
        if (failure.ok() || failure.code() == absl::StatusCode::kCancelled) failure = lane_failure;
      }
    }
  };
  const std::size_t helpers =
      std::min<std::size_t>(lanes.size(),
                            static_cast<std::size_t>(std::max(1, options_.apply_threads))) -
      1;
  // Helper threads are started once and reused by every batch.
  if (helpers > 0 && !pool_) {
    pool_ = std::make_unique<detail::worker_pool>(
        static_cast<std::size_t>(std::max(1, options_.apply_threads)) - 1);
  }
  if (pool_) {
    pool_->run(helpers, work);
  } else {
    work();
  }
  if (failed.load()) {
    // What this batch did not settle goes back at once: the server redelivers it before newer
    // messages, so per-key order holds after a stop or an error too.
    for (std::size_t l = 0; l < lanes.size(); ++l) {
      for (std::size_t i = lane_settled[l]; i < lanes[l].size(); ++i) {
        acknowledge(nc_, lanes[l][i], "-NAK");
      }
    }
    nak_pending();
  }
  if (!failure.ok()) return failure;
  return settled.load();
}

std::size_t nats_ingress::handle_lane(const std::vector<natsMsg*>& msgs, absl::Status& failure,
                                      std::atomic<bool>& failed) {
  std::size_t settled = 0;
  for (natsMsg* msg : msgs) {
    // After a failure elsewhere the rest stays unacknowledged, to be redelivered in order.
    if (failed.load()) return settled;
    if (stopping_.load()) {
      failure = absl::CancelledError("nats_ingress: stopped mid-batch; the rest is redelivered");
      failed = true;
      return settled;
    }
    try {
      failure = handle(msg);
    } catch (const std::exception& e) {
      // Not expected from pop or a handler (the engine turns handler exceptions into statuses):
      // stop with it instead of terminating; the message is redelivered.
      failure = absl::InternalError(
          absl::StrCat("nats_ingress '", options_.durable, "': unexpected exception: ", e.what()));
    } catch (...) {
      failure = absl::InternalError(
          absl::StrCat("nats_ingress '", options_.durable, "': unexpected exception"));
    }
    if (!failure.ok()) {
      failed = true;
      return settled;
    }
    ++settled;
  }
  return settled;
}

absl::Status nats_ingress::start() {
  if (running_.exchange(true)) {
    return absl::FailedPreconditionError(
        absl::StrCat("nats_ingress '", options_.durable, "' is already running"));
  }
  if (thread_.joinable()) thread_.join();
  stopping_ = false;
  {
    std::lock_guard lock(status_mu_);
    thread_status_ = absl::OkStatus();
  }
  thread_ = std::thread([this] {
    absl::Status ended;
    while (!stopping_.load()) {
      absl::StatusOr<std::size_t> n = poll(options_.fetch_wait);
      if (n.ok()) continue;
      const absl::StatusCode c = n.status().code();
      if (c == absl::StatusCode::kCancelled) break;
      if (c == absl::StatusCode::kUnavailable) {
        // Disconnected: libnats reconnects; the server redelivers anything unacknowledged.
        std::this_thread::sleep_for(options_.fetch_wait);
        continue;
      }
      ended = n.status();
      break;
    }
    {
      std::lock_guard lock(status_mu_);
      thread_status_ = ended;
    }
    running_ = false;
  });
  return absl::OkStatus();
}

absl::Status nats_ingress::stop() {
  stopping_ = true;
  if (thread_.joinable()) thread_.join();
  std::lock_guard lock(status_mu_);
  return thread_status_;
}

nats_ingress_stats nats_ingress::stats() const {
  nats_ingress_stats out;
  out.fetched = counters_->fetched.load(std::memory_order_relaxed);
  out.applied = counters_->applied.load(std::memory_order_relaxed);
  out.duplicates = counters_->duplicates.load(std::memory_order_relaxed);
  out.dead_lettered = counters_->dead_lettered.load(std::memory_order_relaxed);
  out.retries = counters_->retries.load(std::memory_order_relaxed);
  out.redelivered = counters_->redelivered.load(std::memory_order_relaxed);
  out.end_to_end = counters_->end_to_end.snapshot();
  return out;
}

std::string to_prometheus(const nats_ingress_stats& s, std::string_view prefix) {
  std::string out;
  const auto d = [](auto v) { return static_cast<double>(v); };
  detail::append_metric(out, prefix, "fetched_total", "counter",
                        "Messages received, redeliveries included.", d(s.fetched));
  detail::append_metric(out, prefix, "applied_total", "counter",
                        "Messages applied: the state changed once for each.", d(s.applied));
  detail::append_metric(out, prefix, "duplicates_total", "counter",
                        "Messages applied before, acknowledged only.", d(s.duplicates));
  detail::append_metric(out, prefix, "dead_lettered_total", "counter",
                        "Messages that could not be applied, recorded and acknowledged.",
                        d(s.dead_lettered));
  detail::append_metric(out, prefix, "retries_total", "counter",
                        "Applies retried after a retryable engine error.", d(s.retries));
  detail::append_metric(out, prefix, "redelivered_total", "counter",
                        "Messages the server delivered more than once.", d(s.redelivered));
  detail::append_histogram(out, prefix, "end_to_end_latency_seconds",
                           "Time from the message's commit in the producer to its apply.",
                           s.end_to_end);
  return out;
}

}  // namespace pop
