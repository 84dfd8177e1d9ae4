// In-process tests of http::Client: the client and local servers (squall's own Server, raw
// libuv sockets that misbehave) share one loop; a watchdog bounds every run.
#include "squall/http/client.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/handle_lifetime.hpp"
#include "squall/core/awaitables.hpp"
#include "squall/http/router.hpp"
#include "squall/http/server.hpp"
#include "test_support.hpp"

using namespace squall;
using namespace std::chrono_literals;

namespace {

using Kind = http::FetchError::Kind;

// Runs the loop until `done()` holds (checked after every loop iteration) or `limit` passes.
void run_until(Loop& loop, std::function<bool()> done, std::chrono::milliseconds limit = 10s) {
  bool watchdog_fired = false;
  const auto watchdog = loop.call_later(limit, [&] {
    watchdog_fired = true;
    loop.stop();
  });
  uv_check_t check;
  uv_check_init(loop.uv(), &check);
  check.data = &done;
  uv_check_start(&check, [](uv_check_t* handle) {
    if ((*static_cast<std::function<bool()>*>(handle->data))()) uv_stop(handle->loop);
  });
  while (!done() && !watchdog_fired) loop.run();
  uv_close(reinterpret_cast<uv_handle_t*>(&check), nullptr);
  loop.cancel(watchdog);
  uv_run(loop.uv(), UV_RUN_NOWAIT);  // Lets the check handle's close finish.
  REQUIRE_MESSAGE(!watchdog_fired, "the loop did not finish within ", limit.count(), " ms");
}

// Runs the loop until `pending` drops to 0 (each callback decrements it).
void run_until_done(Loop& loop, const int& pending, std::chrono::milliseconds limit = 10s) {
  run_until(
      loop, [&] { return pending <= 0; }, limit);
}

// The routes the tests fetch from squall's own server.
std::shared_ptr<const http::Router> test_routes(Loop& loop) {
  auto router = std::make_shared<http::Router>();
  router->add("GET", "/plain", [](http::Request&, http::Responder responder) {
    responder.header("Set-Cookie", "a=1").header("Set-Cookie", "b=2");
    responder.send(200, "text/plain", "hello");
  });
  router->add("GET", "/status/{code}", [](http::Request& request, http::Responder responder) {
    responder.send(std::atoi(std::string(request.param("code")).c_str()), "text/plain", "status");
  });
  router->add("GET", "/slow/{ms}", [&loop](http::Request& request, http::Responder responder) {
    const int delay = std::atoi(std::string(request.param("ms")).c_str());
    loop.call_later(std::chrono::milliseconds(delay),
                    [responder] { responder.send(200, "text/plain", "slow"); });
  });
  router->add("GET", "/redirect/{n}", [](http::Request& request, http::Responder responder) {
    const int left = std::atoi(std::string(request.param("n")).c_str());
    if (left == 0) {
      responder.send(200, "text/plain", "arrived");
      return;
    }
    responder.header("Location", "/redirect/" + std::to_string(left - 1));
    responder.send(302, "text/plain", "moved");
  });
  router->add("GET", "/big/{bytes}", [](http::Request& request, http::Responder responder) {
    const auto bytes = std::strtoul(std::string(request.param("bytes")).c_str(), nullptr, 10);
    responder.send(200, "application/octet-stream", std::string(bytes, 'x'));
  });
  router->add("GET", "/chunked/{bytes}", [](http::Request& request, http::Responder responder) {
    auto bytes = std::strtoul(std::string(request.param("bytes")).c_str(), nullptr, 10);
    responder.start(200, "application/octet-stream");
    while (bytes > 0) {
      const std::size_t piece = std::min<std::size_t>(bytes, 16 * 1024);
      responder.write(std::string(piece, 'y'));
      bytes -= piece;
    }
    responder.finish();
  });
  auto echo = [](http::Request& request, http::Responder responder) {
    responder.header("X-Method", request.method());
    responder.header("X-Test", request.header("X-Test").value_or("none"));
    responder.send(200, request.header("Content-Type").value_or("text/plain"), request.body());
  };
  router->add("POST", "/echo", echo);
  router->add("PUT", "/echo", echo);
  return router;
}

struct TestServer {
  http::Server server;
  std::uint16_t port;
  TestServer(Loop& loop) : server(loop, test_routes(loop), {}) {
    server.listen("127.0.0.1", 0);
    port = server.listeners().front()->bound_port();
  }
  ~TestServer() { server.close_all(); }
  std::string url(const std::string& path) const {
    return "http://127.0.0.1:" + std::to_string(port) + path;
  }
};

// A TCP server that misbehaves: it never answers, resets, or sends fixed bytes and closes.
class RawServer {
 public:
  enum class Mode { never_answer, reset, canned };
  RawServer(Loop& loop, Mode mode, std::string canned = {}) : mode_(mode), canned_(canned) {
    uv_tcp_init(loop.uv(), listener_);
    listener_->data = this;
    sockaddr_in address{};
    uv_ip4_addr("127.0.0.1", 0, &address);
    uv_tcp_bind(listener_, reinterpret_cast<const sockaddr*>(&address), 0);
    uv_listen(reinterpret_cast<uv_stream_t*>(listener_), 64,
              [](uv_stream_t* server, int) { static_cast<RawServer*>(server->data)->accept(); });
    sockaddr_storage bound{};
    int length = sizeof bound;
    uv_tcp_getsockname(listener_, reinterpret_cast<sockaddr*>(&bound), &length);
    port = ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  }
  ~RawServer() {
    for (Peer* peer : peers_) close_peer(peer);
    // The handle is freed by its close callback: this object may be gone before that runs.
    uv_close(reinterpret_cast<uv_handle_t*>(listener_),
             [](uv_handle_t* handle) { delete reinterpret_cast<uv_tcp_t*>(handle); });
  }
  std::string url(const std::string& path = "/") const {
    return "http://127.0.0.1:" + std::to_string(port) + path;
  }
  std::uint16_t port = 0;
  int accepted = 0;
  int closed_by_peer = 0;  // Connections the client closed.

