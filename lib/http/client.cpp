// libcurl's multi interface on libuv (the pattern of curl's multi-uv example): curl tells us
// which sockets to watch (CURLMOPT_SOCKETFUNCTION -> one uv_poll_t each) and when to wake it
// (CURLMOPT_TIMERFUNCTION -> one uv_timer_t); we tell curl what happened through
// curl_multi_socket_action, never from inside one of curl's own callbacks.
#include "squall/http/client.hpp"

#include <coroutine>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <mutex>
#include <unordered_set>

#include <curl/curl.h>
#include <spdlog/spdlog.h>

#include "squall/core/uv_handle.hpp"
#include "squall/http/request.hpp"

namespace squall::http {

namespace {

constexpr std::size_t kIdleEasyHandlesKept = 64;

void global_init_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
      throw std::runtime_error("curl_global_init failed");
    }
  });
}

bool is_token_char(char c) noexcept {
  if (c >= 'a' && c <= 'z') return true;
  if (c >= 'A' && c <= 'Z') return true;
  if (c >= '0' && c <= '9') return true;
  return std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
}

bool has_control_char(std::string_view text) noexcept {
  return std::any_of(text.begin(), text.end(), [](char c) {
    const auto byte = static_cast<unsigned char>(c);
    return byte == '\r' || byte == '\n' || byte == '\0';
  });
}

std::string_view trim(std::string_view text) noexcept {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t' || text.back() == '\r' ||
                           text.back() == '\n')) {
    text.remove_suffix(1);
  }
  return text;
}

std::chrono::microseconds info_time(CURL* easy, CURLINFO what) {
  curl_off_t value = 0;
  curl_easy_getinfo(easy, what, &value);
  return std::chrono::microseconds(value);
}

