// One client connection, as a state machine: it owns its socket (a uv_tcp_t inside the object, so
// an idle connection is one allocation; closed exactly once whether the connection or
// Loop::close() comes first: the context's close hook closes the connections before the Loop
// closes the handles it knows) and little else while idle; the read buffer, the parser and
// everything about the request in flight live in a Workspace borrowed from the loop's
// ConnectionContext only while bytes or an answer are in flight. Its timeouts are deadlines kept by
// the context (one timer per loop, not one per connection).
//
//   reading ----dispatch----> answering --Responder::start--> streaming
//      ^                        |  |                             |
//      +--finish (keep-alive)---+  +------finish (keep-alive)----+
//                               |                                |
//                          finish (close), error, drain, EOF: closing
//   closing --begin_close--> flushing (unsent output, then close) or lingering (read and drop
//   input until EOF or timeouts.lingering) --> closed (close_now, from any state)
//
// The object is deleted once it is closed, its socket's close callback has run (after its own
// close_now(), which Loop::close() also calls through the context) and no Responder refers to it,
// and never while one of its own frames is on the stack (depth_): maybe_destroy() called there
// leaves the delete to the outermost frame.
//
// The files: connection.cpp (states, reading, timeouts, closing), response_writer.cpp (the
// response on the wire), responder.cpp (the handler's handle on a pending answer).
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <stop_token>
#include <string>
#include <string_view>
#include <vector>

#include <uv.h>

#include "http/parser.hpp"
#include "squall/http/request.hpp"
#include "squall/http/responder.hpp"
#include "squall/http/router.hpp"

namespace squall::http {

class ConnectionContext;

// What a connection needs while a request is in flight: lent by the context when bytes arrive
// and given back when the connection is idle again, so an idle connection holds none of it.
struct Workspace {
  Workspace(const Limits& limits, MemoryBudget* body_budget) : parser(limits, body_budget) {}
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() { delete[] buffer; }

  char* buffer = nullptr;        // capacity bytes, owned.
  std::size_t capacity = 0;      // Fits the largest head the limits allow.
  std::size_t begin = 0;         // First byte not yet parsed.
  std::size_t end = 0;           // One past the last byte read.
  RequestParser parser;          // llhttp state; reset whenever the workspace is lent.
  Request request;               // The message being parsed or answered.
  std::string response_headers;  // Extra header lines set through Responder::header().
  std::string remote_address;    // The peer's address, filled on first use.
  const Route* route = nullptr;  // The matched route of the current request.
  std::shared_ptr<const Router> routes_in_use;  // Keeps route alive while an answer is late.
  std::uint64_t request_start_ns = 0;           // The clock at the pass that read its first byte.
  std::uint64_t response_body_bytes = 0;        // Body bytes of the current response.
  int response_status = 0;                      // Status of the current response.
  std::uint32_t current_responders = 0;         // Responder copies for the current request.
  bool response_chunked = false;                // The body goes out in chunks.
  bool response_close_delimited = false;        // HTTP/1.0 streaming: the close ends the body.
  bool head_request = false;                    // HEAD: no body bytes go out.
  bool keep_alive = true;                       // Whether the current response leaves it open.
  // A coroutine handler's stop source: requested when the client goes away before its answer.
  std::stop_source handler_stop{std::nostopstate};
  // A streaming writer waiting for the unsent bytes to fall to the low-water mark.
  std::vector<std::shared_ptr<detail::DrainWaiter>> drain_waiters;  // drained() awaits.
  std::function<void()> on_drain;                                   // Responder::on_drain.
  // A streamed request body still arriving (BodyMode::stream): what the parser feeds, or, once
  // the answer is out, the marker that the rest of the body is read and dropped.
  std::shared_ptr<detail::BodyStream> body_stream;
  Workspace* next_free = nullptr;  // Link in the free list.
};

class Connection {
 public:
  // The connection's lifecycle; see the diagram at the top of this file.
  enum class State : std::uint8_t {
    reading,    // Waiting for a request or reading one (the parser tells head from body).
    answering,  // A request was dispatched; its answer is not finished.
    streaming,  // The answer's head is out; its body follows through Responder::write.
    closing,    // No more requests; begin_close() shuts the socket down next.
    flushing,   // Shut down after the last answer: unsent output leaves, then it closes.
    lingering,  // An answer is out; input is read and dropped until EOF or the timeout.
    closed,     // close_now() ran; the object waits for its handle and its Responders.
  };
  // Which deadline the connection is under; the context keeps one list per phase.
  enum class TimerPhase : std::uint8_t {
    none,        // No deadline: the handler's own time is not bounded here.
    first_byte,  // timeouts.header from the accept.
    head,        // timeouts.header from the request's first byte.
    body,        // timeouts.body from the end of the head.
    idle,        // timeouts.keepalive between requests.
    write,       // timeouts.write since unsent output last made progress.
    lingering,   // timeouts.lingering while reading and dropping input.
    body_held,   // timeouts.body since a streamed body's handler stopped taking it (held back).
    closed,      // Not a deadline: closed, kept alive by Responders (the server may orphan it).
  };
  static constexpr std::size_t kTimerPhases = 9;

