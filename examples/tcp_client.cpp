// A TCP client on squall: connects, sends each line, prints each answer (one line back per line
// sent, as the echo server does).
//
//   build/examples/tcp_client HOST PORT [LINE...]    # no LINE: the lines of standard input
//
// Names are resolved on the thread pool; a refused or unreachable server is reported with its
// host:port and the reason, and the exit status is 1.
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include <squall/core/loop.hpp>
#include <squall/core/signals.hpp>
#include <squall/core/task.hpp>
#include <squall/net/tcp.hpp>

using namespace std::chrono_literals;
using squall::Task;
using squall::net::TcpStream;

namespace {

Task<void> talk(squall::Loop& loop, std::string host, std::uint16_t port,
                std::vector<std::string> lines) {
  squall::net::ConnectOptions options;
  options.timeout = 5s;
  TcpStream stream = co_await squall::net::connect(loop, host, port, options);
  for (const std::string& line : lines) {
    const std::string request = line + "\n";
    co_await stream.write(request);
    // Each answer within 5 s, at most 64 KiB.
    const std::string answer = co_await stream.read_until("\n", 64 * 1024, 5s);
    std::printf("%s", answer.c_str());
  }
  co_await stream.shutdown();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s HOST PORT [LINE...]\n", argv[0]);
    return 2;
  }
  std::vector<std::string> lines(argv + 3, argv + argc);
  if (argc == 3) {
    for (std::string line; std::getline(std::cin, line);) lines.push_back(line);
  }
  squall::ignore_sigpipe();
  squall::Loop loop;
  int exit_status = 0;
  squall::spawn(
      loop, talk(loop, argv[1], static_cast<std::uint16_t>(std::atoi(argv[2])), std::move(lines)),
      {}, [&](std::exception_ptr error) {
        if (error) {
          try {
            std::rethrow_exception(error);
          } catch (const std::exception& failure) {
            std::fprintf(stderr, "tcp_client: %s\n", failure.what());
          }
          exit_status = 1;
        }
        loop.stop();
      });
  loop.run();
  return loop.close() == 0 ? exit_status : 1;
}
