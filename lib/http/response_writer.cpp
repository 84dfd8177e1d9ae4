// The response on the wire: status line and headers, whole and streamed bodies, the cork that
// gathers a pass's answers into one write, and what follows a write (back-pressure, the write
// timeout, the next request).
#include <charconv>

#include <spdlog/spdlog.h>

#include "core/hot.hpp"
#include "core/monotonic.hpp"
#include "http/connection.hpp"
#include "http/connection_context.hpp"
#include "squall/http/response.hpp"

namespace squall::http {

namespace {

// A queued write that libuv could not finish at once; it owns its bytes until the callback.
struct PendingWrite {
  uv_write_t request;  // request.data -> this.
  std::string bytes;   // The whole buffer, including what was written already.
  std::size_t unsent;  // Bytes handed to uv_write.
};

void append_decimal(std::string& out, std::uint64_t value) {
  char digits[24];
  const auto result = std::to_chars(digits, digits + sizeof digits, value);
  // The (pointer, length) overload: the iterator pair would go through replace().
  out.append(digits, static_cast<std::size_t>(result.ptr - digits));
}

}  // namespace

std::size_t Connection::high_water() const noexcept {
  return context_->options.limits.write_buffer_high_water;
}

SQUALL_HOT std::string& Connection::write_head(int status, std::string_view content_type,
                                               std::size_t content_length, bool chunked) {
  Workspace& workspace = *workspace_;
  if (workspace.body_stream != nullptr) settle_body_before_answer();
  workspace.response_status = status;
  std::string& out = context_->cork_for(this);
  const bool has_length =
      !chunked && !workspace.response_close_delimited && status != 204 && status != 304;
  if (has_length && workspace.response_headers.empty() && workspace.keep_alive &&
      workspace.request.http_minor() != 0) {
    // The commonest head, Content-Length and Keep-Alive included, comes cached: one copy.
    out.append(context_->keep_alive_head(status, content_type, content_length));
    return out;
  }
  // Status line, Server, Date, Content-Type and "Content-Length: " come cached, one copy.
  out.append(context_->head_prefix(status, content_type, has_length));
  if (chunked) {
    out.append("Transfer-Encoding: chunked\r\n");
  } else if (has_length) {
    append_decimal(out, content_length);
    out.append("\r\n");
  }
  out.append(workspace.response_headers);
  const bool http10 = workspace.request.http_minor() == 0;
  if (!workspace.keep_alive) {
    out.append("Connection: close\r\n");
  } else {
    if (http10) out.append("Connection: keep-alive\r\n");
    out.append(context_->keep_alive_header);
  }
  out.append("\r\n");
  return out;
}

void Connection::output(std::string_view bytes) {
  context_->cork_for(this).append(bytes);
}

// answering -> (finished)
SQUALL_HOT bool Connection::respond(int status, std::string_view content_type,
                                    std::string_view body) {
  if (state_ != State::answering) return false;
  const bool has_body = !workspace_->head_request && status != 204 && status != 304;
  std::string& out = write_head(status, content_type, body.size(), false);
  if (has_body) {
    out.append(body);
    workspace_->response_body_bytes = body.size();
  }
  finish_response();
  return true;
}

// answering -> streaming
bool Connection::start_stream(int status, std::string_view content_type) {
  if (state_ != State::answering) return false;
  Workspace& workspace = *workspace_;
  const bool http10 = workspace.request.http_minor() == 0;
  workspace.response_chunked = !http10 && !workspace.head_request;
  workspace.response_close_delimited = http10 && !workspace.head_request;
  if (workspace.response_close_delimited) workspace.keep_alive = false;
  write_head(status, content_type, 0, workspace.response_chunked);
  state_ = State::streaming;
  if (!in_process_) context_->flush_cork();
  return true;
}

bool Connection::write_stream(std::string_view chunk) {
  if (state_ != State::streaming) return false;
  Workspace& workspace = *workspace_;
  if (workspace.head_request || chunk.empty()) return true;
  std::string& out = context_->cork_for(this);
  if (workspace.response_chunked) {
    char size[20];
    const auto result = std::to_chars(size, size + sizeof size, chunk.size(), 16);
    out.append(size, result.ptr).append("\r\n").append(chunk).append("\r\n");
  } else {
    out.append(chunk);
  }
  workspace.response_body_bytes += chunk.size();
  // Inside process() output is corked; a handler streaming from its first slice must still see
  // its bytes counted as unsent (writable()), so a large cork goes out at once.
  if (!in_process_ || out.size() > high_water()) context_->flush_cork();
  return true;
}

// streaming -> (finished)
bool Connection::finish_stream() {
  if (state_ != State::streaming) return false;
  if (workspace_->response_chunked) output("0\r\n\r\n");
  finish_response();
  return true;
}

// answering or streaming -> reading (keep-alive) or closing.
SQUALL_HOT void Connection::finish_response() noexcept {
  Workspace& workspace = *workspace_;
  // The deadline measured belonged to this request; the next one starts its own (a pipelined
  // request parsed in the same pass must not inherit this one's head or body deadline).
  if (timer_phase_ == TimerPhase::head || timer_phase_ == TimerPhase::body) arm(TimerPhase::none);
  ++context_->stats.requests;
  if (context_->request_observer) {
    // Answered inside the handler: dispatch() reports the request when the handler returns,
    // with the clock it reads then anyway (one clock read per request fewer).
    if (handler_running_) {
      observe_pending_ = true;
    } else {
      observe_request(squall::detail::monotonic_ns());
    }
  }
  const bool more_input = workspace.begin < workspace.end;
  if (workspace.routes_in_use != nullptr) workspace.routes_in_use.reset();
  // A streamed body the handler did not read whole is dropped before the next request.
  const bool body_left = workspace.body_stream != nullptr && keep_discarding_body();
  if (!workspace.keep_alive || (peer_eof_ && !more_input)) {
    state_ = State::closing;
  } else {
    state_ = State::reading;
    if (!body_left) workspace.parser.next_message();
  }
  // A late answer (outside process()) resumes reading any pipelined requests and flushes.
  if (!in_process_) process();
}

SQUALL_HOT void Connection::observe_request(std::uint64_t now_ns) noexcept {
  observe_pending_ = false;
  const Workspace& workspace = *workspace_;
  const RequestRecord record{
      &workspace.request,
      workspace.route != nullptr ? std::string_view(workspace.route->pattern) : "",
      workspace.response_status,
      workspace.response_body_bytes,
      std::chrono::nanoseconds(now_ns - workspace.request_start_ns),
      id_};
  try {
    context_->request_observer(record);
  } catch (const std::exception& error) {
    spdlog::error("connection {}: request observer threw: {}", id_, error.what());
  }
}

// ---- Writing ---------------------------------------------------------------------------------

SQUALL_HOT void Connection::write_out(std::string& bytes) noexcept {
  if (closed() || bytes.empty()) {
    bytes.clear();
    return;
  }
  const std::size_t size = bytes.size();
  context_->stats.bytes_sent += size;
  uv_stream_t* stream = this->stream();
  uv_buf_t buf;
  buf.base = bytes.data();
  buf.len = size;
  // Most responses fit the socket buffer: write now, without a request or a copy. (Behind
  // earlier unsent bytes uv_try_write takes nothing and the bytes queue in order.)
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
  auto* pending = new (std::nothrow) PendingWrite{};
  if (pending == nullptr) {
    bytes.clear();
    close_now();
    return;
  }
  pending->bytes = std::move(bytes);
  bytes.clear();
  pending->unsent = size - static_cast<std::size_t>(written);
  pending->request.data = pending;
  uv_buf_t rest =
      uv_buf_init(pending->bytes.data() + written, static_cast<unsigned>(pending->unsent));
  const int status = uv_write(&pending->request, stream, &rest, 1, [](uv_write_t* request, int s) {
    auto* done = static_cast<PendingWrite*>(request->data);
    // libuv runs write callbacks before the close callback: the connection is still there.
    Connection* connection = from(reinterpret_cast<uv_handle_t*>(request->handle));
    const std::size_t unsent = done->unsent;
    delete done;
    connection->on_write_done(unsent, s);
  });
  if (status < 0) {
    delete pending;
    close_now();
    return;
  }
  context_->unsent_budget.take(pending->unsent);
  arm(TimerPhase::write);
  if (unsent() > high_water()) {
    // The client reads slower than it asks: stop taking requests until it catches up.
    output_blocked_ = true;
    update_reading();
  }
}

void Connection::on_write_done(std::size_t bytes, int status) noexcept {
  if (orphaned_) return;
  context_->unsent_budget.give_back(bytes);
  settle_after_write(status);
  // A streaming writer waiting for the client resumes at the low-water mark (close_now woke it
  // already if the connection closed above).
  if (!closed() && workspace_ != nullptr && unsent() <= high_water() / 2) wake_drain_waiters();
  // Last: other connections may run here, and this one may have been closed above.
  context_->resume_output_waiters();
}

void Connection::settle_after_write(int status) noexcept {
  if (closed()) return;
  if (status < 0) {
    close_now();
    return;
  }
  const std::size_t left = unsent();
  if (left > 0) {
    // Progress: the write timeout measures stalls, not the length of a transfer.
    arm(TimerPhase::write);
  }
  if (output_blocked_ && left <= high_water() / 2) {
    output_blocked_ = false;
    if (left == 0) waiting_for_output_budget_ = false;
    process();
  } else if (waiting_for_output_budget_ && left == 0) {
    waiting_for_output_budget_ = false;
    process();
  } else if (left == 0 && !closing()) {
    update_timer();
  } else if (left == 0 && state_ == State::lingering) {
    arm(TimerPhase::lingering);
  }
}

}  // namespace squall::http
