// What a connection costs while idle, and its deadlines kept by one timer per loop.
#include "http/connection.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "http/http_test_client.hpp"
#include "squall/http/server.hpp"

using namespace squall;
using namespace std::chrono_literals;

namespace {

struct HandleCount {
  int timers = 0;  // Active uv_timer_t handles.
  int tcp = 0;     // uv_tcp_t handles not closing (listeners and connections).
};

HandleCount count_handles(Loop& loop) {
  HandleCount count;
  uv_walk(
      loop.uv(),
      [](uv_handle_t* handle, void* arg) {
        auto* counts = static_cast<HandleCount*>(arg);
        if (handle->type == UV_TIMER && uv_is_active(handle) != 0) ++counts->timers;
        if (handle->type == UV_TCP && uv_is_closing(handle) == 0) ++counts->tcp;
      },
      &count);
  return count;
}

}  // namespace

TEST_CASE("an idle connection is its socket and a few words: no buffer, parser or timer") {
  // The read buffer, the parser and the request live in a workspace lent while bytes are in
  // flight; deadlines are list entries of the loop's one timer.
  // The socket is a UvHandle: a pointer here to the uv_tcp_t, allocated beside its Loop record.
  static_assert(sizeof(http::Connection) <= sizeof(void*) + 64);
}

TEST_CASE("idle keep-alive connections share one timer and each still times out") {
  constexpr int kConnections = 20;
  http::Router router;
  router.add("GET", "/x", [](http::Request&, http::Responder responder) {
    responder.send(200, "text/plain", "x");
  });
  http::ServerOptions options;
  options.timeouts.keepalive = 300ms;
  Loop loop;
  HandleCount while_idle;
  std::atomic<int> closed_by_server{0};
  std::atomic<int> answered{0};
  {
    http::Server server(loop, std::make_shared<const http::Router>(router), options);
    server.listen("127.0.0.1", 0);
    const std::uint16_t port = server.listeners().front()->bound_port();
    std::thread thread([&] {
      std::vector<std::unique_ptr<testing::Client>> clients;
      for (int i = 0; i < kConnections; ++i) {
        clients.push_back(std::make_unique<testing::Client>(port));
        clients.back()->send("GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
        if (clients.back()->read_response().find("200 OK") != std::string::npos) ++answered;
      }
      std::atomic<bool> counted{false};
      loop.call_soon([&] {
        while_idle = count_handles(loop);
        counted = true;
      });
      while (!counted) std::this_thread::sleep_for(1ms);
      // Every connection is closed by its keep-alive deadline: read_all returns at the EOF.
      const auto started = std::chrono::steady_clock::now();
      for (auto& client : clients) {
        client->read_all();
        if (std::chrono::steady_clock::now() - started < 5s) ++closed_by_server;
      }
      loop.call_soon([&] {
        server.close_all();
        loop.stop();
      });
    });
    const auto watchdog = loop.call_later(10s, [&] {
      server.close_all();
      loop.stop();
    });
    loop.run();
    loop.cancel(watchdog);
    thread.join();
    CHECK(server.stats().connections_open == 0);
  }
  CHECK(loop.close() == 0);
  CHECK(answered == kConnections);
  CHECK(while_idle.tcp == kConnections + 1);  // The listener and the idle connections.
  // The watchdog and the connections' one timer; a timer per connection would be 21 or more.
  CHECK(while_idle.timers <= 2);
  CHECK(closed_by_server == kConnections);
}
