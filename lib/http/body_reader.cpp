// Streamed request bodies: the state one request's body shares between its connection and the
// handler's BodyReader, the reader's two forms (read_some, callbacks), and the connection's side
// (dispatch at the head, feeding the body through the parser, back-pressure, early answers).
//
// The bytes: the connection reads into its workspace buffer as for any request; the head stays at
// the buffer's front (the Request's views point there) and the body streams through the space
// after it. The parser appends body bytes to the stream's queue, charged to the server's body
// budget; the connection feeds the parser only while the queue holds less than kHighWater, and
// stops reading the socket while it holds more, so a body costs at most kHighWater plus one read
// buffer whatever its size. The handler takes the whole queue at each read, which gives the
// budget back and lets the connection read on.
//
// Wake-ups (a chunk, the end, an error, the client leaving) are posted with call_soon and run on
// a later loop turn, never inside the connection's own processing.
#include <cstring>
#include <utility>

#include <spdlog/spdlog.h>

#include "http/connection.hpp"
#include "http/connection_context.hpp"
#include "squall/core/task.hpp"
#include "squall/http/body_reader.hpp"

namespace squall::http {

namespace {

constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";

}  // namespace

namespace detail {

// One suspended read_some(): shared by the awaitable and the loop callbacks that resume it, so
// either may go first.
struct BodyWait {
  std::coroutine_handle<> waiter;  // Null once resumed or abandoned.
  bool cancelled = false;          // The stop token fired.
};

struct BodyStream {
  Connection* connection = nullptr;  // Feeding this body; null once detached.
  // The server's body budget, charged for `queue`; kept alive here, as the server may go first.
  std::shared_ptr<MemoryBudget> budget;
  Loop* loop = nullptr;               // Where wake-ups run; null once the server is gone.
  std::uint64_t connection_id = 0;    // For log lines.
  std::string queue;                  // Received, not yet handed to the handler.
  std::size_t charged = 0;            // Bytes of `queue` charged to `budget`.
  std::uint64_t received = 0;         // Body bytes received in all.
  std::int64_t content_length = -1;   // Declared, or -1 (chunked).
  std::size_t body_area = 0;          // Where body bytes start in the read buffer.
  std::uint64_t discard_from = 0;     // `received` when the answer went out unread.
  bool complete = false;              // The whole body arrived.
  bool client_gone = false;           // The connection closed before the body ended.
  bool discarding = false;            // Answered first: the rest is read and dropped.
  bool continue_pending = false;      // "Expect: 100-continue" not answered yet.
  bool wake_scheduled = false;        // A delivery is queued on the loop.
  std::optional<BodyError> error;     // Why the body cannot be received.
  std::shared_ptr<BodyWait> waiting;  // The suspended read_some, if any.
  // The callback form; cleared once the end or an error is reported (they may hold the reader).
  std::function<void(std::string_view)> on_data;
  std::function<void()> on_end;
  std::function<void(const BodyError&)> on_error;
  bool callbacks = false;     // on_data was set: deliveries go to the callbacks.
  bool paused = false;        // pause(): no deliveries until resume().
  bool end_reported = false;  // on_end or on_error ran.

  BodyStream() = default;
  BodyStream(const BodyStream&) = delete;
  BodyStream& operator=(const BodyStream&) = delete;
  ~BodyStream() { give_back_budget(); }

  // A reader over a body that was buffered whole (or is empty): one chunk, then the end.
  static std::shared_ptr<BodyStream> make_buffered(const Request& request) {
    auto stream = std::make_shared<BodyStream>();
    stream->queue = request.body_;
    stream->received = request.body_.size();
    stream->complete = true;
    Connection* connection = request.connection_;
    if (connection != nullptr && !connection->orphaned_) {
      stream->loop = &connection->context_->loop;
      stream->connection_id = connection->id();
    }
    return stream;
  }

  // Whether a read can finish now: bytes, or the end, or a reason to throw.
  bool ready() const noexcept {
    return !queue.empty() || complete || client_gone || error.has_value() || discarding;
  }

  void give_back_budget() noexcept {
    if (budget != nullptr) budget->give_back(charged);
    charged = 0;
  }