FetchError::Kind kind_of(CURLcode code) noexcept {
  switch (code) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
      return FetchError::Kind::dns;
    case CURLE_COULDNT_CONNECT:
      return FetchError::Kind::connect_refused;
    case CURLE_OPERATION_TIMEDOUT:
      return FetchError::Kind::timeout;
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_SHUTDOWN_FAILED:
    case CURLE_SSL_ENGINE_NOTFOUND:
    case CURLE_SSL_ENGINE_SETFAILED:
    case CURLE_SSL_ENGINE_INITFAILED:
    case CURLE_USE_SSL_FAILED:
      return FetchError::Kind::tls;
    case CURLE_FILESIZE_EXCEEDED:
      return FetchError::Kind::too_large;
    default:
      return FetchError::Kind::protocol;
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Public value types

FetchError::FetchError(Kind kind, std::string url, const std::string& message)
    : std::runtime_error(message), kind_(kind), url_(std::move(url)) {}

std::string_view to_string(FetchError::Kind kind) noexcept {
  switch (kind) {
    case FetchError::Kind::dns:
      return "dns";
    case FetchError::Kind::connect_refused:
      return "connect_refused";
    case FetchError::Kind::timeout:
      return "timeout";
    case FetchError::Kind::tls:
      return "tls";
    case FetchError::Kind::too_large:
      return "too_large";
    case FetchError::Kind::cancelled:
      return "cancelled";
    case FetchError::Kind::protocol:
      return "protocol";
    case FetchError::Kind::queue_full:
      return "queue_full";
  }
  return "unknown";
}

std::optional<std::string_view> FetchResponse::header(std::string_view name) const noexcept {
  for (const auto& [header_name, value] : headers) {
    if (iequals(header_name, name)) return std::string_view(value);
  }
  return std::nullopt;
}

std::vector<std::string_view> FetchResponse::header_values(std::string_view name) const {
  std::vector<std::string_view> values;
  for (const auto& [header_name, value] : headers) {
    if (iequals(header_name, name)) values.emplace_back(value);
  }
  return values;
}

bool curl_resolves_asynchronously() noexcept {
  const curl_version_info_data* info = curl_version_info(CURLVERSION_NOW);
  return (info->features & CURL_VERSION_ASYNCHDNS) != 0;
}

std::string_view curl_resolver_name() noexcept {
  const curl_version_info_data* info = curl_version_info(CURLVERSION_NOW);
  if ((info->features & CURL_VERSION_ASYNCHDNS) == 0) return "blocking";
  return info->ares != nullptr ? "c-ares" : "threaded";
}

// ------------------------------------------------------------------------------------------
// Internal state

// One fetch, from fetch() until its callback ran.
struct Client::Transfer {
  Client* client = nullptr;        // The owner (for the easy handle's callbacks).
  FetchId id = 0;                  // The key in transfers_.
  FetchRequest request;            // As given; body and headers stay here while curl sends them.
  Callback callback;               // Runs once.
  CURLU* url = nullptr;            // Parsed once at fetch(); handed to curl (CURLOPT_CURLU).
  std::string host_key;            // scheme://host:port, for the per-host limit.
  CURL* easy = nullptr;            // While running.
  curl_slist* headers = nullptr;   // Request header lines, freed after the transfer.
  FetchResponse response;          // Filled as the answer arrives.
  std::size_t body_bytes = 0;      // Body bytes of the current response, streamed or kept.
  bool too_large = false;          // The write callback refused bytes beyond max_body_size.
  bool stopped_by_reader = false;  // on_body_chunk returned false (or threw).
  bool active = false;             // In curl's multi handle.
  std::uint64_t queued_at_ms = 0;  // Loop clock at fetch(), for queue_timeout.
  std::chrono::steady_clock::time_point queued_at;  // For timings.queued.
  char error_buffer[CURL_ERROR_SIZE] = {};          // curl's detailed message.

  ~Transfer() {
    curl_slist_free_all(headers);
    curl_url_cleanup(url);
  }
};

// One socket curl asked us to watch.
struct Client::Socket {
  UvHandle<uv_poll_t> poll;  // data -> this.
  Client* client = nullptr;
  curl_socket_t fd = CURL_SOCKET_BAD;
};

// What exists only while the client is open.
struct Client::Curl {
  CURLM* multi = nullptr;
  UvHandle<uv_timer_t> curl_timer;      // CURLMOPT_TIMERFUNCTION's timer; data -> the Client.
  UvHandle<uv_timer_t> queue_timer;     // Ends fetches that waited queue_timeout; the same.
  std::unordered_set<Socket*> sockets;  // Every watched socket, to close what curl leaves.
};

// ------------------------------------------------------------------------------------------
// Client

Client::Client(Loop& loop, ClientOptions options)
    : loop_(loop),
      options_(std::move(options)),
      loop_thread_(std::this_thread::get_id()),
      alive_(std::make_shared<bool>(true)) {
  global_init_once();
  if (options_.max_in_flight == 0) options_.max_in_flight = 1;
  if (options_.max_in_flight_per_host == 0) options_.max_in_flight_per_host = 1;
  if (!curl_resolves_asynchronously()) {
    spdlog::warn(
        "http client: this libcurl resolves names synchronously (no AsynchDNS): a fetch by host "
        "name blocks the loop while the name is looked up");
  }
  auto curl = std::make_unique<Curl>();
  curl->multi = curl_multi_init();
  if (curl->multi == nullptr) throw std::runtime_error("http client: curl_multi_init failed");
  curl_multi_setopt(curl->multi, CURLMOPT_SOCKETFUNCTION, &Client::on_socket);
  curl_multi_setopt(curl->multi, CURLMOPT_SOCKETDATA, this);
  curl_multi_setopt(curl->multi, CURLMOPT_TIMERFUNCTION, &Client::on_timer);
  curl_multi_setopt(curl->multi, CURLMOPT_TIMERDATA, this);
  curl_multi_setopt(curl->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS,
                    static_cast<long>(options_.max_in_flight));
  curl_multi_setopt(curl->multi, CURLMOPT_MAX_HOST_CONNECTIONS,
                    static_cast<long>(options_.max_in_flight_per_host));
  curl_multi_setopt(curl->multi, CURLMOPT_MAXCONNECTS,
                    static_cast<long>(options_.max_idle_connections));
  curl->curl_timer = UvHandle<uv_timer_t>(loop_, this, uv_timer_init, "http client timer");
  curl->queue_timer = UvHandle<uv_timer_t>(loop_, this, uv_timer_init, "http client queue timer");
  curl_ = std::move(curl);
}

Client::~Client() {
  try {
    close();
  } catch (const std::logic_error& error) {
    spdlog::error("http client destroyed off its loop thread; its handles are leaked: {}",
                  error.what());
  }
  *alive_ = false;
}

void Client::check_thread(const char* what) const {
  if (std::this_thread::get_id() != loop_thread_) {
    throw std::logic_error(std::string("http::Client::") + what +
                           " called off the loop thread; use Loop::call_soon");
  }
}

Client::FetchId Client::fetch(FetchRequest request, Callback callback) {
  check_thread("fetch");
  if (request.method.empty() ||
      !std::all_of(request.method.begin(), request.method.end(), is_token_char)) {
    throw std::invalid_argument("http::Client::fetch: method '" + request.method +
                                "' is not an HTTP token (url " + request.url + ")");
  }
  for (const auto& [name, value] : request.headers) {
    if (name.empty() || has_control_char(name) || has_control_char(value) ||
        name.find(':') != std::string::npos) {
      throw std::invalid_argument("http::Client::fetch: header '" + name +
                                  "' has an empty name, a colon in its name or CR/LF/NUL (url " +
                                  request.url + ")");
    }
  }
  auto transfer = std::make_unique<Transfer>();
  transfer->url = curl_url();
  if (transfer->url == nullptr) throw std::bad_alloc();
  if (const CURLUcode code = curl_url_set(transfer->url, CURLUPART_URL, request.url.c_str(), 0);
      code != CURLUE_OK) {
    throw std::invalid_argument("http::Client::fetch: invalid URL '" + request.url +
                                "': " + curl_url_strerror(code));
  }
  char* scheme = nullptr;
  char* host = nullptr;
  char* port = nullptr;
  curl_url_get(transfer->url, CURLUPART_SCHEME, &scheme, 0);
  curl_url_get(transfer->url, CURLUPART_HOST, &host, 0);
  curl_url_get(transfer->url, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT);
  const std::string scheme_text = scheme != nullptr ? scheme : "";
  // curl reads "http:///x" as the host "x": an empty authority is refused here instead.
  const std::size_t authority = request.url.find("://");
  const bool has_host = host != nullptr && host[0] != '\0' && authority != std::string::npos &&
                        request.url.find_first_of("/?#", authority + 3) != authority + 3 &&
                        authority + 3 < request.url.size();
  transfer->host_key =
      scheme_text + "://" + (host != nullptr ? host : "") + ":" + (port != nullptr ? port : "");
  curl_free(scheme);
  curl_free(host);
  curl_free(port);
  if (scheme_text != "http" && scheme_text != "https") {
    throw std::invalid_argument("http::Client::fetch: URL '" + request.url +
                                "' is not http:// or https://");
  }
  if (!has_host) {
    throw std::invalid_argument("http::Client::fetch: URL '" + request.url + "' has no host");
  }

  const FetchId id = next_id_++;
  transfer->client = this;
  transfer->id = id;
  transfer->request = std::move(request);
  transfer->callback = std::move(callback);
  transfer->queued_at_ms = loop_.now_ms();
  transfer->queued_at = std::chrono::steady_clock::now();

  if (!curl_ || closing_) {
    const std::string url = transfer->request.url;
    deliver(std::move(transfer), FetchError(FetchError::Kind::cancelled, url,
                                            "fetch " + url + " cancelled: the client is closed"));
    return id;
  }
  if (queue_.size() >= options_.max_queued &&
      (active_count_ >= options_.max_in_flight || !queue_.empty())) {
    const std::string url = transfer->request.url;
    deliver(std::move(transfer),
            FetchError(FetchError::Kind::queue_full, url,
                       "fetch " + url + " refused: the client's queue holds max_queued (" +
                           std::to_string(options_.max_queued) + ") fetches"));
    return id;
  }
  transfers_.emplace(id, std::move(transfer));
  queue_.push_back(id);
  if (inside_curl_ == 0) pump();
  arm_queue_timer();
  return id;
}

void Client::pump() {
  if (!curl_ || closing_ || inside_curl_ > 0) return;
  for (auto it = queue_.begin(); it != queue_.end() && active_count_ < options_.max_in_flight;) {
    Transfer& transfer = *transfers_.at(*it);
    std::size_t& per_host = active_per_host_[transfer.host_key];
    if (per_host >= options_.max_in_flight_per_host) {
      ++it;
      continue;
    }
    it = queue_.erase(it);
    ++per_host;
    ++active_count_;
    start(transfer);
  }
}

void Client::start(Transfer& transfer) {
  CURL* easy = nullptr;
  if (!idle_easy_.empty()) {
    easy = static_cast<CURL*>(idle_easy_.back());
    idle_easy_.pop_back();
  } else {
    easy = curl_easy_init();
  }
  transfer.easy = easy;
  transfer.active = true;
  const FetchRequest& request = transfer.request;
  transfer.response.timings.queued = std::chrono::duration_cast<std::chrono::microseconds>(
      std::chrono::steady_clock::now() - transfer.queued_at);

  curl_easy_setopt(easy, CURLOPT_PRIVATE, &transfer);
  curl_easy_setopt(easy, CURLOPT_CURLU, transfer.url);
  curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(easy, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, transfer.error_buffer);
  curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, &Client::on_body);
  curl_easy_setopt(easy, CURLOPT_WRITEDATA, &transfer);
  curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, &Client::on_header);
  curl_easy_setopt(easy, CURLOPT_HEADERDATA, &transfer);
  curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS,
                   static_cast<long>(std::max<std::int64_t>(request.connect_timeout.count(), 1)));
  curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, static_cast<long>(request.total_timeout.count()));
  curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, request.follow_redirects ? 1L : 0L);
  curl_easy_setopt(easy, CURLOPT_MAXREDIRS, static_cast<long>(request.max_redirects));
  curl_easy_setopt(easy, CURLOPT_MAXFILESIZE_LARGE, static_cast<curl_off_t>(request.max_body_size));
  // A lookup still running when the fetch ends (cancel, timeout) is left to finish on its own
  // thread: without this, libcurl 7.88 joins the resolver thread and blocks the loop until
  // getaddrinfo gives up.
  curl_easy_setopt(easy, CURLOPT_QUICK_EXIT, 1L);
  if (!request.ca_file.empty()) curl_easy_setopt(easy, CURLOPT_CAINFO, request.ca_file.c_str());

  bool has_user_agent = false;
  bool has_expect = false;
  for (const auto& [name, value] : request.headers) {
    has_user_agent = has_user_agent || iequals(name, "User-Agent");
    has_expect = has_expect || iequals(name, "Expect");
    const std::string line = value.empty() ? name + ";" : name + ": " + value;
    transfer.headers = curl_slist_append(transfer.headers, line.c_str());
  }
  // Without a body curl would wait up to a second for "100 Continue" before a large one.
  if (!has_expect) transfer.headers = curl_slist_append(transfer.headers, "Expect:");
  curl_easy_setopt(easy, CURLOPT_HTTPHEADER, transfer.headers);
  if (!has_user_agent && !options_.user_agent.empty()) {
    curl_easy_setopt(easy, CURLOPT_USERAGENT, options_.user_agent.c_str());
  }

  const std::string& method = request.method;
  const bool sends_body =
      !request.body.empty() || method == "POST" || method == "PUT" || method == "PATCH";
  if (method == "HEAD") {
    curl_easy_setopt(easy, CURLOPT_NOBODY, 1L);
  } else if (sends_body) {
    curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE_LARGE,
                     static_cast<curl_off_t>(request.body.size()));
    curl_easy_setopt(easy, CURLOPT_POSTFIELDS, request.body.data());
    if (method != "POST") curl_easy_setopt(easy, CURLOPT_CUSTOMREQUEST, method.c_str());
  } else if (method != "GET") {
    curl_easy_setopt(easy, CURLOPT_CUSTOMREQUEST, method.c_str());
  }

  ++stats_.started;
  const CURLMcode code = curl_multi_add_handle(curl_->multi, easy);
  if (code != CURLM_OK) {
    // Only out of memory or a misuse.
    std::snprintf(transfer.error_buffer, sizeof transfer.error_buffer, "curl_multi_add_handle: %s",
                  curl_multi_strerror(code));
    finish(transfer, FetchError(FetchError::Kind::protocol, request.url,
                                "fetch " + request.url + " failed: " + transfer.error_buffer));
  }
}

