#include "squall/http/server.hpp"

#include <algorithm>

#include <spdlog/spdlog.h>

#include "http/connection.hpp"

namespace squall::http {

namespace {

constexpr std::size_t kMaxFreeWorkspaces = 32;               // Spare read buffers kept for reuse.
constexpr std::size_t kMaxRetainedBodyCapacity = 64 * 1024;  // Larger bodies give memory back.
constexpr std::string_view kTooManyConnectionsBody = "server.max_connections reached; retry\n";

// A connection refused over max_connections lives only until its handle closes.
struct RefusedConnection {
  uv_tcp_t tcp;
};

}  // namespace

Server::Server(Loop& loop, std::shared_ptr<const Router> router, ServerOptions options)
    : Server(loop, std::move(router), std::move(options), std::make_shared<SharedLimits>()) {}

Server::Server(Loop& loop, std::shared_ptr<const Router> router, ServerOptions options,
               std::shared_ptr<SharedLimits> shared)
    : loop_(loop),
      router_(std::move(router)),
      shared_(std::move(shared)),
      body_budget_(shared_->bodies),
      unsent_budget_(shared_->unsent) {
  reconfigure(std::move(options));
}

void Server::reconfigure(ServerOptions options) {
  // Parsers hold a pointer to options_.limits: assign in place so it stays valid.
  options_ = std::move(options);
  const auto& limits = options_.limits;
  body_budget_.limit = limits.max_buffered_body_bytes;
  unsent_budget_.limit = limits.max_unsent_bytes;
  // The buffer holds the largest head the limits allow plus room for the next read.
  const std::size_t head = limits.max_url_bytes + limits.max_header_bytes + 64;
  workspace_capacity_ = std::max<std::size_t>(16 * 1024, (head + 4096 + 4095) / 4096 * 4096);
  keep_alive_header_ =
      "Keep-Alive: timeout=" + std::to_string(options_.timeouts.keepalive.count() / 1000) + "\r\n";
}

Server::~Server() {
  close_all();
  // Connections still referenced by a Responder outlive the server: cut them loose.
  for (Connection* connection = connections_; connection != nullptr;) {
    Connection* next = connection->next_;
    connection->orphaned_ = true;
    connection = next;
  }
  while (free_workspaces_ != nullptr) {
    Workspace* workspace = free_workspaces_;
    free_workspaces_ = workspace->next_free;
    delete[] workspace->buffer;
    delete workspace;
  }
  close_drain_timer();
}

void Server::close_drain_timer() noexcept {
  if (drain_timer_ == nullptr) return;
  uv_close(reinterpret_cast<uv_handle_t*>(drain_timer_),
           [](uv_handle_t* handle) { delete reinterpret_cast<uv_timer_t*>(handle); });
  drain_timer_ = nullptr;
}

std::string Server::listen(const std::string& host, std::uint16_t port) {
  listeners_.push_back(std::make_unique<net::Listener>(
      loop_, host, port, options_.backlog,
      [this](uv_stream_t* listener, int status) { on_connection(listener, status); }));
  return listeners_.back()->bound_address();
}

std::string Server::adopt_listener(int fd) {
  listeners_.push_back(std::make_unique<net::Listener>(
      loop_, fd, options_.backlog,
      [this](uv_stream_t* listener, int status) { on_connection(listener, status); }));
  return listeners_.back()->bound_address();
}

bool Server::close_listener(const std::string& bound_address) {
  const auto it = std::find_if(listeners_.begin(), listeners_.end(), [&](const auto& listener) {
    return listener->bound_address() == bound_address;
  });
  if (it == listeners_.end()) return false;
  (*it)->close();
  listeners_.erase(it);
  return true;
}

void Server::on_connection(uv_stream_t* listener, int status) {
  if (status < 0) {
    // libuv already shed one pending connection with its reserve descriptor on EMFILE.
    ++stats_.connections_refused;
    if (once_a_second(last_accept_error_log_ms_)) {
      spdlog::error("accept failed: {} (raise LimitNOFILE or lower server.max_connections)",
                    uv_strerror(status));
    }
    return;
  }
  // max_connections counts the connections of every server sharing these limits.
  if (shared_->connections_open.fetch_add(1, std::memory_order_relaxed) >=
      options_.max_connections) {
    shared_->connections_open.fetch_sub(1, std::memory_order_relaxed);
    refuse(listener);
    return;
  }
  auto* connection = new Connection(*this, next_connection_id_);
  next_connection_id_ += connection_id_step_;
  connection->next_ = connections_;
  if (connections_ != nullptr) connections_->prev_ = connection;
  connections_ = connection;
  ++stats_.connections_open;
  if (connection->start(listener) == 0) ++stats_.connections_accepted;
}

bool Server::once_a_second(std::uint64_t& last_ms) noexcept {
  // A flood of failing accepts must not become a flood of log lines.
  const std::uint64_t now = loop_.now_ms();
  if (last_ms != 0 && now - last_ms < 1000) return false;
  last_ms = now == 0 ? 1 : now;
  return true;
}

void Server::refuse(uv_stream_t* listener) {
  ++stats_.connections_refused;
  if (once_a_second(last_refusal_log_ms_)) {
    spdlog::warn("server.max_connections ({}) reached: refusing new connections",
                 options_.max_connections);
  }
  auto* refused = new RefusedConnection{};
  uv_tcp_init(loop_.uv(), &refused->tcp);
  refused->tcp.data = refused;
  if (uv_accept(listener, reinterpret_cast<uv_stream_t*>(&refused->tcp)) == 0) {
    // Best effort, one non-blocking write: the client may already be sending its request.
    std::string answer = "HTTP/1.1 503 Service Unavailable\r\nServer: " + options_.server_name +
                         "\r\nDate: " + std::string(date_.now()) +
                         "\r\nContent-Type: text/plain\r\nContent-Length: " +
                         std::to_string(kTooManyConnectionsBody.size()) +
                         "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" +
                         std::string(kTooManyConnectionsBody);
    uv_buf_t buf = uv_buf_init(answer.data(), static_cast<unsigned>(answer.size()));
    uv_try_write(reinterpret_cast<uv_stream_t*>(&refused->tcp), &buf, 1);
  }
  uv_close(reinterpret_cast<uv_handle_t*>(&refused->tcp),
           [](uv_handle_t* handle) { delete static_cast<RefusedConnection*>(handle->data); });
}

std::string& Server::cork_for(Connection* owner) {
  if (cork_owner_ != owner) {
    flush_cork();
    cork_owner_ = owner;
  }
  return cork_;
}

void Server::flush_cork() noexcept {
  if (cork_owner_ == nullptr) return;
  Connection* owner = cork_owner_;
  cork_owner_ = nullptr;
  owner->write_out(cork_);
}

void Server::forget_cork(Connection* owner) noexcept {
  if (cork_owner_ != owner) return;
  cork_.clear();
  cork_owner_ = nullptr;
}

Workspace* Server::acquire_workspace() {
  Workspace* workspace = free_workspaces_;
  if (workspace != nullptr) {
    free_workspaces_ = workspace->next_free;
    --free_workspace_count_;
  } else {
    workspace = new Workspace{};
    workspace->buffer = new char[workspace_capacity_];
    workspace->capacity = workspace_capacity_;
  }
  workspace->next_free = nullptr;
  workspace->begin = workspace->end = 0;
  return workspace;
}

void Server::release_workspace(Workspace* workspace) noexcept {
  workspace->request.clear();
  workspace->request.connection_ = nullptr;
  workspace->response_headers.clear();
  if (free_workspace_count_ >= kMaxFreeWorkspaces || workspace->capacity != workspace_capacity_) {
    delete[] workspace->buffer;
    delete workspace;
    return;
  }
  if (workspace->request.body_.capacity() > kMaxRetainedBodyCapacity) {
    std::string().swap(workspace->request.body_);
  }
  workspace->next_free = free_workspaces_;
  free_workspaces_ = workspace;
  ++free_workspace_count_;
}

void Server::connection_closed(Connection* connection) noexcept {
  if (connection->prev_ != nullptr) connection->prev_->next_ = connection->next_;
  if (connection->next_ != nullptr) connection->next_->prev_ = connection->prev_;
  if (connections_ == connection) connections_ = connection->next_;
  connection->prev_ = connection->next_ = nullptr;
  --stats_.connections_open;
  shared_->connections_open.fetch_sub(1, std::memory_order_relaxed);
  finish_drain_if_done();
}

void Server::drain(std::chrono::milliseconds deadline, std::function<void()> on_drained) {
  if (draining_) return;
  draining_.store(true, std::memory_order_relaxed);
  on_drained_ = std::move(on_drained);
  for (auto& listener : listeners_) listener->close();
  listeners_.clear();
  for (Connection* connection = connections_; connection != nullptr;) {
    Connection* next = connection->next_;
    connection->drain();
    connection = next;
  }
  if (connections_ != nullptr) {
    drain_timer_ = new uv_timer_t;
    uv_timer_init(loop_.uv(), drain_timer_);
    drain_timer_->data = this;
    uv_timer_start(
        drain_timer_,
        [](uv_timer_t* timer) {
          auto* self = static_cast<Server*>(timer->data);
          spdlog::warn("drain deadline ({} ms) passed with {} connections open; closing them",
                       self->drain_deadline_ms_, self->stats_.connections_open.load());
          self->close_all();
        },
        static_cast<std::uint64_t>(deadline.count()), 0);
    drain_deadline_ms_ = static_cast<std::uint64_t>(deadline.count());
  }
  finish_drain_if_done();
}

void Server::close_all() noexcept {
  for (auto& listener : listeners_) listener->close();
  listeners_.clear();
  for (Connection* connection = connections_; connection != nullptr;) {
    Connection* next = connection->next_;
    connection->close_now();
    connection = next;
  }
}

void Server::resume_output_waiters() noexcept {
  if (!output_waiters_ || resuming_output_waiters_ ||
      unsent_budget_.used > unsent_budget_.limit / 2) {
    return;
  }
  output_waiters_ = false;
  resuming_output_waiters_ = true;
  for (Connection* connection = connections_; connection != nullptr;) {
    Connection* next = connection->next_;
    if (connection->waiting_for_output_budget_) {
      connection->waiting_for_output_budget_ = false;
      connection->process();  // It may pause again, which sets output_waiters_ again.
    }
    connection = next;
  }
  resuming_output_waiters_ = false;
}

void Server::finish_drain_if_done() {
  if (!draining_ || connections_ != nullptr || !on_drained_) return;
  close_drain_timer();
  auto done = std::move(on_drained_);
  on_drained_ = nullptr;
  done();
}

}  // namespace squall::http
