// Streamed request bodies: a route registered with BodyMode::stream has its handler called as
// soon as the request's head is complete, and reads the body as it arrives through the Request's
// BodyReader instead of after it is buffered whole.
//
//   Task<void> upload(http::Request& request, http::Responder responder) {
//     http::BodyReader body = request.body_reader();
//     std::uint64_t total = 0;
//     for (std::string chunk = co_await body.read_some(); !chunk.empty();
//          chunk = co_await body.read_some()) {
//       total += chunk.size();
//     }
//     responder.send(200, "text/plain", std::to_string(total) + "\n");
//   }
//   router.add("POST", "/upload", upload, http::BodyMode::stream);
//
// Back-pressure: the connection reads the socket only while the bytes received and not yet taken
// by the handler stay below BodyReader::kHighWater; a handler that reads slowly slows its client
// down instead of filling memory. The limits hold as for a buffered body: max_body_bytes (413),
// timeouts.body (408; for a streamed body it bounds each wait for the client, and does not run
// while the handler holds the body back), the server's max_buffered_body_bytes (503). The hold
// itself has timeouts.body from the moment kHighWater waited (each read starts it anew): a
// handler that takes nothing for that long gets the client a 500 (or the close, once its answer
// has begun) and a BodyError with status() 500. A request
// with "Expect: 100-continue" gets its "100 Continue" when the handler first reads.
//
// Answering before the body is read whole is allowed: the rest is read and dropped (at most
// BodyReader::kMaxDiscardedBytes, then the connection closes; a larger declared rest closes it
// after the answer at once). Loop thread only, like the Responder: every chunk and callback is
// delivered on the loop thread, on a later loop turn than the bytes' arrival.
#pragma once

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <string_view>

#include "squall/core/cancel.hpp"

namespace squall::http {

// How a route receives the request body: whole before its handler runs (request.body()), or as
// it arrives (request.body_reader()).
enum class BodyMode : std::uint8_t { buffered, stream };

// Thrown by BodyReader::read_some (and passed to on_error) when the body cannot be received:
// a limit was exceeded (status() 413, 408, 503), its framing is bad (400), or the answer was sent
// before it was read (status() 0). The connection has answered the client already, or closes.
// A client that went away is a CancelledError instead.
class BodyError : public std::runtime_error {
 public:
  BodyError(int status, const std::string& what) : std::runtime_error(what), status_(status) {}
  int status() const noexcept { return status_; }

 private:
  int status_;
};

namespace detail {
struct BodyStream;  // The shared state of one request's body (lib/http/body_reader.cpp).
struct BodyWait;    // One suspended read_some().
}  // namespace detail

class ReadSome;

// A handle on a request's body; copies refer to the same body. Either read it with read_some()
// (coroutines) or with the callbacks, not both.
class BodyReader {
 public:
  // The connection stops reading the socket while this many bytes wait for the handler.
  static constexpr std::size_t kHighWater = 64 * 1024;
  // At most this many bytes of a body the handler did not read are dropped to keep the
  // connection alive after the answer; past it the connection closes.
  static constexpr std::size_t kMaxDiscardedBytes = 1024 * 1024;

  BodyReader() noexcept = default;

  // `co_await body.read_some()`: the bytes received since the last read (at least one), or an
  // empty string once the body has ended. Throws BodyError when the body cannot be received,
  // and CancelledError when the client goes away or the task's stop token fires (a coroutine
  // handler's fires when its client leaves); either resumes at once.
  ReadSome read_some() const;

  // The callback form. on_data(fn) starts the delivery: fn(chunk) runs for each piece as it
  // arrives (the view is valid during the call), then on_end() once, or on_error(error) once
  // (a client that went away is a BodyError with status() 499). Set on_end and on_error before
  // on_data. pause() stops deliveries (and, past kHighWater, the socket reads); resume() goes on.
  const BodyReader& on_data(std::function<void(std::string_view chunk)> callback) const;
  const BodyReader& on_end(std::function<void()> callback) const;
  const BodyReader& on_error(std::function<void(const BodyError& error)> callback) const;
  void pause() const noexcept;
  void resume() const;

  // Whether the whole body arrived (it may still wait in the reader).
  bool complete() const noexcept;
  // Body bytes received so far, and the part of them not yet handed to the handler.
  std::uint64_t bytes_received() const noexcept;
  std::size_t buffered_bytes() const noexcept;
  // The declared Content-Length, or nullopt for a chunked body.
  std::optional<std::uint64_t> content_length() const noexcept;

 private:
  friend class Request;
  friend class Connection;
  friend class ReadSome;
  explicit BodyReader(std::shared_ptr<detail::BodyStream> stream) noexcept
      : stream_(std::move(stream)) {}
  std::shared_ptr<detail::BodyStream> stream_;  // Null only for a default-constructed reader.
};

// The awaitable of BodyReader::read_some().
class [[nodiscard]] ReadSome {
 public:
  explicit ReadSome(std::shared_ptr<detail::BodyStream> stream) noexcept
      : stream_(std::move(stream)) {}
  ReadSome(ReadSome&& other) noexcept : stream_(std::move(other.stream_)) {}
  ReadSome& operator=(ReadSome&&) = delete;
  ~ReadSome();

  bool await_ready() const noexcept;
  template <typename Promise>
  bool await_suspend(std::coroutine_handle<Promise> waiter) {
    return start(waiter, squall::detail::stop_token_of(waiter));
  }
  std::string await_resume();

 private:
  struct OnStop {
    ReadSome* self;
    void operator()() const noexcept;
  };
  bool start(std::coroutine_handle<> waiter, std::stop_token token);

  std::shared_ptr<detail::BodyStream> stream_;         // Whose bytes.
  std::shared_ptr<detail::BodyWait> node_;             // Registered with the stream.
  bool cancelled_ = false;                             // The stop token fired.
  std::optional<std::stop_callback<OnStop>> on_stop_;  // Registered while suspended.
};

}  // namespace squall::http