void Client::release_easy(void* handle) noexcept {
  auto* easy = static_cast<CURL*>(handle);
  if (idle_easy_.size() < kIdleEasyHandlesKept && curl_ && !closing_) {
    curl_easy_reset(easy);
    idle_easy_.push_back(easy);
  } else {
    curl_easy_cleanup(easy);
  }
}

int Client::on_socket(void* /*easy*/, int fd, int what, void* client_data, void* socket_data) {
  auto* self = static_cast<Client*>(client_data);
  auto* socket = static_cast<Socket*>(socket_data);
  if (what == CURL_POLL_REMOVE) {
    if (socket != nullptr) {
      // Closed now, not later: curl may close the fd and get the same number for a new socket.
      curl_multi_assign(self->curl_->multi, fd, nullptr);
      self->curl_->sockets.erase(socket);
      delete socket;
    }
    return 0;
  }
  if (socket == nullptr) {
    auto watched = std::make_unique<Socket>();
    watched->client = self;
    watched->fd = fd;
    try {
      watched->poll = UvHandle<uv_poll_t>(
          self->loop_, watched.get(),
          [fd](uv_loop_t* loop, uv_poll_t* poll) { return uv_poll_init_socket(loop, poll, fd); },
          "poll for an http client socket");
    } catch (const std::exception& error) {
      spdlog::error("http client: {}", error.what());
      return -1;
    }
    socket = watched.release();
    self->curl_->sockets.insert(socket);
    curl_multi_assign(self->curl_->multi, fd, socket);
  }
  int events = 0;
  if ((what & CURL_POLL_IN) != 0) events |= UV_READABLE;
  if ((what & CURL_POLL_OUT) != 0) events |= UV_WRITABLE;
  if (!socket->poll.is_open()) return 0;  // Loop::close() closed it.
  uv_poll_start(socket->poll.get(), events, [](uv_poll_t* poll, int status, int ready) {
    auto* watched = static_cast<Socket*>(poll->data);
    int flags = 0;
    if (status < 0) {
      flags = CURL_CSELECT_ERR;
    } else {
      if ((ready & UV_READABLE) != 0) flags |= CURL_CSELECT_IN;
      if ((ready & UV_WRITABLE) != 0) flags |= CURL_CSELECT_OUT;
    }
    // The socket may be closed during the call: nothing of it is used afterwards.
    watched->client->socket_action(watched->fd, flags);
  });
  return 0;
}

