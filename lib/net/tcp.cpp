#include "squall/net/tcp.hpp"

#include <arpa/inet.h>
#include <netdb.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <memory>
#include <system_error>

#include <spdlog/spdlog.h>

#include "squall/core/awaitables.hpp"
#include "squall/core/uv_handle.hpp"
#include "squall/net/listener.hpp"

namespace squall::net {

namespace {

std::string host_port(const std::string& host, std::uint16_t port) {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

// A delimiter as it reads in an error message: "\r\n" rather than raw control bytes.
std::string printable(std::string_view bytes) {
  std::string out = "\"";
  for (const char c : bytes) {
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) {
      static const char* const digits = "0123456789abcdef";
      out += "\\x";
      out += digits[static_cast<unsigned char>(c) >> 4];
      out += digits[static_cast<unsigned char>(c) & 0xf];
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string address_of(const uv_tcp_t* tcp, bool peer) {
  sockaddr_storage address{};
  int length = sizeof address;
  const int status = peer ? uv_tcp_getpeername(tcp, reinterpret_cast<sockaddr*>(&address), &length)
                          : uv_tcp_getsockname(tcp, reinterpret_cast<sockaddr*>(&address), &length);
  if (status < 0) return "?";
  return format_address(address, true);
}

}  // namespace

void StreamOptions::validate() const {
  if (write_low_water > write_high_water) {
    throw std::invalid_argument(
        "StreamOptions: write_low_water (" + std::to_string(write_low_water) +
        ") must not exceed write_high_water (" + std::to_string(write_high_water) + ")");
  }
  if (read_chunk == 0) throw std::invalid_argument("StreamOptions: read_chunk must be at least 1");
}

namespace detail {

// ---- OpTimer ----------------------------------------------------------------------------------

struct OpTimer::Node {
  UvHandle<uv_timer_t> timer;  // timer.data -> this.
  Fire fire;                   // What to run.
  void* owner;                 // Its argument.
};

void OpTimer::arm(Loop& loop, std::uint64_t delay_ms, Fire fire, void* owner) {
  if (node_ == nullptr) {
    auto node = std::make_unique<Node>();
    node->timer = UvHandle<uv_timer_t>(loop, node.get(), uv_timer_init, "operation timer");
    node_ = node.release();
  }
  node_->fire = fire;
  node_->owner = owner;
  uv_timer_start(
      node_->timer.get(),
      [](uv_timer_t* timer) {
        // fire() may disarm (destroy) this timer: nothing of the node is used afterwards.
        const auto* node = static_cast<Node*>(timer->data);
        node->fire(node->owner);
      },
      delay_ms, 0);
}

void OpTimer::disarm() noexcept {
  // The timer closes (or, after Loop::close(), is freed) with the node.
  delete std::exchange(node_, nullptr);
}

// ---- Operation --------------------------------------------------------------------------------

Operation::~Operation() {
  on_stop_.reset();
  timer_.disarm();
}

void Operation::wait(Loop& loop, std::coroutine_handle<> waiter, std::stop_token token) {
  loop_ = &loop;
  waiter_ = waiter;
  suspended_ = true;
  if (timeout_.count() > 0) {
    timer_.arm(*loop_, static_cast<std::uint64_t>(timeout_.count()), &Operation::on_timer, this);
  }
  if (token.stop_possible()) on_stop_.emplace(std::move(token), OnStop{this});
}

void Operation::OnStop::operator()() const noexcept {
  // Stop waiting at once; resume from a timer on the next iteration, never from inside
  // request_stop().
  self->stopping_ = true;
  self->detach();
  self->timer_.arm(*self->loop_, 0, &Operation::on_timer, self);
}

void Operation::on_timer(void* owner) {
  auto* self = static_cast<Operation*>(owner);
  if (self->ready_) {
    self->finish(self->error_);
  } else if (self->stopping_) {
    self->finish(std::make_exception_ptr(CancelledError(self->describe() + ": cancelled")));
  } else {
    self->finish(std::make_exception_ptr(TimeoutError(
        self->describe() + ": timed out after " + std::to_string(self->timeout_.count()) + " ms")));
  }
}

void Operation::finish(std::exception_ptr error) noexcept {
  error_ = std::move(error);
  detach();
  timer_.disarm();
  on_stop_.reset();
  ready_ = false;
  const std::coroutine_handle<> waiter = std::exchange(waiter_, {});
  if (waiter) waiter.resume();
}

void Operation::finish_soon(std::exception_ptr error) noexcept {
  error_ = std::move(error);
  ready_ = true;
  detach();
  on_stop_.reset();
  timer_.arm(*loop_, 0, &Operation::on_timer, this);
}

void Operation::rethrow() const {
  if (error_) std::rethrow_exception(error_);
}

bool Operation::stopped_before_start(const std::stop_token& token) {
  if (!token.stop_requested()) return false;
  error_ = std::make_exception_ptr(CancelledError(describe() + ": cancelled"));
  return true;
}

// ---- the stream's state -----------------------------------------------------------------------

// Bytes read and not yet consumed: [begin, end) of one heap block, given back when empty so an
// idle stream holds no buffer.
class ReadBuffer {
 public:
  std::size_t size() const noexcept { return end_ - begin_; }
  std::string_view view() const noexcept { return {data_.get() + begin_, size()}; }
  // Free space of at least `chunk` bytes after the data.
  uv_buf_t prepare(std::size_t chunk) {
    if (capacity_ - end_ < chunk) {
      const std::size_t used = size();
      if (begin_ > 0 && capacity_ - used >= chunk) {
        std::memmove(data_.get(), data_.get() + begin_, used);
      } else {
        const std::size_t capacity = std::max(capacity_ * 2, used + chunk);
        auto grown = std::make_unique_for_overwrite<char[]>(capacity);
        if (used > 0) std::memcpy(grown.get(), data_.get() + begin_, used);
        data_ = std::move(grown);
        capacity_ = capacity;
      }
      begin_ = 0;
      end_ = used;
    }
    return uv_buf_init(data_.get() + end_, static_cast<unsigned int>(capacity_ - end_));
  }
  void commit(std::size_t count) noexcept { end_ += count; }
  std::string take(std::size_t count) {
    std::string out(data_.get() + begin_, count);
    begin_ += count;
    release_if_empty();
    return out;
  }
  void release_if_empty() noexcept {
    if (begin_ != end_) return;
    data_.reset();
    capacity_ = begin_ = end_ = 0;
  }

 private:
  std::unique_ptr<char[]> data_;  // The block.
  std::size_t capacity_ = 0;      // Its size.
  std::size_t begin_ = 0;         // First unconsumed byte.
  std::size_t end_ = 0;           // One past the last byte read.
};

struct WriteRequest {
  uv_write_t request;  // request.data -> this.
  std::string bytes;   // What the socket did not take at once; owned until the callback.
  StreamState* state;  // Whose queue.
};

struct ShutdownRequest {
  uv_shutdown_t request;  // request.data -> this.
  StreamState* state;     // Whose write side.
};

struct StreamState {
  StreamState(Loop& loop, const StreamOptions& options)
      : tcp(loop, this, uv_tcp_init, "TCP stream"), loop(&loop), options(options) {
    tcp.on_closed(&StreamState::on_closed);
  }

  UvHandle<uv_tcp_t> tcp;    // The socket; tcp.data -> this.
  Loop* loop;                // Whose thread.
  StreamOptions options;     // Marks and sizes.
  std::size_t refs = 0;      // StreamRefs: the TcpStream and pending operations.
  bool closing = false;      // close() began.
  bool tcp_closed = false;   // The socket's close callback ran (after close() or Loop::close()).
  bool owner_gone = false;   // The TcpStream was destroyed: pending callbacks are dropped.
  bool read_wanted = false;  // Connected: read ahead from now on.
  bool reading = false;      // uv_read_start is in effect.
  bool eof = false;          // The peer's end of stream arrived.
  bool shut_down = false;    // shutdown() began: no more writes.
  int read_error = 0;        // A failed read (UV_ECONNRESET...).
  int write_error = 0;       // A failed write (UV_EPIPE...).
  ReadBuffer buffer;         // Read ahead of the reader.
  std::size_t scanned = 0;   // read_until: buffered bytes known to hold no delimiter start.
  ReadOperation* read = nullptr;           // The pending read.
  WriteOperation* writers_head = nullptr;  // Writers waiting for the drain, oldest first.
  WriteOperation* writers_tail = nullptr;
  ShutdownOperation* shutdown_wait = nullptr;  // The pending shutdown.
  std::string peer;                            // "1.2.3.4:80"
  std::string local;                           // The same for this side.

  uv_stream_t* stream() noexcept { return tcp.stream(); }
  // Closed, by close() or by Loop::close().
  bool unusable() noexcept { return closing || tcp_closed || !tcp.is_open(); }

  // Once connected: note the addresses and start reading ahead.
  void opened() {
    peer = address_of(tcp.get(), true);
    local = address_of(tcp.get(), false);
    read_wanted = true;
    update_reading();
  }

  void close() noexcept {
    if (closing) return;
    closing = true;
    reading = false;
    // Closing already means Loop::close() closed it: on_closed runs (or ran) all the same.
    tcp.close();
  }

  void release() noexcept {
    if (--refs != 0) return;
    if (tcp_closed) {
      delete this;
    } else if (!closing) {
      close();
    }
    // Otherwise on_closed frees it.
  }

  static void on_closed(uv_tcp_t* handle) {
    auto* self = static_cast<StreamState*>(handle->data);
    self->tcp_closed = true;
    // During Loop::close() no task is resumed (suspended ones were destroyed already).
    if (!self->loop->closed()) {
      StreamRef keep(self);
      self->fail_all(0, "the stream is closed");
    } else if (self->refs == 0) {
      delete self;
    }
  }

  StreamClosedError closed_error(const std::string& what, int status, const char* reason) {
    return StreamClosedError(what + ": " + reason, status);
  }

  // Resumes every pending operation with StreamClosedError.
  void fail_all(int status, const char* reason);

  // ---- reading ----

  void update_reading() {
    if (closing || tcp_closed || eof || read_error != 0) return;
    const bool want = read_wanted && (read != nullptr || buffer.size() < options.read_buffer_limit);
    if (want && !reading) {
      const int status = uv_read_start(stream(), &StreamState::on_alloc, &StreamState::on_read);
      if (status < 0) {
        read_error = status;
      } else {
        reading = true;
      }
    } else if (!want && reading) {
      uv_read_stop(stream());
      reading = false;
    }
  }

  static void on_alloc(uv_handle_t* handle, std::size_t, uv_buf_t* buf) {
    auto* self = static_cast<StreamState*>(handle->data);
    *buf = self->buffer.prepare(self->options.read_chunk);
  }

  static void on_read(uv_stream_t* stream, ssize_t nread, const uv_buf_t*) {
    auto* self = static_cast<StreamState*>(stream->data);
    if (nread > 0) {
      self->buffer.commit(static_cast<std::size_t>(nread));
    } else if (nread == 0) {
      self->buffer.release_if_empty();
      return;
    } else if (nread == UV_EOF) {
      self->eof = true;  // libuv stopped reading.
      self->reading = false;
      self->buffer.release_if_empty();
    } else {
      self->read_error = static_cast<int>(nread);
      uv_read_stop(stream);
      self->reading = false;
      self->buffer.release_if_empty();
    }
    StreamRef keep(self);
    if (self->read != nullptr && self->fill(*self->read)) {
      ReadOperation* done = self->read;
      done->finish(done->error_);
    }
    self->update_reading();
  }

  // Completes `op` from the buffer (result_ or error_) if it can; false if it must wait.
  bool fill(ReadOperation& op) {
    const std::size_t size = buffer.size();
    switch (op.kind_) {
      case ReadOperation::Kind::some:
        if (size > 0) {
          op.result_ = buffer.take(std::min(op.count_, size));
          scanned = 0;
          return true;
        }
        break;
      case ReadOperation::Kind::exactly:
        if (size >= op.count_) {
          op.result_ = buffer.take(op.count_);
          scanned = 0;
          return true;
        }
        break;
      case ReadOperation::Kind::until: {
        const std::string_view data = buffer.view();
        const std::string_view delimiter = op.delimiter_;
        const std::size_t from = std::min(scanned, size);
        const std::size_t found = data.find(delimiter, from);
        if (found != std::string_view::npos) {
          const std::size_t end = found + delimiter.size();
          if (end <= op.count_) {
            op.result_ = buffer.take(end);
            scanned = 0;
            return true;
          }
        } else if (size >= delimiter.size()) {
          scanned = size - delimiter.size() + 1;
        }
        if ((found != std::string_view::npos) || size >= op.count_) {
          op.error_ = std::make_exception_ptr(ReadLimitError(
              op.describe() + ": no " + printable(delimiter) + " within max_bytes = " +
              std::to_string(op.count_) + " bytes (" + std::to_string(size) + " bytes buffered)"));
          return true;
        }
        break;
      }
    }
    if (read_error != 0) {
      op.error_ =
          std::make_exception_ptr(closed_error(op.describe(), read_error, uv_strerror(read_error)));
      return true;
    }
    if (eof) {
      std::string why = "the peer closed the stream";
      if (op.kind_ == ReadOperation::Kind::exactly) {
        why += " after " + std::to_string(size) + " of " + std::to_string(op.count_) + " bytes";
      } else if (op.kind_ == ReadOperation::Kind::until) {
        why += " before the delimiter (" + std::to_string(size) + " bytes buffered)";
      }
      op.error_ = std::make_exception_ptr(StreamClosedError(op.describe() + ": " + why, UV_EOF));
      return true;
    }
    if (unusable()) {
      op.error_ = std::make_exception_ptr(closed_error(op.describe(), 0, "the stream is closed"));
      return true;
    }
    return false;
  }

  // ---- writing ----

  void link(WriteOperation* op) noexcept {
    op->prev_ = writers_tail;
    op->next_ = nullptr;
    if (writers_tail != nullptr) {
      writers_tail->next_ = op;
    } else {
      writers_head = op;
    }
    writers_tail = op;
    op->queued_ = true;
  }

  void unlink(WriteOperation* op) noexcept {
    if (!op->queued_) return;
    if (op->prev_ != nullptr) {
      op->prev_->next_ = op->next_;
    } else {
      writers_head = op->next_;
    }
    if (op->next_ != nullptr) {
      op->next_->prev_ = op->prev_;
    } else {
      writers_tail = op->prev_;
    }
    op->next_ = op->prev_ = nullptr;
    op->queued_ = false;
  }

  static void on_write(uv_write_t* request, int status) {
    std::unique_ptr<WriteRequest> done(static_cast<WriteRequest*>(request->data));
    StreamState* self = done->state;
    done.reset();
    if (status == UV_ECANCELED) return;  // Closing: on_closed fails the waiters.
    StreamRef keep(self);
    if (status < 0) {
      if (self->write_error == 0) self->write_error = status;
      while (self->writers_head != nullptr) {
        WriteOperation* op = self->writers_head;
        op->finish(std::make_exception_ptr(
            self->closed_error(op->describe(), status, uv_strerror(status))));
      }
      return;
    }
    // Wake the waiting writers in order while the queue stays at or below the low mark.
    while (self->writers_head != nullptr && !self->closing &&
           self->tcp->write_queue_size <= self->options.write_low_water) {
      self->writers_head->finish(nullptr);
    }
  }

  static void on_shutdown(uv_shutdown_t* request, int status) {
    std::unique_ptr<ShutdownRequest> done(static_cast<ShutdownRequest*>(request->data));
    StreamState* self = done->state;
    done.reset();
    if (status == UV_ECANCELED || self->shutdown_wait == nullptr) return;
    StreamRef keep(self);
    ShutdownOperation* op = self->shutdown_wait;
    op->finish(status < 0 ? std::make_exception_ptr(
                                self->closed_error(op->describe(), status, uv_strerror(status)))
                          : nullptr);
  }
};

void StreamState::fail_all(int status, const char* reason) {
  if (read != nullptr)
    read->finish(std::make_exception_ptr(closed_error(read->describe(), status, reason)));
  while (writers_head != nullptr) {
    WriteOperation* op = writers_head;
    op->finish(std::make_exception_ptr(closed_error(op->describe(), status, reason)));
  }
  if (shutdown_wait != nullptr) {
    shutdown_wait->finish(
        std::make_exception_ptr(closed_error(shutdown_wait->describe(), status, reason)));
  }
}

StreamRef::StreamRef(StreamState* state) noexcept : state_(state) {
  if (state_ != nullptr) ++state_->refs;
}

StreamRef::~StreamRef() {
  if (state_ != nullptr) state_->release();
}

}  // namespace detail

// ---- ReadOperation ----------------------------------------------------------------------------

ReadOperation::ReadOperation(detail::StreamRef state, Kind kind, std::size_t count,
                             std::string delimiter, std::chrono::milliseconds timeout)
    : AwaitableOperation(timeout),
      state_(std::move(state)),
      kind_(kind),
      count_(count),
      delimiter_(std::move(delimiter)) {}

ReadOperation::ReadOperation(ReadOperation&& other) noexcept
    : AwaitableOperation(std::move(other)),
      state_(std::move(other.state_)),
      kind_(other.kind_),
      count_(other.count_),
      delimiter_(std::move(other.delimiter_)) {}

std::string ReadOperation::describe() const {
  std::string name;
  switch (kind_) {
    case Kind::some:
      name = "read_some(" + std::to_string(count_) + ")";
      break;
    case Kind::exactly:
      name = "read_exactly(" + std::to_string(count_) + ")";
      break;
    case Kind::until:
      name = "read_until(" + printable(delimiter_) + ", " + std::to_string(count_) + ")";
      break;
  }
  return name + " from " + (state_ ? state_->peer : std::string("?"));
}

bool ReadOperation::start(std::coroutine_handle<> waiter, std::stop_token token) {
  detail::StreamState& state = *state_.get();
  if (state.read != nullptr) {
    error_ = std::make_exception_ptr(
        std::logic_error(describe() + ": another read is pending on this stream"));
    return false;
  }
  if (state.fill(*this)) return false;
  state.read = this;
  state.update_reading();
  if (state.read_error != 0 && state.fill(*this)) {
    state.read = nullptr;
    return false;
  }
  wait(*state.loop, waiter, std::move(token));
  return true;
}

void ReadOperation::detach() noexcept {
  if (state_ && state_->read == this) {
    state_->read = nullptr;
    state_->update_reading();
  }
}

std::string ReadOperation::await_resume() {
  rethrow();
  return std::move(result_);
}

// ---- WriteOperation ---------------------------------------------------------------------------

WriteOperation::WriteOperation(detail::StreamRef state, std::string_view bytes,
                               std::chrono::milliseconds timeout)
    : AwaitableOperation(timeout), state_(std::move(state)), bytes_(bytes) {}

WriteOperation::WriteOperation(WriteOperation&& other) noexcept
    : AwaitableOperation(std::move(other)), state_(std::move(other.state_)), bytes_(other.bytes_) {}

std::string WriteOperation::describe() const {
  return "write to " + (state_ ? state_->peer : std::string("?"));
}

bool WriteOperation::start(std::coroutine_handle<> waiter, std::stop_token token) {
  detail::StreamState& state = *state_.get();
  const std::string_view bytes = std::exchange(bytes_, {});
  if (state.unusable()) {
    error_ = std::make_exception_ptr(state.closed_error(describe(), 0, "the stream is closed"));
    return false;
  }
  if (state.write_error != 0) {
    error_ = std::make_exception_ptr(
        state.closed_error(describe(), state.write_error, uv_strerror(state.write_error)));
    return false;
  }
  if (state.shut_down) {
    error_ = std::make_exception_ptr(
        state.closed_error(describe(), UV_EPIPE, "the stream was shut down for writing"));
    return false;
  }
  std::size_t sent = 0;
  if (state.tcp->write_queue_size == 0 && !bytes.empty()) {
    // Nothing queued: hand the bytes to the socket without copying them.
    uv_buf_t buf =
        uv_buf_init(const_cast<char*>(bytes.data()), static_cast<unsigned int>(bytes.size()));
    const int status = uv_try_write(state.stream(), &buf, 1);
    if (status >= 0) {
      sent = static_cast<std::size_t>(status);
    } else if (status != UV_EAGAIN) {
      state.write_error = status;
      error_ = std::make_exception_ptr(state.closed_error(describe(), status, uv_strerror(status)));
      return false;
    }
  }
  if (sent < bytes.size()) {
    auto request = std::make_unique<detail::WriteRequest>();
    request->bytes.assign(bytes.substr(sent));
    request->state = &state;
    request->request.data = request.get();
    uv_buf_t buf =
        uv_buf_init(request->bytes.data(), static_cast<unsigned int>(request->bytes.size()));
    const int status =
        uv_write(&request->request, state.stream(), &buf, 1, &detail::StreamState::on_write);
    if (status < 0) {
      state.write_error = status;
      error_ = std::make_exception_ptr(state.closed_error(describe(), status, uv_strerror(status)));
      return false;
    }
    request.release();  // on_write frees it.
  }
  if (state.tcp->write_queue_size <= state.options.write_high_water) return false;
  state.link(this);
  wait(*state.loop, waiter, std::move(token));
  return true;
}

void WriteOperation::detach() noexcept {
  if (state_) state_->unlink(this);
}

// ---- ShutdownOperation ------------------------------------------------------------------------

ShutdownOperation::ShutdownOperation(detail::StreamRef state, std::chrono::milliseconds timeout)
    : AwaitableOperation(timeout), state_(std::move(state)) {}

ShutdownOperation::ShutdownOperation(ShutdownOperation&& other) noexcept
    : AwaitableOperation(std::move(other)), state_(std::move(other.state_)) {}

std::string ShutdownOperation::describe() const {
  return "shutdown of " + (state_ ? state_->peer : std::string("?"));
}

bool ShutdownOperation::start(std::coroutine_handle<> waiter, std::stop_token token) {
  detail::StreamState& state = *state_.get();
  if (state.unusable()) {
    error_ = std::make_exception_ptr(state.closed_error(describe(), 0, "the stream is closed"));
    return false;
  }
  if (state.shut_down) {
    error_ = std::make_exception_ptr(
        state.closed_error(describe(), UV_EPIPE, "the stream was already shut down"));
    return false;
  }
  auto request = std::make_unique<detail::ShutdownRequest>();
  request->state = &state;
  request->request.data = request.get();
  const int status =
      uv_shutdown(&request->request, state.stream(), &detail::StreamState::on_shutdown);
  if (status < 0) {
    error_ = std::make_exception_ptr(state.closed_error(describe(), status, uv_strerror(status)));
    return false;
  }
  request.release();  // on_shutdown frees it.
  state.shut_down = true;
  state.shutdown_wait = this;
  wait(*state.loop, waiter, std::move(token));
  return true;
}

void ShutdownOperation::detach() noexcept {
  if (state_ && state_->shutdown_wait == this) state_->shutdown_wait = nullptr;
}

// ---- TcpStream --------------------------------------------------------------------------------

namespace {

// Runs a callback-form operation: the callback runs on a later loop iteration, and not at all once
// the TcpStream is gone.
template <typename Op>
Task<void> read_then_call(Loop* loop, detail::StreamRef state, Op op, ReadCallback callback) {
  std::exception_ptr error;
  std::string data;
  try {
    data = co_await op;
  } catch (...) {
    error = std::current_exception();
  }
  if (!op.suspended()) co_await sleep(*loop, std::chrono::milliseconds(0));
  if (state->owner_gone) co_return;
  callback(std::move(error), std::move(data));
}

template <typename Op>
Task<void> wait_then_call(Loop* loop, detail::StreamRef state, Op op, DoneCallback callback) {
  std::exception_ptr error;
  try {
    co_await op;
  } catch (...) {
    error = std::current_exception();
  }
  if (!op.suspended()) co_await sleep(*loop, std::chrono::milliseconds(0));
  if (state->owner_gone) co_return;
  callback(std::move(error));
}

}  // namespace

TcpStream& TcpStream::operator=(TcpStream&& other) noexcept {
  if (this != &other) {
    if (state_) {
      state_->owner_gone = true;
      state_->close();
    }
    state_ = std::move(other.state_);
  }
  return *this;
}

TcpStream::~TcpStream() {
  if (!state_) return;
  state_->owner_gone = true;
  state_->close();
}

detail::StreamState* TcpStream::checked(const char* operation) const {
  if (!state_) {
    throw std::logic_error(std::string("squall::net::TcpStream::") + operation +
                           ": not connected (a moved-from or default-constructed TcpStream)");
  }
  return state_.get();
}

ReadOperation TcpStream::read_some(std::size_t max_bytes, std::chrono::milliseconds timeout) {
  checked("read_some");
  if (max_bytes == 0) throw std::invalid_argument("TcpStream::read_some: max_bytes must be >= 1");
  return ReadOperation(state_, ReadOperation::Kind::some, max_bytes, {}, timeout);
}

ReadOperation TcpStream::read_exactly(std::size_t count, std::chrono::milliseconds timeout) {
  checked("read_exactly");
  return ReadOperation(state_, ReadOperation::Kind::exactly, count, {}, timeout);
}

ReadOperation TcpStream::read_until(std::string_view delimiter, std::size_t max_bytes,
                                    std::chrono::milliseconds timeout) {
  checked("read_until");
  if (delimiter.empty()) throw std::invalid_argument("TcpStream::read_until: empty delimiter");
  return ReadOperation(state_, ReadOperation::Kind::until, max_bytes, std::string(delimiter),
                       timeout);
}

WriteOperation TcpStream::write(std::string_view bytes, std::chrono::milliseconds timeout) {
  checked("write");
  return WriteOperation(state_, bytes, timeout);
}

ShutdownOperation TcpStream::shutdown(std::chrono::milliseconds timeout) {
  checked("shutdown");
  return ShutdownOperation(state_, timeout);
}

void TcpStream::read_some(std::size_t max_bytes, ReadCallback callback,
                          std::chrono::milliseconds timeout) {
  Loop* loop = checked("read_some")->loop;
  spawn(*loop, read_then_call(loop, state_, read_some(max_bytes, timeout), std::move(callback)));
}

void TcpStream::read_exactly(std::size_t count, ReadCallback callback,
                             std::chrono::milliseconds timeout) {
  Loop* loop = checked("read_exactly")->loop;
  spawn(*loop, read_then_call(loop, state_, read_exactly(count, timeout), std::move(callback)));
}

void TcpStream::read_until(std::string_view delimiter, std::size_t max_bytes, ReadCallback callback,
                           std::chrono::milliseconds timeout) {
  Loop* loop = checked("read_until")->loop;
  spawn(*loop, read_then_call(loop, state_, read_until(delimiter, max_bytes, timeout),
                              std::move(callback)));
}

namespace {

// The callback form of write: starts the write now (so `bytes` need not outlive the call).
Task<void> write_now_call_later(Loop* loop, detail::StreamRef state, WriteOperation op,
                                DoneCallback callback) {
  return wait_then_call(loop, std::move(state), std::move(op), std::move(callback));
}

}  // namespace

void TcpStream::write(std::string_view bytes, DoneCallback callback,
                      std::chrono::milliseconds timeout) {
  Loop* loop = checked("write")->loop;
  // spawn() runs the task up to its first suspension, so the bytes are taken before we return.
  spawn(*loop, write_now_call_later(loop, state_, write(bytes, timeout), std::move(callback)));
}

void TcpStream::shutdown(DoneCallback callback, std::chrono::milliseconds timeout) {
  Loop* loop = checked("shutdown")->loop;
  spawn(*loop, wait_then_call(loop, state_, shutdown(timeout), std::move(callback)));
}

void TcpStream::close() noexcept {
  if (state_) state_->close();
}

bool TcpStream::is_open() const noexcept {
  return state_ && !state_->unusable();
}

const std::string& TcpStream::peer_address() const {
  return checked("peer_address")->peer;
}

const std::string& TcpStream::local_address() const {
  return checked("local_address")->local;
}

std::size_t TcpStream::write_buffer_size() const noexcept {
  return state_ ? state_->tcp->write_queue_size : 0;
}

std::size_t TcpStream::read_buffer_size() const noexcept {
  return state_ ? state_->buffer.size() : 0;
}

void TcpStream::set_nodelay(bool enabled) {
  detail::StreamState* state = checked("set_nodelay");
  if (state->unusable()) return;
  const int status = uv_tcp_nodelay(state->tcp.get(), enabled ? 1 : 0);
  if (status < 0) {
    throw std::system_error(-status, std::generic_category(),
                            "TCP_NODELAY on " + state->peer + ": " + uv_strerror(status));
  }
}

const StreamOptions& TcpStream::options() const {
  return checked("options")->options;
}

// ---- TcpServer --------------------------------------------------------------------------------

namespace detail {

struct ListenSocket {
  UvHandle<uv_tcp_t> tcp;  // tcp.data -> this.
  ServerState* server;     // Null once the server let go of it.
  std::string address;     // The bound address, for messages.
};

struct ServerState {
  Loop* loop;                                          // Whose thread.
  TcpServerOptions options;                            // Backlog and stream options.
  std::vector<std::unique_ptr<ListenSocket>> sockets;  // Listening (or closed).
  std::deque<ListenSocket*> ready;    // A connection accepted by libuv, not yet taken.
  AcceptOperation* accept = nullptr;  // The pending accept().
  std::function<void(Loop&, TcpStream)> on_stream;  // serve()'s handler.
  bool closed = false;                              // close() ran.
  int busy = 0;                                     // Dispatches running (they may close us).
  bool orphaned = false;                // The TcpServer is gone: the last dispatch frees.
  std::uint64_t last_error_log_ms = 0;  // Accept errors are logged once a second.

  std::string name() const {
    return sockets.empty() ? std::string("TcpServer") : sockets.front()->address;
  }

  static void on_connection(uv_stream_t* listening, int status) {
    auto* socket = static_cast<ListenSocket*>(listening->data);
    ServerState* self = socket->server;
    if (self == nullptr) return;
    if (status < 0) {
      // EMFILE and the like: libuv's reserve descriptor sheds the connection; say so, rarely.
      const std::uint64_t now = self->loop->now_ms();
      if (self->last_error_log_ms == 0 || now - self->last_error_log_ms >= 1000) {
        self->last_error_log_ms = now;
        spdlog::warn("accept on {}: {}", socket->address, uv_strerror(status));
      }
      return;
    }
    self->ready.push_back(socket);
    self->dispatch();
  }

  // Takes the connection libuv accepted on `socket`: an open stream, or an empty one.
  TcpStream take(ListenSocket* socket) {
    auto* state = new StreamState(*loop, options.stream);
    TcpStream stream{StreamRef(state)};
    const int status = uv_accept(socket->tcp.stream(), state->stream());
    if (status < 0) {
      spdlog::warn("accept on {}: {}", socket->address, uv_strerror(status));
      return TcpStream();  // Closes the new handle.
    }
    state->opened();
    return stream;
  }

  // Hands ready connections to serve()'s handler or to the pending accept.
  void dispatch() {
    ++busy;
    while (!closed && !ready.empty() && (on_stream || accept != nullptr)) {
      ListenSocket* socket = ready.front();
      ready.pop_front();
      TcpStream stream = take(socket);
      if (!stream.is_open()) continue;
      if (on_stream) {
        try {
          on_stream(*loop, std::move(stream));
        } catch (const std::exception& error) {
          spdlog::error("TcpServer {}: connection handler threw: {}", socket->address,
                        error.what());
        }
      } else {
        AcceptOperation* op = accept;
        op->stream_ = std::move(stream);
        op->finish(nullptr);
      }
    }
    if (--busy == 0 && orphaned) delete this;
  }

  void close() noexcept {
    if (closed) return;
    closed = true;
    ready.clear();
    // The sockets themselves stay until the state goes: a dispatch may still name one.
    for (const auto& socket : sockets) {
      socket->server = nullptr;
      socket->tcp.close();
    }
    if (accept != nullptr) {
      AcceptOperation* op = accept;
      if (loop->closed()) {
        op->detach();
      } else {
        op->finish_soon(std::make_exception_ptr(
            StreamClosedError(op->describe() + ": the server is closed", 0)));
      }
    }
  }
};

}  // namespace detail

AcceptOperation::AcceptOperation(detail::ServerState* server) noexcept
    : AwaitableOperation(no_timeout), server_(server) {}

AcceptOperation::AcceptOperation(AcceptOperation&& other) noexcept
    : AwaitableOperation(std::move(other)), server_(std::exchange(other.server_, nullptr)) {}

std::string AcceptOperation::describe() const {
  return "accept on " + (server_ ? server_->name() : std::string("a closed TcpServer"));
}

bool AcceptOperation::start(std::coroutine_handle<> waiter, std::stop_token token) {
  if (server_ == nullptr || server_->closed) {
    error_ = std::make_exception_ptr(StreamClosedError(describe() + ": the server is closed", 0));
    return false;
  }
  if (server_->accept != nullptr || server_->on_stream) {
    error_ = std::make_exception_ptr(std::logic_error(
        describe() + ": another accept() is pending, or serve() takes the connections"));
    return false;
  }
  while (!server_->ready.empty()) {
    detail::ListenSocket* socket = server_->ready.front();
    server_->ready.pop_front();
    stream_ = server_->take(socket);
    if (stream_.is_open()) return false;
  }
  server_->accept = this;
  wait(*server_->loop, waiter, std::move(token));
  return true;
}

void AcceptOperation::detach() noexcept {
  if (server_ != nullptr && server_->accept == this) server_->accept = nullptr;
}

TcpStream AcceptOperation::await_resume() {
  rethrow();
  return std::move(stream_);
}

TcpServer::TcpServer(Loop& loop, TcpServerOptions options) : state_(new detail::ServerState{}) {
  options.stream.validate();
  state_->loop = &loop;
  state_->options = std::move(options);
}

TcpServer::~TcpServer() {
  state_->close();
  if (state_->busy > 0) {
    state_->orphaned = true;
  } else {
    delete state_;
  }
}

std::string TcpServer::listen(const std::string& host, std::uint16_t port) {
  const std::string display = host_port(host, port);
  if (state_->closed) throw std::logic_error("TcpServer::listen " + display + ": server closed");
  if (state_->loop->closed()) {
    throw std::logic_error("TcpServer::listen " + display + ": the loop is closed");
  }
  sockaddr_storage address{};
  const bool v6 = host.find(':') != std::string::npos;
  int status = v6 ? uv_ip6_addr(host.c_str(), port, reinterpret_cast<sockaddr_in6*>(&address))
                  : uv_ip4_addr(host.c_str(), port, reinterpret_cast<sockaddr_in*>(&address));
  if (status < 0) {
    throw std::system_error(-status, std::generic_category(),
                            "cannot listen on " + display + ": not a numeric IPv4 or IPv6 address");
  }
  auto socket = std::make_unique<detail::ListenSocket>();
  socket->tcp = UvHandle<uv_tcp_t>(*state_->loop, socket.get(), uv_tcp_init, "listening socket");
  socket->server = state_;
  // A failure closes the socket with `socket`.
  auto fail = [&](int failure, const char* what) {
    throw std::system_error(-failure, std::generic_category(),
                            std::string(what) + " " + display + ": " + uv_strerror(failure));
  };
  status = uv_tcp_bind(socket->tcp.get(), reinterpret_cast<const sockaddr*>(&address),
                       v6 ? UV_TCP_IPV6ONLY : 0);
  if (status < 0) fail(status, "cannot bind");
  status =
      uv_listen(socket->tcp.stream(), state_->options.backlog, &detail::ServerState::on_connection);
  if (status < 0) fail(status, "cannot listen on");
  socket->address = address_of(socket->tcp.get(), false);
  state_->sockets.push_back(std::move(socket));
  return state_->sockets.back()->address;
}

std::uint16_t TcpServer::port() const {
  if (state_->sockets.empty()) throw std::logic_error("TcpServer::port: not listening");
  sockaddr_storage bound{};
  int length = sizeof bound;
  uv_tcp_getsockname(state_->sockets.front()->tcp.get(), reinterpret_cast<sockaddr*>(&bound),
                     &length);
  return ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6&>(bound).sin6_port
                                           : reinterpret_cast<sockaddr_in&>(bound).sin_port);
}

AcceptOperation TcpServer::accept() {
  return AcceptOperation(state_);
}

void TcpServer::serve_with(std::function<void(Loop&, TcpStream)> on_stream) {
  if (state_->accept != nullptr) {
    throw std::logic_error("TcpServer::serve on " + state_->name() + ": an accept() is pending");
  }
  state_->on_stream = std::move(on_stream);
  state_->dispatch();
}

void TcpServer::close() noexcept {
  state_->close();
}

// ---- connecting -------------------------------------------------------------------------------

namespace {

// `co_await ResolveOperation(...)`: uv_getaddrinfo on the pool.
class ResolveOperation final : public detail::AwaitableOperation<ResolveOperation> {
 public:
  ResolveOperation(Loop& loop, std::string host, std::uint16_t port,
                   std::chrono::milliseconds timeout)
      : AwaitableOperation(timeout), loop_(&loop), host_(std::move(host)), port_(port) {}
  ~ResolveOperation() { detach(); }

  std::vector<sockaddr_storage> await_resume() {
    rethrow();
    return std::move(addresses_);
  }

 private:
  friend class detail::AwaitableOperation<ResolveOperation>;
  struct Request {
    uv_getaddrinfo_t request;  // request.data -> this; freed by the callback.
    ResolveOperation* op;      // Null once the operation stopped waiting.
  };

  bool start(std::coroutine_handle<> waiter, std::stop_token token) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    auto request = std::make_unique<Request>();
    request->op = this;
    request->request.data = request.get();
    const std::string service = std::to_string(port_);
    const int status = uv_getaddrinfo(loop_->uv(), &request->request, &ResolveOperation::on_done,
                                      host_.c_str(), service.c_str(), &hints);
    if (status < 0) {
      error_ = failure(status);
      return false;
    }
    request_ = request.release();
    wait(*loop_, waiter, std::move(token));
    return true;
  }

  static void on_done(uv_getaddrinfo_t* request, int status, addrinfo* result) {
    std::unique_ptr<Request> done(static_cast<Request*>(request->data));
    ResolveOperation* op = done->op;
    if (op != nullptr) {
      op->request_ = nullptr;
      for (const addrinfo* entry = result; entry != nullptr; entry = entry->ai_next) {
        if (entry->ai_family != AF_INET && entry->ai_family != AF_INET6) continue;
        sockaddr_storage address{};
        std::memcpy(&address, entry->ai_addr, entry->ai_addrlen);
        op->addresses_.push_back(address);
      }
    }
    uv_freeaddrinfo(result);
    done.reset();
    if (op == nullptr) return;
    if (status == 0 && op->addresses_.empty()) status = UV_EAI_NODATA;
    op->finish(status < 0 ? op->failure(status) : nullptr);
  }

  std::exception_ptr failure(int status) const {
    return std::make_exception_ptr(
        ConnectError("cannot resolve " + host_ + ": " + uv_strerror(status), status));
  }

  void detach() noexcept override {
    if (request_ == nullptr) return;
    // Not started yet: the pool drops it. Running: it ends on its own and finds no operation.
    uv_cancel(reinterpret_cast<uv_req_t*>(&request_->request));
    request_->op = nullptr;
    request_ = nullptr;
  }

  std::string describe() const override { return "resolving " + host_; }

  Loop* loop_;                               // Whose pool.
  std::string host_;                         // The name.
  std::uint16_t port_;                       // The port, in every address.
  Request* request_ = nullptr;               // In flight.
  std::vector<sockaddr_storage> addresses_;  // The outcome.
};

// `co_await ConnectAttempt(...)`: one uv_tcp_connect to one address.
class ConnectAttempt final : public detail::AwaitableOperation<ConnectAttempt> {
 public:
  ConnectAttempt(Loop& loop, const sockaddr_storage& address, std::string target,
                 const StreamOptions& options, std::chrono::milliseconds timeout)
      : AwaitableOperation(timeout),
        loop_(&loop),
        address_(address),
        target_(std::move(target)),
        options_(options) {}
  ~ConnectAttempt() { detach(); }

  TcpStream await_resume() {
    rethrow();
    state_->opened();
    return TcpStream(std::move(state_));
  }

 private:
  friend class detail::AwaitableOperation<ConnectAttempt>;
  struct Request {
    uv_connect_t request;  // request.data -> this; freed by the callback.
    ConnectAttempt* op;    // Null once the attempt stopped waiting.
  };

  bool start(std::coroutine_handle<> waiter, std::stop_token token) {
    state_ = detail::StreamRef(new detail::StreamState(*loop_, options_));
    auto request = std::make_unique<Request>();
    request->op = this;
    request->request.data = request.get();
    const int status =
        uv_tcp_connect(&request->request, state_->tcp.get(),
                       reinterpret_cast<const sockaddr*>(&address_), &ConnectAttempt::on_connected);
    if (status < 0) {
      error_ = failure(status);
      state_ = {};
      return false;
    }
    request_ = request.release();
    wait(*loop_, waiter, std::move(token));
    return true;
  }

  static void on_connected(uv_connect_t* request, int status) {
    std::unique_ptr<Request> done(static_cast<Request*>(request->data));
    ConnectAttempt* op = done->op;
    done.reset();
    if (op == nullptr) return;
    op->request_ = nullptr;
    if (status < 0) {
      op->state_ = {};  // Closes the socket.
      op->finish(op->failure(status));
    } else {
      op->finish(nullptr);
    }
  }

  std::exception_ptr failure(int status) const {
    return std::make_exception_ptr(
        ConnectError(format_address(address_, true) + ": " + uv_strerror(status), status));
  }

  void detach() noexcept override {
    if (request_ == nullptr) return;
    // Closing the socket cancels the connect; its callback finds no operation.
    request_->op = nullptr;
    request_ = nullptr;
    state_ = {};
  }

  std::string describe() const override {
    return "connect to " + target_ + " (" + format_address(address_, true) + ")";
  }

  Loop* loop_;                  // Where.
  sockaddr_storage address_;    // To what.
  std::string target_;          // "host:port", for messages.
  StreamOptions options_;       // For the stream.
  detail::StreamRef state_;     // The socket being connected.
  Request* request_ = nullptr;  // In flight.
};

std::optional<sockaddr_storage> numeric_address(const std::string& host, std::uint16_t port) {
  sockaddr_storage address{};
  if (uv_ip4_addr(host.c_str(), port, reinterpret_cast<sockaddr_in*>(&address)) == 0) {
    return address;
  }
  address = {};
  if (uv_ip6_addr(host.c_str(), port, reinterpret_cast<sockaddr_in6*>(&address)) == 0) {
    return address;
  }
  return std::nullopt;
}

std::chrono::milliseconds remaining(Loop& loop, std::uint64_t deadline_ms) {
  const std::uint64_t now = loop.now_ms();
  return std::chrono::milliseconds(deadline_ms > now ? deadline_ms - now : 0);
}

}  // namespace

Task<std::vector<sockaddr_storage>> resolve(Loop& loop, std::string host, std::uint16_t port) {
  if (auto numeric = numeric_address(host, port)) {
    co_return std::vector<sockaddr_storage>{*numeric};
  }
  ResolveOperation lookup(loop, std::move(host), port, no_timeout);
  std::vector<sockaddr_storage> addresses = co_await lookup;
  co_return addresses;
}

Task<TcpStream> connect(Loop& loop, std::string host, std::uint16_t port, ConnectOptions options) {
  options.stream.validate();
  const std::string target = host_port(host, port);
  if (loop.closed()) throw std::logic_error("connect to " + target + ": the loop is closed");
  const bool limited = options.timeout.count() > 0;
  const std::uint64_t deadline =
      loop.now_ms() + static_cast<std::uint64_t>(limited ? options.timeout.count() : 0);
  auto timed_out = [&] {
    return TimeoutError("connect to " + target + ": timed out after " +
                        std::to_string(options.timeout.count()) + " ms");
  };
  std::vector<sockaddr_storage> addresses;
  if (auto numeric = numeric_address(host, port)) {
    addresses.push_back(*numeric);
  } else {
    ResolveOperation lookup(loop, host, port, limited ? remaining(loop, deadline) : no_timeout);
    try {
      addresses = co_await lookup;
    } catch (const TimeoutError&) {
      throw timed_out();
    } catch (const ConnectError& error) {
      throw ConnectError("connect to " + target + " failed: " + error.what(), error.status());
    }
  }
  std::string failures;
  int last = 0;
  for (const sockaddr_storage& address : addresses) {
    std::chrono::milliseconds left = no_timeout;
    if (limited) {
      left = remaining(loop, deadline);
      if (left.count() <= 0) throw timed_out();
    }
    ConnectAttempt attempt(loop, address, target, options.stream, left);
    try {
      TcpStream stream = co_await attempt;
      co_return stream;
    } catch (const TimeoutError&) {
      throw timed_out();
    } catch (const ConnectError& error) {
      if (!failures.empty()) failures += "; ";
      failures += error.what();
      last = error.status();
    }
  }
  throw ConnectError("connect to " + target + " failed: " + failures, last);
}

namespace {

Task<void> connect_then_call(Loop& loop, std::string host, std::uint16_t port,
                             ConnectOptions options,
                             std::function<void(std::exception_ptr, TcpStream)> callback) {
  std::exception_ptr error;
  TcpStream stream;
  try {
    stream = co_await connect(loop, std::move(host), port, std::move(options));
  } catch (...) {
    error = std::current_exception();
  }
  callback(std::move(error), std::move(stream));
}

}  // namespace

void connect(Loop& loop, std::string host, std::uint16_t port, ConnectOptions options,
             std::function<void(std::exception_ptr error, TcpStream stream)> callback) {
  spawn(loop,
        connect_then_call(loop, std::move(host), port, std::move(options), std::move(callback)));
}

}  // namespace squall::net
