// In-process tests: a real Server on a real loop, a blocking client on a thread, a watchdog.
#include "squall/http/server.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <functional>
#include <future>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "core/handle_lifetime.hpp"
#include "http/http_test_client.hpp"
#include "squall/core/awaitables.hpp"
#include "squall/core/task.hpp"

using namespace squall;
using namespace std::chrono_literals;

namespace {

using squall::testing::Client;

// Runs `client` on a thread against a server on `router`, with the loop on this thread; a
// watchdog fails the test if the client does not finish in 10 s.
void run_with_client(Loop& loop, http::Router& router,
                     const std::function<void(std::uint16_t)>& client,
                     http::ServerOptions options = {}) {
  {
    http::Server server(loop, std::make_shared<const http::Router>(router), options);
    server.listen("127.0.0.1", 0);
    const std::uint16_t port = server.listeners().front()->bound_port();
    std::atomic<bool> finished{false};
    std::thread thread([&] {
      client(port);
      finished = true;
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
    CHECK(finished);
  }
  CHECK(loop.close() == 0);
}

const std::string kGet = "GET /x HTTP/1.1\r\nHost: t\r\n\r\n";

}  // namespace

TEST_CASE("a handler may answer later, from a timer on the loop") {
  http::Router router;
  Loop* loop_ptr = nullptr;
  router.add("GET", "/x", [&](http::Request& request, http::Responder responder) {
    std::string body = "late " + std::string(request.path());
    loop_ptr->call_later(20ms, [responder, body] {
      CHECK(responder.connected());
      responder.send(200, "text/plain", body);
    });
  });
  Loop loop;
  loop_ptr = &loop;
  {
    http::Server server(loop, std::make_shared<const http::Router>(router), {});
    server.listen("127.0.0.1", 0);
    const std::uint16_t port = server.listeners().front()->bound_port();
    std::string reply;
    std::thread thread([&] {
      Client client(port);
      client.send(kGet + kGet);  // Pipelined: the second waits for the first's late answer.
      reply = client.read_until("late /x", 2);
      loop.call_soon([&] {
        server.close_all();
        loop.stop();
      });
    });
    loop.run();
    thread.join();
    CHECK(reply.find("HTTP/1.1 200 OK") == 0);
    CHECK(reply.rfind("HTTP/1.1 200 OK") > 0);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("a late answer to a client that went away is dropped safely") {
  http::Router router;
  Loop loop;
  std::atomic<int> sends_refused{0};
  std::atomic<bool> answered{false};
  router.add("GET", "/x", [&](http::Request&, http::Responder responder) {
    loop.call_later(100ms, [&, responder]() mutable {
      if (!responder.send(200, "text/plain", "too late")) ++sends_refused;
      answered = true;
    });
  });
  router.add("GET", "/ok", [](http::Request&, http::Responder responder) {
    responder.send(200, "text/plain", "fine");
  });
  {
    http::Server server(loop, std::make_shared<const http::Router>(router), {});
    server.listen("127.0.0.1", 0);
    const std::uint16_t port = server.listeners().front()->bound_port();
    std::string second;
    std::thread thread([&] {
      {
        Client client(port);
        client.send(kGet);
      }  // Closed before the answer.
      while (!answered) std::this_thread::sleep_for(5ms);
      Client again(port);
      again.send("GET /ok HTTP/1.1\r\nHost: t\r\n\r\n");
      second = again.read_until("fine");
      loop.call_soon([&] {
        server.close_all();
        loop.stop();
      });
    });
    loop.run();
    thread.join();
    CHECK(sends_refused == 1);
    CHECK(second.find("200 OK") != std::string::npos);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("blocking work runs on the pool and the answer comes back on the loop") {
  http::Router router;
  Loop loop;
  const auto loop_thread = std::this_thread::get_id();
  std::atomic<bool> work_on_pool{false};
  std::atomic<bool> done_on_loop{false};
  router.add("GET", "/x", [&](http::Request&, http::Responder responder) {
    auto result = std::make_shared<std::string>();
    loop.run_blocking(
        [&, result] {
          work_on_pool = std::this_thread::get_id() != loop_thread;
          std::this_thread::sleep_for(20ms);  // Stands in for an SMTP exchange.
          *result = "from the pool";
        },
        [&, responder, result](std::exception_ptr error) {
          done_on_loop = std::this_thread::get_id() == loop_thread && error == nullptr;
          responder.send(200, "text/plain", *result);
        });
  });
  run_with_client(loop, router, [](std::uint16_t port) {
    Client client(port);
    client.send(kGet);
    CHECK(client.read_until("from the pool").find("200 OK") != std::string::npos);
  });
  CHECK(work_on_pool);
  CHECK(done_on_loop);
}

TEST_CASE("a handler that throws becomes a 500 and the connection goes on") {
  Loop loop;
  http::Router router;
  router.add("GET", "/x",
             [](http::Request&, http::Responder) { throw std::runtime_error("boom"); });
  router.add("GET", "/ok", [](http::Request&, http::Responder responder) {
    responder.send(200, "text/plain", "fine");
  });
  run_with_client(loop, router, [](std::uint16_t port) {
    Client client(port);
    client.send(kGet + "GET /ok HTTP/1.1\r\nHost: t\r\n\r\n");
    const std::string reply = client.read_until("fine");
    CHECK(reply.find("HTTP/1.1 500 Internal Server Error") == 0);
    CHECK(reply.find("HTTP/1.1 200 OK") != std::string::npos);
  });
}

TEST_CASE("a handler that drops its Responder unanswered gives a 500") {
  Loop loop;
  http::Router router;
  router.add("GET", "/x", [](http::Request&, http::Responder) {});
  run_with_client(loop, router, [](std::uint16_t port) {
    Client client(port);
    client.send(kGet);
    CHECK(client.read_until("internal server error").find("500") != std::string::npos);
  });
}

TEST_CASE("response headers with CR or LF are refused at the API") {
  Loop loop;
  http::Router router;
  router.add("GET", "/x", [](http::Request&, http::Responder responder) {
    CHECK_THROWS_AS(responder.header("X-Bad", "a\r\nInjected: 1"), std::invalid_argument);
    CHECK_THROWS_AS(responder.header("Bad Name", "v"), std::invalid_argument);
    responder.header("X-Good", "yes").send(200, "text/plain", "ok");
  });
  run_with_client(loop, router, [](std::uint16_t port) {
    Client client(port);
    client.send(kGet);
    const std::string reply = client.read_until("\r\n\r\nok");
    CHECK(reply.find("X-Good: yes\r\n") != std::string::npos);
    CHECK(reply.find("Injected") == std::string::npos);
  });
}

TEST_CASE("streamed responses are chunked for HTTP/1.1 and close-delimited for HTTP/1.0") {
  Loop loop;
  http::Router router;
  router.add("GET", "/x", [](http::Request&, http::Responder responder) {
    responder.start(200, "text/plain");
    responder.write("hello ");
    responder.write("world");
    responder.finish();
  });
  run_with_client(loop, router, [](std::uint16_t port) {
    Client client(port);
    client.send(kGet);
    const std::string reply = client.read_until("0\r\n\r\n");
    CHECK(reply.find("Transfer-Encoding: chunked\r\n") != std::string::npos);
    CHECK(reply.find("\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n") != std::string::npos);
    Client old(port);
    old.send("GET /x HTTP/1.0\r\n\r\n");
    const std::string reply10 = old.read_all();
    CHECK(reply10.find("Connection: close\r\n") != std::string::npos);
    CHECK(reply10.find("Transfer-Encoding") == std::string::npos);
    CHECK(reply10.substr(reply10.size() - 11) == "hello world");
  });
}

TEST_CASE("call_soon is safe from other threads") {
  Loop loop;
  std::atomic<int> ran{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 250; ++i) loop.call_soon([&] { ++ran; });
    });
  }
  for (auto& thread : threads) thread.join();
  loop.call_soon([&] { loop.stop(); });
  loop.run();
  CHECK(ran == 1000);
  CHECK(loop.close() == 0);
}

TEST_CASE("drain answers the connections waiting in the listen queue, with Connection: close") {
  // Connected before the loop ever ran: they wait in the kernel's accept queue, which the kernel
  // resets when the listener closes, unless drain accepts them first. One has sent its request,
  // the other sends it only after the drain began; both get it answered.
  http::Router router;
  router.add("GET", "/x", [](http::Request&, http::Responder responder) {
    responder.send(200, "text/plain", "answered");
  });
  Loop loop;
  {
    http::Server server(loop, std::make_shared<const http::Router>(router), {});
    server.listen("127.0.0.1", 0);
    const std::uint16_t port = server.listeners().front()->bound_port();
    Client early(port);
    Client late(port);
    early.send(kGet);
    bool drained = false;
    server.drain(5s, [&] {
      drained = true;
      loop.stop();
    });
    CHECK(server.listeners().empty());
    CHECK(server.stats().connections_open == 2);
    std::string early_reply;
    std::string late_reply;
    std::thread thread([&] {
      late.send(kGet);
      early_reply = early.read_all();
      late_reply = late.read_all();
    });
    loop.run();
    thread.join();
    CHECK(drained);
    for (const std::string& reply : {early_reply, late_reply}) {
      CHECK(reply.find("HTTP/1.1 200 OK") == 0);
      CHECK(reply.find("Connection: close\r\n") != std::string::npos);
      CHECK(reply.find("answered") != std::string::npos);
    }
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("a drain that keeps listening answers with Connection: close until stop_listening") {
  http::Router router;
  router.add("GET", "/x", [](http::Request&, http::Responder responder) {
    responder.send(200, "text/plain", "answered");
  });
  Loop loop;
  {
    http::Server server(loop, std::make_shared<const http::Router>(router), {});
    server.listen("127.0.0.1", 0);
    const std::uint16_t port = server.listeners().front()->bound_port();
    bool drained = false;
    auto on_drained = [&] {
      drained = true;
      loop.stop();
    };
    server.drain(5s, on_drained, true);
    CHECK(server.listeners().size() == 1);
    CHECK_FALSE(drained);  // No connection, but still listening.
    std::string reply;
    std::thread thread([&] {
      {
        Client client(port);
        client.send(kGet);
        reply = client.read_all();
      }
      loop.call_soon([&] {
        CHECK_FALSE(drained);  // Whatever the connection does, the listener is open.
        server.stop_listening();
        CHECK(server.listeners().empty());
      });
    });
    loop.run();
    thread.join();
    CHECK(reply.find("HTTP/1.1 200 OK") == 0);
    CHECK(reply.find("Connection: close\r\n") != std::string::npos);
    CHECK(drained);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("drain closes idle connections at once and lets in-flight ones finish") {
  http::Router router;
  Loop loop;
  http::Server* server_ptr = nullptr;
  bool drained = false;
  // The in-flight answer waits until the idle connection is gone: if drain did not close it,
  // the answer never comes before the drain deadline closes everything.
  std::function<void(http::Responder)> answer_once_idle_closed = [&](http::Responder responder) {
    if (server_ptr->stats().connections_open > 1) {
      loop.call_later(5ms, [&, responder] { answer_once_idle_closed(responder); });
      return;
    }
    responder.send(200, "text/plain", "last");
  };
  router.add("GET", "/x", [&](http::Request&, http::Responder responder) {
    server_ptr->drain(5s, [&] {
      drained = true;
      loop.stop();
    });
    answer_once_idle_closed(responder);
  });
  {
    http::Server server(loop, std::make_shared<const http::Router>(router), {});
    server_ptr = &server;
    server.listen("127.0.0.1", 0);
    const std::uint16_t port = server.listeners().front()->bound_port();
    std::string idle_reply;
    std::string busy_reply;
    std::thread thread([&] {
      Client idle(port);
      Client busy(port);
      idle.send("GET /none HTTP/1.1\r\nHost: t\r\n\r\n");
      idle.read_until("not found");
      busy.send(kGet);
      busy_reply = busy.read_all();
      idle_reply = idle.read_all();
    });
    loop.run();
    thread.join();
    CHECK(drained);
    CHECK(busy_reply.find("Connection: close\r\n") != std::string::npos);
    CHECK(busy_reply.find("last") != std::string::npos);
    // The idle connection got its one answer, then the close (EOF), nothing more.
    CHECK(idle_reply.find("not found\n") == idle_reply.size() - 10);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("an inherited listening socket is adopted; anything else is refused") {
  Loop loop;
  http::Router router;
  router.add("GET", "/x", [](http::Request&, http::Responder responder) {
    responder.send(200, "text/plain", "adopted");
  });
  http::Server server(loop, std::make_shared<const http::Router>(router), {});
  const int not_listening = ::socket(AF_INET, SOCK_STREAM, 0);
  CHECK_THROWS_AS(server.adopt_listener(not_listening), std::system_error);
  ::close(not_listening);

  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  REQUIRE(::listen(fd, 16) == 0);
  const std::string bound = server.adopt_listener(fd);
  CHECK(bound.rfind("127.0.0.1:", 0) == 0);
  const std::uint16_t port = server.listeners().back()->bound_port();
  std::string reply;
  std::thread thread([&] {
    Client client(port);
    client.send(kGet);
    reply = client.read_until("adopted");
    loop.call_soon([&] {
      CHECK(server.close_listener(bound));
      CHECK_FALSE(server.close_listener(bound));
      server.close_all();
      loop.stop();
    });
  });
  loop.run();
  thread.join();
  CHECK(reply.find("200 OK") != std::string::npos);
}

TEST_CASE("a pipelined request gets its own body deadline, not the one before it") {
  // A's body began at t=0; B's head and first body byte arrive with A's last byte at 0.6 s,
  // in one read. B must have timeouts.body (1 s) from its own head: its last byte at 1.2 s is
  // in time, although A's deadline (1 s) has passed.
  http::Router router;
  router.add("POST", "/x", [](http::Request& request, http::Responder responder) {
    responder.send(200, "text/plain", std::string(request.body()));
  });
  http::ServerOptions options;
  options.timeouts.body = 1s;
  Loop loop;
  std::string reply;
  run_with_client(
      loop, router,
      [&](std::uint16_t port) {
        Client client(port);
        client.send("POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\na");
        std::this_thread::sleep_for(600ms);
        client.send("A" + std::string("POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nb"));
        std::this_thread::sleep_for(600ms);
        client.send("B");
        reply = client.read_until("\r\n\r\nbB");
      },
      options);
  CHECK(reply.find("HTTP/1.1 200 OK") == 0);
  CHECK(reply.find("408") == std::string::npos);
  CHECK(reply.ends_with("\r\n\r\nbB"));
}

namespace {

std::atomic<int> thread_violations{0};
std::string last_violation;  // Written by the handler, read after the thread joined.

void record_violation(const char* message) {
  ++thread_violations;
  last_violation = message;
}

}  // namespace

TEST_CASE("copying or dropping a Responder off the loop thread is caught") {
  const auto previous = http::set_thread_violation_handler(&record_violation);
  thread_violations = 0;
  http::Router router;
  router.add("GET", "/x", [&](http::Request&, http::Responder responder) {
    // The loop waits for the thread, so the counts are not raced here; the check must still
    // report both the copy and its destruction.
    std::thread([&responder] { http::Responder copy = responder; }).join();
    responder.send(200, "text/plain", "ok");
  });
  Loop loop;
  std::string reply;
  run_with_client(loop, router, [&](std::uint16_t port) {
    Client client(port);
    client.send(kGet);
    reply = client.read_until("ok");
  });
  http::set_thread_violation_handler(previous);
  CHECK(reply.find("HTTP/1.1 200 OK") == 0);
  CHECK(thread_violations == 2);
  CHECK(last_violation.find("was destroyed off the loop thread") != std::string::npos);
}

TEST_CASE("Responders copied and dropped on the loop thread raise no violation") {
  const auto previous = http::set_thread_violation_handler(&record_violation);
  thread_violations = 0;
  http::Router router;
  Loop* loop_ptr = nullptr;
  router.add("GET", "/x", [&](http::Request&, http::Responder responder) {
    // The pattern squalld uses: the pool gets data only; the Responder waits on the loop.
    auto parked = std::make_shared<http::Responder>(responder);
    auto result = std::make_shared<std::string>();
    loop_ptr->run_blocking(
        [result] { *result = "from the pool"; },
        [parked, result](std::exception_ptr) { parked->send(200, "text/plain", *result); });
  });
  Loop loop;
  loop_ptr = &loop;
  std::string reply;
  run_with_client(loop, router, [&](std::uint16_t port) {
    Client client(port);
    client.send(kGet);
    reply = client.read_until("from the pool");
  });
  http::set_thread_violation_handler(previous);
  CHECK(reply.find("from the pool") != std::string::npos);
  CHECK(thread_violations == 0);
}

TEST_CASE(
    "a server's listeners and drain timer are closed once, whether it or its loop ends first") {
  auto router = std::make_shared<http::Router>();
  testing::check_every_end_order([&](Loop& loop) {
    auto server = std::make_unique<http::Server>(loop, router, http::ServerOptions{});
    server->listen("127.0.0.1", 0);
    server->listen("127.0.0.1", 0);
    return server;
  });
  testing::check_every_end_order([&](Loop& loop) {
    auto server = std::make_unique<http::Server>(loop, router, http::ServerOptions{});
    server->listen("127.0.0.1", 0);
    server->drain(std::chrono::hours(1), [] {});  // Drained at once: no connection is open.
    return server;
  });
}

namespace {

// A server with one connection, for the end-order tests: its handlers hold their Responders in
// `held`, the client is a blocking socket. The destructor drops the Responders and the server in
// either order (`server_first`).
struct OneConnection {
  enum class Kind {
    idle,       // Its request was answered; waiting for the next (keep-alive).
    partial,    // Half a request head arrived.
    held,       // The handler keeps its Responder without answering.
    coroutine,  // A coroutine handler sleeps: Loop::close() destroys its frame, whose dropped
                // Responder answers 500 while the loop closes the socket.
  };
  std::shared_ptr<std::vector<http::Responder>> held =
      std::make_shared<std::vector<http::Responder>>();
  std::shared_ptr<int> handled = std::make_shared<int>(0);
  std::unique_ptr<http::Server> server;
  int client = -1;
  bool server_first = false;

  OneConnection() = default;
  OneConnection(const OneConnection&) = delete;
  OneConnection& operator=(const OneConnection&) = delete;
  ~OneConnection() {
    if (server_first) server.reset();
    held->clear();
    server.reset();
    if (client >= 0) ::close(client);
  }
};

Task<void> sleep_then_answer(Loop& loop, http::Responder responder, std::shared_ptr<int> handled) {
  ++*handled;
  co_await sleep(loop, 1h);
  responder.send(200, "text/plain", "late\n");
}

// A connected server on `loop` whose one connection is in the state `kind` names.
std::unique_ptr<OneConnection> one_connection(Loop& loop, OneConnection::Kind kind,
                                              bool server_first) {
  using Kind = OneConnection::Kind;
  auto owner = std::make_unique<OneConnection>();
  owner->server_first = server_first;
  auto router = std::make_shared<http::Router>();
  router->add(
      "GET", "/hold",
      [held = owner->held, handled = owner->handled](http::Request&, http::Responder responder) {
        held->push_back(std::move(responder));
        ++*handled;
      });
  router->add("GET", "/now", [handled = owner->handled](http::Request&, http::Responder responder) {
    responder.send(200, "text/plain", "now\n");
    ++*handled;
  });
  router->add("GET", "/sleep",
              [&loop, handled = owner->handled](http::Request&, http::Responder responder) {
                return sleep_then_answer(loop, std::move(responder), handled);
              });
  owner->server = std::make_unique<http::Server>(loop, router, http::ServerOptions{});
  owner->server->listen("127.0.0.1", 0);
  const std::uint16_t bound = owner->server->listeners().front()->bound_port();
  owner->client = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(bound);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(owner->client, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  const std::string request = kind == Kind::idle      ? "GET /now HTTP/1.1\r\nHost: x\r\n\r\n"
                              : kind == Kind::partial ? "GET /now HTTP/1.1\r\nHo"
                              : kind == Kind::held    ? "GET /hold HTTP/1.1\r\nHost: x\r\n\r\n"
                                                      : "GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n";
  REQUIRE(::write(owner->client, request.data(), request.size()) ==
          static_cast<ssize_t>(request.size()));
  if (kind == Kind::partial) {
    while (owner->server->stats().bytes_received < request.size()) {
      uv_run(loop.uv(), UV_RUN_ONCE);
    }
  } else {
    while (*owner->handled == 0) uv_run(loop.uv(), UV_RUN_ONCE);
  }
  REQUIRE(owner->server->stats().connections_open == 1);
  return owner;
}

}  // namespace

TEST_CASE("a connection is closed once and freed in every order of its server and loop ending") {
  // The connection owns its socket through a UvHandle: whether the Server (and the Responders
  // held by the application, before or after it) ends before Loop::close(), after it, or after
  // the Loop is gone, the socket is closed once (libuv aborts on a second close), the connection
  // is freed (LeakSanitizer), and nothing touches it or the Loop afterwards (AddressSanitizer).
  using Kind = OneConnection::Kind;
  for (const Kind kind : {Kind::idle, Kind::partial, Kind::held, Kind::coroutine}) {
    for (const bool server_first : {false, true}) {
      INFO("connection state " << static_cast<int>(kind) << ", server destroyed before the "
                               << "Responders: " << server_first);
      testing::check_every_end_order(
          [&](Loop& loop) { return one_connection(loop, kind, server_first); });
    }
  }
}

TEST_CASE("a Responder dropped after Loop::close() frees its connection without answering") {
  // Loop::close() closed the socket and with it the connection: the Responder dropped later
  // finds it closed (no 500 is written on a closed socket) and deletes it, outside any frame
  // of the connection.
  Loop loop;
  auto owner = one_connection(loop, OneConnection::Kind::held, false);
  REQUIRE(owner->held->size() == 1);
  const http::Responder& responder = owner->held->front();
  CHECK(responder.connected());
  CHECK(loop.close() == 0);
  CHECK_FALSE(responder.connected());
  CHECK_FALSE(responder.send(200, "text/plain", "too late\n"));
  CHECK(owner->server->stats().connections_open == 0);
  owner->held->clear();
  CHECK(owner->server->stats().connections_open == 0);
  owner.reset();
}

TEST_CASE("a coroutine handler's Responder dropped by Loop::close() answers 500 safely") {
  // Loop::close() destroys the suspended handler first: its Responder, dropped unanswered,
  // writes a 500 on the still open socket, which the loop then closes. The client reads the 500
  // or an end of stream, never a hang, and the connection is freed exactly once.
  Loop loop;
  auto owner = one_connection(loop, OneConnection::Kind::coroutine, false);
  CHECK(loop.close() == 0);
  CHECK(owner->server->stats().connections_open == 0);
  std::string received;
  char buffer[512];
  ssize_t n = 0;
  while ((n = ::read(owner->client, buffer, sizeof buffer)) > 0) {
    received.append(buffer, static_cast<std::size_t>(n));
  }
  CHECK((received.empty() || received.find("HTTP/1.1 500") == 0));
  owner.reset();
}

TEST_CASE("a draining server with a busy connection ends before or after Loop::close()") {
  // A request whose handler has not answered keeps the drain (and its timer) waiting. The server
  // is destroyed before Loop::close(), after it, or after the Loop is gone: its drain timer and
  // its connection's socket are closed once, and the connection is freed.
  for (const bool server_first : {false, true}) {
    INFO("server destroyed before the Responders: " << server_first);
    testing::check_every_end_order([&](Loop& loop) {
      auto owner = one_connection(loop, OneConnection::Kind::held, server_first);
      owner->server->drain(std::chrono::hours(1), [] {});
      CHECK(owner->server->stats().connections_open == 1);  // Still draining, on its timer.
      return owner;
    });
  }
  // Loop::close() closes the last connection: the drain is complete, its callback runs.
  Loop loop;
  auto owner = one_connection(loop, OneConnection::Kind::held, false);
  bool drained = false;
  owner->server->drain(std::chrono::hours(1), [&drained] { drained = true; });
  CHECK_FALSE(drained);
  CHECK(loop.close() == 0);
  CHECK(drained);
  owner.reset();
}

TEST_CASE("a server may be destroyed from its own drain callback, whatever ends the drain") {
  // The callback runs when the last connection closes: inside close_all() at the drain deadline,
  // inside drain() closing an idle connection, inside the connection timer's pass, inside the
  // connection's read callback. The server (and its connection context) is deleted there, and
  // nothing touches it afterwards (AddressSanitizer).
  enum class End {
    deadline,    // The drain deadline closes a connection that never sent a byte.
    idle,        // drain() closes a connection idle between requests (no listener left).
    first_byte,  // timeouts.header closes a connection that never sent a byte.
    client_gone  // The client closes a connection that never sent a byte.
  };
  for (const End end : {End::deadline, End::idle, End::first_byte, End::client_gone}) {
    INFO("the drain ends by " << static_cast<int>(end));
    Loop loop;
    http::Router router;
    router.add("GET", "/x", [](http::Request&, http::Responder responder) {
      responder.send(200, "text/plain", "answered");
    });
    http::ServerOptions options;
    if (end == End::first_byte) options.timeouts.header = 20ms;
    auto server =
        std::make_unique<http::Server>(loop, std::make_shared<const http::Router>(router), options);
    const std::string bound = server->listen("127.0.0.1", 0);
    Client client(server->listeners().front()->bound_port());
    std::string answered;
    if (end == End::idle) {
      client.send(kGet);
      while (server->stats().requests == 0) uv_run(loop.uv(), UV_RUN_ONCE);
      answered = client.read_until("answered");
      CHECK(answered.find("answered") != std::string::npos);
      REQUIRE(server->close_listener(bound));
    } else {
      while (server->stats().connections_open == 0) uv_run(loop.uv(), UV_RUN_ONCE);
    }
    REQUIRE(server->stats().connections_open == 1);
    bool drained = false;
    server->drain(end == End::deadline ? 20ms : std::chrono::hours(1), [&] {
      drained = true;
      server.reset();
    });
    bool timed_out = false;
    if (end == End::client_gone) client.close();
    const auto watchdog = loop.call_later(10s, [&] { timed_out = true; });
    while (server != nullptr && !timed_out) uv_run(loop.uv(), UV_RUN_ONCE);
    loop.cancel(watchdog);
    CHECK(drained);
    CHECK(server == nullptr);
    if (end != End::client_gone) CHECK(client.read_all() == answered);  // Nothing more sent.
    CHECK(loop.close() == 0);
  }
}

TEST_CASE("destroying a server during a drain abandons the drain without calling back") {
  Loop loop;
  http::Router router;
  auto server = std::make_unique<http::Server>(loop, std::make_shared<const http::Router>(router),
                                               http::ServerOptions{});
  server->listen("127.0.0.1", 0);
  Client client(server->listeners().front()->bound_port());
  while (server->stats().connections_open == 0) uv_run(loop.uv(), UV_RUN_ONCE);
  int called = 0;
  server->drain(std::chrono::hours(1), [&] { ++called; });
  REQUIRE(server->draining());
  server.reset();  // Closes the connection the drain was waiting for.
  CHECK(called == 0);
  CHECK(client.read_all().empty());
  CHECK(loop.close() == 0);
}

namespace {

// A server on its own loop and thread (as one of squalld's workers), sharing `shared` if given.
class ServerThread {
 public:
  ServerThread(std::shared_ptr<http::SharedLimits> shared, const http::ServerOptions& options) {
    std::promise<void> ready;
    auto listening = ready.get_future();
    thread_ = std::thread([this, shared, options, &ready] {
      Loop loop;
      http::Router router;
      router.add("GET", "/x", [](http::Request&, http::Responder responder) {
        responder.send(200, "text/plain", "ok");
      });
      auto routes = std::make_shared<const http::Router>(router);
      {
        auto server = shared ? std::make_unique<http::Server>(loop, routes, options, shared)
                             : std::make_unique<http::Server>(loop, routes, options);
        server->listen("127.0.0.1", 0);
        port_ = server->listeners().front()->bound_port();
        shared_ = server->shared_limits();
        loop_ = &loop;
        remote_ = loop.remote();
        ready.set_value();
        loop.run();
      }
      close_status_ = loop.close();
    });
    listening.wait();
  }
  ~ServerThread() { stop(); }
  void stop() {
    if (!thread_.joinable()) return;
    remote_.call_soon([loop = loop_] { loop->stop(); });
    thread_.join();
  }
  std::uint16_t port() const { return port_; }
  const std::shared_ptr<http::SharedLimits>& shared() const { return shared_; }
  int close_status() const { return close_status_; }

 private:
  std::thread thread_;
  std::uint16_t port_ = 0;
  std::shared_ptr<http::SharedLimits> shared_;
  Loop* loop_ = nullptr;
  RemoteLoop remote_;
  int close_status_ = -1;
};

}  // namespace

TEST_CASE("servers on two loops sharing their limits count max_connections together") {
  http::ServerOptions options;
  options.max_connections = 1;
  ServerThread first(nullptr, options);
  ServerThread second(first.shared(), options);
  REQUIRE(second.shared() == first.shared());
  {
    squall::testing::Client held(first.port());
    held.send(kGet);
    CHECK(held.read_response().find("200 OK") != std::string::npos);
    // The other loop's server refuses: the pair has its one connection open.
    squall::testing::Client refused(second.port());
    refused.send(kGet);
    const std::string answer = refused.read_all();
    CHECK(answer.find("503") != std::string::npos);
    CHECK(answer.find("max_connections") != std::string::npos);
    CHECK(first.shared()->connections_open.load() == 1);
  }
  // Once the first loop closed its connection, the second loop accepts one.
  std::string answer;
  for (int attempt = 0; attempt < 200 && answer.find("200 OK") == std::string::npos; ++attempt) {
    squall::testing::Client again(second.port());
    again.send(kGet);
    answer = again.read_response();
    if (answer.find("200 OK") == std::string::npos) std::this_thread::sleep_for(10ms);
  }
  CHECK(answer.find("200 OK") != std::string::npos);
  first.stop();
  second.stop();
  CHECK(first.close_status() == 0);
  CHECK(second.close_status() == 0);
}

TEST_CASE("a shared memory budget is taken and given back from several threads") {
  http::MemoryBudget budget;
  budget.limit = 1000;
  std::vector<std::thread> threads;
  std::atomic<int> refused{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        if (budget.try_take(300)) {
          budget.give_back(300);
        } else {
          ++refused;
        }
        CHECK_LE(budget.used.load(), 1000u);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(budget.used.load() == 0);
  CHECK(budget.try_take(1000));
  CHECK_FALSE(budget.try_take(1));
  budget.give_back(5000);  // More than was taken: clamps at zero.
  CHECK(budget.used.load() == 0);
}

TEST_CASE("cached response heads keep each status and content type apart") {
  // More pairs than the cache holds, and content types built per request in a buffer of one
  // length, so neither eviction nor a reused address can hand one answer another's head.
  Loop loop;
  http::Router router;
  router.add("GET", "/type/{name}", [](http::Request& request, http::Responder responder) {
    const std::string content_type = "text/" + std::string(request.param("name"));
    responder.send(200, content_type, "typed");
  });
  router.add("GET", "/status/{code}", [](http::Request& request, http::Responder responder) {
    responder.send(std::stoi(std::string(request.param("code"))), "text/plain", "status");
  });
  const std::vector<std::pair<std::string, std::string>> expected = {
      {"/type/aaaa", "HTTP/1.1 200 OK\r\nServer: squall\r\nDate: "},
      {"/type/bbbb", "Content-Type: text/bbbb\r\nContent-Length: 5\r\n"},
      {"/status/201", "HTTP/1.1 201 Created\r\n"},
      {"/status/202", "HTTP/1.1 202 Accepted\r\n"},
      {"/status/400", "HTTP/1.1 400 Bad Request\r\n"},
      {"/status/404", "HTTP/1.1 404 Not Found\r\n"},
      {"/type/cccc", "Content-Type: text/cccc\r\n"},
      {"/type/dddd", "Content-Type: text/dddd\r\n"},
      {"/status/500", "HTTP/1.1 500 Internal Server Error\r\n"},
      {"/status/503", "HTTP/1.1 503 Service Unavailable\r\n"},
      {"/type/aaaa", "Content-Type: text/aaaa\r\n"},
      {"/status/201", "HTTP/1.1 201 Created\r\n"},
      {"/type/bbbb", "Content-Type: text/bbbb\r\n"},
  };
  run_with_client(loop, router, [&](std::uint16_t port) {
    Client client(port);
    std::string requests;
    for (const auto& entry : expected) {
      requests += "GET " + entry.first + " HTTP/1.1\r\nHost: t\r\n\r\n";
    }
    client.send(requests);
    for (const auto& entry : expected) {
      const std::string& path = entry.first;
      const std::string& head = entry.second;
      const std::string answer = client.read_response();
      CAPTURE(path);
      CAPTURE(answer);
      CHECK(answer.find(head) != std::string::npos);
      const bool typed = path.rfind("/type/", 0) == 0;
      const std::string type = typed ? "text/" + path.substr(6) : "text/plain";
      CHECK(answer.find("\r\nContent-Type: " + type + "\r\n") != std::string::npos);
    }
  });
}
