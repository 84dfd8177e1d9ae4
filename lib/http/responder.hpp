// The handle a handler answers through, now or later. Copies refer to the same pending answer;
// when the last copy goes away unanswered while the client still waits, the client gets a 500.
// A Responder is a handle: its const methods act on the shared pending answer. Loop thread
// only. Once the client is gone every call is a harmless no-op returning false.
#pragma once

#include <cstdint>
#include <string_view>

namespace squall {
template <typename T>
class Task;
}  // namespace squall

namespace squall::http {

class Connection;

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

  // Streams a response: chunked for HTTP/1.1, close-delimited for HTTP/1.0.
  bool start(int status, std::string_view content_type) const;
  bool write(std::string_view chunk) const;
  bool finish() const;

  // Runs a coroutine handler's task on the connection's loop (Router::add does this for handlers
  // returning Task<void>). Its stop token fires when the client goes away before the answer is
  // finished. An exception escaping the task is answered with a 500 and logged exactly as one
  // escaping a callback handler; one thrown before the task first suspends is rethrown here.
  void run_handler(Task<void> task) const;

 private:
  friend class Connection;
  Responder(Connection* connection, std::uint64_t request_number) noexcept;
  Connection* live_connection() const noexcept;

  Connection* connection_ = nullptr;  // Kept alive by a reference count while this exists.
  std::uint64_t request_number_ = 0;  // Which of the connection's requests this answers.
};

}  // namespace squall::http
