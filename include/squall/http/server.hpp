// The HTTP/1.1 server: listeners, the open connections, and what they share on the loop thread
// (options, counters, the cork buffer, the pool of read workspaces, the Date cache, deadlines),
// kept in a private per-loop context (lib/http/connection_context.hpp).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <uv.h>

#include "squall/core/clock.hpp"
#include "squall/core/loop.hpp"
#include "squall/core/uv_handle.hpp"
#include "squall/http/limits.hpp"
#include "squall/http/request.hpp"
#include "squall/http/router.hpp"
#include "squall/net/listener.hpp"

namespace squall::http {

class ConnectionContext;

struct ServerOptions {
  Limits limits;                                      // Per-request bounds.
  Timeouts timeouts;                                  // Per-phase timeouts.
  std::string server_name = "squall";                 // The Server header.
  std::size_t max_connections = 10000;                // Beyond it, new ones are refused.
  int backlog = 511;                                  // listen(2) backlog.
  std::chrono::milliseconds blocking_threshold{100};  // Warn when a handler blocks longer.
};

// What the server reports once per answered request (and per error response). An answer given
// inside the handler call is reported when the handler returns: its duration runs to then.
struct RequestRecord {
  const Request* request;             // Valid during the callback; fields may be empty on errors.
  std::string_view route;             // The route's pattern, or "" when none matched.
  int status;                         // The status sent.
  std::uint64_t body_bytes_sent;      // Response body bytes (0 for HEAD).
  std::chrono::nanoseconds duration;  // From the request's first byte to its answer queued.
  std::uint64_t connection_id;        // Also in the server's log lines.
};

// A count that only its loop thread changes and any thread may read (metrics summed over
// several loops): relaxed atomic loads and stores, no read-modify-write, so an increment costs
// what it costs on a plain integer.
class LoopCounter {
 public:
  LoopCounter& operator+=(std::uint64_t n) noexcept {
    value_.store(value_.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
    return *this;
  }
  LoopCounter& operator++() noexcept { return *this += 1; }
  LoopCounter& operator--() noexcept {
    value_.store(value_.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
    return *this;
  }
  std::uint64_t load() const noexcept { return value_.load(std::memory_order_relaxed); }
  operator std::uint64_t() const noexcept { return load(); }

 private:
  std::atomic<std::uint64_t> value_{0};
};

// Counters written on the loop thread, read by the metrics endpoint from any thread.
struct ServerStats {
  LoopCounter connections_accepted;  // Accepted and served.
  LoopCounter connections_refused;   // Closed at once: over max_connections or accept error.
  LoopCounter connections_open;      // Open now.
  LoopCounter bytes_received;        // From all clients.
  LoopCounter bytes_sent;            // To all clients.
  LoopCounter requests;              // Requests answered (including error responses).
  LoopCounter workspaces_created;    // Request workspaces (read buffer, parser) built.
  LoopCounter spare_workspaces;      // Workspaces kept for reuse now (not a running total).
};

// What the servers of one process share when each runs on its own loop (workers), so that
// their limits hold for all of them together: the two memory budgets and the count of open
// connections that max_connections bounds. A lone server has its own.
struct SharedLimits {
  MemoryBudget bodies;                             // limits.max_buffered_body_bytes.
  MemoryBudget unsent;                             // limits.max_unsent_bytes.
  std::atomic<std::uint64_t> connections_open{0};  // Against max_connections.
};

class Server {
 public:
  Server(Loop& loop, std::shared_ptr<const Router> router, ServerOptions options);
  // A server that shares its budgets and connection count with others (one per worker loop).
  Server(Loop& loop, std::shared_ptr<const Router> router, ServerOptions options,
         std::shared_ptr<SharedLimits> shared);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Starts listening on host:port (port 0 picks a free one). Throws std::system_error naming
  // the address. Returns the bound address, e.g. "127.0.0.1:41234".
  std::string listen(const std::string& host, std::uint16_t port);
  // Starts accepting on an inherited, already listening socket (systemd socket activation).
  // Throws std::system_error if it is not a listening TCP socket.
  std::string adopt_listener(int fd);
  // Stops accepting on the listener bound to `bound_address`, having first accepted the
  // connections already waiting in its queue (which the kernel would otherwise reset); returns
  // whether one was found.
  bool close_listener(const std::string& bound_address);
  const std::vector<std::unique_ptr<net::Listener>>& listeners() const noexcept {
    return listeners_;
  }

  // Routes for requests that start from now on; requests already dispatched keep theirs.
  void set_router(std::shared_ptr<const Router> router);
  // New limits, timeouts and names for what happens from now on (SIGHUP reload). Connections
  // pick them up at their next check; the read buffer size applies to buffers taken later.
  void reconfigure(ServerOptions options);

  // Connection ids (in log lines) start at `first` and grow by `step`, so that the servers of
  // several loops (workers i of n: i + 1, n) never give two connections the same id. Before
  // serving.
  void number_connections(std::uint64_t first, std::uint64_t step) noexcept {
    next_connection_id_ = first;
    connection_id_step_ = step;
  }

  // Called for every answered request; set before serving.
  void on_request(std::function<void(const RequestRecord&)> observer);

  // Graceful stop: stop accepting (the connections already queued on the listeners are
  // accepted first, then the listeners close), close connections idle between requests now,
  // let the others send and finish their current request (answered with Connection: close);
  // after `deadline` close whatever is left. `on_drained` runs once no connection is left; it
  // may destroy the server (it runs after the server's last step on the way there). Destroying
  // the server during a drain abandons it: `on_drained` is then never called.
  // With `keep_listening`, the listeners stay open until stop_listening() (what they accept
  // meanwhile is answered with Connection: close), and `on_drained` waits for that too.
  void drain(std::chrono::milliseconds deadline, std::function<void()> on_drained,
             bool keep_listening = false);
  // Accepts what the listeners still queue and closes them (the second step of a drain that
  // kept listening).
  void stop_listening() noexcept;
  // Closes every listener and connection at once.
  void close_all() noexcept;
  bool draining() const noexcept;

  const ServerStats& stats() const noexcept;
  // Body bytes buffered by all connections, and response bytes written but not yet taken by
  // the clients, with their limits (limits.max_buffered_body_bytes, limits.max_unsent_bytes).
  const MemoryBudget& body_budget() const noexcept;
  const MemoryBudget& unsent_budget() const noexcept;
  const ServerOptions& options() const noexcept;
  // For another server that is to share them (constructed on its own loop).
  const std::shared_ptr<SharedLimits>& shared_limits() const noexcept;
  Loop& loop() noexcept { return loop_; }

 private:
  void on_connection(uv_stream_t* listener, int status);
  // Starts a connection on what `accept` (the libuv listener's or a waiting descriptor) gives.
  template <typename Accept>
  void admit(Accept accept);
  // Accepts what waits in `listener`'s queue, then closes it.
  void close_after_accepting(net::Listener& listener) noexcept;
  // Answers 503 on a connection over max_connections, which then closes.
  void refuse(uv_tcp_t* refused);
  void log_accept_error(int status);
  void finish_drain_if_done();
  void close_drain_timer() noexcept;

  Loop& loop_;                                             // The loop every connection lives on.
  std::unique_ptr<ConnectionContext> context_;             // What the connections share.
  std::vector<std::unique_ptr<net::Listener>> listeners_;  // Accepting sockets.
  std::uint64_t next_connection_id_ = 1;                   // Ids in log lines; never reused.
  std::uint64_t connection_id_step_ = 1;                   // Added to it per connection.
  std::function<void()> on_drained_;            // Runs once when the last connection closes.
  Loop::TimerId drain_timer_ = 0;               // The drain deadline, 0 when none.
  std::uint64_t drain_deadline_ms_ = 0;         // For the log line when it passes.
  std::uint64_t last_accept_error_log_ms_ = 0;  // Accept errors are logged once a second.
  std::uint64_t last_refusal_log_ms_ = 0;       // So are max_connections refusals.
};

}  // namespace squall::http
