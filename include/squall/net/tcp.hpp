// TCP for raw protocols on the loop (Tornado's IOStream, TCPServer and TCPClient):
//
//   squall::Task<void> echo(squall::net::TcpStream stream) {
//     for (;;) {
//       std::string line = co_await stream.read_until("\n", 64 * 1024);
//       co_await stream.write(line);
//     }
//   }
//   squall::net::TcpServer server(loop);
//   server.listen("127.0.0.1", 0);       // "127.0.0.1:41234"
//   server.serve(echo);                  // or: TcpStream s = co_await server.accept();
//   TcpStream client = co_await squall::net::connect(loop, "localhost", port);
//
// Everything here runs on the loop thread. A TcpStream is a move-only handle to a loop-owned
// stream: its uv_tcp_t and read buffer live in a state object that is freed only once the
// socket's close callback ran and no handle or pending operation refers to it.
//
// Reads: bytes are read ahead into the stream's buffer while a read is pending, and after it
// until `read_buffer_limit` bytes wait unread (then reading pauses, so a peer cannot make an
// unread stream grow). An operation consumes only what it returns: bytes after a delimiter, the
// bytes of a read that failed, timed out or was cancelled, all stay for the next read.
//
// Writes and back-pressure: write() sends what the socket takes at once and queues the rest.
// While more than `write_high_water` bytes wait unsent, the write does not complete: the writer
// stays suspended until the queue drains to `write_low_water`. So a writer that awaits its
// writes never holds more than `write_high_water` plus one write's bytes, however slowly the
// peer reads.
//
// Deadlines: each operation takes a timeout (zero: none); when it passes the operation stops
// (a read stops waiting, the bytes already read stay buffered; a write's bytes stay queued)
// and fails with squall::TimeoutError. Cancellation: every await watches the task's stop token
// and resumes with squall::CancelledError on the next loop iteration, with the same guarantees.
//
// Callback forms, for code without coroutines: the same operations with a callback that runs on
// a later loop iteration, never from inside the call. Destroying the TcpStream drops the
// callbacks still pending (they never run); close() makes them fail with StreamClosedError.
//
// Loop::close(): it destroys suspended tasks (their streams close) and closes every socket still
// open. A TcpStream or TcpServer that outlives Loop::close() is inert: is_open() is false, an
// awaited operation fails with StreamClosedError, a callback form throws std::logic_error (the
// loop is closed), and its destructor only frees memory, even once the Loop object is gone.
#pragma once

#include <sys/socket.h>

#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <uv.h>

#include "squall/core/cancel.hpp"
#include "squall/core/loop.hpp"
#include "squall/core/task.hpp"

namespace squall::net {

// The stream is closed: by the peer (EOF), by a connection error, or locally. The message says
// which operation, the peer's address and the reason; status() is the libuv code (UV_EOF for the
// peer's end of stream, UV_ECONNRESET, ...; 0 when this side closed it).
class StreamClosedError : public std::runtime_error {
 public:
  StreamClosedError(const std::string& what, int status)
      : std::runtime_error(what), status_(status) {}
  int status() const noexcept { return status_; }

 private:
  int status_;  // A UV_* code, or 0.
};

// read_until found no delimiter within its max_bytes; the bytes stay buffered.
class ReadLimitError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Name resolution or connecting failed. The message names host:port and the reason for each
// address tried; status() is the libuv code of the last failure (UV_ECONNREFUSED,
// UV_EAI_NONAME...).
class ConnectError : public std::runtime_error {
 public:
  ConnectError(const std::string& what, int status) : std::runtime_error(what), status_(status) {}
  int status() const noexcept { return status_; }

