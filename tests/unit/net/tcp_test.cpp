// TcpServer, TcpStream and connect, in process on one loop (run_task's watchdog stops a hung
// test after 10 s).
#include "squall/net/tcp.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <system_error>
#include <tuple>
#include <vector>

#include "core/core_test_support.hpp"
#include "core/handle_lifetime.hpp"
#include "squall/core/awaitables.hpp"
#include "squall/core/loop.hpp"

using namespace squall;
using namespace squall::net;
using namespace std::chrono_literals;
using squall::testing::elapsed_ms;
using squall::testing::run_task;

namespace {

struct Pair {
  TcpStream server_side;  // Accepted.
  TcpStream client_side;  // Connected.
};

// A connected pair through `server`; the client side with `client_options`.
Task<Pair> connect_pair(Loop& loop, TcpServer& server, StreamOptions client_options = {}) {
  ConnectOptions options;
  options.stream = client_options;
  auto [accepted, connected] =
      co_await when_all(server.accept(), connect(loop, "127.0.0.1", server.port(), options));
  co_return Pair{std::move(accepted), std::move(connected)};
}

Task<void> echo_lines(TcpStream stream) {
  try {
    for (;;) {
      std::string line = co_await stream.read_until("\n", 1024);
      co_await stream.write(line);
    }
  } catch (const StreamClosedError&) {
  }
}

std::string message_of(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& caught) {
    return caught.what();
  }
}

Task<void> read_hundred(TcpStream& stream) {
  co_await stream.read_exactly(100);
}

Task<void> nap(Loop& loop, std::chrono::milliseconds delay) {
  co_await sleep(loop, delay);
}

// Polls (1 ms sleeps) until `condition` holds.
template <typename Condition>
Task<void> until(Loop& loop, Condition condition) {
  while (!condition()) co_await sleep(loop, 1ms);
}

}  // namespace

TEST_CASE("echo round trips through TcpServer::serve and connect") {
  Loop loop;
  TcpServer server(loop);
  const std::string address = server.listen("127.0.0.1", 0);
  CHECK(address == "127.0.0.1:" + std::to_string(server.port()));
  CHECK(server.port() != 0);
  server.serve(echo_lines);
  auto client = [](Loop& l, std::uint16_t port) -> Task<std::vector<std::string>> {
    TcpStream stream = co_await connect(l, "127.0.0.1", port);
    CHECK(stream.peer_address() == "127.0.0.1:" + std::to_string(port));
    std::vector<std::string> answers;
    for (const char* line : {"hello\n", "second line\n", "\n"}) {
      co_await stream.write(line);
      answers.push_back(co_await stream.read_until("\n", 100));
    }
    // Two lines in one write come back as two reads of one line each.
    co_await stream.write("a\nb\n");
    answers.push_back(co_await stream.read_until("\n", 100));
    answers.push_back(co_await stream.read_until("\n", 100));
    co_return answers;
  };
  CHECK(run_task(loop, client(loop, server.port())) ==
        std::vector<std::string>{"hello\n", "second line\n", "\n", "a\n", "b\n"});
  server.close();
  CHECK(loop.close() == 0);
}

TEST_CASE("read_until: a delimiter split across reads, bytes after it stay buffered") {
  Loop loop;
  TcpServer server(loop);
  server.listen("127.0.0.1", 0);
  auto body = [](Loop& l, TcpServer& s) -> Task<void> {
    Pair pair = co_await connect_pair(l, s);
    TcpStream& reader = pair.server_side;
    auto read_line = [](TcpStream& r) -> Task<std::string> {
      co_return co_await r.read_until("\r\n", 100);
    };
    auto feed = [](Loop& lp, TcpStream& reader_side, TcpStream& writer) -> Task<void> {
      co_await writer.write("ab\r");
      // The first half is read (and scanned) on its own before the rest is sent.
      co_await until(lp, [&] { return reader_side.read_buffer_size() == 3; });
      co_await writer.write("\ncd\r\nrest");
    };
    auto [line, ignored] = co_await when_all(read_line(reader), feed(l, reader, pair.client_side));
    (void)ignored;
    CHECK(line == "ab\r\n");
    CHECK(co_await reader.read_until("\r\n", 100) == "cd\r\n");
    CHECK(co_await reader.read_some(100) == "rest");
  };
  run_task(loop, body(loop, server));
  CHECK(loop.close() == 0);
}