  // Hands the queued bytes to the handler (or throws why there are none to come).
  std::string take() {
    if (client_gone) {
      throw CancelledError("squall::http::BodyReader::read_some: the client went away");
    }
    if (error) throw *error;
    std::string chunk = std::move(queue);
    queue = std::string();
    give_back_budget();
    if (!chunk.empty() && connection != nullptr) connection->body_consumed();
    if (chunk.empty() && !complete) {
      throw BodyError(0,
                      "squall::http::BodyReader: the answer was sent before the request "
                      "body was read; its rest is dropped");
    }
    return chunk;
  }

  // The expectation is met when the handler first asks for bytes, not before: a handler that
  // answers without reading spares its client the upload.
  void send_continue_if_pending() noexcept {
    if (!continue_pending) return;
    continue_pending = false;
    if (connection != nullptr) connection->send_continue_for_body();
  }

  static void schedule(const std::shared_ptr<BodyStream>& self) noexcept {
    if (self->wake_scheduled || self->loop == nullptr) return;
    if (self->waiting == nullptr && !self->callbacks) return;
    self->wake_scheduled = true;
    try {
      self->loop->call_soon([self] {
        self->wake_scheduled = false;
        deliver(self);
      });
    } catch (const std::exception& error) {
      self->wake_scheduled = false;
      spdlog::error("connection {}: cannot schedule a request body delivery: {}",
                    self->connection_id, error.what());
    }
  }

  static void deliver(const std::shared_ptr<BodyStream>& self) noexcept {
    if (self->waiting != nullptr) {
      if (!self->ready()) return;
      const std::shared_ptr<BodyWait> wait = std::move(self->waiting);
      self->waiting = nullptr;
      const std::coroutine_handle<> waiter = std::exchange(wait->waiter, nullptr);
      if (waiter) squall::detail::resume(waiter);
      return;
    }
    if (!self->callbacks || self->end_reported) return;
    try {
      while (!self->paused && !self->queue.empty() && !self->client_gone && !self->error) {
        const std::string chunk = self->take();
        if (self->on_data) self->on_data(chunk);
      }
      if (self->paused || !self->queue.empty()) return;
      if (self->client_gone) {
        report_error(self, BodyError(499, "squall::http::BodyReader: the client went away"));
      } else if (self->error) {
        report_error(self, *self->error);
      } else if (self->complete) {
        self->end_reported = true;
        auto on_end = std::move(self->on_end);
        self->clear_callbacks();
        if (on_end) on_end();
      } else if (self->discarding) {
        report_error(self, BodyError(0,
                                     "squall::http::BodyReader: the answer was sent before "
                                     "the request body was read; its rest is dropped"));
      }
    } catch (const std::exception& error) {
      callback_failed(self, error.what());
    } catch (...) {
      callback_failed(self, "an exception that is not a std::exception");
    }
  }

  static void report_error(const std::shared_ptr<BodyStream>& self, const BodyError& error) {
    self->end_reported = true;
    auto on_error = std::move(self->on_error);
    self->clear_callbacks();
    if (on_error) on_error(error);
  }

  // A body callback threw: as for a handler, a 500 if the answer has not started, and a log line.
  static void callback_failed(const std::shared_ptr<BodyStream>& self, const char* what) noexcept {
    spdlog::error("connection {}: request body callback threw: {}", self->connection_id, what);
    self->end_reported = true;
    self->clear_callbacks();
    Connection* connection = self->connection;
    if (connection != nullptr && connection->answer_pending()) connection->answer_internal_error();
  }

  void clear_callbacks() noexcept {
    on_data = nullptr;
    on_end = nullptr;
    on_error = nullptr;
  }

