// One client connection: owns its uv_tcp_t and timer, reads into a workspace borrowed from the
// server only while bytes are in flight, parses one request at a time, writes responses in
// order, and closes itself (lingering after an early error so the client sees the answer).
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <uv.h>

#include "http/parser.hpp"
#include "squall/http/request.hpp"
#include "squall/http/responder.hpp"
#include "squall/http/router.hpp"

namespace squall::http {

class Server;

// A read buffer and the request parsed from it; lent to a connection while it has bytes.
struct Workspace {
  char* buffer = nullptr;          // capacity bytes, owned.
  std::size_t capacity = 0;        // Fits the largest head the limits allow.
  std::size_t begin = 0;           // First byte not yet parsed.
  std::size_t end = 0;             // One past the last byte read.
  Request request;                 // The message being parsed or answered.
  std::string response_headers;    // Extra header lines set through Responder::header().
  Workspace* next_free = nullptr;  // Link in the server's free list.
};

class Connection {
 public:
  Connection(Server& server, std::uint64_t id);
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Accepts from `listener` and starts reading. Returns a libuv error code on failure (the
  // connection then closes itself).
  int start(uv_stream_t* listener);
  // Closes at once, dropping anything unsent. Safe to call twice.
  void close_now() noexcept;
  // Draining: close now if idle, otherwise after the current request.
  void drain() noexcept;

  std::uint64_t id() const noexcept { return id_; }
  std::string_view remote_address();

 private:
  friend class Server;
  friend class Responder;
  friend class Drained;

  enum class TimerPhase : std::uint8_t { none, first_byte, head, body, idle, write, lingering };

  ~Connection();
  static Connection* from(uv_handle_t* handle) noexcept;
  static void on_alloc(uv_handle_t* handle, std::size_t suggested, uv_buf_t* buf);
  static void on_read(uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf);
  static void on_timer(uv_timer_t* timer);
  static void on_closed(uv_handle_t* handle);

  void process() noexcept;
  void dispatch() noexcept;
  void finish_response() noexcept;
  void send_error(int status, std::string_view reason) noexcept;
  void write_head(int status, std::string_view content_type, std::size_t content_length,
                  bool chunked);
  void output(std::string_view bytes);
  void write_out(std::string& bytes) noexcept;
  void on_write_done(std::size_t bytes, int status) noexcept;
  void settle_after_write(int status) noexcept;
  bool respond(int status, std::string_view content_type, std::string_view body);
  bool start_stream(int status, std::string_view content_type);
  bool write_stream(std::string_view chunk);
  bool finish_stream();
  void answer_internal_error() noexcept;
  void begin_close() noexcept;
  static void on_shutdown(uv_shutdown_t* request, int status);
  void compact() noexcept;
  void release_workspace_if_idle() noexcept;
  void update_reading() noexcept;
  void update_timer() noexcept;
  void arm(TimerPhase phase, std::uint64_t timeout_ms) noexcept;
  void expire() noexcept;
  void add_responder(std::uint64_t request_number) noexcept;
  void drop_responder(std::uint64_t request_number) noexcept;
  void check_loop_thread(const char* what) const noexcept;
  void maybe_destroy() noexcept;
  bool idle() const noexcept;
  // Streaming back-pressure: the high-water mark, and the wake-up of on_drain and drained().
  std::size_t high_water() const noexcept;
  void wake_drain_waiters() noexcept;
  void handler_failed(std::uint64_t request_number, const std::string& route,
                      std::exception_ptr error) noexcept;

  uv_tcp_t tcp_;                                 // The socket; data -> this.
  uv_timer_t timer_;                             // One timer, re-armed per phase; data -> this.
  uv_shutdown_t shutdown_request_;               // For the write-side shutdown before closing.
  Server& server_;                               // Shared buffers, options, counters.
  const std::uint64_t id_;                       // In log lines and RequestRecord.
  const std::thread::id loop_thread_;            // Responder copies must be made and dropped here.
  Connection* prev_ = nullptr;                   // Server's list of open connections.
  Connection* next_ = nullptr;                   // Server's list of open connections.
  Workspace* workspace_ = nullptr;               // Borrowed while bytes are in flight.
  RequestParser parser_;                         // llhttp state across this connection's messages.
  const Route* route_ = nullptr;                 // The matched route of the current request.
  std::shared_ptr<const Router> routes_in_use_;  // Keeps route_ alive while an answer is late.
  std::uint64_t request_number_ = 0;             // Counts dispatched requests; Responders check it.
  std::uint64_t request_start_ns_ = 0;           // uv_hrtime at the current request's first byte.
  std::uint64_t response_body_bytes_ = 0;        // Body bytes of the current response.
  std::size_t pending_write_bytes_ = 0;          // Queued in uv_write and not yet written.
  std::uint64_t deadline_ms_ = 0;                // When the current phase times out (uv_now clock).
  std::uint64_t timer_due_ms_ = 0;               // When the uv timer is set to fire.
  std::string remote_address_;                   // Filled on first use.
  int responders_ = 0;                           // Live Responder copies; keep this object alive.
  int current_responders_ = 0;                   // Those of them for the current request.
  int open_handles_ = 0;                         // tcp_ and timer_ until their close callbacks ran.
  int response_status_ = 0;                      // Status of the current response.
  TimerPhase phase_ = TimerPhase::none;          // What the timer is measuring.
  bool response_pending_ = false;           // A request was dispatched; its answer is not finished.
  bool response_started_ = false;           // The status line is written (streaming).
  bool response_chunked_ = false;           // The body goes out in chunks.
  bool response_close_delimited_ = false;   // HTTP/1.0 streaming: the close ends the body.
  bool head_request_ = false;               // HEAD: no body bytes go out.
  bool keep_alive_ = true;                  // Whether the current response leaves it open.
  bool reading_ = false;                    // uv_read_start is in effect.
  bool in_process_ = false;                 // process() runs: output is corked until it ends.
  bool output_blocked_ = false;             // Unsent bytes above the high-water mark.
  bool peer_eof_ = false;                   // The client shut down its sending side.
  bool closing_ = false;                    // Shutting down: no more requests are read.
  bool lingering_ = false;                  // Discarding input until EOF or the lingering timeout.
  bool closed_ = false;                     // close_now() ran.
  bool shutdown_started_ = false;           // uv_shutdown was issued.
  bool linger_after_answer_ = false;        // An early rejection: drain input before closing.
  bool handler_running_ = false;            // Inside the route handler call.
  bool orphaned_ = false;                   // The server is gone; touch nothing of it.
  bool timer_running_ = false;              // uv timer is started.
  bool first_byte_seen_ = false;            // A request has begun since the accept.
  bool waiting_for_output_budget_ = false;  // Paused: the server's unsent bytes are over budget.
  // A coroutine handler's stop source: requested when the client goes away before its answer.
  std::stop_source handler_stop_{std::nostopstate};
  // A streaming writer waiting for the unsent bytes to fall to the low-water mark.
  std::vector<std::shared_ptr<detail::DrainWaiter>> drain_waiters_;  // drained() awaits.
  std::function<void()> on_drain_;                                   // Responder::on_drain.
};

}  // namespace squall::http