TEST_CASE("read_until beyond max_bytes fails naming the limit and keeps the bytes") {
  Loop loop;
  TcpServer server(loop);
  server.listen("127.0.0.1", 0);
  auto body = [](Loop& l, TcpServer& s) -> Task<void> {
    Pair pair = co_await connect_pair(l, s);
    co_await pair.client_side.write("abcdefgh");
    co_await until(l, [&] { return pair.server_side.read_buffer_size() == 8; });
    std::string error;
    try {
      co_await pair.server_side.read_until("\n", 4);
    } catch (const ReadLimitError& limit) {
      error = limit.what();
    }
    CHECK(error.find("no \"\\n\" within max_bytes = 4 bytes") != std::string::npos);
    CHECK(error.find("read_until(\"\\n\", 4) from 127.0.0.1:") == 0);
    // A delimiter that arrives but ends past the limit fails the same way.
    co_await pair.client_side.write("\n");
    co_await until(l, [&] { return pair.server_side.read_buffer_size() == 9; });
    CHECK_THROWS_AS(co_await pair.server_side.read_until("\n", 8), ReadLimitError);
    // Nothing was lost; within the limit it reads.
    CHECK(co_await pair.server_side.read_until("\n", 9) == "abcdefgh\n");
  };
  run_task(loop, body(loop, server));
  CHECK(loop.close() == 0);
}

TEST_CASE("read_exactly: EOF before n fails clearly, the bytes stay for read_some") {
  Loop loop;
  TcpServer server(loop);
  server.listen("127.0.0.1", 0);
  auto body = [](Loop& l, TcpServer& s) -> Task<void> {
    Pair pair = co_await connect_pair(l, s);
    CHECK(co_await pair.server_side.read_exactly(0) == "");
    co_await pair.client_side.write("abc");
    co_await pair.client_side.shutdown();
    std::string error;
    try {
      co_await pair.server_side.read_exactly(5);
    } catch (const StreamClosedError& closed) {
      error = closed.what();
      CHECK(closed.status() == UV_EOF);
    }
    CHECK(error.find("read_exactly(5) from 127.0.0.1:") == 0);
    CHECK(error.find("the peer closed the stream after 3 of 5 bytes") != std::string::npos);
    CHECK(co_await pair.server_side.read_some(100) == "abc");
    CHECK_THROWS_AS(co_await pair.server_side.read_some(100), StreamClosedError);
    CHECK_THROWS_WITH_AS(co_await pair.server_side.read_until("\n", 10),
                         doctest::Contains("before the delimiter (0 bytes buffered)"),
                         StreamClosedError);
  };
  run_task(loop, body(loop, server));
  CHECK(loop.close() == 0);
}