  // The connection lets go of this body: what the reader learns comes from the flags set first.
  static void detach(const std::shared_ptr<BodyStream>& self, bool server_gone) noexcept {
    self->connection = nullptr;
    if (server_gone) {
      // Its loop is closing: nothing runs there any more, so the callbacks (which may hold
      // the reader) are dropped now.
      self->loop = nullptr;
      self->clear_callbacks();
    }
    schedule(self);
  }
};

}  // namespace detail

using detail::BodyStream;

// ---- The reader ------------------------------------------------------------------------------

BodyReader Request::body_reader() const {
  if (body_stream_ == nullptr) body_stream_ = BodyStream::make_buffered(*this);
  return BodyReader(body_stream_);
}

ReadSome BodyReader::read_some() const {
  return ReadSome(stream_);
}

const BodyReader& BodyReader::on_data(std::function<void(std::string_view)> callback) const {
  if (stream_ == nullptr) return *this;
  if (stream_->waiting != nullptr) {
    throw std::logic_error("squall::http::BodyReader::on_data: a read_some is pending");
  }
  stream_->on_data = std::move(callback);
  stream_->callbacks = true;
  stream_->send_continue_if_pending();
  BodyStream::schedule(stream_);
  return *this;
}

const BodyReader& BodyReader::on_end(std::function<void()> callback) const {
  if (stream_ != nullptr) stream_->on_end = std::move(callback);
  return *this;
}

const BodyReader& BodyReader::on_error(std::function<void(const BodyError&)> callback) const {
  if (stream_ != nullptr) stream_->on_error = std::move(callback);
  return *this;
}

void BodyReader::pause() const noexcept {
  if (stream_ != nullptr) stream_->paused = true;
}

void BodyReader::resume() const {
  if (stream_ == nullptr || !stream_->paused) return;
  stream_->paused = false;
  BodyStream::schedule(stream_);
}

bool BodyReader::complete() const noexcept {
  return stream_ != nullptr && stream_->complete;
}

std::uint64_t BodyReader::bytes_received() const noexcept {
  return stream_ != nullptr ? stream_->received : 0;
}

std::size_t BodyReader::buffered_bytes() const noexcept {
  return stream_ != nullptr ? stream_->queue.size() : 0;
}

std::optional<std::uint64_t> BodyReader::content_length() const noexcept {
  if (stream_ == nullptr || stream_->content_length < 0) return std::nullopt;
  return static_cast<std::uint64_t>(stream_->content_length);
}

bool ReadSome::await_ready() const noexcept {
  return stream_ == nullptr || (!stream_->callbacks && stream_->ready());
}

bool ReadSome::start(std::coroutine_handle<> waiter, std::stop_token token) {
  if (stream_->callbacks) {
    throw std::logic_error("squall::http::BodyReader::read_some: the body goes to on_data");
  }
  if (stream_->waiting != nullptr) {
    throw std::logic_error("squall::http::BodyReader::read_some: another read is pending");
  }
  if (token.stop_requested()) {
    cancelled_ = true;
    return false;
  }
  node_ = std::make_shared<detail::BodyWait>();
  node_->waiter = waiter;
  stream_->waiting = node_;
  stream_->send_continue_if_pending();
  if (token.stop_possible()) on_stop_.emplace(std::move(token), OnStop{this});
  return true;
}

void ReadSome::OnStop::operator()() const noexcept {
  // Resume from the next loop turn, not from inside request_stop(). A delivery, if one comes
  // as well, finds the waiter taken.
  const std::shared_ptr<detail::BodyWait> node = self->node_;
  const std::shared_ptr<BodyStream> stream = self->stream_;
  node->cancelled = true;
  if (stream->loop == nullptr) return;  // The server and its loop are gone.
  try {
    stream->loop->call_soon([node, stream] {
      if (stream->waiting == node) stream->waiting = nullptr;
      const std::coroutine_handle<> waiter = std::exchange(node->waiter, nullptr);
      if (waiter) squall::detail::resume(waiter);
    });
  } catch (...) {
    // Out of memory: the connection's own wake-up (at close) still resumes it.
  }
}

std::string ReadSome::await_resume() {
  on_stop_.reset();
  const bool cancelled = cancelled_ || (node_ != nullptr && node_->cancelled);
  if (node_ != nullptr) {
    if (stream_->waiting == node_) stream_->waiting = nullptr;
    node_.reset();
  }
  if (stream_ == nullptr) return {};
  if (cancelled) throw CancelledError("squall::http::BodyReader::read_some: cancelled");
  return stream_->take();
}

ReadSome::~ReadSome() {
  on_stop_.reset();
  if (node_ != nullptr) {
    node_->waiter = nullptr;
    if (stream_->waiting == node_) stream_->waiting = nullptr;
  }
}

// ---- The connection's side -------------------------------------------------------------------

bool Connection::start_streamed_body() noexcept {
  Workspace& workspace = *workspace_;
  Request& request = workspace.request;
  RequestParser& parser = workspace.parser;
  bool streams = false;
  try {
    const RouteMatch match =
        context_->router->find(request.method(), request.path(), request.params_);
    streams = match.route != nullptr && match.route->body_mode == BodyMode::stream;
  } catch (const std::exception&) {
    // Out of memory while routing: the body is buffered and dispatch() routes again.
  }
  request.params_.clear();  // dispatch() fills them.
  if (!streams) return false;
  std::shared_ptr<BodyStream> stream;
  try {
    stream = std::make_shared<BodyStream>();
  } catch (const std::bad_alloc&) {
    send_error(503, "out of memory for a streamed request body");
    return true;
  }
  // The head moves to the buffer's front once, before the handler sees the Request's views, so
  // they stay put while the body streams through all the space after it.
  char* head = const_cast<char*>(parser.message_start());
  if (head != nullptr && head != workspace.buffer) {
    const std::ptrdiff_t delta = workspace.buffer - head;
    const auto length = static_cast<std::size_t>(workspace.buffer + workspace.end - head);
    parser.relocate(head, workspace.buffer + workspace.end, delta);
    std::memmove(workspace.buffer, head, length);
    workspace.begin =
        static_cast<std::size_t>(static_cast<std::ptrdiff_t>(workspace.begin) + delta);
    workspace.end = length;
  }
  stream->connection = this;
  stream->loop = &context_->loop;
  stream->budget = std::shared_ptr<MemoryBudget>(context_->shared, &context_->shared->bodies);
  stream->connection_id = id_;
  stream->content_length = parser.declared_content_length();
  stream->body_area = workspace.begin;
  stream->continue_pending = parser.expect_continue();
  workspace.body_stream = stream;
  request.body_stream_ = stream;
  parser.stream_body_into(&stream->queue);
  parser.continue_after_expect();
  dispatch();
  if (!closed() && workspace_ != nullptr && workspace_->body_stream != nullptr) {
    pump_streamed_body();
  }
  return true;
}

void Connection::pump_streamed_body() noexcept {
  Workspace& workspace = *workspace_;
  const std::shared_ptr<BodyStream> stream = workspace.body_stream;
  RequestParser& parser = workspace.parser;
  const std::size_t queued_before = stream->queue.size();
  bool fed = false;
  while (workspace.begin < workspace.end && parser.phase() == ParsePhase::body &&
         (stream->discarding || stream->queue.size() < BodyReader::kHighWater)) {
    const std::size_t before = stream->queue.size();
    const FeedResult result =
        parser.feed(workspace.buffer + workspace.begin, workspace.end - workspace.begin);
    workspace.begin += result.consumed;
    fed = fed || result.consumed > 0;
    if (!stream->discarding) {
      const std::size_t added = stream->queue.size() - before;
      if (stream->budget != nullptr && !stream->budget->try_take(added)) {
        fail_streamed_body(503,
                           "request bodies being received exceed limits.max_buffered_body_bytes");
        return;
      }
      stream->charged += added;
      stream->received = parser.body_bytes_received();
    }
    if (result.event == ParseEvent::error) {
      fail_streamed_body(parser.error_status(), parser.error_reason());
      return;
    }
    if (stream->discarding &&
        parser.body_bytes_received() - stream->discard_from > BodyReader::kMaxDiscardedBytes) {
      // More than is worth reading for nothing: close (after a bounded lingering read).
      spdlog::debug("connection {}: closing: more than {} unread request body bytes", id_,
                    BodyReader::kMaxDiscardedBytes);
      workspace.body_stream.reset();
      linger_after_answer_ = true;
      state_ = State::closing;
      return;
    }
  }
  if (parser.phase() == ParsePhase::complete) {
    if (stream->discarding) {
      // The dropped rest has ended: the next request may follow on this connection.
      workspace.body_stream.reset();
      parser.next_message();
      return;
    }
    stream->complete = true;
    workspace.body_stream.reset();
    stream->connection = nullptr;
    // The body has ended; the request stays in the buffer until its answer is finished.
    BodyStream::schedule(stream);
    return;
  }
  if (stream->discarding) return;
  if (workspace.begin == workspace.end) {
    // Every body byte was handed on: the space after the head is free again.
    workspace.begin = workspace.end = stream->body_area;
  }
  if (fed) arm(TimerPhase::body);  // Progress: the body deadline measures the next wait.
  if (stream->queue.size() > queued_before) BodyStream::schedule(stream);
}

bool Connection::stream_held_back() const noexcept {
  const BodyStream& stream = *workspace_->body_stream;
  return !stream.discarding && stream.queue.size() >= BodyReader::kHighWater;
}

Connection::TimerPhase Connection::streamed_body_timer_phase() const noexcept {
  if (workspace_ == nullptr || workspace_->body_stream == nullptr) return TimerPhase::none;
  // The client waits for the handler: not its fault, but a handler that never reads must not
  // hold the connection (and kHighWater of the body budget) forever. Each read starts it anew.
  if (body_held_back()) return TimerPhase::body_held;
  return workspace_->parser.phase() == ParsePhase::body ? TimerPhase::body : TimerPhase::none;
}

void Connection::settle_body_before_answer() noexcept {
  Workspace& workspace = *workspace_;
  const BodyStream& stream = *workspace.body_stream;
  if (stream.discarding || workspace.parser.phase() != ParsePhase::body) return;
  // The answer goes out before the body has ended. Its rest is read and dropped only when it is
  // small; a client still waiting for "100 Continue" will not send it at all.
  const std::int64_t left = workspace.parser.body_bytes_left();
  if (stream.continue_pending ||
      (left >= 0 && static_cast<std::uint64_t>(left) > BodyReader::kMaxDiscardedBytes)) {
    workspace.keep_alive = false;
  }
}

bool Connection::keep_discarding_body() noexcept {
  Workspace& workspace = *workspace_;
  const std::shared_ptr<BodyStream> stream = workspace.body_stream;
  if (stream->discarding) return true;
  stream->give_back_budget();
  stream->queue.clear();
  stream->discarding = true;
  BodyStream::detach(stream, orphaned_);
  if (!workspace.keep_alive) {
    // Closing: the client may still be sending; read and drop it for a while so it sees the
    // answer instead of a reset.
    workspace.body_stream.reset();
    workspace.parser.discard_body();
    linger_after_answer_ = true;
    return true;
  }
  stream->discard_from = workspace.parser.body_bytes_received();
  workspace.parser.discard_body();
  return true;
}

bool Connection::fail_streamed_body(int status, std::string_view reason) noexcept {
  if (workspace_ == nullptr || workspace_->body_stream == nullptr) return false;
  const std::shared_ptr<BodyStream> stream = std::move(workspace_->body_stream);
  workspace_->body_stream = nullptr;
  workspace_->parser.discard_body();  // Nothing reaches the queue any more.
  const bool answered = stream->discarding;
  if (!answered) {
    stream->give_back_budget();
    stream->queue.clear();
    try {
      stream->error.emplace(status, std::string(reason));
    } catch (const std::bad_alloc&) {
      stream->client_gone = true;
    }
    BodyStream::detach(stream, orphaned_);
  }
  if (state_ == State::answering) {
    send_error(status, reason);
  } else {
    // Half an answer is out (or all of it): the only honest end is to close.
    spdlog::debug("connection {}: closing: request body failed after the answer began: {}", id_,
                  reason);
    close_now();
  }
  return true;
}

void Connection::abandon_streamed_body() noexcept {
  const std::shared_ptr<BodyStream> stream = std::move(workspace_->body_stream);
  workspace_->body_stream = nullptr;
  workspace_->parser.discard_body();
  if (stream->discarding) return;
  stream->give_back_budget();
  stream->queue.clear();
  stream->client_gone = true;
  BodyStream::detach(stream, orphaned_);
}

void Connection::body_consumed() noexcept {
  // Inside process() the loop feeds on by itself; outside, this is where reading resumes.
  if (closed() || in_process_) return;
  process();
}

void Connection::send_continue_for_body() noexcept {
  if (closed() || state_ != State::answering) return;
  output(kContinue);
  if (!in_process_) context_->flush_cork();
}

}  // namespace squall::http