int Client::on_timer(void* /*multi*/, long timeout_ms, void* client_data) {
  auto* self = static_cast<Client*>(client_data);
  uv_timer_t* timer = self->curl_->curl_timer.get();
  if (!self->curl_->curl_timer.is_open()) return 0;  // Loop::close() closed it.
  if (timeout_ms < 0) {
    uv_timer_stop(timer);
    return 0;
  }
  // 0 means "as soon as possible", which is the loop's next timer phase, never from here: curl
  // forbids calling curl_multi_socket_action from inside its own callbacks.
  uv_timer_start(
      timer,
      [](uv_timer_t* fired) {
        static_cast<Client*>(fired->data)->socket_action(CURL_SOCKET_TIMEOUT, 0);
      },
      static_cast<std::uint64_t>(timeout_ms), 0);
  return 0;
}

void Client::socket_action(int fd, int events) {
  if (!curl_) return;
  int running = 0;
  ++inside_curl_;
  curl_multi_socket_action(curl_->multi, fd, events, &running);
  --inside_curl_;
  // cancel() calls made by on_body_chunk while curl was running.
  std::vector<FetchId> cancels;
  cancels.swap(deferred_cancels_);
  const auto alive = alive_;
  for (const FetchId id : cancels) {
    cancel(id);
    if (!*alive) return;
  }
  collect_done();
  if (!*alive) return;
  if (close_pending_) {
    close();
    return;
  }
  pump();
}

