// What a connection costs while idle, and its deadlines kept by one timer per loop.
#include "http/connection.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "http/connection_context.hpp"
#include "http/http_test_client.hpp"
#include "squall/http/server.hpp"

using namespace squall;
using namespace std::chrono_literals;

namespace {

struct HandleCount {
  int timers = 0;  // Active uv_timer_t handles.
  int tcp = 0;     // uv_tcp_t handles not closing (listeners and connections).
};

// Runs `work` on the loop's thread and waits for it there (from a client thread).
void on_loop(Loop& loop, const std::function<void()>& work) {
  std::promise<void> done;
  loop.call_soon([&] {
    work();
    done.set_value();
  });
  done.get_future().get();
}

// Runs the loop while `client` runs on a thread of its own; then closes the server's
// connections and stops the loop.
void run_with_client(Loop& loop, http::Server& server, const std::function<void()>& client) {
  std::thread thread([&] {
    client();
    loop.call_soon([&] {
      server.close_all();
      loop.stop();
    });
  });
  loop.run();
  thread.join();
}

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
  // The socket is inside the object: an idle connection is one allocation.
  static_assert(sizeof(http::Connection) <= sizeof(uv_tcp_t) + 64);
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

TEST_CASE("a burst's workspaces serve the next burst; spares beyond the minimum go after it") {
  // Every request is held until all kInFlight are in, so that many workspaces are lent at once.
  constexpr std::size_t kInFlight = 100;
  static_assert(kInFlight > http::ConnectionContext::kMinSpareWorkspaces);
  http::Router router;
  std::vector<http::Responder> held;
  router.add("GET", "/held", [&](http::Request&, http::Responder responder) {
    held.push_back(std::move(responder));
    if (held.size() < kInFlight) return;
    for (http::Responder& answer : held) answer.send(200, "text/plain", "x");
    held.clear();
  });
  Loop loop;
  http::Server server(loop, std::make_shared<const http::Router>(router), http::ServerOptions{});
  server.listen("127.0.0.1", 0);
  const std::uint16_t port = server.listeners().front()->bound_port();
  struct Counts {
    std::uint64_t created = 0;
    std::uint64_t spare = 0;
  };
  // Read on the loop, after whatever it is doing for the requests answered.
  const auto counts_on_loop = [&] {
    Counts counts;
    on_loop(loop, [&] {
      counts = Counts{server.stats().workspaces_created, server.stats().spare_workspaces};
    });
    return counts;
  };
  std::vector<Counts> after_burst;
  Counts trimmed;
  bool trim_seen = false;
  std::size_t answered = 0;
  run_with_client(loop, server, [&] {
    std::vector<std::unique_ptr<testing::Client>> clients;
    for (std::size_t i = 0; i < kInFlight; ++i)
      clients.push_back(std::make_unique<testing::Client>(port));
    for (int burst = 0; burst < 2; ++burst) {
      for (auto& client : clients) client->send("GET /held HTTP/1.1\r\nHost: t\r\n\r\n");
      for (auto& client : clients) {
        if (client->read_response().find("200 OK") != std::string::npos) ++answered;
      }
      after_burst.push_back(counts_on_loop());
    }
    // Idle now: the trim frees what the next second's peak (none) does not need.
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (std::chrono::steady_clock::now() < deadline) {
      trimmed = counts_on_loop();
      if (trimmed.spare <= http::ConnectionContext::kMinSpareWorkspaces) {
        trim_seen = true;
        break;
      }
      std::this_thread::sleep_for(20ms);
    }
  });
  CHECK(loop.close() == 0);
  CHECK(answered == 2 * kInFlight);
  REQUIRE(after_burst.size() == 2);
  CHECK(after_burst[0].created == kInFlight);
  CHECK(after_burst[0].spare == kInFlight);    // All given back, all kept.
  CHECK(after_burst[1].created == kInFlight);  // The second burst built none.
  CHECK(after_burst[1].spare == kInFlight);
  CHECK(trim_seen);
  CHECK(trimmed.spare == http::ConnectionContext::kMinSpareWorkspaces);
  CHECK(trimmed.created == kInFlight);
}

TEST_CASE(
    "after a reload that raises the head limits, a large head is not read into an old spare") {
  http::Router router;
  router.add("GET", "/x", [](http::Request& request, http::Responder responder) {
    responder.send(200, "text/plain", std::to_string(request.header("X-Big").value_or("").size()));
  });
  Loop loop;
  http::Server server(loop, std::make_shared<const http::Router>(router), http::ServerOptions{});
  server.listen("127.0.0.1", 0);
  const std::uint16_t port = server.listeners().front()->bound_port();
  // Beyond the default workspace (8 KiB of URL, 16 KiB of headers, room for a read: 32 KiB).
  const std::string big(48 * 1024, 'b');
  std::string small_answer;
  std::string big_answer;
  run_with_client(loop, server, [&] {
    testing::Client first(port);
    first.send("GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
    small_answer = first.read_response();
    first.close();
    // The workspace that read it is a spare now, sized for the old limits.
    on_loop(loop, [&] {
      http::ServerOptions larger;
      larger.limits.max_header_bytes = 64 * 1024;
      server.reconfigure(larger);
    });
    testing::Client second(port);
    second.send("GET /x HTTP/1.1\r\nHost: t\r\nX-Big: " + big + "\r\n\r\n");
    big_answer = second.read_response();
  });
  CHECK(loop.close() == 0);
  CHECK(small_answer.find("200 OK") != std::string::npos);
  CHECK(big_answer.find("200 OK") != std::string::npos);
  CHECK(big_answer.find("\r\n\r\n" + std::to_string(big.size())) != std::string::npos);
}

TEST_CASE("cached answer heads follow the body's length and a reload's keep-alive timeout") {
  http::Router router;
  router.add("GET", "/x", [](http::Request& request, http::Responder responder) {
    // The same status and type each time: one cached head, its length changing.
    responder.send(200, "text/plain", std::string(request.target().size(), 'x'));
  });
  Loop loop;
  http::Server server(loop, std::make_shared<const http::Router>(router), http::ServerOptions{});
  server.listen("127.0.0.1", 0);
  const std::uint16_t port = server.listeners().front()->bound_port();
  std::vector<std::string> answers;
  run_with_client(loop, server, [&] {
    testing::Client client(port);
    for (const std::string target : {"/x", "/x?long-query", "/x?long-query", "/x"}) {
      client.send("GET " + target + " HTTP/1.1\r\nHost: t\r\n\r\n");
      answers.push_back(client.read_response());
    }
    on_loop(loop, [&] {
      http::ServerOptions options;
      options.timeouts.keepalive = std::chrono::seconds(9);
      server.reconfigure(options);
    });
    client.send("GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
    answers.push_back(client.read_response());
  });
  CHECK(loop.close() == 0);
  REQUIRE(answers.size() == 5);
  const auto ends_with = [](const std::string& answer, const std::string& tail) {
    return answer.size() >= tail.size() &&
           answer.compare(answer.size() - tail.size(), tail.size(), tail) == 0;
  };
  CHECK(ends_with(answers[0], "Content-Length: 2\r\nKeep-Alive: timeout=75\r\n\r\nxx"));
  CHECK(ends_with(answers[1],
                  "Content-Length: 13\r\nKeep-Alive: timeout=75\r\n\r\n" + std::string(13, 'x')));
  CHECK(ends_with(answers[2],
                  "Content-Length: 13\r\nKeep-Alive: timeout=75\r\n\r\n" + std::string(13, 'x')));
  CHECK(ends_with(answers[3], "Content-Length: 2\r\nKeep-Alive: timeout=75\r\n\r\nxx"));
  CHECK(ends_with(answers[4], "Content-Length: 2\r\nKeep-Alive: timeout=9\r\n\r\nxx"));
}

TEST_CASE("cached answer heads follow the status and the content type from answer to answer") {
  struct Kind {
    int status;
    const char* type;
    const char* status_line;
  };
  // The second answer has the first's status and a type of the same length in the same buffer.
  const std::vector<Kind> kinds = {{200, "text/plain", "HTTP/1.1 200 OK\r\n"},
                                   {200, "text/html;", "HTTP/1.1 200 OK\r\n"},
                                   {201, "text/html;", "HTTP/1.1 201 Created\r\n"},
                                   {200, "text/plain", "HTTP/1.1 200 OK\r\n"}};
  http::Router router;
  // One buffer whose bytes change between answers while its address and length stay: the
  // cache tries the last answer's entry first and must compare the type, not its address.
  std::string type;
  std::size_t answered = 0;
  router.add("GET", "/x", [&](http::Request&, http::Responder responder) {
    const Kind& kind = kinds[answered++ % kinds.size()];
    type = kind.type;
    responder.send(kind.status, type, "x");
  });
  Loop loop;
  std::vector<std::string> answers;
  testing::serve_while(loop, router, [&](std::uint16_t port) {
    testing::Client client(port);
    for (std::size_t i = 0; i < kinds.size(); ++i) {
      client.send("GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
      answers.push_back(client.read_response());
    }
  });
  REQUIRE(answers.size() == kinds.size());
  for (std::size_t i = 0; i < answers.size(); ++i) {
    CAPTURE(answers[i]);
    CHECK(answers[i].rfind(kinds[i].status_line, 0) == 0);
    CHECK(answers[i].find(std::string("\r\nContent-Type: ") + kinds[i].type + "\r\n") !=
          std::string::npos);
  }
}

TEST_CASE("the request observer gets one record per request, an inside answer's at the return") {
  using namespace std::chrono_literals;
  http::Router router;
  router.add("GET", "/inside", [](http::Request&, http::Responder responder) {
    responder.send(200, "text/plain", "now");
    // Work after the answer is still the handler's: the record is made when it returns.
    std::this_thread::sleep_for(30ms);
  });
  Loop loop;
  router.add("GET", "/later", [&loop](http::Request&, http::Responder responder) {
    loop.call_later(20ms, [responder] { responder.send(200, "text/plain", "later"); });
  });
  http::Server server(loop, std::make_shared<const http::Router>(router), http::ServerOptions{});
  struct Seen {
    std::string route;
    int status;
    std::chrono::nanoseconds duration;
    std::string target;
  };
  std::vector<Seen> seen;
  server.on_request([&](const http::RequestRecord& record) {
    seen.push_back({std::string(record.route), record.status, record.duration,
                    std::string(record.request->target())});
  });
  server.listen("127.0.0.1", 0);
  const std::uint16_t port = server.listeners().front()->bound_port();
  run_with_client(loop, server, [&] {
    testing::Client client(port);
    for (const char* target : {"/inside", "/later", "/missing"}) {
      client.send(std::string("GET ") + target + " HTTP/1.1\r\nHost: t\r\n\r\n");
      client.read_response();
    }
  });
  CHECK(loop.close() == 0);
  REQUIRE(seen.size() == 3);
  CHECK(seen[0].route == "/inside");
  CHECK(seen[0].target == "/inside");
  CHECK(seen[0].duration >= 30ms);
  CHECK(seen[1].route == "/later");
  CHECK(seen[1].target == "/later");
  CHECK(seen[1].duration >= 20ms - 2ms);  // The loop clock's granularity (timers run early).
  CHECK(seen[2].route == "");
  CHECK(seen[2].status == 404);
  CHECK(seen[2].target == "/missing");
}