 private:
  struct Peer {
    uv_tcp_t tcp;
    RawServer* server;
    std::string received;
    bool closing = false;
  };
  void accept() {
    auto* peer = new Peer{};
    peer->server = this;
    uv_tcp_init(listener_->loop, &peer->tcp);
    peer->tcp.data = peer;
    if (uv_accept(reinterpret_cast<uv_stream_t*>(listener_),
                  reinterpret_cast<uv_stream_t*>(&peer->tcp)) != 0) {
      uv_close(reinterpret_cast<uv_handle_t*>(&peer->tcp),
               [](uv_handle_t* handle) { delete static_cast<Peer*>(handle->data); });
      return;
    }
    ++accepted;
    peers_.push_back(peer);
    uv_read_start(
        reinterpret_cast<uv_stream_t*>(&peer->tcp),
        [](uv_handle_t*, size_t, uv_buf_t* buf) {
          static char buffer[65536];
          *buf = uv_buf_init(buffer, sizeof buffer);
        },
        [](uv_stream_t* stream, ssize_t n, const uv_buf_t* buf) {
          auto* peer = static_cast<Peer*>(stream->data);
          RawServer* self = peer->server;
          if (n < 0) {
            ++self->closed_by_peer;
            self->close_peer(peer);
            return;
          }
          peer->received.append(buf->base, static_cast<std::size_t>(n));
          if (peer->received.find("\r\n\r\n") == std::string::npos) return;
          if (self->mode_ == Mode::reset) {
            self->forget(peer);
            peer->closing = true;
            uv_tcp_close_reset(
                &peer->tcp, [](uv_handle_t* handle) { delete static_cast<Peer*>(handle->data); });
          } else if (self->mode_ == Mode::canned) {
            auto* write = new uv_write_t;
            uv_buf_t out =
                uv_buf_init(self->canned_.data(), static_cast<unsigned>(self->canned_.size()));
            write->data = peer;
            uv_write(write, stream, &out, 1, [](uv_write_t* request, int) {
              auto* written = static_cast<Peer*>(request->data);
              delete request;
              written->server->close_peer(written);
            });
          }
        });
  }
  void forget(Peer* peer) {
    peers_.erase(std::remove(peers_.begin(), peers_.end(), peer), peers_.end());
  }
  void close_peer(Peer* peer) {
    if (peer->closing) return;
    peer->closing = true;
    forget(peer);
    uv_close(reinterpret_cast<uv_handle_t*>(&peer->tcp),
             [](uv_handle_t* handle) { delete static_cast<Peer*>(handle->data); });
  }
  Mode mode_;
  std::string canned_;
  uv_tcp_t* listener_ = new uv_tcp_t;  // Freed by its close callback.
  std::vector<Peer*> peers_;
};

// A loopback port with nothing listening on it.
std::uint16_t closed_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address);
  socklen_t length = sizeof address;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  ::close(fd);
  return ntohs(address.sin_port);
}

// Fetches one request and returns its result, running the loop meanwhile.
http::FetchResult fetch_one(Loop& loop, http::Client& client, http::FetchRequest request) {
  std::optional<http::FetchResult> result;
  int pending = 1;
  client.fetch(std::move(request), [&](http::FetchResult r) {
    result.emplace(std::move(r));
    --pending;
  });
  run_until_done(loop, pending);
  return std::move(*result);
}

http::FetchRequest get(std::string url) {
  http::FetchRequest request;
  request.url = std::move(url);
  return request;
}

}  // namespace

TEST_CASE("client: Debian's libcurl resolves names off the loop (AsynchDNS, threaded)") {
  CHECK(http::curl_resolves_asynchronously());
  CHECK(http::curl_resolver_name() == "threaded");
}