void Client::collect_done() {
  if (!curl_) return;
  // Read every message first: callbacks may cancel or start fetches, which changes the list.
  std::vector<std::pair<FetchId, CURLcode>> done;
  int left = 0;
  while (CURLMsg* message = curl_multi_info_read(curl_->multi, &left)) {
    if (message->msg != CURLMSG_DONE) continue;
    Transfer* transfer = nullptr;
    curl_easy_getinfo(message->easy_handle, CURLINFO_PRIVATE, &transfer);
    if (transfer != nullptr) done.emplace_back(transfer->id, message->data.result);
  }
  const auto alive = alive_;
  for (const auto& [id, code] : done) {
    const auto it = transfers_.find(id);
    if (it == transfers_.end() || !it->second->active) continue;  // Cancelled meanwhile.
    Transfer& transfer = *it->second;
    if (code == CURLE_OK) {
      finish(transfer, std::nullopt);
    } else {
      const std::string& url = transfer.request.url;
      FetchError::Kind kind = kind_of(code);
      std::string detail =
          transfer.error_buffer[0] != '\0' ? transfer.error_buffer : curl_easy_strerror(code);
      if (transfer.too_large || code == CURLE_FILESIZE_EXCEEDED) {
        kind = FetchError::Kind::too_large;
        detail = "the response body exceeds max_body_size (" +
                 std::to_string(transfer.request.max_body_size) + " bytes)";
      } else if (transfer.stopped_by_reader) {
        kind = FetchError::Kind::cancelled;
        detail = "on_body_chunk stopped it";
      } else if (code == CURLE_TOO_MANY_REDIRECTS) {
        detail = "more than max_redirects (" + std::to_string(transfer.request.max_redirects) +
                 ") redirects";
      }
      finish(transfer, FetchError(kind, url,
                                  "fetch " + url + " failed (" + std::string(to_string(kind)) +
                                      "): " + detail));
    }
    if (!*alive) return;
  }
}

