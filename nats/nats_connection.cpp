#include "pop/nats/nats_connection.hpp"

#include <nats/nats.h>

#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pop/contracts/status.hpp"
#include "pop/nats/detail/nats_status.hpp"

namespace pop {
namespace detail {

absl::Status from_nats(natsStatus s, std::string_view what, jsErrCode js_err) {
  if (s == NATS_OK) return absl::OkStatus();
  const char* last = nats_GetLastError(nullptr);
  std::string text = absl::StrCat(to_absl(what), ": ", natsStatus_GetText(s));
  if (last != nullptr && *last != '\0' && !absl::StrContains(text, last)) {
    absl::StrAppend(&text, " (", last, ")");
  }
  if (js_err != 0) absl::StrAppend(&text, " [JetStream error ", static_cast<int>(js_err), "]");
  if (js_err == JSStreamNotFoundErr || js_err == JSConsumerNotFoundErr || s == NATS_NOT_FOUND) {
    return absl::NotFoundError(text);
  }
  switch (s) {
    case NATS_TIMEOUT:
    case NATS_CONNECTION_CLOSED:
    case NATS_CONNECTION_DISCONNECTED:
    case NATS_NO_SERVER:
    case NATS_STALE_CONNECTION:
    case NATS_IO_ERROR:
    case NATS_NO_RESPONDERS:
    case NATS_NOT_YET_CONNECTED:
    case NATS_INSUFFICIENT_BUFFER:
    case NATS_SLOW_CONSUMER:
    case NATS_DRAINING:
    case NATS_CONNECTION_AUTH_FAILED:
    case NATS_NOT_PERMITTED:
    case NATS_SSL_ERROR:
      return absl::UnavailableError(text);
    case NATS_INVALID_ARG:
    case NATS_INVALID_SUBJECT:
    case NATS_INVALID_SUBSCRIPTION:
    case NATS_INVALID_TIMEOUT:
    case NATS_MAX_PAYLOAD:
      return absl::InvalidArgumentError(text);
    default:
      return absl::FailedPreconditionError(text);
  }
}

bool valid_nats_name(std::string_view name) {
  if (name.empty() || name.size() > 255) return false;
  for (const char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_';
    if (!ok) return false;
  }
  return true;
}

namespace {

struct options_deleter {
  void operator()(natsOptions* o) const { natsOptions_Destroy(o); }
};

nats_stream_info to_info(const jsStreamInfo* si) {
  nats_stream_info out;
  if (si->Config != nullptr) {
    if (si->Config->Name != nullptr) out.name = si->Config->Name;
    out.duplicate_window = std::chrono::milliseconds(si->Config->Duplicates / 1'000'000);
    for (int i = 0; i < si->Config->SubjectsLen; ++i)
      out.subjects.emplace_back(si->Config->Subjects[i]);
  }
  out.messages = si->State.Msgs;
  out.bytes = si->State.Bytes;
  out.first_sequence = si->State.FirstSeq;
  out.last_sequence = si->State.LastSeq;
  return out;
}

}  // namespace
}  // namespace detail

absl::Status validate(const nats_connection_options& o) {
  if (o.servers.empty()) {
    return absl::InvalidArgumentError(
        "nats_connection_options.servers is empty: name at least one URL");
  }
  for (const std::string& s : o.servers) {
    if (s.empty() || s.find_first_of(" \t\r\n,") != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("nats_connection_options.servers: '", s, "' is not a server URL"));
    }
  }
  if (o.connect_timeout.count() <= 0 || o.api_timeout.count() <= 0 ||
      o.write_deadline.count() <= 0) {
    return absl::InvalidArgumentError(
        "nats_connection_options: connect_timeout, api_timeout and write_deadline must be "
        "positive");
  }
  if (o.reconnect_wait.count() < 0 || o.max_reconnect < -1 || o.reconnect_buffer_bytes <= 0) {
    return absl::InvalidArgumentError(
        "nats_connection_options: reconnect_wait must not be negative, reconnect_buffer_bytes "
        "must be positive, max_reconnect must be -1 (forever) or more");
  }
  if (!o.credentials_file.empty() && (!o.user.empty() || !o.token.empty())) {
    return absl::InvalidArgumentError(
        "nats_connection_options: give one of credentials_file, user/password or token");
  }
  if (!o.user.empty() && !o.token.empty()) {
    return absl::InvalidArgumentError(
        "nats_connection_options: give user/password or token, not both");
  }
  if (o.tls.cert_file.empty() != o.tls.key_file.empty()) {
    return absl::InvalidArgumentError(
        "nats_connection_options.tls: cert_file and key_file go together");
  }
  return absl::OkStatus();
}

void nats_connection::on_disconnected(natsConnection*, void* self) {
  static_cast<nats_connection*>(self)->disconnects_.fetch_add(1, std::memory_order_relaxed);
}
void nats_connection::on_reconnected(natsConnection*, void* self) {
  static_cast<nats_connection*>(self)->reconnects_.fetch_add(1, std::memory_order_relaxed);
}
void nats_connection::on_connected(natsConnection*, void*) {}
void nats_connection::on_closed(natsConnection*, void* closure) {
  auto* self = static_cast<nats_connection*>(closure);
  std::lock_guard lock(self->closed_mu_);
  self->closed_ = true;
  self->closed_cv_.notify_all();
}