TEST_CASE("client: a GET returns status, body, repeated headers, effective URL and timings") {
  Loop loop;
  {
    TestServer server(loop);
    http::Client client(loop);
    auto result = fetch_one(loop, client, get(server.url("/plain")));
    REQUIRE(result.ok());
    const auto& response = result.response();
    CHECK(response.status == 200);
    CHECK(response.body == "hello");
    CHECK(response.header("content-type") == "text/plain");
    CHECK(response.header_values("Set-Cookie") == std::vector<std::string_view>{"a=1", "b=2"});
    CHECK(response.effective_url == server.url("/plain"));
    CHECK(response.redirects == 0);
    const auto& t = response.timings;
    CHECK(t.connect > 0us);
    CHECK(t.dns <= t.connect);
    CHECK(t.tls == 0us);
    CHECK(t.connect <= t.first_byte);
    CHECK(t.first_byte <= t.total);
    CHECK(client.stats().completed == 1);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: a 404 or a 500 is a response, not an error") {
  Loop loop;
  {
    TestServer server(loop);
    http::Client client(loop);
    for (const int status : {404, 500, 503}) {
      auto result = fetch_one(loop, client, get(server.url("/status/" + std::to_string(status))));
      REQUIRE(result.ok());
      CHECK(result.response().status == status);
    }
    auto missing = fetch_one(loop, client, get(server.url("/nowhere")));
    REQUIRE(missing.ok());
    CHECK(missing.response().status == 404);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: POST and PUT send the body and the headers") {
  Loop loop;
  {
    TestServer server(loop);
    http::Client client(loop);
    for (const std::string method : {"POST", "PUT"}) {
      http::FetchRequest request = get(server.url("/echo"));
      request.method = method;
      request.headers = {{"Content-Type", "application/json"}, {"X-Test", "yes"}};
      request.body = std::string(200'000, 'b') + "{\"end\":1}";  // Past curl's 100-continue size.
      auto result = fetch_one(loop, client, request);
      REQUIRE(result.ok());
      CHECK(result.response().status == 200);
      CHECK(result.response().header("X-Method") == method);
      CHECK(result.response().header("X-Test") == "yes");
      CHECK(result.response().header("Content-Type") == "application/json");
      CHECK(result.response().body == request.body);
      CHECK(result.response().timings.total < 1s);  // No Expect: 100-continue stall.
    }
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: redirects are not followed by default, followed on request, and bounded") {
  Loop loop;
  {
    TestServer server(loop);
    http::Client client(loop);
    auto plain = fetch_one(loop, client, get(server.url("/redirect/3")));
    REQUIRE(plain.ok());
    CHECK(plain.response().status == 302);
    CHECK(plain.response().header("Location") == "/redirect/2");

    http::FetchRequest follow = get(server.url("/redirect/3"));
    follow.follow_redirects = true;
    auto followed = fetch_one(loop, client, follow);
    REQUIRE(followed.ok());
    CHECK(followed.response().status == 200);
    CHECK(followed.response().body == "arrived");
    CHECK(followed.response().redirects == 3);
    CHECK(followed.response().effective_url == server.url("/redirect/0"));
    CHECK_FALSE(followed.response().header("Location"));  // Only the final response's headers.

    http::FetchRequest too_many = get(server.url("/redirect/5"));
    too_many.follow_redirects = true;
    too_many.max_redirects = 2;
    auto stopped = fetch_one(loop, client, too_many);
    REQUIRE_FALSE(stopped.ok());
    CHECK(stopped.error().kind() == Kind::protocol);
    CHECK(std::string(stopped.error().what()).find(server.url("/redirect/5")) != std::string::npos);
    CHECK(std::string(stopped.error().what()).find("max_redirects (2)") != std::string::npos);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: a body over max_body_size is a too_large error, announced or chunked") {
  Loop loop;
  {
    TestServer server(loop);
    http::Client client(loop);
    for (const std::string path : {"/big/200000", "/chunked/200000"}) {
      http::FetchRequest request = get(server.url(path));
      request.max_body_size = 100'000;
      auto result = fetch_one(loop, client, request);
      REQUIRE_FALSE(result.ok());
      CHECK(result.error().kind() == Kind::too_large);
      CHECK(result.error().url() == server.url(path));
      CHECK(std::string(result.error().what()).find("max_body_size (100000 bytes)") !=
            std::string::npos);
    }
    // At the limit exactly, both framings pass.
    for (const std::string path : {"/big/100000", "/chunked/100000"}) {
      http::FetchRequest request = get(server.url(path));
      request.max_body_size = 100'000;
      auto result = fetch_one(loop, client, request);
      REQUIRE(result.ok());
      CHECK(result.response().body.size() == 100'000);
    }
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: on_body_chunk streams the body and may stop the fetch") {
  Loop loop;
  {
    TestServer server(loop);
    http::Client client(loop);
    std::size_t streamed = 0;
    int chunks = 0;
    http::FetchRequest request = get(server.url("/chunked/300000"));
    request.on_body_chunk = [&](std::string_view chunk) {
      streamed += chunk.size();
      ++chunks;
      return chunk.find_first_not_of('y') == std::string_view::npos;
    };
    auto result = fetch_one(loop, client, request);
    REQUIRE(result.ok());
    CHECK(result.response().body.empty());
    CHECK(streamed == 300'000);
    CHECK(chunks > 1);

    http::FetchRequest stopping = get(server.url("/chunked/300000"));
    stopping.on_body_chunk = [](std::string_view) { return false; };
    auto stopped = fetch_one(loop, client, stopping);
    REQUIRE_FALSE(stopped.ok());
    CHECK(stopped.error().kind() == Kind::cancelled);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: sequential fetches to one server reuse one TCP connection") {
  Loop loop;
  {
    TestServer server(loop);
    http::Client client(loop);
    for (int i = 0; i < 5; ++i) {
      auto result = fetch_one(loop, client, get(server.url("/plain")));
      REQUIRE(result.ok());
      if (i > 0) CHECK(result.response().timings.connect == 0us);  // curl: no new connect.
    }
    CHECK(server.server.stats().connections_accepted == 1);
    CHECK(server.server.stats().requests == 5);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: fetches beyond max_in_flight wait in the queue, whose depth is readable") {
  Loop loop;
  {
    TestServer server(loop);
    http::ClientOptions options;
    options.max_in_flight = 2;
    http::Client client(loop, options);
    int pending = 6;
    std::vector<int> statuses;
    const auto started = std::chrono::steady_clock::now();
    for (int i = 0; i < 6; ++i) {
      client.fetch(get(server.url("/slow/100")), [&](http::FetchResult result) {
        statuses.push_back(result.ok() ? result.response().status : 0);
        --pending;
      });
    }
    CHECK(client.in_flight() == 2);
    CHECK(client.queued() == 4);
    run_until_done(loop, pending);
    const auto elapsed = std::chrono::steady_clock::now() - started;
    CHECK(statuses == std::vector<int>(6, 200));
    // Three rounds of two. The server's timers run on its loop's clock, whole milliseconds read
    // when an iteration began, so a round may end up to a couple of milliseconds before 100 ms
    // of this clock: the check allows 2 ms a round, and two rounds (200 ms) still fail it.
    CHECK(elapsed >= 300ms - 6ms);
    CHECK(client.queued() == 0);
    CHECK(client.in_flight() == 0);
    CHECK(server.server.stats().connections_accepted == 2);  // The two connections, reused.
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: the per-host limit queues one host's fetches while another host's run") {
  Loop loop;
  {
    TestServer first(loop);
    TestServer second(loop);
    http::ClientOptions options;
    options.max_in_flight = 10;
    options.max_in_flight_per_host = 1;
    http::Client client(loop, options);
    int pending = 4;
    std::vector<std::string> order;
    for (int i = 0; i < 3; ++i) {
      client.fetch(get(first.url("/slow/100")), [&](http::FetchResult result) {
        CHECK(result.ok());
        order.push_back("first");
        --pending;
      });
    }
    client.fetch(get(second.url("/slow/10")), [&](http::FetchResult result) {
      CHECK(result.ok());
      order.push_back("second");
      --pending;
    });
    CHECK(client.in_flight() == 2);  // One per host; the second host is not stuck behind.
    CHECK(client.queued() == 2);
    run_until_done(loop, pending);
    CHECK(order.front() == "second");
    CHECK(first.server.stats().connections_accepted == 1);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: the queue has a timeout and a depth limit") {
  Loop loop;
  {
    TestServer server(loop);
    http::ClientOptions options;
    options.max_in_flight = 1;
    options.max_queued = 1;
    options.queue_timeout = 50ms;
    http::Client client(loop, options);
    int pending = 3;
    std::vector<std::string> outcomes(3);
    for (int i = 0; i < 3; ++i) {
      client.fetch(get(server.url("/slow/300")), [&, i](http::FetchResult result) {
        outcomes[static_cast<std::size_t>(i)] =
            result.ok() ? "ok" : std::string(http::to_string(result.error().kind()));
        if (i == 1) {
          CHECK(std::string(result.error().what()).find("queue_timeout (50 ms)") !=
                std::string::npos);
        }
        --pending;
      });
    }
    CHECK(outcomes[2] == "queue_full");  // At once: the queue already held one.
    run_until_done(loop, pending);
    CHECK(outcomes == std::vector<std::string>{"ok", "timeout", "queue_full"});
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: errors have a kind and name the URL") {
  Loop loop;
  {
    http::Client client(loop);
    SUBCASE("connection refused") {
      const std::string url = "http://127.0.0.1:" + std::to_string(closed_port()) + "/x";
      auto result = fetch_one(loop, client, get(url));
      REQUIRE_FALSE(result.ok());
      CHECK(result.error().kind() == Kind::connect_refused);
      CHECK(std::string(result.error().what()).find(url) != std::string::npos);
    }
    SUBCASE("a server that never answers: total_timeout") {
      RawServer silent(loop, RawServer::Mode::never_answer);
      http::FetchRequest request = get(silent.url("/x"));
      request.total_timeout = 200ms;
      const auto started = std::chrono::steady_clock::now();
      auto result = fetch_one(loop, client, request);
      REQUIRE_FALSE(result.ok());
      CHECK(result.error().kind() == Kind::timeout);
      CHECK(std::chrono::steady_clock::now() - started < 2s);
      CHECK(std::string(result.error().what()).find(silent.url("/x")) != std::string::npos);
    }
    SUBCASE("a server that resets the connection") {
      RawServer resetting(loop, RawServer::Mode::reset);
      auto result = fetch_one(loop, client, get(resetting.url("/x")));
      REQUIRE_FALSE(result.ok());
      CHECK(result.error().kind() == Kind::protocol);
      CHECK(std::string(result.error().what()).find(resetting.url("/x")) != std::string::npos);
    }
    SUBCASE("a server that answers garbage") {
      RawServer garbage(loop, RawServer::Mode::canned, "SMTP ready\r\n\r\n");
      auto result = fetch_one(loop, client, get(garbage.url("/x")));
      REQUIRE_FALSE(result.ok());
      CHECK(result.error().kind() == Kind::protocol);
    }
    SUBCASE("a close-delimited body over the limit") {
      RawServer big(loop, RawServer::Mode::canned,
                    "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + std::string(5000, 'z'));
      http::FetchRequest request = get(big.url("/x"));
      request.max_body_size = 1000;
      auto result = fetch_one(loop, client, request);
      REQUIRE_FALSE(result.ok());
      CHECK(result.error().kind() == Kind::too_large);
    }
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: bad requests are refused at the API") {
  Loop loop;
  {
    http::Client client(loop);
    auto noop = [](http::FetchResult) {};
    CHECK_THROWS_AS(client.fetch(get("ftp://127.0.0.1/x"), noop), std::invalid_argument);
    CHECK_THROWS_AS(client.fetch(get("not a url"), noop), std::invalid_argument);
    // curl alone would read "http:///x" as a fetch of http://x/.
    CHECK_THROWS_WITH_AS(client.fetch(get("http:///x"), noop),
                         "http::Client::fetch: URL 'http:///x' has no host", std::invalid_argument);
    CHECK_THROWS_WITH_AS(client.fetch(get("https:///"), noop), doctest::Contains("'https:///'"),
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS(client.fetch(get("http://:8080/x"), noop),
                         doctest::Contains("'http://:8080/x'"), std::invalid_argument);
    http::FetchRequest injected = get("http://127.0.0.1/x");
    injected.headers = {{"X-A", "1\r\nX-Injected: 1"}};
    CHECK_THROWS_WITH_AS(client.fetch(injected, noop), doctest::Contains("header 'X-A'"),
                         std::invalid_argument);
    http::FetchRequest bad_method = get("http://127.0.0.1/x");
    bad_method.method = "GE T";
    CHECK_THROWS_AS(client.fetch(bad_method, noop), std::invalid_argument);
    std::thread other(
        [&] { CHECK_THROWS_AS(client.fetch(get("http://127.0.0.1/x"), noop), std::logic_error); });
    other.join();
    CHECK(client.in_flight() == 0);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: cancel removes a running or queued fetch at once") {
  Loop loop;
  {
    RawServer silent(loop, RawServer::Mode::never_answer);
    http::ClientOptions options;
    options.max_in_flight = 1;
    http::Client client(loop, options);
    std::vector<std::string> outcomes;
    auto record = [&](http::FetchResult result) {
      outcomes.push_back(result.ok() ? "ok" : std::string(http::to_string(result.error().kind())));
    };
    const auto running = client.fetch(get(silent.url("/a")), record);
    const auto waiting = client.fetch(get(silent.url("/b")), record);
    run_until(loop, [&] { return silent.accepted == 1; });
    CHECK(client.in_flight() == 1);

    CHECK(client.cancel(waiting));
    CHECK(outcomes == std::vector<std::string>{"cancelled"});
    CHECK(client.queued() == 0);
    CHECK(client.in_flight() == 1);  // The queued one never started.

    CHECK(client.cancel(running));
    CHECK(outcomes == std::vector<std::string>{"cancelled", "cancelled"});
    CHECK(client.in_flight() == 0);
    CHECK_FALSE(client.cancel(running));
    // curl closed the connection of the removed transfer: the server sees it go.
    run_until(loop, [&] { return silent.closed_by_peer == 1; });
    CHECK(client.stats().cancelled == 2);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: close() with fetches in flight cancels each one and frees every handle") {
  Loop loop;
  std::vector<std::string> outcomes;
  {
    RawServer silent(loop, RawServer::Mode::never_answer);
    TestServer server(loop);
    http::ClientOptions options;
    options.max_in_flight = 2;
    auto client = std::make_unique<http::Client>(loop, options);
    auto record = [&](http::FetchResult result) {
      outcomes.push_back(result.ok() ? "ok" : std::string(http::to_string(result.error().kind())));
    };
    // Both running fetches wait on a server that never answers, so no squall handler is left
    // holding a Responder in a loop timer when the Server goes away (not what this tests).
    client->fetch(get(silent.url("/a")), record);
    client->fetch(get(silent.url("/b")), record);
    client->fetch(get(server.url("/plain")), record);  // Queued.
    run_until(loop, [&] { return silent.accepted == 2; });
    CHECK(client->in_flight() == 2);
    CHECK(client->queued() == 1);
    CHECK(outcomes.empty());
    SUBCASE("close()") {
      client->close();
      CHECK(outcomes == std::vector<std::string>(3, "cancelled"));
      // Later fetches end at once.
      client->fetch(get(server.url("/plain")), record);
      CHECK(outcomes.size() == 4);
      client.reset();
    }
    SUBCASE("the destructor") {
      client.reset();
      CHECK(outcomes == std::vector<std::string>(3, "cancelled"));
    }
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: a callback may start the next fetch and may cancel another") {
  Loop loop;
  {
    TestServer server(loop);
    RawServer silent(loop, RawServer::Mode::never_answer);
    http::Client client(loop);
    int pending = 3;
    std::vector<std::string> events;
    const auto stuck = client.fetch(get(silent.url("/x")), [&](http::FetchResult result) {
      events.push_back(result.ok()
                           ? "stuck ok"
                           : "stuck " + std::string(http::to_string(result.error().kind())));
      --pending;
    });
    client.fetch(get(server.url("/plain")), [&](http::FetchResult result) {
      events.push_back("first " + std::to_string(result.response().status));
      --pending;
      client.cancel(stuck);
      client.fetch(get(server.url("/status/201")), [&](http::FetchResult second) {
        events.push_back("second " + std::to_string(second.response().status));
        --pending;
      });
    });
    run_until_done(loop, pending);
    CHECK(events == std::vector<std::string>{"first 200", "stuck cancelled", "second 201"});
  }
  CHECK(loop.close() == 0);
}

// ------------------------------------------------------------------------------------------
// A name lookup that never gets an answer. Debian's libcurl resolves with getaddrinfo on a
// thread of its own; this checks that the loop goes on meanwhile (other fetches complete, timers
// fire on time) and that ending such a fetch does not wait for the lookup. The lookup must
// really reach a DNS server that stays silent, so the check runs in a child process with its own
// network and mount namespaces: /etc/resolv.conf there points at 127.0.0.1, where a UDP socket
// of the test reads the queries and never replies. Nothing leaves the namespace.

namespace {

int bring_loopback_up() {
  const int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
  ifreq request{};
  std::strncpy(request.ifr_name, "lo", IFNAMSIZ - 1);
  int status = ::ioctl(fd, SIOCGIFFLAGS, &request);
  if (status == 0) {
    request.ifr_flags = static_cast<short>(request.ifr_flags | IFF_UP | IFF_RUNNING);
    status = ::ioctl(fd, SIOCSIFFLAGS, &request);
  }
  ::close(fd);
  return status;
}

}  // namespace

TEST_CASE("client: a DNS server that never answers stalls neither the loop nor other fetches" *
          doctest::skip()) {
  // Runs only in the child started by the test below (--no-skip), inside its namespaces.
  REQUIRE(std::getenv("SQUALL_DNS_NAMESPACE") != nullptr);
  testing::TempDir dir;
  {
    std::ofstream(dir.file("resolv.conf"))
        << "nameserver 127.0.0.1\noptions timeout:10 attempts:1\n";
  }
  REQUIRE(::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0);
  REQUIRE(::mount(dir.file("resolv.conf").c_str(), "/etc/resolv.conf", nullptr, MS_BIND, nullptr) ==
          0);
  REQUIRE(bring_loopback_up() == 0);

  Loop loop;
  {
    // The silent DNS server: counts queries, answers none.
    uv_udp_t dns;
    int queries = 0;
    uv_udp_init(loop.uv(), &dns);
    dns.data = &queries;
    sockaddr_in dns_address{};
    uv_ip4_addr("127.0.0.1", 53, &dns_address);
    REQUIRE(uv_udp_bind(&dns, reinterpret_cast<const sockaddr*>(&dns_address), 0) == 0);
    uv_udp_recv_start(
        &dns,
        [](uv_handle_t*, size_t, uv_buf_t* buf) {
          static char buffer[1500];
          *buf = uv_buf_init(buffer, sizeof buffer);
        },
        [](uv_udp_t* handle, ssize_t n, const uv_buf_t*, const sockaddr*, unsigned) {
          if (n > 0) ++*static_cast<int*>(handle->data);
        });

    // The loop's heartbeat: the longest gap between two 10 ms ticks.
    uv_timer_t heartbeat;
    struct Beat {
      std::uint64_t last = 0;
      std::uint64_t longest_gap = 0;
    } beat;
    uv_timer_init(loop.uv(), &heartbeat);
    heartbeat.data = &beat;
    uv_update_time(loop.uv());
    beat.last = uv_now(loop.uv());
    uv_timer_start(
        &heartbeat,
        [](uv_timer_t* timer) {
          auto* b = static_cast<Beat*>(timer->data);
          uv_update_time(timer->loop);
          const std::uint64_t now = uv_now(timer->loop);
          b->longest_gap = std::max(b->longest_gap, now - b->last);
          b->last = now;
        },
        10, 10);

    TestServer server(loop);
    http::Client client(loop);
    const std::string slow_url =
        "http://never-answered.squall.test:" + std::to_string(server.port) + "/plain";

    std::optional<http::FetchResult> slow;
    http::FetchRequest slow_request = get(slow_url);
    slow_request.connect_timeout = 20s;
    const auto slow_id =
        client.fetch(slow_request, [&](http::FetchResult result) { slow.emplace(result); });

    std::optional<http::FetchResult> timed_out;
    http::FetchRequest short_request = get(slow_url);
    short_request.connect_timeout = 300ms;
    const auto short_started = std::chrono::steady_clock::now();
    std::chrono::steady_clock::duration short_took{};
    client.fetch(short_request, [&](http::FetchResult result) {
      short_took = std::chrono::steady_clock::now() - short_started;
      timed_out.emplace(result);
    });

    // Meanwhile, 20 fetches one after the other, each started by the previous one's callback.
    int completed = 0;
    std::function<void()> next = [&] {
      client.fetch(get(server.url("/plain")), [&](http::FetchResult result) {
        CHECK(result.ok());
        if (++completed < 20) next();
      });
    };
    next();
    // A blocked loop would let neither happen before the resolver's own 10 s timeout.
    run_until(
        loop, [&] { return completed == 20 && timed_out.has_value(); }, 5s);

    CHECK(completed == 20);
    CHECK(queries >= 1);     // getaddrinfo really asked the silent server...
    CHECK_FALSE(slow);       // ...which still has not answered.
    REQUIRE(timed_out);      // The short connect_timeout ended its fetch while resolving,
    CHECK(short_took < 3s);  // on time: the resolver thread was not waited for.
    CHECK(timed_out->error().kind() == Kind::timeout);
    CHECK(std::string(timed_out->error().what()).find(slow_url) != std::string::npos);

    const auto cancel_started = std::chrono::steady_clock::now();
    CHECK(client.cancel(slow_id));
    CHECK(std::chrono::steady_clock::now() - cancel_started < 500ms);
    REQUIRE(slow);
    CHECK(slow->error().kind() == Kind::cancelled);
    CHECK(beat.longest_gap < 500);  // A stall would last the resolver timeout (10 s).
    MESSAGE("longest loop gap while a lookup hung: ", beat.longest_gap,
            " ms; DNS queries: ", queries);

    client.close();
    uv_close(reinterpret_cast<uv_handle_t*>(&heartbeat), nullptr);
    uv_close(reinterpret_cast<uv_handle_t*>(&dns), nullptr);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: slow DNS, in a private network namespace (runs the skipped case above)") {
  // Everything the child needs is built before fork(): it only calls unshare and execve.
  std::vector<std::string> environment;
  for (char** entry = environ; *entry != nullptr; ++entry) environment.emplace_back(*entry);
  environment.emplace_back("SQUALL_DNS_NAMESPACE=1");
  std::vector<char*> envp;
  for (std::string& entry : environment) envp.push_back(entry.data());
  envp.push_back(nullptr);
  std::string filter =
      "-tc=client: a DNS server that never answers stalls neither the loop nor other fetches";
  std::string program = "unit_tests";
  std::string no_skip = "--no-skip";
  char* argv[] = {program.data(), no_skip.data(), filter.data(), nullptr};
  // The child's report goes to a file, shown here only if it failed.
  testing::TempDir dir;
  const std::string report = dir.file("child.txt");
  const int report_fd = ::open(report.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  REQUIRE(report_fd >= 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::dup2(report_fd, STDOUT_FILENO);
    ::dup2(report_fd, STDERR_FILENO);
    if (::unshare(CLONE_NEWNET | CLONE_NEWNS) != 0) ::_exit(77);
    ::execve("/proc/self/exe", argv, envp.data());
    ::_exit(127);
  }
  int status = 0;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  pid_t waited = 0;
  while ((waited = ::waitpid(child, &status, WNOHANG)) == 0 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  ::close(report_fd);
  if (waited == 0) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
    FAIL("the slow-DNS child did not finish within 60 s:\n", testing::read_file(report));
  }
  REQUIRE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 77) {
    MESSAGE("skipped: no permission for network and mount namespaces (needs root)");
    return;
  }
  CHECK_MESSAGE(WEXITSTATUS(status) == 0, testing::read_file(report));
}

// ---- the coroutine form ------------------------------------------------------------------------

namespace {

// Named coroutines (no capturing lambdas): what each test awaits.
Task<void> fetch_three_at_once(http::Client& client, std::string base, std::vector<int>& statuses,
                               bool& done) {
  auto [a, b, c] = co_await when_all(client.fetch(get(base + "/slow/150")),
                                     client.fetch(get(base + "/status/404")),
                                     client.fetch(get(base + "/plain")));
  statuses = {a.status, b.status, c.status};
  CHECK(c.body == "hello");
  done = true;
}

Task<void> fetch_refused(http::Client& client, std::string url, std::string& error, bool& done) {
  try {
    co_await client.fetch(get(url));
  } catch (const http::FetchError& failure) {
    CHECK(failure.kind() == Kind::connect_refused);
    error = failure.what();
  }
  done = true;
}

Task<void> fetch_until_stopped(http::Client& client, std::string url, bool& cancelled, bool& done) {
  try {
    co_await client.fetch(get(url));
  } catch (const CancelledError&) {
    cancelled = true;
  }
  done = true;
}

}  // namespace

TEST_CASE("client: co_await fetch gives the response; three at once take the slowest's time") {
  Loop loop;
  {
    TestServer server(loop);
    http::Client client(loop);
    std::vector<int> statuses;
    bool done = false;
    const auto started = std::chrono::steady_clock::now();
    spawn(loop, fetch_three_at_once(client, server.url(""), statuses, done));
    run_until(loop, [&] { return done; });
    const auto took = std::chrono::steady_clock::now() - started;
    CHECK(statuses == std::vector<int>{200, 404, 200});
    CHECK(took >= 150ms - 2ms);  // The slowest's timer, on the loop's millisecond clock.
    CHECK(client.stats().completed == 3);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: a failed co_await fetch throws FetchError naming the URL") {
  Loop loop;
  {
    http::Client client(loop);
    const std::string url = "http://127.0.0.1:" + std::to_string(closed_port()) + "/x";
    std::string error;
    bool done = false;
    spawn(loop, fetch_refused(client, url, error, done));
    run_until(loop, [&] { return done; });
    CHECK(error.find(url) != std::string::npos);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: stopping the task cancels its fetch at once") {
  Loop loop;
  {
    TestServer server(loop);
    http::Client client(loop);
    std::stop_source stop;
    bool cancelled = false;
    bool done = false;
    spawn(loop, fetch_until_stopped(client, server.url("/slow/5000"), cancelled, done),
          stop.get_token());
    loop.call_later(50ms, [&] {
      CHECK(client.in_flight() == 1);
      stop.request_stop();
      // Removed from curl at once, before the task resumes.
      CHECK(client.in_flight() == 0);
      CHECK_FALSE(done);
    });
    const auto started = std::chrono::steady_clock::now();
    run_until(loop, [&] { return done; });
    CHECK(cancelled);
    CHECK(std::chrono::steady_clock::now() - started < 2s);
    CHECK(client.stats().cancelled == 1);
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("client: a task still awaiting a fetch when the loop closes is destroyed cleanly") {
  Loop loop;
  bool cancelled = false;
  bool done = false;
  {
    TestServer server(loop);
    http::Client client(loop);
    spawn(loop, fetch_until_stopped(client, server.url("/slow/5000"), cancelled, done));
    loop.call_later(50ms, [&] { loop.stop(); });
    loop.run();
    CHECK(client.in_flight() == 1);
    client.close();  // The fetch ends as cancelled; the task would resume on a later turn.
    CHECK(client.in_flight() == 0);
  }
  // The task never resumes: Loop::close destroys its frame without touching the gone client.
  CHECK(loop.close() == 0);
  CHECK_FALSE(done);
}

TEST_CASE("client: its timers and sockets are closed once, whether it or its loop ends first") {
  // A port whose kernel accepts connections that nobody ever reads.
  const int silent = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(silent, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  REQUIRE(::listen(silent, 16) == 0);
  socklen_t length = sizeof address;
  ::getsockname(silent, reinterpret_cast<sockaddr*>(&address), &length);
  const std::string url = "http://127.0.0.1:" + std::to_string(ntohs(address.sin_port)) + "/";
  int cancelled = 0;
  testing::check_every_end_order([&](Loop& loop) {
    auto client = std::make_unique<http::Client>(loop);
    client->fetch(get(url), [&](http::FetchResult result) {
      CHECK_FALSE(result.ok());
      ++cancelled;
    });
    // Until curl watches its socket: a uv_poll_t is open beside the two timers.
    run_until(loop, [&] {
      int polls = 0;
      uv_walk(
          loop.uv(),
          [](uv_handle_t* handle, void* count) {
            if (handle->type == UV_POLL) ++*static_cast<int*>(count);
          },
          &polls);
      return polls > 0;
    });
    return client;
  });
  CHECK(cancelled == 3);  // Each pending fetch ends, whatever the order.
  ::close(silent);
}
