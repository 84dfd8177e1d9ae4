#include "http/connection.hpp"

#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <system_error>

#include <spdlog/spdlog.h>

#include "core/hot.hpp"
#include "core/monotonic.hpp"
#include "http/connection_context.hpp"
#include "squall/net/listener.hpp"

namespace squall::http {

namespace {

constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";

// Input read while closing goes here and is dropped (loop thread only).
char discard_buffer[16 * 1024];

}  // namespace

// Request methods that need the connection live here, next to it.
std::uint64_t Request::connection_id() const noexcept {
  return connection_ != nullptr ? connection_->id() : 0;
}

std::string_view Request::remote_address() const {
  return connection_ != nullptr ? connection_->remote_address() : std::string_view();
}

// A frame of the connection on the stack: the connection is not deleted before it returns.
class Connection::Frame {
 public:
  explicit Frame(Connection* connection) noexcept : connection_(connection) {
    ++connection_->depth_;
  }
  Frame(const Frame&) = delete;
  Frame& operator=(const Frame&) = delete;
  // The outermost frame does the delete that maybe_destroy() left for it.
  ~Frame() {
    if (--connection_->depth_ == 0) connection_->maybe_destroy();
  }

 private:
  Connection* connection_;
};

Connection::Connection(ConnectionContext& context, std::uint64_t id) : context_(&context), id_(id) {
  if (context.loop.closed()) {
    throw std::logic_error("cannot open a connection socket: the loop is closed");
  }
  // Last of what may throw: from here on libuv knows the handle, so it must be closed.
  const int status = uv_tcp_init(context.loop.uv(), &tcp_);
  if (status < 0) {
    throw std::system_error(-status, std::generic_category(),
                            std::string("cannot open a connection socket: ") + uv_strerror(status));
  }
  tcp_.data = this;
  context.add(this);
}

Connection::~Connection() {
  if (orphaned_) {
    delete workspace_;
    return;
  }
  context_->remove(this);
  if (workspace_ != nullptr) context_->release_workspace(workspace_);
}

Connection* Connection::from(uv_handle_t* handle) noexcept {
  return static_cast<Connection*>(handle->data);
}

int Connection::start(uv_stream_t* listener) {
  const int status = uv_accept(listener, stream());
  if (status < 0) {
    close_now();
    return status;
  }
  return begin_reading();
}

int Connection::start(int fd) {
  const int status = uv_tcp_open(&tcp_, fd);
  if (status < 0) {
    ::close(fd);
    close_now();
    return status;
  }
  return begin_reading();
}

int Connection::begin_reading() {
  // Responses leave whole, so Nagle's algorithm would only delay the last segment of each.
  uv_tcp_nodelay(&tcp_, 1);
  // A client that never sends a byte is closed after timeouts.header; the head of each request
  // then has timeouts.header from its own first byte.
  arm(TimerPhase::first_byte);
  update_reading();
  return 0;
}

std::string_view Connection::remote_address() {
  // Asked for by a handler, so a request (and its workspace) is in flight.
  if (workspace_ == nullptr) return {};
  std::string& address = workspace_->remote_address;
  if (address.empty() && !closed()) {
    sockaddr_storage peer{};
    int length = sizeof peer;
    if (uv_tcp_getpeername(&tcp_, reinterpret_cast<sockaddr*>(&peer), &length) == 0) {
      address = net::format_address(peer, false);
    }
  }
  return address;
}

// ---- Reading ---------------------------------------------------------------------------------

SQUALL_HOT Workspace& Connection::borrow_workspace() {
  if (workspace_ == nullptr) workspace_ = context_->acquire_workspace();
  return *workspace_;
}

SQUALL_HOT void Connection::on_alloc(uv_handle_t* handle, std::size_t, uv_buf_t* buf) {
  Connection* self = from(handle);
  if (self->closing()) {
    *buf = uv_buf_init(discard_buffer, sizeof discard_buffer);
    return;
  }
  // The workspace is borrowed only now that bytes are arriving: idle connections hold none.
  Workspace* workspace = nullptr;
  try {
    workspace = &self->borrow_workspace();
  } catch (const std::bad_alloc&) {
    *buf = uv_buf_init(nullptr, 0);  // libuv reports UV_ENOBUFS; the read is retried later.
    return;
  }
  // Set in place: uv_buf_init() is a call into libuv for two stores.
  buf->base = workspace->buffer + workspace->end;
  buf->len = workspace->capacity - workspace->end;
}

SQUALL_HOT void Connection::on_read(uv_stream_t* stream, ssize_t nread, const uv_buf_t*) {
  Connection* self = from(reinterpret_cast<uv_handle_t*>(stream));
  if (nread > 0) {
    self->context_->stats.bytes_received += static_cast<std::uint64_t>(nread);
    if (self->closing()) return;  // Lingering: read and drop.
    self->workspace_->end += static_cast<std::size_t>(nread);
    self->process();
    return;
  }
  if (nread == 0 || nread == UV_ENOBUFS) {
    // EAGAIN, or the buffer is full while an answer is pending: settle reading and buffers.
    self->process();
    return;
  }
  // on_alloc lent a workspace for this read, which brought no bytes: give it back now, or
  // every closing connection would hold one until its handle is closed.
  self->release_workspace_if_idle();
  if (nread != UV_EOF) {
    self->close_now();
    return;
  }
  self->peer_eof_ = true;
  if (self->closing()) {
    if (self->state_ == State::lingering) self->close_now();
    return;
  }
  // A client that leaves while its answer is pending has given up on it (nginx's 499,
  // uWebSockets' onAborted): the late answer is dropped.
  if (self->answer_pending()) {
    self->close_now();
    return;
  }
  // Requests already received are still answered while the client reads slowly.
  if (self->output_blocked_) {
    self->update_reading();
    return;
  }
  if (self->unsent() > 0 && self->parse_phase() == ParsePhase::idle) {
    self->state_ = State::closing;
    self->begin_close();
    return;
  }
  self->close_now();
}

// Parses and answers what the buffer holds, one request at a time, then settles the state,
// reading, buffers and deadline. Every path that changes what the connection waits for ends here.
SQUALL_HOT void Connection::process() noexcept {
  if (closed()) return;
  const Frame frame(this);
  if (workspace_ != nullptr && !closing()) {
    in_process_ = true;
    Workspace& workspace = *workspace_;
    RequestParser& parser = workspace.parser;
    bool clock_read = false;  // One clock read per pass serves the requests it starts.
    if (workspace.body_stream != nullptr) pump_streamed_body();
    while (state_ == State::reading && !output_blocked_ && workspace.begin < workspace.end) {
      if (!clock_read) {
        context_->clock_ns = squall::detail::monotonic_ns();
        clock_read = true;
      }
      if (parser.phase() == ParsePhase::idle) {
        if (unsent() > 0 && context_->unsent_budget.exhausted()) {
          // Clients that do not read hold more unsent bytes than the server allows: one that
          // has not taken its last answer yet gets no new request until its output or the
          // server's drains (resume_output_waiters), or the write timeout closes it.
          waiting_for_output_budget_ = true;
          context_->output_waiters = true;
          break;
        }
        first_byte_seen_ = true;
        workspace.request.connection_ = this;
        parser.attach(&workspace.request);
        parser.pause_before_body(context_->router->streams_bodies());
        workspace.request_start_ns = context_->clock_ns;
      }
      const FeedResult result =
          parser.feed(workspace.buffer + workspace.begin, workspace.end - workspace.begin);
      workspace.begin += result.consumed;
      if (result.event == ParseEvent::need_more) break;
      if (result.event == ParseEvent::expect_continue || result.event == ParseEvent::body_begins) {
        // A route that streams its body is dispatched now (body_reader.cpp).
        if (start_streamed_body()) continue;
        if (result.event == ParseEvent::expect_continue) output(kContinue);
        parser.continue_after_expect();
        continue;
      }
      if (result.event == ParseEvent::error) {
        send_error(parser.error_status(), parser.error_reason());
        break;
      }
      dispatch();
    }
    in_process_ = false;
  }
  if (closed()) return;
  context_->flush_cork();
  if (closed()) return;
  if (closing()) {
    begin_close();
    return;
  }
  if (peer_eof_ && !answer_pending() && !output_blocked_) {
    // The client sent everything it will; what could be answered was.
    state_ = State::closing;
    begin_close();
    return;
  }
  // The commonest end, all read answered, gives the workspace back with nothing to compact.
  // At once rather than kept for this connection's next request: the free list is last in,
  // first out, so the next connection to read borrows this same workspace while it is still in
  // the cache. Kept per connection, 100 busy connections touch 100 workspaces: 22 first-level
  // cache misses per request instead of 0.7 (bench/RESULTS.md: "Keeping workspaces, tried and
  // reverted").
  if (!release_workspace_if_idle()) compact();
  update_reading();
  update_timer();
}

void Connection::resume_after_output_budget() noexcept {
  waiting_for_output_budget_ = false;
  process();
}

SQUALL_HOT void Connection::compact() noexcept {
  if (workspace_ == nullptr || answer_pending()) return;
  Workspace& workspace = *workspace_;
  RequestParser& parser = workspace.parser;
  const ParsePhase phase = parser.phase();
  if (phase == ParsePhase::complete) return;
  // What must survive: the current message's head (its views) and the unparsed bytes.
  const char* keep_begin = workspace.buffer + workspace.begin;
  const char* keep_end = keep_begin;
  if (phase != ParsePhase::idle && parser.message_start() != nullptr) {
    keep_begin = parser.message_start();
    keep_end = phase == ParsePhase::head ? workspace.buffer + workspace.begin : parser.views_end();
  }
  const std::size_t unparsed = workspace.end - workspace.begin;
  const auto head_length = static_cast<std::size_t>(keep_end - keep_begin);
  if (head_length + unparsed == 0) {
    workspace.begin = workspace.end = 0;
    return;
  }
  // Moving costs a copy: do it only when space runs short, and only if there is a gap to
  // close (consumed bytes before the head, or body bytes between the head and the rest).
  if (workspace.capacity - workspace.end >= workspace.capacity / 2) return;
  if (keep_begin == workspace.buffer && keep_end == workspace.buffer + workspace.begin) return;
  const std::ptrdiff_t delta = workspace.buffer - keep_begin;
  std::memmove(workspace.buffer, keep_begin, head_length);
  std::memmove(workspace.buffer + head_length, workspace.buffer + workspace.begin, unparsed);
  parser.relocate(keep_begin, keep_end, delta);
  workspace.begin = head_length;
  workspace.end = head_length + unparsed;
}

SQUALL_HOT bool Connection::idle() const noexcept {
  return !answer_pending() && parse_phase() == ParsePhase::idle &&
         (workspace_ == nullptr || workspace_->begin == workspace_->end);
}

SQUALL_HOT bool Connection::release_workspace_if_idle() noexcept {
  if (workspace_ == nullptr || !idle() || workspace_->current_responders > 0) return false;
  release_workspace();
  return true;
}

SQUALL_HOT void Connection::release_workspace() noexcept {
  // A request answered inside a handler that then closed the connection is still reported.
  if (observe_pending_) observe_request(squall::detail::monotonic_ns());
  context_->release_workspace(workspace_);
  workspace_ = nullptr;
}

SQUALL_HOT void Connection::update_reading() noexcept {
  if (closed()) return;
  const bool buffer_full = workspace_ != nullptr && workspace_->end == workspace_->capacity;
  const bool want = closing() ? state_ == State::lingering && !peer_eof_
                              : !output_blocked_ && !waiting_for_output_budget_ && !peer_eof_ &&
                                    !buffer_full && !body_held_back();
  uv_stream_t* stream = this->stream();
  if (want && !reading_) {
    reading_ = uv_read_start(stream, on_alloc, on_read) == 0;
  } else if (!want && reading_) {
    uv_read_stop(stream);
    reading_ = false;
  }
}

// ---- Requests --------------------------------------------------------------------------------

SQUALL_HOT void Connection::dispatch() noexcept {
  Workspace& workspace = *workspace_;
  Request& request = workspace.request;
  ++request_number_;
  state_ = State::answering;
  workspace.response_chunked = workspace.response_close_delimited = false;
  workspace.response_status = 0;
  workspace.response_body_bytes = 0;
  workspace.response_headers.clear();
  workspace.head_request = request.method() == "HEAD";
  workspace.keep_alive = workspace.parser.keep_alive() && !context_->draining;
  workspace.current_responders = 0;

  if (workspace.handler_stop.stop_possible()) {
    workspace.handler_stop = std::stop_source(std::nostopstate);
  }

  const RouteMatch match =
      context_->router->find(request.method(), request.path(), request.params_);
  workspace.route = match.route;
  if (match.status == 404) {
    respond(404, "text/plain", "not found\n");
    return;
  }
  if (match.status == 405) {
    workspace.response_headers.append("Allow: ").append(match.allow).append("\r\n");
    respond(405, "text/plain", "method not allowed\n");
    return;
  }
  const Route& route = *match.route;
  // This pass's clock, or the end of the handler before (dispatch() runs inside process()).
  const std::uint64_t started = context_->clock_ns;
  std::exception_ptr failure;
  handler_running_ = true;
  try {
    route.handler(request, Responder(this, request_number_));
  } catch (...) {
    failure = std::current_exception();
  }
  handler_running_ = false;
  context_->clock_ns = squall::detail::monotonic_ns();
  if (observe_pending_ && workspace_ != nullptr) observe_request(context_->clock_ns);
  const std::uint64_t elapsed_ns = context_->clock_ns - started;
  const auto threshold_ns =
      static_cast<std::uint64_t>(context_->options.blocking_threshold.count()) * 1'000'000;
  if (elapsed_ns > threshold_ns) [[unlikely]]
    report_blocking(route, elapsed_ns);
  if (closed() || !answer_pending()) return;
  if (failure == nullptr && workspace.current_responders > 0) {
    // The handler answers later: keep its route alive even if a reload replaces the router.
    workspace.routes_in_use = context_->router;
    return;
  }
  handler_left_no_answer(route, failure);
}

void Connection::report_blocking(const Route& route, std::uint64_t elapsed_ns) noexcept {
  spdlog::warn(
      "connection {}: handler for {} {} blocked the event loop for {:.1f} ms "
      "(loop.blocking_threshold {} ms)",
      id_, route.method, route.pattern, static_cast<double>(elapsed_ns) / 1e6,
      context_->options.blocking_threshold.count());
}

void Connection::handler_left_no_answer(const Route& route, std::exception_ptr failure) noexcept {
  if (failure != nullptr) {
    std::string what = "an exception that is not a std::exception";
    try {
      std::rethrow_exception(failure);
    } catch (const std::exception& error) {
      what = error.what();
    } catch (...) {
    }
    spdlog::error("connection {}: handler for {} {} threw: {}", id_, route.method, route.pattern,
                  what);
  } else {
    spdlog::error(
        "connection {}: handler for {} {} returned without answering or keeping its "
        "Responder",
        id_, route.method, route.pattern);
  }
  answer_internal_error();
}

void Connection::answer_internal_error() noexcept {
  if (state_ == State::answering) {
    workspace_->response_headers.clear();
    respond(500, "text/plain", "internal server error\n");
  } else {
    // Half a response is out: the only honest end is to close.
    close_now();
  }
}

void Connection::send_error(int status, std::string_view reason) noexcept {
  // The client may still be sending what was refused: read and drop it after the answer.
  linger_after_answer_ = true;
  state_ = State::answering;
  Workspace* workspace = nullptr;
  try {
    workspace = &borrow_workspace();
  } catch (const std::bad_alloc&) {
    close_now();
    return;
  }
  workspace->route = nullptr;
  workspace->head_request = false;
  workspace->keep_alive = false;
  workspace->response_chunked = workspace->response_close_delimited = false;
  workspace->response_headers.clear();
  if (status == 503) {
    // A server-wide budget (or memory) ran out: the client may retry; the operator should know.
    workspace->response_headers.append("Retry-After: 1\r\n");
    if (context_->once_a_second(context_->last_budget_log_ms)) {
      spdlog::warn("connection {}: answering 503: {}", id_, reason);
    }
  }
  spdlog::debug("connection {}: answering {}: {}", id_, status, reason);
  std::string body(reason);
  body.push_back('\n');
  respond(status, "text/plain", body);
}

// ---- Closing ---------------------------------------------------------------------------------

// closing -> flushing or lingering (or closed at once when there is nothing left to do).
void Connection::begin_close() noexcept {
  if (state_ != State::closing) return;
  // Reading on after our answer (lingering) keeps the kernel from resetting the connection
  // while the client has unread input, which would destroy the answer in flight. Without
  // input left over (the usual Connection: close), nginx's choice holds: close at once.
  const bool unread_input = workspace_ != nullptr && workspace_->begin < workspace_->end;
  const bool linger = !peer_eof_ && (linger_after_answer_ || unread_input);
  if (workspace_ != nullptr && workspace_->current_responders == 0) release_workspace();
  if (!linger && unsent() == 0) {
    close_now();
    return;
  }
  auto* request = new (std::nothrow) uv_shutdown_t;
  const int status =
      request == nullptr ? UV_ENOMEM : uv_shutdown(request, stream(), &Connection::on_shutdown);
  if (status < 0) {
    delete request;
    close_now();
    return;
  }
  state_ = linger ? State::lingering : State::flushing;
  update_reading();
  if (unsent() == 0) arm(TimerPhase::lingering);
}

void Connection::on_shutdown(uv_shutdown_t* request, int status) {
  Connection* self = from(reinterpret_cast<uv_handle_t*>(request->handle));
  delete request;
  if (self->closed()) return;
  if (status < 0 || self->peer_eof_ || self->state_ != State::lingering) {
    self->close_now();
    return;
  }
  self->arm(TimerPhase::lingering);
}

void Connection::drain() noexcept {
  if (closed()) return;
  if (idle() && unsent() == 0 && !closing()) {
    // Accepted, but its first request has not arrived yet: the client is about to send it.
    // Like nginx, only connections idle between requests are closed at once; this one is
    // answered with Connection: close, or closed by timeouts.header or the drain deadline.
    if (timer_phase_ == TimerPhase::first_byte) return;
    // The next request is in the socket but not read yet: closing now would reset it.
    int waiting = 0;
    uv_os_fd_t fd = -1;
    if (uv_fileno(handle(), &fd) == 0 && ::ioctl(fd, FIONREAD, &waiting) == 0 && waiting > 0) {
      return;
    }
    close_now();
    return;
  }
  // An answer not yet started says Connection: close; a started one is followed by the close.
  if (answer_pending()) workspace_->keep_alive = false;
  if (state_ == State::reading && parse_phase() == ParsePhase::idle) {
    // Only unsent output is left: finish it, then close.
    state_ = State::closing;
    begin_close();
  }
}

void Connection::close_now() noexcept {
  if (closed()) return;
  const bool client_gone_before_answer = answer_pending();
  if (workspace_ != nullptr && workspace_->body_stream != nullptr) abandon_streamed_body();
  state_ = State::closed;
  waiting_for_output_budget_ = false;
  // A handler still holding this request's Responder may read the Request until it answers.
  if (workspace_ != nullptr && !orphaned_) {
    workspace_->parser.release_body_budget();
    if (workspace_->current_responders == 0) release_workspace();
  }
  if (!orphaned_) context_->forget_cork(this);
  // The only uv_close of the socket (closed() returned above on a second call); its close
  // callback, which ends here too, lets the object be deleted.
  uv_close(handle(), &Connection::on_socket_closed);
  if (workspace_ != nullptr) {
    // A coroutine handler still working on the answer is cancelled. lib/core's awaitables only
    // stop their operations here and resume later, so nothing runs inside this close.
    if (client_gone_before_answer && workspace_->handler_stop.stop_possible()) {
      workspace_->handler_stop.request_stop();
    }
    // Streaming writers waiting for output learn that the client is gone (on a later turn).
    wake_drain_waiters();
  }
  // Last: the server's drain may end here, and its callback may delete the server and orphan
  // this connection.
  if (!orphaned_) context_->connection_closed(this);
}

// The socket's close callback, after close_now() (Loop::close() closes the connections through
// their context). The connection is closed now; it is deleted here unless a Responder still
// refers to it (the last one's destruction deletes it then).
void Connection::on_socket_closed(uv_handle_t* handle) noexcept {
  Connection* self = from(handle);
  const Frame frame(self);  // close_now() may drop Responders (stop callbacks): delete after it.
  self->handle_open_ = false;
  self->close_now();
}

void Connection::maybe_destroy() noexcept {
  if (closed() && !handle_open_ && responders_ == 0 && depth_ == 0) delete this;
}

// ---- Timeouts --------------------------------------------------------------------------------

// Picks the deadline the state calls for. Deadlines of a phase are measured from entering it;
// only the idle one restarts with each answer.
SQUALL_HOT void Connection::update_timer() noexcept {
  if (closing() || unsent() > 0) return;
  if (answer_pending()) {
    // The application's own time is not bounded here; a streamed body's wait for its client is.
    const TimerPhase phase = streamed_body_timer_phase();
    if (phase != timer_phase_) arm(phase);
    return;
  }
  switch (parse_phase()) {
    case ParsePhase::idle:
      // Before the first request: bounded by timeouts.header since the accept.
      if (!first_byte_seen_) {
        if (timer_phase_ != TimerPhase::first_byte) arm(TimerPhase::first_byte);
      } else {
        arm(TimerPhase::idle);
      }
      break;
    case ParsePhase::head:
      // Measured from the request's first byte: later bytes do not extend it (slowloris).
      if (timer_phase_ != TimerPhase::head) arm(TimerPhase::head);
      break;
    case ParsePhase::body:
      // One deadline for the whole body from the end of its head: a trickle of bytes does not
      // extend it, so a slow client cannot hold a body buffer open.
      if (timer_phase_ != TimerPhase::body) arm(TimerPhase::body);
      break;
    case ParsePhase::complete:
      arm(TimerPhase::none);
      break;
  }
}

SQUALL_HOT void Connection::arm(TimerPhase phase) noexcept {
  if (closed() || orphaned_) return;
  context_->set_phase(this, phase);
}

void Connection::expire() noexcept {
  switch (timer_phase_) {
    case TimerPhase::first_byte:
      close_now();  // Nothing was asked, so there is nothing to answer.
      break;
    case TimerPhase::head:
      if (parse_phase() == ParsePhase::idle) {
        close_now();  // Nothing was asked, so there is nothing to answer.
      } else {
        send_error(408, "request head not received within timeouts.header");
      }
      break;
    case TimerPhase::body:
      if (!fail_streamed_body(408, "request body not received within timeouts.body")) {
        send_error(408, "request body not received within timeouts.body");
      }
      break;
    case TimerPhase::body_held:
      // The handler's fault, not the client's: a 500, and the reader learns why.
      spdlog::warn(
          "connection {}: answering 500: the handler took none of its streamed request "
          "body for timeouts.body ({} ms)",
          id_, context_->options.timeouts.body.count());
      if (!fail_streamed_body(500, "request body not read by the handler within timeouts.body")) {
        close_now();
      }
      break;
    case TimerPhase::write:
      spdlog::info("connection {}: closed: client read nothing for timeouts.write ({} ms)", id_,
                   context_->options.timeouts.write.count());
      close_now();
      break;
    case TimerPhase::idle:
    case TimerPhase::lingering:
    case TimerPhase::none:
    case TimerPhase::closed:
      close_now();
      break;
  }
}

}  // namespace squall::http
