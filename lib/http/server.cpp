#include "squall/http/server.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <type_traits>

#include <spdlog/spdlog.h>

#include "http/connection.hpp"
#include "http/connection_context.hpp"

namespace squall::http {

namespace {

constexpr std::string_view kTooManyConnectionsBody = "server.max_connections reached; retry\n";

}  // namespace

Server::Server(Loop& loop, std::shared_ptr<const Router> router, ServerOptions options)
    : Server(loop, std::move(router), std::move(options), std::make_shared<SharedLimits>()) {}

Server::Server(Loop& loop, std::shared_ptr<const Router> router, ServerOptions options,
               std::shared_ptr<SharedLimits> shared)
    : loop_(loop),
      context_(std::make_unique<ConnectionContext>(loop, std::move(router), std::move(shared))) {
  context_->reconfigure(std::move(options));
  // Called when a connection closes, or at the end of the walk over connections that closed it
  // (ConnectionContext::Walk): the drain callback may delete this server.
  context_->on_connection_closed = [this] { finish_drain_if_done(); };
}

void Server::reconfigure(ServerOptions options) {
  context_->reconfigure(std::move(options));
}

void Server::set_router(std::shared_ptr<const Router> router) {
  context_->router = std::move(router);
}

void Server::on_request(std::function<void(const RequestRecord&)> observer) {
  context_->request_observer = std::move(observer);
}

bool Server::draining() const noexcept {
  return context_->draining;
}

const ServerStats& Server::stats() const noexcept {
  return context_->stats;
}

const MemoryBudget& Server::body_budget() const noexcept {
  return context_->body_budget;
}

const MemoryBudget& Server::unsent_budget() const noexcept {
  return context_->unsent_budget;
}

const std::shared_ptr<SharedLimits>& Server::shared_limits() const noexcept {
  return context_->shared;
}

const ServerOptions& Server::options() const noexcept {
  return context_->options;
}

Server::~Server() {
  // Destroying the server abandons a drain: its callback is not called from the destructor
  // (it could destroy the server a second time).
  on_drained_ = nullptr;
  close_all();
  close_drain_timer();
  // Closed connections still referenced by a Responder outlive the server: the context's
  // destructor cuts them loose.
  context_->on_connection_closed = nullptr;
}

void Server::close_drain_timer() noexcept {
  if (drain_timer_ == 0) return;
  loop_.cancel(drain_timer_);
  drain_timer_ = 0;
}

std::string Server::listen(const std::string& host, std::uint16_t port) {
  listeners_.push_back(std::make_unique<net::Listener>(
      loop_, host, port, context_->options.backlog,
      [this](uv_stream_t* listener, int status) { on_connection(listener, status); }));
  return listeners_.back()->bound_address();
}

std::string Server::adopt_listener(int fd) {
  listeners_.push_back(std::make_unique<net::Listener>(
      loop_, fd, context_->options.backlog,
      [this](uv_stream_t* listener, int status) { on_connection(listener, status); }));
  return listeners_.back()->bound_address();
}

bool Server::close_listener(const std::string& bound_address) {
  const ConnectionContext::Walk walk(*context_);  // The last listener may end a drain.
  const auto it = std::find_if(listeners_.begin(), listeners_.end(), [&](const auto& listener) {
    return listener->bound_address() == bound_address;
  });
  if (it == listeners_.end()) return false;
  close_after_accepting(**it);
  listeners_.erase(it);
  context_->check_drain();
  return true;
}

void Server::close_after_accepting(net::Listener& listener) noexcept {
  // The kernel resets the connections a listener still queues when it closes, although their
  // clients saw the handshake complete: accept them all first (the loop may not have polled the
  // listener since they arrived). They are served like any other, with Connection: close when
  // draining.
  for (;;) {
    const int fd = listener.accept_waiting();
    if (fd == -EAGAIN || fd == -EBADF) break;
    if (fd == -ECONNABORTED) continue;  // Reset by its client while queued: the next one.
    if (fd < 0) {
      ++context_->stats.connections_refused;
      log_accept_error(fd);
      break;
    }
    admit([fd](auto* target) {
      if constexpr (std::is_same_v<decltype(target), Connection*>) {
        return target->start(fd);  // Closes fd on failure.
      } else {
        const int status = uv_tcp_open(target, fd);
        if (status < 0) ::close(fd);
        return status;
      }
    });
  }
  listener.close();
}

void Server::log_accept_error(int status) {
  if (context_->once_a_second(last_accept_error_log_ms_)) {
    spdlog::error("accept failed: {} (raise LimitNOFILE or lower server.max_connections)",
                  uv_strerror(status));
  }
}

void Server::on_connection(uv_stream_t* listener, int status) {
  if (status < 0) {
    // libuv already shed one pending connection with its reserve descriptor on EMFILE.
    ++context_->stats.connections_refused;
    log_accept_error(status);
    return;
  }
  admit([listener](auto* target) {
    if constexpr (std::is_same_v<decltype(target), Connection*>) {
      return target->start(listener);
    } else {
      return uv_accept(listener, reinterpret_cast<uv_stream_t*>(target));
    }
  });
}

template <typename Accept>
void Server::admit(Accept accept) {
  // max_connections counts the connections of every server sharing these limits; a connection
  // gives its place back when it closes (ConnectionContext::connection_closed).
  std::atomic<std::uint64_t>& open = context_->shared->connections_open;
  if (open.fetch_add(1, std::memory_order_relaxed) >= context_->options.max_connections) {
    open.fetch_sub(1, std::memory_order_relaxed);
    // Lives only until its handle closes, at the end of this block.
    ++context_->stats.connections_refused;
    if (context_->once_a_second(last_refusal_log_ms_)) {
      spdlog::warn("server.max_connections ({}) reached: refusing new connections",
                   context_->options.max_connections);
    }
    const UvHandle<uv_tcp_t> refused(loop_, nullptr, uv_tcp_init, "refused connection");
    if (accept(refused.get()) == 0) refuse(refused.get());
    return;
  }
  Connection* connection = nullptr;
  try {
    connection = new Connection(*context_, next_connection_id_);
  } catch (const std::exception& error) {
    // Out of memory, or no socket handle: the client waits in the backlog for a later try.
    open.fetch_sub(1, std::memory_order_relaxed);
    ++context_->stats.connections_refused;
    if (context_->once_a_second(last_accept_error_log_ms_)) {
      spdlog::error("cannot accept a connection: {}", error.what());
    }
    return;
  }
  next_connection_id_ += connection_id_step_;
  if (accept(connection) == 0) ++context_->stats.connections_accepted;
}

void Server::refuse(uv_tcp_t* refused) {
  // Best effort, one non-blocking write: the client may already be sending its request.
  std::string answer =
      "HTTP/1.1 503 Service Unavailable\r\nServer: " + context_->options.server_name +
      "\r\nDate: " + std::string(context_->date.now()) +
      "\r\nContent-Type: text/plain\r\nContent-Length: " +
      std::to_string(kTooManyConnectionsBody.size()) +
      "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" + std::string(kTooManyConnectionsBody);
  uv_buf_t buf = uv_buf_init(answer.data(), static_cast<unsigned>(answer.size()));
  uv_try_write(reinterpret_cast<uv_stream_t*>(refused), &buf, 1);
}

void Server::drain(std::chrono::milliseconds deadline, std::function<void()> on_drained,
                   bool keep_listening) {
  if (context_->draining) return;
  // The drain callback runs after this function's last use of the server.
  const ConnectionContext::Walk walk(*context_);
  context_->draining = true;
  on_drained_ = std::move(on_drained);
  // Idle connections close before the waiting ones are accepted, which are all new.
  for (Connection* connection : context_->open_connections()) connection->drain();
  if (!keep_listening) {
    for (auto& listener : listeners_) close_after_accepting(*listener);
    listeners_.clear();
  }
  if (context_->has_open_connections() || !listeners_.empty()) {
    drain_deadline_ms_ = static_cast<std::uint64_t>(deadline.count());
    drain_timer_ = loop_.call_later(deadline, [this] {
      const ConnectionContext::Walk walk(*context_);  // The callback may delete this server.
      drain_timer_ = 0;
      spdlog::warn("drain deadline ({} ms) passed with {} connections open; closing them",
                   drain_deadline_ms_, context_->stats.connections_open);
      close_all();
      context_->check_drain();  // When only listeners were left.
    });
  }
  context_->check_drain();
}

void Server::stop_listening() noexcept {
  const ConnectionContext::Walk walk(*context_);  // The drain callback may delete this server.
  for (auto& listener : listeners_) close_after_accepting(*listener);
  listeners_.clear();
  context_->check_drain();
}

void Server::close_all() noexcept {
  const ConnectionContext::Walk walk(*context_);  // The drain callback may delete this server.
  for (auto& listener : listeners_) listener->close();
  listeners_.clear();
  std::vector<Connection*> connections;
  try {
    connections = context_->open_connections();
  } catch (const std::bad_alloc&) {
    // Out of memory: close them one at a time from the lists themselves.
    while (context_->has_open_connections()) context_->first_open_connection()->close_now();
    return;
  }
  for (Connection* connection : connections) connection->close_now();
}

void Server::finish_drain_if_done() {
  if (!context_->draining || context_->has_open_connections() || !listeners_.empty()) return;
  // Also when the last connection is closed by Loop::close(): the timer must not outlive it.
  close_drain_timer();
  if (!on_drained_) return;
  auto done = std::move(on_drained_);
  on_drained_ = nullptr;
  done();
}

}  // namespace squall::http