TEST_CASE("half-close: the peer reads to EOF and still answers") {
  Loop loop;
  TcpServer server(loop);
  server.listen("127.0.0.1", 0);
  // The server side reads the whole request (to EOF), then answers and closes.
  server.serve([](TcpStream stream) -> Task<void> {
    std::string request;
    try {
      for (;;) request += co_await stream.read_some(4096);
    } catch (const StreamClosedError&) {
    }
    co_await stream.write("got " + std::to_string(request.size()) + " bytes");
    co_await stream.shutdown();
  });
  auto client = [](Loop& l, std::uint16_t port) -> Task<std::string> {
    TcpStream stream = co_await connect(l, "127.0.0.1", port);
    co_await stream.write(std::string(100'000, 'x'));
    co_await stream.shutdown();
    CHECK_THROWS_AS(co_await stream.write("late"), StreamClosedError);
    std::string answer;
    try {
      for (;;) answer += co_await stream.read_some(4096);
    } catch (const StreamClosedError& closed) {
      CHECK(closed.status() == UV_EOF);
    }
    co_return answer;
  };
  CHECK(run_task(loop, client(loop, server.port())) == "got 100000 bytes");
  server.close();
  CHECK(loop.close() == 0);
}

TEST_CASE("connect to a closed port is refused, naming host:port and the reason") {
  Loop loop;
  std::uint16_t port = 0;
  {
    TcpServer probe(loop);
    probe.listen("127.0.0.1", 0);
    port = probe.port();
  }
  std::string error;
  try {
    run_task(loop, connect(loop, "127.0.0.1", port));
  } catch (const ConnectError& refused) {
    error = refused.what();
    CHECK(refused.status() == UV_ECONNREFUSED);
  }
  const std::string target = "127.0.0.1:" + std::to_string(port);
  CHECK(error == "connect to " + target + " failed: " + target + ": connection refused");
  CHECK(loop.close() == 0);
}

TEST_CASE("connect resolves \"localhost\" on the pool and tries each address") {
  Loop loop;
  TcpServer server(loop);
  server.listen("127.0.0.1", 0);
  server.serve(echo_lines);
  auto client = [](Loop& l, std::uint16_t port) -> Task<std::string> {
    std::vector<sockaddr_storage> addresses = co_await resolve(l, "localhost", port);
    CHECK(!addresses.empty());
    // Only 127.0.0.1 listens: "::1", if localhost has it, is refused and the next one tried.
    TcpStream stream = co_await connect(l, "localhost", port);
    co_await stream.write("via name\n");
    co_return co_await stream.read_until("\n", 100);
  };
  CHECK(run_task(loop, client(loop, server.port())) == "via name\n");
  std::string error;
  try {
    ConnectOptions options;
    options.timeout = 5s;
    run_task(loop, connect(loop, "nosuch.invalid", 80, options));
  } catch (const std::exception& failed) {
    error = failed.what();
  }
  CHECK(error.find("connect to nosuch.invalid:80") == 0);
  server.close();
  CHECK(loop.close() == 0);
}

TEST_CASE("a read past its deadline fails with TimeoutError; the stream still works") {
  Loop loop;
  TcpServer server(loop);
  server.listen("127.0.0.1", 0);
  auto body = [](Loop& l, TcpServer& s) -> Task<void> {
    Pair pair = co_await connect_pair(l, s);
    co_await pair.client_side.write("ab");
    const std::uint64_t start = uv_hrtime();
    std::string error;
    try {
      co_await pair.server_side.read_exactly(3, 50ms);
    } catch (const TimeoutError& timeout) {
      error = timeout.what();
    }
    CHECK(elapsed_ms(start) >= 45);
    CHECK(error.find("read_exactly(3) from 127.0.0.1:") == 0);
    CHECK(error.find(": timed out after 50 ms") != std::string::npos);
    co_await pair.client_side.write("c");
    CHECK(co_await pair.server_side.read_exactly(3, 5s) == "abc");
  };
  run_task(loop, body(loop, server));
  CHECK(loop.close() == 0);
}

TEST_CASE("a cancelled read resumes at once with CancelledError and loses no bytes") {
  Loop loop;
  TcpServer server(loop);
  server.listen("127.0.0.1", 0);
  auto body = [](Loop& l, TcpServer& s) -> Task<void> {
    Pair pair = co_await connect_pair(l, s);
    co_await pair.client_side.write("partial");
    co_await until(l, [&] { return pair.server_side.read_buffer_size() == 7; });
    std::stop_source source;
    std::exception_ptr error;
    bool done = false;
    spawn(l, read_hundred(pair.server_side), source.get_token(), [&](std::exception_ptr e) {
      error = e;
      done = true;
    });
    co_await sleep(l, 20ms);
    CHECK_FALSE(done);
    const std::uint64_t start = uv_hrtime();
    source.request_stop();
    CHECK_FALSE(done);  // Never resumed from inside request_stop().
    co_await until(l, [&] { return done; });
    CHECK(elapsed_ms(start) < 200);
    CHECK(message_of(error).find("read_exactly(100) from 127.0.0.1:") == 0);
    CHECK(message_of(error).find(": cancelled") != std::string::npos);
    CHECK_THROWS_AS(std::rethrow_exception(error), CancelledError);
    CHECK(co_await pair.server_side.read_some(100) == "partial");
  };
  run_task(loop, body(loop, server));
  CHECK(loop.close() == 0);
}

TEST_CASE("operations awaited under a token already stopped fail with CancelledError unstarted") {
  Loop loop;
  TcpServer server(loop);
  server.listen("127.0.0.1", 0);
  auto body = [](Loop& l, TcpServer& s) -> Task<void> {
    Pair pair = co_await connect_pair(l, s);
    co_await pair.client_side.write("kept");
    co_await until(l, [&] { return pair.server_side.read_buffer_size() == 4; });
    std::stop_source source;
    source.request_stop();
    std::vector<std::string> errors;
    auto record = [&](std::exception_ptr e) {
      CHECK_THROWS_AS(std::rethrow_exception(e), CancelledError);
      errors.push_back(message_of(e));
    };
    spawn(l, read_hundred(pair.server_side), source.get_token(), record);
    auto write_some = [](TcpStream& stream) -> Task<void> { co_await stream.write("lost"); };
    spawn(l, write_some(pair.server_side), source.get_token(), record);
    auto accept_one = [](TcpServer& listening) -> Task<void> {
      TcpStream unused = co_await listening.accept();
    };
    spawn(l, accept_one(s), source.get_token(), record);
    REQUIRE(errors.size() == 3);  // At once: nothing was started, nothing waits.
    CHECK(errors[0].find("read_exactly(100) from 127.0.0.1:") == 0);
    for (const std::string& error : errors) {
      CHECK(error.find(": cancelled") != std::string::npos);
    }
    // The read took nothing and the write sent nothing.
    CHECK(co_await pair.server_side.read_some(100) == "kept");
    co_await pair.server_side.write("next");
    co_await nap(l, 20ms);
    CHECK(co_await pair.client_side.read_some(100) == "next");
  };
  run_task(loop, body(loop, server));
  CHECK(loop.close() == 0);
}

namespace {

struct WriterStats {
  std::size_t written = 0;           // Bytes whose write() completed.
  std::size_t peak_after_write = 0;  // The largest unsent count seen when a write returned.
  bool done = false;
  std::string error;
};

constexpr std::size_t chunk = 16 * 1024;
constexpr std::size_t total = 64 * 1024 * 1024;  // Far above any socket buffer.

// Writes `total` bytes in `chunk`s, recording the unsent bytes each time a write returns.
Task<void> write_all(TcpStream& stream, std::size_t total, std::size_t chunk, WriterStats* stats) {
  const std::string block(chunk, 'w');
  try {
    while (stats->written < total) {
      co_await stream.write(block);
      stats->written += chunk;
      stats->peak_after_write = std::max(stats->peak_after_write, stream.write_buffer_size());
    }
    co_await stream.shutdown();
  } catch (const std::exception& failure) {
    stats->error = failure.what();
  }
  stats->done = true;
}

}  // namespace

TEST_CASE("write back-pressure: a reader that stops suspends the writer, memory stays bounded") {
  Loop loop;
  TcpServerOptions server_options;
  server_options.stream.write_high_water = 64 * 1024;
  server_options.stream.write_low_water = 16 * 1024;
  TcpServer server(loop, server_options);
  server.listen("127.0.0.1", 0);
  auto body = [](Loop& l, TcpServer& s) -> Task<void> {
    Pair pair = co_await connect_pair(l, s);
    TcpStream& writer = pair.server_side;
    WriterStats stats;
    spawn(l, write_all(writer, total, chunk, &stats));
    // The client reads nothing: the kernel buffers fill, then the stream's own queue passes the
    // high mark, which the writer can only see from inside write(): it is suspended.
    co_await until(l, [&] { return writer.write_buffer_size() > 64 * 1024 || stats.done; });
    REQUIRE_FALSE(stats.done);
    const std::size_t written_when_blocked = stats.written;
    co_await sleep(l, 50ms);
    CHECK(stats.written == written_when_blocked);  // Still suspended.
    CHECK(writer.write_buffer_size() <= 64 * 1024 + chunk);
    CHECK(stats.written < total / 4);
    // The reader reads again: the writer resumes and everything arrives.
    std::size_t received = 0;
    try {
      for (;;) {
        received += (co_await pair.client_side.read_some(256 * 1024)).size();
        CHECK(writer.write_buffer_size() <= 64 * 1024 + chunk);
      }
    } catch (const StreamClosedError&) {
    }
    CHECK(stats.error == "");
    CHECK(stats.done);
    CHECK(received == total);
    CHECK(stats.peak_after_write <= 64 * 1024);
  };
  run_task(loop, body(loop, server));
  CHECK(loop.close() == 0);
}

TEST_CASE("a write suspended by back-pressure is cancelled at once; the stream closes cleanly") {
  Loop loop;
  TcpServerOptions server_options;
  server_options.stream.write_high_water = 32 * 1024;
  server_options.stream.write_low_water = 8 * 1024;
  TcpServer server(loop, server_options);
  server.listen("127.0.0.1", 0);
  auto body = [](Loop& l, TcpServer& s) -> Task<void> {
    Pair pair = co_await connect_pair(l, s);
    TcpStream& writer = pair.server_side;
    std::stop_source source;
    WriterStats stats;
    spawn(l, write_all(writer, 1ull << 40, 16 * 1024, &stats), source.get_token());
    co_await until(l, [&] { return writer.write_buffer_size() > 32 * 1024; });
    const std::uint64_t start = uv_hrtime();
    source.request_stop();
    co_await until(l, [&] { return stats.done; });
    CHECK(elapsed_ms(start) < 1000);
    CHECK(stats.error.find("write to 127.0.0.1:") == 0);
    CHECK(stats.error.find(": cancelled") != std::string::npos);
    // A write past its deadline fails the same way, with TimeoutError.
    CHECK_THROWS_WITH_AS(co_await writer.write(std::string(64 * 1024, 'x'), 30ms),
                         doctest::Contains("timed out after 30 ms"), TimeoutError);
  };
  run_task(loop, body(loop, server));
  CHECK(loop.close() == 0);
}

TEST_CASE("tasks suspended in reads, writes and accepts are destroyed by Loop::close") {
  Loop loop;
  TcpServerOptions server_options;
  server_options.stream.write_high_water = 16 * 1024;
  server_options.stream.write_low_water = 0;
  TcpServer server(loop, server_options);
  server.listen("127.0.0.1", 0);
  Pair pair = run_task(loop, connect_pair(loop, server));
  WriterStats stats;
  spawn(loop, write_all(pair.server_side, 1ull << 40, 64 * 1024, &stats));
  spawn(loop,
        [](TcpStream& stream) -> Task<void> { co_await stream.read_some(10); }(pair.client_side));
  TcpServer other(loop);
  other.listen("127.0.0.1", 0);
  spawn(loop, [](TcpServer& s) -> Task<void> { TcpStream ignored = co_await s.accept(); }(other));
  run_task(loop, until(loop, [&] { return pair.server_side.write_buffer_size() > 16 * 1024; }));
  CHECK_FALSE(stats.done);
  // Every frame goes, every handle closes; ASan checks that nothing leaks.
  CHECK(loop.close() == 0);
  CHECK_FALSE(pair.server_side.is_open());
}

TEST_CASE("streams and servers outliving Loop::close() and the Loop are inert") {
  std::optional<TcpServer> server;
  Pair pair;
  {
    Loop loop;
    server.emplace(loop);
    server->listen("127.0.0.1", 0);
    pair = run_task(loop, connect_pair(loop, *server));
    CHECK(pair.client_side.is_open());
    CHECK(loop.close() == 0);
    CHECK_FALSE(pair.client_side.is_open());
    CHECK_FALSE(pair.server_side.is_open());
    pair.client_side.close();  // Harmless.
  }
  // The Loop is gone: destroying what is left frees memory and touches nothing else.
  CHECK_FALSE(pair.server_side.is_open());
  pair = Pair{};
  server.reset();
}

TEST_CASE("servers, streams and operation timers close once, whatever ends first") {
  struct Connected {
    std::unique_ptr<TcpServer> server;
    Pair pair;
  };
  testing::check_every_end_order([](Loop& loop) {
    auto owner = std::make_unique<Connected>();
    owner->server = std::make_unique<TcpServer>(loop);
    owner->server->listen("127.0.0.1", 0);
    owner->server->listen("127.0.0.1", 0);  // Two listening sockets.
    owner->pair = run_task(loop, connect_pair(loop, *owner->server));
    // A read with a deadline leaves its operation timer open while it waits.
    spawn(loop, [](TcpStream& stream) -> Task<void> {
      co_await stream.read_some(10, std::chrono::hours(1));
    }(owner->pair.client_side));
    uv_run(loop.uv(), UV_RUN_NOWAIT);
    return owner;
  });
}

TEST_CASE("TcpServer::accept in coroutine style; close() fails a pending accept") {
  Loop loop;
  TcpServer server(loop);
  server.listen("127.0.0.1", 0);
  auto body = [](Loop& l, TcpServer& s) -> Task<void> {
    // A connection that arrives before accept() waits in the backlog.
    TcpStream early = co_await connect(l, "127.0.0.1", s.port());
    TcpStream accepted = co_await s.accept();
    CHECK(accepted.peer_address() == early.local_address());
    auto closer = [](Loop& lp, TcpServer& srv) -> Task<void> {
      co_await sleep(lp, 10ms);
      srv.close();
    };
    spawn(l, closer(l, s));
    CHECK_THROWS_WITH_AS(co_await s.accept(), doctest::Contains("the server is closed"),
                         StreamClosedError);
    CHECK_THROWS_AS(co_await s.accept(), StreamClosedError);
  };
  run_task(loop, body(loop, server));
  CHECK(loop.close() == 0);
}

TEST_CASE("callback forms run later, never inside the call") {
  Loop loop;
  TcpServer server(loop);
  server.listen("127.0.0.1", 0);
  // A callback-style echo server.
  std::vector<std::shared_ptr<TcpStream>> connections;
  server.serve([&connections](TcpStream stream) {
    auto shared = std::make_shared<TcpStream>(std::move(stream));
    connections.push_back(shared);
    shared->read_until("\n", 100, [shared](std::exception_ptr error, std::string line) {
      if (!error) shared->write(line, [](std::exception_ptr) {});
    });
  });
  std::optional<TcpStream> client;
  std::string answer;
  bool connected_synchronously = true;
  connect(loop, "127.0.0.1", server.port(), ConnectOptions{},
          [&](std::exception_ptr error, TcpStream stream) {
            REQUIRE(!error);
            client.emplace(std::move(stream));
            bool wrote = false;
            client->write("ping\n", [&](std::exception_ptr write_error) {
              CHECK(!write_error);
              wrote = true;
            });
            CHECK_FALSE(wrote);  // Not from inside write(), although the bytes left at once.
            client->read_until("\n", 100, [&](std::exception_ptr read_error, std::string line) {
              CHECK(!read_error);
              answer = line;
              loop.stop();
            });
          });
  connected_synchronously = client.has_value();
  CHECK_FALSE(connected_synchronously);
  const auto watchdog = loop.call_later(10s, [&] { loop.stop(); });
  loop.run();
  loop.cancel(watchdog);
  CHECK(answer == "ping\n");
  // A stream destroyed with a callback pending drops it: it never runs.
  bool ran = false;
  client->read_some(10, [&](std::exception_ptr, std::string) { ran = true; });
  client.reset();
  run_task(loop, nap(loop, 20ms));
  CHECK_FALSE(ran);
  connections.clear();
  server.close();
  CHECK(loop.close() == 0);
}

namespace {

// Connects with `timeout`; the outcome's message ("" when connected).
Task<std::string> try_connect(Loop& loop, std::uint16_t port, std::chrono::milliseconds timeout,
                              std::vector<TcpStream>* keep) {
  ConnectOptions options;
  options.timeout = timeout;
  try {
    keep->push_back(co_await connect(loop, "127.0.0.1", port, options));
    co_return std::string();
  } catch (const TimeoutError& late) {
    co_return std::string(late.what());
  }
}

}  // namespace

TEST_CASE("connect gives up after its timeout, naming host:port") {
  Loop loop;
  // A server that never accepts, with a backlog of one: once its queue is full the kernel drops
  // further SYNs, and those connects hang until their deadline.
  TcpServerOptions options;
  options.backlog = 1;
  TcpServer server(loop, options);
  server.listen("127.0.0.1", 0);
  std::vector<TcpStream> connected;
  std::vector<Task<std::string>> attempts;
  for (int i = 0; i < 6; ++i)
    attempts.push_back(try_connect(loop, server.port(), 200ms, &connected));
  const std::uint64_t start = uv_hrtime();
  const std::vector<std::string> outcomes = run_task(loop, when_all(std::move(attempts)));
  const std::string expected =
      "connect to 127.0.0.1:" + std::to_string(server.port()) + ": timed out after 200 ms";
  const auto timed_out = std::count(outcomes.begin(), outcomes.end(), expected);
  CHECK(timed_out >= 1);
  CHECK(timed_out + static_cast<long>(connected.size()) == 6);
  CHECK(elapsed_ms(start) >= 190);
  CHECK(elapsed_ms(start) < 2000);
  connected.clear();
  server.close();
  CHECK(loop.close() == 0);
}

namespace {

Task<void> accept_one(TcpServer& server, TcpStream* out) {
  *out = co_await server.accept();
}

Task<void> connect_to(Loop& loop, std::string host, std::uint16_t port, TcpStream* out) {
  *out = co_await connect(loop, std::move(host), port);
}

// Runs `task` under a stop token stopped after `delay`; the error it ended with.
std::exception_ptr run_cancelled(Loop& loop, Task<void> task, std::chrono::milliseconds delay) {
  std::stop_source source;
  const auto stopper = loop.call_later(delay, [&] { source.request_stop(); });
  std::exception_ptr error;
  try {
    run_task(loop, std::move(task), source.get_token());
  } catch (...) {
    error = std::current_exception();
  }
  loop.cancel(stopper);
  return error;
}

}  // namespace

TEST_CASE("a cancelled accept or connect resumes with CancelledError; the server goes on") {
  Loop loop;
  TcpServerOptions options;
  options.backlog = 1;
  TcpServer server(loop, options);
  server.listen("127.0.0.1", 0);
  TcpStream accepted;
  std::exception_ptr error = run_cancelled(loop, accept_one(server, &accepted), 20ms);
  CHECK_THROWS_WITH_AS(std::rethrow_exception(error), doctest::Contains("accept on 127.0.0.1:"),
                       CancelledError);
  // Fill the backlog (nobody accepts) until a connect hangs; then one is cancelled.
  std::vector<TcpStream> queued;
  while (run_task(loop, try_connect(loop, server.port(), 200ms, &queued)).empty()) {
    REQUIRE(queued.size() < 16);
  }
  TcpStream hanging;
  const std::uint64_t start = uv_hrtime();
  error = run_cancelled(loop, connect_to(loop, "127.0.0.1", server.port(), &hanging), 50ms);
  CHECK_THROWS_WITH_AS(std::rethrow_exception(error), doctest::Contains("connect to 127.0.0.1:"),
                       CancelledError);
  CHECK(elapsed_ms(start) < 1000);
  CHECK_FALSE(hanging.is_open());
  // The server still accepts what waits in its backlog.
  run_task(loop, accept_one(server, &accepted));
  CHECK(accepted.is_open());
  CHECK(accepted.peer_address() == queued[0].local_address());
  CHECK(loop.close() == 0);
}
