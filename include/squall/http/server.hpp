// The HTTP/1.1 server: listeners, the open connections, and what they share on the loop thread
// (options, counters, the cork buffer, the pool of read workspaces, the Date cache, deadlines),
// kept in a private per-loop context (lib/http/connection_context.hpp).
#pragma once

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

// What the server reports once per answered request (and per error response).
struct RequestRecord {
  const Request* request;             // Valid during the callback; fields may be empty on errors.
  std::string_view route;             // The route's pattern, or "" when none matched.
  int status;                         // The status sent.
  std::uint64_t body_bytes_sent;      // Response body bytes (0 for HEAD).
  std::chrono::nanoseconds duration;  // From the request's first byte to its answer queued.
  std::uint64_t connection_id;        // Also in the server's log lines.
};

// Loop-thread counters, read by the metrics endpoint.
struct ServerStats {
  std::uint64_t connections_accepted = 0;  // Accepted and served.
  std::uint64_t connections_refused = 0;   // Closed at once: over max_connections or accept error.
  std::uint64_t connections_open = 0;      // Open now.
  std::uint64_t bytes_received = 0;        // From all clients.
  std::uint64_t bytes_sent = 0;            // To all clients.
  std::uint64_t requests = 0;              // Requests answered (including error responses).
};

class Server {
 public:
  Server(Loop& loop, std::shared_ptr<const Router> router, ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Starts listening on host:port (port 0 picks a free one). Throws std::system_error naming
  // the address. Returns the bound address, e.g. "127.0.0.1:41234".
  std::string listen(const std::string& host, std::uint16_t port);
  // Starts accepting on an inherited, already listening socket (systemd socket activation).
  // Throws std::system_error if it is not a listening TCP socket.
  std::string adopt_listener(int fd);
  // Stops accepting on the listener bound to `bound_address`; returns whether one was found.
  bool close_listener(const std::string& bound_address);
  const std::vector<std::unique_ptr<net::Listener>>& listeners() const noexcept {
    return listeners_;
  }

  // Routes  // Routes for requests that start from now on; requests already dispatched keep theirs.
  void set_router(std::shared_ptr<const Router> router);
  // New limits, timeouts and names for what happens from now on (SIGHUP reload). Connections
  // pick them up at their next check; the read buffer size applies to buffers taken later.
  void reconfigure(ServerOptions options);

  // Called for every answered request; set before serving.
  void on_request(std::function<void(const RequestRecord&)> observer);

  // Graceful stop: stop accepting, close idle connections now, let in-flight requests finish
  // (answering with Connection: close); after `deadline` close whatever is left. `on_drained`
  // runs once no connection is left.
  void drain(std::chrono::milliseconds deadline, std::function<void()> on_drained);
  // Closes every listener and connection at once.
  void close_all() noexcept;
  bool draining() const noexcept;

  const ServerStats& stats() const noexcept;
  // Body bytes buffered by all connections, and response bytes written but not yet taken by
  // the clients, with their limits (limits.max_buffered_body_bytes, limits.max_unsent_bytes).
  const MemoryBudget& body_budget() const noexcept;
  const MemoryBudget& unsent_budget() const noexcept;
  const ServerOptions& options() const noexcept;
  Loop& loop() noexcept { return loop_; }

 private:
  void on_connection(uv_stream_t* listener, int status);
  void refuse(uv_stream_t* listener);
  void finish_drain_if_done();
  void close_drain_timer() noexcept;

  Loop& loop_;                                             // The loop every connection lives on.
  std::unique_ptr<ConnectionContext> context_;             // What the connections share.
  std::vector<std::unique_ptr<net::Listener>> listeners_;  // Accepting sockets.
  std::uint64_t next_connection_id_ = 1;                   // Ids in log lines; never reused.
  std::function<void()> on_drained_;            // Runs once when the last connection closes.
  Loop::TimerId drain_timer_ = 0;               // The drain deadline, 0 when none.
  std::uint64_t drain_deadline_ms_ = 0;         // For the log line when it passes.
  std::uint64_t last_accept_error_log_ms_ = 0;  // Accept errors are logged once a second.
  std::uint64_t last_refusal_log_ms_ = 0;       // So are max_connections refusals.
};

}  // namespace squall::http
