// The echo server of bench/tcp_echo.sh on squall, byte for byte like bench/tcp_echo_uv.c: each
// read_some is written back. (examples/tcp_echo_server.cpp, the line echo, is measured too.)
#include <cstdio>
#include <cstdlib>
#include <string>

#include "squall/core/loop.hpp"
#include "squall/core/signals.hpp"
#include "squall/core/task.hpp"
#include "squall/net/tcp.hpp"

using squall::Task;
using squall::net::StreamClosedError;
using squall::net::TcpStream;

namespace {

Task<void> echo(TcpStream stream) {
  try {
    for (;;) {
      std::string bytes = co_await stream.read_some(64 * 1024);
      co_await stream.write(bytes);
    }
  } catch (const StreamClosedError&) {
  }
}

}  // namespace

int main(int argc, char** argv) {
  squall::ignore_sigpipe();
  squall::Loop loop;
  squall::net::TcpServer server(loop);
  const auto port = static_cast<std::uint16_t>(argc > 1 ? std::atoi(argv[1]) : 0);
  std::printf("listening on %s\n", server.listen("127.0.0.1", port).c_str());
  std::fflush(stdout);
  server.serve(echo);
  loop.run();
  return 0;
}