  Connection(ConnectionContext& context, std::uint64_t id);
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Accepts from `listener` and starts reading. Returns a libuv error code on failure (the
  // connection then closes itself).
  int start(uv_stream_t* listener);
  // The same with a connection already accepted (Listener::accept_waiting); owns `fd` from now
  // on, also on failure.
  int start(int fd);
  // Closes at once, dropping anything unsent. Safe to call twice.
  void close_now() noexcept;
  // Draining: close now if idle between requests, otherwise after the current request. A
  // connection that has not sent its first request yet, or whose next request is already
  // waiting in the socket, gets that request answered (with Connection: close) first.
  void drain() noexcept;
  // The deadline of the current phase passed (called by the context's timer).
  void expire() noexcept;
  // The server's unsent bytes fell below half its budget: a connection paused for it reads on.
  bool waiting_for_output_budget() const noexcept { return waiting_for_output_budget_; }
  void resume_after_output_budget() noexcept;
  // The server is gone while a Responder still holds this closed connection.
  void orphan() noexcept { orphaned_ = true; }
  // Writes what the context's cork gathered for this connection (empties `bytes`).
  void write_out(std::string& bytes) noexcept;

  std::uint64_t id() const noexcept { return id_; }
  std::string_view remote_address();

  // The context's intrusive list of its phase, and the phase's deadline (uv_now clock).
  TimerPhase timer_phase() const noexcept { return timer_phase_; }
  void set_timer_phase(TimerPhase phase) noexcept { timer_phase_ = phase; }
  Connection* timer_prev = nullptr;
  Connection* timer_next = nullptr;
  std::uint64_t deadline_ms = 0;

 private:
  friend class Responder;
  friend struct Responder::HandlerRoot;
  friend class Drained;
  friend struct detail::BodyStream;

  ~Connection();
  static Connection* from(uv_handle_t* handle) noexcept;
  static void on_alloc(uv_handle_t* handle, std::size_t suggested, uv_buf_t* buf);
  static void on_read(uv_stream_t* stream, ssize_t nread, const uv_buf_t* buf);
  static void on_socket_closed(uv_handle_t* handle) noexcept;
  uv_stream_t* stream() noexcept { return reinterpret_cast<uv_stream_t*>(&tcp_); }
  uv_handle_t* handle() noexcept { return reinterpret_cast<uv_handle_t*>(&tcp_); }
  static void on_shutdown(uv_shutdown_t* request, int status);

  // States.
  bool answer_pending() const noexcept {
    return state_ == State::answering || state_ == State::streaming;
  }
  bool closing() const noexcept { return state_ >= State::closing; }
  bool closed() const noexcept { return state_ == State::closed; }
  ParsePhase parse_phase() const noexcept {
    return workspace_ != nullptr ? workspace_->parser.phase() : ParsePhase::idle;
  }
  bool idle() const noexcept;

  // Reading and requests (connection.cpp).
  int begin_reading();
  void process() noexcept;
  void dispatch() noexcept;
  void answer_internal_error() noexcept;
  [[gnu::cold, gnu::noinline]] void report_blocking(const Route& route,
                                                    std::uint64_t elapsed_ns) noexcept;
  // The handler threw (`failure`) or returned unanswered without keeping a Responder: a 500.
  [[gnu::cold, gnu::noinline]] void handler_left_no_answer(const Route& route,
                                                           std::exception_ptr failure) noexcept;
  void send_error(int status, std::string_view reason) noexcept;
  void compact() noexcept;
  Workspace& borrow_workspace();
  bool release_workspace_if_idle() noexcept;  // Whether it was given back.
  void release_workspace() noexcept;
  void update_reading() noexcept;
  std::size_t unsent() const noexcept { return tcp_.write_queue_size; }

  // The response on the wire (response_writer.cpp).
  // The head into the cork, which it returns for the body.
  std::string& write_head(int status, std::string_view content_type, std::size_t content_length,
                          bool chunked);
  void output(std::string_view bytes);
  bool respond(int status, std::string_view content_type, std::string_view body);
  bool start_stream(int status, std::string_view content_type);
  bool write_stream(std::string_view chunk);
  bool finish_stream();
  void finish_response() noexcept;
  void observe_request(std::uint64_t now_ns) noexcept;  // The RequestRecord, to the observer.
  void on_write_done(std::size_t bytes, int status) noexcept;
  void settle_after_write(int status) noexcept;
  std::size_t high_water() const noexcept;

  // Streamed request bodies (body_reader.cpp): hooks called from reading, answering, closing.
  bool start_streamed_body() noexcept;  // At a head with a body: dispatch if the route streams.
  void pump_streamed_body() noexcept;   // Feeds buffered body bytes to the reader (or drops them).
  // The reader has BodyReader::kHighWater waiting. In line: update_reading() asks it after
  // every pass, and most requests have no streamed body.
  bool body_held_back() const noexcept {
    return workspace_ != nullptr && workspace_->body_stream != nullptr && stream_held_back();
  }
  bool stream_held_back() const noexcept;  // body_held_back() once there is a streamed body.
  // body while waiting for the client, body_held while waiting for the handler.
  TimerPhase streamed_body_timer_phase() const noexcept;
  void settle_body_before_answer() noexcept;  // Keep-alive only if the unread rest is small.
  bool keep_discarding_body() noexcept;       // After the answer: drop the rest of the body?
  bool fail_streamed_body(int status, std::string_view reason) noexcept;  // 4xx/5xx, or close.
  void abandon_streamed_body() noexcept;   // The connection closes: the reader learns it.
  void body_consumed() noexcept;           // The reader took bytes: read on.
  void send_continue_for_body() noexcept;  // The reader starts: "100 Continue" if asked for.

  // Closing and timeouts (connection.cpp).
  void begin_close() noexcept;
  void update_timer() noexcept;
  void arm(TimerPhase phase) noexcept;
  void maybe_destroy() noexcept;
  class Frame;  // Counts a frame of this connection on the stack (depth_); connection.cpp.

  // Responders (responder.cpp).
  void add_responder(std::uint64_t request_number) noexcept;
  void drop_responder(std::uint64_t request_number) noexcept;
  [[gnu::cold, gnu::noinline]] void dropped_unanswered() noexcept;  // A 500, logged.
  void check_loop_thread(const char* what) const noexcept;
  void wake_drain_waiters() noexcept;
  void handler_failed(std::uint64_t request_number, const Route* route,
                      std::exception_ptr error) noexcept;

  // Small fields last, so the object is the socket and 64 bytes (connection_test).
  uv_tcp_t tcp_;                      // The socket; data -> this.
  ConnectionContext* context_;        // The loop's shared state; not touched once orphaned.
  Workspace* workspace_ = nullptr;    // Borrowed while a request is in flight.
  const std::uint64_t id_;            // In log lines and RequestRecord.
  std::uint32_t request_number_ = 0;  // Counts dispatched requests; Responders check it.
  std::uint32_t responders_ = 0;      // Live Responder copies; keep this object alive.
  State state_ = State::reading;      // Where the connection is in its life.
  std::uint8_t depth_ = 0;            // Frames of this connection on the stack (Frame).
  TimerPhase timer_phase_ = TimerPhase::none;  // Which list of the context it is on.
  // Conditions orthogonal to the state.
  bool reading_ : 1 = false;                    // uv_read_start is in effect.
  bool in_process_ : 1 = false;                 // process() runs: output is corked meanwhile.
  bool output_blocked_ : 1 = false;             // Unsent bytes above the high-water mark.
  bool waiting_for_output_budget_ : 1 = false;  // Paused: the server's unsent bytes over budget.
  bool peer_eof_ : 1 = false;                   // The client shut down its sending side.
  bool linger_after_answer_ : 1 = false;        // An early rejection: drain input, then close.
  bool handler_running_ : 1 = false;            // Inside the route handler call.
  bool orphaned_ : 1 = false;                   // The server is gone; touch nothing of it.
  bool first_byte_seen_ : 1 = false;            // A request has begun since the accept.
  bool handle_open_ : 1 = true;                 // tcp_'s close callback has not run yet.
  bool observe_pending_ : 1 = false;  // Answered in the handler; reported when it returns.
};

}  // namespace squall::http