 private:
  int status_;  // A UV_* code.
};

// No deadline for an operation.
inline constexpr std::chrono::milliseconds no_timeout{0};

struct StreamOptions {
  std::size_t write_high_water = 256 * 1024;  // write() waits while more bytes wait unsent...
  std::size_t write_low_water = 64 * 1024;    // ...until no more than this many remain.
  std::size_t read_buffer_limit = 64 * 1024;  // Read ahead of the reader up to this many bytes.
  std::size_t read_chunk = 64 * 1024;         // Space offered to each socket read.
  // Throws std::invalid_argument naming the field when the values do not fit together.
  void validate() const;
};

using ReadCallback = std::function<void(std::exception_ptr error, std::string data)>;
using DoneCallback = std::function<void(std::exception_ptr error)>;

class TcpStream;

namespace detail {

struct StreamState;
struct ServerState;

// A one-shot timer owned by one pending operation (its deadline, or the next-iteration delivery
// of a cancellation). The uv_timer_t sits in a node freed by its close callback, so the operation
// may go away at any time.
class OpTimer {
 public:
  using Fire = void (*)(void* owner);
  OpTimer() = default;
  OpTimer(const OpTimer&) = delete;
  OpTimer& operator=(const OpTimer&) = delete;
  ~OpTimer() { disarm(); }
  // (Re)starts the timer: fire(owner) runs after `delay_ms`.
  void arm(Loop& loop, std::uint64_t delay_ms, Fire fire, void* owner);
  void disarm() noexcept;

 private:
  struct Node;
  Node* node_ = nullptr;  // The timer; owned.
};

// What every pending operation shares: the coroutine it resumes, its outcome, its deadline and
// its stop callback. Subclasses say what "stop waiting" means (detach) and name themselves.
class Operation {
 public:
  Operation(const Operation&) = delete;
  Operation& operator=(const Operation&) = delete;
  // Whether the await suspended (false: it completed at once).
  bool suspended() const noexcept { return suspended_; }

 protected:
  explicit Operation(std::chrono::milliseconds timeout) noexcept : timeout_(timeout) {}
  // Only an operation not yet awaited moves (into with_timeout, when_all, ...).
  Operation(Operation&& other) noexcept : timeout_(other.timeout_) {}
  ~Operation();

  // Stops waiting for whatever completes the operation (idempotent).
  virtual void detach() noexcept = 0;
  // "read_until from 127.0.0.1:5000", for error messages.
  virtual std::string describe() const = 0;

  // Suspends `waiter` until finish(): arms the deadline and watches `token`.
  void wait(Loop& loop, std::coroutine_handle<> waiter, std::stop_token token);
  // Ends the operation with `error` (null: success) and resumes the waiter. The waiter may
  // destroy this operation: nothing may touch it after the call.
  void finish(std::exception_ptr error) noexcept;
  // Ends the operation with `error` on the next loop iteration.
  void finish_soon(std::exception_ptr error) noexcept;
  // Rethrows the error, if any.
  void rethrow() const;
  // Whether `token` was stopped before the operation started: its outcome is then
  // CancelledError, and it does not start.
  bool stopped_before_start(const std::stop_token& token);
  bool waiting() const noexcept { return static_cast<bool>(waiter_); }

  std::chrono::milliseconds timeout_;  // The deadline's distance; zero: none.
  std::exception_ptr error_;           // The outcome, once finished.

 private:
  struct OnStop {
    Operation* self;
    void operator()() const noexcept;
  };
  static void on_timer(void* self);

