#include "http/connection.hpp"

#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include <spdlog/spdlog.h>

#include "squall/core/task.hpp"

#include "squall/http/response.hpp"
#include "squall/http/server.hpp"
#include "squall/net/listener.hpp"

namespace squall::http {

namespace {

// A queued write that libuv could not finish at once; it owns its bytes until the callback.
struct PendingWrite {
  uv_write_t request;      // request.data -> this.
  Connection* connection;  // The writer; alive until this callback ran (libuv's guarantee).
  std::string bytes;       // The whole buffer, including what was written already.
  std::size_t unsent;      // Bytes handed to uv_write.
};

constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";

// Input read while closing goes here and is dropped (loop thread only).
char discard_buffer[16 * 1024];

void append_decimal(std::string& out, std::uint64_t value) {
  char digits[24];
  const auto result = std::to_chars(digits, digits + sizeof digits, value);
  out.append(digits, result.ptr);
}

}  // namespace

// Request methods that need the connection live here, next to it.
std::uint64_t Request::connection_id() const noexcept {
  return connection_ != nullptr ? connection_->id() : 0;
}

std::string_view Request::remote_address() const {
  return connection_ != nullptr ? connection_->remote_address() : std::string_view();
}

Connection::Connection(Server& server, std::uint64_t id)
    : server_(server),
      id_(id),
      loop_thread_(std::this_thread::get_id()),
      parser_(server.options_.limits, &server.body_budget_) {
  uv_tcp_init(server.loop_.uv(), &tcp_);
  uv_timer_init(server.loop_.uv(), &timer_);
  tcp_.data = this;
  timer_.data = this;
  open_handles_ = 2;
}

Connection::~Connection() {
  // A closed connection is no longer in the server's list, so the server's destructor cannot
  // orphan it: a Responder that outlives the server may destroy it later. Its workspace (kept
  // for that Responder) is freed here instead of returning to the server's pool.
  if (workspace_ != nullptr && !orphaned_ && !closed_) server_.release_workspace(workspace_);
  if (workspace_ != nullptr && (orphaned_ || closed_)) {
    delete[] workspace_->buffer;
    delete workspace_;
  }
}

Connection* Connection::from(uv_handle_t* handle) noexcept {
  return static_cast<Connection*>(handle->data);
}

int Connection::start(uv_stream_t* listener) {
  const int status = uv_accept(listener, reinterpret_cast<uv_stream_t*>(&tcp_));
  if (status < 0) {
    close_now();
    return status;
  }
  // Responses leave whole, so Nagle's algorithm would only delay the last segment of each.
  uv_tcp_nodelay(&tcp_, 1);
  // A client that never sends a byte is closed after timeouts.header; the head of each request
  // then has timeouts.header from its own first byte.
  arm(TimerPhase::first_byte, static_cast<std::uint64_t>(server_.options_.timeouts.header.count()));
  update_reading();
  return 0;
}

std::string_view Connection::remote_address() {
  if (remote_address_.empty() && !closed_) {
    sockaddr_storage peer{};
    int length = sizeof peer;
    if (uv_tcp_getpeername(&tcp_, reinterpret_cast<sockaddr*>(&peer), &length) == 0) {
      remote_address_ = net::format_address(peer, false);
    }
  }
  return remote_address_;
}

// ---- Reading ---------------------------------------------------------------------------------

void Connection::on_alloc(uv_handle_t* handle, std::size_t, uv_buf_t* buf) {
  Connection* self = from(handle);
  if (self->closing_) {
    *buf = uv_buf_init(discard_buffer, sizeof discard_buffer);
    return;
  }
  // The workspace is borrowed only now that bytes are arriving: idle connections hold none.
  if (self->workspace_ == nullptr) self->workspace_ = self->server_.acquire_workspace();
  Workspace& workspace = *self->workspace_;
  *buf = uv_buf_init(workspace.buffer + workspace.end,
                     static_cast<unsigned>(workspace.capacity - workspace.end));
}

void Connection::on_read(uv_stream_t* stream, ssize_t nread, const uv_buf_t*) {
  Connection* self = from(reinterpret_cast<uv_handle_t*>(stream));
  if (nread > 0) {
    self->server_.stats_.bytes_received += static_cast<std::uint64_t>(nread);
    if (self->closing_) return;  // Lingering: read and drop.
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
  // every closing connection would hold one until its handles are closed.
  self->release_workspace_if_idle();
  if (nread != UV_EOF) {
    self->close_now();
    return;
  }
  self->peer_eof_ = true;
  if (self->closing_) {
    if (self->lingering_) self->close_now();
    return;
  }
  // A client that leaves while its answer is pending has given up on it (nginx's 499,
  // uWebSockets' onAborted): the late answer is dropped.
  if (self->response_pending_) {
    self->close_now();
    return;
  }
  // Requests already received are still answered while the client reads slowly.
  if (self->output_blocked_) {
    self->update_reading();
    return;
  }
  if (self->pending_write_bytes_ > 0 && self->parser_.phase() == ParsePhase::idle) {
    self->closing_ = true;
    self->begin_close();
    return;
  }
  self->close_now();
}

void Connection::process() noexcept {
  if (closed_) return;
  if (workspace_ != nullptr && !closing_) {
    in_process_ = true;
    Workspace& workspace = *workspace_;
    while (!response_pending_ && !output_blocked_ && !closing_ && workspace.begin < workspace.end) {
      if (parser_.phase() == ParsePhase::idle) {
        if (pending_write_bytes_ > 0 && server_.unsent_budget_.exhausted()) {
          // Clients that do not read hold more unsent bytes than the server allows: one that
          // has not taken its last answer yet gets no new request until its output or the
          // server's drains (Server::resume_output_waiters), or the write timeout closes it.
          waiting_for_output_budget_ = true;
          server_.output_waiters_ = true;
          break;
        }
        first_byte_seen_ = true;
        workspace.request.connection_ = this;
        parser_.attach(&workspace.request);
        request_start_ns_ = uv_hrtime();
      }
      const FeedResult result =
          parser_.feed(workspace.buffer + workspace.begin, workspace.end - workspace.begin);
      workspace.begin += result.consumed;
      if (result.event == ParseEvent::need_more) break;
      if (result.event == ParseEvent::expect_continue) {
        output(kContinue);
        parser_.continue_after_expect();
        continue;
      }
      if (result.event == ParseEvent::error) {
        send_error(parser_.error_status(), parser_.error_reason());
        break;
      }
      dispatch();
    }
    in_process_ = false;
  }
  if (closed_) return;
  server_.flush_cork();
  if (closed_) return;
  if (closing_) {
    begin_close();
    return;
  }
  if (peer_eof_ && !response_pending_ && !output_blocked_) {
    // The client sent everything it will; what could be answered was.
    closing_ = true;
    begin_close();
    return;
  }
  compact();
  release_workspace_if_idle();
  update_reading();
  update_timer();
}

void Connection::compact() noexcept {
  if (workspace_ == nullptr || response_pending_) return;
  Workspace& workspace = *workspace_;
  const ParsePhase phase = parser_.phase();
  if (phase == ParsePhase::complete) return;
  // What must survive: the current message's head (its views) and the unparsed bytes.
  const char* keep_begin = workspace.buffer + workspace.begin;
  const char* keep_end = keep_begin;
  if (phase != ParsePhase::idle && parser_.message_start() != nullptr) {
    keep_begin = parser_.message_start();
    keep_end = phase == ParsePhase::head ? workspace.buffer + workspace.begin : parser_.views_end();
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
  parser_.relocate(keep_begin, keep_end, delta);
  workspace.begin = head_length;
  workspace.end = head_length + unparsed;
}

bool Connection::idle() const noexcept {
  return !response_pending_ && parser_.phase() == ParsePhase::idle &&
         (workspace_ == nullptr || workspace_->begin == workspace_->end);
}

void Connection::release_workspace_if_idle() noexcept {
  if (workspace_ == nullptr || !idle() || current_responders_ > 0) return;
  parser_.release_body_budget();
  server_.release_workspace(workspace_);
  workspace_ = nullptr;
}

void Connection::update_reading() noexcept {
  if (closed_) return;
  const bool buffer_full = workspace_ != nullptr && workspace_->end == workspace_->capacity;
  const bool want =
      closing_ ? lingering_ && !peer_eof_
               : !output_blocked_ && !waiting_for_output_budget_ && !peer_eof_ && !buffer_full;
  auto* stream = reinterpret_cast<uv_stream_t*>(&tcp_);
  if (want && !reading_) {
    reading_ = uv_read_start(stream, on_alloc, on_read) == 0;
  } else if (!want && reading_) {
    uv_read_stop(stream);
    reading_ = false;
  }
}

// ---- Requests and responses ------------------------------------------------------------------

void Connection::dispatch() noexcept {
  Request& request = workspace_->request;
  ++request_number_;
  response_pending_ = true;
  response_started_ = response_chunked_ = response_close_delimited_ = false;
  response_status_ = 0;
  response_body_bytes_ = 0;
  workspace_->response_headers.clear();
  head_request_ = request.method() == "HEAD";
  keep_alive_ = parser_.keep_alive() && !server_.draining_;

  if (handler_stop_.stop_possible()) handler_stop_ = std::stop_source(std::nostopstate);

  const RouteMatch match = server_.router_->find(request.method(), request.path(), request.params_);
  route_ = match.route;
  if (match.status == 404) {
    respond(404, "text/plain", "not found\n");
    return;
  }
  if (match.status == 405) {
    workspace_->response_headers.append("Allow: ").append(match.allow).append("\r\n");
    respond(405, "text/plain", "method not allowed\n");
    return;
  }
  const std::uint64_t started = uv_hrtime();
  const char* failure = nullptr;
  std::string what;
  handler_running_ = true;
  try {
    route_->handler(request, Responder(this, request_number_));
  } catch (const std::exception& error) {
    failure = "threw";
    what = error.what();
  } catch (...) {
    failure = "threw";
    what = "an exception that is not a std::exception";
  }
  handler_running_ = false;
  const std::uint64_t elapsed_ns = uv_hrtime() - started;
  const auto threshold_ns =
      static_cast<std::uint64_t>(server_.options_.blocking_threshold.count()) * 1'000'000;
  if (elapsed_ns > threshold_ns) {
    spdlog::warn(
        "connection {}: handler for {} {} blocked the event loop for {:.1f} ms "
        "(loop.blocking_threshold {} ms)",
        id_, route_->method, route_->pattern, static_cast<double>(elapsed_ns) / 1e6,
        server_.options_.blocking_threshold.count());
  }
  if (closed_ || !response_pending_) return;
  if (failure == nullptr && current_responders_ > 0) {
    // The handler answers later: keep its route alive even if a reload replaces the router.
    routes_in_use_ = server_.router_;
    return;
  }
  if (failure != nullptr) {
    spdlog::error("connection {}: handler for {} {} {}: {}", id_, route_->method, route_->pattern,
                  failure, what);
  } else {
    spdlog::error(
        "connection {}: handler for {} {} returned without answering or keeping its "
        "Responder",
        id_, route_->method, route_->pattern);
  }
  answer_internal_error();
}

void Connection::answer_internal_error() noexcept {
  if (!response_started_) {
    workspace_->response_headers.clear();
    respond(500, "text/plain", "internal server error\n");
  } else {
    // Half a response is out: the only honest end is to close.
    close_now();
  }
}

void Connection::write_head(int status, std::string_view content_type, std::size_t content_length,
                            bool chunked) {
  response_status_ = status;
  std::string& out = server_.cork_for(this);
  out.append("HTTP/1.1 ");
  append_decimal(out, static_cast<std::uint64_t>(status));
  out.push_back(' ');
  out.append(reason_phrase(status));
  out.append("\r\nServer: ").append(server_.options_.server_name);
  out.append("\r\nDate: ").append(server_.date_.now());
  out.append("\r\n");
  if (!content_type.empty()) out.append("Content-Type: ").append(content_type).append("\r\n");
  if (chunked) {
    out.append("Transfer-Encoding: chunked\r\n");
  } else if (!response_close_delimited_ && status != 204 && status != 304) {
    out.append("Content-Length: ");
    append_decimal(out, content_length);
    out.append("\r\n");
  }
  if (workspace_ != nullptr) out.append(workspace_->response_headers);
  const Request* request = workspace_ != nullptr ? &workspace_->request : nullptr;
  const bool http10 = request != nullptr && request->http_minor() == 0;
  if (!keep_alive_) {
    out.append("Connection: close\r\n");
  } else {
    if (http10) out.append("Connection: keep-alive\r\n");
    out.append(server_.keep_alive_header_);
  }
  out.append("\r\n");
}

void Connection::output(std::string_view bytes) {
  server_.cork_for(this).append(bytes);
}

bool Connection::respond(int status, std::string_view content_type, std::string_view body) {
  if (!response_pending_ || response_started_) return false;
  const bool has_body = !head_request_ && status != 204 && status != 304;
  write_head(status, content_type, body.size(), false);
  if (has_body) {
    output(body);
    response_body_bytes_ = body.size();
  }
  finish_response();
  return true;
}

bool Connection::start_stream(int status, std::string_view content_type) {
  if (!response_pending_ || response_started_) return false;
  const bool http10 = workspace_->request.http_minor() == 0;
  response_chunked_ = !http10 && !head_request_;
  response_close_delimited_ = http10 && !head_request_;
  if (response_close_delimited_) keep_alive_ = false;
  write_head(status, content_type, 0, response_chunked_);
  response_started_ = true;
  if (!in_process_) server_.flush_cork();
  return true;
}

bool Connection::write_stream(std::string_view chunk) {
  if (!response_pending_ || !response_started_) return false;
  if (head_request_ || chunk.empty()) return true;
  std::string& out = server_.cork_for(this);
  if (response_chunked_) {
    char size[20];
    const auto result = std::to_chars(size, size + sizeof size, chunk.size(), 16);
    out.append(size, result.ptr).append("\r\n").append(chunk).append("\r\n");
  } else {
    out.append(chunk);
  }
  response_body_bytes_ += chunk.size();
  // Inside process() output is corked; a handler streaming from its first slice must still see
  // its bytes counted as unsent (writable()), so a large cork goes out at once.
  if (!in_process_ || out.size() > high_water()) server_.flush_cork();
  return true;
}

bool Connection::finish_stream() {
  if (!response_pending_ || !response_started_) return false;
  if (response_chunked_) output("0\r\n\r\n");
  finish_response();
  return true;
}

void Connection::finish_response() noexcept {
  response_pending_ = false;
  // The deadline measured belonged to this request; the next one starts its own (a pipelined
  // request parsed in the same pass must not inherit this one's head or body deadline).
  phase_ = TimerPhase::none;
  ++server_.stats_.requests;
  if (server_.request_observer_) {
    const Request* request = workspace_ != nullptr ? &workspace_->request : nullptr;
    const RequestRecord record{request,
                               route_ != nullptr ? std::string_view(route_->pattern) : "",
                               response_status_,
                               response_body_bytes_,
                               std::chrono::nanoseconds(uv_hrtime() - request_start_ns_),
                               id_};
    try {
      server_.request_observer_(record);
    } catch (const std::exception& error) {
      spdlog::error("connection {}: request observer threw: {}", id_, error.what());
    }
  }
  const bool more_input = workspace_ != nullptr && workspace_->begin < workspace_->end;
  routes_in_use_.reset();
  if (!keep_alive_ || (peer_eof_ && !more_input)) {
    closing_ = true;
  } else {
    parser_.next_message();
  }
  // A late answer (outside process()) resumes reading any pipelined requests and flushes.
  if (!in_process_) process();
}

void Connection::send_error(int status, std::string_view reason) noexcept {
  // The client may still be sending what was refused: read and drop it after the answer.
  linger_after_answer_ = true;
  response_pending_ = true;
  route_ = nullptr;
  head_request_ = false;
  keep_alive_ = false;
  response_started_ = response_chunked_ = response_close_delimited_ = false;
  if (workspace_ != nullptr) workspace_->response_headers.clear();
  if (status == 503) {
    // A server-wide budget (or memory) ran out: the client may retry; the operator should know.
    if (workspace_ != nullptr) workspace_->response_headers.append("Retry-After: 1\r\n");
    if (server_.once_a_second(server_.last_budget_log_ms_)) {
      spdlog::warn("connection {}: answering 503: {}", id_, reason);
    }
  }
  spdlog::debug("connection {}: answering {}: {}", id_, status, reason);
  std::string body(reason);
  body.push_back('\n');
  respond(status, "text/plain", body);
}

// ---- Writing ---------------------------------------------------------------------------------

void Connection::write_out(std::string& bytes) noexcept {
  if (closed_ || bytes.empty()) {
    bytes.clear();
    return;
  }
  const std::size_t size = bytes.size();
  server_.stats_.bytes_sent += size;
  auto* stream = reinterpret_cast<uv_stream_t*>(&tcp_);
  uv_buf_t buf = uv_buf_init(bytes.data(), static_cast<unsigned>(size));
  // Most responses fit the socket buffer: write now, without a request or a copy.
  int written = uv_try_write(stream, &buf, 1);
  if (written >= 0 && static_cast<std::size_t>(written) == size) {
    bytes.clear();
    return;
  }
  if (written < 0 && written != UV_EAGAIN) {
    bytes.clear();
    spdlog::debug("connection {}: write failed: {}", id_, uv_strerror(written));
    close_now();
    return;
  }
  if (written < 0) written = 0;
  // The rest waits in a PendingWrite that takes the buffer itself, so nothing is copied.
  auto* pending = new PendingWrite{};
  pending->connection = this;
  pending->bytes = std::move(bytes);
  bytes.clear();
  pending->unsent = size - static_cast<std::size_t>(written);
  pending->request.data = pending;
  uv_buf_t rest =
      uv_buf_init(pending->bytes.data() + written, static_cast<unsigned>(pending->unsent));
  const int status = uv_write(&pending->request, stream, &rest, 1, [](uv_write_t* request, int s) {
    auto* done = static_cast<PendingWrite*>(request->data);
    Connection* connection = done->connection;
    const std::size_t unsent = done->unsent;
    delete done;
    connection->on_write_done(unsent, s);
  });
  if (status < 0) {
    delete pending;
    close_now();
    return;
  }
  pending_write_bytes_ += pending->unsent;
  server_.unsent_budget_.take(pending->unsent);
  arm(TimerPhase::write, static_cast<std::uint64_t>(server_.options_.timeouts.write.count()));
  if (pending_write_bytes_ > server_.options_.limits.write_buffer_high_water) {
    // The client reads slower than it asks: stop taking requests until it catches up.
    output_blocked_ = true;
    update_reading();
  }
}

void Connection::on_write_done(std::size_t bytes, int status) noexcept {
  pending_write_bytes_ -= bytes;
  if (orphaned_) return;
  server_.unsent_budget_.give_back(bytes);
  settle_after_write(status);
  // A streaming writer waiting for the client resumes at the low-water mark (close_now woke it
  // already if the connection closed above).
  if (!closed_ && pending_write_bytes_ <= high_water() / 2) wake_drain_waiters();
  // Last: other connections may run here, and this one may have been closed above.
  server_.resume_output_waiters();
}

void Connection::settle_after_write(int status) noexcept {
  if (closed_) return;
  if (status < 0) {
    close_now();
    return;
  }
  if (pending_write_bytes_ > 0) {
    // Progress: the write timeout measures stalls, not the length of a transfer.
    arm(TimerPhase::write, static_cast<std::uint64_t>(server_.options_.timeouts.write.count()));
  }
  if (output_blocked_ &&
      pending_write_bytes_ <= server_.options_.limits.write_buffer_high_water / 2) {
    output_blocked_ = false;
    if (pending_write_bytes_ == 0) waiting_for_output_budget_ = false;
    process();
  } else if (waiting_for_output_budget_ && pending_write_bytes_ == 0) {
    waiting_for_output_budget_ = false;
    process();
  } else if (pending_write_bytes_ == 0 && !closing_) {
    update_timer();
  } else if (pending_write_bytes_ == 0 && lingering_) {
    arm(TimerPhase::lingering,
        static_cast<std::uint64_t>(server_.options_.timeouts.lingering.count()));
  }
}

// ---- Closing ---------------------------------------------------------------------------------

void Connection::begin_close() noexcept {
  if (closed_ || shutdown_started_) return;
  shutdown_started_ = true;
  closing_ = true;
  // Reading on after our answer (lingering) keeps the kernel from resetting the connection
  // while the client has unread input, which would destroy the answer in flight. Without
  // input left over (the usual Connection: close), nginx's choice holds: close at once.
  const bool unread_input = workspace_ != nullptr && workspace_->begin < workspace_->end;
  lingering_ = !peer_eof_ && (linger_after_answer_ || unread_input);
  parser_.release_body_budget();
  if (current_responders_ == 0 && workspace_ != nullptr) {
    server_.release_workspace(workspace_);
    workspace_ = nullptr;
  }
  if (!lingering_ && pending_write_bytes_ == 0) {
    close_now();
    return;
  }
  const int status = uv_shutdown(&shutdown_request_, reinterpret_cast<uv_stream_t*>(&tcp_),
                                 &Connection::on_shutdown);
  if (status < 0) {
    close_now();
    return;
  }
  update_reading();
  if (pending_write_bytes_ == 0) {
    arm(TimerPhase::lingering,
        static_cast<std::uint64_t>(server_.options_.timeouts.lingering.count()));
  }
}

void Connection::on_shutdown(uv_shutdown_t* request, int status) {
  Connection* self = from(reinterpret_cast<uv_handle_t*>(request->handle));
  if (self->closed_) return;
  if (status < 0 || self->peer_eof_ || !self->lingering_) {
    self->close_now();
    return;
  }
  self->arm(TimerPhase::lingering,
            static_cast<std::uint64_t>(self->server_.options_.timeouts.lingering.count()));
}

void Connection::drain() noexcept {
  if (closed_) return;
  if (idle() && pending_write_bytes_ == 0 && !closing_) {
    close_now();
    return;
  }
  // An answer not yet started says Connection: close; a started one is followed by the close.
  if (response_pending_) keep_alive_ = false;
  if (!response_pending_ && parser_.phase() == ParsePhase::idle && !closing_) {
    // Only unsent output is left: finish it, then close.
    closing_ = true;
    begin_close();
  }
}

void Connection::close_now() noexcept {
  if (closed_) return;
  const bool client_gone_before_answer = response_pending_;
  closed_ = true;
  closing_ = true;
  response_pending_ = false;
  waiting_for_output_budget_ = false;
  if (!orphaned_) parser_.release_body_budget();
  // A handler still holding this request's Responder may read the Request until it answers.
  if (current_responders_ == 0 && workspace_ != nullptr && !orphaned_) {
    server_.release_workspace(workspace_);
    workspace_ = nullptr;
  }
  if (!orphaned_) {
    server_.forget_cork(this);
    server_.connection_closed(this);
  }
  uv_close(reinterpret_cast<uv_handle_t*>(&tcp_), &Connection::on_closed);
  uv_close(reinterpret_cast<uv_handle_t*>(&timer_), &Connection::on_closed);
  // A coroutine handler still working on the answer is cancelled. lib/core's awaitables only
  // stop their operations here and resume later, so nothing runs inside this close.
  if (client_gone_before_answer && handler_stop_.stop_possible()) handler_stop_.request_stop();
  // Streaming writers waiting for output learn that the client is gone (on a later turn).
  wake_drain_waiters();
}

void Connection::on_closed(uv_handle_t* handle) {
  Connection* self = from(handle);
  --self->open_handles_;
  self->maybe_destroy();
}

void Connection::maybe_destroy() noexcept {
  if (closed_ && open_handles_ == 0 && responders_ == 0) delete this;
}

// ---- Timers ----------------------------------------------------------------------------------

void Connection::update_timer() noexcept {
  if (closed_ || closing_ || pending_write_bytes_ > 0) return;
  if (response_pending_) {
    phase_ = TimerPhase::none;  // The application's own time is not bounded here.
    return;
  }
  const auto& timeouts = server_.options_.timeouts;
  switch (parser_.phase()) {
    case ParsePhase::idle:
      if (!first_byte_seen_) {
        // Still waiting for the first request: bounded by timeouts.header since the accept.
        if (phase_ != TimerPhase::first_byte) {
          arm(TimerPhase::first_byte, static_cast<std::uint64_t>(timeouts.header.count()));
        }
      } else {
        arm(TimerPhase::idle, static_cast<std::uint64_t>(timeouts.keepalive.count()));
      }
      break;
    case ParsePhase::head:
      // Measured from the request's first byte: later bytes do not extend it (slowloris).
      if (phase_ != TimerPhase::head) {
        arm(TimerPhase::head, static_cast<std::uint64_t>(timeouts.header.count()));
      }
      break;
    case ParsePhase::body:
      // One deadline for the whole body from the end of its head: a trickle of bytes does not
      // extend it, so a slow client cannot hold a body buffer open.
      if (phase_ != TimerPhase::body) {
        arm(TimerPhase::body, static_cast<std::uint64_t>(timeouts.body.count()));
      }
      break;
    case ParsePhase::complete:
      phase_ = TimerPhase::none;
      break;
  }
}

void Connection::arm(TimerPhase phase, std::uint64_t timeout_ms) noexcept {
  phase_ = phase;
  const std::uint64_t now = uv_now(server_.loop_.uv());
  deadline_ms_ = now + timeout_ms;
  // Deadlines mostly move later; the timer is re-set only when it would fire too late, so a
  // busy keep-alive connection costs no timer operation per request.
  if (!timer_running_ || timer_due_ms_ > deadline_ms_) {
    uv_timer_start(&timer_, &Connection::on_timer, timeout_ms, 0);
    timer_running_ = true;
    timer_due_ms_ = deadline_ms_;
  }
}

void Connection::on_timer(uv_timer_t* timer) {
  Connection* self = from(reinterpret_cast<uv_handle_t*>(timer));
  self->timer_running_ = false;
  if (self->closed_ || self->phase_ == TimerPhase::none) return;
  const std::uint64_t now = uv_now(self->server_.loop_.uv());
  if (now < self->deadline_ms_) {
    uv_timer_start(&self->timer_, &Connection::on_timer, self->deadline_ms_ - now, 0);
    self->timer_running_ = true;
    self->timer_due_ms_ = self->deadline_ms_;
    return;
  }
  self->expire();
}

void Connection::expire() noexcept {
  switch (phase_) {
    case TimerPhase::first_byte:
      close_now();  // Nothing was asked, so there is nothing to answer.
      break;
    case TimerPhase::head:
      if (parser_.phase() == ParsePhase::idle) {
        close_now();  // Nothing was asked, so there is nothing to answer.
      } else {
        send_error(408, "request head not received within timeouts.header");
      }
      break;
    case TimerPhase::body:
      send_error(408, "request body not received within timeouts.body");
      break;
    case TimerPhase::write:
      spdlog::info("connection {}: closed: client read nothing for timeouts.write ({} ms)", id_,
                   server_.options_.timeouts.write.count());
      close_now();
      break;
    case TimerPhase::idle:
    case TimerPhase::lingering:
    case TimerPhase::none:
      close_now();
      break;
  }
}

// ---- Responder -------------------------------------------------------------------------------

// The reference counts below are plain ints of a loop-owned object: a Responder copied or
// destroyed on another thread races with the loop and may free the connection there. That is a
// bug in the caller (keep the Responder on the loop; send data across threads), so it stops the
// process with a message naming it rather than corrupting memory silently. Connections are made
// on the loop thread, so the comparison costs one load per copy.
namespace {

void abort_on_thread_violation(const char* message) {
  std::fprintf(stderr, "squall: %s\n", message);
  std::abort();
}

std::atomic<ThreadViolationHandler> thread_violation_handler{&abort_on_thread_violation};

}  // namespace

ThreadViolationHandler set_thread_violation_handler(ThreadViolationHandler handler) noexcept {
  return thread_violation_handler.exchange(handler != nullptr ? handler
                                                              : &abort_on_thread_violation);
}

void Connection::check_loop_thread(const char* what) const noexcept {
  if (std::this_thread::get_id() == loop_thread_) return;
  char message[256];
  std::snprintf(message, sizeof message,
                "a Responder of connection %llu was %s off the loop thread; keep Responders on "
                "the loop and pass only data to other threads",
                static_cast<unsigned long long>(id_), what);
  thread_violation_handler.load()(message);
}

void Connection::add_responder(std::uint64_t request_number) noexcept {
  check_loop_thread("copied");
  ++responders_;
  if (request_number == request_number_) ++current_responders_;
}

void Connection::drop_responder(std::uint64_t request_number) noexcept {
  check_loop_thread("destroyed");
  --responders_;
  const bool current = request_number == request_number_;
  if (current) --current_responders_;
  if (closed_) {
    maybe_destroy();
    return;
  }
  if (current && current_responders_ == 0 && response_pending_ && !handler_running_) {
    spdlog::error("connection {}: the Responder for {} {} was dropped without an answer", id_,
                  route_ != nullptr ? route_->method : "",
                  route_ != nullptr ? route_->pattern : "");
    answer_internal_error();
  }
}

Responder::Responder(Connection* connection, std::uint64_t request_number) noexcept
    : connection_(connection), request_number_(request_number) {
  connection_->add_responder(request_number_);
}

Responder::Responder(const Responder& other) noexcept
    : connection_(other.connection_), request_number_(other.request_number_) {
  if (connection_ != nullptr) connection_->add_responder(request_number_);
}

Responder::Responder(Responder&& other) noexcept
    : connection_(other.connection_), request_number_(other.request_number_) {
  other.connection_ = nullptr;
}

Responder& Responder::operator=(Responder other) noexcept {
  std::swap(connection_, other.connection_);
  std::swap(request_number_, other.request_number_);
  return *this;
}

Responder::~Responder() {
  if (connection_ != nullptr) connection_->drop_responder(request_number_);
}

Connection* Responder::live_connection() const noexcept {
  Connection* connection = connection_;
  if (connection == nullptr || connection->closed_ || !connection->response_pending_ ||
      connection->request_number_ != request_number_) {
    return nullptr;
  }
  return connection;
}

bool Responder::connected() const noexcept {
  return live_connection() != nullptr;
}

const Responder& Responder::header(std::string_view name, std::string_view value) const {
  if (!is_header_name(name)) {
    throw std::invalid_argument("response header name \"" + std::string(name) +
                                "\" is not an HTTP token");
  }
  if (!is_header_value(value)) {
    throw std::invalid_argument("response header " + std::string(name) +
                                ": value holds CR, LF or another control character");
  }
  Connection* connection = live_connection();
  if (connection == nullptr) return *this;
  if (connection->response_started_) {
    throw std::logic_error("response header " + std::string(name) +
                           ": the response has already started");
  }
  connection->workspace_->response_headers.append(name).append(": ").append(value).append("\r\n");
  return *this;
}

bool Responder::send(int status, std::string_view content_type, std::string_view body) const {
  Connection* connection = live_connection();
  return connection != nullptr && connection->respond(status, content_type, body);
}

bool Responder::start(int status, std::string_view content_type) const {
  Connection* connection = live_connection();
  return connection != nullptr && connection->start_stream(status, content_type);
}

bool Responder::write(std::string_view chunk) const {
  Connection* connection = live_connection();
  return connection != nullptr && connection->write_stream(chunk);
}

bool Responder::finish() const {
  Connection* connection = live_connection();
  return connection != nullptr && connection->finish_stream();
}

namespace {

std::string describe(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& caught) {
    return caught.what();
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}

}  // namespace

std::size_t Connection::high_water() const noexcept {
  return server_.options_.limits.write_buffer_high_water;
}

// Resumes every drained() waiter and runs the on_drain callback from a later loop turn, never
// from inside a write callback or close_now(), whose callers are in the middle of something.
void Connection::wake_drain_waiters() noexcept {
  if (drain_waiters_.empty() && !on_drain_) return;
  auto waiters = std::move(drain_waiters_);
  drain_waiters_.clear();
  auto callback = std::move(on_drain_);
  on_drain_ = nullptr;
  const std::uint64_t id = id_;
  try {
    server_.loop().call_soon([waiters = std::move(waiters), callback = std::move(callback), id] {
      for (const auto& node : waiters) {
        const std::coroutine_handle<> waiter = std::exchange(node->waiter, nullptr);
        if (waiter) waiter.resume();
      }
      if (!callback) return;
      try {
        callback();
      } catch (const std::exception& error) {
        spdlog::error("connection {}: on_drain callback threw: {}", id, error.what());
      } catch (...) {
        spdlog::error("connection {}: on_drain callback threw a non-standard exception", id);
      }
    });
  } catch (const std::exception& error) {
    // Out of memory: the waiters stay suspended until the task is destroyed.
    spdlog::error("connection {}: cannot schedule the drain wake-up: {}", id_, error.what());
  }
}

bool Responder::writable() const noexcept {
  Connection* connection = live_connection();
  return connection != nullptr && connection->pending_write_bytes_ <= connection->high_water();
}

std::size_t Responder::unsent_bytes() const noexcept {
  return connection_ != nullptr ? connection_->pending_write_bytes_ : 0;
}

void Responder::on_drain(std::function<void()> callback) const {
  Connection* connection = live_connection();
  if (connection == nullptr || connection->pending_write_bytes_ <= connection->high_water()) {
    // Nothing to wait for (or nobody to wait on): run it on the next turn, as a wait would.
    // (A connection cut loose by a destroyed server has no loop to run it on.)
    Loop* loop =
        connection_ != nullptr && !connection_->orphaned_ ? &connection_->server_.loop() : nullptr;
    if (loop != nullptr && callback) loop->call_soon(std::move(callback));
    return;
  }
  connection->on_drain_ = std::move(callback);
}

Drained Responder::drained() const {
  return Drained(*this);
}

bool Drained::await_ready() const noexcept {
  Connection* connection = responder_.live_connection();
  return connection == nullptr || connection->pending_write_bytes_ <= connection->high_water();
}

bool Drained::start(std::coroutine_handle<> waiter, std::stop_token token) {
  if (token.stop_requested()) {
    cancelled_ = true;
    return false;
  }
  Connection* connection = responder_.live_connection();
  if (connection == nullptr) return false;
  node_ = std::make_shared<detail::DrainWaiter>();
  node_->waiter = waiter;
  connection->drain_waiters_.push_back(node_);
  if (token.stop_possible()) on_stop_.emplace(std::move(token), OnStop{this});
  return true;
}

void Drained::OnStop::operator()() const noexcept {
  // Resume from the next loop turn, not from inside request_stop(). The connection's wake-up,
  // if it comes as well, finds the waiter taken.
  self->cancelled_ = true;
  std::shared_ptr<detail::DrainWaiter> node = self->node_;
  if (self->responder_.connection_->orphaned_) return;  // The server and its loop are gone.
  try {
    self->responder_.connection_->server_.loop().call_soon([node] {
      const std::coroutine_handle<> waiter = std::exchange(node->waiter, nullptr);
      if (waiter) waiter.resume();
    });
  } catch (...) {
    // Out of memory: the connection's own wake-up (at close or drain) still resumes it.
  }
}

void Drained::await_resume() {
  on_stop_.reset();
  node_.reset();
  if (cancelled_) throw CancelledError("squall::http::Responder::drained: cancelled");
  if (!responder_.connected()) {
    throw CancelledError("squall::http::Responder::drained: the client went away");
  }
}

Drained::~Drained() {
  on_stop_.reset();
  if (node_ != nullptr) node_->waiter = nullptr;
}

void Connection::handler_failed(std::uint64_t request_number, const std::string& route,
                                std::exception_ptr error) noexcept {
  const bool live = !closed_ && response_pending_ && request_number == request_number_;
  bool cancelled = false;
  try {
    std::rethrow_exception(error);
  } catch (const CancelledError&) {
    cancelled = true;
  } catch (...) {
  }
  if (cancelled && !live) {
    spdlog::debug("connection {}: handler for {} cancelled: the client went away", id_, route);
    return;
  }
  spdlog::error("connection {}: handler for {} threw: {}", id_, route, describe(error));
  if (live) answer_internal_error();
}

void Responder::run_handler(Task<void> task) const {
  Connection* connection = live_connection();
  if (connection == nullptr) return;
  connection->handler_stop_ = std::stop_source();
  // Whether the task ended with an exception before run_handler returned: it is then rethrown
  // to dispatch(), which answers and logs as for a callback.
  struct Start {
    bool returned = false;
    std::exception_ptr early_error;
  };
  auto start = std::make_shared<Start>();
  std::string route = connection->route_ != nullptr
                          ? connection->route_->method + " " + connection->route_->pattern
                          : std::string();
  spawn(connection->server_.loop(), std::move(task), connection->handler_stop_.get_token(),
        [responder = *this, start, route = std::move(route)](std::exception_ptr error) {
          if (!error) return;
          if (!start->returned) {
            start->early_error = error;
            return;
          }
          if (responder.connection_ != nullptr) {
            responder.connection_->handler_failed(responder.request_number_, route, error);
          }
        });
  start->returned = true;
  if (start->early_error) std::rethrow_exception(start->early_error);
}

}  // namespace squall::http