void Client::finish(Transfer& transfer, std::optional<FetchError> error) {
  CURL* easy = static_cast<CURL*>(transfer.easy);
  if (transfer.active) {
    curl_multi_remove_handle(curl_->multi, easy);
    transfer.active = false;
    --active_count_;
    if (--active_per_host_[transfer.host_key] == 0) active_per_host_.erase(transfer.host_key);
  }
  if (!error) {
    FetchResponse& response = transfer.response;
    long status = 0;
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
    response.status = static_cast<int>(status);
    char* effective_url = nullptr;
    curl_easy_getinfo(easy, CURLINFO_EFFECTIVE_URL, &effective_url);
    if (effective_url != nullptr) response.effective_url = effective_url;
    long redirects = 0;
    curl_easy_getinfo(easy, CURLINFO_REDIRECT_COUNT, &redirects);
    response.redirects = static_cast<int>(redirects);
    FetchTimings& timings = response.timings;
    timings.dns = info_time(easy, CURLINFO_NAMELOOKUP_TIME_T);
    timings.connect = info_time(easy, CURLINFO_CONNECT_TIME_T);
    timings.tls = info_time(easy, CURLINFO_APPCONNECT_TIME_T);
    timings.first_byte = info_time(easy, CURLINFO_STARTTRANSFER_TIME_T);
    timings.total = info_time(easy, CURLINFO_TOTAL_TIME_T);
  }
  if (easy != nullptr) {
    transfer.easy = nullptr;
    release_easy(easy);
  }
  auto it = transfers_.find(transfer.id);
  std::unique_ptr<Transfer> owned = std::move(it->second);
  transfers_.erase(it);
  if (error) {
    deliver(std::move(owned), FetchResult(std::move(*error)));
  } else {
    FetchResponse response = std::move(owned->response);
    deliver(std::move(owned), FetchResult(std::move(response)));
  }
}

void Client::deliver(std::unique_ptr<Transfer> transfer, FetchResult result) {
  if (result.ok()) {
    ++stats_.completed;
  } else if (result.error().kind() == FetchError::Kind::cancelled) {
    ++stats_.cancelled;
  } else {
    ++stats_.failed;
  }
  Callback callback = std::move(transfer->callback);
  transfer.reset();
  if (!callback) return;
  try {
    callback(std::move(result));
  } catch (const std::exception& error) {
    spdlog::error("http client: a fetch callback threw: {}", error.what());
  } catch (...) {
    spdlog::error("http client: a fetch callback threw a non-exception");
  }
}