absl::StatusOr<std::unique_ptr<nats_connection>> nats_connection::connect(
    nats_connection_options opts) {
  POP_RETURN_IF_ERROR(validate(opts));
  std::unique_ptr<nats_connection> c(new nats_connection(std::move(opts)));
  const nats_connection_options& o = c->options_;
  natsOptions* raw = nullptr;
  POP_RETURN_IF_ERROR(detail::from_nats(natsOptions_Create(&raw), "nats: creating options"));
  std::unique_ptr<natsOptions, detail::options_deleter> no(raw);
  std::vector<const char*> servers;
  for (const std::string& s : o.servers) servers.push_back(s.c_str());
  const std::string where = absl::StrCat("nats: ", absl::StrJoin(o.servers, ","));
  const auto check = [&](natsStatus s, const char* what) {
    return detail::from_nats(s, absl::StrCat(where, ": ", what));
  };
  POP_RETURN_IF_ERROR(
      check(natsOptions_SetServers(no.get(), servers.data(), static_cast<int>(servers.size())),
            "servers"));
  POP_RETURN_IF_ERROR(check(natsOptions_SetNoRandomize(no.get(), true), "server order"));
  POP_RETURN_IF_ERROR(check(natsOptions_SetName(no.get(), o.name.c_str()), "name"));
  POP_RETURN_IF_ERROR(
      check(natsOptions_SetTimeout(no.get(), o.connect_timeout.count()), "timeout"));
  POP_RETURN_IF_ERROR(
      check(natsOptions_SetWriteDeadline(no.get(), o.write_deadline.count()), "write_deadline"));
  POP_RETURN_IF_ERROR(
      check(natsOptions_SetMaxReconnect(no.get(), o.max_reconnect), "max_reconnect"));
  POP_RETURN_IF_ERROR(
      check(natsOptions_SetReconnectWait(no.get(), o.reconnect_wait.count()), "reconnect_wait"));
  POP_RETURN_IF_ERROR(check(natsOptions_SetReconnectBufSize(no.get(), o.reconnect_buffer_bytes),
                            "reconnect_buffer_bytes"));
  POP_RETURN_IF_ERROR(
      check(natsOptions_SetDisconnectedCB(no.get(), &nats_connection::on_disconnected, c.get()),
            "callback"));
  POP_RETURN_IF_ERROR(
      check(natsOptions_SetReconnectedCB(no.get(), &nats_connection::on_reconnected, c.get()),
            "callback"));
  POP_RETURN_IF_ERROR(
      check(natsOptions_SetClosedCB(no.get(), &nats_connection::on_closed, c.get()), "callback"));
  if (o.retry_initial_connect) {
    // With a connected callback libnats returns at once and connects in the background (without
    // one it would block until connected).
    POP_RETURN_IF_ERROR(check(natsOptions_SetRetryOnFailedConnect(
                                  no.get(), true, &nats_connection::on_connected, c.get()),
                              "retry"));
  }
  if (!o.credentials_file.empty()) {
    POP_RETURN_IF_ERROR(check(
        natsOptions_SetUserCredentialsFromFiles(no.get(), o.credentials_file.c_str(), nullptr),
        absl::StrCat("credentials file '", o.credentials_file, "'").c_str()));
  }
  if (!o.user.empty()) {
    POP_RETURN_IF_ERROR(
        check(natsOptions_SetUserInfo(no.get(), o.user.c_str(), o.password.c_str()), "user"));
  }
  if (!o.token.empty()) {
    POP_RETURN_IF_ERROR(check(natsOptions_SetToken(no.get(), o.token.c_str()), "token"));
  }
  if (o.tls.enabled) {
    POP_RETURN_IF_ERROR(check(natsOptions_SetSecure(no.get(), true), "tls"));
    if (!o.tls.ca_file.empty()) {
      POP_RETURN_IF_ERROR(
          check(natsOptions_LoadCATrustedCertificates(no.get(), o.tls.ca_file.c_str()),
                absl::StrCat("tls ca_file '", o.tls.ca_file, "'").c_str()));
    }
    if (!o.tls.cert_file.empty()) {
      POP_RETURN_IF_ERROR(check(natsOptions_LoadCertificatesChain(no.get(), o.tls.cert_file.c_str(),
                                                                  o.tls.key_file.c_str()),
                                absl::StrCat("tls cert_file '", o.tls.cert_file, "'").c_str()));
    }
    if (!o.tls.expected_hostname.empty()) {
      POP_RETURN_IF_ERROR(
          check(natsOptions_SetExpectedHostname(no.get(), o.tls.expected_hostname.c_str()),
                "tls hostname"));
    }
    if (!o.tls.ciphers.empty()) {
      POP_RETURN_IF_ERROR(
          check(natsOptions_SetCiphers(no.get(), o.tls.ciphers.c_str()), "tls ciphers"));
    }
    if (o.tls.skip_verify) {
      POP_RETURN_IF_ERROR(check(natsOptions_SkipServerVerification(no.get(), true), "tls verify"));
    }
  }
  const natsStatus s = natsConnection_Connect(&c->nc_, no.get());
  if (s != NATS_OK && !(s == NATS_NOT_YET_CONNECTED && o.retry_initial_connect)) {
    c->nc_ = nullptr;
    return detail::from_nats(s, absl::StrCat(where, ": connecting"));
  }
  jsOptions jo;
  jsOptions_Init(&jo);
  jo.Wait = o.api_timeout.count();
  POP_RETURN_IF_ERROR(check(natsConnection_JetStream(&c->js_, c->nc_, &jo), "JetStream context"));
  return c;
}

