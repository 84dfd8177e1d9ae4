// The handle a handler answers through, now or later. Copies refer to the same pending answer;
// when the last copy goes away unanswered while the client still waits, the client gets a 500.
// A Responder is a handle: its const methods act on the shared pending answer. Loop thread
// only. Once the client is gone every call is a harmless no-op returning false.
#pragma once

#include <coroutine>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stop_token>
#include <string_view>

#include "squall/core/cancel.hpp"

namespace squall {
template <typename T>
class Task;
}  // namespace squall

namespace squall::http {

class Connection;
class Drained;
struct Response;

// Runs when a Responder is copied or destroyed on a thread other than its connection's loop
// thread: a bug in the caller, which races with the loop on the connection's reference counts
// (keep Responders on the loop; pass only data to other threads and back through call_soon).
// The default handler prints `message` and aborts. Tests install their own; returns the previous
// one. Any thread.
using ThreadViolationHandler = void (*)(const char* message);
ThreadViolationHandler set_thread_violation_handler(ThreadViolationHandler handler) noexcept;

class Responder {
 public:
  Responder() noexcept = default;
  Responder(const Responder& other) noexcept;
  Responder(Responder&& other) noexcept;
  Responder& operator=(Responder other) noexcept;
  ~Responder();

  // Whether the client still waits for this answer.
  bool connected() const noexcept;

  // Adds a response header. Throws std::invalid_argument if the name is not a token or the value
  // holds CR, LF or NUL (response splitting), or if the response has started.
  const Responder& header(std::string_view name, std::string_view value) const;

  // Sends a whole response with Content-Length framing.
  bool send(int status, std::string_view content_type, std::string_view body) const;
  // The same for a Response value, its headers first (header() checks them and may throw).
  bool send(const Response& response) const;

  // Streams a response: chunked for HTTP/1.1, close-delimited for HTTP/1.0.
  bool start(int status, std::string_view content_type) const;
  // Queues `chunk` (never blocks, never refuses for being slow); false once the client is gone.
  // A writer that produces more than the client reads checks writable() after each write and
  // waits (on_drain or drained()) while it is false, so the connection's unsent bytes stay near
  // [limits] write_buffer_high_water instead of growing without bound.
  bool write(std::string_view chunk) const;
  bool finish() const;

  // Back-pressure. writable(): the client is there and the connection's unsent bytes are at or
  // below the high-water mark. on_drain(fn): `fn` runs once, on a later loop turn, when the
  // unsent bytes fall to the low-water mark (half the high one), or when the client goes away
  // (check connected()); it replaces an earlier one and runs at once (next turn) if writable()
  // already holds. `co_await responder.drained()` suspends while the unsent bytes are above the
  // high-water mark and resumes below the low one; it throws CancelledError when the client goes
  // away or the task's stop token fires (a coroutine handler's does when its client leaves).
  bool writable() const noexcept;
  void on_drain(std::function<void()> callback) const;
  Drained drained() const;
  // Bytes of this connection written but not yet taken by the client.
  std::size_t unsent_bytes() const noexcept;

  // Runs a coroutine handler's task on the connection's loop (Router::add does this for handlers
  // returning Task<void>). Its stop token fires when the client goes away before the answer is
  // finished. An exception escaping the task is answered with a 500 and logged exactly as one
  // escaping a callback handler; one thrown before the task first suspends is rethrown here.
  void run_handler(Task<void> task) const;
  // The same for a task that returns the whole answer (Router::add does this for handlers
  // returning Task<Response>): the Response is sent through this Responder when it returns.
  void run_handler(Task<Response> task) const;

 private:
  friend class Connection;
  friend class Drained;
  struct HandlerRoot;  // The root frame of run_handler's task (responder.cpp).
  Responder(Connection* connection, std::uint64_t request_number) noexcept;
  Connection* live_connection() const noexcept;

  Connection* connection_ = nullptr;  // Kept alive by a reference count while this exists.
  std::uint64_t request_number_ = 0;  // Which of the connection's requests this answers.
};

namespace detail {
// One suspended drained(): shared by the awaitable and the loop callback that resumes it, so
// either may go first.
struct DrainWaiter {
  std::coroutine_handle<> waiter;  // Null once resumed or abandoned.
  bool scheduled = false;          // A resumption is queued on the loop.
};
}  // namespace detail

// The awaitable of Responder::drained(). Holds a Responder copy: the connection stays valid.
class [[nodiscard]] Drained {
 public:
  explicit Drained(Responder responder) noexcept : responder_(std::move(responder)) {}
  // Only an awaitable not yet awaited moves.
  Drained(Drained&& other) noexcept : responder_(std::move(other.responder_)) {}
  Drained& operator=(Drained&&) = delete;
  ~Drained();

  bool await_ready() const noexcept;
  template <typename Promise>
  bool await_suspend(std::coroutine_handle<Promise> waiter) {
    return start(waiter, squall::detail::stop_token_of(waiter));
  }
  void await_resume();

 private:
  struct OnStop {
    Drained* self;
    void operator()() const noexcept;
  };
  bool start(std::coroutine_handle<> waiter, std::stop_token token);

  Responder responder_;                                // Whose output.
  std::shared_ptr<detail::DrainWaiter> node_;          // Registered with the connection.
  bool cancelled_ = false;                             // The stop token fired.
  std::optional<std::stop_callback<OnStop>> on_stop_;  // Registered while suspended.
};

}  // namespace squall::http