bool Client::cancel(FetchId id) {
  check_thread("cancel");
  const auto it = transfers_.find(id);
  if (it == transfers_.end()) return false;
  Transfer& transfer = *it->second;
  const std::string url = transfer.request.url;
  FetchError error(FetchError::Kind::cancelled, url, "fetch " + url + " cancelled");
  if (transfer.active) {
    if (inside_curl_ > 0) {
      // From on_body_chunk: curl forbids removing a handle from inside its callbacks. It is
      // removed as soon as curl returns, before any other callback of this client runs.
      if (std::find(deferred_cancels_.begin(), deferred_cancels_.end(), id) ==
          deferred_cancels_.end()) {
        deferred_cancels_.push_back(id);
      }
      return true;
    }
    finish(transfer, std::move(error));
    return true;
  }
  queue_.erase(std::find(queue_.begin(), queue_.end(), id));
  std::unique_ptr<Transfer> owned = std::move(it->second);
  transfers_.erase(it);
  deliver(std::move(owned), std::move(error));
  return true;
}

void Client::arm_queue_timer() {
  if (!curl_ || queue_.empty() || options_.queue_timeout.count() <= 0) return;
  if (!curl_->queue_timer.is_open() || uv_is_active(curl_->queue_timer.handle()) != 0) return;
  const Transfer& oldest = *transfers_.at(queue_.front());
  const std::uint64_t deadline =
      oldest.queued_at_ms + static_cast<std::uint64_t>(options_.queue_timeout.count());
  const std::uint64_t now = loop_.now_ms();
  uv_timer_start(
      curl_->queue_timer.get(),
      [](uv_timer_t* timer) { static_cast<Client*>(timer->data)->expire_queue(); },
      deadline > now ? deadline - now : 0, 0);
}

void Client::expire_queue() {
  const auto alive = alive_;
  const std::uint64_t timeout = static_cast<std::uint64_t>(options_.queue_timeout.count());
  while (curl_ && !queue_.empty()) {
    const FetchId id = queue_.front();
    const auto it = transfers_.find(id);
    if (it->second->queued_at_ms + timeout > loop_.now_ms()) break;
    queue_.pop_front();
    std::unique_ptr<Transfer> owned = std::move(it->second);
    transfers_.erase(it);
    const std::string url = owned->request.url;
    deliver(std::move(owned),
            FetchError(FetchError::Kind::timeout, url,
                       "fetch " + url + " timed out after waiting queue_timeout (" +
                           std::to_string(timeout) + " ms) in the client's queue (" +
                           std::to_string(options_.max_in_flight) + " in flight)"));
    if (!*alive) return;
  }
  arm_queue_timer();
}

void Client::close() {
  check_thread("close");
  if (!curl_) return;
  if (inside_curl_ > 0) {
    // From on_body_chunk: finished as soon as curl returns.
    close_pending_ = true;
    return;
  }
  closing_ = true;
  // Every pending fetch ends as cancelled, oldest first; fetches started by those callbacks
  // end at once the same way.
  std::vector<FetchId> ids;
  ids.reserve(transfers_.size());
  for (const auto& entry : transfers_) ids.push_back(entry.first);
  std::sort(ids.begin(), ids.end());
  const auto alive = alive_;
  for (const FetchId id : ids) {
    const auto it = transfers_.find(id);
    if (it == transfers_.end()) continue;
    Transfer& transfer = *it->second;
    const std::string url = transfer.request.url;
    FetchError error(FetchError::Kind::cancelled, url,
                     "fetch " + url + " cancelled: the client was closed");
    if (transfer.active) {
      finish(transfer, std::move(error));
    } else {
      queue_.erase(std::find(queue_.begin(), queue_.end(), id));
      std::unique_ptr<Transfer> owned = std::move(it->second);
      transfers_.erase(it);
      deliver(std::move(owned), std::move(error));
    }
    if (!*alive) return;
  }
  for (void* easy : idle_easy_) curl_easy_cleanup(static_cast<CURL*>(easy));
  idle_easy_.clear();
  // curl closes its cached connections here and may still report sockets to forget.
  curl_multi_cleanup(curl_->multi);
  curl_->multi = nullptr;
  // Each handle closes (or, after Loop::close(), is freed) with its owner.
  for (Socket* socket : curl_->sockets) delete socket;
  curl_->sockets.clear();
  curl_.reset();
}

// ------------------------------------------------------------------------------------------
// Easy-handle callbacks (inside curl: no multi call, no exception out)