nats_connection::~nats_connection() {
  if (js_ != nullptr) jsCtx_Destroy(js_);
  if (nc_ != nullptr) {
    natsConnection_Close(nc_);
    std::unique_lock lock(closed_mu_);
    closed_cv_.wait_for(lock, std::chrono::seconds(10), [&] { return closed_; });
    lock.unlock();
    natsConnection_Destroy(nc_);
  }
}

nats_connection_stats nats_connection::stats() const {
  return {nc_ != nullptr && natsConnection_Status(nc_) == NATS_CONN_STATUS_CONNECTED,
          disconnects_.load(std::memory_order_relaxed),
          reconnects_.load(std::memory_order_relaxed)};
}

absl::StatusOr<nats_stream_info> stream_info(nats_connection& c, const std::string& name) {
  jsStreamInfo* si = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  const natsStatus s = js_GetStreamInfo(&si, c.jetstream(), name.c_str(), nullptr, &jerr);
  if (s != NATS_OK) return detail::from_nats(s, absl::StrCat("nats: stream '", name, "'"), jerr);
  nats_stream_info out = detail::to_info(si);
  jsStreamInfo_Destroy(si);
  return out;
}

absl::StatusOr<nats_stream_info> ensure_stream(nats_connection& c, const nats_stream_options& o) {
  if (!detail::valid_nats_name(o.name)) {
    return absl::InvalidArgumentError(absl::StrCat("nats_stream_options.name '", o.name,
                                                   "' must be 1-255 letters, digits, '-' or '_'"));
  }
  if (o.subjects.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("nats_stream_options.subjects of stream '", o.name, "' is empty"));
  }
  if (o.duplicate_window.count() < 0 || o.max_age.count() < 0 || o.replicas < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("nats_stream_options of stream '", o.name,
                     "': duplicate_window and max_age must not be negative, replicas at least 1"));
  }
  std::vector<const char*> subjects;
  for (const std::string& s : o.subjects) {
    if (s.empty() || s.find_first_of(" \t\r\n") != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("nats_stream_options of stream '", o.name, "': bad subject '", s, "'"));
    }
    subjects.push_back(s.c_str());
  }
  jsStreamConfig cfg;
  jsStreamConfig_Init(&cfg);
  cfg.Name = o.name.c_str();
  cfg.Subjects = subjects.data();
  cfg.SubjectsLen = static_cast<int>(subjects.size());
  cfg.Storage = o.storage == nats_storage::file ? js_FileStorage : js_MemoryStorage;
  cfg.Replicas = o.replicas;
  cfg.Duplicates = static_cast<std::int64_t>(o.duplicate_window.count()) * 1'000'000;
  cfg.MaxAge = static_cast<std::int64_t>(o.max_age.count()) * 1'000'000;
  cfg.MaxBytes = o.max_bytes;

  absl::StatusOr<nats_stream_info> existing = stream_info(c, o.name);
  if (!existing.ok() && existing.status().code() != absl::StatusCode::kNotFound) {
    return existing.status();
  }
  jsStreamInfo* si = nullptr;
  jsErrCode jerr = static_cast<jsErrCode>(0);
  natsStatus s;
  const char* what;
  if (!existing.ok()) {
    s = js_AddStream(&si, c.jetstream(), &cfg, nullptr, &jerr);
    what = "creating";
  } else if (existing->subjects != o.subjects || existing->duplicate_window != o.duplicate_window) {
    s = js_UpdateStream(&si, c.jetstream(), &cfg, nullptr, &jerr);
    what = "updating";
  } else {
    return existing;
  }
  if (s != NATS_OK) {
    absl::Status st =
        detail::from_nats(s, absl::StrCat("nats: ", what, " stream '", o.name, "'"), jerr);
    // A refusal by the server is not a missing stream, whatever its code says.
    if (st.code() == absl::StatusCode::kNotFound)
      return absl::FailedPreconditionError(st.message());
    return st;
  }
  nats_stream_info out = detail::to_info(si);
  jsStreamInfo_Destroy(si);
  return out;
}

}  // namespace pop
