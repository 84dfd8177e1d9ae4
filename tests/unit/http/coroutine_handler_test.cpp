// In-process tests of coroutine handlers: a real Server on a real loop, a blocking client on a
// thread, a watchdog.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include "core/core_test_support.hpp"
#include "http/http_test_client.hpp"
#include "squall/core/awaitables.hpp"
#include "squall/core/loop.hpp"
#include "squall/core/task.hpp"
#include "squall/http/router.hpp"
#include "squall/http/server.hpp"

using namespace squall;
using namespace std::chrono_literals;

namespace {

using squall::testing::Client;

// Serves `router` on the loop while `client` runs on a thread; a watchdog stops it after 10 s.
void serve(Loop& loop, http::Router& router, const std::function<void(std::uint16_t)>& client,
           http::ServerOptions options = {}) {
  squall::testing::serve_while(loop, router, client, options, std::chrono::seconds(10));
}

const std::string kGet = "GET /x?name=squall HTTP/1.1\r\nHost: t\r\n\r\n";

Task<void> hello_later(Loop& loop, http::Request& request, http::Responder responder) {
  std::string name = request.query("name").value_or("?");
  co_await sleep(loop, 20ms);
  // Named first: g++ 12 destroys a capturing lambda temporary inside co_await twice.
  auto to_upper = [name] {
    std::string out = name;
    for (char& c : out) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return out;
  };
  std::string upper = co_await run_blocking(loop, std::move(to_upper));
  responder.send(200, "text/plain", "hello " + upper);
}

Task<void> throw_after_sleep(Loop& loop, http::Request&, http::Responder) {
  co_await sleep(loop, 5ms);
  throw std::runtime_error("late coroutine failure");
}

Task<void> block_then_answer(Loop& loop, http::Responder responder) {
  std::this_thread::sleep_for(80ms);  // Blocks the loop before the first suspension.
  co_await sleep(loop, 1ms);
  responder.send(200, "text/plain", "done");
}

Task<void> throw_at_once(http::Request&, http::Responder) {
  throw std::runtime_error("early coroutine failure");
  co_return;
}

Task<void> wait_for_ever(Loop& loop, http::Responder responder, std::atomic<bool>* started,
                         std::atomic<bool>* cancelled) {
  *started = true;
  try {
    co_await sleep(loop, 30s);
  } catch (const CancelledError&) {
    *cancelled = true;
    CHECK_FALSE(responder.connected());
    throw;
  }
  responder.send(200, "text/plain", "too late");
}

// Task<Response> handlers: they return the whole answer.
Task<http::Response> greet(Loop& loop, const http::Request& request) {
  std::string name(request.query("name").value_or("?"));
  co_await sleep(loop, 5ms);
  co_return http::Response(201, "application/json", "{\"hello\":\"" + name + "\"}")
      .header("X-Greeted", name)
      .header("Cache-Control", "no-store");
}

Task<http::Response> response_throw_after_sleep(Loop& loop, const http::Request&) {
  co_await sleep(loop, 5ms);
  throw std::runtime_error("late response failure");
}

Task<http::Response> response_throw_at_once(const http::Request&) {
  throw std::runtime_error("early response failure");
  co_return http::Response();
}

Task<http::Response> response_bad_header(const http::Request&) {
  co_return http::Response(200, "text/plain", "never sent").header("X-Split", "a\r\nInjected: 1");
}

Task<http::Response> response_wait_for_ever(Loop& loop, const http::Request& request,
                                            std::atomic<bool>* started,
                                            std::atomic<bool>* cancelled) {
  *started = true;
  try {
    co_await sleep(loop, 30s);
  } catch (const CancelledError&) {
    // The Request is still there: the answer was not sent.
    CHECK(request.path() == "/x");
    *cancelled = true;
    throw;
  }
  co_return http::Response(200, "text/plain", "too late");
}

}  // namespace

TEST_CASE("a Task<Response> handler returns the whole answer: status, type, headers, body") {
  http::Router router;
  Loop loop;
  router.add("GET", "/x", [&loop](const http::Request& request) { return greet(loop, request); });
  std::string reply;
  std::string head;
  serve(loop, router, [&](std::uint16_t port) {
    Client client(port);
    client.send(kGet);
    reply = client.read_response();
    client.send("HEAD /x?name=h HTTP/1.1\r\nHost: t\r\n\r\n");
    head = client.read_until("\r\n\r\n");
  });
  CHECK(reply.find("HTTP/1.1 201 Created\r\n") == 0);
  CHECK(reply.find("\r\nContent-Type: application/json\r\n") != std::string::npos);
  CHECK(reply.find("\r\nX-Greeted: squall\r\n") != std::string::npos);
  CHECK(reply.find("\r\nCache-Control: no-store\r\n") != std::string::npos);
  CHECK(reply.find("\r\nContent-Length: 18\r\n") != std::string::npos);
  CHECK(reply.find("\r\n\r\n{\"hello\":\"squall\"}") != std::string::npos);
  CHECK(head.find("HTTP/1.1 201 Created\r\n") == 0);
  CHECK(head.find("\r\nX-Greeted: h\r\n") != std::string::npos);
}

