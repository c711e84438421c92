#include "pop/nats/nats_ingress.hpp"

#include <nats/nats.h>

#include <algorithm>
#include <cstdio>
#include <stdexcept>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
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
  jsSubOptions so;
  jsSubOptions_Init(&so);
  so.Stream = opt.stream.c_str();
  so.Consumer = opt.durable.c_str();
  so.ManualAck = true;
  jerr = static_cast<jsErrCode>(0);
  s = js_PullSubscribe(&self.sub_, self.js_,
                       opt.filter_subject.empty() ? nullptr : opt.filter_subject.c_str(),
                       opt.durable.c_str(), &jo, &so, &jerr);
  POP_RETURN_IF_ERROR(detail::from_nats(s, absl::StrCat(where, ": subscribing"), jerr));
  if (unacked && opt.redeliveries_first) {
    self.hold_until_ = std::chrono::steady_clock::now() + opt.ack_wait;
  }
  return in_ptr;
}

nats_ingress::~nats_ingress() {
  static_cast<void>(stop());
  if (sub_ != nullptr) natsSubscription_Destroy(sub_);
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
  jsMsgMetaData* meta = nullptr;
  std::uint64_t seq = 0;
  if (natsMsg_GetMetaData(&meta, msg) == NATS_OK) {
    seq = meta->Sequence.Stream;
    if (meta->NumDelivered > 1) counters_->redelivered.fetch_add(1, std::memory_order_relaxed);
    jsMsgMetaData_Destroy(meta);
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
        static_cast<void>(natsMsg_InProgress(msg, nullptr));
        last_progress = std::chrono::steady_clock::now();
      }
    }
  }
  if (!outcome.ok()) POP_RETURN_IF_ERROR(dead_letter(msg, seq, outcome));
  // The commit is durable (execute returned): acknowledge. A lost ack means a redelivery, which
  // the inbox absorbs.
  static_cast<void>(natsMsg_Ack(msg, nullptr));
  return absl::OkStatus();
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
  natsMsgList list{};
  jsErrCode jerr = static_cast<jsErrCode>(0);
  const natsStatus s = natsSubscription_Fetch(&list, sub_, options_.batch,
                                              std::max<std::int64_t>(1, wait.count()), &jerr);
  if (s == NATS_TIMEOUT) return 0;
  if (s != NATS_OK) {
    absl::Status st = detail::from_nats(s,
                                        absl::StrCat("nats_ingress '", options_.durable,
                                                     "': fetching from '", options_.stream, "'"),
                                        jerr);
    return absl::UnavailableError(st.message());
  }
  counters_->fetched.fetch_add(static_cast<std::uint64_t>(list.Count), std::memory_order_relaxed);
  // Lanes: one per key, in stream order within it; messages without a key each alone.
  std::vector<std::vector<natsMsg*>> lanes;
  absl::flat_hash_map<std::string, std::size_t> lane_of;
  for (int i = 0; i < list.Count; ++i) {
    const std::string key = header(list.Msgs[i], detail::header_key);
    if (key.empty()) {
      lanes.push_back({list.Msgs[i]});
      continue;
    }
    const auto [it, fresh] = lane_of.try_emplace(key, lanes.size());
    if (fresh) lanes.emplace_back();
    lanes[it->second].push_back(list.Msgs[i]);
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
        static_cast<void>(natsMsg_Nak(lanes[l][i], nullptr));
      }
    }
  }
  natsMsgList_Destroy(&list);
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