  Loop* loop_ = nullptr;                               // Where the timer runs.
  std::coroutine_handle<> waiter_;                     // Resumed by finish().
  bool stopping_ = false;                              // Stop was requested while waiting.
  bool ready_ = false;                                 // finish_soon(): error_ is the outcome.
  bool suspended_ = false;                             // wait() ran.
  OpTimer timer_;                                      // Deadline / next-iteration delivery.
  std::optional<std::stop_callback<OnStop>> on_stop_;  // Registered while waiting.
};

// The awaiter side of an operation: it always suspends, and starts the operation (Derived's
// start(), which returns false when it completed at once) under the awaiting task's stop token,
// unless that token is already stopped (CancelledError).
// Derived declares `void detach() noexcept override`, calls it from its own destructor (before
// its members go), befriends this class and has an await_resume() (for a void result, this
// one: the outcome's exception, if any).
template <typename Derived>
class AwaitableOperation : public Operation {
 public:
  bool await_ready() const noexcept { return false; }
  template <typename Promise>
  bool await_suspend(std::coroutine_handle<Promise> waiter) {
    std::stop_token token = squall::detail::stop_token_of(waiter);
    if (stopped_before_start(token)) return false;
    return static_cast<Derived*>(this)->start(waiter, std::move(token));
  }
  void await_resume() { rethrow(); }

 protected:
  using Operation::Operation;
};

// A counted reference to a stream's state (a pending operation keeps it alive).
class StreamRef {
 public:
  StreamRef() noexcept = default;
  explicit StreamRef(StreamState* state) noexcept;
  StreamRef(const StreamRef& other) noexcept : StreamRef(other.state_) {}
  StreamRef(StreamRef&& other) noexcept : state_(std::exchange(other.state_, nullptr)) {}
  StreamRef& operator=(StreamRef other) noexcept {
    std::swap(state_, other.state_);
    return *this;
  }
  ~StreamRef();
  StreamState* get() const noexcept { return state_; }
  StreamState* operator->() const noexcept { return state_; }
  explicit operator bool() const noexcept { return state_ != nullptr; }

 private:
  StreamState* state_ = nullptr;
};

}  // namespace detail

// `std::string bytes = co_await stream.read_some(...)` (or read_exactly, read_until).
class [[nodiscard]] ReadOperation final : public detail::AwaitableOperation<ReadOperation> {
 public:
  enum class Kind : std::uint8_t { some, exactly, until };
  ReadOperation(detail::StreamRef state, Kind kind, std::size_t count, std::string delimiter,
                std::chrono::milliseconds timeout);
  ReadOperation(ReadOperation&& other) noexcept;
  ~ReadOperation() { detach(); }

  std::string await_resume();

 private:
  friend class detail::AwaitableOperation<ReadOperation>;
  friend struct detail::StreamState;
  bool start(std::coroutine_handle<> waiter, std::stop_token token);
  void detach() noexcept override;
  std::string describe() const override;

  detail::StreamRef state_;  // The stream read from.
  Kind kind_;                // What completes it.
  std::size_t count_;        // read_some: at most; read_exactly: exactly; read_until: max_bytes.
  std::string delimiter_;    // read_until's delimiter.
  std::string result_;       // The bytes read.
};

// `co_await stream.write(bytes)`: the bytes are sent or copied when the await starts.
class [[nodiscard]] WriteOperation final : public detail::AwaitableOperation<WriteOperation> {
 public:
  WriteOperation(detail::StreamRef state, std::string_view bytes,
                 std::chrono::milliseconds timeout);
  WriteOperation(WriteOperation&& other) noexcept;
  ~WriteOperation() { detach(); }

 private:
  friend class detail::AwaitableOperation<WriteOperation>;
  friend struct detail::StreamState;
  bool start(std::coroutine_handle<> waiter, std::stop_token token);
  void detach() noexcept override;
  std::string describe() const override;

  detail::StreamRef state_;         // The stream written to.
  std::string_view bytes_;          // Borrowed until the await starts.
  WriteOperation* next_ = nullptr;  // The stream's queue of writers waiting for the drain.
  WriteOperation* prev_ = nullptr;
  bool queued_ = false;  // Linked in that queue.
};

// `co_await stream.shutdown()`: resumes once the queued bytes are sent and the write side is
// closed (the peer reads EOF; this side can still read).
class [[nodiscard]] ShutdownOperation final : public detail::AwaitableOperation<ShutdownOperation> {
 public:
  ShutdownOperation(detail::StreamRef state, std::chrono::milliseconds timeout);
  ShutdownOperation(ShutdownOperation&& other) noexcept;
  ~ShutdownOperation() { detach(); }