TEST_CASE("a Task<Response> handler that throws gives a 500 and the callback's log line") {
  squall::testing::CapturedLog log;
  http::Router router;
  Loop loop;
  router.add("GET", "/late", [&loop](const http::Request& request) {
    return response_throw_after_sleep(loop, request);
  });
  router.add("GET", "/early",
             [](const http::Request& request) { return response_throw_at_once(request); });
  router.add("GET", "/header",
             [](const http::Request& request) { return response_bad_header(request); });
  std::string late;
  std::string early;
  std::string header;
  serve(loop, router, [&](std::uint16_t port) {
    Client client(port);
    client.send("GET /late HTTP/1.1\r\nHost: t\r\n\r\n");
    late = client.read_response();
    client.send("GET /early HTTP/1.1\r\nHost: t\r\n\r\n");
    early = client.read_response();
    client.send("GET /header HTTP/1.1\r\nHost: t\r\n\r\n");
    header = client.read_response();
  });
  CHECK(late.find("HTTP/1.1 500 Internal Server Error") == 0);
  CHECK(early.find("HTTP/1.1 500 Internal Server Error") == 0);
  CHECK(header.find("HTTP/1.1 500 Internal Server Error") == 0);
  CHECK(header.find("Injected") == std::string::npos);
  const std::string text = log.text();
  CHECK(text.find("handler for GET /late threw: late response failure") != std::string::npos);
  CHECK(text.find("handler for GET /early threw: early response failure") != std::string::npos);
  CHECK(text.find("handler for GET /header threw: response header X-Split: value holds CR") !=
        std::string::npos);
}

TEST_CASE("a Task<Response> handler is cancelled when its client goes away") {
  http::Router router;
  Loop loop;
  std::atomic<bool> started{false};
  std::atomic<bool> cancelled{false};
  router.add("GET", "/x", [&](const http::Request& request) {
    return response_wait_for_ever(loop, request, &started, &cancelled);
  });
  const std::uint64_t start = uv_hrtime();
  serve(loop, router, [&](std::uint16_t port) {
    {
      Client client(port);
      client.send(kGet);
      while (!started) std::this_thread::sleep_for(1ms);
    }  // Gone before the answer.
    while (!cancelled && uv_hrtime() - start < 5'000'000'000ULL) {
      std::this_thread::sleep_for(1ms);
    }
  });
  CHECK(cancelled);
  CHECK(squall::testing::elapsed_ms(start) < 5000);
}

TEST_CASE("a coroutine handler awaits a sleep and pool work, then answers") {
  http::Router router;
  Loop loop;
  router.add("GET", "/x", [&loop](http::Request& request, http::Responder responder) {
    return hello_later(loop, request, std::move(responder));
  });
  std::string reply;
  serve(loop, router, [&](std::uint16_t port) {
    Client client(port);
    client.send(kGet);
    reply = client.read_response();
  });
  CHECK(reply.find("HTTP/1.1 200 OK") == 0);
  CHECK(reply.find("\r\n\r\nhello SQUALL") != std::string::npos);
}

TEST_CASE("a coroutine handler that throws gives a 500 and the callback's log line") {
  squall::testing::CapturedLog log;
  http::Router router;
  Loop loop;
  router.add("GET", "/late", [&loop](http::Request& request, http::Responder responder) {
    return throw_after_sleep(loop, request, std::move(responder));
  });
  router.add("GET", "/early", [](http::Request& request, http::Responder responder) {
    return throw_at_once(request, std::move(responder));
  });
  std::string late;
  std::string early;
  serve(loop, router, [&](std::uint16_t port) {
    Client client(port);
    client.send("GET /late HTTP/1.1\r\nHost: t\r\n\r\n");
    late = client.read_response();
    client.send("GET /early HTTP/1.1\r\nHost: t\r\n\r\n");
    early = client.read_response();
  });
  CHECK(late.find("HTTP/1.1 500 Internal Server Error") == 0);
  CHECK(early.find("HTTP/1.1 500 Internal Server Error") == 0);
  const std::string text = log.text();
  CHECK(text.find("handler for GET /late threw: late coroutine failure") != std::string::npos);
  CHECK(text.find("handler for GET /early threw: early coroutine failure") != std::string::npos);
}

TEST_CASE("a coroutine handler is cancelled when its client goes away") {
  http::Router router;
  Loop loop;
  std::atomic<bool> started{false};
  std::atomic<bool> cancelled{false};
  router.add("GET", "/x", [&](http::Request&, http::Responder responder) {
    return wait_for_ever(loop, std::move(responder), &started, &cancelled);
  });
  const std::uint64_t start = uv_hrtime();
  serve(loop, router, [&](std::uint16_t port) {
    {
      Client client(port);
      client.send(kGet);
      while (!started) std::this_thread::sleep_for(1ms);
    }  // Gone before the answer.
    while (!cancelled && uv_hrtime() - start < 5'000'000'000ULL) {
      std::this_thread::sleep_for(1ms);
    }
  });
  CHECK(cancelled);
  CHECK(squall::testing::elapsed_ms(start) < 5000);
}

TEST_CASE("the blocking-handler warning names a coroutine handler that blocks the loop") {
  squall::testing::CapturedLog log;
  http::Router router;
  Loop loop;
  router.add("GET", "/x", [&loop](http::Request&, http::Responder responder) {
    return block_then_answer(loop, std::move(responder));
  });
  http::ServerOptions options;
  options.blocking_threshold = 40ms;
  std::string reply;
  serve(
      loop, router,
      [&](std::uint16_t port) {
        Client client(port);
        client.send(kGet);
        reply = client.read_response();
      },
      options);
  CHECK(reply.find("HTTP/1.1 200 OK") == 0);
  CHECK(log.text().find("handler for GET /x blocked the event loop for") != std::string::npos);
}
