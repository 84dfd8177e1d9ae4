// An asynchronous HTTP client on the loop (Tornado's AsyncHTTPClient): libcurl's multi interface
// driven by libuv, one Client per Loop, every call and every callback on the loop thread.
//
//   http::Client client(loop);
//   http::FetchRequest request;
//   request.url = "http://127.0.0.1:8080/plaintext";
//   client.fetch(std::move(request), [](http::FetchResult result) {
//     if (result.ok()) std::printf("%d %s\n", result.response().status, ...);
//     else std::printf("%s\n", result.error().what());
//   });
//
// or in a coroutine, where an error is thrown as FetchError and a stop request on the task's
// token cancels the fetch (CancelledError):
//
//   http::FetchResponse response = co_await client.fetch(std::move(request));
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "squall/core/cancel.hpp"
#include "squall/core/loop.hpp"
#include "squall/core/task.hpp"

namespace squall::http {

// One outgoing request. Only `url` is required.
struct FetchRequest {
  std::string method = "GET";  // Any token; HEAD asks for no body.
  std::string url;             // http:// or https:// only.
  // Sent in order. CR, LF or NUL in a name or value is refused (std::invalid_argument).
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;  // Sent as is (set Content-Type yourself); POST/PUT/PATCH send it even empty.
  std::chrono::milliseconds connect_timeout{10'000};  // Name lookup + TCP + TLS handshake.
  std::chrono::milliseconds total_timeout{30'000};    // The whole transfer; 0 = no limit.
  bool follow_redirects = false;                      // Off by default.
  int max_redirects = 5;                              // With follow_redirects: beyond -> error.
  std::size_t max_body_size = 64 * 1024 * 1024;       // Larger bodies end in a too_large error.
  // When set, body bytes go here as they arrive instead of into FetchResponse::body (the size
  // limit still applies). Return false to stop the fetch (it ends as `cancelled`).
  std::function<bool(std::string_view chunk)> on_body_chunk;
  std::string ca_file;  // PEM file of trusted CAs for https ("" = the system's store).
};

// Seconds from the start of the transfer (curl's convention), each including the ones before:
// dns <= connect <= tls <= first_byte <= total. tls is 0 for http://.
struct FetchTimings {
  std::chrono::microseconds queued{0};      // Waiting in the client's queue before the transfer.
  std::chrono::microseconds dns{0};         // Name resolved.
  std::chrono::microseconds connect{0};     // TCP connected (0 when a connection was reused).
  std::chrono::microseconds tls{0};         // TLS handshake done.
  std::chrono::microseconds first_byte{0};  // First byte of the response.
  std::chrono::microseconds total{0};       // Last byte.
};

// Any status, 1xx excepted: a 404 or a 500 is a response, not an error.
struct FetchResponse {
  int status = 0;
  // The final response's header lines in order; repeated names stay separate entries.
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;           // Empty when the request streamed it to on_body_chunk.
  std::string effective_url;  // After redirects.
  int redirects = 0;          // Redirects followed.
  FetchTimings timings;

  // The first header named `name` (case-insensitive).
  std::optional<std::string_view> header(std::string_view name) const noexcept;
  // Every header named `name`, in order (e.g. several Set-Cookie).
  std::vector<std::string_view> header_values(std::string_view name) const;
};

// Why a fetch ended without a response. what() names the URL.
class FetchError : public std::runtime_error {
 public:
  enum class Kind {
    dns,              // The host name could not be resolved.
    connect_refused,  // No TCP connection (refused, unreachable).
    timeout,          // connect_timeout, total_timeout or the client's queue_timeout.
    tls,              // Handshake or certificate verification failed.
    too_large,        // The body exceeded max_body_size.
    cancelled,        // cancel(), close(), the Client's destructor, or on_body_chunk said stop.
    protocol,         // The peer broke HTTP (reset, garbage, no answer, too many redirects).
    queue_full,       // The client's queue already held max_queued fetches.
  };
  FetchError(Kind kind, std::string url, const std::string& message);
  Kind kind() const noexcept { return kind_; }
  const std::string& url() const noexcept { return url_; }

 private:
  Kind kind_;
  std::string url_;
};

// "dns", "connect_refused", ...
std::string_view to_string(FetchError::Kind kind) noexcept;

// A response or an error.
class FetchResult {
 public:
  FetchResult(FetchResponse response) : value_(std::move(response)) {}
  FetchResult(FetchError error) : value_(std::move(error)) {}
  bool ok() const noexcept { return value_.index() == 0; }
  FetchResponse& response() { return std::get<0>(value_); }
  const FetchResponse& response() const { return std::get<0>(value_); }
  const FetchError& error() const { return std::get<1>(value_); }

 private:
  std::variant<FetchResponse, FetchError> value_;
};

struct ClientOptions {
  // Transfers running at once; more wait in the client's queue (FIFO).
  std::size_t max_in_flight = 100;
  // Transfers running at once to one scheme://host:port.
  std::size_t max_in_flight_per_host = 100;
  // Fetches waiting beyond the limits; one more ends at once as queue_full.
  std::size_t max_queued = 10'000;
  // How long a fetch may wait in the queue before it ends as timeout; 0 = no limit.
  std::chrono::milliseconds queue_timeout{30'000};
  // Idle connections kept for reuse (CURLMOPT_MAXCONNECTS).
  std::size_t max_idle_connections = 100;
  std::string user_agent = "squall";  // Sent unless the request sets User-Agent itself.
};

// Counters read on the loop thread.
struct ClientStats {
  std::uint64_t started = 0;    // Transfers handed to curl.
  std::uint64_t completed = 0;  // Ended with a response.
  std::uint64_t failed = 0;     // Ended with an error other than cancelled.
  std::uint64_t cancelled = 0;  // Ended as cancelled.
};

// Whether this process's libcurl resolves names without blocking the caller (AsynchDNS), and
// with what: "threaded" (a thread per lookup: Debian's libcurl) or "c-ares".
bool curl_resolves_asynchronously() noexcept;
std::string_view curl_resolver_name() noexcept;

class Client {
 public:
  using FetchId = std::uint64_t;
  using Callback = std::function<void(FetchResult)>;

  // Loop thread. Throws std::runtime_error if libcurl cannot be set up.
  explicit Client(Loop& loop, ClientOptions options = {});
  // close(): every pending callback gets `cancelled`, every handle is closed.
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Starts (or queues) a fetch; `callback` runs exactly once, on the loop thread, never
  // inside this call unless the client is closed or its queue full. Throws
  // std::invalid_argument for a URL that is not http(s) or a header with CR/LF, and
  // std::logic_error off the loop thread.
  FetchId fetch(FetchRequest request, Callback callback);

  // The same fetch for a coroutine: `co_await client.fetch(request)` gives the response (any
  // status) or throws FetchError; when the awaiting task's stop token fires, the fetch is
  // cancelled at once and the await throws CancelledError. The task resumes on a later turn of
  // the loop, never inside the client. The Client must outlive the task's await.
  Task<FetchResponse> fetch(FetchRequest request);

  // Ends a pending fetch now: it leaves curl's multi handle (or the queue) at once and its
  // callback runs with a `cancelled` error before cancel returns. False if it already ended.
  bool cancel(FetchId id);

  // Cancels everything pending and releases curl and every libuv handle. Idempotent; later
  // fetches end at once as cancelled.
  void close();

  std::size_t in_flight() const noexcept { return active_count_; }
  std::size_t queued() const noexcept { return queue_.size(); }
  const ClientStats& stats() const noexcept { return stats_; }
  Loop& loop() noexcept { return loop_; }

 private:
  struct Transfer;
  struct Socket;
  struct Curl;

  void check_thread(const char* what) const;
  void pump();
  void start(Transfer& transfer);
  void socket_action(int fd, int events);
  void collect_done();
  void finish(Transfer& transfer, std::optional<FetchError> error);
  void deliver(std::unique_ptr<Transfer> transfer, FetchResult result);
  void arm_queue_timer();
  void expire_queue();
  void release_easy(void* easy) noexcept;

  static int on_socket(void* easy, int fd, int what, void* client, void* socket);
  static int on_timer(void* multi, long timeout_ms, void* client);
  static std::size_t on_body(char* data, std::size_t size, std::size_t count, void* transfer);
  static std::size_t on_header(char* data, std::size_t size, std::size_t count, void* transfer);

  Loop& loop_;
  ClientOptions options_;
  std::thread::id loop_thread_;  // fetch/cancel/close are checked against it.
  std::unique_ptr<Curl> curl_;   // The multi handle and the two timers (null once closed).
  FetchId next_id_ = 1;          // Ids are never reused.
  std::unordered_map<FetchId, std::unique_ptr<Transfer>> transfers_;  // Queued and running.
  std::deque<FetchId> queue_;     // Waiting for a slot, oldest first (may hold ended ids).
  std::size_t active_count_ = 0;  // Transfers in curl's multi handle.
  std::unordered_map<std::string, std::size_t> active_per_host_;  // By scheme://host:port.
  std::vector<void*> idle_easy_;           // Reset easy handles kept for the next fetches.
  int inside_curl_ = 0;                    // >0 while curl_multi_socket_action runs (no re-entry).
  bool closing_ = false;                   // close() started: new fetches end at once.
  bool close_pending_ = false;             // close() was called from inside curl; done on return.
  std::vector<FetchId> deferred_cancels_;  // cancel() calls made from inside curl callbacks.
  std::shared_ptr<bool> alive_;            // False once destroyed; checked after user callbacks.
  ClientStats stats_;
};

namespace detail {

// What `co_await client.fetch(request)` waits on: one callback fetch, resumed through
// Loop::call_soon so that the task never runs inside the client's own callback. Moved only
// before it is awaited.
class [[nodiscard]] FetchOperation {
 public:
  FetchOperation(Client& client, FetchRequest request) noexcept
      : client_(&client), request_(std::move(request)) {}
  FetchOperation(FetchOperation&& other) noexcept
      : client_(other.client_), request_(std::move(other.request_)) {}
  FetchOperation& operator=(FetchOperation&&) = delete;
  // A fetch still running (its task was destroyed) is cancelled.
  ~FetchOperation();

  bool await_ready() const noexcept { return false; }
  template <typename Promise>
  bool await_suspend(std::coroutine_handle<Promise> waiter) {
    return start(waiter, squall::detail::stop_token_of(waiter));
  }
  FetchResponse await_resume();

 private:
  struct State;
  struct OnStop {
    FetchOperation* self;
    void operator()() const noexcept;
  };
  bool start(std::coroutine_handle<> waiter, std::stop_token token);

  Client* client_;                                     // Who fetches.
  FetchRequest request_;                               // Moved into the fetch when it starts.
  std::shared_ptr<State> state_;                       // Shared with the fetch's callback.
  Client::FetchId id_ = 0;                             // The running fetch.
  std::optional<std::stop_callback<OnStop>> on_stop_;  // Registered while suspended.
};

}  // namespace detail

}  // namespace squall::http