 private:
  friend class detail::AwaitableOperation<ShutdownOperation>;
  friend struct detail::StreamState;
  bool start(std::coroutine_handle<> waiter, std::stop_token token);
  void detach() noexcept override;
  std::string describe() const override;

  detail::StreamRef state_;  // The stream shut down.
};

class TcpStream {
 public:
  // Not connected: every operation throws std::logic_error.
  TcpStream() noexcept = default;
  explicit TcpStream(detail::StreamRef state) noexcept : state_(std::move(state)) {}
  TcpStream(TcpStream&& other) noexcept = default;
  // Closes the stream this one held (see ~TcpStream).
  TcpStream& operator=(TcpStream&& other) noexcept;
  // Closes the socket (unsent bytes are dropped: await shutdown() first to deliver them) and
  // drops pending callbacks. Operations awaited elsewhere fail with StreamClosedError.
  ~TcpStream();

  // At most `max_bytes` (at least 1), as soon as any are there.
  ReadOperation read_some(std::size_t max_bytes, std::chrono::milliseconds timeout = no_timeout);
  // Exactly `count` bytes; StreamClosedError if the stream ends first (the bytes stay buffered).
  ReadOperation read_exactly(std::size_t count, std::chrono::milliseconds timeout = no_timeout);
  // Everything up to and including `delimiter`, which must end within the first `max_bytes`
  // buffered bytes, else ReadLimitError naming the limit (the bytes stay buffered).
  ReadOperation read_until(std::string_view delimiter, std::size_t max_bytes,
                           std::chrono::milliseconds timeout = no_timeout);
  // Sends `bytes`; completes at once unless more than write_high_water bytes wait unsent, then
  // once they drained to write_low_water. `bytes` must stay valid until the co_await starts.
  WriteOperation write(std::string_view bytes, std::chrono::milliseconds timeout = no_timeout);
  // Half-close once every queued byte is sent.
  ShutdownOperation shutdown(std::chrono::milliseconds timeout = no_timeout);

  // Callback forms: `callback` runs on a later loop iteration with the outcome.
  void read_some(std::size_t max_bytes, ReadCallback callback,
                 std::chrono::milliseconds timeout = no_timeout);
  void read_exactly(std::size_t count, ReadCallback callback,
                    std::chrono::milliseconds timeout = no_timeout);
  void read_until(std::string_view delimiter, std::size_t max_bytes, ReadCallback callback,
                  std::chrono::milliseconds timeout = no_timeout);
  // `bytes` are sent or copied before the call returns.
  void write(std::string_view bytes, DoneCallback callback,
             std::chrono::milliseconds timeout = no_timeout);
  void shutdown(DoneCallback callback, std::chrono::milliseconds timeout = no_timeout);

  // Closes the socket now; pending operations fail with StreamClosedError on the next loop
  // iteration. Unsent bytes are dropped. Harmless twice.
  void close() noexcept;
  // False once closed (locally, by Loop::close(), or by a moved-from / default handle).
  bool is_open() const noexcept;
  // The peer's and this side's "1.2.3.4:80" / "[::1]:80".
  const std::string& peer_address() const;
  const std::string& local_address() const;
  // Bytes waiting unsent (above the kernel's socket buffer) and bytes read but not yet consumed.
  std::size_t write_buffer_size() const noexcept;
  std::size_t read_buffer_size() const noexcept;
  // TCP_NODELAY (Nagle's algorithm off: small writes leave at once).
  void set_nodelay(bool enabled);
  const StreamOptions& options() const;