std::size_t Client::on_body(char* data, std::size_t size, std::size_t count, void* user) {
  auto* transfer = static_cast<Transfer*>(user);
  const std::size_t length = size * count;
  if (transfer->body_bytes + length > transfer->request.max_body_size) {
    transfer->too_large = true;
    return 0;
  }
  transfer->body_bytes += length;
  if (transfer->request.on_body_chunk) {
    bool go_on = false;
    try {
      go_on = transfer->request.on_body_chunk(std::string_view(data, length));
    } catch (const std::exception& error) {
      spdlog::error("http client: on_body_chunk for {} threw: {}", transfer->request.url,
                    error.what());
    } catch (...) {
      spdlog::error("http client: on_body_chunk for {} threw", transfer->request.url);
    }
    if (!go_on) {
      transfer->stopped_by_reader = true;
      return 0;
    }
  } else {
    transfer->response.body.append(data, length);
  }
  return length;
}

std::size_t Client::on_header(char* data, std::size_t size, std::size_t count, void* user) {
  auto* transfer = static_cast<Transfer*>(user);
  const std::size_t length = size * count;
  const std::string_view line(data, length);
  auto& headers = transfer->response.headers;
  try {
    if (line.rfind("HTTP/", 0) == 0) {
      // A new response (after a 1xx or a redirect): keep only the last one's headers.
      headers.clear();
      if (!transfer->request.on_body_chunk) transfer->response.body.clear();
      transfer->body_bytes = 0;
    } else if (!line.empty() && (line.front() == ' ' || line.front() == '\t')) {
      if (!headers.empty()) {
        headers.back().second.append(" ").append(trim(line));
      }
    } else if (const auto colon = line.find(':'); colon != std::string_view::npos) {
      headers.emplace_back(std::string(trim(line.substr(0, colon))),
                           std::string(trim(line.substr(colon + 1))));
    }
  } catch (const std::exception&) {
    return 0;  // Out of memory: curl ends the transfer with a write error.
  }
  return length;
}

// ---- the coroutine form ------------------------------------------------------------------------

Task<FetchResponse> Client::fetch(FetchRequest request) {
  co_return co_await detail::FetchOperation(*this, std::move(request));
}

namespace detail {

struct FetchOperation::State {
  std::coroutine_handle<> waiter;     // Resumed once the result is in; null when none waits.
  std::optional<FetchResult> result;  // The fetch's outcome.
  bool stop_requested = false;        // The task's token fired (the fetch was cancelled).
};

bool FetchOperation::start(std::coroutine_handle<> waiter, std::stop_token token) {
  if (token.stop_requested()) {
    state_ = std::make_shared<State>();
    state_->stop_requested = true;
    return false;
  }
  state_ = std::make_shared<State>();
  std::weak_ptr<State> weak = state_;
  Loop& loop = client_->loop();
  id_ = client_->fetch(std::move(request_), [weak, &loop](FetchResult result) {
    const auto state = weak.lock();
    if (!state) return;  // The awaiting frame is gone.
    state->result.emplace(std::move(result));
    if (!state->waiter) return;  // Ended inside fetch() or before the task suspended.
    // Resume on a later turn: never inside the client, nor inside request_stop().
    loop.call_soon([weak] {
      if (const auto alive = weak.lock(); alive && alive->waiter) {
        std::exchange(alive->waiter, nullptr).resume();
      }
    });
  });
  if (state_->result) return false;  // The client was closed or its queue full: done at once.
  state_->waiter = waiter;
  if (token.stop_possible()) on_stop_.emplace(std::move(token), OnStop{this});
  return true;
}

void FetchOperation::OnStop::operator()() const noexcept {
  self->state_->stop_requested = true;
  // The callback runs inside cancel() with a `cancelled` error and schedules the resumption.
  if (!self->state_->result) self->client_->cancel(self->id_);
}

FetchResponse FetchOperation::await_resume() {
  on_stop_.reset();
  if (state_->stop_requested) throw CancelledError("fetch cancelled: the task was stopped");
  FetchResult& result = *state_->result;
  if (!result.ok()) throw result.error();
  return std::move(result.response());
}

FetchOperation::~FetchOperation() {
  on_stop_.reset();
  // A frame destroyed while its fetch runs (Loop::close, a cancelled when_any): the fetch ends
  // now. Once it has a result, the client may already be gone: it is not touched.
  if (state_ && state_->waiter && !state_->result) {
    state_->waiter = nullptr;
    client_->cancel(id_);
  }
}

}  // namespace detail

}  // namespace squall::http