 private:
  detail::StreamState* checked(const char* operation) const;
  detail::StreamRef state_;  // Null when not connected.
};

// ---- server -----------------------------------------------------------------------------------

// `TcpStream stream = co_await server.accept()`.
class [[nodiscard]] AcceptOperation final : public detail::AwaitableOperation<AcceptOperation> {
 public:
  explicit AcceptOperation(detail::ServerState* server) noexcept;
  AcceptOperation(AcceptOperation&& other) noexcept;
  ~AcceptOperation() { detach(); }

  TcpStream await_resume();

 private:
  friend class detail::AwaitableOperation<AcceptOperation>;
  friend struct detail::ServerState;
  bool start(std::coroutine_handle<> waiter, std::stop_token token);
  void detach() noexcept override;
  std::string describe() const override;

  detail::ServerState* server_;  // Null once the server closed.
  TcpStream stream_;             // The accepted connection.
};

struct TcpServerOptions {
  int backlog = 511;     // listen()'s queue of connections not yet accepted.
  StreamOptions stream;  // For every accepted stream.
};

class TcpServer {
 public:
  explicit TcpServer(Loop& loop, TcpServerOptions options = {});
  // Closes (see close()).
  ~TcpServer();
  TcpServer(const TcpServer&) = delete;
  TcpServer& operator=(const TcpServer&) = delete;

  // Binds and listens on a numeric IPv4 or IPv6 address (port 0: any free port); may be called
  // for several addresses. Returns the bound address, "127.0.0.1:41234". Throws std::system_error
  // naming the address and the reason.
  std::string listen(const std::string& host, std::uint16_t port);
  // The first listening socket's port.
  std::uint16_t port() const;

  // The next connection. Connections wait in the kernel's backlog until accepted. Fails with
  // StreamClosedError once the server is closed; one accept at a time.
  AcceptOperation accept();
  // Serves every connection, from now on, with `handler(TcpStream)`: a coroutine returning
  // Task<void> (spawned under `token`; what it throws is logged) or a plain function. The handler
  // object lives as long as the server: a coroutine lambda that captures must not outlive it
  // (better, capture nothing and take what it needs as parameters).
  template <typename Handler>
  void serve(Handler handler, std::stop_token token = {}) {
    if constexpr (std::is_same_v<std::invoke_result_t<Handler&, TcpStream>, Task<void>>) {
      serve_with([handler = std::move(handler), token](Loop& loop, TcpStream stream) mutable {
        spawn(loop, handler(std::move(stream)), token);
      });
    } else {
      serve_with([handler = std::move(handler)](Loop&, TcpStream stream) mutable {
        handler(std::move(stream));
      });
    }
  }

  // Stops listening (connections waiting in the backlog are refused); a pending accept fails with
  // StreamClosedError. Streams already accepted stay open. Harmless twice.
  void close() noexcept;

 private:
  void serve_with(std::function<void(Loop&, TcpStream)> on_stream);
  detail::ServerState* state_;  // Owned; its sockets are freed by their close callbacks.
};

// ---- connecting -------------------------------------------------------------------------------

struct ConnectOptions {
  std::chrono::milliseconds timeout{10'000};  // Name resolution and every attempt together.
  StreamOptions stream;                       // For the connected stream.
};

// The addresses of `host` (a name, or a numeric IPv4/IPv6 address) for `port`, by uv_getaddrinfo
// on the thread pool (never blocking the loop); numeric addresses need no lookup. Throws
// ConnectError naming the host and the reason.
Task<std::vector<sockaddr_storage>> resolve(Loop& loop, std::string host, std::uint16_t port);

// Resolves `host` and tries each address in turn until one accepts. Fails with ConnectError
// naming host:port and the reason for each address tried, or TimeoutError after options.timeout.
Task<TcpStream> connect(Loop& loop, std::string host, std::uint16_t port,
                        ConnectOptions options = {});
// The callback form: `callback(error, stream)` on a later loop iteration.
void connect(Loop& loop, std::string host, std::uint16_t port, ConnectOptions options,
             std::function<void(std::exception_ptr error, TcpStream stream)> callback);

}  // namespace squall::net
